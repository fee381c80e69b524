"""The caption stage's settings: what a subset's captions depend on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class CaptionSettings(StageSettings):
    captioner: str = at("caption.captioner")
    csv: str | None = at("caption.csv")
    blip2_model: str = at("caption.blip2_model")
    max_new_tokens: int = at("caption.max_new_tokens")
    prefix: str = at("caption.prefix")
    seed: int = at("seed")
    dtype: str = at("model.dtype")
    device: str = at("device", how=True)
