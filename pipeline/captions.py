"""The `caption` stage: one caption per training image of a few-shot subset, for MVC.

MVC (Rahat and Venkateswara) captions every training image with BLIP-2 and begins each caption with
"This is an image of {class}" (`caption.prefix`), so that the caption embeddings of a class share
their first rows and differ in what they say about the particular image; its Algorithm 1 then mixes
those embeddings within the class. Three captioners:

* `annotations`: offline, from the image and the mask of its labelled object, which every dataset
  with masks has (the demo, VOC, COCO): the object's colour (hue of its mean pixel; white, grey or
  black when unsaturated), its size (share of the image), where it is (thirds of the frame) and how
  bright the background is: "This is an image of seven, a large red object at the top left on a
  dark background". Two images of a class get different captions whenever they differ in these.
* `csv`: a user's file with columns image_id, caption (rows of other images are ignored, so one
  file can serve every subset); the prefix is prepended unless the caption already starts with it.
* `blip2`: BLIP-2 through transformers (`Blip2ForConditionalGeneration`, `caption.blip2_model`),
  greedy decoding, as the study.

Writes `<out>.parquet` (image_id, class_name, caption, in the subset's order) atomically, with the
captioner and prefix in its metadata.
"""

from __future__ import annotations

import colorsys
import csv
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import PipelineError
from pipeline.demo import colour_name
from pipeline.io import file_sha256, open_image, read_object_mask, read_parquet, write_parquet
from pipeline.manifest import read_manifest
from pipeline.progress import progress
from pipeline.settings.caption import CaptionSettings

log = logging.getLogger(__name__)

CAPTION_SCHEMA = pa.schema([("image_id", pa.string()), ("class_name", pa.string()), ("caption", pa.string())])
# Below this saturation a colour has no hue worth naming.
GREY_SATURATION = 0.2
# Object size words by share of the image's pixels: below the first "small", above the second "large".
SIZE_SHARES = (0.08, 0.25)


def caption_subset(config: dict, subset_path: str | Path, out_path: str | Path) -> dict:
    """Caption every training image of the subset with `caption.captioner`; write `out_path`.
    The only reader of `config`."""
    settings = CaptionSettings.from_config(config)
    subset_path, out_path = Path(subset_path), Path(out_path)
    rows = [row for row in read_manifest(subset_path)[0] if row["split"] == "train"]
    if not rows:
        raise PipelineError(f"subset {subset_path} has no training images to caption. Expected at least one.")
    if "{}" not in settings.prefix:
        raise PipelineError(f"caption.prefix {settings.prefix!r} has no '{{}}'. Expected a place for the class name.")
    captioners = {"annotations": _from_annotations, "csv": _from_csv, "blip2": _from_blip2}
    captions = captioners[settings.captioner](settings, rows)
    table = pa.table(
        {"image_id": [row["image_id"] for row in rows], "class_name": [row["class_name"] for row in rows], "caption": captions},
        schema=CAPTION_SCHEMA,
    )
    write_parquet(out_path, table, {"stage": "caption", "captioner": settings.captioner, "prefix": settings.prefix,
                                    "subset": str(subset_path), "subset_sha256": file_sha256(subset_path)})  # fmt: skip
    distinct = len(set(captions))
    log.info("captioned %d training images with %s (%d distinct captions) -> %s", len(rows), settings.captioner, distinct, out_path)
    return {"out": str(out_path), "images": len(rows), "distinct": distinct}


def read_captions(path: str | Path) -> dict[str, tuple[str, str]]:
    """{image_id: (class_name, caption)} of a caption file."""
    table = read_parquet(path)
    missing = [name for name in CAPTION_SCHEMA.names if name not in table.column_names]
    if missing:
        raise PipelineError(f"{path}: no column {missing[0]!r}. Expected a caption file with columns {CAPTION_SCHEMA.names}.")
    data = table.to_pydict()
    return {i: (c, text) for i, c, text in zip(data["image_id"], data["class_name"], data["caption"])}


def colour_word(rgb: np.ndarray) -> str:
    """A word for a mean colour [3] in 0..255: its hue's name, or white / grey / black when unsaturated."""
    _, saturation, value = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))
    if saturation < GREY_SATURATION:
        return "white" if value > 0.75 else "black" if value < 0.25 else "grey"
    return colour_name(tuple(int(c) for c in rgb))


def describe(image: np.ndarray, mask: np.ndarray) -> str:
    """ "a large red object at the top left on a dark background", from an RGB image [H,W,3] and a
    boolean object mask [H,W]."""
    share = mask.mean()
    size = "small " if share < SIZE_SHARES[0] else "large " if share > SIZE_SHARES[1] else ""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    row = ("top", None, "bottom")[min(2, int(3 * ys.mean() / height))]
    column = ("left", None, "right")[min(2, int(3 * xs.mean() / width))]
    if row and column:
        place = f"at the {row} {column}"
    elif row or column:
        place = f"at the {row}" if row else f"on the {column}"
    else:
        place = "in the centre"
    colour = colour_word(image[mask].mean(axis=0))
    background = image[~mask].mean() / 255 if (~mask).any() else 0.5
    tone = " on a dark background" if background < 0.35 else " on a light background" if background > 0.65 else ""
    return f"a {size}{colour} object {place}{tone}"


def _from_annotations(settings: CaptionSettings, rows: list[dict]) -> list[str]:
    captions = []
    for row in progress(rows, len(rows), "caption from annotations"):
        if row["mask_path"] is None:
            raise PipelineError(
                f"caption.captioner annotations: image {row['image_id']!r} has no mask (mask_path null). "
                "Expected a dataset with object masks, or captioner csv or blip2."
            )
        image = open_image(row["path"])
        mask = read_object_mask(row["mask_path"], row["image_id"], image.size)
        captions.append(f"{settings.prefix.format(row['class_name'])}, {describe(np.asarray(image), mask)}")
    return captions


def _from_csv(settings: CaptionSettings, rows: list[dict]) -> list[str]:
    if settings.csv is None:
        raise PipelineError("caption.captioner csv needs caption.csv, a file with columns image_id, caption. Got none.")
    path = Path(settings.csv)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"image_id", "caption"} <= set(reader.fieldnames):
                raise PipelineError(f"caption.csv {path}: expected columns image_id and caption. Got {reader.fieldnames}.")
            given = {record["image_id"]: record["caption"].strip() for record in reader}
    except FileNotFoundError:
        raise PipelineError(f"caption.csv {path} does not exist") from None
    captions = []
    for row in rows:
        text = given.get(row["image_id"])
        if not text:
            raise PipelineError(f"caption.csv {path}: no caption for training image {row['image_id']!r} (class {row['class_name']!r}). Expected one row per training image.")
        prefix = settings.prefix.format(row["class_name"])
        captions.append(text if text.startswith(prefix) else f"{prefix}, {text}")
    return captions


def _from_blip2(settings: CaptionSettings, rows: list[dict]) -> list[str]:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from pipeline.device import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        processor = Blip2Processor.from_pretrained(settings.blip2_model)
        model = Blip2ForConditionalGeneration.from_pretrained(settings.blip2_model, torch_dtype=dtype).to(device).eval()
    except (OSError, ValueError) as exc:
        raise PipelineError(f"caption.blip2_model: cannot load BLIP-2 from {settings.blip2_model!r}: {exc}") from None
    captions = []
    with torch.inference_mode():
        for row in progress(rows, len(rows), "caption with BLIP-2"):
            inputs = processor(images=open_image(row["path"]), return_tensors="pt").to(device=device, dtype=dtype)
            ids = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False)
            text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
            prefix = settings.prefix.format(row["class_name"])
            captions.append(f"{prefix}, {text}" if text else prefix)
    return captions
