"""Which torch device and dtype a stage runs on, which GPU a job gets on a multi-GPU workstation, and
how many threads torch computes on.

Snakemake's `--resources gpu=4` lets four GPU jobs run at once but assigns no device ids. Each job
therefore claims a free GPU itself: it takes an exclusive `flock` on one lock file per device and
holds it for the life of the process. The kernel releases the lock when the process ends, even on a
crash or kill, so a device is never left claimed by a dead job. Under a cluster scheduler that
already restricts the visible devices (SLURM, or any CUDA_VISIBLE_DEVICES), nothing is claimed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from pipeline import PipelineError
from pipeline.io import try_lock

log = logging.getLogger(__name__)

# Open lock files of the GPUs this process holds: closing one (or exiting) releases the device.
_held_locks: dict[int, object] = {}


def default_lock_dir() -> Path:
    """Per-user folder for GPU lock files; DAFUSION_GPU_LOCK_DIR overrides it (e.g. for a shared lab box)."""
    return Path(os.environ.get("DAFUSION_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"dafusion-gpu-locks-{os.getuid()}")


def claim_gpu(device_count: int, lock_dir: Path | None = None) -> int:
    """Claim the lowest-numbered GPU no other process holds; return its index.

    The claim lasts until `release_gpu(index)` or the end of the process.
    """
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(device_count):
        if index in _held_locks:
            continue
        handle = try_lock(lock_dir / f"gpu-{index}.lock")
        if handle is not None:
            _held_locks[index] = handle
            return index
    raise PipelineError(
        f"all {device_count} GPUs are claimed by other jobs (lock files in {lock_dir}). "
        f"Expected at most {device_count} GPU jobs at once: run snakemake with --resources gpu={device_count} or less"
    )


def release_gpu(index: int) -> None:
    handle = _held_locks.pop(index, None)
    if handle is not None:
        handle.close()


def _scheduler_assigned_devices() -> bool:
    return "CUDA_VISIBLE_DEVICES" in os.environ or "SLURM_JOB_ID" in os.environ


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA if available, else CPU. On a machine with several visible GPUs and no scheduler
    assignment, the process claims a free one (see the module docstring)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: 'cuda' was asked for but torch sees no CUDA device. Expected 'auto' or 'cpu' here.")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1 or _scheduler_assigned_devices():
        return torch.device("cuda", 0)
    if not _held_locks:
        index = claim_gpu(count)
        log.info("claimed GPU %d of %d (%s)", index, count, torch.cuda.get_device_name(index))
    index = min(_held_locks)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 on CPU (half precision on CPU is slow and lossy)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# -- CPU threads -----------------------------------------------------------------------------------
#
# A float sum that torch splits over T threads adds its partial sums in a T-dependent order, so
# convolutions, matmuls and reductions on the CPU round differently at 1 and 2 threads (one pixel
# level in generated images, ~1e-7 in losses and token vectors). Stages that make data therefore
# compute on a fixed count from the config (`cpu_threads`), not on whatever the job was given; the
# job's own count still sizes host-side work that changes no result, such as decoding.

_job_threads: int | None = None


def pin_cpu_threads(count: int) -> None:
    """Compute on exactly `count` torch threads for the rest of the process."""
    global _job_threads
    if _job_threads is None:
        _job_threads = torch.get_num_threads()
    torch.set_num_threads(count)
    if count != _job_threads:
        log.debug("computing on %d CPU thread(s) (config cpu_threads) of the job's %d", count, _job_threads)


def host_threads() -> int:
    """Threads for host-side work that changes no result: the job's count, even when compute is pinned."""
    return _job_threads or torch.get_num_threads()


def cpu_numerics(device: torch.device) -> dict:
    """What, besides the inputs, sets the last bits of results computed on `device`: recorded beside
    them and part of every resume key. Nothing for GPUs, whose kernels no CPU setting changes."""
    if device.type != "cpu":
        return {}
    return {"cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
