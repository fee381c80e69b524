"""Loading a subset's adapted-model weights (the dreambooth stage's LoRA) into a generation pipeline.

Apart from the stage that trains them, so that generation's code hash does not cover training code.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import PipelineError, layout
from pipeline.checkpoint import check_recorded_hashes
from pipeline.io import file_sha256, read_json


def load_adapter(pipe, adapter_dir: Path, expected_prompt: str) -> str:
    """Load and fuse the DreamBooth-LoRA adapter in `adapter_dir` into `pipe`; return its weights' sha256.

    PipelineError naming the file when the folder is not the dreambooth stage's output, its weights
    are not the ones it recorded, or it was trained with another instance prompt (generation must
    prompt with the one it learned).
    """
    info_path, weights = adapter_dir / layout.ADAPTER_INFO_FILE, adapter_dir / layout.ADAPTER_WEIGHTS_FILE
    if not info_path.is_file() or not weights.is_file():
        raise PipelineError(f"adapter folder {adapter_dir}: expected {layout.ADAPTER_INFO_FILE} and {layout.ADAPTER_WEIGHTS_FILE} (the dreambooth stage's output)")
    info = read_json(info_path)
    if info.get("instance_prompt") != expected_prompt:
        raise PipelineError(
            f"{info_path}: the adapter was trained with instance prompt {info.get('instance_prompt')!r}. "
            f"Expected dreambooth.instance_prompt {expected_prompt!r}; rerun the dreambooth stage."
        )
    check_recorded_hashes(adapter_dir, info_path)
    pipe.load_lora_weights(str(adapter_dir))
    # Fused into the attention weights: a plain model again, as fast as the base one, and its
    # images do not depend on the batch size (the extra LoRA matmuls would).
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return file_sha256(weights)
