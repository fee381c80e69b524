"""CIFAR-10 and CIFAR-100, read from the "python version" files torchvision's loaders download.

The images are stored as pickled uint8 arrays, not files, and every later stage reads images from
files: `prepare` writes each one once as a PNG into its own folder (Source.write_images), which
becomes the manifest's dataset root. Labels and pixels equal torchvision.datasets.CIFAR10 /
CIFAR100 on the same files (the tests compare them).

CIFAR-10: dataset.root holds cifar-10-batches-py/ (torchvision's root) or is that folder, with
data_batch_1..5, test_batch and batches.meta (label_names). CIFAR-100: cifar-100-python/ with
train, test and meta; its labels are the 100 fine labels (fine_label_names, "aquarium_fish" ->
"aquarium fish"). The official train images are train; the test images are held out and split into
val and test per class by dataset.test_fraction, as prepare splits COCO's validation images. Image
ids are cifar10-train-00000 (index in the official order). No masks.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline import PipelineError
from pipeline.datasets import Source
from pipeline.datasets.torchvision_sets import ClassifiedImage, dataset_folder, label_image
from pipeline.progress import progress

if TYPE_CHECKING:
    from pipeline.settings.prepare import PrepareSettings

log = logging.getLogger(__name__)

SIDE = 32


@dataclass(frozen=True)
class Layout:
    folder: str  # torchvision's folder under its root
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str  # class names in the meta file
    labels_key: str  # labels in each batch


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "label_names", "labels"),
    "cifar100": Layout("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", "fine_labels"),
}  # fmt: skip
SOURCE_SPLIT = {"train": "train", "test": "heldout"}


def _unpickle(path: Path) -> dict:
    """A CIFAR batch or meta file (pickled with Python 2: byte strings decoded as latin-1, as torchvision does)."""
    try:
        with open(path, "rb") as handle:
            data = pickle.load(handle, encoding="latin1")
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist. Expected the CIFAR python-version layout torchvision downloads") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as exc:
        raise PipelineError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a pickled dict. Got {type(data).__name__}")
    return data


def read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(images [N,32,32,3] uint8, labels) of one batch file, checked."""
    data = _unpickle(path)
    for key in ("data", labels_key):
        if key not in data:
            raise PipelineError(f"{path}: no {key!r}. Got keys {sorted(data)}")
    pixels, labels = np.asarray(data["data"]), [int(label) for label in data[labels_key]]
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * SIDE * SIDE:
        raise PipelineError(f"{path}: data should be uint8 of shape [N, {3 * SIDE * SIDE}]. Got {pixels.dtype} of shape {pixels.shape}")
    if len(labels) != len(pixels):
        raise PipelineError(f"{path}: {len(pixels)} images but {len(labels)} {labels_key}")
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise PipelineError(f"{path}: {labels_key} should be 0..{num_classes - 1}. Got {bad[0]}")
    return pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def read_cifar(root: Path, settings: PrepareSettings) -> Source:
    """One job per image of the train and test files; write_images writes their PNGs."""
    layout = LAYOUTS[settings.name]
    base = dataset_folder(root, layout.folder, layout.meta)
    meta = _unpickle(base / layout.meta)
    if layout.names_key not in meta:
        raise PipelineError(f"{base / layout.meta}: no {layout.names_key!r}. Got keys {sorted(meta)}")
    classes = [str(name).replace("_", " ") for name in meta[layout.names_key]]
    jobs: list[ClassifiedImage] = []
    pixels: dict[str, np.ndarray] = {}  # split -> its images in the official order (about 180 MB in all)
    for split, names in (("train", layout.train), ("test", layout.test)):
        batches = [read_batch(base / name, layout.labels_key, len(classes)) for name in names]
        pixels[split] = np.concatenate([images for images, _ in batches])
        labels = [label for _, batch_labels in batches for label in batch_labels]
        for index, label in enumerate(labels):
            image_id = f"{settings.name}-{split}-{index:05d}"
            jobs.append(ClassifiedImage(image_id, f"{split}/{index:05d}.png", SOURCE_SPLIT[split], classes[label], None))
    return Source(classes=classes, jobs=jobs, label_image=label_image, write_images=partial(write_images, pixels))


def write_images(pixels: dict[str, np.ndarray], image_root: Path) -> None:
    """Each split's images as <split>/<index>.png under `image_root`, numbered as read_cifar's jobs."""
    for split, images in pixels.items():
        (image_root / split).mkdir(parents=True)
        for index, image in enumerate(progress(images, len(images), f"write {split} images as PNG")):
            Image.fromarray(image).save(image_root / split / f"{index:05d}.png", compress_level=1)
    log.info("wrote %d CIFAR images as PNG into %s", sum(len(images) for images in pixels.values()), image_root)
