"""scripts/same_outputs.py: what counts as the same output of two runs, and what does not."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

spec = importlib.util.spec_from_file_location("same_outputs", Path(__file__).resolve().parents[1] / "scripts" / "same_outputs.py")
same_outputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same_outputs)


def write_run(root: Path, rows: list[int], seconds: float) -> Path:
    """A results folder as one checkout at `root` leaves it: a subset whose metadata holds the
    checkout's path, a shard recording the subset's sha256, JSON with a timing, an .npz, a log."""
    import hashlib

    results = root / "results"
    (results / "logs").mkdir(parents=True)
    (results / "logs" / "job.log").write_text(f"took {seconds}s")
    subset = results / "subset.parquet"
    pq.write_table(pa.table({"x": rows}).replace_schema_metadata({"meta": json.dumps({"root": str(root / "data")})}), subset)
    digest = hashlib.sha256(subset.read_bytes()).hexdigest()
    pq.write_table(pa.table({"y": [1, 2]}).replace_schema_metadata({"meta": json.dumps({"subset_sha256": digest})}), results / "shard.parquet")
    (results / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "seconds": seconds, "subset": str(subset)}))
    np.savez(results / "features.npz", features=np.arange(4.0))
    return results


def test_runs_that_differ_in_paths_timings_and_their_digests_only_are_the_same(tmp_path):
    counts, problems = same_outputs.compare(write_run(tmp_path / "before", [1, 2], 3.0), write_run(tmp_path / "after", [1, 2], 4.5))
    assert problems == []
    assert sum(counts.values()) == 4  # the log is left out


def test_a_changed_row_and_a_missing_file_are_reported(tmp_path):
    before, after = write_run(tmp_path / "before", [1, 2], 3.0), write_run(tmp_path / "after", [1, 3], 3.0)
    (after / "features.npz").unlink()
    _, problems = same_outputs.compare(before, after)
    # The shard records each side's own subset digest: the difference is the subset's, reported once.
    assert problems == ["only before: features.npz", "differs: subset.parquet (rows differ)"]
