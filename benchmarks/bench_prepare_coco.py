"""Time `prepare` on a synthetic COCO 2017-sized dataset (annotations only, images never decoded).

Writes COCO-format annotation files the size of train2017 (118,287 images, ~860k instance
annotations, polygons with 6-32 vertices, 10% in two parts, ~1% crowd RLE, ~1% images without
annotations) and of val2017 (5,000 images, ~36k annotations) with empty image files, then runs
prepare_dataset with the given number of worker processes and prints the timings.

    python benchmarks/bench_prepare_coco.py --threads 2            # full size
    python benchmarks/bench_prepare_coco.py --scale 0.05           # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import validate_config
from pipeline.prepare import prepare_dataset

TRAIN_IMAGES, TRAIN_ANNOTATIONS = 118_287, 860_001
VAL_IMAGES, VAL_ANNOTATIONS = 5_000, 36_781
NUM_CLASSES = 80


def polygons(rng: np.random.Generator, count: int, width: int, height: int) -> list[list[float]]:
    """`count` star-shaped polygons with 6-32 vertices each, coordinates rounded like COCO's (2 decimals).

    Drawn for a whole image at once: one numpy call per image, not per polygon, keeps the
    generation of 860k annotations to minutes.
    """
    vertices = rng.integers(6, 33, size=count)
    owner = np.repeat(np.arange(count), vertices)
    radius = np.exp(rng.uniform(np.log(4), np.log(min(width, height) / 2), size=count))[owner]
    centre = rng.uniform([0, 0], [width, height], size=(count, 2))[owner]
    # Angles increase within each polygon, so its outline does not cross itself.
    angles = 2 * np.pi * (np.arange(len(owner)) - np.repeat(np.cumsum(vertices) - vertices, vertices)) / vertices[owner]
    radii = radius * rng.uniform(0.6, 1.0, size=len(owner))
    points = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    points = np.round(np.clip(points, 0, [width - 1, height - 1]), 2)
    return [part.ravel().tolist() for part in np.split(points, np.cumsum(vertices)[:-1])]


def crowd_rle(rng: np.random.Generator, width: int, height: int) -> dict:
    """Uncompressed (column-major) RLE of a random box, as COCO stores crowd regions."""
    left, top = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    box_w, box_h = int(rng.integers(1, width - left)), int(rng.integers(1, height - top))
    counts = [left * height + top]
    for _ in range(box_w - 1):
        counts += [box_h, height - box_h]
    counts += [box_h, (width - left - box_w) * height + height - top - box_h]
    return {"size": [height, width], "counts": counts}


def write_split(root: Path, split: str, num_images: int, num_annotations: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    # ~1% of images have no annotation; the rest share the annotations, at least one each.
    annotated = num_images - num_images // 100
    per_image = 1 + rng.multinomial(num_annotations - annotated, np.full(annotated, 1 / annotated))
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1 + (0 if split == "train" else 10_000_000)
        width, height = (640, 480) if rng.random() < 0.7 else (480, 640)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        (folder / f"{image_id:012d}.jpg").touch()
        count = per_image[index] if index < annotated else 0
        crowd = rng.random(count) < 0.01
        two_parts = rng.random(count) < 0.1
        outlines = iter(polygons(rng, count + int(two_parts.sum()), width, height))
        for is_crowd, is_two_parts in zip(crowd, two_parts):
            if is_crowd:
                segmentation = crowd_rle(rng, width, height)
            else:
                segmentation = [next(outlines) for _ in range(2 if is_two_parts else 1)]
            annotations.append(
                {"id": len(annotations) + 1 + (0 if split == "train" else 10_000_000), "image_id": image_id,
                 "category_id": int(rng.integers(1, NUM_CLASSES + 1)), "segmentation": segmentation,
                 "area": 0.0, "bbox": [0.0, 0.0, 1.0, 1.0], "iscrowd": int(is_crowd)}
            )
    categories = [{"id": i, "name": f"class{i:02d}", "supercategory": "thing"} for i in range(1, NUM_CLASSES + 1)]
    (root / "annotations").mkdir(exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    # json.dumps uses the C encoder; json.dump to a file would not.
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of COCO 2017's size")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept if given; a temporary folder otherwise")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-prepare-coco-"))
    root = work / "coco"
    try:
        start = time.perf_counter()
        if not root.exists():
            write_split(root, "train", round(TRAIN_IMAGES * args.scale), round(TRAIN_ANNOTATIONS * args.scale), seed=0)
            write_split(root, "val", round(VAL_IMAGES * args.scale), round(VAL_ANNOTATIONS * args.scale), seed=1)
        generated = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in (root / "annotations").iterdir()) / 2**20

        config = validate_config({"dataset": {"name": "coco", "root": str(root)}})
        start = time.perf_counter()
        summary = prepare_dataset(config, work / "prepared", threads=args.threads)
        elapsed = time.perf_counter() - start
        images = sum(summary["images"].values()) + sum(summary["left_out"].values())
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"prepare_dataset(coco, threads={args.threads}): {images} images ({size_mb:.0f} MB of annotations) "
            f"in {elapsed:.1f} s = {images / elapsed:.0f} images/s; peak RSS of the main process {peak_mb:.0f} MB; "
            f"data generated in {generated:.0f} s; {summary}"
        )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
