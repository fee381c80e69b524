"""The workflow end to end: a real run of every stage on a tiny config, and caching users can trust."""

from __future__ import annotations

import csv
import json
import zipfile

import pytest
import yaml
from PIL import Image

from conftest import tiny_config


@pytest.mark.parametrize(
    "key, value",
    [("guidance_scal", 3.0), ("num_shards", "two")],
    ids=["misspelt key", "wrong type"],
)
def test_config_error_names_the_key(project, key, value):
    config = tiny_config()
    config["generate"][key] = value
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    assert proc.returncode != 0
    # One line naming the key, as from the command line, not Snakemake's dump of the whole schema.
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and key in errors[0], proc.stderr
    assert len((proc.stdout + proc.stderr).splitlines()) < 10, proc.stderr


def test_missing_dataset_root_stops_before_any_job(project):
    config = tiny_config()
    config["dataset"].update(name="coco", root="/nonexistent/coco")
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    assert proc.returncode != 0
    assert "dataset.root" in proc.stdout + proc.stderr and "/nonexistent/coco" in proc.stdout + proc.stderr


def test_unknown_train_method_is_a_config_error(project):
    config = tiny_config()
    config["train"]["methods"] = ["baseline", "dafusoin"]
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    assert proc.returncode != 0
    assert "dafusoin" in proc.stdout + proc.stderr


def test_dry_run_plans_every_stage(project):
    project.write_config(tiny_config())
    jobs = project.planned_jobs()
    assert jobs["generate"] == 2  # num_shards shard jobs for the one subset and method
    assert jobs["train"] == 2  # baseline + dafusion
    for rule in ("build_tiny_model", "build_demo_dataset", "prepare", "fewshot", "invert", "fid_real_features", "fid", "report"):
        assert jobs.get(rule, 0) >= 1, rule


def write_class_folders(root, per_class=6):
    for index, class_name in enumerate(["cat", "dog"]):
        (root / class_name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * index, 10 * i, 0)).save(root / class_name / f"{i}.png")


@pytest.mark.slow
def test_dataset_contents_are_part_of_prepares_key(project):
    config = tiny_config()
    config["dataset"].update(name="folder", root="data", classes=None)
    project.write_config(config)
    data = project.root / "data"
    write_class_folders(data)
    subset = "results/subsets/k1_seed0.parquet"
    project.snakemake(subset)
    assert project.planned_jobs(subset) == {}
    rerun = {"prepare": 1, "fewshot": 1}

    # A file outside the dataset, and one the reader never looks at (hidden), change nothing.
    (project.root / "notes.txt").write_text("unrelated")
    (data / "cat" / ".thumbs").write_text("hidden")
    assert project.planned_jobs(subset) == {}

    added = data / "dog" / "new.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(added)
    assert project.planned_jobs(subset) == rerun
    added.unlink()
    assert project.planned_jobs(subset) == {}  # back to the listing prepare ran on

    (data / "cat" / "0.png").unlink()
    assert project.planned_jobs(subset) == rerun
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "cat" / "0.png")  # replaced: same name, another file
    assert project.planned_jobs(subset) == rerun


@pytest.mark.slow
def test_end_to_end_run_and_cache(project):
    config = tiny_config()
    project.write_config(config)
    project.snakemake()
    results = project.root / "results"

    with open(results / "report" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["method"] for r in rows) == ["baseline", "dafusion"]
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert row["split"] == "test"
        assert int(row["examples_per_class"]) == 1
    page = (results / "report" / "index.html").read_text()
    assert "data:image/png;base64," in page and "baseline" in page and "dafusion" in page
    fid = json.loads((results / "fid" / "dafusion" / "k1_seed0.json").read_text())
    assert fid["n_synthetic"] == 4 * 1 * 2  # classes x k x num_per_image
    assert fid["fid"] >= 0

    # A second run has nothing to do.
    assert project.planned_jobs() == {}

    # Snakemake's own report embeds our page.
    project.snakemake("--report", "snakemake-report.zip")
    with zipfile.ZipFile(project.root / "snakemake-report.zip") as archive:
        names = archive.namelist()
    assert any(n.endswith("/index.html") for n in names) and any(n.endswith("/summary.csv") for n in names), names

    # Changing a generation parameter reruns generation and what depends on it, not prepare or invert.
    config["generate"]["guidance_scale"] = 3.0
    project.write_config(config)
    jobs = project.planned_jobs()
    assert jobs.get("generate") == 2 and jobs.get("fid") == 1 and jobs.get("report") == 1
    assert jobs.get("train") == 1  # only the method that uses synthetic images
    for rule in ("prepare", "fewshot", "invert", "build_tiny_model", "build_demo_dataset"):
        assert rule not in jobs, jobs

    # Changing the batch size changes no image, so it reruns nothing.
    config["generate"]["guidance_scale"] = 7.5
    config["generate"]["batch_size"] = 1
    project.write_config(config)
    assert project.planned_jobs() == {}

    # Editing a pipeline module reruns the stages that import it.
    generate_py = project.root / "pipeline" / "generate.py"
    generate_py.write_text(generate_py.read_text() + "\n# an edit\n")
    jobs = project.planned_jobs()
    assert jobs.get("generate") == 2 and "invert" not in jobs and "prepare" not in jobs, jobs
    train_py = project.root / "pipeline" / "train.py"
    train_py.write_text(train_py.read_text() + "\n# an edit\n")
    assert project.planned_jobs().get("train") == 2
