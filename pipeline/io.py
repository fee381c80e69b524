"""Atomic outputs, one writer per output, Parquet with key-value metadata, PNG bytes, and image
decoding on threads.

Every output is written to a temporary name beside its final path and renamed into place only when
complete, so a crashed or killed job never leaves a file that looks finished. A stage that resumes
from work flushed beside its output holds `output_lock` for its whole life, so that no second
process (an orphan of a lost Snakemake controller, a second command with the same --out) adopts
or deletes that work while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import socket
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline import PipelineError

Item, Result = TypeVar("Item"), TypeVar("Result")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    Works for files and for folders (the block creates whichever it wants at the yielded path).
    On failure the temporary is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary output for {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def try_lock(path: str | Path) -> IO[str] | None:
    """Take an exclusive advisory lock on the file `path` (created if missing) without waiting.

    Returns the open file, which holds the lock until it is closed or the process ends (the kernel
    releases it on any exit, kill -9 included), with this process's pid and host written into it for
    whoever finds it taken; None when another open file holds it. The file is never deleted:
    unlinking a lock file lets a process that opened the old file and one that creates a new one
    both "hold" it.

    This relies on flock(2) being coherent for everyone who can reach the file: always on a local
    disk; across machines (a SLURM job on another node) only where the shared filesystem forwards
    flock to a lock manager (NFSv4, NFSv3 with lockd, Lustre mounted with -o flock, GPFS). On a mount
    without that (NFS with nolock, Lustre's default localflock) each node only sees its own locks.
    """
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as exc:
        handle.close()
        raise PipelineError(f"cannot lock {path}: {exc}. Expected a filesystem that supports flock(2).") from None
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    handle.flush()
    return handle


def lock_holder(path: str | Path) -> str:
    """Who holds the lock file `path`, as `try_lock` recorded it: "pid 123 on host node7"."""
    try:
        holder = json.loads(Path(path).read_text())
        return f"pid {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded its pid"  # it locked the file and is writing it now


def lock_path_for(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".lock")


@contextlib.contextmanager
def output_lock(out_path: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock on `<out_path>.lock` for the block; yield the lock file's path.

    Fails at once, naming the lock file and its holder, when another process holds it: two writers
    of one output would resume from, and delete, each other's flushed work.
    """
    lock_path = lock_path_for(out_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = try_lock(lock_path)
    if handle is None:
        raise PipelineError(
            f"{lock_path} is held by {lock_holder(lock_path)}: another process is writing {out_path}. "
            "Expected one writer per output: wait for that process to end (or stop it), then rerun."
        )
    with handle:
        yield lock_path


def write_json(path: str | Path, value) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON: {exc}") from None


def write_parquet(path: str | Path, table: pa.Table, metadata: dict | None = None) -> None:
    """Write `table` atomically; `metadata` values are stored as JSON under their keys."""
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({k.encode(): json.dumps(v, default=_json_default).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path} is not a readable Parquet file: {exc}") from None


def read_metadata(path: str | Path) -> dict:
    """The key-value metadata written by `write_parquet`, decoded from JSON."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    raw = pq.read_schema(path).metadata or {}
    out = {}
    for key, value in raw.items():
        key = key.decode()
        if key == "ARROW:schema":
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value.decode(errors="replace")
    return out


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Decode encoded image bytes to RGB; `what` names the source in the error message."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"{what}: cannot decode image bytes ({exc})") from None
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB with an error that names the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise PipelineError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"image {path} is truncated or not an image ({exc})") from None


@contextlib.contextmanager
def threaded_map(fn: Callable[[Item], Result], items: Iterable[Item], threads: int, ahead: int) -> Iterator[Iterator[Result]]:
    """`map(fn, items)` in order, computed by `threads` threads at most `ahead` items before the
    consumer, so that decoding the next images overlaps the caller's work on the current ones.

    For host-side image work: PIL's decoders and resizers and zlib release the GIL, so the threads
    run in parallel (a 512 px PNG takes about 8 ms to decode and resize on one core, too slow
    to feed a GPU from one thread). An error in `fn` is raised, unchanged, where the consumer
    reaches that item. Leaving the context cancels what has not started and waits for the rest.
    """
    if threads < 1 or ahead < 1:
        raise ValueError(f"threaded_map needs threads >= 1 and ahead >= 1. Got threads={threads}, ahead={ahead}")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def results() -> Iterator[Result]:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of `size` items, the last one shorter when they do not divide evenly."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
