"""Pascal VOC segmentation (VOC2012 layout: dataset.root holds VOC2012/, VOCdevkit/VOC2012/, or is VOC2012/ itself).

Images listed in ImageSets/Segmentation/train.txt are train, those in val.txt are held out (split
into val and test by prepare). Label of an image: the class of its largest object instance, where
instances are the ids of SegmentationObject/<name>.png other than 0 (background) and 255 (void
border) and an instance's class is read from SegmentationClass/<name>.png at its pixels. Equal
pixel counts go to the lowest instance id. Nothing assumes that the value 255 is present: the
reference implementation's `np.unique(...)[1:-1]` silently dropped the last object of masks
without a border.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pipeline import PipelineError
from pipeline.datasets import (
    NO_OBJECT,
    OTHER_CLASS,
    LabelContext,
    Labelled,
    Source,
    check_same_size,
    left_out,
    read_index_png,
    write_mask,
)
from pipeline.io import open_image

if TYPE_CHECKING:
    from pipeline.settings.prepare import PrepareSettings

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
BACKGROUND, VOID = 0, 255
# image list -> source split for prepare
SPLIT_LISTS = {"train": "train", "val": "heldout"}


class VocImage(NamedTuple):
    image_id: str
    path: str
    source_split: str
    name: str  # the VOC file stem, e.g. 2007_000032


def find_voc_root(root: Path) -> Path:
    """The VOC2012 folder (the one holding JPEGImages/) under the configured dataset.root."""
    candidates = (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise PipelineError(
        f"dataset.root: no VOC2012 folder under {root}. Expected JPEGImages/ in one of: "
        + ", ".join(str(c) for c in candidates)
    )


def read_voc(root: Path, settings: PrepareSettings) -> Source:
    """One job per image listed in ImageSets/Segmentation/{train,val}.txt."""
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        if not (root / folder).is_dir():
            raise PipelineError(f"{root / folder} does not exist. Expected the VOC2012 layout under dataset.root {root}")
    jobs: list[VocImage] = []
    listed_in: dict[str, str] = {}
    for split_list, source_split in SPLIT_LISTS.items():
        list_path = root / "ImageSets" / "Segmentation" / f"{split_list}.txt"
        if not list_path.is_file():
            raise PipelineError(f"{list_path} does not exist. Expected the list of {split_list} image names")
        for name in list_path.read_text().split():
            if name in listed_in:
                raise PipelineError(f"{list_path}: image {name} is also listed in {listed_in[name]}.txt")
            listed_in[name] = split_list
            jobs.append(VocImage(f"voc-{name}", f"JPEGImages/{name}.jpg", source_split, name))
    return Source(classes=list(CLASSES), jobs=jobs, label_image=label_image)


def label_image(job: VocImage, context: LabelContext) -> Labelled:
    """Decide the label of one VOC image from its largest instance; write that instance's mask."""
    image_path = context.root / job.path
    width, height = open_image(image_path).size  # decoding it all catches truncated files now
    object_path = context.root / "SegmentationObject" / f"{job.name}.png"
    class_path = context.root / "SegmentationClass" / f"{job.name}.png"
    objects, classes = read_index_png(object_path), read_index_png(class_path)
    check_same_size(object_path, objects, image_path, width, height)
    check_same_size(class_path, classes, image_path, width, height)

    pixel_counts = np.bincount(objects.ravel(), minlength=VOID + 1)
    instance_ids = [i for i in np.flatnonzero(pixel_counts) if i not in (BACKGROUND, VOID)]
    if not instance_ids:
        return left_out(job, NO_OBJECT, f"{object_path} has no instance ids besides 0 and 255")
    # Every instance must have a class, not only the one that decides: the files are checked whole.
    instance_classes = {i: instance_class(classes[objects == i], i, object_path, class_path) for i in instance_ids}
    # Most pixels wins; among equals the lowest instance id (max keeps the first of equal keys).
    winner = max(instance_ids, key=lambda i: pixel_counts[i])
    class_name = instance_classes[winner]
    if class_name not in context.keep:
        return left_out(job, OTHER_CLASS, f"deciding object is {class_name!r}", class_name=class_name)
    mask_path = write_mask(context, job.image_id, objects == winner)
    return Labelled(job.image_id, job.path, job.source_split, class_name, width, height, mask_path)


def instance_class(class_values: np.ndarray, instance_id: int, object_path: Path, class_path: Path) -> str:
    """The class most of an instance's pixels carry in SegmentationClass, background and void aside."""
    votes = np.bincount(class_values[(class_values != BACKGROUND) & (class_values != VOID)], minlength=len(CLASSES) + 1)
    if votes.sum() == 0:
        raise PipelineError(f"{object_path}: instance {instance_id} has no class in {class_path} (only background or void there)")
    if len(votes) > len(CLASSES) + 1:
        unknown = sorted(set(np.flatnonzero(votes[len(CLASSES) + 1 :]) + len(CLASSES) + 1))
        raise PipelineError(f"{class_path}: class ids {unknown} are not VOC classes (expected 1..{len(CLASSES)}, 0, 255)")
    return CLASSES[int(np.argmax(votes)) - 1]
