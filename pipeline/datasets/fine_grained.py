"""FGVC Aircraft and Stanford Cars (DA-Fusion's and study 001's fine-grained tasks), read from the
layouts torchvision's loaders use; labels equal the targets of torchvision.datasets.FGVCAircraft
(annotation_level "variant") and StanfordCars on the same files (the tests compare them).

FGVC Aircraft: dataset.root holds fgvc-aircraft-2013b/ (torchvision's root) or is that folder, with
data/images/<name>.jpg, data/variants.txt (the 100 class names, in label order) and
data/images_variant_{train,val,test}.txt ("<name> <variant>" per line). The official train, val and
test splits decide. The images keep the dataset's 20-pixel copyright banner, as torchvision's do.

Stanford Cars: dataset.root holds stanford_cars/ or is that folder, with devkit/cars_meta.mat (the
196 class names), devkit/cars_train_annos.mat with cars_train/, and cars_test_annos_withlabels.mat
with cars_test/. The official train images are train; the official test images are held out and
split into val and test per class by dataset.test_fraction. The bounding boxes of the annotations
are not used (torchvision's loader does not crop either). No download: the dataset's original URL
is gone, and torchvision's downloader no longer works for it.
No masks for either.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import PipelineError
from pipeline.datasets import Source
from pipeline.datasets.torchvision_sets import ClassifiedImage, dataset_folder, label_image

if TYPE_CHECKING:
    from pipeline.settings.prepare import PrepareSettings

log = logging.getLogger(__name__)

AIRCRAFT_FOLDER = "fgvc-aircraft-2013b"
AIRCRAFT_SPLITS = ("train", "val", "test")
CARS_FOLDER = "stanford_cars"
# annotation file (relative to the folder), image folder, source split
CARS_SPLITS = (("devkit/cars_train_annos.mat", "cars_train", "train"), ("cars_test_annos_withlabels.mat", "cars_test", "heldout"))


def read_fgvc_aircraft(root: Path, settings: PrepareSettings) -> Source:
    """One job per line of the three official split files."""
    base = dataset_folder(root, AIRCRAFT_FOLDER, "data/images")
    data = base / "data"
    classes = _lines(data / "variants.txt")
    if len(set(classes)) != len(classes):
        raise PipelineError(f"{data / 'variants.txt'}: a variant is named twice. Expected one line per class")
    known = set(classes)
    jobs: list[ClassifiedImage] = []
    seen: dict[str, str] = {}
    for split in AIRCRAFT_SPLITS:
        listing = data / f"images_variant_{split}.txt"
        for number, line in enumerate(_lines(listing), start=1):
            name, space, variant = line.partition(" ")
            if not space or variant not in known:
                raise PipelineError(f"{listing}, line {number}: {line!r}. Expected '<image name> <variant>' with a variant of variants.txt")
            if name in seen:
                raise PipelineError(f"{listing}, line {number}: image {name} is also in the {seen[name]} split. Expected each image in one split")
            seen[name] = split
            path = data / "images" / f"{name}.jpg"
            # A missing or broken file stops prepare naming it (or is skipped: dataset.on_bad_image).
            jobs.append(ClassifiedImage(f"fgvc-aircraft-{name}", path.relative_to(root).as_posix(), split, variant, None))
    return Source(classes=classes, jobs=jobs, label_image=label_image)


def read_stanford_cars(root: Path, settings: PrepareSettings) -> Source:
    """One job per annotation of the train and labelled test files."""
    from scipy.io import loadmat

    base = dataset_folder(root, CARS_FOLDER, "devkit/cars_meta.mat")
    meta = _loadmat(loadmat, base / "devkit" / "cars_meta.mat")
    if "class_names" not in meta:
        raise PipelineError(f"{base / 'devkit' / 'cars_meta.mat'}: no variable 'class_names'. Got {sorted(k for k in meta if not k.startswith('__'))}")
    classes = [str(name) for name in meta["class_names"].tolist()]
    jobs: list[ClassifiedImage] = []
    for annotations_file, image_folder, source_split in CARS_SPLITS:
        path = base / annotations_file
        annotations = _loadmat(loadmat, path).get("annotations")
        if annotations is None or annotations.dtype.names is None or not {"fname", "class"} <= set(annotations.dtype.names):
            raise PipelineError(f"{path}: expected a struct array 'annotations' with fields fname and class (the Stanford Cars devkit's)")
        for annotation in annotations.ravel():
            fname, label = str(annotation["fname"]), int(annotation["class"])
            if not 1 <= label <= len(classes):
                raise PipelineError(f"{path}: image {fname} has class {label}. Expected 1..{len(classes)} (cars_meta.mat's class_names)")
            image = base / image_folder / fname
            image_id = f"stanford-cars-{image_folder.removeprefix('cars_')}-{Path(fname).stem}"
            jobs.append(ClassifiedImage(image_id, image.relative_to(root).as_posix(), source_split, classes[label - 1], None))
    return Source(classes=classes, jobs=jobs, label_image=label_image)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"{path} does not exist. Expected the FGVC Aircraft layout torchvision downloads (set dataset.download: true to fetch it)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _loadmat(loadmat, path: Path) -> dict:
    try:
        return loadmat(path, squeeze_me=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist. Expected the Stanford Cars layout torchvision reads (stanford_cars/devkit, cars_train, cars_test)") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable .mat file ({exc})") from None
