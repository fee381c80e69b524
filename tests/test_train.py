"""Classifier training: mixing, model selection on val, both training paths, and input checks.

Data: scikit-learn's 8x8 digits upscaled to small RGB PNGs, written as a manifest with train, val and
test splits plus a few-shot subset, exactly as `prepare` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from conftest import RecordingConfig, undeclared_reads

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.io import encode_png, write_parquet
from pipeline.manifest import SHARD_SCHEMA, manifest_table, read_manifest
from pipeline import train_fit
from pipeline.augment import parse_method
from pipeline.settings.train import TrainSettings
from pipeline.metrics import classification_metrics
from pipeline.train import train_classifier
from pipeline.train_fit import Loader, standard_view
from pipeline.train_plan import (
    Mixing,
    draw_plan,
    draw_proportion_plan,
    draw_views,
    fixed_replacements,
    standard_angles,
    training_plan,
    with_schedule,
)

SIZE = 32  # pixels; the smallest train.image_size, and plenty for upscaled 8x8 digits


def digit_image(pixels: np.ndarray) -> np.ndarray:
    """An 8x8 digit (0..16) as a SIZE x SIZE RGB image: white strokes on a dark blue ground."""
    gray = np.kron(pixels / 16.0, np.ones((SIZE // 8, SIZE // 8)))
    rgb = np.stack([gray, gray, 0.3 + 0.7 * gray], axis=-1)
    return (rgb * 255).astype(np.uint8)


def write_digits(root: Path, digits: list[int], per_split: dict[str, int], k: int, relabel_test: dict | None = None):
    """PNGs + manifest.parquet + subset.parquet (the first k train images of each class).

    `relabel_test` maps a class index to the label its test images get: the test split then holds
    the val images under other labels (to check that selection never looks at test).
    """
    data = load_digits()
    classes = [f"digit-{d}" for d in digits]
    (root / "images").mkdir(parents=True)
    rows = []
    for label, digit in enumerate(digits):
        images = data.images[data.target == digit]
        start = 0
        for split, count in per_split.items():
            for i in range(count):
                image_id = f"{split}-{digit}-{i}"
                Image.fromarray(digit_image(images[start + i])).save(root / "images" / f"{image_id}.png")
                rows.append(dict(image_id=image_id, path=f"images/{image_id}.png", split=split, label=label,
                                 class_name=classes[label], mask_path=None, width=SIZE, height=SIZE))
            start += count
    if relabel_test is not None:
        rows = [row for row in rows if row["split"] != "test"]
        for row in [row for row in rows if row["split"] == "val"]:
            label = relabel_test[row["label"]]
            rows.append(dict(row, image_id="test-of-" + row["image_id"], split="test", label=label, class_name=classes[label]))
    meta = {"dataset_root": str(root), "mask_root": None, "classes": classes}
    write_parquet(root / "manifest.parquet", manifest_table(rows), metadata=meta)
    subset = [row for row in rows if row["split"] == "train" and int(row["image_id"].rsplit("-", 1)[1]) < k]
    write_parquet(root / "subset.parquet", manifest_table(subset), metadata={**meta, "trial_seed": 0, "examples_per_class": k})
    return root / "subset.parquet", root / "manifest.parquet", read_manifest(root / "subset.parquet")[0]


def write_shard(path: Path, subset: list[dict], per_image: int, method: str = "dafusion", nsfw_versions: int = 0, **overrides) -> Path:
    """A synthetic shard: `per_image` noisy copies of each subset image, the last `nsfw_versions` flagged nsfw."""
    rng = np.random.default_rng(0)
    rows = []
    for source in subset:
        pixels = np.array(Image.open(source["path"]).convert("RGB"), dtype=np.int16)
        for j in range(per_image):
            noisy = np.clip(pixels + rng.integers(-40, 40, size=pixels.shape), 0, 255).astype(np.uint8)
            rows.append(dict(
                synthetic_id=f"{source['image_id']}-{j}", image_id=source["image_id"], label=source["label"],
                class_name=source["class_name"], method=method, strength=0.5, seed=j, prompt="a photo of a <x>",
                guidance_scale=7.5, num_inference_steps=20, model="tiny", image=encode_png(noisy),
                width=SIZE, height=SIZE, nsfw=j >= per_image - nsfw_versions,
            ))
    rows = [dict(row, **overrides) for row in rows]
    write_parquet(path, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), metadata={"config_hash": "test"})
    return path


def make_config(**train) -> dict:
    options = dict(backbone="efficientnet_lite0", weights="imagenet", image_size=SIZE, steps=4, eval_every=2,
                   batch_size=8, learning_rate=1e-2, inference_batch_size=64)
    options.update(train)
    return validate_config({"device": "cpu", "dataset": {"name": "demo"}, "generate": {"methods": ["dafusion", "real-guidance"]}, "train": options})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ten_digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("ten-digits")
    return write_digits(root, list(range(10)), {"train": 5, "val": 8, "test": 8}, k=5)


@pytest.fixture(scope="module")
def three_digits(tmp_path_factory):
    """Three classes, 2 shots, with a 2-version synthetic shard."""
    root = tmp_path_factory.mktemp("three-digits")
    subset_path, manifest_path, subset = write_digits(root, [0, 1, 7], {"train": 2, "val": 3, "test": 3}, k=2)
    shard = write_shard(root / "shard-0.parquet", subset, per_image=2)
    return subset_path, manifest_path, subset, shard


def test_linear_probe_on_digits_is_far_above_chance(ten_digits, tmp_path):
    subset_path, manifest_path, _ = ten_digits
    config = make_config(steps=300, eval_every=50, batch_size=32)
    out = tmp_path / "metrics.json"
    result = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, out)

    assert json.loads(out.read_text()) == result
    assert result["cached_features"] is True
    assert result["accuracy"] > 0.3, result  # chance is 0.1
    assert result["split"] == "test" and result["n_test"] == 80 and result["n_train_real"] == 50
    assert (result["dataset"], result["method"], result["synthetic_method"], result["augmentations"]) == ("demo", "baseline", None, [])
    assert (result["examples_per_class"], result["trial_seed"]) == (5, 0)
    assert sorted(result["per_class_accuracy"]) == [f"digit-{d}" for d in range(10)]
    assert result["mean_class_accuracy"] == pytest.approx(np.mean(list(result["per_class_accuracy"].values())))
    assert [point["step"] for point in result["curve"]] == [50, 100, 150, 200, 250, 300]
    assert all("phase" not in point for point in result["curve"])
    assert (result["mixing"], result["synthetic_probability"], result["synthetic_proportion"], result["two_phase"]) == ("probability", 0.0, None, None)
    best = max(result["curve"], key=lambda point: point["val_accuracy"])
    assert (result["best_step"], result["val_accuracy"]) == (best["step"], best["val_accuracy"])


def test_the_frozen_recipe_trains_its_head_with_sgd_when_asked(three_digits, tmp_path, monkeypatch):
    """train.optimizer: sgd (study 001's frozen-backbone runs): torch's SGD with train.momentum, recorded."""
    from pipeline import train_fit

    built = []
    original = train_fit.head_optimizer
    monkeypatch.setattr(train_fit, "head_optimizer", lambda head, settings: built.append(original(head, settings)) or built[-1])
    subset_path, manifest_path, _, _ = three_digits
    for optimizer in ("adam", "sgd"):
        result = train_classifier(make_config(optimizer=optimizer, momentum=0.8), subset_path, manifest_path, [], "baseline", 0, tmp_path / f"{optimizer}.json")
        assert result["optimizer"] == optimizer
    adam, sgd = built
    assert isinstance(adam, torch.optim.Adam) and isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["lr"] == 1e-2


def test_selection_uses_val_never_test(tmp_path):
    """Test = the val images with the two labels swapped, so test accuracy = 1 - val accuracy for any
    model: selecting on val must report the best val step and the complement of its accuracy."""
    subset_path, manifest_path, _ = write_digits(tmp_path, [3, 8], {"train": 3, "val": 10}, k=3, relabel_test={0: 1, 1: 0})
    config = make_config(steps=12, eval_every=1, batch_size=4, learning_rate=3e-3)
    result = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, tmp_path / "metrics.json")

    val_curve = [point["val_accuracy"] for point in result["curve"]]
    assert min(val_curve) < max(val_curve), "the curve must vary for this test to tell val from test selection"
    assert result["val_accuracy"] == max(val_curve)
    assert result["best_step"] == result["curve"][val_curve.index(max(val_curve))]["step"]
    assert result["accuracy"] == pytest.approx(1 - result["val_accuracy"])


def test_the_paper_protocol_scores_val_and_test_together_and_changes_nothing_else(tmp_path):
    """With test = val relabelled, any model gets val + test exactly half right: the papers' number
    is 0.5 at every checkpoint, and selection, curve and test accuracy are those of the default protocol."""
    subset_path, manifest_path, _ = write_digits(tmp_path, [3, 8], {"train": 3, "val": 10}, k=3, relabel_test={0: 1, 1: 0})
    runs = {
        paper: train_classifier(make_config(steps=12, eval_every=3, batch_size=4, learning_rate=3e-3, paper_protocol=paper),
                                subset_path, manifest_path, [], "baseline", 0, tmp_path / f"{paper}.json")
        for paper in (False, True)
    }  # fmt: skip
    honest, paper = runs[False], runs[True]
    assert honest["paper_accuracy"] is None and paper["paper_protocol"] is True
    assert [p["official_val_accuracy"] for p in paper["curve"]] == [0.5] * 4 and paper["paper_accuracy"] == 0.5
    assert [p["val_accuracy"] for p in paper["curve"]] == [p["val_accuracy"] for p in honest["curve"]]
    assert (paper["accuracy"], paper["best_step"]) == (honest["accuracy"], honest["best_step"])


def test_the_paper_protocol_on_pixels_is_the_best_official_score(three_digits, tmp_path):
    subset_path, manifest_path, _, _ = three_digits
    result = train_classifier(make_config(steps=4, paper_protocol=True), subset_path, manifest_path, [], "randaugment", 0, tmp_path / "m.json")
    assert result["cached_features"] is False
    assert result["paper_accuracy"] == max(p["official_val_accuracy"] for p in result["curve"])


def views(draws: int) -> tuple[np.ndarray, np.ndarray]:
    return draw_views(draws, True, 5, np.random.default_rng(9))


def test_draw_views_flip_half_and_pick_angles_uniformly():
    flips, angle_index = draw_views(50_000, True, 5, np.random.default_rng(0))
    assert abs(flips.mean() - 0.5) < 0.01
    assert np.allclose(np.bincount(angle_index, minlength=5) / 50_000, 0.2, atol=0.01)
    flips, angle_index = draw_views(100, False, 1, np.random.default_rng(0))
    assert not flips.any() and not angle_index.any()


def test_standard_angles_are_symmetric_and_off_at_zero_degrees():
    assert standard_angles(15, 5) == [-15.0, -7.5, 0.0, 7.5, 15.0]
    assert standard_angles(0, 5) == [0.0]
    assert standard_angles(10, 1) == [0.0]


def test_standard_view_mirrors_then_rotates_about_the_centre():
    image = torch.zeros(3, 9, 9, dtype=torch.uint8)
    image[:, 4, 5:] = 255  # a ray from the centre to the right edge
    assert torch.equal(standard_view(image, False, 0.0), image)
    mirrored = standard_view(image, True, 0.0)
    assert mirrored[0, 4, :4].eq(255).all() and mirrored[0, 4, 5:].eq(0).all()
    # +90 degrees is counter-clockwise: the ray of the mirrored image (pointing left) then points down
    turned = standard_view(image, True, 90.0)
    assert turned[0, 5:, 4].eq(255).all() and turned[0, 4, :4].eq(0).all()


def test_draw_plan_mixes_synthetic_with_probability_alpha():
    counts = np.array([3, 3, 0, 5])
    draws = 60_000
    plan = draw_plan(4, counts, draws, 0.3, views(draws), np.random.default_rng(1), np.random.default_rng(2))

    drew_real = plan.pool_index < 4
    # image 2 has no synthetic version: always real; the others are replaced with probability 0.3
    eligible = plan.pool_index != 2
    assert abs(plan.synthetic[eligible].mean() - 0.3) < 0.01
    assert np.array_equal(plan.synthetic, ~drew_real)
    assert abs(plan.flip.mean() - 0.5) < 0.01
    # a synthetic draw uses a version of the image drawn: image 0 -> pool 4..6, 1 -> 7..9, 3 -> 10..14
    versions = np.bincount(plan.pool_index[plan.synthetic] - 4, minlength=11)
    for block in (versions[0:3], versions[3:6], versions[6:11]):
        assert block.min() > 0.9 * block.mean(), versions  # uniform over an image's versions
    assert versions[0:3].sum() == pytest.approx(versions[3:6].sum(), rel=0.1)


def test_draw_plan_alpha_zero_and_paired_real_draws():
    counts = np.full(5, 4)
    plan_a = draw_plan(5, counts, 1000, 0.0, views(1000), np.random.default_rng(1), np.random.default_rng(2))
    plan_b = draw_plan(5, counts, 1000, 0.7, views(1000), np.random.default_rng(1), np.random.default_rng(3))
    assert not plan_a.synthetic.any() and (plan_a.pool_index < 5).all()
    # same shared generator, different method generator: same real images and flips underneath
    source_b = np.where(plan_b.synthetic, (plan_b.pool_index - 5) // 4, plan_b.pool_index)
    assert np.array_equal(plan_a.pool_index, source_b)
    assert np.array_equal(plan_a.flip, plan_b.flip)


def test_synthetic_mixing_in_training(three_digits, tmp_path):
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(steps=25, eval_every=25, batch_size=8, synthetic_probability=0.5)
    result = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "m.json")
    assert result["synthetic_method"] == "dafusion"
    assert result["n_train_real"] == 6 and result["n_synthetic"] == 12
    assert abs(result["synthetic_fraction"] - 0.5) < 0.1  # 200 draws


def test_nsfw_flagged_images_are_left_out(three_digits, tmp_path):
    subset_path, manifest_path, subset, _ = three_digits
    shard = write_shard(tmp_path / "flagged.parquet", subset, per_image=3, nsfw_versions=1)
    config = make_config(steps=2, synthetic_probability=1.0)
    result = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "m.json")
    assert result["n_synthetic"] == 12 and result["synthetic_fraction"] == 1.0


def test_alpha_zero_trains_exactly_like_the_baseline(three_digits, tmp_path):
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(steps=6, eval_every=2, synthetic_probability=0.0)
    mixed = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "a.json")
    baseline = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, tmp_path / "b.json")
    assert mixed["n_synthetic"] == 0 and mixed["synthetic_fraction"] == 0.0
    assert mixed["curve"] == baseline["curve"]
    assert mixed["per_class_accuracy"] == baseline["per_class_accuracy"]


@pytest.mark.parametrize("method", ["randaugment", "autoaugment", "cutout", "mixup", "cutmix", "dafusion+mixup+cutmix"])
def test_pixel_space_methods_train_and_report(three_digits, tmp_path, method):
    subset_path, manifest_path, _, shard = three_digits
    shards = [shard] if method.startswith("dafusion") else []
    result = train_classifier(make_config(steps=3), subset_path, manifest_path, shards, method, 0, tmp_path / "m.json")
    assert result["cached_features"] is False
    assert result["augmentations"] == [part for part in method.split("+") if part != "dafusion"]
    assert [point["step"] for point in result["curve"]] == [2, 3]
    assert all(np.isfinite(point["train_loss"]) and point["train_loss"] > 0 for point in result["curve"])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n_test"] == 9


def test_pixel_training_does_not_depend_on_worker_count(three_digits, tmp_path):
    subset_path, manifest_path, _, shard = three_digits
    runs = [
        train_classifier(make_config(steps=2, eval_every=1, num_workers=workers), subset_path, manifest_path,
                         [shard], "dafusion+randaugment+cutmix", 0, tmp_path / f"{workers}.json")
        for workers in (0, 1)
    ]
    assert runs[0]["curve"] == runs[1]["curve"]


def test_finetune_recipe_trains_the_whole_network_for_whole_epochs(three_digits, tmp_path, monkeypatch):
    subset_path, manifest_path, _, _ = three_digits
    config = make_config(recipe="finetune", backbone="resnet18", weights="none", epochs=2, batch_size=4,
                         finetune={"backbone_learning_rate": 1e-3, "head_learning_rate": 1e-2, "momentum": 0.9})
    seen = {}
    step = train_fit.train_step

    def recording_step(forward, optimizer, inputs, targets):
        if not seen:  # the network as it was before the first step, and how the optimizer treats it
            seen["model"] = forward
            seen["before"] = {k: v.detach().clone() for k, v in forward.state_dict().items()}
            seen["groups"] = [(len(g["params"]), g["lr"], g["momentum"]) for g in optimizer.param_groups]
        seen["training"] = forward.backbone.training
        return step(forward, optimizer, inputs, targets)

    monkeypatch.setattr(train_fit, "train_step", recording_step)
    result = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, tmp_path / "m.json")

    n_real = result["n_train_real"]
    per_epoch = -(-n_real // 4)
    assert (result["recipe"], result["cached_features"], result["epochs"]) == ("finetune", False, 2)
    assert result["steps"] == 2 * per_epoch
    assert [point["step"] for point in result["curve"]] == [per_epoch, 2 * per_epoch]  # val once per epoch
    model = seen["model"]
    assert seen["training"] is True  # BatchNorm in train mode: the statistics are part of what fine-tuning learns
    assert seen["groups"] == [(len(list(model.backbone.parameters())), 1e-3, 0.9), (len(list(model.head.parameters())), 1e-2, 0.9)]
    after = model.state_dict()
    unchanged = [k for k, v in seen["before"].items() if v.is_floating_point() and torch.equal(v, after[k])]
    assert unchanged == [], unchanged  # every weight and running statistic moved


def test_epochs_set_steps_and_evaluation_from_the_subset_size():
    settings = TrainSettings.from_config(make_config(epochs=35, batch_size=128), "dafusion")
    assert (with_schedule(settings, 300).steps, with_schedule(settings, 300).eval_every) == (105, 3)
    assert (with_schedule(settings, 20).steps, with_schedule(settings, 20).eval_every) == (35, 1)
    plain = TrainSettings.from_config(make_config(steps=7, eval_every=3), "dafusion")
    assert with_schedule(plain, 300) is plain
    too_long = TrainSettings.from_config(make_config(epochs=2, batch_size=10, two_phase={"synthetic_steps": 6, "real_learning_rate_scale": 0.1}), "dafusion")
    with pytest.raises(PipelineError, match=r"synthetic_steps: got 6 with 6 steps \(train.epochs 2 x 3"):
        with_schedule(too_long, 25)


def test_same_inputs_same_result(three_digits, tmp_path):
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(steps=10, eval_every=5)
    first = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "a.json")
    second = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "b.json")
    other_seed = train_classifier(dict(config, seed=1), subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "c.json")
    assert first["curve"] == second["curve"]
    assert first["curve"] != other_seed["curve"]


# ---- proportion mode ----------------------------------------------------------------------------


def _what_draws_became(real_index: np.ndarray, pool_index: np.ndarray) -> dict[int, set]:
    """Per real image drawn, the set of pool images its draws became."""
    became: dict[int, set] = {}
    for image, pool_image in zip(real_index, pool_index):
        became.setdefault(int(image), set()).add(int(pool_image))
    return became


def test_proportion_plan_replaces_a_fixed_share_of_each_class():
    labels = np.array([0] * 4 + [1] * 6)
    counts = np.full(10, 3)
    draws = 5000
    plan = draw_proportion_plan(labels, counts, draws, 0.5, views(draws), np.random.default_rng(1), np.random.default_rng(2))
    real_plan = draw_plan(10, counts, draws, 0.0, views(draws), np.random.default_rng(1), np.random.default_rng(2))
    real_index = real_plan.pool_index  # the same shared generator: the real image under every draw

    became = _what_draws_became(real_index, plan.pool_index)
    assert sorted(became) == list(range(10))
    for image, pool_images in became.items():
        # each image is either always itself or always one and the same synthetic version of itself
        assert len(pool_images) == 1, (image, pool_images)
        (pool_image,) = pool_images
        assert pool_image == image or 10 + 3 * image <= pool_image < 10 + 3 * image + 3
    replaced = np.array([became[i] != {i} for i in range(10)])
    assert (replaced[:4].sum(), replaced[4:].sum()) == (2, 3)  # round(0.5 * 4), round(0.5 * 6)
    assert np.array_equal(plan.synthetic, replaced[real_index])
    assert np.array_equal(plan.flip, real_plan.flip)


def test_proportion_replacements_are_nested_and_rounded_half_up():
    labels = np.array([0] * 4 + [1] * 6 + [2] * 2)
    counts = np.array([2] * 11 + [0])  # the last image has no synthetic version: it stays real
    by_p = {p: fixed_replacements(labels, counts, p, np.random.default_rng(7)) for p in (0.0, 0.25, 0.5, 0.75, 1.0)}
    per_class = {p: [int((r[labels == c] >= 0).sum()) for c in range(3)] for p, r in by_p.items()}
    assert per_class == {0.0: [0, 0, 0], 0.25: [1, 2, 1], 0.5: [2, 3, 1], 0.75: [3, 5, 1], 1.0: [4, 6, 1]}
    for smaller, larger in zip((0.0, 0.25, 0.5, 0.75), (0.25, 0.5, 0.75, 1.0)):
        kept = by_p[smaller] >= 0
        assert np.array_equal(by_p[smaller][kept], by_p[larger][kept])  # same images, same versions
    assert by_p[1.0][-1] == -1
    assert ((by_p[1.0] >= 0) == (counts > 0)).all()
    assert (by_p[1.0][counts > 0] < 2).all()


def test_proportion_zero_and_one_in_training(three_digits, tmp_path):
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(steps=6, eval_every=2, mixing="proportion", synthetic_proportion=0.0)
    none = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "p0.json")
    baseline = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, tmp_path / "b.json")
    assert none["n_synthetic"] == 0 and none["synthetic_fraction"] == 0.0
    assert none["curve"] == baseline["curve"]
    assert none["per_class_accuracy"] == baseline["per_class_accuracy"]
    assert (baseline["mixing"], baseline["synthetic_proportion"], baseline["synthetic_probability"]) == ("proportion", 0.0, None)

    config = make_config(steps=6, eval_every=2, mixing="proportion", synthetic_proportion=1.0)
    for method in ("dafusion", "dafusion+randaugment"):  # cached features and pixels
        every = train_classifier(config, subset_path, manifest_path, [shard], method, 0, tmp_path / "p1.json")
        assert every["n_synthetic"] == 12 and every["synthetic_fraction"] == 1.0
        assert (every["mixing"], every["synthetic_proportion"], every["synthetic_probability"]) == ("proportion", 1.0, None)


def test_the_only_original_control_leaves_out_exactly_the_images_its_partner_replaces():
    labels = np.array([0] * 4 + [1] * 6)
    counts = np.full(10, 3)
    views = draw_views(4000, True, 1, np.random.default_rng(1))

    def plan(only_original):
        return draw_proportion_plan(labels, counts, 4000, 0.5, views, np.random.default_rng(2), np.random.default_rng(3), only_original)

    partner, control = plan(False), plan(True)
    replaced = set(range(10)) - set(partner.pool_index[~partner.synthetic].tolist())  # never drawn real in 4000 draws
    drawn = set(control.pool_index.tolist())
    assert not control.synthetic.any() and drawn.isdisjoint(replaced)
    assert drawn == set(range(10)) - replaced and len(drawn) == 10 - (2 + 3)  # round(0.5 * 4), round(0.5 * 6) left out
    assert np.array_equal(control.flip, partner.flip)


def test_the_only_original_control_trains_on_the_kept_real_images_alone(three_digits, tmp_path):
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(steps=6, eval_every=2, mixing="proportion", synthetic_proportion=0.5)
    config["dataset"]["examples_per_class"] = [2]  # as the subset: k = 1 would leave the control no image
    partner = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "d.json")
    control = train_classifier(config, subset_path, manifest_path, [shard], "dafusion+only-original", 0, tmp_path / "c.json")
    assert control["synthetic_fraction"] == 0.0 and partner["synthetic_fraction"] > 0
    assert control["real_images_drawn"] == 3 and partner["real_images_drawn"] == 3  # 1 of each class's 2 images kept
    with pytest.raises(PipelineError, match=r"'dafusion\+only-original' is the control of proportion mode, but train.mixing is 'probability'"):
        train_classifier(make_config(), subset_path, manifest_path, [shard], "dafusion+only-original", 0, tmp_path / "x.json")


def test_an_only_original_control_without_a_real_image_is_refused_before_any_job():
    def settings(p: float, ks: list[int], real_images: str = "subset") -> TrainSettings:
        config = make_config(mixing="proportion", synthetic_proportion=p, real_images=real_images)
        config["dataset"]["examples_per_class"] = ks
        return TrainSettings.from_config(config, "dafusion+only-original")

    assert settings(0.25, [1, 4]).synthetic_proportion == 0.25  # round(0.25) = 0 of 1, 1 of 4 replaced
    with pytest.raises(PipelineError, match=r"examples_per_class 1: .* = 1 of each class's 1 images .* Expected a proportion below 0.5 for k = 1"):
        settings(0.5, [1, 4])
    with pytest.raises(PipelineError, match=r"examples_per_class 2: .* Expected a proportion below 0.75 for k = 2"):
        settings(0.75, [2, 8])
    assert settings(0.75, [2], real_images="all").synthetic_proportion == 0.75  # the rest of the train set stays
    TrainSettings.from_config(make_config(mixing="proportion", synthetic_proportion=1.0), "dafusion")  # only the control


@pytest.mark.parametrize("name", ["only-original", "randaugment+only-original", "dafusion+only-original+only-original", "dafusion+synthetic-only+only-original"])
def test_only_original_needs_one_synthetic_source(name):
    with pytest.raises(PipelineError, match="'only-original' needs exactly one synthetic source"):
        parse_method(name, {"dafusion"})


def test_the_whole_train_split_with_only_the_subset_augmented(tmp_path):
    """train.real_images: all (the course's regime): every training image, the subset's k per class
    the only ones with synthetic versions."""
    subset_path, manifest_path, subset = write_digits(tmp_path, [0, 1, 7], {"train": 4, "val": 3, "test": 3}, k=1)
    shard = write_shard(tmp_path / "shard.parquet", subset, per_image=2)
    config = make_config(steps=40, eval_every=20, real_images="all", synthetic_probability=0.5)
    baseline = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, tmp_path / "b.json")
    mixed = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "d.json")
    for result in (baseline, mixed):
        assert (result["real_images"], result["n_train_real"], result["examples_per_class"]) == ("all", 12, 1)
    assert mixed["n_synthetic"] == 6
    # alpha 0.5 of the draws of the 3 subset images (a quarter of the pool), none of the other 9
    assert 0.05 < mixed["synthetic_fraction"] < 0.25
    assert train_classifier(make_config(steps=40, eval_every=20), subset_path, manifest_path, [], "baseline", 0, tmp_path / "s.json")["n_train_real"] == 3


# ---- two-phase training ---------------------------------------------------------------------------


def test_two_phase_plan_is_synthetic_then_real():
    two_phase = {"synthetic_steps": 3, "real_learning_rate_scale": 0.1}
    counts = np.array([2, 2, 1, 4])
    labels = np.array([0, 0, 1, 1])
    plan = training_plan(Mixing("probability", None, None, two_phase), labels, counts, 10, 4, True, 5,
                         np.random.default_rng(1), np.random.default_rng(2))
    real = training_plan(Mixing("probability", 0.0, None, None), labels, counts, 10, 4, True, 5,
                         np.random.default_rng(1), np.random.default_rng(2))
    assert plan.synthetic[:12].all() and (plan.pool_index[:12] >= 4).all()
    assert not plan.synthetic[12:].any()
    assert np.array_equal(plan.pool_index[12:], real.pool_index[12:])  # phase 2: the paired real draws
    first_version = np.array([4, 6, 8, 9])
    source = np.searchsorted(first_version, plan.pool_index[:12], side="right") - 1
    assert np.array_equal(source, real.pool_index[:12])  # phase 1: a version of the paired real draw


def test_combined_draws_are_uniform_over_the_union_of_real_and_synthetic_images():
    """MVC's combined strategy, alone and as phase 1 of its two-phase training."""
    counts, labels = np.array([3, 3, 3, 3]), np.array([0, 0, 1, 1])
    rngs = lambda: (np.random.default_rng(1), np.random.default_rng(2))  # noqa: E731
    plan = training_plan(Mixing("combined", None, None, None, combined=True), labels, counts, 500, 8, True, 5, *rngs())
    real = training_plan(Mixing("probability", 0.0, None, None), labels, counts, 500, 8, True, 5, *rngs())
    assert abs(plan.synthetic.mean() - 0.75) < 0.02  # M / (M + 1) with M = 3
    union = np.bincount(plan.pool_index, minlength=16) / len(plan.pool_index)
    assert np.abs(union - 1 / 16).max() < 0.01, "every one of the 4 + 12 images equally often"
    first_version = np.array([4, 7, 10, 13])
    source = np.where(plan.synthetic, np.searchsorted(first_version, plan.pool_index, side="right") - 1, plan.pool_index)
    assert np.array_equal(source, real.pool_index), "paired with the real-only draws"

    two_phase = {"synthetic_steps": 250, "real_learning_rate_scale": 0.1, "phase_1": "combined"}
    phased = training_plan(Mixing("probability", None, None, two_phase), labels, counts, 500, 8, True, 5, *rngs())
    assert abs(phased.synthetic[:2000].mean() - 0.75) < 0.03 and not phased.synthetic[2000:].any()


def _record_learning_rates(monkeypatch) -> list[list[float]]:
    """Make every training step record the learning rate of each parameter group it runs at."""
    rates: list[list[float]] = []
    step = train_fit.train_step

    def recording_step(forward, optimizer, inputs, targets):
        rates.append([group["lr"] for group in optimizer.param_groups])
        return step(forward, optimizer, inputs, targets)

    monkeypatch.setattr(train_fit, "train_step", recording_step)
    return rates


def test_two_phase_training_switches_data_and_learning_rate(three_digits, tmp_path, monkeypatch):
    subset_path, manifest_path, _, shard = three_digits
    two_phase = {"synthetic_steps": 3, "real_learning_rate_scale": 0.1}
    config = make_config(steps=8, eval_every=4, learning_rate=1e-2, two_phase=two_phase)
    rates = _record_learning_rates(monkeypatch)
    result = train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "m.json")

    assert [rate for (rate,) in rates] == pytest.approx([1e-2] * 3 + [1e-3] * 5)
    assert [(point["step"], point["phase"]) for point in result["curve"]] == [(3, 1), (4, 2), (8, 2)]
    best = max(result["curve"], key=lambda point: point["val_accuracy"])
    assert result["best_step"] == best["step"]  # selection over both phases
    assert result["synthetic_fraction"] == pytest.approx(3 / 8)
    assert result["two_phase"] == two_phase and result["synthetic_probability"] is None

    # The real-only control of the same config: one learning rate, no phases.
    rates.clear()
    baseline = train_classifier(config, subset_path, manifest_path, [], "baseline", 0, tmp_path / "b.json")
    assert rates == [[1e-2]] * 8
    assert baseline["two_phase"] is None and [point["step"] for point in baseline["curve"]] == [4, 8]
    assert all("phase" not in point for point in baseline["curve"])


def test_two_phase_scales_the_finetuning_cosine_schedule(three_digits, tmp_path, monkeypatch):
    subset_path, manifest_path, _, shard = three_digits
    two_phase = {"synthetic_steps": 2, "real_learning_rate_scale": 0.5}
    config = make_config(recipe="finetune", backbone="resnet18", weights="none", steps=4, two_phase=two_phase,
                         finetune={"backbone_learning_rate": 1e-3, "head_learning_rate": 1e-2})
    rates = _record_learning_rates(monkeypatch)
    train_classifier(config, subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "m.json")
    cosine = [(1 + np.cos(np.pi * t / 4)) / 2 for t in range(4)]
    scale = [1, 1, 0.5, 0.5]
    expected = [[1e-3 * c * s, 1e-2 * c * s] for c, s in zip(cosine, scale)]
    assert np.allclose(rates, expected, rtol=1e-9, atol=0), rates


# ---- ViT-B/16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, cached", [("dafusion", True), ("dafusion+randaugment", False)])
def test_vit_b_16_trains_on_cached_features_and_pixels(three_digits, tmp_path, method, cached):
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(backbone="vit_b_16", weights="none", steps=2, eval_every=1, synthetic_probability=0.5)
    result = train_classifier(config, subset_path, manifest_path, [shard], method, 0, tmp_path / "m.json")
    assert (result["backbone"], result["image_size"], result["cached_features"]) == ("vit_b_16", SIZE, cached)
    assert [point["step"] for point in result["curve"]] == [1, 2]
    assert all(np.isfinite(point["train_loss"]) for point in result["curve"])


def test_classification_metrics_skip_absent_classes():
    metrics = classification_metrics(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["per_class_accuracy"] == {"a": 0.5, "b": pytest.approx(2 / 3), "c": None}
    assert metrics["mean_class_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)


# ---- bad input: PipelineError before any training, nothing written --------------------------------


def _expect_error(config, subset_path, manifest_path, shards, method, out, match, trial_seed=0):
    with pytest.raises(PipelineError, match=match):
        train_classifier(config, subset_path, manifest_path, shards, method, trial_seed, out)
    assert not out.exists()


def test_unknown_method_is_refused(three_digits, tmp_path):
    subset_path, manifest_path, _, _ = three_digits
    _expect_error(make_config(), subset_path, manifest_path, [], "dafusion+colorjitter", tmp_path / "m.json", "unknown part 'colorjitter'")


def test_shards_must_match_the_method(three_digits, tmp_path):
    subset_path, manifest_path, subset, shard = three_digits
    out = tmp_path / "m.json"
    _expect_error(make_config(), subset_path, manifest_path, [shard], "baseline", out, "uses no synthetic images")
    _expect_error(make_config(), subset_path, manifest_path, [], "dafusion", out, "no synthetic shards")
    _expect_error(make_config(), subset_path, manifest_path, [shard], "real-guidance", out, "made by method 'dafusion'")
    _expect_error(make_config(), subset_path, manifest_path, [shard, shard], "dafusion", out, "appears twice")


def test_shard_with_wrong_label_is_refused(three_digits, tmp_path):
    subset_path, manifest_path, subset, _ = three_digits
    shard = write_shard(tmp_path / "bad.parquet", subset, per_image=1, label=2, class_name="digit-7")
    _expect_error(make_config(), subset_path, manifest_path, [shard], "dafusion", tmp_path / "m.json", "has label 2")


def test_shard_from_another_subset_or_incomplete_is_refused(three_digits, tmp_path):
    subset_path, manifest_path, subset, _ = three_digits
    foreign = write_shard(tmp_path / "foreign.parquet", [dict(subset[0], image_id="train-0-99")], per_image=1)
    _expect_error(make_config(), subset_path, manifest_path, [foreign], "dafusion", tmp_path / "m.json", "not in the training subset")
    partial = write_shard(tmp_path / "partial.parquet", subset[:4], per_image=1)
    _expect_error(make_config(), subset_path, manifest_path, [partial], "dafusion", tmp_path / "m.json", "2 of the 6 subset images")


def test_subset_missing_a_class_is_refused(tmp_path):
    subset_path, manifest_path, subset = write_digits(tmp_path, [0, 1, 2], {"train": 1, "val": 1, "test": 1}, k=1)
    rows = [row for row in subset if row["label"] != 1]
    meta = {"dataset_root": str(tmp_path), "mask_root": None, "classes": ["digit-0", "digit-1", "digit-2"], "trial_seed": 0, "examples_per_class": 1}
    for row in rows:
        row["path"] = str(Path(row["path"]).relative_to(tmp_path))
    write_parquet(subset_path, manifest_table(rows), metadata=meta)
    _expect_error(make_config(), subset_path, manifest_path, [], "baseline", tmp_path / "m.json", r"classes \['digit-1'\]")


def test_bad_mixing_combinations_are_refused_for_every_method(three_digits, tmp_path):
    subset_path, manifest_path, _, _ = three_digits
    out = tmp_path / "m.json"
    proportion = make_config(steps=4, mixing="proportion", two_phase={"synthetic_steps": 2, "real_learning_rate_scale": 0.1})
    _expect_error(proportion, subset_path, manifest_path, [], "baseline", out, r"train\.two_phase.*Got train\.mixing: proportion")
    too_long = make_config(steps=4, two_phase={"synthetic_steps": 4, "real_learning_rate_scale": 0.1})
    _expect_error(too_long, subset_path, manifest_path, [], "baseline", out, r"train\.two_phase\.synthetic_steps: got 4 with 4 steps \(train\.steps\)")


def test_vit_b_16_image_size_must_be_a_multiple_of_16(three_digits, tmp_path):
    subset_path, manifest_path, _, _ = three_digits
    config = make_config(backbone="vit_b_16", weights="none", image_size=40)
    _expect_error(config, subset_path, manifest_path, [], "baseline", tmp_path / "m.json", r"train\.image_size: got 40")


def test_subset_with_held_out_images_or_other_trial_is_refused(tmp_path):
    subset_path, manifest_path, _ = write_digits(tmp_path, [0, 1], {"train": 1, "val": 1, "test": 1}, k=1)
    _expect_error(make_config(), subset_path, manifest_path, [], "baseline", tmp_path / "m.json", "trial seed 0", trial_seed=3)
    # the manifest itself as the subset: it holds val and test images
    _expect_error(make_config(), manifest_path, manifest_path, [], "baseline", tmp_path / "m.json", "not from the train split")


def test_loader_batches_keep_the_row_order_whatever_the_decode_threads(tmp_path):
    rows = []
    for i in range(7):
        pixels = np.full((12, 20, 3), 30 * i, dtype=np.uint8)
        if i % 2:
            rows.append({"synthetic_id": f"s{i}", "image": encode_png(pixels)})
        else:
            Image.fromarray(pixels).save(tmp_path / f"{i}.png")
            rows.append({"path": str(tmp_path / f"{i}.png")})
    one, three = ([batch for batch in Loader(SIZE, 3, torch.device("cpu"), threads).batches(rows, "test")]
                  for threads in (1, 3))
    assert [batch.shape for batch in one] == [(3, 3, SIZE, SIZE)] * 2 + [(1, 3, SIZE, SIZE)]
    assert [batch.dtype for batch in one] == [torch.uint8] * 3
    assert torch.cat(one)[:, 0, 0, 0].tolist() == [30 * i for i in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))


def test_loader_names_a_synthetic_image_it_cannot_decode():
    rows = [{"synthetic_id": "dafusion-x-1", "image": b"\x89PNG broken"}]
    loader = Loader(SIZE, 4, torch.device("cpu"), 2)
    with pytest.raises(PipelineError, match="synthetic image dafusion-x-1: cannot decode"):
        list(loader.batches(rows, "test"))


def test_synthetic_only_trains_on_synthetic_images_alone_whatever_the_mixing(three_digits, tmp_path):
    """`<source>+synthetic-only` is its source's Classification Accuracy Score: every real image
    replaced by one synthetic version for the whole run, as proportion 1 does."""
    subset_path, manifest_path, _, shard = three_digits
    config = make_config(steps=6, eval_every=2)  # train.mixing: probability at alpha 0.5
    cas = train_classifier(config, subset_path, manifest_path, [shard], "dafusion+synthetic-only", 0, tmp_path / "cas.json")
    assert cas["n_synthetic"] == 12 and cas["synthetic_fraction"] == 1.0
    assert (cas["mixing"], cas["synthetic_proportion"], cas["synthetic_probability"]) == ("proportion", 1.0, None)
    every = train_classifier(make_config(steps=6, eval_every=2, mixing="proportion", synthetic_proportion=1.0),
                             subset_path, manifest_path, [shard], "dafusion", 0, tmp_path / "p1.json")
    assert cas["curve"] == every["curve"]


@pytest.mark.parametrize("name", ["synthetic-only", "baseline+synthetic-only", "dafusion+synthetic-only+synthetic-only"])
def test_synthetic_only_needs_one_synthetic_source(name):
    from pipeline.augment import parse_method

    with pytest.raises(PipelineError, match="synthetic-only|baseline"):
        parse_method(name, {"dafusion"})


@pytest.mark.parametrize("method", ["baseline", "dafusion+mixup"])
def test_the_stage_reads_only_config_keys_its_settings_declare(three_digits, tmp_path, method):
    subset_path, manifest_path, _, shard = three_digits
    reads: set[str] = set()
    config = RecordingConfig(make_config(steps=2, eval_every=1), reads)
    train_classifier(config, subset_path, manifest_path, [] if method == "baseline" else [shard], method, 0, tmp_path / "m.json")
    assert undeclared_reads(reads, TrainSettings) == set()
