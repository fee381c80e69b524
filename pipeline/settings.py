"""Per-stage settings: the frozen values a stage runs with, built once from the validated config.

A settings object is the stage's whole view of the configuration: its helpers receive fields, never
the config. Each field names the config key it comes from (`CONFIG_KEYS`), and `key()` is every
field that can change the stage's output. That one key is the rule's params (so Snakemake reruns a
job exactly when its output could change) and the resume key of a half-finished job; a field that
only says how the work is done (batch size, flush interval, device) is declared `how=True` and
stays out of it. A stage that starts reading a new setting has to add a field here, which puts it
in the key: tests/test_generate.py fails when the stage reads a config key no field declares.

Torch-free: the Snakefile builds these while it makes the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline import methods


def _how():
    """A field that changes how a stage works, not what it writes: not part of the key."""
    return field(metadata={"how": True})


def _lookup(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class GenerateSettings:
    """What one generation method's shards of a subset are made with.

    A setting the method cannot use is None (and so out of its key): `strength` and
    `num_intensities` for text-to-image, `num_intensities` for a fixed t0, `txt2img_templates` for
    a method with its own prompt, `mask_dilation` for one that re-generates the whole image.
    Editing generate.txt2img_templates therefore reruns the txt2img shards only.
    """

    method: str
    seed: int
    model_id: str
    resolution: int
    dtype: str
    cpu_threads: int
    num_per_image: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    channels_last: bool
    compile: bool
    safety_checker: bool
    max_resamples: int
    on_bad_image: str
    strength: float | None  # every copy's t0 (the method's own, else generate.strength); None: drawn, or no source
    num_intensities: int | None  # k of the drawn t0 in {1/k, ..., k/k}
    txt2img_templates: tuple[str, ...] | None
    mask_dilation: int | None
    device: str = _how()
    batch_size: int | str = _how()
    flush_every: int = _how()

    # Where each field's value comes from in the config (the method comes from the job).
    CONFIG_KEYS = {
        "seed": "seed",
        "model_id": "model.id",
        "resolution": "model.resolution",
        "dtype": "model.dtype",
        "cpu_threads": "cpu_threads",
        "device": "device",
        **{
            name: f"generate.{name}"
            for name in (
                "num_per_image", "num_inference_steps", "guidance_scale", "scheduler", "channels_last", "compile",
                "safety_checker", "max_resamples", "on_bad_image", "strength", "num_intensities",
                "txt2img_templates", "mask_dilation", "batch_size", "flush_every",
            )
        },
    }  # fmt: skip

    @classmethod
    def from_config(cls, config: dict, method_name: str) -> GenerateSettings:
        method = methods.get(method_name)
        unused = set()
        if method.start == "noise" or method.strength is not None:  # no t0, or the method's own
            unused |= {"strength", "num_intensities"}
        if not method.draws_template:
            unused.add("txt2img_templates")
        if method.region == "image":
            unused.add("mask_dilation")
        values = {name: None if name in unused else _lookup(config, key) for name, key in cls.CONFIG_KEYS.items()}
        if method.strength is not None:
            values["strength"] = method.strength
        if values["strength"] is not None:
            values["num_intensities"] = None
        if values["txt2img_templates"] is not None:
            values["txt2img_templates"] = tuple(values["txt2img_templates"])
        return cls(method=method_name, **values)

    def key(self) -> dict:
        """Every field that can change the output, by name (the rule's params and the resume key)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("how")}
