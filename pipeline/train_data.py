"""The train stage's inputs: the few-shot subset, the manifest's val and test splits and the
synthetic shards, read and cross-checked into one `TrainingData` (torch-free).

The image pool a run draws from is the subset's real images, then their synthetic versions grouped
by source image in the order of the subset (within a source, by synthetic_id), so a draw's index
into the pool says which image it is (pipeline.train_plan). With train.real_images: all, the real
images are the subset's and then every other training image of the manifest (by image_id), which
have no synthetic versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.manifest import read_manifest, read_shards

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


def load_training_data(
    subset_path: Path, manifest_path: Path, shard_paths: list[Path], synthetic_method: str | None, use_synthetic: bool,
    all_train: bool = False,
) -> TrainingData:
    """Read and cross-check the subset, the manifest's val and test splits, and the synthetic shards.
    `all_train`: the real images are the whole train split, the subset's first (train.real_images: all).

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

    subset_rows = real
    if all_train:
        in_subset = {row["image_id"] for row in real}
        real = subset_rows + sorted((row for row in manifest_rows if row["split"] == "train" and row["image_id"] not in in_subset), key=lambda row: row["image_id"])
    if synthetic_method is None:
        if shard_paths:
            raise PipelineError(f"the training method uses no synthetic images, but {len(shard_paths)} synthetic shards were given ({shard_paths[0]}, ...).")
        return TrainingData(classes, real, [], np.zeros(len(real), dtype=np.int64), val, test, subset_meta)
    if not shard_paths:
        raise PipelineError(f"the training method mixes in {synthetic_method!r} images, but no synthetic shards were given.")
    synthetic = _read_synthetic(shard_paths, synthetic_method, subset_rows, classes, with_images=use_synthetic)
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
