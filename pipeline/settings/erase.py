"""The erase stage's settings: what the UNet with the task's class names erased depends on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class EraseSettings(StageSettings):
    seed: int = at("seed")
    model_id: str = at("model.id")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    classes: tuple[str, ...] | None = at("erase.classes")
    template: str = at("erase.template")
    eta: float = at("erase.eta")
    steps: int = at("erase.steps")
    learning_rate: float = at("erase.learning_rate")
    ddim_steps: int = at("erase.ddim_steps")
    start_guidance: float = at("erase.start_guidance")
    device: str = at("device", how=True)
    # A resumed run ends bitwise equal to an uninterrupted one.
    checkpoint_every: int = at("erase.checkpoint_every", how=True)
