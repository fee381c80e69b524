"""The zeroshot stage's settings: which CLIP scores the test split, and with which prompts."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class ZeroShotSettings(StageSettings):
    """A local `model` config or `pretrained` file is also an input of the rule (its contents)."""

    model: str | None = at("zeroshot.model")
    pretrained: str | None = at("zeroshot.pretrained")
    templates: tuple[str, ...] = at("zeroshot.templates")
    device: str = at("device", how=True)
    batch_size: int = at("zeroshot.batch_size", how=True)
