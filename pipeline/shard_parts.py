"""A shard job's finished batches on disk while it runs, so that a killed job resumes where it stopped.

Finished batches are flushed every `flush_every` batches as Parquet files in a folder beside the
output (`<out>.partial/`, with the job's resume key in run.json: its provenance, whose config hash
is that of the stage settings' key, blind to batch size and flush interval). A restarted job with
the same key skips the images that are there (whatever batch size made them); at the end the stage
merges all parts into the output atomically (after `check_complete`) and removes the folder. Only
the holder of the output's lock (pipeline.io.output_lock) touches the folder.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from pipeline import PipelineError
from pipeline.io import read_json, read_parquet, write_json, write_parquet
from pipeline.manifest import SHARD_SCHEMA

log = logging.getLogger(__name__)


def partial_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".partial")


def load_partial(folder: Path, resume_key: dict) -> list[pa.Table]:
    """Tables flushed by an earlier attempt of this very job; a stale folder is discarded."""
    run_file = folder / "run.json"
    if folder.is_dir() and run_file.is_file() and read_json(run_file) == resume_key:
        return [read_parquet(part) for part in sorted(folder.glob("part-*.parquet"))]
    if folder.exists():
        log.warning("discarding %s: it was written by a different run", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json(run_file, resume_key)
    return []


def check_complete(table: pa.Table, expected: set[str], out_path: Path, folder: Path) -> None:
    """Refuse a merge whose synthetic_ids are not exactly `expected`, each once."""
    ids = table.column("synthetic_id").to_pylist()
    duplicates = sorted(sid for sid, n in Counter(ids).items() if n > 1)
    missing, unplanned = sorted(expected - set(ids)), sorted(set(ids) - expected)
    if duplicates or missing or unplanned:
        raise PipelineError(
            f"{folder}: the flushed parts do not make up {out_path}. Expected each of the shard's "
            f"{len(expected)} planned images (less skipped sources) once; got {len(missing)} missing "
            f"{missing[:3]}, {len(unplanned)} unplanned {unplanned[:3]}, {len(duplicates)} duplicated "
            f"{duplicates[:3]}. Nothing was written; delete the folder and rerun."
        )


class BackgroundParts:
    """Encodes finished batches to rows and writes them as numbered part files, on one background
    thread, in the order given, while the caller's thread goes on with the next batch.

    PNG encoding takes about 30 ms per 512 px image on one CPU core (zlib, which releases the GIL),
    about what a fast GPU spends denoising it: done inline, the GPU would idle while the host
    encodes. At most `max_jobs` jobs wait, so finished images do not pile up in memory when the
    host is the slower side. After a job fails no other job runs, and the caller's next `add` or
    `flush` raises its error. Used as a context: leaving it waits for the jobs, so the parts
    submitted before an error in the caller are still written (a restarted job resumes after them).
    """

    def __init__(self, folder: Path, first_part: int, max_jobs: int = 3):
        self.folder, self.part, self.max_jobs = folder, first_part, max_jobs
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-rows")
        self.jobs: deque[Future] = deque()
        self.batches: list[Future] = []  # encoded rows of the part being filled
        self.error: BaseException | None = None  # of the first job that failed

    def add(self, encode: Callable[[], list[dict]]) -> None:
        self.batches.append(self._submit(encode))

    def flush(self, metadata: dict) -> None:
        batches, path = self.batches, self.folder / f"part-{self.part:05d}.parquet"

        def write() -> None:
            rows = [row for batch in batches for row in batch.result()]
            write_parquet(path, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), metadata=metadata)

        self._submit(write)
        self.batches, self.part = [], self.part + 1

    def _submit(self, job) -> Future:
        self._raise_error()
        future = self.worker.submit(self._run, job)
        self.jobs.append(future)
        while len(self.jobs) > self.max_jobs:
            self.jobs.popleft().exception()
        return future

    def _run(self, job):
        if self.error is None:
            try:
                return job()
            except BaseException as exc:
                self.error = exc
                raise
        return None

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> BackgroundParts:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.worker.shutdown(wait=True)
        if exc_type is None:
            self._raise_error()
