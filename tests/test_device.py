"""The multi-GPU workstation allocator, tested without GPUs: it only needs lock files."""

import subprocess
import sys
import time

import pytest
import torch

from pipeline import PipelineError
from pipeline.device import claim_gpu, release_gpu, resolve_device, resolve_dtype


def test_each_claim_gets_a_different_free_device(tmp_path):
    first = claim_gpu(2, tmp_path)
    try:
        # Another process sees device `first` as taken and gets the other one.
        other = subprocess.run(
            [sys.executable, "-c", f"from pipeline.device import claim_gpu; print(claim_gpu(2, {str(tmp_path)!r}))"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        assert {first, int(other.stdout)} == {0, 1}
        second = claim_gpu(2, tmp_path)
        assert second != first
        with pytest.raises(PipelineError, match="all 2 GPUs are claimed"):
            claim_gpu(2, tmp_path)
        release_gpu(second)
        assert claim_gpu(2, tmp_path) == second
    finally:
        for index in (0, 1):
            release_gpu(index)


def test_a_killed_job_frees_its_device(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from pipeline.device import claim_gpu; print(claim_gpu(1, {str(tmp_path)!r}), flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "0"  # bounded: the child prints at once or dies
        with pytest.raises(PipelineError):
            claim_gpu(1, tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert claim_gpu(1, tmp_path) == 0
            break
        except PipelineError:
            if time.monotonic() > deadline:
                pytest.fail("the lock of a killed process was not released within 10 s")
            time.sleep(0.1)
    release_gpu(0)


def test_cpu_resolution_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(PipelineError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
