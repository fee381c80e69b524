"""The embedded demo dataset: genuine COCO files whose masks are the digits' visible pixels."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.demo import CLASS_NAMES, Layer, build_demo_coco, compose_scene, load_mnist, split_digit_pools

DEMO_CFG = {"image_size": 48, "train_images": 12, "val_images": 10, "max_objects": 3}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "demo-coco"
    stats = build_demo_coco(root, DEMO_CFG, seed=0)
    return root, stats


def load(root, split):
    return COCO(str(root / "annotations" / f"instances_{split}2017.json"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_files_are_coco_2017(demo_root, split):
    root, stats = demo_root
    coco = load(root, split)
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == list(enumerate(CLASS_NAMES, 1))
    assert len(coco.getImgIds()) == DEMO_CFG[f"{split}_images"] == stats["images"][split]
    assert len(coco.getAnnIds()) == stats["annotations"][split]
    for info in coco.loadImgs(coco.getImgIds()):
        with Image.open(root / f"{split}2017" / info["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (info["width"], info["height"]) == (48, 48)


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_are_exactly_the_visible_digit_pixels(demo_root, split):
    root, _ = demo_root
    coco = load(root, split)
    objects_seen = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(root / f"{split}2017" / info["file_name"]))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(annotations) <= DEMO_CFG["max_objects"]
        covered = np.zeros((48, 48), dtype=int)
        for annotation in annotations:
            mask = coco.annToMask(annotation).astype(bool)
            assert annotation["iscrowd"] == 0 and mask.any()
            assert annotation["area"] == mask.sum()
            rows, cols = np.nonzero(mask)
            x, y = cols.min(), rows.min()
            assert annotation["bbox"] == [x, y, cols.max() - x + 1, rows.max() - y + 1]
            # Each digit is painted in one colour, and its mask is exactly where that colour shows.
            colours = np.unique(pixels[mask], axis=0)
            assert len(colours) == 1
            covered += mask
            objects_seen += 1
        assert covered.max() == 1, "visible masks of one scene overlap"
    assert objects_seen == len(coco.getAnnIds())


def test_later_digits_occlude_earlier_ones():
    background = np.zeros((6, 6, 3), dtype=np.uint8)
    lower = np.zeros((6, 6), dtype=bool)
    lower[0:4, 0:4] = True
    upper = np.zeros((6, 6), dtype=bool)
    upper[2:6, 2:6] = True
    image, (lower_visible, upper_visible) = compose_scene(
        background, [Layer(1, lower, (255, 0, 0)), Layer(2, upper, (0, 0, 255))]
    )
    assert np.array_equal(upper_visible, upper)
    assert np.array_equal(lower_visible, lower & ~upper) and lower_visible.sum() == 12
    assert (image[lower_visible] == (255, 0, 0)).all() and (image[upper] == (0, 0, 255)).all()
    assert (image[~(lower | upper)] == 0).all()


def test_train_val_and_pretrain_digits_come_from_disjoint_pools():
    _, labels = load_mnist()
    pools = split_digit_pools(labels)
    for digit in range(10):
        train, val, pretrain = (set(pools[name][digit]) for name in ("train", "val", "pretrain"))
        assert not train & val and not train & pretrain and not val & pretrain
        assert train | val | pretrain == set(np.flatnonzero(labels == digit))
        assert len(pretrain) == round(0.5 * (labels == digit).sum())
    assert not np.array_equal(split_digit_pools(labels, seed=1)["train"][0], pools["train"][0])


def test_same_seed_same_bytes_other_seed_other_scenes(demo_root, tmp_path):
    root, stats = demo_root
    again = tmp_path / "again"
    assert build_demo_coco(again, DEMO_CFG, seed=0) == stats
    for relative in ["annotations/instances_train2017.json", "annotations/instances_val2017.json", "val2017/000000000013.png"]:
        assert (again / relative).read_bytes() == (root / relative).read_bytes()
    other = tmp_path / "other"
    build_demo_coco(other, {**DEMO_CFG, "train_images": 10}, seed=1)
    first = json.loads((root / "annotations/instances_train2017.json").read_text())["annotations"][0]
    assert json.loads((other / "annotations/instances_train2017.json").read_text())["annotations"][0] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temporaries left


def test_rle_segmentation_is_compressed_coco_rle(demo_root):
    root, _ = demo_root
    annotation = json.loads((root / "annotations/instances_val2017.json").read_text())["annotations"][0]
    segmentation = annotation["segmentation"]
    assert isinstance(segmentation["counts"], str) and segmentation["size"] == [48, 48]
    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    assert mask_utils.area(rle) == annotation["area"]
