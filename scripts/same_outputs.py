"""Does a change alter what the workflow writes? Run it before and after, and compare every output.

    python scripts/same_outputs.py --rev HEAD~1 [--config config.yaml] [--cores 2] [--keep DIR]

Copies the commit `--rev` and the working tree (tracked and untracked files that git does not
ignore) into two scratch folders, runs `snakemake --cores N --configfile CONFIG` in each, one after
the other, and compares the two `results` folders file by file. A refactoring should leave every
output byte-identical; where bytes differ, a file still counts as the same when only these differ:
  * Parquet (manifest, subsets, shards): the schema metadata's absolute paths of the two scratch
    folders (the manifest records its dataset and mask roots) and sha256 digests of outputs that
    differ only so (a shard records its subset's); rows must be equal;
  * JSON: `seconds` (wall time), the scratch folders' paths and such digests;
  * .npz: zip member timestamps (numpy writes the time of saving); every array must be equal.
Left out of the comparison: logs/, benchmarks/, .snakemake/, the resolved configs (.config/) and
*.lock files, which hold times, hosts and process ids. Exits 1 when any output differs, or exists
on one side only, and prints which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"logs", "benchmarks", ".snakemake", ".config"}
SKIPPED_SUFFIXES = {".lock"}
TIMING_KEYS = {"seconds"}


def copy_revision(rev: str, dest: Path) -> None:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def copy_working_tree(dest: Path) -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_workflow(tree: Path, config: str, cores: int) -> float:
    start = time.perf_counter()
    log = tree / "same_outputs.log"
    with open(log, "w") as handle:
        done = subprocess.run(["snakemake", "--cores", str(cores), "--configfile", config], cwd=tree, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"error: the workflow failed in {tree} (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def outputs(results: Path) -> set[str]:
    found = set()
    for path in results.rglob("*"):
        relative = path.relative_to(results)
        if path.is_file() and not SKIPPED_DIRS.intersection(relative.parts) and path.suffix not in SKIPPED_SUFFIXES:
            found.add(relative.as_posix())
    return found


class Normaliser:
    """Replaces what may differ between two equivalent runs: the scratch folder's absolute path, and
    the sha256 of any output file of the run, by the file's name; drops timings."""

    def __init__(self, root: Path, results: Path):
        self.root = str(root.resolve())
        self.digests = {hashlib.sha256(path.read_bytes()).hexdigest(): f"<sha256 of {path.relative_to(results)}>"
                        for path in results.rglob("*") if path.is_file()}

    def __call__(self, value):
        if isinstance(value, str):
            return self.digests.get(value, value.replace(self.root, "<checkout>"))
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def _parquet_equal(a: Path, b: Path, normalise: tuple[Normaliser, Normaliser]) -> str | None:
    table_a, table_b = pq.read_table(a), pq.read_table(b)
    if not table_a.equals(table_b):  # compares schema fields and rows, not metadata
        return "rows differ"
    meta = [{k.decode(): norm(_maybe_json(v.decode())) for k, v in (t.schema.metadata or {}).items()}
            for t, norm in zip((table_a, table_b), normalise)]
    return None if meta[0] == meta[1] else f"metadata keys differ: {sorted(k for k in meta[0].keys() | meta[1].keys() if meta[0].get(k) != meta[1].get(k))}"


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_equal(a: Path, b: Path, normalise: tuple[Normaliser, Normaliser]) -> str | None:
    values = [norm(json.loads(p.read_text())) for p, norm in zip((a, b), normalise)]
    return None if values[0] == values[1] else "values differ (beyond seconds and checkout paths)"


def _npz_equal(a: Path, b: Path, normalise: tuple[Normaliser, Normaliser]) -> str | None:
    with np.load(a) as first, np.load(b) as second:
        if sorted(first.files) != sorted(second.files):
            return "different arrays"
        differing = [k for k in first.files if not np.array_equal(first[k], second[k])]
    return f"arrays differ: {differing}" if differing else None


COMPARERS = {".parquet": _parquet_equal, ".json": _json_equal, ".npz": _npz_equal}


def compare(before: Path, after: Path) -> tuple[dict[str, int], list[str]]:
    """Counts of identical and equivalent files, and one line per difference."""
    normalise = (Normaliser(before.parent, before), Normaliser(after.parent, after))
    names_before, names_after = outputs(before), outputs(after)
    problems = [f"only before: {n}" for n in sorted(names_before - names_after)]
    problems += [f"only after: {n}" for n in sorted(names_after - names_before)]
    counts = {"byte-identical": 0, "equal up to timings, paths or timestamps": 0}
    for name in sorted(names_before & names_after):
        a, b = before / name, after / name
        if a.read_bytes() == b.read_bytes():
            counts["byte-identical"] += 1
            continue
        comparer = COMPARERS.get(a.suffix)
        reason = comparer(a, b, normalise) if comparer else "bytes differ"
        if reason is None:
            counts["equal up to timings, paths or timestamps"] += 1
        else:
            problems.append(f"differs: {name} ({reason})")
    return counts, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="the commit to compare the working tree against, e.g. HEAD~1")
    parser.add_argument("--config", default="config.yaml", help="config file, relative to the repository root")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep both runs in (default: a temporary one, removed)")
    args = parser.parse_args()
    scratch = Path(args.keep or tempfile.mkdtemp(prefix="same-outputs-"))
    before, after = scratch / "before", scratch / "after"
    if before.exists() or after.exists():
        sys.exit(f"error: {scratch} already holds before/ or after/. Expected an empty or new folder")
    copy_revision(args.rev, before)
    after.mkdir(parents=True)
    copy_working_tree(after)
    try:
        seconds = {name: run_workflow(tree, args.config, args.cores) for name, tree in (("before", before), ("after", after))}
        results = yaml_results(after / args.config)
        counts, problems = compare(before / results, after / results)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.rev} against the working tree, {args.config}: workflow {seconds['before']:.0f} s before, {seconds['after']:.0f} s after")
    for what, count in counts.items():
        print(f"  {count} files {what}")
    for line in problems:
        print(f"  {line}")
    print("same outputs" if not problems else f"{len(problems)} outputs differ")
    return 1 if problems else 0


def yaml_results(config_path: Path) -> str:
    import yaml

    return yaml.safe_load(config_path.read_text()).get("results", "results")


if __name__ == "__main__":
    sys.exit(main())
