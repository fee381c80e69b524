"""The dreambooth stage's settings: what a subset's DreamBooth-LoRA adapters depend on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class DreamBoothSettings(StageSettings):
    seed: int = at("seed")
    model_id: str = at("model.id")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    instance_prompt: str = at("dreambooth.instance_prompt")
    class_prompt: str = at("dreambooth.class_prompt")
    num_class_images: int = at("dreambooth.num_class_images")
    class_image_steps: int = at("dreambooth.class_image_steps")
    class_image_guidance: float = at("dreambooth.class_image_guidance")
    prior_loss_weight: float = at("dreambooth.prior_loss_weight")
    rank: int = at("dreambooth.rank")
    lora_modules: tuple[str, ...] = at("dreambooth.lora_modules")
    learning_rate: float = at("dreambooth.learning_rate")
    steps: int = at("dreambooth.steps")
    batch_size: int = at("dreambooth.batch_size")
    device: str = at("device", how=True)
    # A resumed run ends bitwise equal to an uninterrupted one.
    checkpoint_every: int = at("dreambooth.checkpoint_every", how=True)

    @property
    def prior_preservation(self) -> bool:
        """Whether the loss has a prior-preservation term (images to draw and a weight above 0)."""
        return self.num_class_images > 0 and self.prior_loss_weight > 0
