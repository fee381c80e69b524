"""Export: finished synthetic shards as plain `<class_name>/<synthetic_id>.png` folders for other
tools, with an `images.csv` index.

Its own module, so that editing it reruns no generation: the `export` rule's code hash covers this
file and what it imports, never `pipeline.generate`.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from pipeline import PipelineError
from pipeline.io import atomic_path
from pipeline.layout import EXPORT_INDEX
from pipeline.manifest import read_shards
from pipeline.progress import progress

log = logging.getLogger(__name__)


EXPORT_COLUMNS = ("file", "synthetic_id", "image_id", "label", "class_name", "method", "strength", "seed", "prompt")


def export_images(shard_paths: list[str | Path], out_dir: str | Path) -> dict:
    """Write the shards' images as plain folders for other tools: `<out_dir>/<class_name>/<synthetic_id>.png`.

    Images flagged nsfw (stored black) are left out. Each file is written atomically, and one that
    already holds the same bytes is left alone, so a repeated export rewrites nothing; PNGs of
    synthetic images no longer in the shards are removed, so the folder mirrors the shards.
    `out_dir/images.csv` lists the exported files (relative paths) with their labels, written last:
    its presence means the export is complete. Returns a summary.
    """
    shard_paths, out_dir = [Path(p) for p in shard_paths], Path(out_dir)
    rows = sorted(read_shards(shard_paths), key=lambda row: row["synthetic_id"])
    duplicates = sorted(i for i, n in Counter(row["synthetic_id"] for row in rows).items() if n > 1)
    if duplicates:
        raise PipelineError(
            f"shards {[str(p) for p in shard_paths]}: synthetic_id values must be unique. "
            f"Got duplicates {duplicates[:5]}"
        )
    for row in rows:
        name = row["class_name"]
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise PipelineError(
                f"synthetic image {row['synthetic_id']!r}: class_name {name!r} cannot name a folder. "
                "Expected a non-empty name without '/' or '\\'."
            )
    kept = [row for row in rows if not row["nsfw"]]

    (out_dir / EXPORT_INDEX).unlink(missing_ok=True)  # back when the export is complete
    written = unchanged = 0
    index = []
    for row in progress(kept, len(kept), f"export {out_dir}"):
        relative = Path(row["class_name"]) / f"{row['synthetic_id']}.png"
        path = out_dir / relative
        if path.is_file() and path.stat().st_size == len(row["image"]) and path.read_bytes() == row["image"]:
            unchanged += 1
        else:
            with atomic_path(path) as tmp:
                tmp.write_bytes(row["image"])
            written += 1
        index.append({"file": relative.as_posix(), **{key: row[key] for key in EXPORT_COLUMNS[1:]}})

    exported = {out_dir / entry["file"] for entry in index}
    stale = [path for path in out_dir.glob("*/*.png") if path not in exported]
    for path in stale:
        path.unlink()
    with atomic_path(out_dir / EXPORT_INDEX) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(index)

    summary = {"out": str(out_dir), "images": len(index), "written": written, "unchanged": unchanged,
               "removed": len(stale), "left_out_nsfw": len(rows) - len(kept)}  # fmt: skip
    log.info(
        "export %s: %d images (%d written, %d unchanged, %d stale removed, %d nsfw left out)",
        out_dir, len(index), written, unchanged, len(stale), len(rows) - len(kept),
    )  # fmt: skip
    return summary
