"""The mvc stage's settings: what a subset's image-conditioned MVC model depends on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class MVCSettings(StageSettings):
    seed: int = at("seed")
    model_id: str = at("model.id")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    coarse_swaps: int = at("mvc.coarse_swaps")
    fine_swaps: int = at("mvc.fine_swaps")
    conditioning: str = at("mvc.conditioning")
    conditioning_dropout: float = at("mvc.conditioning_dropout")
    learning_rate: float = at("mvc.learning_rate")
    steps: int = at("mvc.steps")
    batch_size: int = at("mvc.batch_size")
    device: str = at("device", how=True)
    # A resumed run ends bitwise equal to an uninterrupted one.
    checkpoint_every: int = at("mvc.checkpoint_every", how=True)
