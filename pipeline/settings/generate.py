"""The generate stage's settings: what one method's shards of a subset are made with."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import methods
from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class GenerateSettings(StageSettings):
    """A setting the method cannot use is None (and so out of its key): `strength` and
    `num_intensities` for text-to-image, `num_intensities` for a fixed t0, each template list
    (`txt2img_templates`, `real_guidance_templates`) for a method that does not draw from it, `mask_dilation` for one that re-generates the whole image,
    `adapter_prompt` for one without a DreamBooth model, `coarse_swaps` and `fine_swaps` for one that
    does not mix caption embeddings.
    Editing generate.txt2img_templates therefore reruns the txt2img shards only.
    """

    method: str  # from the job
    seed: int = at("seed")
    model_id: str = at("model.id")
    resolution: int = at("model.resolution")
    dtype: str = at("model.dtype")
    cpu_threads: int = at("cpu_threads")
    num_per_image: int = at("generate.num_per_image")
    num_inference_steps: int = at("generate.num_inference_steps")
    guidance_scale: float = at("generate.guidance_scale")
    scheduler: str = at("generate.scheduler")
    channels_last: bool = at("generate.channels_last")
    compile: bool = at("generate.compile")
    safety_checker: bool = at("generate.safety_checker")
    max_resamples: int = at("generate.max_resamples")
    on_bad_image: str = at("generate.on_bad_image")
    strength: float | None = at("generate.strength")  # every copy's t0 (the method's own, else this); None: drawn, or no source
    num_intensities: int | None = at("generate.num_intensities")  # k of the drawn t0 in {1/k, ..., k/k}
    txt2img_templates: tuple[str, ...] | None = at("generate.txt2img_templates")
    real_guidance_templates: tuple[str, ...] | None = at("generate.real_guidance_templates")
    mask_dilation: int | None = at("generate.mask_dilation")
    adapter_prompt: str | None = at("dreambooth.instance_prompt")  # an adapted model's prompt
    coarse_swaps: int | None = at("mvc.coarse_swaps")  # MVC's P and Q of a caption-mixing method
    fine_swaps: int | None = at("mvc.fine_swaps")
    erased: bool = at("erase.enabled")  # generate with the class names erased from the model
    # Seeds, strengths and prompts do not depend on these, nor pixels on CPU (on GPU a level or
    # two, as kernels sum in batch-dependent orders).
    device: str = at("device", how=True)
    batch_size: int | str = at("generate.batch_size", how=True)
    flush_every: int = at("generate.flush_every", how=True)

    @classmethod
    def from_config(cls, config: dict, method: str) -> GenerateSettings:
        spec = methods.get(method)
        values = cls.read(config)
        if spec.start == "noise" or spec.strength is not None:  # no t0, or the method's own
            values.update(strength=spec.strength, num_intensities=None)
        elif values["strength"] is not None:
            values["num_intensities"] = None
        for name in methods.TEMPLATE_LISTS:  # only the list the method draws from
            if spec.templates != name:
                values[name] = None
        if spec.region == "image":
            values["mask_dilation"] = None
        if spec.adapter != "dreambooth":
            values["adapter_prompt"] = None
        if not spec.captions:
            values.update(coarse_swaps=None, fine_swaps=None)
        return cls(method=method, **values)
