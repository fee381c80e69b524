"""CIFAR-10 and CIFAR-100 through prepare, on fake datasets pickled exactly as torchvision downloads
them, with labels and pixels checked against torchvision's own dataset objects on the same files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.io import read_parquet
from pipeline.manifest import read_manifest
from pipeline.prepare import prepare_dataset

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4  # images in each fake batch file


def pickle_to(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(value, handle)


def batch(seed, labels, labels_key="labels"):
    pixels = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return {"data": pixels, labels_key: labels, "batch_label": f"batch {seed}"}


def write_cifar10(root):
    base = root / "cifar-10-batches-py"
    pickle_to(base / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": PER_BATCH})
    for i in range(1, 6):  # five train batches: labels cycle so every class has train images
        pickle_to(base / f"data_batch_{i}", batch(i, [(i * PER_BATCH + j) % 10 for j in range(PER_BATCH)]))
    pickle_to(base / "test_batch", batch(0, list(range(10)) * 2))
    return base


def write_cifar100(root):
    base = root / "cifar-100-python"
    names = [f"class_{i}" for i in range(100)]
    pickle_to(base / "meta", {"fine_label_names": names, "coarse_label_names": ["group"]})
    pickle_to(base / "train", batch(1, list(range(100)), "fine_labels") | {"coarse_labels": [0] * 100})
    pickle_to(base / "test", batch(2, list(range(100)) * 2, "fine_labels") | {"coarse_labels": [0] * 200})
    return base


@pytest.fixture
def torchvision_accepts_fake_files(monkeypatch):
    """torchvision checks each file's md5 against the real dataset's; these are fakes."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)


@pytest.mark.parametrize("name, write, reference", [("cifar10", write_cifar10, CIFAR10), ("cifar100", write_cifar100, CIFAR100)])
def test_cifar_labels_and_pixels_match_torchvision(tmp_path, torchvision_accepts_fake_files, name, write, reference):
    write(tmp_path / "data")
    out = tmp_path / "prepared"
    summary = prepare_dataset(validate_config({"seed": 0, "dataset": {"name": name, "root": str(tmp_path / "data")}}), out)
    rows, meta = read_manifest(out / "manifest.parquet")
    assert meta["dataset_root"] == str((out / "images").resolve())  # the PNGs prepare wrote
    by_id = {row["image_id"]: row for row in rows}
    for split, train in (("train", True), ("test", False)):
        tv = reference(str(tmp_path / "data"), train=train, download=False)
        assert len([i for i in by_id if i.startswith(f"{name}-{split}-")]) == len(tv)
        for index in range(len(tv)):
            image, target = tv[index]
            row = by_id[f"{name}-{split}-{index:05d}"]
            assert row["class_name"] == tv.classes[target].replace("_", " ")
            assert row["label"] == target and (row["width"], row["height"]) == (32, 32)
            assert (row["split"] == "train") == train  # the test images are split into val and test
            assert np.array_equal(np.asarray(Image.open(row["path"])), np.asarray(image))
    assert summary["images"]["val"] > 0 and summary["images"]["test"] > 0


def test_cifar100_class_names_have_spaces_for_underscores(tmp_path):
    write_cifar100(tmp_path / "data")
    prepare_dataset(validate_config({"dataset": {"name": "cifar100", "root": str(tmp_path / "data"), "classes": ["class 3", "class 7"]}}), tmp_path / "out")
    table = read_parquet(tmp_path / "out" / "manifest.parquet").to_pydict()
    assert sorted(set(table["class_name"])) == ["class 3", "class 7"]


def test_cifar_errors_name_the_file_and_what_was_expected(tmp_path):
    base = write_cifar10(tmp_path / "data")
    config = validate_config({"dataset": {"name": "cifar10", "root": str(tmp_path / "data")}})
    (base / "test_batch").unlink()
    with pytest.raises(PipelineError, match=r"test_batch does not exist\. Expected the CIFAR python-version layout"):
        prepare_dataset(config, tmp_path / "out")
    pickle_to(base / "test_batch", batch(0, [3, 10]))
    with pytest.raises(PipelineError, match=r"test_batch: labels should be 0\.\.9\. Got 10"):
        prepare_dataset(config, tmp_path / "out")
    (base / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(PipelineError, match=r"test_batch is not a readable CIFAR pickle"):
        prepare_dataset(config, tmp_path / "out")
    pickle_to(base / "test_batch", {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]})
    with pytest.raises(PipelineError, match=r"data should be uint8 of shape \[N, 3072\]\. Got uint8 of shape \(2, 100\)"):
        prepare_dataset(config, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists() and not (tmp_path / "out" / "images").exists()


def test_cifar_missing_dataset_names_the_expected_layout(tmp_path):
    with pytest.raises(PipelineError, match=r"no batches\.meta under .*cifar-10-batches-py"):
        prepare_dataset(validate_config({"dataset": {"name": "cifar10", "root": str(tmp_path)}}), tmp_path / "out")


def test_num_classes_keeps_a_seeded_draw_of_the_classes(tmp_path):
    write_cifar10(tmp_path / "data")
    config = validate_config({"seed": 3, "dataset": {"name": "cifar10", "root": str(tmp_path / "data"), "num_classes": 4}})
    prepare_dataset(config, tmp_path / "out")
    _, meta = read_manifest(tmp_path / "out" / "manifest.parquet")
    table = read_parquet(tmp_path / "out" / "manifest.parquet").to_pydict()
    assert len(meta["classes"]) == 4 and meta["classes"] == [n for n in CIFAR10_NAMES if n in meta["classes"]]
    assert set(table["class_name"]) == set(meta["classes"]) and set(table["label"]) == {0, 1, 2, 3}
