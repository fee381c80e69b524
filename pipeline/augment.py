"""Training method names and the standard image augmentations they are compared against.

A training method is "+"-joined parts: at most one synthetic-image source (a generation method such
as `dafusion`) and any of the standard augmentations below, e.g. `baseline`, `dafusion`,
`randaugment`, `dafusion+mixup`, `real-guidance+cutmix`. `baseline` stands alone: real images with
the standard augmentation only, a horizontal flip and a small rotation. Every method gets those
(train.flip, train.rotation_degrees; drawn in pipeline.train_plan), so methods differ only in what
their name adds.

The workflow parses method names when it reads the Snakefile, so this module imports torch and
torchvision only inside the functions that build transforms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from pipeline import PipelineError

if TYPE_CHECKING:
    from pipeline.settings.train import TrainSettings

BASELINE = "baseline"
# The part that trains on synthetic images only (every real image replaced by one of its synthetic
# versions for the whole run) and tests on real ones: the Classification Accuracy Score of the
# synthetic source (Ravuri and Vinyals 2019), e.g. `dafusion+synthetic-only`.
SYNTHETIC_ONLY = "synthetic-only"
# The control of proportion mode (study 001's "only original"): the (1 - p) share of real images the
# source's classifier keeps, alone. The images `dafusion` replaces are left out of
# `dafusion+only-original` instead, with nothing in their place; the source's shards are read only
# to know which images have versions.
ONLY_ORIGINAL = "only-original"

# Per-image augmentations on uint8 pixels (randaugment, autoaugment) or on [0, 1] floats (cutout).
IMAGE_AUGMENTATIONS = ("randaugment", "autoaugment", "cutout")
# Augmentations that mix the images and labels of a batch.
BATCH_AUGMENTATIONS = ("mixup", "cutmix")
AUGMENTATIONS = IMAGE_AUGMENTATIONS + BATCH_AUGMENTATIONS


def parse_method(name: str, synthetic_methods: set[str]) -> tuple[str | None, list[str]]:
    """Split a training method name into its synthetic source (or None) and its augmentations.

    `synthetic_methods` are the generation methods whose shards this run can use (the config's
    generate.methods). Augmentations come back in the order written.
    """
    parts = name.split("+")
    valid = f"{BASELINE} alone, or '+'-joined parts from {sorted(synthetic_methods) + list(AUGMENTATIONS) + [SYNTHETIC_ONLY, ONLY_ORIGINAL]}"
    if parts == [BASELINE]:
        return None, []
    synthetic: str | None = None
    augmentations: list[str] = []
    for part in parts:
        if part == BASELINE:
            raise PipelineError(f"training method {name!r}: '{BASELINE}' cannot be combined with other parts. Expected {valid}.")
        if part in synthetic_methods:
            if synthetic is not None:
                raise PipelineError(f"training method {name!r} names two synthetic sources ({synthetic!r} and {part!r}). Expected at most one.")
            synthetic = part
        elif part in (SYNTHETIC_ONLY, ONLY_ORIGINAL):
            continue
        elif part in AUGMENTATIONS:
            if part in augmentations:
                raise PipelineError(f"training method {name!r} names {part!r} twice.")
            augmentations.append(part)
        else:
            raise PipelineError(f"training method {name!r}: unknown part {part!r}. Expected {valid}.")
    if is_synthetic_only(name) and (synthetic is None or parts.count(SYNTHETIC_ONLY) > 1):
        raise PipelineError(f"training method {name!r}: '{SYNTHETIC_ONLY}' needs exactly one synthetic source and appears once. Expected e.g. 'dafusion+{SYNTHETIC_ONLY}'.")
    if is_only_original(name) and (synthetic is None or parts.count(ONLY_ORIGINAL) > 1 or is_synthetic_only(name)):
        raise PipelineError(f"training method {name!r}: '{ONLY_ORIGINAL}' needs exactly one synthetic source, appears once and not with '{SYNTHETIC_ONLY}'. Expected e.g. 'dafusion+{ONLY_ORIGINAL}'.")
    return synthetic, augmentations


def is_only_original(name: str) -> bool:
    """Whether a training method is the only-original control of its source's proportion mode."""
    return ONLY_ORIGINAL in name.split("+")


def partner_method(name: str) -> str:
    """The method whose replacements an only-original control leaves out: its name without the part."""
    return "+".join(part for part in name.split("+") if part != ONLY_ORIGINAL)


def is_synthetic_only(name: str) -> bool:
    """Whether a training method trains on synthetic images alone (its source's CAS)."""
    return SYNTHETIC_ONLY in name.split("+")


def image_transform(augmentations: Sequence[str], settings: TrainSettings):
    """Per-image training transform: uint8 tensor [3, H, W] in, float tensor in [0, 1] out.

    The standard flip and rotation and the resize are not here: images are resized once when decoded,
    and flip and rotation are drawn with the training plan so cached-feature and pixel training see
    the same views.
    Random draws use torch's global generator; the caller seeds it per draw.
    """
    from torch import float32
    from torchvision.transforms import v2

    steps = []
    if "randaugment" in augmentations:
        options = settings.randaugment
        steps.append(v2.RandAugment(num_ops=options["num_ops"], magnitude=options["magnitude"]))
    if "autoaugment" in augmentations:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(settings.autoaugment_policy)))
    steps.append(v2.ToDtype(float32, scale=True))
    if "cutout" in augmentations and settings.cutout_size is not None:
        low, high = settings.cutout_size
        if low > high:
            raise PipelineError(f"train.cutout_size: got [{low}, {high}]. Expected [smallest, largest] side in pixels.")
        steps.append(CutoutSquare(low, high))
    elif "cutout" in augmentations:
        low, high = settings.cutout_scale
        if low > high:
            raise PipelineError(f"train.cutout_scale: got [{low}, {high}]. Expected [smallest, largest] area share.")
        # One black square per image, its area a random share of the image, always inside it.
        steps.append(v2.RandomErasing(p=1.0, scale=(low, high), ratio=(1.0, 1.0), value=0.0))
    return v2.Compose(steps)


class CutoutSquare:
    """Cutout as DeVries and Taylor wrote it: one black square of a side drawn from [low, high]
    pixels, centred anywhere in the image, so near the border only part of it falls inside."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def __call__(self, image):
        import torch

        height, width = image.shape[-2:]
        side = int(torch.randint(self.low, self.high + 1, ()))
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, left = max(cy - side // 2, 0), max(cx - side // 2, 0)
        bottom, right = min(cy - side // 2 + side, height), min(cx - side // 2 + side, width)
        image = image.clone()
        image[..., top:bottom, left:right] = 0.0
        return image


def batch_transform(augmentations: Sequence[str], num_classes: int, settings: TrainSettings):
    """MixUp and/or CutMix on a batch (images [B, 3, H, W], int labels [B]) -> (images, soft labels [B, C]).

    With both, each batch gets one of them at random, as in DeiT. None when neither is asked for.
    """
    from torchvision.transforms import v2

    mixers = []
    if "mixup" in augmentations:
        mixers.append(v2.MixUp(alpha=settings.mixup_alpha, num_classes=num_classes))
    if "cutmix" in augmentations:
        mixers.append(v2.CutMix(alpha=settings.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
