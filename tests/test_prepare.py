"""prepare on hand-written COCO, VOC and folder datasets, checked against independent readings
(pycocotools' annToMask, torchvision's VOCSegmentation) of the same files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO
from torchvision.datasets import VOCSegmentation

from conftest import RecordingConfig, undeclared_reads

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.datasets import BAD_INPUT, NO_OBJECT, NOT_AN_IMAGE, ONLY_CROWD, OTHER_CLASS
from pipeline.datasets.coco import Instance, CocoImage, instance_rle
from pipeline.datasets.listing import listing_fingerprint
from pipeline.demo import build_demo_coco
from pipeline.io import read_json, read_metadata, read_parquet
from pipeline.manifest import read_manifest
from pipeline.prepare import prepare_dataset
from pipeline.settings.prepare import PrepareSettings

W, H = 10, 8


def config_for(name, root, **dataset):
    return validate_config({"seed": 0, "dataset": {"name": name, "root": str(root), **dataset}})


def manifest_rows(out_dir):
    return {row["image_id"]: row for row in read_manifest(out_dir / "manifest.parquet")[0]}


def read_mask(path):
    return np.asarray(Image.open(path)).astype(bool)


# --- COCO --------------------------------------------------------------------------------------


def box_mask(top, left, bottom, right):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": encoded["counts"].decode()}


def uncompressed_rle(mask):
    flat, runs, value, run = mask.flatten(order="F"), [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            runs.append(run)
            value, run = pixel, 1
    return {"size": [H, W], "counts": runs + [run]}


def rect_polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


CAT, DOG, BIRD = 3, 7, 9
# Categories deliberately out of id order: classes follow the ids (cat, dog, bird).
CATEGORIES = [{"id": DOG, "name": "dog"}, {"id": CAT, "name": "cat"}, {"id": BIRD, "name": "bird"}]


def ann(ann_id, image_id, category_id, segmentation, iscrowd=0, area=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": float(area if area is not None else 0), "bbox": [0, 0, 1, 1], "iscrowd": iscrowd}


def coco_train_annotations():
    return [
        # 1: overlapping polygon dog (36 px) and RLE cat (30 px); a crowd cat covering everything never decides.
        ann(11, 1, DOG, [rect_polygon(0, 0, 6, 6)]),
        ann(12, 1, CAT, rle(box_mask(2, 4, 8, 9))),
        ann(13, 1, CAT, uncompressed_rle(np.ones((H, W), np.uint8)), iscrowd=1),
        # 2: equal pixel counts (12 each); the higher id comes first in the file, the lower id wins.
        ann(22, 2, CAT, rle(box_mask(0, 0, 3, 4))),
        ann(21, 2, BIRD, rle(box_mask(4, 5, 7, 9))),
        # 3: only a crowd annotation.
        ann(31, 3, DOG, uncompressed_rle(box_mask(0, 0, 4, 4)), iscrowd=1),
        # 5: the `area` field lies; decoded pixels decide (cat 4 px, dog 10 px).
        ann(51, 5, CAT, [rect_polygon(1, 1, 3, 3)], area=500),
        ann(52, 5, DOG, rle(box_mask(5, 0, 7, 5)), area=1),
        # 6: a two-part polygon cat (16 + 12 px) beats an uncompressed-RLE bird (20 px).
        ann(61, 6, BIRD, uncompressed_rle(box_mask(0, 5, 4, 10))),
        ann(62, 6, CAT, [rect_polygon(0, 4, 4, 8), rect_polygon(6, 5, 10, 8)]),
    ]


EXPECTED_TRAIN = {1: "dog", 2: "bird", 5: "dog", 6: "cat"}
VAL_CLASSES = {101: CAT, 102: CAT, 103: CAT, 104: CAT, 105: CAT, 106: CAT, 107: DOG, 108: DOG, 109: DOG, 110: DOG, 111: DOG}


def write_coco(root, train_annotations, shuffle_seed=None):
    splits = {
        "train": ([1, 2, 3, 4, 5, 6], train_annotations),
        "val": (list(VAL_CLASSES), [ann(1000 + i, i, c, rle(box_mask(1, 1, 4, 3 + i % 5))) for i, c in VAL_CLASSES.items()]),
    }
    for split, (image_ids, split_annotations) in splits.items():
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H} for i in image_ids]
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        for image in images:
            Image.new("RGB", (W, H), (image["id"], 0, 0)).save(root / f"{split}2017" / image["file_name"])
        categories = list(CATEGORIES)
        if shuffle_seed is not None:  # the same dataset with every list in another order
            for items in (images, split_annotations, categories):
                random.Random(shuffle_seed).shuffle(items)
        (root / "annotations").mkdir(exist_ok=True)
        document = {"images": images, "annotations": split_annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))
    return root


@pytest.fixture
def coco_root(tmp_path):
    return write_coco(tmp_path / "coco", coco_train_annotations())


def expected_from_pycocotools(annotation_file, coco_image_id):
    """Largest non-crowd annotation by annToMask pixels, ties to the lowest id: (class, mask)."""
    coco = COCO(str(annotation_file))
    annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=coco_image_id)) if not a["iscrowd"]]
    masks = {a["id"]: coco.annToMask(a).astype(bool) for a in annotations}
    winner = min(annotations, key=lambda a: (-masks[a["id"]].sum(), a["id"]))
    return coco.loadCats(winner["category_id"])[0]["name"], masks[winner["id"]]


def test_coco_labels_and_masks_match_pycocotools(coco_root, tmp_path):
    out = tmp_path / "out"
    summary = prepare_dataset(config_for("coco", coco_root), out)
    rows = manifest_rows(out)
    classes = read_json(out / "classes.json")
    assert classes == ["cat", "dog", "bird"] == read_metadata(out / "manifest.parquet")["classes"]
    assert summary["images"] == {"train": 4, "val": 6, "test": 5}
    for split, source in [("train", "train"), ("val", "val")]:
        annotation_file = coco_root / "annotations" / f"instances_{source}2017.json"
        for row in (r for r in rows.values() if r["image_id"].startswith(f"coco-{split}-")):
            coco_id = int(row["image_id"].rsplit("-", 1)[1])
            class_name, mask = expected_from_pycocotools(annotation_file, coco_id)
            assert row["class_name"] == class_name and classes[row["label"]] == class_name
            assert np.array_equal(read_mask(row["mask_path"]), mask)
            assert (row["width"], row["height"]) == (W, H)
            assert row["path"] == str(coco_root / f"{source}2017" / f"{coco_id:012d}.jpg")
    assert {int(i.rsplit("-", 1)[1]): r["class_name"] for i, r in rows.items() if r["split"] == "train"} == EXPECTED_TRAIN


def test_coco_left_out_images_are_counted_with_reasons(coco_root, tmp_path):
    prepare_dataset(config_for("coco", coco_root), tmp_path / "out")
    stats = read_json(tmp_path / "out" / "stats.json")
    assert stats["left_out"]["counts"] == {NO_OBJECT: 1, ONLY_CROWD: 1}
    listed = {item["image_id"]: item["reason"] for item in stats["left_out"]["images"]}
    assert listed == {"coco-train-000000000003": ONLY_CROWD, "coco-train-000000000004": NO_OBJECT}
    assert stats["images"]["train"] == {"cat": 1, "dog": 2, "bird": 1}
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == sorted(
        f"{image_id}.png" for image_id in manifest_rows(tmp_path / "out")
    )


def test_val_split_is_stratified_and_independent_of_file_order(coco_root, tmp_path):
    prepare_dataset(config_for("coco", coco_root), tmp_path / "a")
    stats = read_json(tmp_path / "a" / "stats.json")
    # floor(6 * 0.5) of the cats and floor(5 * 0.5) of the dogs are test, the rest val.
    assert stats["images"]["test"] == {"cat": 3, "dog": 2, "bird": 0}
    assert stats["images"]["val"] == {"cat": 3, "dog": 3, "bird": 0}
    shuffled = write_coco(tmp_path / "shuffled", coco_train_annotations(), shuffle_seed=5)
    prepare_dataset(config_for("coco", shuffled), tmp_path / "b")
    table_a, table_b = read_parquet(tmp_path / "a" / "manifest.parquet"), read_parquet(tmp_path / "b" / "manifest.parquet")
    assert table_a.drop(["path"]).equals(table_b.drop(["path"]))
    other_seed = {**config_for("coco", coco_root), "seed": 1}
    prepare_dataset(other_seed, tmp_path / "c")
    splits = lambda out: {i: r["split"] for i, r in manifest_rows(out).items()}  # noqa: E731
    assert splits(tmp_path / "c") != splits(tmp_path / "a")
    assert read_json(tmp_path / "c" / "stats.json")["images"] == stats["images"]


def test_worker_processes_give_the_same_output(coco_root, tmp_path):
    prepare_dataset(config_for("coco", coco_root), tmp_path / "one", threads=1)
    prepare_dataset(config_for("coco", coco_root), tmp_path / "two", threads=2)
    assert read_parquet(tmp_path / "one" / "manifest.parquet").equals(read_parquet(tmp_path / "two" / "manifest.parquet"))
    for mask in (tmp_path / "one" / "masks").iterdir():
        assert mask.read_bytes() == (tmp_path / "two" / "masks" / mask.name).read_bytes()


def test_classes_filter_keeps_order_and_leaves_out_other_deciders(coco_root, tmp_path):
    summary = prepare_dataset(config_for("coco", coco_root, classes=["bird", "cat"]), tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert {r["class_name"]: r["label"] for r in rows.values()} == {"bird": 0, "cat": 1}
    # Image 1's largest object is a dog: it is left out, not relabelled by its smaller cat.
    assert "coco-train-000000000001" not in rows
    assert summary["left_out"][OTHER_CLASS] == 2 + 5  # train images 1 and 5, the five val dogs
    with pytest.raises(PipelineError, match=r"dataset.classes: \['zebra'\]"):
        prepare_dataset(config_for("coco", coco_root, classes=["zebra"]), tmp_path / "bad")


def test_polygons_with_fewer_than_three_points_enclose_nothing():
    image = CocoImage("coco-train-000000000001", "train2017/x.jpg", "train", W, H, ())
    assert instance_rle(image, Instance(1, "cat", False, [[1, 1, 5, 5]])) is None
    both = instance_rle(image, Instance(2, "cat", False, [[1, 1, 5, 5], rect_polygon(0, 0, 2, 2)]))
    assert mask_utils.area(both) == 4


def test_demo_is_prepared_through_the_coco_path(tmp_path):
    root = tmp_path / "demo"
    # 20 train images: enough for every digit to decide one (prepare refuses a class without train images)
    build_demo_coco(root, {"image_size": 40, "train_images": 20, "val_images": 10, "max_objects": 3}, seed=3)
    prepare_dataset(config_for("demo", root), tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert len(rows) == 30 and sum(r["split"] == "train" for r in rows.values()) == 20
    for row in rows.values():
        split = row["image_id"].split("-")[1]
        class_name, mask = expected_from_pycocotools(root / "annotations" / f"instances_{split}2017.json", int(row["image_id"].rsplit("-", 1)[1]))
        assert row["class_name"] == class_name
        assert np.array_equal(read_mask(row["mask_path"]), mask)


@pytest.mark.parametrize(
    "document, message",
    [
        ([1, 2], "expected an object with lists 'images', 'annotations'"),
        ({"images": [], "categories": []}, "expected an object with lists 'images', 'annotations'"),
        ({"images": [{"id": 1, "file_name": "a.jpg", "width": 4}], "annotations": [], "categories": []}, "image 1 field 'height'"),
        ({"images": [], "annotations": [], "categories": [{"id": "1", "name": "x"}]}, "category 1 field 'id' should be int. Got '1'"),
    ],
)
def test_annotation_file_that_is_not_coco(coco_root, tmp_path, document, message):
    path = coco_root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps(document))
    with pytest.raises(PipelineError, match=message) as error:
        prepare_dataset(config_for("coco", coco_root), tmp_path / "out")
    assert str(path) in str(error.value)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_annotation_with_unknown_category(tmp_path):
    root = write_coco(tmp_path / "coco", coco_train_annotations() + [ann(99, 2, 42, rle(box_mask(0, 0, 1, 1)))])
    with pytest.raises(PipelineError, match="annotation 99 has category_id 42, which is not in 'categories'"):
        prepare_dataset(config_for("coco", root), tmp_path / "out")


def test_coco_mask_of_the_wrong_size_and_missing_image(tmp_path):
    wrong = {"size": [H + 1, W], "counts": uncompressed_rle(box_mask(0, 0, 2, 2))["counts"] + [W]}
    root = write_coco(tmp_path / "coco", coco_train_annotations() + [ann(71, 2, CAT, wrong)])
    (root / "train2017" / "000000000006.jpg").unlink()
    with pytest.raises(PipelineError, match=r"coco-train-000000000002 annotation 71: mask size \[9, 10\]"):
        prepare_dataset(config_for("coco", root), tmp_path / "out")
    assert not (tmp_path / "out" / "masks").exists()
    # Dogs only: skipping images 2 and 6 leaves the cat and the bird without train images.
    summary = prepare_dataset(config_for("coco", root, on_bad_image="skip", classes=["dog"]), tmp_path / "out")
    assert summary["left_out"][BAD_INPUT] == 2 and summary["images"]["train"] == 2
    details = {i["image_id"]: i["detail"] for i in read_json(tmp_path / "out" / "stats.json")["left_out"]["images"]}
    assert "mask size" in details["coco-train-000000000002"]
    assert "000000000006.jpg does not exist" in details["coco-train-000000000006"]


# --- Pascal VOC ----------------------------------------------------------------------------------

VOC_W, VOC_H = 12, 10
VOC = {"aeroplane": 1, "bird": 3, "car": 7, "cat": 8, "cow": 10, "dog": 12, "horse": 13, "person": 15, "sheep": 17}


def voc_palette():
    """The standard VOC colour map (index i -> bit-interleaved RGB), 255 = void."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [red, green, blue]
    return palette


def palette_png(path, values):
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def with_border(objects):
    """Add a 255 ring around every instance, as in the VOC annotations."""
    out = objects.copy()
    inside = objects > 0
    ring = np.zeros_like(inside)
    ring[1:, :] |= inside[:-1, :]
    ring[:-1, :] |= inside[1:, :]
    ring[:, 1:] |= inside[:, :-1]
    ring[:, :-1] |= inside[:, 1:]
    out[ring & ~inside] = 255
    return out


def voc_scenes():
    """name -> (split, objects, {instance id: class id}) with the intended winner in the comment."""
    scenes = {}
    objects = np.zeros((VOC_H, VOC_W), np.uint8)
    objects[1:4, 1:4] = 1  # dog 9 px
    objects[5:9, 6:10] = 2  # cat 16 px -> cat; with 255 borders
    scenes["2007_000001"] = ("train", with_border(objects), {1: VOC["dog"], 2: VOC["cat"]})
    objects = np.zeros((VOC_H, VOC_W), np.uint8)
    objects[0:2, 0:3] = 1  # person 6 px
    objects[4:8, 4:9] = 2  # horse 20 px, the last id, no 255 anywhere -> horse
    scenes["2007_000002"] = ("train", objects, {1: VOC["person"], 2: VOC["horse"]})
    objects = np.zeros((VOC_H, VOC_W), np.uint8)
    objects[0:2, 0:4] = 2  # car 8 px, first in raster order
    objects[6:8, 6:10] = 1  # bird 8 px: a tie, the lower id wins -> bird
    scenes["2007_000003"] = ("train", with_border(objects), {1: VOC["bird"], 2: VOC["car"]})
    objects = np.zeros((VOC_H, VOC_W), np.uint8)
    objects[2:7, 2:5] = 3  # cow 15 px, partly occluded by the sheep in front
    objects[2:7, 5:7] = 1  # sheep 10 px
    objects[7:10, 0:3] = 2  # sheep 9 px: sheep have 19 px together, the largest *instance* is the cow
    scenes["2007_000004"] = ("train", objects, {1: VOC["sheep"], 2: VOC["sheep"], 3: VOC["cow"]})
    objects = np.zeros((VOC_H, VOC_W), np.uint8)
    objects[3:5, 3:5] = 255  # only void and background -> left out
    scenes["2007_000005"] = ("train", objects, {})
    for class_id in range(1, 21):  # one small object of every class, so that none is without train images
        objects = np.zeros((VOC_H, VOC_W), np.uint8)
        objects[0:2, 0:2] = 1
        scenes[f"2009_{class_id:06d}"] = ("train", objects, {1: class_id})
    for index, class_name in enumerate(["cat", "cat", "cat", "cat", "dog", "dog"], start=1):
        objects = np.zeros((VOC_H, VOC_W), np.uint8)
        objects[1 : 3 + index, 2:8] = 1
        scenes[f"2008_{index:06d}"] = ("val", with_border(objects), {1: VOC[class_name]})
    return scenes


def write_voc(base, scenes):
    """VOCdevkit/VOC2012 under `base`, exactly as the official tarball lays it out; returns VOC2012."""
    root = base / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    lists = {"train": [], "val": []}
    for name, (split, objects, instance_classes) in scenes.items():
        lists[split].append(name)
        Image.new("RGB", (VOC_W, VOC_H), (40, 80, 120)).save(root / "JPEGImages" / f"{name}.jpg")
        classes = np.where(objects == 255, 255, 0).astype(np.uint8)
        for instance_id, class_id in instance_classes.items():
            classes[objects == instance_id] = class_id
        palette_png(root / "SegmentationObject" / f"{name}.png", objects)
        palette_png(root / "SegmentationClass" / f"{name}.png", classes)
    for split, names in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(tmp_path / "voc", voc_scenes())


def test_voc_labels_and_masks_match_torchvision_reading(voc_root, tmp_path):
    summary = prepare_dataset(config_for("voc", voc_root), tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    classes = read_json(tmp_path / "out" / "classes.json")
    assert len(classes) == 20 and classes[VOC["cat"] - 1] == "cat"
    checked = 0
    for split in ("train", "val"):
        reference = VOCSegmentation(str(voc_root.parents[1]), year="2012", image_set=split)
        for index, image_path in enumerate(reference.images):
            name = image_path.rsplit("/", 1)[1][:-4]
            image, target = reference[index]
            class_ids = np.asarray(target)
            objects = np.asarray(Image.open(voc_root / "SegmentationObject" / f"{name}.png"))
            instance_ids = [v for v in np.unique(objects) if v not in (0, 255)]
            if not instance_ids:
                assert f"voc-{name}" not in rows
                continue
            winner = min(instance_ids, key=lambda v: (-(objects == v).sum(), v))
            class_id = np.bincount(class_ids[objects == winner]).argmax()
            row = rows[f"voc-{name}"]
            assert row["class_name"] == classes[class_id - 1] and row["label"] == class_id - 1
            assert np.array_equal(read_mask(row["mask_path"]), objects == winner)
            assert (row["width"], row["height"]) == image.size
            assert (row["split"] == "train") == (split == "train")
            checked += 1
    assert checked == 10 + 20
    assert {n: rows[f"voc-{n}"]["class_name"] for n in ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]} == {
        "2007_000001": "cat", "2007_000002": "horse", "2007_000003": "bird", "2007_000004": "cow",
    }
    assert summary["left_out"] == {NO_OBJECT: 1}
    assert summary["images"] == {"train": 4 + 20, "val": 3, "test": 3}


@pytest.mark.parametrize("level", [0, 1, 2], ids=["VOC2012", "VOCdevkit", "above VOCdevkit"])
def test_voc_root_may_be_any_level_of_the_official_layout(voc_root, tmp_path, level):
    root = [voc_root, voc_root.parent, voc_root.parents[1]][level]
    prepare_dataset(config_for("voc", root), tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert Path(next(iter(rows.values()))["path"]).parent == voc_root / "JPEGImages"


def test_voc_root_without_voc2012_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no VOC2012 folder"):
        prepare_dataset(config_for("voc", tmp_path / "empty"), tmp_path / "out")


@pytest.mark.parametrize("problem", ["truncated image", "class png size", "instance without class"])
def test_voc_bad_input_names_the_file(tmp_path, problem):
    scenes = voc_scenes()
    root = write_voc(tmp_path / "voc", scenes)
    if problem == "truncated image":
        path = root / "JPEGImages" / "2007_000002.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (VOC_H, VOC_W, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:-200])
        expected = f"{path} is truncated"
    elif problem == "class png size":
        path = root / "SegmentationClass" / "2007_000002.png"
        palette_png(path, np.zeros((VOC_H, VOC_W + 1), np.uint8))
        expected = f"{path}: mask is 13x10"
    else:
        path = root / "SegmentationClass" / "2007_000002.png"
        palette_png(path, np.where(scenes["2007_000002"][1] == 2, VOC["horse"], 0))
        expected = "SegmentationObject/2007_000002.png: instance 1 has no class"
    with pytest.raises(PipelineError, match=expected.replace("[", r"\[")):
        prepare_dataset(config_for("voc", root), tmp_path / "out")
    summary = prepare_dataset(config_for("voc", root, on_bad_image="skip"), tmp_path / "out")
    assert summary["left_out"] == {BAD_INPUT: 1, NO_OBJECT: 1} and summary["images"]["train"] == 3 + 20
    listed = [i for i in read_json(tmp_path / "out" / "stats.json")["left_out"]["images"] if i["reason"] == BAD_INPUT]
    assert listed[0]["image_id"] == "voc-2007_000002" and expected in listed[0]["detail"]


# --- a user's folder -----------------------------------------------------------------------------


def write_folder(root):
    for class_name, names in {"cat": ["a.png", "b.png", "c.png", "d.png"], "dog": ["x.jpg", "y.jpg", "z.jpg"]}.items():
        (root / class_name).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (W, H), (len(name), 0, 0)).save(root / class_name / name)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "masks").mkdir()
    Image.fromarray(box_mask(1, 1, 5, 6) * 255).save(root / "cat" / "masks" / "a.png")
    return root


def test_folder_of_class_folders(tmp_path):
    root = write_folder(tmp_path / "data")
    summary = prepare_dataset(config_for("folder", root), tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert read_json(tmp_path / "out" / "classes.json") == ["cat", "dog"]
    assert set(rows) == {f"folder-cat/{n}" for n in "abcd" for n in [f"{n}.png"]} | {f"folder-dog/{n}.jpg" for n in "xyz"}
    stats = read_json(tmp_path / "out" / "stats.json")
    # holdout floor(4/2)=2 cats -> 1 test, 1 val; floor(3/2)=1 dog -> 0 test, 1 val.
    assert stats["images"] == {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 0}}
    assert summary["left_out"] == {NOT_AN_IMAGE: 1} and stats["left_out"]["images"][0]["path"] == "dog/notes.txt"
    assert np.array_equal(read_mask(rows["folder-cat/a.png"]["mask_path"]), box_mask(1, 1, 5, 6).astype(bool))
    assert all(r["mask_path"] is None for i, r in rows.items() if i != "folder-cat/a.png")


def test_folder_csv_with_explicit_splits(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "list.csv").write_text(
        "path,label,mask_path,split\ncat/a.png,cat,cat/masks/a.png,train\ncat/b.png,cat,,val\n"
        "dog/x.jpg,dog,,train\ndog/y.jpg,dog,,test\n"
    )
    prepare_dataset(config_for("folder", root, csv="list.csv"), tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert {i: (r["split"], r["class_name"]) for i, r in rows.items()} == {
        "folder-cat/a.png": ("train", "cat"), "folder-cat/b.png": ("val", "cat"),
        "folder-dog/x.jpg": ("train", "dog"), "folder-dog/y.jpg": ("test", "dog"),
    }
    (root / "bad.csv").write_text("path,label,split\ncat/a.png,cat,holdout\n")
    with pytest.raises(PipelineError, match=r"bad.csv line 2: split should be one of"):
        prepare_dataset(config_for("folder", root, csv="bad.csv"), tmp_path / "out2")


def test_folder_bad_image_and_mask_size(tmp_path):
    root = write_folder(tmp_path / "data")
    truncated = root / "dog" / "x.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-150])
    with pytest.raises(PipelineError, match=f"{truncated} is truncated"):
        prepare_dataset(config_for("folder", root), tmp_path / "out")
    truncated.unlink()
    Image.new("L", (W + 2, H)).save(root / "cat" / "masks" / "b.png")
    with pytest.raises(PipelineError, match=r"cat/masks/b.png: mask is 12x8 \(width x height\) but its image .*cat/b.png is 10x8"):
        prepare_dataset(config_for("folder", root), tmp_path / "out")
    summary = prepare_dataset(config_for("folder", root, on_bad_image="skip"), tmp_path / "out")
    assert summary["left_out"] == {BAD_INPUT: 1, NOT_AN_IMAGE: 1}


# --- the listing fingerprint the workflow keys prepare on ------------------------------------------


def test_listing_fingerprint_follows_the_files_each_reader_reads(coco_root, voc_root, tmp_path):
    coco, voc = {"name": "coco", "root": str(coco_root)}, {"name": "voc", "root": str(voc_root.parents[1])}
    before = {"coco": listing_fingerprint(coco), "voc": listing_fingerprint(voc)}
    # Files the readers never read: beside COCO's folders, and a VOC JPEG no split list names.
    (coco_root / "README.txt").write_text("notes")
    Image.new("RGB", (VOC_W, VOC_H)).save(voc_root / "JPEGImages" / "2099_000001.jpg")
    assert {"coco": listing_fingerprint(coco), "voc": listing_fingerprint(voc)} == before
    # A replaced image (same name, new file) and a removed one.
    Image.new("RGB", (W, H), (1, 2, 3)).save(coco_root / "val2017" / "000000000101.jpg")
    (voc_root / "SegmentationObject" / "2007_000001.png").unlink()
    after = {"coco": listing_fingerprint(coco), "voc": listing_fingerprint(voc)}
    assert after["coco"] != before["coco"] and after["voc"] != before["voc"]


# --- degenerate datasets stop at prepare, with the reason -------------------------------------------


def test_class_without_train_images_stops_prepare(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "bird").mkdir()
    with pytest.raises(PipelineError, match=r"classes \['bird'\] have no train images"):
        prepare_dataset(config_for("folder", root), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_coco_without_categories_stops_prepare(coco_root, tmp_path):
    for split in ("train", "val"):
        (coco_root / "annotations" / f"instances_{split}2017.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(PipelineError, match=r"instances_train2017.json: 'categories' is empty"):
        prepare_dataset(config_for("coco", coco_root), tmp_path / "out")


def test_tiny_images_are_bad_input(tmp_path):
    root = write_folder(tmp_path / "data")
    tiny = root / "cat" / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(PipelineError, match=f"image {tiny} is 1x1 px. Expected at least 8 px a side"):
        prepare_dataset(config_for("folder", root), tmp_path / "out")
    summary = prepare_dataset(config_for("folder", root, on_bad_image="skip"), tmp_path / "out")
    assert summary["left_out"][BAD_INPUT] == 1 and "folder-cat/tiny.png" not in manifest_rows(tmp_path / "out")


def test_class_names_that_would_share_a_token_stop_prepare(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "Cat").mkdir()
    Image.new("RGB", (W, H)).save(root / "Cat" / "e.png")
    with pytest.raises(PipelineError, match=r"classes \['Cat', 'cat'\] would all learn the token <cat>"):
        prepare_dataset(config_for("folder", root), tmp_path / "out")


def test_a_symlink_loop_in_the_root_is_listed(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "loop").symlink_to(root / "loop")
    prepare_dataset(config_for("folder", root), tmp_path / "out")
    listed = {i["path"]: i["detail"] for i in read_json(tmp_path / "out" / "stats.json")["left_out"]["images"]}
    assert listed["loop"] == "a symbolic link to nothing (broken, or a loop)"


def test_damaged_and_oversized_images_are_bad_input(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data")
    padded = root / "dog" / "y.jpg"  # large enough that its first half holds all the headers
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(padded)
    data = padded.read_bytes()
    padded.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # decodes, but cut off
    with pytest.raises(PipelineError, match=f"image {padded} is a damaged JPEG"):
        prepare_dataset(config_for("folder", root), tmp_path / "out")
    big = root / "cat" / "big.png"
    Image.new("RGB", (90, 90)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # over the limit, under PIL's own error at twice it
    summary = prepare_dataset(config_for("folder", root, on_bad_image="skip"), tmp_path / "out")
    assert summary["left_out"][BAD_INPUT] == 2
    details = {i["path"]: i["detail"] for i in read_json(tmp_path / "out" / "stats.json")["left_out"]["images"]}
    assert details["cat/big.png"].startswith(f"image {big} is 90x90 = 8100 pixels, over PIL's decompression-bomb limit of 5000")
    assert details["dog/y.jpg"].startswith(f"image {padded} is a damaged JPEG")


def test_the_stage_reads_only_config_keys_its_settings_declare(coco_root, tmp_path):
    reads: set[str] = set()
    prepare_dataset(RecordingConfig(config_for("coco", coco_root), reads), tmp_path / "out")
    assert undeclared_reads(reads, PrepareSettings) == set()


def test_num_classes_draws_a_seeded_set_in_the_datasets_order():
    from pipeline.prepare import draw_classes

    names = [f"class {i}" for i in range(80)]
    drawn = draw_classes(names, 20, seed=0)
    assert len(drawn) == 20 and drawn == [n for n in names if n in drawn]  # the dataset's order
    assert draw_classes(names, 20, seed=0) == drawn and draw_classes(names, 20, seed=1) != drawn
    assert set(drawn) < set(draw_classes(names, 30, seed=0))  # nested: a larger draw keeps the smaller one's classes
    with pytest.raises(PipelineError, match=r"dataset.num_classes: 81 classes asked for, but the dataset keeps 80\. Expected at most 80"):
        draw_classes(names, 81, seed=0)
