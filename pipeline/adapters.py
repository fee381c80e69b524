"""Changed model weights in a generation pipeline: the erase stage's UNet with the class names erased,
a subset's per-class DreamBooth-LoRA adapters, and the check of a subset's MVC model.

Apart from the stage that trains them, so that generation's code hash does not cover training code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline import PipelineError, layout
from pipeline.checkpoint import check_recorded_hashes, weight_hashes
from pipeline.io import read_json


def adapted_weights(weights_file: Path) -> set[str]:
    """The UNet weights (state-dict names) a LoRA file changes once fused: one per adapted module,
    from its keys ("unet.<module>.lora_A.weight" or "unet.<module>.lora.down.weight")."""
    with safe_open(weights_file, "pt") as handle:
        keys = list(handle.keys())
    modules = {key.removeprefix("unet.").split(".lora")[0] for key in keys if ".lora" in key}
    return {f"{module}.weight" for module in modules}


class ClassAdapters:
    """The per-class adapters of `adapter_dir`, fused into `pipe`'s UNet one class at a time.

    Fused, the UNet is a plain model again: as fast as the base one, and its images do not depend on
    the batch size (unfused LoRA matmuls would). Switching class restores the base weights first, so
    no class's adapter leaks into another's.
    """

    def __init__(self, pipe, adapter_dir: Path, expected_prompt: str):
        info_path = adapter_dir / layout.ADAPTER_INFO_FILE
        if not info_path.is_file():
            raise PipelineError(f"adapter folder {adapter_dir}: expected {layout.ADAPTER_INFO_FILE} (the dreambooth stage's output)")
        info = read_json(info_path)
        if info.get("instance_prompt") != expected_prompt:
            raise PipelineError(
                f"{info_path}: the adapters were trained with instance prompt {info.get('instance_prompt')!r}. "
                f"Expected dreambooth.instance_prompt {expected_prompt!r}; rerun the dreambooth stage."
            )
        check_recorded_hashes(adapter_dir, info_path)
        self.pipe, self.adapter_dir, self.folders = pipe, adapter_dir, info["classes"]
        self.hashes = weight_hashes(adapter_dir)
        adapted = set().union(*(adapted_weights(adapter_dir / folder / layout.ADAPTER_WEIGHTS_FILE) for folder in self.folders.values()))
        state = pipe.unet.state_dict()
        missing = sorted(adapted - set(state))
        if missing:
            raise PipelineError(f"{adapter_dir}: the adapters change {missing[0]}, which the UNet of {pipe.unet.config._name_or_path!r} does not have. Expected adapters trained on this model.")
        self.base = {name: state[name].detach().clone() for name in sorted(adapted)}
        self.current: str | None = None

    def use(self, class_name: str) -> None:
        """Make `pipe` the model adapted to `class_name`."""
        if class_name == self.current:
            return
        if class_name not in self.folders:
            raise PipelineError(f"{self.adapter_dir / layout.ADAPTER_INFO_FILE}: no adapter for class {class_name!r}. Expected one of {sorted(self.folders)}")
        with torch.no_grad():
            self.pipe.unet.load_state_dict(self.base, strict=False)
        self.pipe.load_lora_weights(str(self.adapter_dir / self.folders[class_name]))
        self.pipe.fuse_lora()
        self.pipe.unload_lora_weights()
        self.current = class_name


def apply_erasure(pipe, erased_dir: Path) -> dict[str, str]:
    """Load the erase stage's changed UNet parameters over `pipe`'s; return {file: sha256} of the weights.

    PipelineError naming the file when the folder is not the erase stage's output for this model,
    or its weights are not the ones it recorded.
    """
    info_path = erased_dir / layout.ERASE_INFO_FILE
    if not info_path.is_file():
        raise PipelineError(f"erased model folder {erased_dir}: expected {layout.ERASE_INFO_FILE} (the erase stage's output)")
    check_recorded_hashes(erased_dir, info_path)
    params = load_file(erased_dir / layout.ERASED_WEIGHTS_FILE)
    state = pipe.unet.state_dict()
    unknown = sorted(set(params) - set(state))
    if unknown:
        raise PipelineError(f"{erased_dir / layout.ERASED_WEIGHTS_FILE}: parameter {unknown[0]} is not in this model's UNet. Expected the erasure of {read_json(info_path)['model']!r}.")
    with torch.no_grad():
        for name, value in params.items():
            state[name].copy_(value.to(state[name].dtype))
    return weight_hashes(erased_dir)


def is_image_conditioned(unet, vae) -> bool:
    return unet.config.in_channels == 2 * vae.config.latent_channels


def check_mvc_model(model_dir: str | Path) -> None:
    """An mvc stage folder: its weights must be those its mvc.json records."""
    model_dir = Path(model_dir)
    info = model_dir / layout.MVC_INFO_FILE
    if not info.is_file():
        raise PipelineError(f"{model_dir}: no {layout.MVC_INFO_FILE}. Expected a folder the mvc stage wrote.")
    check_recorded_hashes(model_dir, info)
