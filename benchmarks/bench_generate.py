"""Batched `generate_shard` against the reference approach, on the same model, images and settings.

The reference (brandontrabucco/da-fusion) calls `StableDiffusionImg2ImgPipeline` once per synthetic
image: every call re-encodes the prompt and the source image and runs the UNet on a batch of two
(unconditional + conditional). Ours encodes each prompt and source once and runs `batch_size`
images per UNet call. Both are timed end to end (loading the model and tokens, PNG encoding), one
after the other in this process, on the same work items (same seeds and strengths), and their
outputs are compared pixel by pixel.

    python benchmarks/bench_generate.py [--images 8] [--per-image 4] [--steps 20] [--batch-size 8]

On a GPU, with a real checkpoint at its native resolution (the issue's GPU target):

    python benchmarks/bench_generate.py --device cuda --model CompVis/stable-diffusion-v1-4 \
        --resolution 512 --steps 50 --images 16 --per-image 4 --batch-size 16
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

from pipeline import sdedit
from pipeline.config import validate_config
from pipeline.device import resolve_dtype
from pipeline.generate import METHODS, generate_shard, plan_items
from pipeline.io import encode_png, write_parquet
from pipeline.manifest import manifest_table, read_manifest, read_shards
from pipeline.tiny_sd import build_tiny_sd
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


def reference(config: dict, subset: Path, tokens_dir: Path) -> dict[str, bytes]:
    """One img2img pipeline call per synthetic image, as da-fusion does; {synthetic_id: PNG}.

    Runs in the same batch-invariant kernel context as generate_shard, so the two outputs differ
    only by how they call the model, not by which convolution algorithm oneDNN picked.
    """
    device = torch.device(config["device"])
    pipe = sdedit.load_img2img(config["model"], config["generate"], device, resolve_dtype(config["model"]["dtype"], device))
    class_tokens = add_tokens_to_pipeline(pipe, tokens_dir, CLASSES)
    rows, _ = read_manifest(subset)
    resolution, generate = config["model"]["resolution"], config["generate"]
    out = {}
    with sdedit.batch_invariant_kernels(device):
        for item in plan_items(config, "dafusion", rows):
            image = Image.open(item.path).convert("RGB")
            canvas = pipe(
                image=image.resize((resolution, resolution), Image.BILINEAR),
                prompt=METHODS["dafusion"].template.format(class_tokens[item.class_name]),
                strength=item.strength,
                num_inference_steps=generate["num_inference_steps"],
                guidance_scale=generate["guidance_scale"],
                generator=torch.Generator(device).manual_seed(item.seed),
            ).images[0]
            out[item.synthetic_id] = encode_png(canvas.resize(image.size, Image.BILINEAR))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--per-image", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--model", default=None, help="diffusers checkpoint (hub id or folder); default: a tiny random one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or str(build_tiny_sd(root / "tiny-sd", resolution=args.resolution, seed=0))
        token_dim = CLIPTextConfig.from_pretrained(model, subfolder="text_encoder").hidden_size
        subset, tokens_dir = write_inputs(root, args.images, args.resolution, token_dim)
        config = validate_config(
            {
                "seed": 0,
                "device": args.device,
                "model": {"id": model, "resolution": args.resolution, "dtype": args.dtype},
                "generate": {"num_per_image": args.per_image, "num_inference_steps": args.steps, "batch_size": args.batch_size},
            }
        )
        count = args.images * args.per_image

        start = time.perf_counter()
        generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, root / "shard.parquet")
        ours_s = time.perf_counter() - start
        ours = {row["synthetic_id"]: row["image"] for row in read_shards([root / "shard.parquet"])}

        start = time.perf_counter()
        theirs = reference(config, subset, tokens_dir)
        reference_s = time.perf_counter() - start

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)), np.int16)

    largest_difference = max(np.abs(pixels(ours[k]) - pixels(theirs[k])).max() for k in ours)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    print(f"{count} images ({args.images} sources x {args.per_image}), {args.resolution}px {args.model or 'tiny SD'}, "
          f"{args.steps} steps, guidance 7.5, {where}, dtype {args.dtype}")  # fmt: skip
    print(f"reference (1 img2img call per image): {reference_s:7.2f} s  {count / reference_s:6.2f} images/s")
    print(f"ours (batch size {args.batch_size}):            {ours_s:7.2f} s  {count / ours_s:6.2f} images/s")
    print(f"speed-up: {reference_s / ours_s:.2f}x; largest pixel difference between the two: {largest_difference} levels")


if __name__ == "__main__":
    main()
