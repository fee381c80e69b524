"""Batched `generate_shard` against the reference approach, on the same model, images and settings.

The reference (brandontrabucco/da-fusion) calls `StableDiffusionImg2ImgPipeline` once per synthetic
image: every call re-encodes the prompt and the source image and runs the UNet on a batch of two
(unconditional + conditional). Ours encodes each prompt and source once and runs `batch_size`
images per UNet call. Both are timed end to end (loading the model and tokens, PNG encoding), one
after the other in this process, on the same work items (same seeds and strengths), and their
outputs are compared pixel by pixel. Before either, the model is loaded and run for one step, so
that neither pays for a cold disk cache or GPU start-up. Each path's own model loads are timed as
it runs, and each rate is reported also without them (what a long run, where one load is spread
over thousands of images, sees): a load timed apart from the run would differ from the run's own
by the machine's noise, which on a small run can exceed the whole run.

    python benchmarks/bench_generate.py [--images 8] [--per-image 4] [--steps 20] [--batch-size 8 ...]

On a GPU, at SD 1.x's size and resolution (the issue's GPU target; `random-sd1` builds a randomly
initialised SD 1.x, as fast as a real one and needing no download):

    python benchmarks/bench_generate.py --device cuda --model random-sd1 --resolution 512 --steps 50 \
        --strength 0.5 --images 16 --per-image 4 --batch-size 8 16 32 64 --reference-images 16 --target 9
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextConfig

from pipeline import PipelineError, sdedit
from pipeline.config import validate_config
from pipeline.device import resolve_dtype
from pipeline.generate import generate_shard
from pipeline.generate_plan import plan_items
from pipeline.io import encode_png, write_parquet
from pipeline.makers.img2img import Img2ImgMaker
from pipeline.methods import METHODS
from pipeline.manifest import manifest_table, read_manifest, read_shards
from pipeline.settings.generate import GenerateSettings
from pipeline.tiny_sd import RANDOM_SD1, benchmark_checkpoint
from pipeline.tokens import add_tokens_to_pipeline, token_for_class, write_token_files

CLASSES = ["cat", "dog", "bird", "boat"]


def write_inputs(root: Path, num_images: int, resolution: int, token_dim: int) -> tuple[Path, Path]:
    """A subset of `num_images` random RGB images over CLASSES, and random one-vector tokens of `token_dim`."""
    rows = []
    for i in range(num_images):
        pixels = np.random.default_rng(i).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img-{i}.png")
        rows.append({"image_id": f"img-{i}", "path": f"img-{i}.png", "split": "train", "label": i % len(CLASSES),
                     "class_name": CLASSES[i % len(CLASSES)], "mask_path": None, "width": resolution, "height": resolution})  # fmt: skip
    subset = root / "subset.parquet"
    write_parquet(subset, manifest_table(rows), {"dataset_root": str(root), "mask_root": None, "classes": CLASSES})
    tokens_dir = root / "tokens"
    tokens_dir.mkdir()
    class_tokens = {name: token_for_class(name) for name in CLASSES}
    generator = torch.Generator().manual_seed(0)
    vectors = {token: torch.randn(1, token_dim, generator=generator) for token in class_tokens.values()}
    write_token_files(tokens_dir, class_tokens, vectors, {"num_vectors": 1, "model": "tiny"})
    return subset, tokens_dir


def reference(config: dict, subset: Path, tokens_dir: Path, limit: int | None) -> dict[str, bytes]:
    """One img2img pipeline call per synthetic image, as da-fusion does, for the first `limit` work
    items (all for None); {synthetic_id: PNG}.

    Runs in the same batch-invariant kernel context as generate_shard, so the two outputs differ
    only by how they call the model, not by which convolution algorithm oneDNN picked. Each call
    gets a CPU generator, as generate_shard's images do, so that on a GPU too both draw the same noise.
    """
    device = torch.device(config["device"])
    pipe = load_pipe(config, device, resolve_dtype(config["model"]["dtype"], device))
    class_tokens = add_tokens_to_pipeline(pipe, tokens_dir, CLASSES)
    rows, _ = read_manifest(subset)
    resolution, generate = config["model"]["resolution"], config["generate"]
    out = {}
    with sdedit.batch_invariant_kernels(device):
        for item in plan_items(GenerateSettings.from_config(config, "dafusion"), rows)[:limit]:
            image = Image.open(item.path).convert("RGB")
            canvas = pipe(
                image=image.resize((resolution, resolution), Image.BILINEAR),
                prompt=METHODS["dafusion"].template.format(class_tokens[item.class_name]),
                strength=item.strength,
                num_inference_steps=generate["num_inference_steps"],
                guidance_scale=generate["guidance_scale"],
                generator=torch.Generator().manual_seed(item.seed),
            ).images[0]
            out[item.synthetic_id] = encode_png(canvas.resize(image.size, Image.BILINEAR))
    return out


def load_pipe(config: dict, device: torch.device, dtype: torch.dtype):
    generate = config["generate"]
    return sdedit.load_img2img(config["model"]["id"], device, dtype, scheduler=generate["scheduler"],
                               channels_last=generate["channels_last"], compile=generate["compile"])  # fmt: skip


def warm_up(config: dict) -> None:
    """Load the model and run it for one step, so that the page cache holds the checkpoint and the
    GPU's libraries are started: costs that would otherwise fall on whichever path runs first."""
    device = torch.device(config["device"])
    pipe = load_pipe(config, device, resolve_dtype(config["model"]["dtype"], device))
    resolution = config["model"]["resolution"]
    with sdedit.batch_invariant_kernels(device):
        pipe(image=Image.new("RGB", (resolution, resolution)), prompt="a photo", strength=1.0, num_inference_steps=1)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(make, device: torch.device) -> tuple[float, float, dict[str, bytes]]:
    """(seconds, seconds of them spent loading the model, {synthetic_id: PNG}) of `make()`.

    Both paths load through `sdedit.load_img2img`; it is wrapped for the call to clock each load.
    """
    loading = []
    load_img2img = sdedit.load_img2img

    def clocked_load(*args, **kwargs):
        start = time.perf_counter()
        pipe = load_img2img(*args, **kwargs)
        synchronize(device)
        loading.append(time.perf_counter() - start)
        return pipe

    sdedit.load_img2img = clocked_load
    try:
        start = time.perf_counter()
        images = make()
        synchronize(device)
        return time.perf_counter() - start, sum(loading), images
    finally:
        sdedit.load_img2img = load_img2img


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(config: dict, subset: Path, tokens_dir: Path, root: Path, batch_size: int | str) -> dict[str, bytes]:
    """generate_shard's images at `batch_size`; {synthetic_id: PNG}."""
    config = validate_config({**config, "generate": {**config["generate"], "batch_size": batch_size}})
    out = root / f"shard-batch-{batch_size}.parquet"
    generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    return {row["synthetic_id"]: row["image"] for row in read_shards([out])}


def largest_difference(mine: dict[str, bytes], theirs: dict[str, bytes]) -> int:
    """Largest difference, in 8-bit levels, between the two outputs over the images both made."""

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)), np.int16)

    return max(int(np.abs(pixels(mine[k]) - pixels(theirs[k])).max()) for k in theirs)


def unet_seconds_per_row(config: dict, rows_list: list[int], repeats: int = 5) -> dict[int, float]:
    """{rows: seconds per row of one UNet call on that many rows (best of `repeats`)}, in generate's kernel context.

    The UNet is where nearly all the time of both paths goes, so the ratio of its cost per row at the
    reference's two rows (one image, both guidance halves) to that at ours bounds what batching can gain.
    """
    device = torch.device(config["device"])
    pipe = load_pipe(config, device, resolve_dtype(config["model"]["dtype"], device))
    unet, side = pipe.unet, config["model"]["resolution"] // pipe.vae_scale_factor
    seconds = {}
    with torch.inference_mode(), sdedit.batch_invariant_kernels(device):
        for rows in rows_list:
            latents = torch.randn(rows, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(rows))
            latents = latents.to(device, unet.dtype)
            text = torch.zeros(rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
            best = float("inf")
            for _ in range(repeats + 1):  # the first call warms up
                synchronize(device)
                start = time.perf_counter()
                unet(latents, 500, encoder_hidden_states=text)
                synchronize(device)
                best = min(best, time.perf_counter() - start)
            seconds[rows] = best / rows
    return seconds


def batch_size_arg(value: str) -> int | str:
    """A batch size: a positive number or `auto` (what generate.batch_size takes)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'auto', got {value!r}")
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--per-image", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=None, help="fixed SDEdit strength t0 (default: drawn from {1/4, ..., 4/4})")
    parser.add_argument("--batch-size", type=batch_size_arg, nargs="+", default=[8], help="one or more; each is a run of ours")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="the reference makes only the first N images (its rate does not depend on N; default: all)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--model", default=None,
                        help=f"diffusers checkpoint (hub id or folder), or {RANDOM_SD1} for a random full-size SD 1.x; "
                        "default: a tiny random one")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true",
                        help="generate.channels_last: UNet and VAE weights channels-last, for both paths")  # fmt: skip
    parser.add_argument("--target", type=float, default=None, help="images/s ours should reach; says whether it did")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Before a model is built (minutes for random-sd1): settings whose lowest strength runs no step.
    settings = {"num_per_image": args.per_image, "num_inference_steps": args.steps, "strength": args.strength,
                "channels_last": args.channels_last}  # fmt: skip
    try:
        Img2ImgMaker.check(GenerateSettings.from_config(validate_config({"generate": settings}), "dafusion"))
    except PipelineError as exc:
        parser.error(str(exc))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = benchmark_checkpoint(args.model, root, args.resolution, device, resolve_dtype(args.dtype, device))
        token_dim = CLIPTextConfig.from_pretrained(model, subfolder="text_encoder").hidden_size
        subset, tokens_dir = write_inputs(root, args.images, args.resolution, token_dim)
        config = validate_config(
            {
                "seed": 0,
                "device": args.device,
                "model": {"id": model, "resolution": args.resolution, "dtype": args.dtype},
                "generate": settings,
            }
        )
        count = args.images * args.per_image
        warm_up(config)
        runs = {batch_size: timed(lambda: ours(config, subset, tokens_dir, root, batch_size), device)
                for batch_size in args.batch_size}  # fmt: skip
        reference_s, load_s, theirs = timed(lambda: reference(config, subset, tokens_dir, args.reference_images), device)
        batch_sizes = sorted(b for b in args.batch_size if b != "auto")
        per_row = unet_seconds_per_row(config, [2] + [2 * b for b in batch_sizes])

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    strength = args.strength if args.strength is not None else "drawn from {0.25, 0.5, 0.75, 1}"
    print(f"{count} images ({args.images} sources x {args.per_image}), {args.resolution}px {args.model or 'tiny SD'}, "
          f"{args.steps} steps, strength {strength}, guidance 7.5, {where}, dtype {args.dtype}{', channels-last' if args.channels_last else ''}; the reference's load of the model: {load_s:.2f} s\n")  # fmt: skip
    # The speed-up compares rates without the load, which the two paths may spread over different counts.
    print("| path | batch size | images | seconds | images/s | images/s without the load | speed-up | largest pixel difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    reference_rate = len(theirs) / (reference_s - load_s)
    print(f"| reference: 1 img2img call per image | 1 | {len(theirs)} | {reference_s:.2f} | {len(theirs) / reference_s:.2f} "
          f"| {reference_rate:.2f} | 1.00x | |")  # fmt: skip
    for batch_size, (seconds, loading_s, images) in runs.items():
        rate = count / (seconds - loading_s)
        print(f"| ours: generate_shard | {batch_size} | {count} | {seconds:.2f} | {count / seconds:.2f} | {rate:.2f} "
              f"| {rate / reference_rate:.2f}x | {largest_difference(images, theirs)} |")  # fmt: skip
    # The UNet is nearly all of both paths' time: what batching gains on it bounds the speed-up.
    print("\n| UNet call | rows | ms per row (best of 5) | gain per row over the reference's |\n|---|---:|---:|---:|")
    for rows, seconds in per_row.items():
        who = "reference (one image, both guidance halves)" if rows == 2 else f"ours at batch size {rows // 2}"
        print(f"| {who} | {rows} | {1000 * seconds:.2f} | {per_row[2] / seconds:.2f}x |")
    if args.target is not None:
        # Judged without the load: a real shard spreads one load over thousands of images.
        best, (seconds, loading_s, _) = min(runs.items(), key=lambda run: run[1][0] - run[1][1])
        rate = count / (seconds - loading_s)
        print(f"\ntarget {args.target:g} images/s: {'met' if rate >= args.target else 'not met'}: best {rate:.2f} images/s "
              f"without the load ({count / seconds:.2f} end to end), at batch size {best}")  # fmt: skip


if __name__ == "__main__":
    main()
