"""A user's own images: one folder per class, or a CSV listing them.

Folder layout (dataset.csv null): root/<class>/<image>, with an optional binary mask of the object
at root/<class>/masks/<image stem>.png (non-zero = object). Classes are the class folders in sorted
order. Files with other suffixes, and anything else that is not a hidden file, are left out and
listed in stats.json, never dropped unseen.

CSV layout (dataset.csv set, relative to the root or absolute): columns `path` and `label` (class
name), optional `mask_path` (empty cell: no mask) and `split` (train, val or test); paths are
relative to the dataset root. Classes are the labels in sorted order.

Without a split column each class's images are split by prepare: a seeded holdout_fraction is held
out of train and divided into val and test by test_fraction, fixed across trial seeds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from pipeline import PipelineError
from pipeline.datasets import (
    NOT_AN_IMAGE,
    OTHER_CLASS,
    LabelContext,
    Labelled,
    Source,
    check_same_size,
    left_out,
    write_mask,
)
from pipeline.io import open_image

if TYPE_CHECKING:
    from pipeline.settings.prepare import PrepareSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MASK_FOLDER = "masks"
CSV_SPLITS = ("train", "val", "test")


class FolderImage(NamedTuple):
    image_id: str
    path: str
    source_split: str
    class_name: str
    mask_path: str | None  # relative to the dataset root


def read_folder(root: Path, settings: PrepareSettings) -> Source:
    if settings.csv:
        return read_csv_listing(root, root / settings.csv)
    return read_class_folders(root)


def read_class_folders(root: Path) -> Source:
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_folders:
        raise PipelineError(f"dataset.root {root} has no class folders. Expected root/<class>/<image files>")
    jobs: list[FolderImage] = []
    skipped: list[Labelled] = []
    for entry in sorted(p for p in root.iterdir() if not p.is_dir() and not p.name.startswith(".")):
        skipped.append(_not_an_image(root, entry, _no_class_reason(entry)))
    for folder in class_folders:
        for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            if entry.is_dir() and entry.name == MASK_FOLDER:
                continue
            if entry.is_dir() or entry.suffix.lower() not in IMAGE_SUFFIXES:
                reason = "folders are not searched" if entry.is_dir() else f"suffix not one of {sorted(IMAGE_SUFFIXES)}"
                skipped.append(_not_an_image(root, entry, reason))
                continue
            mask = folder / MASK_FOLDER / f"{entry.stem}.png"
            relative = entry.relative_to(root).as_posix()
            mask_path = mask.relative_to(root).as_posix() if mask.is_file() else None
            jobs.append(FolderImage(f"folder-{relative}", relative, "unsplit", folder.name, mask_path))
    return Source(classes=[f.name for f in class_folders], jobs=jobs, label_image=label_image, left_out=skipped)


def _no_class_reason(entry: Path) -> str:
    if entry.is_symlink() and not entry.exists():
        return "a symbolic link to nothing (broken, or a loop)"
    return "files directly in the root belong to no class"


def _not_an_image(root: Path, entry: Path, detail: str) -> Labelled:
    relative = entry.relative_to(root).as_posix()
    return Labelled(f"folder-{relative}", relative, "unsplit", left_out=NOT_AN_IMAGE, detail=detail)


def read_csv_listing(root: Path, csv_path: Path) -> Source:
    if not csv_path.is_file():
        raise PipelineError(f"dataset.csv: {csv_path} does not exist")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if not {"path", "label"} <= set(columns):
            raise PipelineError(f"{csv_path}: expected columns path,label[,mask_path][,split]. Got {columns}")
        has_split = "split" in columns
        jobs: list[FolderImage] = []
        seen: set[str] = set()
        for line, row in enumerate(reader, start=2):
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise PipelineError(f"{csv_path} line {line}: empty path or label")
            if path in seen:
                raise PipelineError(f"{csv_path} line {line}: {path} is listed twice")
            seen.add(path)
            split = (row["split"] or "").strip() if has_split else "unsplit"
            if has_split and split not in CSV_SPLITS:
                raise PipelineError(f"{csv_path} line {line}: split should be one of {list(CSV_SPLITS)}. Got {split!r}")
            mask_path = (row.get("mask_path") or "").strip() or None
            jobs.append(FolderImage(f"folder-{path}", path, split, label, mask_path))
    if not jobs:
        raise PipelineError(f"{csv_path} lists no images")
    classes = sorted({job.class_name for job in jobs})
    return Source(classes=classes, jobs=jobs, label_image=label_image)


def label_image(job: FolderImage, context: LabelContext) -> Labelled:
    """Check one image (and its mask) decode, record its size, copy the mask as a binary PNG."""
    if job.class_name not in context.keep:
        return left_out(job, OTHER_CLASS, f"class is {job.class_name!r}", class_name=job.class_name)
    image_path = context.root / job.path
    width, height = open_image(image_path).size  # decoding it all catches truncated files now
    mask_path = None
    if job.mask_path is not None:
        source = context.root / job.mask_path
        mask = read_binary_mask(source)
        check_same_size(source, mask, image_path, width, height)
        if not mask.any():
            raise PipelineError(f"{source}: mask has no object pixels (all zero)")
        mask_path = write_mask(context, job.image_id, mask)
    return Labelled(job.image_id, job.path, job.source_split, job.class_name, width, height, mask_path)


def read_binary_mask(path: Path) -> np.ndarray:
    """Non-zero pixels of a mask image: ids or palette indices as stored, colour images by luminance."""
    try:
        with Image.open(path) as image:
            image.load()
            values = np.asarray(image if image.mode in ("1", "L", "P", "I", "I;16") else image.convert("L"))
    except FileNotFoundError:
        raise PipelineError(f"mask {path} does not exist") from None
    except OSError as exc:
        raise PipelineError(f"mask {path} is truncated or not an image ({exc})") from None
    return values > 0
