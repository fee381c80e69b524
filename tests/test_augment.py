"""Training method names and the standard augmentation baselines."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torchvision.transforms import v2

from pipeline import PipelineError
from pipeline.augment import batch_transform, image_transform, parse_method
from pipeline.settings.train import TrainSettings
from pipeline.config import validate_config

GENERATION_METHODS = {"dafusion", "real-guidance", "class-agnostic"}


def train_options(**overrides) -> TrainSettings:
    """The settings of a method with every augmentation, so that none of their parameters is None."""
    return TrainSettings.from_config(validate_config({"train": overrides}), "randaugment+autoaugment+cutout+mixup+cutmix")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("baseline", (None, [])),
        ("dafusion", ("dafusion", [])),
        ("randaugment", (None, ["randaugment"])),
        ("dafusion+mixup", ("dafusion", ["mixup"])),
        ("real-guidance+cutmix", ("real-guidance", ["cutmix"])),
        ("cutout+class-agnostic+autoaugment", ("class-agnostic", ["cutout", "autoaugment"])),
        ("mixup+cutmix", (None, ["mixup", "cutmix"])),
    ],
)
def test_parse_method(name, expected):
    assert parse_method(name, GENERATION_METHODS) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("dafusion+colorjitter", "unknown part 'colorjitter'"),
        ("dafusion+", "unknown part ''"),
        ("baseline+mixup", "cannot be combined"),
        ("dafusion+real-guidance", "two synthetic sources"),
        ("mixup+mixup", "'mixup' twice"),
    ],
)
def test_parse_method_refuses_bad_names(name, message):
    with pytest.raises(PipelineError, match=message):
        parse_method(name, GENERATION_METHODS)


def test_unknown_part_error_lists_valid_names():
    with pytest.raises(PipelineError) as error:
        parse_method("txt2img", {"dafusion"})  # a generation method this config does not generate
    for valid in ("baseline", "dafusion", "randaugment", "autoaugment", "mixup", "cutmix", "cutout"):
        assert valid in str(error.value)


def test_parsing_does_not_import_torch():
    code = "import sys, pipeline.augment as a; a.parse_method('dafusion+mixup', {'dafusion'}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_image_transform_without_augmentation_only_scales():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = image_transform([], train_options())(image)
    assert out.dtype == torch.float32
    assert torch.allclose(out, image.float() / 255)


def test_cutout_blacks_out_one_square():
    image = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    out = image_transform(["cutout"], train_options(cutout_scale=[0.1, 0.2]))(image)
    black = (out == 0).all(dim=0)
    rows, cols = black.any(dim=1).nonzero(), black.any(dim=0).nonzero()
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert height == width and black.sum() == height * width
    assert 0.1 * 1600 * 0.8 <= black.sum() <= 0.2 * 1600 * 1.2
    assert (out[:, ~black] == 1).all()


def test_cutout_in_pixels_is_a_square_of_its_side_clipped_at_the_border():
    image = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    transform = image_transform(["cutout"], train_options(cutout_size=[10, 16]))
    whole, clipped = 0, 0
    for seed in range(60):
        torch.manual_seed(seed)
        black = (transform(image) == 0).all(dim=0)
        rows, cols = black.any(dim=1).nonzero(), black.any(dim=0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert black.sum() == height * width and max(height, width) <= 16  # one axis-aligned rectangle
        if height == width and height >= 10:
            whole += 1
        else:
            clipped += 1
            assert rows.min() == 0 or cols.min() == 0 or rows.max() == 39 or cols.max() == 39  # cut by the border
    assert whole and clipped  # both happen over 60 draws on a 40 px image


def test_cutout_size_must_be_ordered():
    with pytest.raises(PipelineError, match="cutout_size"):
        image_transform(["cutout"], train_options(cutout_size=[30, 10]))


def test_cutout_scale_must_be_ordered():
    with pytest.raises(PipelineError, match="cutout_scale"):
        image_transform(["cutout"], train_options(cutout_scale=[0.3, 0.1]))


@pytest.mark.parametrize("augmentation", ["randaugment", "autoaugment"])
def test_policy_augmentations_change_pixels_reproducibly(augmentation):
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    transform = image_transform([augmentation], train_options(randaugment={"num_ops": 3, "magnitude": 15}))
    outputs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert all(out.shape == (3, 32, 32) and out.dtype == torch.float32 for out in outputs)
    assert torch.equal(outputs[0], outputs[1])
    assert any(not torch.allclose(out, image.float() / 255) for out in outputs)


def test_mixup_gives_soft_labels():
    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    mixed, soft = batch_transform(["mixup"], 3, train_options())(images, labels)
    assert mixed.shape == images.shape and soft.shape == (6, 3)
    assert torch.allclose(soft.sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed, images)


def test_batch_transform_only_for_mixing_methods():
    assert batch_transform(["randaugment", "cutout"], 3, train_options()) is None
    both = batch_transform(["mixup", "cutmix"], 3, train_options())
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    assert both(images, labels)[1].shape == (4, 3)


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_autoaugment_uses_the_configured_policy(policy):
    transform = image_transform(["autoaugment"], train_options(autoaugment_policy=policy))
    (auto,) = [step for step in transform.transforms if isinstance(step, v2.AutoAugment)]
    assert auto.policy == v2.AutoAugmentPolicy(policy)
