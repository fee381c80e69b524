"""The stages that make data give the same bytes whatever threads their job is given.

Unpinned, on this project's 2-core machines, the demo model generated other bytes for 3 of 8 images
on 1 and on 2 torch threads, and both tests below fail: the token vectors and the training loss of
step 4 (0.8980045 against 0.8980048) differ. Float sums split over threads round differently, so
the CLI pins torch to the config's `cpu_threads`; these tests run each stage as a job given 1 and
2 threads would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import device as device_module
from pipeline.__main__ import main
from pipeline.config import validate_config
from pipeline.io import read_metadata
from pipeline.layout import EMBEDDINGS_FILE, TOKENS_FILE
from test_generate import write_subset
from test_train import write_digits, write_shard
from test_train import make_config as train_config

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo-sd"


@pytest.fixture
def fresh_process(monkeypatch):
    """Each `main` call below starts as a new process would: torch at the job's threads, nothing pinned."""
    monkeypatch.setattr(device_module, "_job_threads", None)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_as_job(threads: int, argv: list[str]) -> None:
    torch.set_num_threads(threads)  # what OMP_NUM_THREADS from Snakemake, or a bigger machine, gives
    device_module._job_threads = None
    assert main(argv) == 0


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_pinning_keeps_the_jobs_threads_for_host_work(fresh_process):
    torch.set_num_threads(2)
    device_module.pin_cpu_threads(1)
    assert torch.get_num_threads() == 1
    assert device_module.host_threads() == 2
    assert device_module.cpu_numerics(torch.device("cpu")) == {"cpu_threads": 1, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    assert device_module.cpu_numerics(torch.device("cuda", 0)) == {}


def test_generate_and_invert_give_the_same_bytes_on_one_and_two_threads(tmp_path, fresh_process):
    subset = write_subset(tmp_path, with_masks=False)
    config = write_config(tmp_path / "config.yaml", validate_config({
        "device": "cpu",
        "model": {"id": str(DEMO_MODEL), "resolution": 64},
        "invert": {"steps": 2, "batch_size": 2},
        "generate": {"num_per_image": 1, "num_inference_steps": 4, "batch_size": 4},
    }))
    for threads in (1, 2):
        run_as_job(threads, ["invert", "--config", str(config), "--subset", str(subset), "--out", str(tmp_path / f"tokens-{threads}")])
        run_as_job(threads, ["generate", "--config", str(config), "--subset", str(subset), "--tokens", str(tmp_path / f"tokens-{threads}"),
                             "--method", "dafusion", "--out", str(tmp_path / f"shard-{threads}.parquet")])

    one, two = load_file(tmp_path / "tokens-1" / EMBEDDINGS_FILE), load_file(tmp_path / "tokens-2" / EMBEDDINGS_FILE)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    recorded = json.loads((tmp_path / "tokens-1" / TOKENS_FILE).read_text())
    assert recorded["cpu_threads"] == 1 and recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    first, second = pq.read_table(tmp_path / "shard-1.parquet"), pq.read_table(tmp_path / "shard-2.parquet")
    assert first.equals(second)
    metadata = read_metadata(tmp_path / "shard-1.parquet")
    assert metadata["cpu_threads"] == 1 and metadata == read_metadata(tmp_path / "shard-2.parquet")


def test_train_gives_the_same_result_on_one_and_two_threads(tmp_path, fresh_process):
    subset, manifest, rows = write_digits(tmp_path, [0, 1, 7], {"train": 2, "val": 3, "test": 3}, k=2)
    shard = write_shard(tmp_path / "shard-0.parquet", rows, per_image=2)
    config = write_config(tmp_path / "config.yaml", train_config(steps=4, eval_every=2))
    results = []
    for threads in (1, 2):
        out = tmp_path / f"metrics-{threads}.json"
        run_as_job(threads, ["train", "--config", str(config), "--subset", str(subset), "--manifest", str(manifest),
                             "--synthetic", str(shard), "--method", "dafusion", "--seed", "0", "--out", str(out)])
        result = json.loads(out.read_text())
        result.pop("seconds")
        results.append(result)
    assert results[0] == results[1]
    assert results[0]["cpu_threads"] == 1
