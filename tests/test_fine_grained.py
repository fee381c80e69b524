"""FGVC Aircraft and Stanford Cars through prepare, on fake datasets laid out as torchvision reads
them, with labels checked against torchvision's own dataset objects on the same files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision.datasets import FGVCAircraft, StanfordCars

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.io import read_json, read_parquet
from pipeline.prepare import prepare_dataset

VARIANTS = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]  # spaces and slashes, as in the real list
AIRCRAFT = {  # split -> (image name, variant)
    "train": [("0034309", "707-320"), ("0056978", "A300B4"), ("1000000", "Cessna 172"), ("1000001", "F-16A/B"), ("1000002", "F-16A/B")],
    "val": [("0062765", "A300B4"), ("2000000", "Cessna 172")],
    "test": [("1514522", "707-320"), ("3000000", "F-16A/B")],
}
CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]


def config_for(name, root, **dataset):
    return validate_config({"seed": 0, "dataset": {"name": name, "root": str(root), **dataset}})


def write_image(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (shade, 90, 255 - shade)).save(path, quality=95)


def write_aircraft(root, splits=AIRCRAFT):
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in VARIANTS))
    for split, items in splits.items():
        (data / f"images_variant_{split}.txt").write_text("".join(f"{name} {variant}\n" for name, variant in items))
        for i, (name, _) in enumerate(items):
            write_image(data / "images" / f"{name}.jpg", 20 * i)
    # The real archive also lists train + val together (torchvision's default split reads it; prepare does not).
    (data / "images_variant_trainval.txt").write_text("".join(f"{n} {v}\n" for split in ("train", "val") for n, v in splits[split]))
    return data


def test_fgvc_aircraft_official_splits_and_labels_match_torchvision(tmp_path):
    write_aircraft(tmp_path / "data")
    out = tmp_path / "out"
    prepare_dataset(config_for("fgvc_aircraft", tmp_path / "data"), out)
    assert read_json(out / "classes.json") == VARIANTS
    rows = {row["path"]: row for row in read_parquet(out / "manifest.parquet").to_pylist()}
    for split in ("train", "val", "test"):
        reference = FGVCAircraft(str(tmp_path / "data"), split=split, loader=lambda path: path)
        assert len(reference) == len(AIRCRAFT[split])
        for path, label in reference:
            row = rows[path.removeprefix(str(tmp_path / "data") + "/")]
            assert (row["split"], row["label"], row["class_name"]) == (split, label, VARIANTS[label])
    assert rows["fgvc-aircraft-2013b/data/images/1000001.jpg"]["image_id"] == "fgvc-aircraft-1000001"


@pytest.mark.parametrize(
    "splits, message",
    [
        ({**AIRCRAFT, "val": [("0062765", "A380")]}, r"images_variant_val\.txt, line 1: '0062765 A380'\. Expected '<image name> <variant>' with a variant of variants\.txt"),
        ({**AIRCRAFT, "test": [("0034309", "707-320")]}, r"images_variant_test\.txt, line 1: image 0034309 is also in the train split"),
    ],
    ids=["unknown variant", "image in two splits"],
)
def test_fgvc_aircraft_bad_listing_names_the_file_and_line(tmp_path, splits, message):
    write_aircraft(tmp_path / "data", splits)
    with pytest.raises(PipelineError, match=message):
        prepare_dataset(config_for("fgvc_aircraft", tmp_path / "data"), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_fgvc_aircraft_missing_image_stops_prepare_naming_it(tmp_path):
    data = write_aircraft(tmp_path / "data")
    (data / "images" / "2000000.jpg").unlink()
    with pytest.raises(PipelineError, match="2000000.jpg"):
        prepare_dataset(config_for("fgvc_aircraft", tmp_path / "data"), tmp_path / "out")


def annotations(items):
    """A struct array as the devkit stores it (torchvision reads fname and class)."""
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    return np.array([(1, 1, 10, 8, label, fname) for fname, label in items], dtype=dtype)


# Every class has train images (prepare refuses a class without); the test images are held out.
CARS_TRAIN = [(f"{i:05d}.jpg", label) for i, label in enumerate([1, 2, 3, 1, 2, 3, 3], start=1)]
CARS_TEST = [(f"{i:05d}.jpg", label) for i, label in enumerate([1, 1, 2, 2, 3, 3], start=1)]


def write_cars(root, train=CARS_TRAIN, test=CARS_TEST):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS], dtype=object)})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annotations(train)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations(test)})
    for folder, items in (("cars_train", train), ("cars_test", test)):
        for i, (fname, _) in enumerate(items):
            write_image(base / folder / fname, 30 * i)
    return base


def test_stanford_cars_labels_match_torchvision_and_the_test_images_are_held_out(tmp_path):
    write_cars(tmp_path / "data")
    out = tmp_path / "out"
    prepare_dataset(config_for("stanford_cars", tmp_path / "data", test_fraction=0.5), out)
    assert read_json(out / "classes.json") == CARS
    rows = {row["path"]: row for row in read_parquet(out / "manifest.parquet").to_pylist()}
    for split, ours in (("train", {"train"}), ("test", {"val", "test"})):
        reference = StanfordCars(str(tmp_path / "data"), split=split, loader=lambda path: path)
        assert len(reference) == {"train": len(CARS_TRAIN), "test": len(CARS_TEST)}[split]
        for path, label in reference:
            row = rows[path.removeprefix(str(tmp_path / "data") + "/")]
            assert row["split"] in ours and (row["label"], row["class_name"]) == (label, CARS[label])
    held_out = [row for row in rows.values() if row["split"] != "train"]
    assert sorted(row["split"] for row in held_out) == ["test"] * 3 + ["val"] * 3  # one of each class's two
    assert rows["stanford_cars/cars_test/00003.jpg"]["image_id"] == "stanford-cars-test-00003"


def test_stanford_cars_class_out_of_range_is_named(tmp_path):
    write_cars(tmp_path / "data", test=[*CARS_TEST, ("00007.jpg", 4)])
    with pytest.raises(PipelineError, match=r"cars_test_annos_withlabels\.mat: image 00007\.jpg has class 4\. Expected 1\.\.3"):
        prepare_dataset(config_for("stanford_cars", tmp_path / "data"), tmp_path / "out")


def test_stanford_cars_missing_devkit_names_the_layout(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(PipelineError, match=r"no devkit/cars_meta\.mat under .*stanford_cars"):
        prepare_dataset(config_for("stanford_cars", tmp_path / "data"), tmp_path / "out")


def test_fgvc_aircraft_download_of_a_present_dataset_only_writes_the_marker(tmp_path):
    import json

    from pipeline.download import download_dataset

    write_aircraft(tmp_path / "data")
    marker = download_dataset("fgvc_aircraft", tmp_path / "data")
    assert json.loads(marker.read_text())["extracted"] == ["fgvc-aircraft-2013b"]
    with pytest.raises(PipelineError, match="'stanford_cars' has no download"):
        download_dataset("stanford_cars", tmp_path / "cars")
