"""The invert stage's settings: what the tokens learned on a subset depend on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class InvertSettings(StageSettings):
    """What the learned tokens of a subset depend on. The sample settings are token_samples' alone,
    so changing them re-renders samples and never re-learns a token."""

    seed: int = at("seed")
    model_id: str = at("model.id")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    mode: str = at("invert.mode")
    init: str = at("invert.init")
    num_vectors: int = at("invert.num_vectors")
    templates: tuple[str, ...] = at("invert.templates")
    learning_rate: float = at("invert.learning_rate")
    scale_lr: bool = at("invert.scale_lr")
    batch_size: int = at("invert.batch_size")
    steps: int = at("invert.steps")
    flip: bool = at("invert.flip")
    gradient_checkpointing: bool = at("invert.gradient_checkpointing")
    device: str = at("device", how=True)
    # A resumed run ends bitwise equal to an uninterrupted one.
    checkpoint_every: int = at("invert.checkpoint_every", how=True)
