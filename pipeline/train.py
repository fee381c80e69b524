"""Train a classifier on a few-shot subset, with synthetic images mixed in, and report honest test accuracy.

Training draws real images uniformly with replacement; synthetic images enter by replacing draws, in
one of three ways, all fixed up front for the whole run as a `TrainingPlan` (which image, flipped or
not, rotated by which angle, real or synthetic, the seed of its pixel augmentations), so both training
paths below obey the
same plan and results do not depend on the number of data-loading workers:
  * train.mixing: probability (DA-Fusion, eq. 6-7): each draw is replaced, with probability
    alpha = train.synthetic_probability, by one of that image's synthetic versions, chosen uniformly.
  * train.mixing: proportion (a fixed real/synthetic ratio): a share p = train.synthetic_proportion
    of the real images is swapped for synthetic images for the whole run. In each class of n_c
    images, round(p * n_c) of them (halves round up) are swapped, each for one synthetic version of
    itself chosen uniformly; the images are taken in a seeded order of the class that does not depend
    on p, so the images swapped at a smaller p are among those swapped at a larger p. p = 0 trains
    exactly like the baseline, p = 1 on synthetic images only.
  * train.two_phase {synthetic_steps, real_learning_rate_scale}: the first synthetic_steps steps
    replace every draw by a synthetic version (alpha = 1), the remaining steps draw real images only,
    at the learning rate(s) times real_learning_rate_scale. Val is also scored at the last step of
    phase 1, model selection covers both phases, and curve points carry their `phase` (1 or 2).
    Two-phase runs need train.mixing: probability, and ignore train.synthetic_probability.
A real image whose synthetic versions were all flagged nsfw stays real in every mode. A method
without a synthetic part (baseline, randaugment, ...) trains on real images at one learning rate
whatever these settings say: it is the real-only control of every mode, and its JSON says so
(synthetic_probability or synthetic_proportion 0, two_phase null).

The standard augmentation every method gets (DA-Fusion's): a horizontal flip with probability 1/2
(train.flip) and a small rotation, drawn uniformly from train.rotation_angles evenly spaced angles in
[-train.rotation_degrees, +train.rotation_degrees] (fill black). A finite set of angles, rather
than a continuous one, is what lets the cached-feature path below embed every view once.

Paired comparisons: the real-image draws, the flips, the rotations and the initial weights come from generators
seeded by (seed, "train", trial_seed) only, so every method of a trial sees the same real images in
the same order from the same starting point; the synthetic substitutions, the augmentation seeds and
stochastic-depth / MixUp / CutMix draws come from generators seeded by (seed, "train", method, trial_seed).

Two paths, one plan:
  * cached features (recipe "paper" and no pixel-space augmentation beyond the standard one): the
    frozen backbone embeds every view (flip x angle) of every drawn training image once, then the linear head
    trains on those features, at hundreds of steps per second on one CPU core (benchmarks/bench_train.py).
  * pixels (RandAugment, AutoAugment, Cutout, MixUp, CutMix, or recipe "finetune"): each draw is
    augmented and goes through the backbone at every step.
Images are decoded from files and PNG bytes and resized to train.image_size once, when loaded; pool
images that the plan never draws (most synthetic versions in proportion mode) are not loaded at all.

Model selection: the step with the best validation accuracy (earliest on ties); only that model
is then evaluated on the test split, which nothing before it has touched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import rotate

from pipeline import PipelineError
from pipeline.augment import batch_transform, image_transform, is_synthetic_only, parse_method
from pipeline.backbones import Classifier, build_backbone
from pipeline.device import cpu_numerics, host_threads, resolve_device
from pipeline.io import batched, decode_image, open_image, threaded_map, write_json
from pipeline.manifest import read_manifest, read_shards
from pipeline.progress import progress
from pipeline.rng import derive_seed, numpy_rng

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Validated inputs of one run. The image pool is the real images, then the synthetic ones
    grouped by source image in the order of `real` (within a source, by synthetic_id)."""

    classes: list[str]
    real: list[dict]
    synthetic: list[dict]
    synthetic_counts: np.ndarray  # [len(real)]: synthetic versions of each real image in the pool
    val: list[dict]
    test: list[dict]
    subset_meta: dict


@dataclass(frozen=True)
class Mixing:
    """How synthetic images replace real draws in one run, as the method and train.mixing /
    train.two_phase together decide (see the module docstring)."""

    mode: str  # train.mixing: "probability" or "proportion"
    probability: float | None  # alpha of probability mode; None in proportion mode and two-phase runs
    proportion: float | None  # p of proportion mode; None otherwise
    two_phase: dict | None  # {"synthetic_steps", "real_learning_rate_scale"} of a two-phase run

    @property
    def uses_synthetic(self) -> bool:
        return bool(self.probability or self.proportion or self.two_phase)


@dataclass
class TrainingPlan:
    """Draw k of the run (step k // batch_size, position k % batch_size)."""

    pool_index: np.ndarray  # int64: index into the image pool
    flip: np.ndarray  # bool: mirror the image horizontally
    angle_index: np.ndarray  # int64: index into standard_angles(options) of the draw's rotation
    synthetic: np.ndarray  # bool: the draw was replaced by a synthetic version
    augment_seed: np.ndarray  # int64: seed of the draw's pixel augmentations


@dataclass
class FitResult:
    curve: list[dict]
    best_step: int
    best_val_accuracy: float
    best_state: dict


def train_classifier(
    config: dict,
    subset_path: Path,
    manifest_path: Path,
    shard_paths: list[Path],
    method: str,
    trial_seed: int,
    out_path: Path,
) -> dict:
    """Train `method` on the subset (+ synthetic shards), select on val, write test metrics to `out_path`.

    The JSON written (and returned) holds the metrics of the selected model on the test split,
    its validation accuracy and step, the mixing settings in effect (`mixing`, `synthetic_probability`,
    `synthetic_proportion`, `two_phase`, see the module docstring) with the share of draws that were
    synthetic (`synthetic_fraction`), and the validation curve (`curve`: step, train_loss averaged
    over the steps since the previous evaluation, val_accuracy, and in two-phase runs `phase`).
    """
    start = time.perf_counter()
    options = config["train"]
    synthetic_method, augmentations = parse_method(method, set(config["generate"]["methods"]))
    mixing = resolve_mixing(options, synthetic_method)
    if is_synthetic_only(method):
        mixing = Mixing("proportion", None, 1.0, None)
    data = load_training_data(Path(subset_path), Path(manifest_path), [Path(p) for p in shard_paths], synthetic_method, mixing.uses_synthetic)
    if data.subset_meta.get("trial_seed", trial_seed) != trial_seed:
        raise PipelineError(f"{subset_path}: subset of trial seed {data.subset_meta['trial_seed']}, but trial seed {trial_seed} was asked for.")

    options = with_schedule(options, len(data.real))
    device = resolve_device(config["device"])
    frozen = options["recipe"] == "paper"
    cached = frozen and augmentations == []
    seed = config["seed"]

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "train", trial_seed, "init"))
        backbone = build_backbone(options["backbone"], options["weights"], options["image_size"])
        model = Classifier(backbone, len(data.classes), frozen).to(device)
        torch.manual_seed(derive_seed(seed, "train", method, trial_seed))
        plan = training_plan(
            mixing,
            np.array([row["label"] for row in data.real]),
            data.synthetic_counts,
            options["steps"],
            options["batch_size"],
            options["flip"],
            len(standard_angles(options)),
            shared_rng=numpy_rng(seed, "train", trial_seed, "draws"),
            method_rng=numpy_rng(seed, "train", method, trial_seed, "draws"),
        )
        pool, plan = drawn_pool(data.real + data.synthetic, plan)
        loader = _Loader(options, device)
        desc = f"train {method}"
        if cached:
            fit = _fit_cached_features(model, pool, data.val, plan, loader, options, mixing.two_phase, desc)
        else:
            fit = _fit_pixels(model, pool, data.val, plan, loader, options, mixing.two_phase, desc, augmentations)

        # Only now, with the model chosen on val, is the test split loaded and scored.
        _trainable(model).load_state_dict(fit.best_state)
        test_predictions = _predict_split(model, data.test, loader, "test")

    test_labels = np.array([row["label"] for row in data.test])
    metrics = classification_metrics(test_predictions, test_labels, data.classes)
    result = {
        "dataset": config["dataset"]["name"],
        "method": method,
        "synthetic_method": synthetic_method,
        "augmentations": augmentations,
        "recipe": options["recipe"],
        "examples_per_class": data.subset_meta.get("examples_per_class"),
        "trial_seed": trial_seed,
        "split": "test",
        **metrics,
        "val_accuracy": fit.best_val_accuracy,
        "best_step": fit.best_step,
        "steps": options["steps"],
        "epochs": options["epochs"],
        "n_train_real": len(data.real),
        "n_synthetic": len(data.synthetic),
        "mixing": mixing.mode,
        "synthetic_probability": mixing.probability,
        "synthetic_proportion": mixing.proportion,
        "two_phase": mixing.two_phase,
        "synthetic_fraction": float(plan.synthetic.mean()),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "backbone": options["backbone"],
        "weights": options["weights"],
        "image_size": options["image_size"],
        "cached_features": cached,
        "device": str(device),
        **cpu_numerics(device),
        "curve": fit.curve,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_path, result)
    log.info(
        "%s: test accuracy %.4f (mean per class %.4f) with the model of step %d (val accuracy %.4f); "
        "%d real + %d synthetic images, %.1f%% of draws synthetic, %.0fs",
        method, result["accuracy"], result["mean_class_accuracy"], fit.best_step, fit.best_val_accuracy,
        len(data.real), len(data.synthetic), 100 * result["synthetic_fraction"], result["seconds"],
    )
    return result


def with_schedule(options: dict, n_real: int) -> dict:
    """train options with the `steps` and `eval_every` in effect: from train.epochs when it is set."""
    if options["epochs"] is not None:
        steps_per_epoch = math.ceil(n_real / options["batch_size"])
        options = {**options, "steps": options["epochs"] * steps_per_epoch, "eval_every": steps_per_epoch}
    two_phase = options["two_phase"]
    if two_phase is not None and two_phase["synthetic_steps"] >= options["steps"]:
        where = "train.steps" if options["epochs"] is None else f"train.epochs {options['epochs']} x {steps_per_epoch} steps per epoch"
        raise PipelineError(
            f"train.two_phase.synthetic_steps: got {two_phase['synthetic_steps']} with {options['steps']} steps "
            f"({where}). Expected fewer, so that phase 2 trains on real images."
        )
    return options


def resolve_mixing(options: dict, synthetic_method: str | None) -> Mixing:
    """The mixing of a run of a method with synthetic source `synthetic_method` (None: real only).

    Checks the combinations that the schema cannot, for every method alike, so a bad config stops
    the baseline's job too.
    """
    mode, two_phase = options["mixing"], options["two_phase"]
    if two_phase is not None:
        if mode != "probability":
            raise PipelineError(
                f"train.two_phase: phase 1 draws only synthetic images and phase 2 only real ones, which leaves "
                f"nothing for train.mixing to decide. Got train.mixing: {mode}. Expected train.mixing: probability "
                "(the default) with train.two_phase, or train.two_phase: null."
            )
    if synthetic_method is None:
        return Mixing(mode, 0.0 if mode == "probability" else None, 0.0 if mode == "proportion" else None, None)
    if two_phase is not None:
        return Mixing(mode, None, None, dict(two_phase))
    if mode == "proportion":
        return Mixing(mode, None, options["synthetic_proportion"], None)
    return Mixing(mode, options["synthetic_probability"], None, None)


def load_training_data(
    subset_path: Path, manifest_path: Path, shard_paths: list[Path], synthetic_method: str | None, use_synthetic: bool
) -> TrainingData:
    """Read and cross-check the subset, the manifest's val and test splits, and the synthetic shards.

    Shards are always checked when the method names a synthetic source; their images are read only
    when `use_synthetic` (some draws can be synthetic: alpha > 0, p > 0 or a two-phase run).
    Synthetic rows flagged nsfw (blacked out by the safety checker) are left out of the pool.
    """
    real, subset_meta = read_manifest(subset_path)
    manifest_rows, manifest_meta = read_manifest(manifest_path)
    classes = list(manifest_meta["classes"])
    if list(subset_meta["classes"]) != classes:
        raise PipelineError(f"{subset_path}: classes {subset_meta['classes']} differ from those of {manifest_path} ({classes}).")
    _check_labels(real, classes, subset_path)
    _check_labels(manifest_rows, classes, manifest_path)

    not_train = sorted(row["image_id"] for row in real if row["split"] != "train")
    if not_train:
        raise PipelineError(f"{subset_path}: {len(not_train)} images are not from the train split (e.g. {not_train[:3]}). Expected a few-shot subset of the train split.")
    held_out = {row["image_id"] for row in manifest_rows if row["split"] != "train"}
    leaked = sorted(held_out.intersection(row["image_id"] for row in real))
    if leaked:
        raise PipelineError(f"{subset_path}: images {leaked[:3]} are in the val or test split of {manifest_path}.")
    counts = np.bincount([row["label"] for row in real], minlength=len(classes))
    missing = [name for name, count in zip(classes, counts) if count == 0]
    if missing:
        raise PipelineError(f"{subset_path}: no training image of classes {missing}. Expected at least one image of every class.")

    val = [row for row in manifest_rows if row["split"] == "val"]
    test = [row for row in manifest_rows if row["split"] == "test"]
    for split, rows in (("val", val), ("test", test)):
        if not rows:
            raise PipelineError(f"{manifest_path}: no images in the {split} split. Expected val for model selection and test for the reported accuracy.")

    if synthetic_method is None:
        if shard_paths:
            raise PipelineError(f"the training method uses no synthetic images, but {len(shard_paths)} synthetic shards were given ({shard_paths[0]}, ...).")
        return TrainingData(classes, real, [], np.zeros(len(real), dtype=np.int64), val, test, subset_meta)
    if not shard_paths:
        raise PipelineError(f"the training method mixes in {synthetic_method!r} images, but no synthetic shards were given.")
    synthetic = _read_synthetic(shard_paths, synthetic_method, real, classes, with_images=use_synthetic)
    if not use_synthetic:
        return TrainingData(classes, real, [], np.zeros(len(real), dtype=np.int64), val, test, subset_meta)
    flagged = sum(1 for row in synthetic if row["nsfw"])
    if flagged:
        log.warning("leaving out %d of %d synthetic images flagged nsfw", flagged, len(synthetic))
    synthetic = [row for row in synthetic if not row["nsfw"]]
    order = {row["image_id"]: i for i, row in enumerate(real)}
    synthetic.sort(key=lambda row: (order[row["image_id"]], row["synthetic_id"]))
    synthetic_counts = np.bincount([order[row["image_id"]] for row in synthetic], minlength=len(real)).astype(np.int64)
    return TrainingData(classes, real, synthetic, synthetic_counts, val, test, subset_meta)


def _check_labels(rows: list[dict], classes: list[str], path: Path) -> None:
    for row in rows:
        label = row["label"]
        if not 0 <= label < len(classes) or row["class_name"] != classes[label]:
            raise PipelineError(f"{path}: image {row['image_id']} has label {label} and class_name {row['class_name']!r}. Expected a label into classes {classes} that names the same class.")


def _read_synthetic(shard_paths: list[Path], synthetic_method: str, real: list[dict], classes: list[str], with_images: bool) -> list[dict]:
    """Rows of all shards, each checked against the subset image it was generated from."""
    real_by_id = {row["image_id"]: row for row in real}
    rows: list[dict] = []
    seen: set[str] = set()
    for path in shard_paths:
        for row in read_shards([path], with_images=with_images):
            source = real_by_id.get(row["image_id"])
            where = f"{path}: synthetic image {row['synthetic_id']}"
            if row["synthetic_id"] in seen:
                raise PipelineError(f"{where} appears twice in the shards given. Expected each shard once.")
            seen.add(row["synthetic_id"])
            if row["method"] != synthetic_method:
                raise PipelineError(f"{where} was made by method {row['method']!r}. Expected {synthetic_method!r}.")
            if source is None:
                raise PipelineError(f"{where} comes from image {row['image_id']}, which is not in the training subset. Expected shards generated from this subset.")
            if row["label"] != source["label"] or row["class_name"] != classes[source["label"]]:
                raise PipelineError(
                    f"{where} has label {row['label']} ({row['class_name']!r}) but its source image {row['image_id']} "
                    f"has label {source['label']} ({source['class_name']!r})."
                )
            rows.append(row)
    covered = {row["image_id"] for row in rows}
    uncovered = sorted(set(real_by_id) - covered)
    if uncovered:
        raise PipelineError(
            f"synthetic shards {[str(p) for p in shard_paths]} have no image generated from {len(uncovered)} of the "
            f"{len(real)} subset images (e.g. {uncovered[:3]}). Expected every shard of this subset."
        )
    return rows


def training_plan(
    mixing: Mixing,
    real_labels: np.ndarray,
    synthetic_counts: np.ndarray,
    steps: int,
    batch_size: int,
    flip: bool,
    num_angles: int,
    shared_rng: np.random.Generator,
    method_rng: np.random.Generator,
) -> TrainingPlan:
    """The draws of a run of `steps` steps of `batch_size` draws under `mixing`."""
    draws = steps * batch_size
    views = draw_views(draws, flip, num_angles, shared_rng)
    if mixing.proportion is not None:
        return draw_proportion_plan(real_labels, synthetic_counts, draws, mixing.proportion, views, shared_rng, method_rng)
    if mixing.two_phase is not None:
        phase_1_draws = mixing.two_phase["synthetic_steps"] * batch_size
        probability = (np.arange(draws) < phase_1_draws).astype(np.float64)
    else:
        probability = mixing.probability
    return draw_plan(len(real_labels), synthetic_counts, draws, probability, views, shared_rng, method_rng)


def draw_plan(
    n_real: int,
    synthetic_counts: np.ndarray,
    draws: int,
    synthetic_probability: float | np.ndarray,
    views: tuple[np.ndarray, np.ndarray],
    shared_rng: np.random.Generator,
    method_rng: np.random.Generator,
) -> TrainingPlan:
    """Draw real images uniformly with replacement; replace each by a uniformly chosen synthetic
    version of it with probability `synthetic_probability` (images without versions stay real).

    `synthetic_probability` is one number, or one per draw (two-phase runs: 1 in phase 1, then 0);
    `views` the (flip, angle_index) of every draw, from `draw_views`.
    Pool layout: real images 0..n_real-1, then the synthetic versions of image i at
    n_real + sum(synthetic_counts[:i]) + j, j < synthetic_counts[i].
    """
    synthetic_counts = np.asarray(synthetic_counts, dtype=np.int64)
    real_index = shared_rng.integers(n_real, size=draws)
    versions = synthetic_counts[real_index]
    replaced = (method_rng.random(draws) < synthetic_probability) & (versions > 0)
    version = np.floor(method_rng.random(draws) * versions).astype(np.int64)
    return _plan(real_index, views, np.where(replaced, version, -1), synthetic_counts, method_rng)


def draw_proportion_plan(
    real_labels: np.ndarray,
    synthetic_counts: np.ndarray,
    draws: int,
    synthetic_proportion: float,
    views: tuple[np.ndarray, np.ndarray],
    shared_rng: np.random.Generator,
    method_rng: np.random.Generator,
) -> TrainingPlan:
    """Draw real images uniformly with replacement, where the images that `fixed_replacements`
    swaps are always replaced by their one synthetic version. Pool layout as in `draw_plan`."""
    synthetic_counts = np.asarray(synthetic_counts, dtype=np.int64)
    replacement = fixed_replacements(real_labels, synthetic_counts, synthetic_proportion, method_rng)
    real_index = shared_rng.integers(len(real_labels), size=draws)
    return _plan(real_index, views, replacement[real_index], synthetic_counts, method_rng)


def fixed_replacements(real_labels: np.ndarray, synthetic_counts: np.ndarray, proportion: float, rng: np.random.Generator) -> np.ndarray:
    """Per real image, the synthetic version j that replaces it for the whole run, or -1 (stays real).

    In each class of n_c images, the first round(p * n_c) (halves up) of a random order of the
    class's images that have versions are replaced, each by a uniformly chosen version. The random
    draws do not depend on p, so a larger p replaces a superset of the images, with the same versions.
    """
    real_labels = np.asarray(real_labels)
    replacement = np.full(len(real_labels), -1, dtype=np.int64)
    version = np.floor(rng.random(len(real_labels)) * synthetic_counts).astype(np.int64)
    for label in np.unique(real_labels):
        members = np.flatnonzero(real_labels == label)
        order = members[rng.permutation(len(members))]
        replaceable = order[synthetic_counts[order] > 0]
        wanted = int(math.floor(proportion * len(members) + 0.5))
        if wanted > len(replaceable):
            log.warning(
                "class %d: %d of its %d images should be replaced by synthetic ones, but only %d have synthetic versions",
                label, wanted, len(members), len(replaceable),
            )
        chosen = replaceable[:wanted]
        replacement[chosen] = version[chosen]
    return replacement


def standard_angles(options: dict) -> list[float]:
    """The rotation angles (degrees) of the standard augmentation; [0.0] when rotation is off."""
    degrees, count = float(options["rotation_degrees"]), options["rotation_angles"]
    if degrees == 0 or count == 1:
        return [0.0]
    return np.linspace(-degrees, degrees, count).tolist()


def draw_views(draws: int, flip: bool, num_angles: int, shared_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Whether every draw is mirrored and the index of its rotation angle: the same for every method of a trial."""
    flips = shared_rng.random(draws) < 0.5 if flip else np.zeros(draws, dtype=bool)
    angle_index = shared_rng.integers(num_angles, size=draws) if num_angles > 1 else np.zeros(draws, dtype=np.int64)
    return flips, angle_index


def _plan(real_index: np.ndarray, views: tuple[np.ndarray, np.ndarray], version: np.ndarray, synthetic_counts: np.ndarray, method_rng: np.random.Generator) -> TrainingPlan:
    """The plan of draws of real images `real_index`, each replaced by its synthetic version `version` (-1: not)."""
    n_real = len(synthetic_counts)
    first_version = n_real + np.concatenate([[0], np.cumsum(synthetic_counts)[:-1]])
    replaced = version >= 0
    pool_index = np.where(replaced, first_version[real_index] + version, real_index)
    augment_seed = method_rng.integers(2**63 - 1, size=len(real_index), dtype=np.int64)
    flips, angle_index = views
    return TrainingPlan(pool_index, flips, angle_index, replaced, augment_seed)


def drawn_pool(pool: list[dict], plan: TrainingPlan) -> tuple[list[dict], TrainingPlan]:
    """The pool images that `plan` draws (in pool order), and the plan re-indexed into them."""
    drawn, pool_index = np.unique(plan.pool_index, return_inverse=True)
    return [pool[i] for i in drawn], dataclasses.replace(plan, pool_index=pool_index.astype(np.int64))


def _decode_row(row: dict, size: int) -> torch.Tensor:
    """A row's image from its file (real) or PNG bytes (synthetic), resized to a square, as uint8 [3, S, S]."""
    if "synthetic_id" in row:
        image = decode_image(row["image"], what=f"synthetic image {row['synthetic_id']}")
    else:
        image = open_image(row["path"])
    image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class _Loader:
    """Decodes image rows on the job's threads (PIL releases the GIL) while the caller works on the
    batch before, and turns uint8 batches into model inputs on the device."""

    def __init__(self, options: dict, device: torch.device, threads: int | None = None):
        self.size = options["image_size"]
        self.batch_size = options["inference_batch_size"]
        self.threads = threads or host_threads()
        self.device = device

    def batches(self, rows: list[dict], desc: str) -> Iterator[torch.Tensor]:
        decode = partial(_decode_row, size=self.size)
        with threaded_map(decode, rows, self.threads, 2 * self.batch_size) as images:
            batches = (torch.stack(batch) for batch in batched(images, self.batch_size))
            yield from progress(batches, total=math.ceil(len(rows) / self.batch_size), desc=desc)

    def decode_all(self, rows: list[dict], desc: str) -> torch.Tensor:
        return torch.cat(list(self.batches(rows, desc)))

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).float().div_(255)


@torch.no_grad()
def _embed(model: Classifier, loader: _Loader, rows: list[dict], desc: str, flips: bool = False, angles: Sequence[float] = (0.0,)) -> torch.Tensor:
    """Backbone features [views, N, D] of the images as they are, or of every standard view of them:
    view flip * len(angles) + a is the image, mirrored if flip, rotated by angles[a]."""
    chunks = []
    for batch in loader.batches(rows, desc):
        mirrored = [False, True] if flips else [False]
        views = [standard_view(batch, flip, angle) for flip in mirrored for angle in angles]
        chunks.append(torch.stack([model.backbone(loader.to_input(view)) for view in views]))
    return torch.cat(chunks, dim=1)


def standard_view(images: torch.Tensor, flip: bool, angle: float) -> torch.Tensor:
    """uint8 images [..., 3, H, W] mirrored (if `flip`), then rotated by `angle` degrees about the centre."""
    if flip:
        images = images.flip(-1)
    if angle:
        images = rotate(images, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    return images


def _fit_cached_features(
    model: Classifier,
    pool: list[dict],
    val: list[dict],
    plan: TrainingPlan,
    loader: _Loader,
    options: dict,
    two_phase: dict | None,
    desc: str,
) -> FitResult:
    """Recipe "paper" without pixel augmentations: embed once, then train the head on features."""
    angles = standard_angles(options)
    pool_features = _embed(model, loader, pool, "embed training images", options["flip"], angles)
    pool_labels = _labels(pool).to(loader.device)
    val_features = _embed(model, loader, val, "embed val images")[0]
    val_labels = _labels(val)
    pool_index = torch.from_numpy(plan.pool_index).to(loader.device)
    view = torch.from_numpy(plan.flip.astype(np.int64) * len(angles) + plan.angle_index).to(loader.device)
    batch_size = options["batch_size"]

    def batches():
        for step in range(options["steps"]):
            draws = slice(step * batch_size, (step + 1) * batch_size)
            yield pool_features[view[draws], pool_index[draws]], pool_labels[pool_index[draws]]

    def val_accuracy() -> float:
        return _accuracy(_predict(model.head, val_features, loader.batch_size), val_labels)

    optimizer = torch.optim.Adam(model.head.parameters(), lr=options["learning_rate"])
    return _fit(model, model.head, batches(), optimizer, False, two_phase, val_accuracy, options, desc)


class _PlanDataset(Dataset):
    """Draw k of the plan: the pool image in its planned standard view, augmented with the draw's own seed."""

    def __init__(self, pool_images: torch.Tensor, pool_labels: torch.Tensor, plan: TrainingPlan, angles: Sequence[float], transform: Callable):
        self.pool_images = pool_images
        self.pool_labels = pool_labels
        self.plan = plan
        self.angles = angles
        self.transform = transform

    def __len__(self) -> int:
        return len(self.plan.pool_index)

    def __getitem__(self, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.plan.pool_index[draw])
        image = standard_view(self.pool_images[index], bool(self.plan.flip[draw]), self.angles[self.plan.angle_index[draw]])
        # torchvision transforms draw from torch's global generator: seed it per draw, and restore
        # it afterwards, so the draw's augmentation is the same in any worker or in the main process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.plan.augment_seed[draw]))
            image = self.transform(image)
        return image, self.pool_labels[index]


def _fit_pixels(
    model: Classifier,
    pool: list[dict],
    val: list[dict],
    plan: TrainingPlan,
    loader: _Loader,
    options: dict,
    two_phase: dict | None,
    desc: str,
    augmentations: list[str],
) -> FitResult:
    """Every draw augmented in pixel space and passed through the backbone at every step."""
    pool_images = loader.decode_all(pool, "decode training images")
    dataset = _PlanDataset(pool_images, _labels(pool), plan, standard_angles(options), image_transform(augmentations, options))
    draws = DataLoader(dataset, batch_size=options["batch_size"], num_workers=options["num_workers"], pin_memory=loader.device.type == "cuda")
    mix = batch_transform(augmentations, model.head.out_features, options)

    def batches():
        for images, labels in draws:
            images, labels = images.to(loader.device, non_blocking=True), labels.to(loader.device, non_blocking=True)
            yield mix(images, labels) if mix else (images, labels)

    if model.frozen:
        # The backbone never changes: embed val once and score the head alone.
        val_inputs = _embed(model, loader, val, "embed val images")[0]
        score = model.head
        optimizer = torch.optim.Adam(model.head.parameters(), lr=options["learning_rate"])
    else:
        val_inputs = loader.decode_all(val, "decode val images")
        score = lambda images: model(loader.to_input(images))  # noqa: E731
        finetune = options["finetune"]
        optimizer = torch.optim.SGD(
            [
                {"params": model.backbone.parameters(), "lr": finetune["backbone_learning_rate"]},
                {"params": model.head.parameters(), "lr": finetune["head_learning_rate"]},
            ],
            momentum=finetune["momentum"],
            weight_decay=finetune["weight_decay"],
        )
    val_labels = _labels(val)

    def val_accuracy() -> float:
        return _accuracy(_predict(score, val_inputs, loader.batch_size), val_labels)

    # Fine-tuning follows a cosine schedule; the head alone trains at a constant rate.
    return _fit(model, model, batches(), optimizer, not model.frozen, two_phase, val_accuracy, options, desc)


def train_step(forward: Callable, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step on cross-entropy; `targets` are class indices or (MixUp/CutMix) soft labels."""
    loss = F.cross_entropy(forward(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _fit(
    model: Classifier,
    forward: Callable,
    batches: Iterator,
    optimizer: torch.optim.Optimizer,
    cosine: bool,
    two_phase: dict | None,
    val_accuracy: Callable[[], float],
    options: dict,
    desc: str,
) -> FitResult:
    """Train for train.steps steps, score val every train.eval_every steps, after the last step
    and (two-phase runs) after the last step of phase 1, and keep the weights of the best-scoring
    step (the earliest on ties)."""
    steps, eval_every = options["steps"], options["eval_every"]
    phase_1_steps = two_phase["synthetic_steps"] if two_phase else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_learning_rate_factor, steps=steps, cosine=cosine, two_phase=two_phase))
    trainable = _trainable(model)
    curve: list[dict] = []
    best_step, best_accuracy, best_state = 0, -1.0, {}
    loss_sum, loss_count = 0.0, 0
    model.train()
    for step, (inputs, targets) in enumerate(progress(batches, total=steps, desc=desc), start=1):
        loss_sum = loss_sum + train_step(forward, optimizer, inputs, targets)
        loss_count += 1
        scheduler.step()
        if step % eval_every and step not in (steps, phase_1_steps):
            continue
        model.eval()
        accuracy = val_accuracy()
        model.train()
        point = {"step": step, "train_loss": float(loss_sum / loss_count), "val_accuracy": accuracy}
        if two_phase:
            point["phase"] = 1 if step <= phase_1_steps else 2
        curve.append(point)
        loss_sum, loss_count = 0.0, 0
        if accuracy > best_accuracy:
            best_step, best_accuracy = step, accuracy
            best_state = {name: value.detach().clone() for name, value in trainable.state_dict().items()}
    model.eval()
    return FitResult(curve, best_step, best_accuracy, best_state)


def _learning_rate_factor(steps_taken: int, steps: int, cosine: bool, two_phase: dict | None) -> float:
    """Multiplier of the base learning rates for the step after `steps_taken` steps (LambdaLR's
    argument): cosine annealing to 0 over the run if asked, times the scale of phase 2 in it."""
    factor = (1 + math.cos(math.pi * steps_taken / steps)) / 2 if cosine else 1.0
    if two_phase and steps_taken >= two_phase["synthetic_steps"]:
        factor *= two_phase["real_learning_rate_scale"]
    return factor


def _trainable(model: Classifier) -> nn.Module:
    """The part of the model that training changes: the head alone when the backbone is frozen."""
    return model.head if model.frozen else model


@torch.no_grad()
def _predict(score: Callable, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([score(inputs[i : i + batch_size]).argmax(dim=1).cpu() for i in range(0, len(inputs), batch_size)])


@torch.no_grad()
def _predict_split(model: Classifier, rows: list[dict], loader: _Loader, split: str) -> np.ndarray:
    model.eval()
    predictions = [model(loader.to_input(batch)).argmax(dim=1).cpu() for batch in loader.batches(rows, f"predict {split}")]
    return torch.cat(predictions).numpy()


def _labels(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([row["label"] for row in rows], dtype=torch.long)


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).float().mean())


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class accuracy (recall; None for a class absent from `labels`) and its mean
    over the classes present."""
    per_class = {}
    for index, name in enumerate(classes):
        of_class = labels == index
        per_class[name] = float((predicted[of_class] == index).mean()) if of_class.any() else None
    present = [value for value in per_class.values() if value is not None]
    return {
        "accuracy": float((predicted == labels).mean()),
        "mean_class_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
    }
