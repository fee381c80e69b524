"""Few-shot subsets: k training images per class, drawn per trial seed, nested in k.

Each class's training images, sorted by image_id, are put in a random order seeded by
(seed, trial_seed, class name) and the first k are taken. So the subset for k holds the subsets
for every smaller k of the same trial, and a draw depends neither on the manifest's row order, nor
on which other k or classes are asked for. Val and test rows are not in a subset: they come from
the manifest, the same for every trial.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import PipelineError
from pipeline.io import read_metadata, read_parquet, write_parquet
from pipeline.manifest import MANIFEST_SCHEMA, manifest_table
from pipeline.rng import numpy_rng

log = logging.getLogger(__name__)


def draw_subset(
    manifest_path: Path, examples_per_class: int, trial_seed: int, seed: int, allow_fewer: bool, out_path: Path
) -> dict:
    """Write the subset of `examples_per_class` training images per class to `out_path`.

    The subset is a manifest (same columns, paths still relative to the recorded roots) whose
    metadata is the manifest's plus trial_seed and examples_per_class. A class with fewer training
    images than asked raises PipelineError, unless `allow_fewer`, which keeps all it has.
    Returns {examples_per_class, trial_seed, images, per_class}.
    """
    manifest_path = Path(manifest_path)
    if examples_per_class < 1:
        raise PipelineError(f"examples_per_class must be at least 1. Got {examples_per_class}")
    metadata = read_metadata(manifest_path)
    if "classes" not in metadata:
        raise PipelineError(f"{manifest_path}: not a manifest (metadata has no 'classes')")
    rows = read_parquet(manifest_path, columns=MANIFEST_SCHEMA.names).to_pylist()
    train_by_class: dict[str, list[dict]] = {name: [] for name in metadata["classes"]}
    for row in rows:
        if row["class_name"] not in train_by_class:
            raise PipelineError(f"{manifest_path}: image {row['image_id']} has class {row['class_name']!r}, not in the metadata's classes")
        if row["split"] == "train":
            train_by_class[row["class_name"]].append(row)

    chosen: list[dict] = []
    per_class: dict[str, int] = {}
    for class_name, class_rows in train_by_class.items():
        if len(class_rows) < examples_per_class and not allow_fewer:
            raise PipelineError(
                f"{manifest_path}: class {class_name!r} has {len(class_rows)} training images, fewer than "
                f"examples_per_class={examples_per_class}. Set dataset.allow_fewer: true to keep all it has, "
                f"or ask for fewer examples"
            )
        class_rows.sort(key=lambda row: row["image_id"])
        order = numpy_rng(seed, "fewshot", trial_seed, class_name).permutation(len(class_rows))
        picked = [class_rows[i] for i in order[:examples_per_class]]
        if len(picked) < examples_per_class:
            log.warning("class %r has only %d training images of the %d asked", class_name, len(picked), examples_per_class)
        per_class[class_name] = len(picked)
        chosen.extend(sorted(picked, key=lambda row: row["image_id"]))

    subset_metadata = {**metadata, "trial_seed": trial_seed, "examples_per_class": examples_per_class}
    write_parquet(out_path, manifest_table(chosen), subset_metadata)
    log.info(
        "few-shot subset k=%d trial %d: %d images over %d classes -> %s",
        examples_per_class, trial_seed, len(chosen), len(per_class), out_path,
    )
    return {"examples_per_class": examples_per_class, "trial_seed": trial_seed, "images": len(chosen), "per_class": per_class}
