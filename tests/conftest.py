"""Shared test helpers: running the workflow in a scratch copy of the project, with bounded waits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(results: str = "results") -> dict:
    """The smallest config that still runs every stage for real (demo data, tiny SD, two methods)."""
    return {
        "seed": 0,
        "results": results,
        "device": "cpu",
        "dataset": {
            "name": "demo",
            "root": f"{results}/data/demo-coco",
            "demo": {"image_size": 48, "train_images": 40, "val_images": 40, "max_objects": 2},
            "classes": ["zero", "one", "two", "three"],
            "examples_per_class": [1],
            "trial_seeds": [0],
        },
        "model": {"id": f"{results}/models/tiny-sd", "build_tiny": True, "resolution": 64},
        "invert": {"steps": 4, "batch_size": 2, "learning_rate": 5.0e-3},
        "generate": {"methods": ["dafusion"], "num_per_image": 2, "num_inference_steps": 4, "batch_size": 4, "num_shards": 2},
        "fid": {"batch_size": 16},
        "train": {"methods": ["baseline", "dafusion"], "image_size": 64, "steps": 20, "eval_every": 10, "batch_size": 8},
        "report": {"grid_images": 2},
    }


class Project:
    """A scratch copy of the workflow and package, so tests can edit code and config freely."""

    def __init__(self, root: Path):
        self.root = root
        for name in ("workflow", "pipeline"):
            shutil.copytree(REPO / name, root / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))

    def write_config(self, config: dict) -> None:
        (self.root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def snakemake(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        """Run Snakemake in the project; fail with its output if it exits non-zero or exceeds `timeout`."""
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        try:
            proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"snakemake {' '.join(args)} did not finish within {timeout:.0f} s; last output:\n{(exc.stderr or b'')[-3000:]}")
        if check and proc.returncode != 0:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in (self.root / "results" / "logs").rglob("*.log")) if (self.root / "results" / "logs").exists() else ""
            pytest.fail(f"snakemake {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{logs[-6000:]}")
        return proc

    def planned_jobs(self, *args: str) -> dict[str, int]:
        """Rule -> job count that a dry run would execute (empty when there is nothing to do)."""
        proc = self.snakemake("-n", *args)
        output = proc.stdout + proc.stderr
        if "Nothing to be done" in output:
            return {}
        table = output.split("Job stats:", 1)[1]
        counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE))
        counts.pop("total", None)
        return {rule: int(n) for rule, n in counts.items()}


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path / "project")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a shared 2-core CPU, a second torch thread only adds synchronisation waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingConfig(dict):
    """A config that records the dotted path of every key read through it."""

    def __init__(self, data: dict, reads: set, prefix: str = ""):
        super().__init__(data)
        self.reads, self.prefix = reads, prefix

    def __getitem__(self, key):
        path = f"{self.prefix}{key}"
        self.reads.add(path)
        value = super().__getitem__(key)
        return RecordingConfig(value, self.reads, f"{path}.") if isinstance(value, dict) else value

    def get(self, key, default=None):
        return self[key] if key in self else default


def undeclared_reads(reads: set, *settings_classes) -> set:
    """The config keys read (leaves only) that none of the settings classes declares as a field."""
    declared = {path for cls in settings_classes for path in cls.config_keys().values()}
    leaves = {path for path in reads if not any(other.startswith(path + ".") for other in reads)}
    assert leaves, "the stage read no config key at all: the recording did not see its reads"
    # A field may hold a whole section (dataset.demo): reading inside it is declared too.
    return {path for path in leaves if not any(path == d or path.startswith(d + ".") for d in declared)}


class CountedCalls:
    """A stand-in for a function called once per training step: counts the calls and, while
    `kill_at` is set, raises KeyboardInterrupt on that call (a job killed mid-run)."""

    def __init__(self, real, kill_at: int | None = None):
        self.real, self.kill_at, self.calls = real, kill_at, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        return self.real(*args)

    def resume(self) -> None:
        """From now on count afresh and kill nothing (the restarted job)."""
        self.calls, self.kill_at = 0, None
