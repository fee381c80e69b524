"""Peak GPU memory and throughput of batched SDEdit per batch size, and what `batch_size: auto` picks.

For each batch size, one `sdedit.sdedit` call on random latents (strength 1, so every scheduled
step runs on the whole batch; classifier-free guidance doubles the UNet batch; images are decoded
one at a time as in `generate`), after one warm-up call at batch 1. Prints a Markdown table for
BENCHMARKS.md, then the batch size `generate.batch_size: auto` chooses on this GPU and how long
its probe took.

    python benchmarks/bench_generate_memory.py [--model random-sd1] [--resolution 512] \
        [--dtype float16] [--steps 10] [--batch-sizes 1 2 4 8 16 32 64]

The default model, `random-sd1`, is a randomly initialised SD 1.x of the real size built on the
GPU first (memory and speed do not depend on weight values, and it needs no download); give a
checkpoint folder or hub id to measure that instead.

Needs a CUDA GPU (peak memory is read from the CUDA allocator); elsewhere it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from pipeline import sdedit
from pipeline.generate import AUTO_BATCH_LIMIT, largest_fitting_batch
from pipeline.tiny_sd import RANDOM_SD1, benchmark_checkpoint

GIB = 1024**3


def run_batch(pipe, batch_size: int, resolution: int, steps: int, guidance_scale: float) -> float:
    """Seconds for one SDEdit call on `batch_size` random images (the GPU synchronised)."""
    side = resolution // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(batch_size)
    shape = (batch_size, pipe.unet.config.in_channels, side, side)
    clean = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)
    noise = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)
    prompt = sdedit.encode_prompt(pipe, "a photo of a dog").expand(batch_size, -1, -1)
    negative = sdedit.encode_negative_prompt(pipe) if sdedit.use_guidance(pipe, guidance_scale) else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    sdedit.sdedit(pipe, clean, noise, prompt, negative, 1.0, steps, guidance_scale)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: str, device: torch.device, args: argparse.Namespace) -> None:
    """Print the table of peak memory and rate per batch size, then what `batch_size: auto` picks."""
    dtype = getattr(torch, args.dtype)
    pipe = sdedit.load_img2img(model, device, dtype)
    total = torch.cuda.get_device_properties(device).total_memory
    weights = torch.cuda.memory_allocated(device)
    print(f"{torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB), {args.model}, {args.resolution} px, {args.dtype}, "
          f"{args.steps} steps, guidance {args.guidance_scale}; the loaded pipeline holds {weights / GIB:.2f} GiB")  # fmt: skip

    with torch.inference_mode():
        run_batch(pipe, 1, args.resolution, 1, args.guidance_scale)  # warm-up: kernels, allocator
        print("\n| batch size | peak GPU memory (GiB) | seconds | images/s |\n|---:|---:|---:|---:|")
        for batch_size in args.batch_sizes:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = run_batch(pipe, batch_size, args.resolution, args.steps, args.guidance_scale)
            except torch.cuda.OutOfMemoryError:
                print(f"| {batch_size} | out of memory | | |")
                break
            peak = torch.cuda.max_memory_allocated(device) / GIB
            print(f"| {batch_size} | {peak:.2f} | {seconds:.2f} | {batch_size / seconds:.2f} |")

    guided = sdedit.use_guidance(pipe, args.guidance_scale)
    start = time.perf_counter()
    chosen = largest_fitting_batch(lambda b: sdedit.fits_in_memory(pipe, b, args.resolution, guided), AUTO_BATCH_LIMIT)
    print(f"\nbatch_size auto: {chosen} (limit {AUTO_BATCH_LIMIT}; probe took {time.perf_counter() - start:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=RANDOM_SD1,
                        help=f"diffusers checkpoint folder or hub id, or {RANDOM_SD1} (a random full-size SD 1.x built here)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=10, help="scheduled steps per call (all run at strength 1)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_generate_memory: no CUDA device visible to torch; peak GPU memory cannot be measured here. "
              "Run it on a machine with an NVIDIA GPU.")  # fmt: skip
        return 0

    device = torch.device("cuda", 0)
    with tempfile.TemporaryDirectory() as tmp:
        model = benchmark_checkpoint(args.model, tmp, args.resolution, device, getattr(torch, args.dtype))
        measure(model, device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
