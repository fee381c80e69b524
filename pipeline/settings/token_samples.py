"""The token_samples stage's settings: what the grid of a tokens folder's samples depends on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class TokenSampleSettings(StageSettings):
    """What the grid of a tokens folder's text-to-image samples depends on."""

    seed: int = at("seed")
    model_id: str = at("model.id")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    per_class: int = at("invert.samples.per_class")
    steps: int = at("invert.samples.steps")
    guidance_scale: float = at("invert.samples.guidance_scale")
    template: str = at("invert.samples.template")
    device: str = at("device", how=True)
