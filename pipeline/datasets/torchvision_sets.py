"""Caltech-101 and Oxford Flowers-102, read from the layout torchvision's loaders download them to.

Labels equal the targets of torchvision.datasets.Caltech101 / Flowers102 on the same files (the
tests compare them). The listing is read here rather than through torchvision's classes, so that
prepare's worker processes stay free of torch and a stray file is reported, not miscounted.

Caltech-101: dataset.root holds caltech101/ (torchvision's root) or is that folder. Images are
caltech101/101_ObjectCategories/<category>/image_NNNN.jpg. Classes are the category folders in
torchvision's order (sorted by name, capitals first) without BACKGROUND_Google, which torchvision
drops as "not a real class" (DA-Fusion kept it as a 102nd class). A class's name is its folder
name lower-cased with spaces for underscores ("Faces_easy" -> "faces easy", "car_side" -> "car
side"), as DA-Fusion writes them into prompts. There is no official split: every image is
"unsplit" and prepare holds out a seeded share of each class. The object's outline, where
caltech101/Annotations/<category>/annotation_NNNN.mat exists, becomes its mask; without the
Annotations folder (torchvision's own download does not extract it; dataset.download does) masks are null.

Flowers-102: dataset.root holds flowers-102/ (torchvision's root) or is that folder, with
jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat. The official splits of setid.mat decide:
trnid -> train, valid -> val, tstid -> test (DA-Fusion instead split each class in half by seed).
No masks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from pipeline import PipelineError
from pipeline.datasets import BAD_INPUT, NOT_AN_IMAGE, OTHER_CLASS, LabelContext, Labelled, Source, left_out, write_mask
from pipeline.io import open_image

if TYPE_CHECKING:
    from pipeline.settings.prepare import PrepareSettings

log = logging.getLogger(__name__)

CALTECH_FOLDER = "caltech101"
CALTECH_IMAGES = "101_ObjectCategories"
CALTECH_ANNOTATIONS = "Annotations"
CALTECH_BACKGROUND = "BACKGROUND_Google"
# Category folders whose annotation folder is named differently (the same map as torchvision's).
CALTECH_ANNOTATION_FOLDERS = {
    "Faces": "Faces_2",
    "Faces_easy": "Faces_3",
    "Motorbikes": "Motorbikes_16",
    "airplanes": "Airplanes_Side_2",
}

FLOWERS_FOLDER = "flowers-102"
FLOWERS_SPLITS = {"trnid": "train", "valid": "val", "tstid": "test"}  # setid.mat key -> source split
# The 102 class names in label order, as in DA-Fusion's semantic_aug/datasets/flowers102.py (there
# with trailing spaces after "cyclamen" and "hippeastrum", removed here). torchvision's
# Flowers102.classes (since 0.20) is the same list but writes "pink-yellow dahlia?".
FLOWERS_CLASSES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
)  # fmt: skip


class ClassifiedImage(NamedTuple):
    image_id: str
    path: str  # relative to the dataset root
    source_split: str
    class_name: str
    annotation_path: str | None  # Caltech-101 outline .mat, relative to the dataset root


def dataset_folder(root: Path, folder: str, expected: str) -> Path:
    """`root/folder` (torchvision's layout) or `root` itself, whichever holds `expected`."""
    for candidate in (root / folder, root):
        if (candidate / expected).exists():
            return candidate
    raise PipelineError(
        f"dataset.root: no {expected} under {root / folder} or {root}. Expected the layout torchvision "
        f"downloads to (set dataset.download: true to fetch it)"
    )


# --- Caltech-101 --------------------------------------------------------------------------------


def caltech_class_name(folder: str) -> str:
    return folder.lower().replace("_", " ")


def read_caltech101(root: Path, settings: PrepareSettings) -> Source:
    """One job per image_*.jpg of each category folder; other files are listed as left out."""
    base = dataset_folder(root, CALTECH_FOLDER, CALTECH_IMAGES)
    image_dir, annotation_dir = base / CALTECH_IMAGES, base / CALTECH_ANNOTATIONS
    categories = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and p.name != CALTECH_BACKGROUND)
    if not categories:
        raise PipelineError(f"{image_dir} has no category folders. Expected {CALTECH_IMAGES}/<category>/image_0001.jpg")
    classes = [caltech_class_name(c) for c in categories]
    if len(set(classes)) != len(classes):
        raise PipelineError(f"{image_dir}: category folders {categories} give the same class name twice")
    if not annotation_dir.is_dir():
        log.info("%s does not exist: Caltech-101 masks will be null", annotation_dir)

    jobs: list[ClassifiedImage] = []
    skipped: list[Labelled] = []
    for category, class_name in zip(categories, classes):
        folder = image_dir / category
        annotation_folder = annotation_dir / CALTECH_ANNOTATION_FOLDERS.get(category, category)
        for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            relative = entry.relative_to(root).as_posix()
            image_id = f"caltech101-{category}-{entry.stem}"
            if not (entry.is_file() and entry.name.startswith("image_") and entry.suffix == ".jpg"):
                skipped.append(Labelled(image_id, relative, "unsplit", left_out=NOT_AN_IMAGE, detail="expected image_NNNN.jpg"))
                continue
            annotation = annotation_folder / f"annotation_{entry.stem[len('image_'):]}.mat"
            annotation_path = annotation.relative_to(root).as_posix() if annotation.is_file() else None
            jobs.append(ClassifiedImage(image_id, relative, "unsplit", class_name, annotation_path))
    return Source(classes=classes, jobs=jobs, label_image=label_image, left_out=skipped)


def outline_mask(annotation_path: Path, width: int, height: int) -> np.ndarray:
    """The filled object outline of a Caltech-101 annotation file, as a boolean height x width mask.

    The outline's points are relative to the box's top-left corner in MATLAB's 1-based pixel
    coordinates, as the dataset's show_annotation.m draws them (x + box_coord(3), y + box_coord(1)).
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        data = loadmat(annotation_path)
    except FileNotFoundError:
        raise PipelineError(f"annotation {annotation_path} does not exist") from None
    except (MatReadError, OSError, ValueError) as exc:
        raise PipelineError(f"annotation {annotation_path} is not a readable .mat file ({exc})") from None
    box, contour = data.get("box_coord"), data.get("obj_contour")
    if box is None or contour is None or box.size != 4 or contour.ndim != 2 or contour.shape[0] != 2 or contour.shape[1] < 3:
        got = {key: getattr(data.get(key), "shape", None) for key in ("box_coord", "obj_contour")}
        raise PipelineError(
            f"annotation {annotation_path}: expected box_coord (4 values) and obj_contour (2 x N, N >= 3). Got shapes {got}"
        )
    top, _, left, _ = box.ravel().astype(float)
    points = [(x + left - 1, y + top - 1) for x, y in contour.T.astype(float)]
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1, outline=1)
    mask = np.asarray(canvas, dtype=bool)
    if not mask.any():
        raise PipelineError(f"annotation {annotation_path}: the outline covers no pixel of the {width}x{height} image")
    return mask


# --- Flowers-102 --------------------------------------------------------------------------------


def read_flowers102(root: Path, settings: PrepareSettings) -> Source:
    """One job per image listed in setid.mat, labelled by imagelabels.mat."""
    from scipy.io import loadmat

    base = dataset_folder(root, FLOWERS_FOLDER, "jpg")
    labels = _mat_vector(loadmat, base / "imagelabels.mat", "labels")
    if labels.size == 0:
        raise PipelineError(f"{base / 'imagelabels.mat'}: labels is empty. Expected one label per image")
    if labels.min() < 1 or labels.max() > len(FLOWERS_CLASSES):
        raise PipelineError(
            f"{base / 'imagelabels.mat'}: labels should be 1..{len(FLOWERS_CLASSES)}. "
            f"Got values from {labels.min()} to {labels.max()}"
        )
    split_of: dict[int, str] = {}
    for key, source_split in FLOWERS_SPLITS.items():
        for number in _mat_vector(loadmat, base / "setid.mat", key).tolist():
            if not 1 <= number <= labels.size:
                raise PipelineError(f"{base / 'setid.mat'}: {key} lists image {number}, but imagelabels.mat labels images 1..{labels.size}")
            if number in split_of:
                raise PipelineError(f"{base / 'setid.mat'}: image {number} is in both {split_of[number]} and {source_split}")
            split_of[number] = source_split

    jobs: list[ClassifiedImage] = []
    skipped: list[Labelled] = []
    for number, label in enumerate(labels.tolist(), start=1):
        relative = (base / "jpg" / f"image_{number:05d}.jpg").relative_to(root).as_posix()
        job = ClassifiedImage(f"flowers102-{number:05d}", relative, split_of.get(number, "unsplit"), FLOWERS_CLASSES[label - 1], None)
        if number in split_of:
            jobs.append(job)
        else:
            skipped.append(left_out(job, BAD_INPUT, "labelled in imagelabels.mat but in none of trnid, valid, tstid of setid.mat"))
    return Source(classes=list(FLOWERS_CLASSES), jobs=jobs, label_image=label_image, left_out=skipped)


def _mat_vector(loadmat, path: Path, key: str) -> np.ndarray:
    """An integer vector stored under `key` in a MATLAB file."""
    try:
        data = loadmat(path, squeeze_me=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist. Expected the Flowers-102 layout torchvision downloads") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable .mat file ({exc})") from None
    if key not in data:
        raise PipelineError(f"{path}: no variable {key!r}. Got {sorted(k for k in data if not k.startswith('__'))}")
    values = np.atleast_1d(data[key])
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.number) or not np.all(values == np.round(values)):
        raise PipelineError(f"{path}: {key} should be a vector of integers. Got {values.dtype} of shape {values.shape}")
    return values.astype(np.int64)


# --- both ---------------------------------------------------------------------------------------


def label_image(job: ClassifiedImage, context: LabelContext) -> Labelled:
    """The label is the image's class; check the image decodes, record its size, draw its outline mask."""
    if job.class_name not in context.keep:
        return left_out(job, OTHER_CLASS, f"class is {job.class_name!r}", class_name=job.class_name)
    width, height = open_image(context.root / job.path).size  # decoding it all catches truncated files now
    mask_path = None
    if job.annotation_path is not None:
        mask = outline_mask(context.root / job.annotation_path, width, height)
        mask_path = write_mask(context, job.image_id, mask)
    return Labelled(job.image_id, job.path, job.source_split, job.class_name, width, height, mask_path)
