"""The caption stage's settings: what a subset's captions depend on."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class CaptionSettings(StageSettings):
    """A setting the captioner cannot use is None (and so out of the key): `csv` but for captioner
    csv, `blip2_model`, `max_new_tokens` and `dtype` but for blip2. Editing caption.csv therefore
    reruns nothing under the annotations captioner."""

    captioner: str = at("caption.captioner")
    csv: str | None = at("caption.csv")
    blip2_model: str | None = at("caption.blip2_model")
    max_new_tokens: int | None = at("caption.max_new_tokens")
    prefix: str = at("caption.prefix")
    dtype: str | None = at("model.dtype")
    device: str = at("device", how=True)

    @classmethod
    def from_config(cls, config: dict) -> CaptionSettings:
        values = cls.read(config)
        if values["captioner"] != "csv":
            values["csv"] = None
        if values["captioner"] != "blip2":
            values.update(blip2_model=None, max_new_tokens=None, dtype=None)
        return cls(**values)
