"""invert.mode per_class as the workflow runs it: one job per (subset, class), then one merge job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from pipeline import invert as inv
from pipeline.__main__ import main
from pipeline.config import validate_config
from pipeline.io import write_parquet
from pipeline.manifest import manifest_table
from pipeline.tiny_sd import build_tiny_sd
from pipeline.layout import EMBEDDINGS_FILE, LOSS_FILE, TOKENS_FILE
from pipeline.tokens import load_token_file

CLASSES = ["zero", "one", "traffic light"]
SAMPLES_TARGET = "results/invert/samples/k1_seed0.png"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=64, seed=0)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """Two random-noise training images per class in a few-shot subset manifest."""
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for label, name in enumerate(CLASSES):
        for k in range(2):
            pixels = np.random.default_rng(label * 10 + k).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{label}-{k}.png")
            rows.append(dict(image_id=f"img-{label}-{k}", path=f"{label}-{k}.png", split="train", label=label,
                             class_name=name, mask_path=None, width=48, height=40))  # fmt: skip
    path = folder / "subset.parquet"
    write_parquet(path, manifest_table(rows), {"dataset_root": str(folder), "classes": CLASSES, "trial_seed": 0, "examples_per_class": 2})
    return path


def loss_rows(tokens_dir: Path) -> list[list[str]]:
    with (tokens_dir / LOSS_FILE).open(newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.usefixtures("one_thread")
def test_per_class_jobs_merged_equal_one_per_class_job(tiny_model, subset, tmp_path):
    settings = {"mode": "per_class", "steps": 2, "batch_size": 1, "learning_rate": 5e-3, "checkpoint_every": 0}
    config = validate_config({"device": "cpu", "model": {"id": str(tiny_model), "resolution": 64}, "invert": settings})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    one_job = tmp_path / "one-job"
    inv.invert_tokens(config, subset, one_job)

    # The workflow's jobs, through the command line: the last class has new-token ids offset by two
    # classes in the single job, and a name that is no safe path or shell word.
    class_dirs = [tmp_path / "classes" / f"class-{i}" for i in range(len(CLASSES))]
    for name, class_dir in zip(CLASSES, class_dirs):
        argv = ["invert", "--config", str(config_file), "--subset", str(subset), "--class", name, "--out", str(class_dir)]
        assert main(argv) == 0
    merged = tmp_path / "merged"
    assert main(["merge-tokens", "--config", str(config_file), "--tokens", *map(str, class_dirs), "--out", str(merged)]) == 0

    _, expected = load_token_file(one_job)
    _, alone = load_token_file(class_dirs[2])
    assert list(alone) == ["<traffic-light>"] and torch.equal(alone["<traffic-light>"], expected["<traffic-light>"])
    assert loss_rows(class_dirs[2])[1:] == [row for row in loss_rows(one_job) if row[1] == "traffic light"]

    # The merged folder is the single job's folder, file for file: downstream rules cannot tell them apart.
    assert json.loads((merged / TOKENS_FILE).read_text()) == json.loads((one_job / TOKENS_FILE).read_text())
    assert (merged / EMBEDDINGS_FILE).read_bytes() == (one_job / EMBEDDINGS_FILE).read_bytes()
    assert loss_rows(merged) == loss_rows(one_job)
    for token in expected:
        per_class_file = load_file(merged / token.strip("<>") / EMBEDDINGS_FILE)
        assert list(per_class_file) == [token] and torch.equal(per_class_file[token], expected[token])


def per_class_project(project) -> dict:
    config = tiny_config()
    config["invert"]["mode"] = "per_class"
    project.write_config(config)
    return config


def test_per_class_merge_waits_on_the_prepare_checkpoint(project):
    per_class_project(project)
    # Before prepare the class list is unknown: the merge job is planned, its invert jobs not yet.
    jobs = project.planned_jobs("all", SAMPLES_TARGET)
    assert jobs.get("merge_tokens") == 1 and jobs.get("token_samples") == 1 and "invert" not in jobs, jobs


@pytest.mark.slow
def test_per_class_mode_plans_one_invert_job_per_class_once_prepare_ran(project):
    config = per_class_project(project)
    project.snakemake(f"{config['results']}/prepare/classes.json")
    jobs = project.planned_jobs("all", SAMPLES_TARGET)
    assert jobs.get("invert") == len(config["dataset"]["classes"]) and jobs.get("merge_tokens") == 1, jobs
    assert "prepare" not in jobs and jobs.get("token_samples") == 1 and jobs.get("generate") == 2, jobs
