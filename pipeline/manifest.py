"""The Parquet data contracts: the image manifest (prepare) and synthetic shards (generate).

Manifest: one row per real image. `path` is relative to the `dataset_root` recorded in the file's
key-value metadata and `mask_path` relative to `mask_root`; `classes` (the ordered class list) is
recorded there too, so any subset file is self-describing. Few-shot subsets are manifests with
`trial_seed` and `examples_per_class` added to the metadata.

Synthetic shard: one row per generated image, the encoded PNG inside, run provenance in metadata.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline import PipelineError
from pipeline.io import read_metadata, read_parquet

SPLITS = ("train", "val", "test")

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("mask_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("synthetic_id", pa.string()),
        ("image_id", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("method", pa.string()),
        ("strength", pa.float32()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("guidance_scale", pa.float32()),
        ("num_inference_steps", pa.int32()),
        ("model", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("nsfw", pa.bool_()),
    ]
)


def manifest_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def read_manifest(path: str | Path) -> tuple[list[dict], dict]:
    """Rows of a manifest or subset, with `path` and `mask_path` made absolute, and its metadata."""
    path = Path(path)
    meta = read_metadata(path)
    for key in ("dataset_root", "classes"):
        if key not in meta:
            raise PipelineError(f"{path}: not a manifest (metadata has no '{key}')")
    table = read_parquet(path)
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise PipelineError(f"{path}: manifest lacks columns {sorted(missing)}")
    root = Path(meta["dataset_root"])
    mask_root = Path(meta.get("mask_root") or root)
    rows = table.to_pylist()
    for row in rows:
        row["path"] = str(root / row["path"])
        if row["mask_path"] is not None:
            row["mask_path"] = str(mask_root / row["mask_path"])
    return rows, meta


def read_shards(paths: list[str | Path], with_images: bool = True) -> list[dict]:
    """All rows of the given synthetic shards, in the order given."""
    columns = None if with_images else [n for n in SHARD_SCHEMA.names if n != "image"]
    rows: list[dict] = []
    for path in paths:
        table = read_parquet(path, columns=columns)
        missing = set(columns or SHARD_SCHEMA.names) - set(table.column_names)
        if missing:
            raise PipelineError(f"{path}: synthetic shard lacks columns {sorted(missing)}")
        rows.extend(table.to_pylist())
    return rows
