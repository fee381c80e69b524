"""Caltech-101 and Flowers-102 through prepare, on fake datasets laid out exactly as torchvision
downloads them, with labels checked against torchvision's own dataset objects on the same files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.flowers102 as tv_flowers
from PIL import Image
from torchvision.datasets import Caltech101, Flowers102

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.datasets import BAD_INPUT, NOT_AN_IMAGE
from pipeline.datasets.torchvision_sets import FLOWERS_CLASSES, caltech_class_name
from pipeline.download import download_dataset
from pipeline.io import read_json, read_parquet
from pipeline.prepare import prepare_dataset

W, H = 12, 10


def config_for(name, root, **dataset):
    return validate_config({"seed": 0, "dataset": {"name": name, "root": str(root), **dataset}})


def manifest_rows(out_dir):
    """Rows as stored: paths relative to the dataset root, mask paths relative to out_dir/masks."""
    return {row["image_id"]: row for row in read_parquet(out_dir / "manifest.parquet").to_pylist()}


def write_jpg(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (shade, 255 - shade, 90)).save(path, quality=95)


# --- Caltech-101 --------------------------------------------------------------------------------

# category folder -> images; annotation folders follow torchvision's name map (Faces_easy -> Faces_3).
CALTECH = {"BACKGROUND_Google": 2, "Faces_easy": 3, "accordion": 4, "car_side": 3}
ANNOTATION_FOLDER = {"Faces_easy": "Faces_3", "accordion": "accordion", "car_side": "car_side"}
# The outline of every annotation: a rectangle, its points relative to the box at (top 3, left 2),
# in MATLAB's 1-based pixel coordinates: x 1..6 + left 2 and y 1..4 + top 3 are 1-based columns
# 3..8 and rows 4..7, so 0-based columns 2..7 and rows 3..6 are filled.
BOX = np.array([[3.0, 8.0, 2.0, 9.0]])  # top, bottom, left, right
CONTOUR = np.array([[1.0, 6.0, 6.0, 1.0], [1.0, 1.0, 4.0, 4.0]])  # x row, y row
EXPECTED_MASK = np.zeros((H, W), dtype=bool)
EXPECTED_MASK[3:7, 2:8] = True


def write_caltech(root, annotations=True):
    base = root / "caltech101"
    for shade, (category, count) in enumerate(CALTECH.items()):
        for number in range(1, count + 1):
            write_jpg(base / "101_ObjectCategories" / category / f"image_{number:04d}.jpg", 20 * shade + number)
            if annotations and category in ANNOTATION_FOLDER:
                path = base / "Annotations" / ANNOTATION_FOLDER[category] / f"annotation_{number:04d}.mat"
                path.parent.mkdir(parents=True, exist_ok=True)
                scipy.io.savemat(path, {"box_coord": BOX, "obj_contour": CONTOUR})
    return base


def test_caltech101_labels_paths_and_masks_match_torchvision(tmp_path):
    base = write_caltech(tmp_path / "data")
    out = tmp_path / "out"
    summary = prepare_dataset(config_for("caltech101", tmp_path / "data"), out)
    rows = manifest_rows(out)

    reference = Caltech101(str(tmp_path / "data"), target_type=["category", "annotation"])
    assert read_json(out / "classes.json") == [caltech_class_name(c) for c in reference.categories]
    assert read_json(out / "classes.json") == ["faces easy", "accordion", "car side"]  # torchvision order, no background
    by_path = {row["path"]: row for row in rows.values()}
    assert len(by_path) == len(reference) == 10
    for i in range(len(reference)):
        category = reference.categories[reference.y[i]]
        row = by_path[f"caltech101/101_ObjectCategories/{category}/image_{reference.index[i]:04d}.jpg"]
        assert row["label"] == reference[i][1][0]
        assert row["class_name"] == caltech_class_name(category)
        assert (row["width"], row["height"]) == (W, H)
        mask = np.asarray(Image.open(out / "masks" / row["mask_path"])).astype(bool)
        assert np.array_equal(mask, EXPECTED_MASK)
        # torchvision's outline for this image is the one the mask was drawn from
        assert np.array_equal(reference[i][1][1], CONTOUR)
    assert not any("BACKGROUND" in image_id for image_id in rows)
    # no official split: floor(n / 2) of each class's n images are held out (holdout_fraction 0.5)
    assert sum(summary["images"].values()) == 10 and summary["images"]["train"] == (3 - 1) + (4 - 2) + (3 - 1)
    assert (base / "101_ObjectCategories").is_dir()


def test_caltech101_without_annotations_has_null_masks_and_dataset_root_may_be_the_folder(tmp_path):
    base = write_caltech(tmp_path / "data", annotations=False)
    (base / "101_ObjectCategories" / "accordion" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    prepare_dataset(config_for("caltech101", base, classes=["car side", "accordion"]), out)
    rows = manifest_rows(out)
    assert {row["class_name"] for row in rows.values()} == {"car side", "accordion"}
    assert all(row["mask_path"] is None for row in rows.values())
    assert {(row["class_name"], row["label"]) for row in rows.values()} == {("car side", 0), ("accordion", 1)}
    assert rows["caltech101-accordion-image_0001"]["path"] == "101_ObjectCategories/accordion/image_0001.jpg"
    stats = read_json(out / "stats.json")
    assert [(i["path"], i["reason"]) for i in stats["left_out"]["images"] if i["reason"] == NOT_AN_IMAGE] == [
        ("101_ObjectCategories/accordion/notes.txt", NOT_AN_IMAGE)
    ]


def test_caltech101_bad_annotation_stops_or_is_skipped(tmp_path):
    base = write_caltech(tmp_path / "data")
    bad = base / "Annotations" / "accordion" / "annotation_0002.mat"
    scipy.io.savemat(bad, {"box_coord": BOX})  # no outline
    with pytest.raises(PipelineError, match=r"annotation_0002.mat: expected box_coord .* obj_contour"):
        prepare_dataset(config_for("caltech101", tmp_path / "data"), tmp_path / "out")
    prepare_dataset(config_for("caltech101", tmp_path / "data", on_bad_image="skip"), tmp_path / "out2")
    stats = read_json(tmp_path / "out2" / "stats.json")
    assert [(i["image_id"], i["reason"]) for i in stats["left_out"]["images"]] == [("caltech101-accordion-image_0002", BAD_INPUT)]


def test_caltech101_missing_dataset_names_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no 101_ObjectCategories under .*dataset.download: true"):
        prepare_dataset(config_for("caltech101", tmp_path / "empty"), tmp_path / "out")


# --- Flowers-102 --------------------------------------------------------------------------------

# image number -> label (1-based, as in imagelabels.mat); 60 is "pink-yellow dahlia"
# Images 13 to 114: one more train image of every class (prepare refuses a class without train images).
EVERY_CLASS = list(range(1, 103))
FLOWER_LABELS = [1, 5, 102, 60, 1, 5, 102, 60, 1, 5, 102, 60] + EVERY_CLASS
SETID = {"trnid": [1, 2, 3, 4] + list(range(13, 13 + len(EVERY_CLASS))), "valid": [5, 6, 7, 8], "tstid": [9, 10, 11, 12]}
SPLIT_SIZES = {"train": 4 + len(EVERY_CLASS), "val": 4, "test": 4}


def write_flowers(root, labels=FLOWER_LABELS, setid=SETID):
    base = root / "flowers-102"
    for number in range(1, len(labels) + 1):
        write_jpg(base / "jpg" / f"image_{number:05d}.jpg", 10 * number)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(base / "setid.mat", {key: np.array([ids], dtype=np.uint16) for key, ids in setid.items()})
    return base


@pytest.fixture
def torchvision_accepts_fake_files(monkeypatch):
    """torchvision checks the real files' md5; the fake ones only need to exist."""
    monkeypatch.setattr(tv_flowers, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_flowers102_official_splits_and_labels_match_torchvision(tmp_path, torchvision_accepts_fake_files):
    write_flowers(tmp_path / "data")
    out = tmp_path / "out"
    summary = prepare_dataset(config_for("flowers102", tmp_path / "data"), out)
    rows = manifest_rows(out)
    assert read_json(out / "classes.json") == list(FLOWERS_CLASSES) and len(FLOWERS_CLASSES) == 102
    assert summary["images"] == SPLIT_SIZES

    by_path = {row["path"]: row for row in rows.values()}
    for split in ("train", "val", "test"):
        reference = Flowers102(str(tmp_path / "data"), split=split, loader=lambda path: path)
        assert len(reference) == SPLIT_SIZES[split]
        for path, label in reference:
            row = by_path[f"flowers-102/jpg/{path.name}"]
            assert (row["split"], row["label"]) == (split, label)
            assert row["class_name"] == FLOWERS_CLASSES[label] and row["mask_path"] is None
            assert (row["width"], row["height"]) == (W, H)
    assert rows["flowers102-00004"]["class_name"] == "pink-yellow dahlia"


def test_flowers102_class_names_agree_with_torchvision_where_it_has_them():
    names = getattr(Flowers102, "classes", None)
    if names is None:
        pytest.skip("this torchvision has no Flowers102.classes")
    differing = [(ours, theirs) for ours, theirs in zip(FLOWERS_CLASSES, names) if ours != theirs]
    assert len(names) == 102 and differing == [("pink-yellow dahlia", "pink-yellow dahlia?")]


def test_flowers102_image_in_two_splits_is_an_error(tmp_path):
    write_flowers(tmp_path / "data", setid={**SETID, "tstid": [4, 9, 10, 11, 12]})
    with pytest.raises(PipelineError, match="setid.mat: image 4 is in both train and test"):
        prepare_dataset(config_for("flowers102", tmp_path / "data"), tmp_path / "out")


def test_flowers102_label_out_of_range_is_an_error(tmp_path):
    write_flowers(tmp_path / "data", labels=[*FLOWER_LABELS[:-1], 103])
    with pytest.raises(PipelineError, match=r"imagelabels.mat: labels should be 1..102. Got values from 1 to 103"):
        prepare_dataset(config_for("flowers102", tmp_path / "data"), tmp_path / "out")


def test_flowers102_image_in_no_split_is_listed_as_left_out(tmp_path):
    write_flowers(tmp_path / "data", setid={**SETID, "tstid": [9, 10, 11]})
    prepare_dataset(config_for("flowers102", tmp_path / "data" / "flowers-102"), tmp_path / "out")
    stats = read_json(tmp_path / "out" / "stats.json")
    assert [(i["image_id"], i["path"]) for i in stats["left_out"]["images"]] == [("flowers102-00012", "jpg/image_00012.jpg")]
    assert "flowers102-00012" not in manifest_rows(tmp_path / "out")


def test_flowers102_download_of_a_present_dataset_only_writes_the_marker(tmp_path, torchvision_accepts_fake_files):
    write_flowers(tmp_path / "data")
    marker = download_dataset("flowers102", tmp_path / "data")
    assert json.loads(marker.read_text())["extracted"] == ["flowers-102"]
