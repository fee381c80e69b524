"""The train stage's settings: what one training method's classifier on a subset is trained with."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import PipelineError, methods
from pipeline.augment import is_only_original, is_synthetic_only, parse_method
from pipeline.settings import StageSettings, at

# The settings each augmentation reads; a method without it has them as None, out of its key.
AUGMENTATION_SETTINGS = {
    "randaugment": ("randaugment",),
    "autoaugment": ("autoaugment_policy",),
    "cutout": ("cutout_scale", "cutout_size"),
    "mixup": ("mixup_alpha",),
    "cutmix": ("cutmix_alpha",),
}
MIXING_SETTINGS = ("synthetic_probability", "synthetic_proportion", "two_phase")


@dataclass(frozen=True)
class TrainSettings(StageSettings):
    """None marks a setting the method cannot use, so editing it reruns no job of that method: the
    mixing of synthetic images for a real-only method (and for `+synthetic-only`, which trains on
    synthetic images alone), the share of the mode not in effect (alpha in proportion mode, p in
    probability mode, both in two-phase runs), an augmentation's parameters for a method without
    it, the fine-tuning rates for recipe "paper", and train.steps and train.eval_every when
    train.epochs sets both.
    """

    method: str  # from the job
    synthetic_method: str | None  # the method's synthetic source, parsed from its name
    augmentations: tuple[str, ...]  # the method's augmentations, in the order written
    seed: int = at("seed")
    dataset: str = at("dataset.name")  # recorded in the metrics
    cpu_threads: int = at("cpu_threads")
    backbone: str = at("train.backbone")
    weights: str = at("train.weights")
    image_size: int = at("train.image_size")
    recipe: str = at("train.recipe")
    mixing: str | None = at("train.mixing")
    synthetic_probability: float | None = at("train.synthetic_probability")
    synthetic_proportion: float | None = at("train.synthetic_proportion")
    two_phase: dict | None = at("train.two_phase")
    steps: int | None = at("train.steps")
    eval_every: int | None = at("train.eval_every")
    epochs: int | None = at("train.epochs")
    paper_protocol: bool = at("train.paper_protocol")  # also score val + test at every evaluation
    batch_size: int = at("train.batch_size")
    learning_rate: float = at("train.learning_rate")
    optimizer: str | None = at("train.optimizer")  # the head's under recipe paper
    momentum: float | None = at("train.momentum")  # of optimizer sgd
    finetune: dict | None = at("train.finetune")
    flip: bool = at("train.flip")
    rotation_degrees: float = at("train.rotation_degrees")
    rotation_angles: int = at("train.rotation_angles")
    randaugment: dict | None = at("train.randaugment")
    autoaugment_policy: str | None = at("train.autoaugment_policy")
    mixup_alpha: float | None = at("train.mixup_alpha")
    cutmix_alpha: float | None = at("train.cutmix_alpha")
    cutout_scale: tuple[float, float] | None = at("train.cutout_scale")  # None with cutout_size
    cutout_size: tuple[int, int] | None = at("train.cutout_size")
    real_images: str = at("train.real_images")  # subset or all of the train split
    erased: bool | None = at("erase.enabled")  # recorded as the leakage-prevention mode
    # Only to tell a method name's synthetic source from its augmentations: the parsed parts are in the key.
    generation_methods: tuple[str, ...] = at("generate.methods", how=True)
    # Only to refuse an only-original control that would keep no real image of some subset.
    subset_sizes: tuple[int, ...] = at("dataset.examples_per_class", how=True)
    device: str = at("device", how=True)
    num_workers: int = at("train.num_workers", how=True)
    inference_batch_size: int = at("train.inference_batch_size", how=True)

    @classmethod
    def from_config(cls, config: dict, method: str) -> TrainSettings:
        values = cls.read(config)
        synthetic_method, augmentations = parse_method(method, set(values["generation_methods"]))
        check_mixing(values["mixing"], values["two_phase"], values["steps"] if values["epochs"] is None else None)
        if is_synthetic_only(method):  # every draw synthetic, whatever the mode
            values.update(dict.fromkeys(MIXING_SETTINGS), mixing=None)
        elif is_only_original(method):  # proportion mode's p, real images only
            if values["mixing"] != "proportion" or values["two_phase"] is not None:
                raise PipelineError(
                    f"train.methods: {method!r} is the control of proportion mode, but train.mixing is {values['mixing']!r}"
                    f"{' with two_phase' if values['two_phase'] is not None else ''}. Expected train.mixing: proportion and train.two_phase: null"
                )
            check_only_original_keeps_images(values["synthetic_proportion"], values["subset_sizes"], values["real_images"])
            values.update(synthetic_probability=None, two_phase=None, erased=None)
        elif synthetic_method is None:  # real only; the mode is still recorded
            values.update(dict.fromkeys(MIXING_SETTINGS), erased=None)
        elif values["two_phase"] is not None:
            values.update(synthetic_probability=None, synthetic_proportion=None)
        else:
            unused = {"probability": ["synthetic_proportion"], "proportion": ["synthetic_probability"]}
            values.update(dict.fromkeys(unused.get(values["mixing"], ["synthetic_probability", "synthetic_proportion"])))
        for augmentation, names in AUGMENTATION_SETTINGS.items():
            if augmentation not in augmentations:
                values.update(dict.fromkeys(names))
        if values["cutout_size"] is not None:
            values["cutout_scale"] = None
        if values["recipe"] == "paper":
            values["finetune"] = None
        else:
            values.update(optimizer=None, momentum=None)
        if values["optimizer"] != "sgd":
            values["momentum"] = None
        if values["epochs"] is not None:
            values.update(steps=None, eval_every=None)
        return cls(method, synthetic_method, tuple(augmentations), **values)

    @property
    def leakage_prevention(self) -> str:
        """none, data-centric, model-centric or both (pipeline.methods.leakage_prevention)."""
        return methods.leakage_prevention(self.synthetic_method, bool(self.erased))

    @property
    def only_original(self) -> bool:
        """Whether the method is the only-original control (pipeline.augment.ONLY_ORIGINAL)."""
        return is_only_original(self.method)

    @property
    def synthetic_only(self) -> bool:
        """Whether the method trains on synthetic images alone (`+synthetic-only`, its source's CAS)."""
        return is_synthetic_only(self.method)


def check_only_original_keeps_images(proportion: float, subset_sizes, real_images: str) -> None:
    """Proportion mode replaces round(p * k) of a class's k subset images, halves up: the
    only-original control of a subset where that is all k would train on no image at all."""
    if real_images != "subset":
        return  # the rest of the training set stays
    for k in subset_sizes:
        if int(proportion * k + 0.5) >= k:
            raise PipelineError(
                f"train.synthetic_proportion {proportion} with examples_per_class {k}: proportion mode replaces "
                f"round({proportion} * {k}) = {int(proportion * k + 0.5)} of each class's {k} images (halves up), so the "
                f"only-original control keeps none. Expected a proportion below {(k - 0.5) / k:g} for k = {k}, "
                "or that k left out of dataset.examples_per_class"
            )


def check_mixing(mode: str, two_phase: dict | None, steps: int | None) -> None:
    """The combinations of train.mixing, train.two_phase and train.steps that the schema cannot
    refuse, checked for every method, so that a bad config stops the baseline's job too. (With
    train.epochs, the steps depend on the subset: pipeline.train_plan.with_schedule checks them.)"""
    if two_phase is None:
        return
    if mode != "probability":
        raise PipelineError(
            f"train.two_phase: its phases say what each draws from (phase 2 only real images), which leaves "
            f"nothing for train.mixing to decide. Got train.mixing: {mode}. Expected train.mixing: probability "
            "(the default) with train.two_phase, or train.two_phase: null."
        )
    if steps is not None and two_phase["synthetic_steps"] >= steps:
        raise PipelineError(
            f"train.two_phase.synthetic_steps: got {two_phase['synthetic_steps']} with {steps} steps "
            "(train.steps). Expected fewer, so that phase 2 trains on real images."
        )
