"""Few-shot subsets: nested in k, deterministic, independent of row order and of the other draws."""

from __future__ import annotations

import random

import pytest

from pipeline import PipelineError
from pipeline.fewshot import draw_subset
from pipeline.io import read_metadata, read_parquet, write_parquet
from pipeline.manifest import manifest_table

CLASSES = ["ant", "bee", "cow"]
TRAIN_COUNTS = {"ant": 9, "bee": 6, "cow": 2}
METADATA = {"dataset": "folder", "dataset_root": "/data", "mask_root": "/out/masks", "classes": CLASSES}


def manifest_rows():
    rows = []
    for label, class_name in enumerate(CLASSES):
        for split, count in [("train", TRAIN_COUNTS[class_name]), ("val", 3), ("test", 3)]:
            for index in range(count):
                image_id = f"{class_name}-{split}-{index:02d}"
                rows.append({"image_id": image_id, "path": f"{class_name}/{image_id}.jpg", "split": split, "label": label,
                             "class_name": class_name, "mask_path": None, "width": 8, "height": 6})
    return rows


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "manifest.parquet"
    write_parquet(path, manifest_table(manifest_rows()), METADATA)
    return path


def draw(manifest, out_dir, k, trial_seed=0, seed=0, allow_fewer=True):
    out = out_dir / f"k{k}-t{trial_seed}-s{seed}.parquet"
    draw_subset(manifest, k, trial_seed, seed, allow_fewer, out)
    return read_parquet(out).to_pylist()


def ids_by_class(rows):
    chosen = {name: set() for name in CLASSES}
    for row in rows:
        chosen[row["class_name"]].add(row["image_id"])
    return chosen


def test_subsets_are_nested_in_k(manifest, tmp_path):
    previous = {name: set() for name in CLASSES}
    for k in range(1, 10):
        current = ids_by_class(draw(manifest, tmp_path, k))
        for name in CLASSES:
            assert previous[name] <= current[name]
            assert len(current[name]) == min(k, TRAIN_COUNTS[name])
        previous = current


def test_subset_holds_only_train_rows_with_manifest_metadata(manifest, tmp_path):
    out = tmp_path / "subset.parquet"
    summary = draw_subset(manifest, 4, 1, 0, True, out)
    rows = read_parquet(out).to_pylist()
    assert summary == {"examples_per_class": 4, "trial_seed": 1, "images": 10, "per_class": {"ant": 4, "bee": 4, "cow": 2}}
    assert {row["split"] for row in rows} == {"train"}
    assert all(row["image_id"].startswith(f"{row['class_name']}-train-") for row in rows)
    assert read_metadata(out) == {**METADATA, "trial_seed": 1, "examples_per_class": 4}


def test_same_draw_whatever_else_is_asked_and_whatever_the_row_order(manifest, tmp_path):
    alone = draw(manifest, tmp_path / "alone", 3, trial_seed=2)
    for k in (5, 1, 8):
        draw(manifest, tmp_path / "many", k, trial_seed=2)
    after_others = draw(manifest, tmp_path / "many", 3, trial_seed=2)
    assert alone == after_others
    shuffled_rows = manifest_rows()
    random.Random(7).shuffle(shuffled_rows)
    shuffled = tmp_path / "shuffled.parquet"
    write_parquet(shuffled, manifest_table(shuffled_rows), METADATA)
    assert ids_by_class(draw(shuffled, tmp_path / "shuffled", 3, trial_seed=2)) == ids_by_class(alone)


def test_trial_seed_and_seed_change_the_draw_but_not_val_or_test(manifest, tmp_path):
    trial_0, trial_1 = (ids_by_class(draw(manifest, tmp_path, 3, trial_seed=t)) for t in (0, 1))
    other_seed = ids_by_class(draw(manifest, tmp_path, 3, trial_seed=0, seed=1))
    assert trial_0["ant"] != trial_1["ant"] or trial_0["bee"] != trial_1["bee"]
    assert trial_0["ant"] != other_seed["ant"] or trial_0["bee"] != other_seed["bee"]
    # Evaluation rows come from the manifest itself: no trial seed can move an image into or out of them.
    for chosen in (trial_0, trial_1, other_seed):
        assert all("-train-" in image_id for ids in chosen.values() for image_id in ids)


def test_fewer_images_than_k_names_the_class(manifest, tmp_path):
    with pytest.raises(PipelineError, match=r"class 'cow' has 2 training images, fewer than examples_per_class=3"):
        draw_subset(manifest, 3, 0, 0, False, tmp_path / "subset.parquet")
    assert not (tmp_path / "subset.parquet").exists()
    draw_subset(manifest, 2, 0, 0, False, tmp_path / "subset.parquet")
    assert len(read_parquet(tmp_path / "subset.parquet")) == 6


def test_not_a_manifest(tmp_path):
    path = tmp_path / "other.parquet"
    write_parquet(path, manifest_table(manifest_rows()), {"something": 1})
    with pytest.raises(PipelineError, match="not a manifest"):
        draw_subset(path, 1, 0, 0, False, tmp_path / "subset.parquet")
