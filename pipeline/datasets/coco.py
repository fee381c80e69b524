"""COCO 2017 instances (and the demo dataset, which is written in the same format).

Layout under the dataset root: annotations/instances_{train,val}2017.json, images in train2017/ and
val2017/. Images are never decoded: sizes come from the annotation file.

Label of an image: the class of its non-crowd annotation covering the most pixels, counted on the
decoded mask (the RLE area, exact), not the `area` field, which for polygons is a float that can
disagree with the rasterised mask. Equal pixel counts go to the lowest annotation id. Crowd
annotations never decide. Polygons with fewer than 3 points enclose no pixel and count as empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pycocotools.mask as mask_utils

from pipeline import PipelineError
from pipeline.datasets import (
    EMPTY_OBJECTS,
    NO_OBJECT,
    ONLY_CROWD,
    OTHER_CLASS,
    LabelContext,
    Labelled,
    Source,
    left_out,
    write_packed_mask,
)

if TYPE_CHECKING:
    from pipeline.settings.prepare import PrepareSettings

# split -> (annotation file, image folder, source split for prepare), relative to the dataset root.
SPLIT_FILES = {
    "train": ("annotations/instances_train2017.json", "train2017", "train"),
    "val": ("annotations/instances_val2017.json", "val2017", "heldout"),
}
MAX_RLE_NUMBER_CHARS = 7


class Instance(NamedTuple):
    annotation_id: int
    class_name: str
    iscrowd: bool
    segmentation: Any  # polygons (list of coordinate lists) or RLE (dict with size and counts)


class CocoImage(NamedTuple):
    image_id: str
    path: str
    source_split: str
    width: int
    height: int
    instances: tuple[Instance, ...]


def read_coco(root: Path, settings: PrepareSettings) -> Source:
    """Both official splits of the COCO dataset at `root`: one job per listed image."""
    classes: list[str] | None = None
    jobs: list[CocoImage] = []
    for split, (annotation_file, image_folder, source_split) in SPLIT_FILES.items():
        path = root / annotation_file
        categories, images = read_instances(path)
        names = [name for _, name in sorted(categories.items())]
        if classes is None:
            classes = names
        elif names != classes:
            raise PipelineError(f"{path}: categories differ from those of {root / SPLIT_FILES['train'][0]}")
        for coco_id, image in sorted(images.items()):
            image_id = f"coco-{split}-{coco_id:012d}"
            jobs.append(
                CocoImage(image_id, f"{image_folder}/{image['file_name']}", source_split, *image["size"], image["instances"])
            )
    if not classes:
        raise PipelineError(f"{root / SPLIT_FILES['train'][0]}: 'categories' is empty. Expected at least one category")
    return Source(classes=classes, jobs=jobs, label_image=label_image)


def read_instances(path: Path) -> tuple[dict[int, str], dict[int, dict]]:
    """Categories {id: name} and images {id: {file_name, size, instances}} of a COCO instances file.

    Checks the structure the labelling relies on and raises PipelineError naming the file and the
    offending entry: a file that is not COCO instances is an error whatever `on_bad_image` says.
    """
    if not path.is_file():
        raise PipelineError(f"{path} does not exist. Expected a COCO 2017 instances annotation file there")
    try:
        with open(path, "rb") as handle:
            coco = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
        got = sorted(coco) if isinstance(coco, dict) else type(coco).__name__
        raise PipelineError(
            f"{path} is not a COCO instances file: expected an object with lists 'images', 'annotations' "
            f"and 'categories'. Got {got}"
        )

    categories: dict[int, str] = {}
    for entry in coco["categories"]:
        _require(path, "category", entry, {"id": int, "name": str})
        if entry["id"] in categories or entry["name"] in categories.values():
            raise PipelineError(f"{path}: category id {entry['id']} or name {entry['name']!r} appears twice")
        categories[entry["id"]] = entry["name"]

    images: dict[int, dict] = {}
    for entry in coco["images"]:
        _require(path, "image", entry, {"id": int, "file_name": str, "width": int, "height": int})
        if entry["id"] in images:
            raise PipelineError(f"{path}: image id {entry['id']} appears twice")
        if entry["width"] < 1 or entry["height"] < 1:
            raise PipelineError(f"{path}: image {entry['id']} has size {entry['width']}x{entry['height']}")
        images[entry["id"]] = {"file_name": entry["file_name"], "size": (entry["width"], entry["height"]), "instances": []}

    for entry in coco["annotations"]:
        _require(path, "annotation", entry, {"id": int, "image_id": int, "category_id": int, "iscrowd": int})
        if "segmentation" not in entry:
            raise PipelineError(f"{path}: annotation {entry['id']} has no 'segmentation'")
        if entry["image_id"] not in images:
            raise PipelineError(f"{path}: annotation {entry['id']} refers to image {entry['image_id']}, which is not in 'images'")
        if entry["category_id"] not in categories:
            raise PipelineError(
                f"{path}: annotation {entry['id']} has category_id {entry['category_id']}, which is not in 'categories'"
            )
        images[entry["image_id"]]["instances"].append(
            Instance(entry["id"], categories[entry["category_id"]], bool(entry["iscrowd"]), entry["segmentation"])
        )
    for image in images.values():
        image["instances"] = tuple(image["instances"])
    return categories, images


def _require(path: Path, what: str, entry: Any, fields: dict[str, type]) -> None:
    if not isinstance(entry, dict):
        raise PipelineError(f"{path}: expected each {what} to be an object. Got {entry!r:.80}")
    for name, kind in fields.items():
        value = entry.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PipelineError(
                f"{path}: {what} {entry.get('id', '?')} field '{name}' should be {kind.__name__}. Got {value!r:.80}"
            )


def label_image(job: CocoImage, context: LabelContext) -> Labelled:
    """Decide the label of one COCO image from its largest non-crowd instance; write that mask."""
    if not job.instances:
        return left_out(job, NO_OBJECT)
    candidates = [instance for instance in job.instances if not instance.iscrowd]
    if not candidates:
        return left_out(job, ONLY_CROWD)
    if not (context.root / job.path).is_file():
        raise PipelineError(f"image {context.root / job.path} does not exist")
    rles = [instance_rle(job, instance) for instance in candidates]
    drawn = [i for i, rle in enumerate(rles) if rle is not None]
    areas = [0] * len(candidates)
    # One pycocotools call for all: its per-call overhead outweighs counting the pixels of a mask.
    for i, area in zip(drawn, mask_utils.area([rles[i] for i in drawn])):
        areas[i] = int(area)
    # Most pixels wins; among equals the lowest annotation id, whatever the order in the file.
    best = max(range(len(candidates)), key=lambda i: (areas[i], -candidates[i].annotation_id))
    if areas[best] == 0:
        return left_out(job, EMPTY_OBJECTS)
    winner = candidates[best]
    if winner.class_name not in context.keep:
        return left_out(job, OTHER_CLASS, f"deciding object is {winner.class_name!r}", class_name=winner.class_name)
    where = f"{job.image_id} annotation {winner.annotation_id}"
    rows = _packed_mask_rows(_compressed_run_lengths(rles[best]["counts"], where), job.height, job.width)
    mask_path = write_packed_mask(context, job.image_id, rows, job.width)
    return Labelled(job.image_id, job.path, job.source_split, winner.class_name, job.width, job.height, mask_path)


def instance_rle(job: CocoImage, instance: Instance) -> dict | None:
    """The instance's mask as compressed RLE, or None for polygons that enclose no pixel."""
    segmentation, height, width = instance.segmentation, job.height, job.width
    where = f"{job.image_id} annotation {instance.annotation_id}"
    if isinstance(segmentation, list):
        if not all(isinstance(polygon, list) and len(polygon) % 2 == 0 for polygon in segmentation):
            raise PipelineError(f"{where}: expected polygons as lists of x,y coordinate pairs. Got {segmentation!r:.120}")
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return None
        try:
            parts = mask_utils.frPyObjects(polygons, height, width)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"{where}: polygon coordinates are not numbers ({exc})") from None
        return parts[0] if len(parts) == 1 else mask_utils.merge(parts)
    if isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation:
        size, counts = list(segmentation["size"]), segmentation["counts"]
        if size != [height, width]:
            raise PipelineError(f"{where}: mask size {size} (height, width) differs from its image's [{height}, {width}]")
        # pycocotools neither checks run lengths nor their total, and decoding bad ones overruns memory.
        bad_runs = f"{where}: RLE run lengths must be non-negative and sum to {height}*{width} pixels"
        if isinstance(counts, list):
            if any(not isinstance(r, int) or r < 0 for r in counts) or sum(counts) != height * width:
                raise PipelineError(bad_runs)
            return mask_utils.frPyObjects(segmentation, height, width)
        if not isinstance(counts, str) or not counts.isascii():
            raise PipelineError(f"{where}: RLE counts should be a list of ints or an ASCII string. Got {counts!r:.80}")
        run_lengths = _compressed_run_lengths(counts.encode("ascii"), where)
        if (run_lengths < 0).any() or run_lengths.sum() != height * width:
            raise PipelineError(bad_runs)
        return {"size": [height, width], "counts": counts.encode("ascii")}
    raise PipelineError(f"{where}: segmentation should be polygons or RLE {{size, counts}}. Got {segmentation!r:.120}")


def _compressed_run_lengths(counts: bytes, where: str) -> np.ndarray:
    """Run lengths of a COCO compressed RLE string (the inverse of pycocotools' rleToString).

    Each number is written little-endian in base 32, one character (offset by '0') per 5 bits, bit
    0x20 set on all characters but its last, whose bit 0x10 is the sign. From the third run on, a
    run is stored as the difference to the run two before.
    """
    if not counts:
        return np.zeros(0, dtype=np.int64)
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    last = np.flatnonzero((chars & 0x20) == 0)  # the last character of each number
    if len(last) == 0 or last[-1] != len(chars) - 1:
        raise PipelineError(f"{where}: compressed RLE counts end in the middle of a number")
    starts = np.empty_like(last)
    starts[0], starts[1:] = 0, last[:-1] + 1
    lengths = last - starts + 1
    # 7 characters hold 35 bits: runs up to 2^34 pixels, more than any image, and no int64 overflow.
    if lengths.max() > MAX_RLE_NUMBER_CHARS:
        raise PipelineError(f"{where}: compressed RLE counts hold a number longer than {MAX_RLE_NUMBER_CHARS} characters")
    digit = np.arange(len(chars)) - np.repeat(starts, lengths)
    values = np.add.reduceat((chars & 0x1F) << (5 * digit), starts)
    values -= ((chars[last] & 0x10) >> 4) << (5 * lengths)  # sign extension
    values[1::2] = np.cumsum(values[1::2])  # undo the differences, separately for odd and even runs
    values[2::2] = np.cumsum(values[2::2])
    return values


def _packed_mask_rows(run_lengths: np.ndarray, height: int, width: int) -> np.ndarray:
    """The mask of column-major run lengths (0s first) as np.packbits(mask, axis=1): [H, ceil(W/8)] uint8.

    Made without the column-major mask pycocotools decodes, whose transposition costs more than all
    of this: a pixel is 1 where an odd number of runs end at or before it in column-major order, so
    the run ends are set as bits in a row-major packed array and XOR-accumulated down the columns,
    64 columns per operation.
    """
    ends = np.cumsum(run_lengths[:-1])
    ends = ends[ends < height * width]  # zero-length last runs end at the very end
    columns, rows = np.divmod(ends, height)
    row_bytes, words = -(-width // 8), -(-width // 64)
    packed = np.zeros((height, 8 * words), dtype=np.uint8)
    # XOR, not assignment: ends at one pixel (zero-length runs) cancel, ends in one byte combine.
    np.bitwise_xor.at(packed, (rows, columns >> 3), (0x80 >> (columns & 7)).astype(np.uint8))
    # A column starts with the value the one before ended with: 1 if an odd number of runs ended before it.
    ends_per_column = np.bincount(columns, minlength=width)
    odd_before = (np.cumsum(ends_per_column) - ends_per_column) % 2 == 1
    packed[0, :row_bytes] ^= np.packbits(odd_before)
    mask_rows = np.bitwise_xor.accumulate(packed.view(np.uint64), axis=0).view(np.uint8)
    return mask_rows[:, :row_bytes]
