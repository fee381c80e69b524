"""Throughput of the two training paths of `pipeline.train`, on this machine's CPU (or --device).

  cached: one-time embedding of the pool (each image and its mirror image through the frozen
          backbone), then linear-head steps on the cached features;
  pixels: every draw decoded-once uint8 -> RandAugment -> backbone -> head, per step, through the
          same plan dataset and DataLoader that training uses;
  decode: the one-time decoding of the pool (512 px PNG bytes -> uint8 at --image-size), on 1 and
          on --threads threads, as training's loader does it.

Usage: python benchmarks/bench_train.py [--backbone NAME] [--weights imagenet|none] [--image-size 96]
       [--batch-size 32] [--threads N] [--workers W]
(Speed does not depend on the weights: `--weights none` measures a backbone whose weights are not
downloaded yet, e.g. `--backbone vit_b_16 --weights none --image-size 224`.)
Prints one Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.augment import image_transform
from pipeline.backbones import Classifier, build_backbone
from pipeline.config import validate_config
from pipeline.settings.train import TrainSettings
from pipeline.train_fit import Loader, PlanDataset, train_step
from pipeline.train_plan import draw_plan, draw_views, standard_angles

from bench_fid import smooth_pngs  # a sibling script: benchmarks/ is on sys.path when run


def timed(function, repeat: int) -> float:
    """Seconds per call, after one warm-up call."""
    function()
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", choices=["imagenet", "none"])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--pool", type=int, default=256, help="images in the training pool (real + synthetic)")
    parser.add_argument("--head-steps", type=int, default=2000)
    parser.add_argument("--pixel-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-images", type=int, default=128, help="PNGs in the decode measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = TrainSettings.from_config(validate_config({"train": {"image_size": args.image_size}}), "randaugment")
    batch = args.batch_size

    model = Classifier(build_backbone(args.backbone, args.weights, args.image_size), args.classes, frozen=True).to(device)
    draws = (args.head_steps + 1) * batch
    angles = standard_angles(options.rotation_degrees, options.rotation_angles)
    plan = draw_plan(args.pool, np.full(args.pool, 0), draws, 0.0, draw_views(draws, True, len(angles), np.random.default_rng(2)),
                     np.random.default_rng(0), np.random.default_rng(1))
    labels = torch.randint(0, args.classes, (args.pool,))
    images = torch.randint(0, 256, (args.pool, 3, args.image_size, args.image_size), dtype=torch.uint8)

    # One-time cost of the cached path: the pool and its mirror images through the backbone.
    embed_batch = images[:batch].to(device).float() / 255

    def embed():
        with torch.no_grad():
            model.backbone(embed_batch)

    embed_images_per_s = batch / timed(embed, repeat=3)

    features = torch.randn(2 * len(angles), args.pool, model.backbone.feature_dim, device=device)
    pool_index = torch.from_numpy(plan.pool_index).to(device)
    view = torch.from_numpy(plan.flip.astype(np.int64) * len(angles) + plan.angle_index).to(device)
    pool_labels = labels.to(device)
    head_optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    model.train()
    steps_done = 0

    def head_step():
        nonlocal steps_done
        draws = slice(steps_done * batch, (steps_done + 1) * batch)
        steps_done += 1
        train_step(model.head, head_optimizer, features[view[draws], pool_index[draws]], pool_labels[pool_index[draws]])

    head_steps_per_s = 1 / timed(head_step, repeat=args.head_steps)

    dataset = PlanDataset(images, labels, plan, angles, image_transform(["randaugment"], options))
    loader = DataLoader(dataset, batch_size=batch, num_workers=args.workers, generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    pixel_optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)

    def pixel_step():
        inputs, targets = next(batches)
        train_step(model, pixel_optimizer, inputs.to(device), targets.to(device))

    pixel_images_per_s = batch / timed(pixel_step, repeat=args.pixel_steps)
    augment_images_per_s = batch / timed(lambda: [dataset[k] for k in range(batch)], repeat=args.pixel_steps)

    print(f"train paths, {args.backbone} frozen at {args.image_size} px, batch {batch}, {args.classes} classes; "
          f"{platform.processor() or platform.machine()}, torch threads {args.threads}, workers {args.workers}, device {device}")
    print()
    print("| measure | rate |")
    print("|---|---|")
    print(f"| cached: embedding (one-time, per pool image and per standard view: 2 flips x angles) | {embed_images_per_s:.1f} images/s |")
    print(f"| cached: linear-head steps | {head_steps_per_s:.0f} steps/s ({head_steps_per_s * batch:.0f} draws/s) |")
    print(f"| pixels: RandAugment alone (per image, main process) | {augment_images_per_s:.0f} images/s |")
    print(f"| pixels: full step (RandAugment + backbone + head) | {pixel_images_per_s:.1f} images/s ({pixel_images_per_s / batch:.2f} steps/s) |")
    steps = 10_000
    cached_s = 2 * args.pool / embed_images_per_s + steps / head_steps_per_s
    pixel_s = steps * batch / pixel_images_per_s
    print(f"| 10,000 steps over a {args.pool}-image pool: cached vs pixels | {cached_s:.0f} s vs {pixel_s:.0f} s |")
    for threads, rate in decode_rates(options, args.decode_images, sorted({1, args.threads})).items():
        print(f"| decode: {args.decode_images} 512 px PNGs to {args.image_size} px, {threads} thread(s) | {rate:.0f} images/s |")


def decode_rates(options: TrainSettings, count: int, thread_counts: list[int]) -> dict[int, float]:
    """Images/s of the loader's one-time decode of synthetic rows (512 px PNGs that compress about
    as generated images do), per thread count."""
    rows = [{"synthetic_id": str(i), "image": png} for i, png in enumerate(smooth_pngs(512, count))]
    rates = {}
    for threads in thread_counts:
        loader = Loader(options.image_size, options.inference_batch_size, torch.device("cpu"), threads)
        rates[threads] = count / timed(lambda: sum(len(batch) for batch in loader.batches(rows, "decode")), repeat=2)
    return rates


if __name__ == "__main__":
    main()
