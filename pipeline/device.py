"""Which torch device and dtype a stage runs on."""

from __future__ import annotations

import torch

from pipeline import PipelineError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: 'cuda' was asked for but torch sees no CUDA device. Expected 'auto' or 'cpu' here.")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 on CPU (half precision on CPU is slow and lossy)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
