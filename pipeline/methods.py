"""The generation methods, one entry each: what a method needs, how it prompts, what it starts
from and which part of the source it re-generates.

This module imports neither torch nor diffusers: the Snakefile reads it while it builds the DAG
(which jobs need learned tokens), and so do the stage settings (pipeline.settings).

A method is data. `kind` names the module of `pipeline.makers` that turns a batch of work items
into images (`pipeline.makers.MAKERS`); everything else a method varies is a field here, read by
the work plan (`pipeline.generate_plan`: strength and template draws) and by the stage
(`pipeline.generate`: prompts, checks). So:

* a method of an existing kind is one `Method(...)` entry below plus its tests (the schema's enum
  of `generate.methods` lists it too; tests/test_registries.py fails until it does);
* a method of a new kind (one that starts from another class's image, or from a model adapted
  per class) is one new module in `pipeline/makers/`, registered in `MAKERS`, plus its entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import PipelineError

# What a method can need besides a subset and the base model. "tokens": the invert stage's learned
# class tokens; "masks": each source image's object mask (the subset's mask_path); "captions": the
# caption stage's caption of every training image; "dreambooth": the dreambooth stage's LoRA adapter
# of the subset, loaded into the base model; "mvc": the mvc stage's image-conditioned model of the
# subset, loaded instead of the base model.
NEEDS = frozenset({"tokens", "masks", "captions", "dreambooth", "mvc"})
ADAPTERS = ("dreambooth", "mvc")  # the stages that adapt the model's weights to a subset
STARTS = ("source", "noise")  # a source image noised to t0 (SDEdit), or pure noise (text-to-image)
REGIONS = ("image", "object", "background")  # the part of the source a method re-generates
FILLS = ("token", "class_name", None)  # what replaces "{}" in the prompt template
# The config's template lists (generate.<name>) a method can draw its prompts from.
TEMPLATE_LISTS = ("txt2img_templates", "real_guidance_templates")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # the pipeline.makers module that makes its images
    # "{}" is filled per `fill`. None: one of the `templates` list per image, or with an adapter the
    # prompt the adapter was trained with (dreambooth.instance_prompt).
    template: str | None
    fill: str | None
    start: str = "source"
    region: str = "image"
    strength: float | None = None  # its own t0; None: generate.strength if set, else drawn from {1/k, ..., k/k}
    adapter: str | None = None  # one of ADAPTERS: generate with the subset's adapted model
    # Condition on mixed embeddings of the class's captions (MVC's Algorithm 1) instead of a prompt.
    captions: bool = False
    # The generate.* list of templates (one of TEMPLATE_LISTS) it draws one prompt from per image.
    templates: str | None = None

    def __post_init__(self):
        if self.start not in STARTS or self.region not in REGIONS or self.fill not in FILLS:
            raise ValueError(f"method {self.name!r}: start, region or fill is none of {STARTS}, {REGIONS}, {FILLS}")
        if self.start == "noise" and (self.region != "image" or self.strength is not None):
            raise ValueError(f"method {self.name!r} starts from noise: it has no source region or strength")
        if self.adapter not in (None, *ADAPTERS) or (self.adapter and self.template is not None):
            raise ValueError(f"method {self.name!r}: adapter is none of {ADAPTERS}, or it has a template of its own")
        if self.captions and (self.template is not None or self.fill is not None):
            raise ValueError(f"method {self.name!r} conditions on captions: it has no template or fill")
        if self.templates not in (None, *TEMPLATE_LISTS) or (self.templates and (self.template is not None or self.adapter)):
            raise ValueError(f"method {self.name!r}: templates is none of {TEMPLATE_LISTS}, or it has a template or adapter of its own")

    @property
    def needs(self) -> frozenset[str]:
        needs = set()
        if self.fill == "token":
            needs.add("tokens")
        if self.region != "image":
            needs.add("masks")
        if self.adapter:
            needs.add(self.adapter)
        if self.captions:
            needs.add("captions")
        return frozenset(needs)

    @property
    def draws_template(self) -> bool:
        return self.templates is not None

    def prompt(self, template: str, class_name: str, class_tokens: dict[str, str]) -> str:
        """The prompt of one image of class `class_name` (`class_tokens`: class name -> its learned token)."""
        if self.fill == "token":
            return template.format(class_tokens[class_name])
        if self.fill == "class_name":
            return template.format(class_name)
        return template


METHODS = {
    method.name: method
    for method in (
        # DA-Fusion (Trabucco et al., eq. 5 and section 4.2): SDEdit towards the learned class token,
        # t0 drawn per image from {1/k, ..., k/k}.
        Method("dafusion", "img2img", "a photo of a {}", "token"),
        # DA-Fusion's single-intensity ablation (Fig. 10): the same, every copy at t0 = 0.5.
        Method("dafusion-fixed-t0", "img2img", "a photo of a {}", "token", strength=0.5),
        # Real Guidance (He et al. 2022): the class name in the prompt (generate.real_guidance_templates,
        # "a photo of a {}" unless a descriptive one is given, as DA-Fusion's Fig. 5), t0 = 0.5.
        Method("real-guidance", "img2img", None, "class_name", strength=0.5, templates="real_guidance_templates"),
        # Real Guidance under data-centric leakage prevention: the class name left out of the prompt
        # ("a photo", as the DA-Fusion reference code runs its leakage-free baseline), t0 = 0.5.
        Method("real-guidance-no-name", "img2img", "a photo", None, strength=0.5),
        Method("class-agnostic", "img2img", "a photo", None),
        # Vanilla Stable Diffusion synthetic data: a class-name template, no real image.
        Method("txt2img", "txt2img", None, "class_name", start="noise", templates="txt2img_templates"),
        # Text-to-image with the learned token instead of the name (the Wisconsin study's textual
        # inversion synthetic set, its Table 1).
        Method("txt2img-token", "txt2img", "a photo of a {}", "token", start="noise"),
        # DA-Fusion eq. 7 (object-centric): only the labelled object, or only its background, changes.
        Method("inpaint-fg", "img2img", "a photo of a {}", "token", region="object"),
        Method("inpaint-bg", "img2img", "a photo of a {}", "token", region="background"),
        # DreamBooth (Ruiz et al. 2023; the Wisconsin study's synthetic set): text-to-image from the
        # subset's DreamBooth-LoRA model with its instance prompt ("a photo of sks {class}") ...
        Method("dreambooth", "txt2img", None, "class_name", start="noise", adapter="dreambooth"),
        # ... and DA-Fusion's SDEdit, t0 drawn as dafusion's, with that model and prompt.
        Method("dreambooth-sdedit", "img2img", None, "class_name", adapter="dreambooth"),
        # MVC (Rahat and Venkateswara): from noise with the subset's image-conditioned model, the
        # source image as conditioning and its caption's embedding mixed with the class's others ...
        Method("mvc", "mvc", None, None, start="noise", adapter="mvc", captions=True),
        # ... and its variant for natural images: the same mixed embeddings, text-to-image from the base model.
        Method("mvc-pretrained", "mvc", None, None, start="noise", captions=True),
    )
}


def get(name: str) -> Method:
    """The registered method `name`; PipelineError naming the known ones otherwise."""
    if name not in METHODS:
        raise PipelineError(f"unknown generation method {name!r}. Expected one of {sorted(METHODS)}.")
    return METHODS[name]


def needing(need: str, names) -> list[str]:
    """The methods among `names` that need `need` (one of NEEDS), in the given order."""
    if need not in NEEDS:
        raise ValueError(f"unknown need {need!r}; expected one of {sorted(NEEDS)}")
    return [name for name in names if need in get(name).needs]


def real_guidance_reference(train_methods) -> str | None:
    """The Real Guidance training method a report measures gains against besides the baseline (DA-Fusion
    compares with Real Guidance at the same alpha and M, Fig. 11): `real-guidance`, else
    `real-guidance-no-name`, else None."""
    return next((m for m in ("real-guidance", "real-guidance-no-name") if m in train_methods), None)


LEAKAGE_MODES = ("none", "data-centric", "model-centric", "both")


def leakage_prevention(method: str | None, erased: bool) -> str:
    """How a synthetic set keeps the model's prior knowledge of the class names out (DA-Fusion
    section 6.1): "data-centric" when its prompts never name the class (a learned token or no class
    at all), "model-centric" when it is generated with the names erased from the model, "both", or
    "none". A real-only training method (`method` None) has no synthetic set: "none"."""
    if method is None:
        return "none"
    entry = get(method)
    # Captions begin with the class name (caption.prefix, "This is an image of {}").
    data, model = entry.fill != "class_name" and not entry.captions, erased
    return "both" if data and model else "data-centric" if data else "model-centric" if model else "none"
