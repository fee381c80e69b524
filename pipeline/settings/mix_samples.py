"""The mix_samples stage's settings: what a subset's grid of mixed and unmixed MVC samples depends on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class MixSampleSettings(StageSettings):
    """Sampled as the mvc method generates (its scheduler, steps and guidance), so the grid shows what
    mixing does to that method's images."""

    seed: int = at("seed")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    scheduler: str = at("generate.scheduler")
    steps: int = at("generate.num_inference_steps")
    guidance_scale: float = at("generate.guidance_scale")
    per_class: int = at("mvc.samples.per_class")
    swaps: tuple[int, ...] = at("mvc.samples.swaps")
    draws: int = at("mvc.samples.draws")
    device: str = at("device", how=True)
