"""The Parquet data contracts: the image manifest (prepare) and synthetic shards (generate).

Manifest: one row per real image. `path` is relative to the `dataset_root` recorded in the file's
key-value metadata and `mask_path` relative to `mask_root`; `classes` (the ordered class list) is
recorded there too, so any subset file is self-describing. Few-shot subsets are manifests with
`trial_seed` and `examples_per_class` added to the metadata.

Synthetic shard: one row per generated image, the encoded PNG inside, run provenance in metadata.
Stages build its rows as SHARD_SCHEMA (`image` PNG bytes, `label` int32); the file stores them the
way Hugging Face `datasets` stores an Image and a ClassLabel feature (`image` a struct of bytes and
path, `label` int64, the features in the schema metadata under `huggingface`), because `datasets`
decodes a column as images only when it has exactly that type. `read_shards` gives the rows back
as SHARD_SCHEMA, from either form.
"""

from __future__ import annotations

import json
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


# The storage type of a `datasets` Image feature, and of a ClassLabel.
HF_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_LABEL_TYPE = pa.int64()
_HF_VALUE_TYPES = {
    pa.binary(): "binary", pa.string(): "string", pa.float32(): "float32", pa.int64(): "int64", pa.int32(): "int32", pa.bool_(): "bool",
}  # fmt: skip


def shard_file_table(table: pa.Table, classes: list[str]) -> pa.Table:
    """SHARD_SCHEMA rows as a shard file stores them: readable by `datasets` as images and class labels.

    The PNG bytes are kept as they are (the struct's `path` is null); only the column types and the
    schema metadata differ from `table`.
    """
    no_paths = [pa.StructArray.from_arrays([chunk, pa.nulls(len(chunk), pa.string())], fields=list(HF_IMAGE_TYPE))
                for chunk in table.column("image").chunks]  # fmt: skip
    table = _replace_column(table, "image", pa.chunked_array(no_paths, type=HF_IMAGE_TYPE))
    table = _replace_column(table, "label", table.column("label").cast(HF_LABEL_TYPE))
    features = json.dumps({"info": {"features": shard_features(classes)}})
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"huggingface": features.encode()})


def shard_features(classes: list[str]) -> dict:
    """The shard's columns as `datasets` features: `image` an Image, `label` a ClassLabel of `classes`."""
    features = {field.name: {"dtype": _HF_VALUE_TYPES[field.type], "_type": "Value"} for field in SHARD_SCHEMA}
    features["image"] = {"_type": "Image"}
    features["label"] = {"names": list(classes), "_type": "ClassLabel"}
    return features


def _as_shard_schema(table: pa.Table) -> pa.Table:
    """A shard file's columns as SHARD_SCHEMA types: `image` the PNG bytes, `label` int32."""
    if "image" in table.column_names and pa.types.is_struct(table.schema.field("image").type):
        pngs = [chunk.field("bytes") for chunk in table.column("image").chunks]
        table = _replace_column(table, "image", pa.chunked_array(pngs, type=pa.binary()))
    if "label" in table.column_names:
        table = _replace_column(table, "label", table.column("label").cast(pa.int32()))
    return table


def _replace_column(table: pa.Table, name: str, values: pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), pa.field(name, values.type), values)


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
        rows.extend(_as_shard_schema(table).to_pylist())
    return rows


def training_images_by_class(rows: list[dict], subset_path: Path, classes: list[str]) -> dict[str, list[Path]]:
    """Training image paths per class, ordered by image_id (not by file order)."""
    by_class: dict[str, list[tuple[str, Path]]] = {name: [] for name in classes}
    for row in rows:
        if row["split"] == "train" and row["class_name"] in by_class:
            by_class[row["class_name"]].append((row["image_id"], Path(row["path"])))
    empty = [name for name, items in by_class.items() if not items]
    if empty:
        raise PipelineError(f"{subset_path}: no training images for classes {empty}. Expected at least one per class.")
    return {name: [path for _, path in sorted(items)] for name, items in by_class.items()}
