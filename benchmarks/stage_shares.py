"""Each stage's share of a finished workflow run, from the `benchmark:` files Snakemake wrote.

    python benchmarks/stage_shares.py [results]      -> a Markdown table for BENCHMARKS.md

Job seconds are summed per rule (jobs run in parallel, so the sum can exceed the wall time).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path


def stage_seconds(results: Path) -> dict[str, tuple[int, float, float]]:
    """rule -> (jobs, summed wall seconds, max resident memory in MB)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = path.relative_to(results / "benchmarks").parts[0]
        with open(path) as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                totals[rule][0] += 1
                totals[rule][1] += float(row["s"])
                rss = row.get("max_rss", "NA")
                if rss not in ("NA", "-", ""):
                    totals[rule][2] = max(totals[rule][2], float(rss))
    return {rule: (int(n), s, rss) for rule, (n, s, rss) in totals.items()}


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
    shares = stage_seconds(results)
    if not shares:
        sys.exit(f"no benchmark files under {results}/benchmarks: run the workflow first")
    total = sum(s for _, s, _ in shares.values())
    print("| rule | jobs | job seconds | share | max RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for rule, (jobs, seconds, rss) in sorted(shares.items(), key=lambda kv: -kv[1][1]):
        print(f"| {rule} | {jobs} | {seconds:.1f} | {100 * seconds / total:.0f}% | {rss:.0f} |")
    print(f"| **total** | {sum(n for n, _, _ in shares.values())} | {total:.1f} | 100% | |")


if __name__ == "__main__":
    main()
