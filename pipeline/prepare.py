"""prepare: a dataset on disk -> the image manifest, its class list, statistics and object masks.

One image, one label: the class of its largest object (see the reader of each dataset in
pipeline/datasets/ for how "largest" is counted and ties are broken), with that object's binary
mask saved for methods that need the foreground. Images without a usable object are left out and
counted in stats.json with the reason; bad files (undecodable, damaged, over PIL's size limit,
under MIN_IMAGE_SIDE) stop the stage or, with on_bad_image: skip, are left out and listed there
too. A dataset that would only fail in a later stage stops here, with the reason: a class without
train images, or class names that would learn the same token.

Splits are fixed by (seed, image id) alone, never by trial seed or file order: the official
validation images of each class are ranked by a seeded hash of their ids and the first
floor(n * test_fraction) become test, the rest val. Folders without a split first hold out
floor(n * holdout_fraction) of each class the same way.

Outputs in out_dir: images/ (only for datasets stored as arrays, CIFAR: their PNGs, the manifest's
dataset root), masks/ (written first, atomically), classes.json, stats.json, and last
manifest.parquet, so a manifest on disk means a complete stage.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Sequence

from pipeline import PipelineError, layout
from pipeline.datasets import BAD_INPUT, SOURCE_SPLITS, LabelContext, Labelled, Source, label_or_reject
from pipeline.datasets.cifar import read_cifar
from pipeline.datasets.coco import read_coco
from pipeline.datasets.folder import read_folder
from pipeline.datasets.fine_grained import read_fgvc_aircraft, read_stanford_cars
from pipeline.datasets.torchvision_sets import read_caltech101, read_flowers102
from pipeline.datasets.voc import find_voc_root, read_voc
from pipeline.io import atomic_path, write_json, write_parquet
from pipeline.layout import class_slug
from pipeline.manifest import SPLITS, manifest_table
from pipeline.progress import progress
from pipeline.rng import derive_seed
from pipeline.settings.prepare import PrepareSettings

log = logging.getLogger(__name__)

# The demo is written in COCO format by pipeline.demo and read exactly like COCO 2017.
READERS = {
    "demo": read_coco,
    "coco": read_coco,
    "voc": read_voc,
    "folder": read_folder,
    "caltech101": read_caltech101,
    "flowers102": read_flowers102,
    "fgvc_aircraft": read_fgvc_aircraft,
    "stanford_cars": read_stanford_cars,
    "cifar10": read_cifar,
    "cifar100": read_cifar,
}


def prepare_dataset(config: dict, out_dir: Path, threads: int = 1) -> dict:
    """Write manifest.parquet, classes.json, stats.json and masks/ for config["dataset"] into out_dir.

    `threads` worker processes decode masks (and, for VOC and folders, images) in parallel; the
    outputs do not depend on it. Returns a summary: image counts per split and left-out counts.
    """
    settings = PrepareSettings.from_config(config)
    root = Path(settings.root).resolve()
    if not root.is_dir():
        raise PipelineError(f"dataset.root: {root} is not a folder (dataset.name is {settings.name!r})")
    out_dir = Path(out_dir)
    if settings.name == "voc":
        root = find_voc_root(root)
    source = READERS[settings.name](root, settings)
    classes = select_classes(source.classes, settings.classes, root)
    if settings.num_classes is not None:
        classes = draw_classes(classes, settings.num_classes, settings.seed)
        log.info("dataset.num_classes: drew %d classes with seed %d: %s", len(classes), settings.seed, ", ".join(classes))
    check_distinct_tokens(classes)
    mask_root = (out_dir / layout.MASKS_DIR).resolve()
    manifest_path = out_dir / "manifest.parquet"
    # A manifest on disk must describe the masks beside it: drop an old one before replacing them.
    manifest_path.unlink(missing_ok=True)
    if source.write_images is not None:  # images stored as arrays: written once as files, read from there
        image_root = (out_dir / layout.IMAGES_DIR).resolve()
        with atomic_path(image_root) as image_tmp:
            image_tmp.mkdir()
            source.write_images(image_tmp)
        root = image_root

    with atomic_path(mask_root) as mask_tmp:
        mask_tmp.mkdir()
        context = LabelContext(root=root, mask_dir=mask_tmp, keep=frozenset(classes))
        labelled = label_all(source, context, threads, stop_on_bad_input=settings.on_bad_image == "error")

    kept = [item for item in labelled if item.left_out is None]
    splits = assign_splits(kept, settings.seed, settings.test_fraction, settings.holdout_fraction)
    label_of = {name: index for index, name in enumerate(classes)}
    rows = [
        {
            "image_id": item.image_id,
            "path": item.path,
            "split": splits[item.image_id],
            "label": label_of[item.class_name],
            "class_name": item.class_name,
            "mask_path": item.mask_path,
            "width": item.width,
            "height": item.height,
        }
        for item in sorted(kept, key=lambda item: item.image_id)
    ]
    stats = split_statistics(settings.name, root, classes, rows, source.left_out + [i for i in labelled if i.left_out])
    check_every_class_has_train_images(stats, root)

    write_json(out_dir / layout.CLASSES_FILE, classes)
    write_json(out_dir / layout.STATS_FILE, stats)
    metadata = {"dataset": settings.name, "dataset_root": str(root), "mask_root": str(mask_root), "classes": classes}
    write_parquet(manifest_path, manifest_table(rows), metadata)

    summary = {
        "dataset": settings.name,
        "classes": len(classes),
        "images": stats["totals"],
        "left_out": stats["left_out"]["counts"],
        "manifest": str(manifest_path),
    }
    log.info(
        "prepared %s: %d classes, %s images, %d left out (%s) -> %s",
        settings.name, len(classes),
        " / ".join(f"{stats['totals'][s]} {s}" for s in SPLITS),
        sum(summary["left_out"].values()),
        ", ".join(f"{n} {reason}" for reason, n in summary["left_out"].items()) or "none",
        manifest_path,
    )
    return summary


def select_classes(available: list[str], requested: Sequence[str] | None, root: Path) -> list[str]:
    """dataset.classes in the order given, or all of the dataset's classes in its own order."""
    if requested is None:
        return list(available)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise PipelineError(f"dataset.classes: {unknown} are not classes of the dataset at {root}. Expected some of {available}")
    duplicates = sorted({name for name in requested if requested.count(name) > 1})
    if duplicates:
        raise PipelineError(f"dataset.classes: {duplicates} listed more than once")
    return list(requested)


def draw_classes(classes: list[str], count: int, seed: int) -> list[str]:
    """`count` of `classes` drawn at random from `seed` alone, in their given order. A class's fate
    depends only on its name and the seed (its rank in a seeded hash), not on the other classes."""
    if count > len(classes):
        raise PipelineError(f"dataset.num_classes: {count} classes asked for, but the dataset keeps {len(classes)}. Expected at most {len(classes)}")
    drawn = set(sorted(classes, key=lambda name: (derive_seed(seed, "prepare", "classes", name), name))[:count])
    return [name for name in classes if name in drawn]


def check_distinct_tokens(classes: list[str]) -> None:
    """Refuse class names that would share a learned token (and tokens subfolder): "car side" and "Car-side"."""
    by_slug: dict[str, list[str]] = defaultdict(list)
    for name in classes:
        by_slug[class_slug(name)].append(name)
    clashes = [names for names in by_slug.values() if len(names) > 1]
    if clashes:
        slug = class_slug(clashes[0][0])
        raise PipelineError(
            f"classes {clashes[0]} would all learn the token <{slug}>. Expected class names that differ in more "
            "than case, spaces and punctuation: rename them, or keep one with dataset.classes"
        )


def check_every_class_has_train_images(stats: dict, root: Path) -> None:
    """Stop here, not in fewshot or invert, when a class has nothing to learn from."""
    empty = [name for name, count in stats["images"]["train"].items() if count == 0]
    if empty:
        counts = ", ".join(f"{n} {reason}" for reason, n in stats["left_out"]["counts"].items()) or "none"
        raise PipelineError(
            f"dataset at {root}: classes {empty} have no train images. Expected at least one per class: add "
            f"images, or leave those classes out with dataset.classes (images left out: {counts})"
        )


def label_all(source: Source, context: LabelContext, threads: int, stop_on_bad_input: bool) -> list[Labelled]:
    """Run the reader's labelling on every job, in `threads` worker processes, in job order."""
    work = partial(label_or_reject, source.label_image, context)
    desc = f"label {len(source.jobs)} images"
    if threads <= 1 or len(source.jobs) < 2:
        return [_checked(item, stop_on_bad_input) for item in progress(map(work, source.jobs), len(source.jobs), desc)]
    # forkserver: workers start from a clean interpreter, not a fork of a process that may hold
    # threads (torch, arrow); they import only pipeline.datasets, which is light.
    chunksize = max(1, min(256, len(source.jobs) // (threads * 8)))
    with multiprocessing.get_context("forkserver").Pool(threads) as pool:  # exiting terminates workers
        results = pool.imap(work, source.jobs, chunksize=chunksize)
        return [_checked(item, stop_on_bad_input) for item in progress(results, len(source.jobs), desc)]


def _checked(item: Labelled, stop_on_bad_input: bool) -> Labelled:
    if stop_on_bad_input and item.left_out == BAD_INPUT:
        raise PipelineError(f"{item.detail} (set dataset.on_bad_image: skip to leave such images out)")
    return item


def assign_splits(kept: list[Labelled], seed: int, test_fraction: float, holdout_fraction: float) -> dict[str, str]:
    """image_id -> train/val/test, stratified per class and drawn from (seed, image_id) only."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in kept:
        if item.source_split not in SOURCE_SPLITS:
            raise ValueError(f"{item.image_id}: unknown source split {item.source_split!r}")
        groups[(item.source_split, item.class_name)].append(item.image_id)
    splits: dict[str, str] = {}
    heldout: dict[str, list[str]] = defaultdict(list)
    for (source_split, class_name), image_ids in sorted(groups.items()):
        if source_split == "unsplit":
            held, rest = _draw_first(image_ids, holdout_fraction, seed, "holdout")
            heldout[class_name].extend(held)
            splits.update(dict.fromkeys(rest, "train"))
        elif source_split == "heldout":
            heldout[class_name].extend(image_ids)
        else:
            splits.update(dict.fromkeys(image_ids, source_split))
    for class_name, image_ids in heldout.items():
        test, val = _draw_first(image_ids, test_fraction, seed, "test")
        splits.update(dict.fromkeys(test, "test"))
        splits.update(dict.fromkeys(val, "val"))
    return splits


def _draw_first(image_ids: list[str], fraction: float, seed: int, draw: str) -> tuple[list[str], list[str]]:
    """Split ids into floor(n * fraction) drawn ones and the rest: a seeded random order of the ids,
    the same whatever order they came in and whichever other images exist."""
    ranked = sorted(image_ids, key=lambda image_id: (derive_seed(seed, "prepare", draw, image_id), image_id))
    count = math.floor(len(ranked) * fraction)
    return ranked[:count], ranked[count:]


def split_statistics(name: str, root: Path, classes: list[str], rows: list[dict], left_out: list[Labelled]) -> dict:
    per_split = {split: dict.fromkeys(classes, 0) for split in SPLITS}
    for row in rows:
        per_split[row["split"]][row["class_name"]] += 1
    return {
        "dataset": name,
        "dataset_root": str(root),
        "classes": classes,
        "images": per_split,
        "totals": {split: sum(counts.values()) for split, counts in per_split.items()},
        "left_out": {
            "counts": dict(sorted(Counter(item.left_out for item in left_out).items())),
            "images": [
                {"image_id": item.image_id, "path": item.path, "reason": item.left_out, "detail": item.detail}
                for item in sorted(left_out, key=lambda item: item.image_id)
            ],
        },
    }
