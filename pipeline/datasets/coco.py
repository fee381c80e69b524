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
from typing import Any, NamedTuple

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
    write_mask,
)

# split -> (annotation file, image folder, source split for prepare), relative to the dataset root.
SPLIT_FILES = {
    "train": ("annotations/instances_train2017.json", "train2017", "train"),
    "val": ("annotations/instances_val2017.json", "val2017", "heldout"),
}


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


def read_coco(root: Path, dataset_cfg: dict) -> Source:
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
    return Source(classes=classes or [], jobs=jobs, label_image=label_image)


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
    areas = [0 if rle is None else int(mask_utils.area(rle)) for rle in rles]
    # Most pixels wins; among equals the lowest annotation id, whatever the order in the file.
    best = max(range(len(candidates)), key=lambda i: (areas[i], -candidates[i].annotation_id))
    if areas[best] == 0:
        return left_out(job, EMPTY_OBJECTS)
    winner = candidates[best]
    if winner.class_name not in context.keep:
        return left_out(job, OTHER_CLASS, f"deciding object is {winner.class_name!r}", class_name=winner.class_name)
    mask_path = write_mask(context, job.image_id, mask_utils.decode(rles[best]))
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
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"{where}: polygon coordinates are not numbers ({exc})") from None
    if isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation:
        size, counts = list(segmentation["size"]), segmentation["counts"]
        if size != [height, width]:
            raise PipelineError(f"{where}: mask size {size} (height, width) differs from its image's [{height}, {width}]")
        run_lengths = counts if isinstance(counts, list) else _compressed_run_lengths(counts, where)
        # pycocotools neither checks run lengths nor their total, and decoding bad ones overruns memory.
        if any(not isinstance(r, int) or r < 0 for r in run_lengths) or sum(run_lengths) != height * width:
            raise PipelineError(f"{where}: RLE run lengths must be non-negative and sum to {height}*{width} pixels")
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": [height, width], "counts": counts.encode("ascii")}
    raise PipelineError(f"{where}: segmentation should be polygons or RLE {{size, counts}}. Got {segmentation!r:.120}")


def _compressed_run_lengths(counts: Any, where: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the inverse of pycocotools' rleToString)."""
    if not isinstance(counts, str) or not counts.isascii():
        raise PipelineError(f"{where}: RLE counts should be a list of ints or an ASCII string. Got {counts!r:.80}")
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise PipelineError(f"{where}: compressed RLE counts end in the middle of a number")
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value -= 1 << shift  # sign extension
        # From the third run on, runs are stored as differences to the run two before.
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs
