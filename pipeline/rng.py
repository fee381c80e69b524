"""Seeds derived from (global seed, stage, stable ids), never from global RNG state or file order.

`derive_seed(0, "generate", "img-000017", 3)` is the same on every machine, Python version and run,
so a synthetic image is reproducible whatever the shard count, batch size or number of GPUs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any sequence of ints and strings (order matters)."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(*parts, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator


def numpy_rng(*parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))
