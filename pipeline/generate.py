"""The `generate` stage: SDEdit synthetic images of a few-shot subset into Parquet shards.

DA-Fusion (Trabucco et al., section 4.1 eq. 5) noises a real image to timestep t0 and denoises it
towards a prompt naming the class with its learned token; section 4.2 draws t0 per synthetic image
uniformly from {1/k, ..., k/k}. The methods (`METHODS`) differ only in prompt and strength rule.

Work plan. Every source image (sorted by image_id) gets `num_per_image` synthetic copies j. Copy
(image_id, j) owns the seed derive_seed(seed, "generate", method, image_id, j): its strength draw
and its noise come from it alone. Copies are grouped by strength (strength fixes the denoising
steps), chunked into batches of `batch_size` over the whole subset, and batch b goes to shard
b % num_shards. Batches are therefore the same whatever the shard count, and the union of the
shards is byte for byte the 1-shard result. Changing `batch_size` keeps every seed, strength and
prompt, but the pixels may move by a level or two: batched kernels (CPU and GPU alike) sum in
batch-size-dependent orders.

Each row reproduces with stock diffusers:
`StableDiffusionImg2ImgPipeline(image=source.resize((R, R)), prompt=prompt, strength=strength,
num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
generator=torch.Generator().manual_seed(seed))`, resized back to the source's size (as DA-Fusion
does). `num_inference_steps` is the length of the schedule; img2img runs
min(int(num_inference_steps * strength), num_inference_steps) of its steps.

Resume. Finished batches are flushed every `flush_every` batches as Parquet files in a folder
beside the output (`<out>.partial/`, with the run's provenance in run.json). A restarted job with
the same provenance skips what is there; at the end all rows are merged into `out_path`
atomically and the folder removed. A crash never leaves a file at `out_path`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from pipeline import PipelineError, __version__, sdedit
from pipeline.device import resolve_device, resolve_dtype
from pipeline.hashing import value_hash
from pipeline.io import encode_png, open_image, read_json, read_parquet, write_json, write_parquet
from pipeline.manifest import SHARD_SCHEMA, read_manifest
from pipeline.progress import progress
from pipeline.rng import derive_seed, numpy_rng
from pipeline.tokens import EMBEDDINGS_FILE, add_tokens_to_pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """How a method prompts and picks its SDEdit strength."""

    template: str  # "{}" is filled with `fill`
    fill: str | None  # "token" (learned class token), "class_name", or None (no class in the prompt)
    fixed_strength: float | None  # None: generate.strength if set, else drawn from {1/k, ..., k/k}

    @property
    def needs_tokens(self) -> bool:
        return self.fill == "token"


METHODS = {
    "dafusion": Method("a photo of a {}", "token", None),
    # Real Guidance (He et al. 2022): the class name in the prompt, t0 = 0.5.
    "real-guidance": Method("a photo of a {}", "class_name", 0.5),
    "class-agnostic": Method("a photo", None, None),
}


@dataclass(frozen=True)
class WorkItem:
    """One synthetic image to make: copy j of source image `image_id`."""

    synthetic_id: str
    image_id: str
    j: int
    label: int
    class_name: str
    path: str
    strength: float
    seed: int


def fixed_strength(config: dict, method_name: str) -> float | None:
    """The method's own t0, else generate.strength; None means t0 is drawn per image."""
    method = METHODS[method_name]
    return method.fixed_strength if method.fixed_strength is not None else config["generate"]["strength"]


def strength_for(config: dict, method_name: str, image_id: str, j: int) -> float:
    fixed = fixed_strength(config, method_name)
    if fixed is not None:
        return float(fixed)
    k = config["generate"]["num_intensities"]
    draw = numpy_rng(config["seed"], "generate", method_name, image_id, j, "strength").integers(k)
    return (int(draw) + 1) / k


def plan_items(config: dict, method_name: str, rows: list[dict]) -> list[WorkItem]:
    """Every synthetic image of the subset, in (image_id, j) order."""
    items = []
    for row in sorted(rows, key=lambda r: r["image_id"]):
        for j in range(config["generate"]["num_per_image"]):
            items.append(
                WorkItem(
                    synthetic_id=f"{method_name}-{row['image_id']}-{j}",
                    image_id=row["image_id"],
                    j=j,
                    label=row["label"],
                    class_name=row["class_name"],
                    path=row["path"],
                    strength=strength_for(config, method_name, row["image_id"], j),
                    seed=derive_seed(config["seed"], "generate", method_name, row["image_id"], j),
                )
            )
    return items


def plan_batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Items grouped by strength (ascending), each group chunked into batches in (image_id, j) order."""
    batches = []
    for strength in sorted({item.strength for item in items}):
        group = [item for item in items if item.strength == strength]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def _read_subset(subset_path: Path) -> list[dict]:
    rows, _ = read_manifest(subset_path)
    if not rows:
        raise PipelineError(f"subset {subset_path} has no images. Expected at least one row.")
    ids = [row["image_id"] for row in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PipelineError(f"subset {subset_path}: image_id values must be unique. Got duplicates {duplicates[:5]}")
    return rows


def _check_arguments(config: dict, method_name: str, tokens_dir: Path | None, shard: int, num_shards: int) -> None:
    if method_name not in METHODS:
        raise PipelineError(f"unknown generation method {method_name!r}. Expected one of {sorted(METHODS)}.")
    if METHODS[method_name].needs_tokens and tokens_dir is None:
        raise PipelineError(f"method {method_name!r} prompts with learned class tokens. Expected a tokens folder, got none.")
    if not 0 <= shard < num_shards:
        raise PipelineError(f"shard {shard} of {num_shards}: expected 0 <= shard < num_shards.")
    steps = config["generate"]["num_inference_steps"]
    k = config["generate"]["num_intensities"]
    fixed = fixed_strength(config, method_name)
    lowest = fixed if fixed is not None else 1 / k
    if sdedit.denoising_steps(steps, lowest) < 1:
        raise PipelineError(
            f"generate.num_inference_steps={steps} at strength {lowest:g} runs no denoising step. "
            f"Expected num_inference_steps * strength >= 1."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(config: dict, method_name, subset_path, tokens_dir, shard, num_shards, device, dtype) -> dict:
    """The shard's key-value metadata; also what a partial run must match to be resumed."""
    return {
        "stage": "generate",
        "pipeline_version": __version__,
        "config_hash": value_hash({k: config[k] for k in ("seed", "model", "generate")}),
        "method": method_name,
        "shard": shard,
        "num_shards": num_shards,
        "model": config["model"]["id"],
        "subset": str(subset_path),
        "subset_sha256": _sha256(subset_path),
        "tokens_sha256": _sha256(tokens_dir / EMBEDDINGS_FILE) if tokens_dir is not None else None,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _partial_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".partial")


def _load_partial(partial_dir: Path, provenance: dict) -> list[pa.Table]:
    """Tables flushed by an earlier attempt of this very job; a stale folder is discarded."""
    run_file = partial_dir / "run.json"
    if partial_dir.is_dir() and run_file.is_file() and read_json(run_file) == provenance:
        return [read_parquet(part) for part in sorted(partial_dir.glob("part-*.parquet"))]
    if partial_dir.exists():
        log.warning("discarding %s: it was written by a different run", partial_dir)
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(parents=True)
    write_json(run_file, provenance)
    return []


def _prompt(method: Method, class_name: str, class_tokens: dict[str, str]) -> str:
    if method.fill == "token":
        return method.template.format(class_tokens[class_name])
    if method.fill == "class_name":
        return method.template.format(class_name)
    return method.template


class _Sources:
    """VAE latent distributions of source images, encoded once each on first use."""

    def __init__(self, pipe, resolution: int):
        self.pipe, self.resolution = pipe, resolution
        self.latents: dict[str, object] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def get(self, item: WorkItem):
        if item.image_id not in self.latents:
            image = open_image(item.path)
            self.sizes[item.image_id] = image.size
            self.latents[item.image_id] = sdedit.encode_source(self.pipe, image, self.resolution)
        return self.latents[item.image_id]


def _run_batch(pipe, batch, sources, prompt_embeds, negative_embeds, generate: dict) -> list[Image.Image]:
    starts = [sdedit.start_latents(pipe, sources.get(item), torch.Generator().manual_seed(item.seed)) for item in batch]
    clean = torch.cat([clean for clean, _ in starts])
    noise = torch.cat([noise for _, noise in starts])
    conditions = torch.cat([prompt_embeds[item.class_name] for item in batch])
    return sdedit.sdedit(
        pipe,
        clean,
        noise,
        conditions,
        negative_embeds,
        batch[0].strength,
        generate["num_inference_steps"],
        generate["guidance_scale"],
    )


def _rows(batch, images, sources, prompts, method_name, config) -> list[dict]:
    rows = []
    for item, image in zip(batch, images):
        size = sources.sizes[item.image_id]
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        rows.append(
            {
                "synthetic_id": item.synthetic_id,
                "image_id": item.image_id,
                "label": item.label,
                "class_name": item.class_name,
                "method": method_name,
                "strength": item.strength,
                "seed": item.seed,
                "prompt": prompts[item.class_name],
                "guidance_scale": config["generate"]["guidance_scale"],
                "num_inference_steps": config["generate"]["num_inference_steps"],
                "model": config["model"]["id"],
                "image": encode_png(image),
                "width": size[0],
                "height": size[1],
                "nsfw": None,  # no safety checker runs
            }
        )
    return rows


def generate_shard(
    config: dict,
    subset_path: Path,
    tokens_dir: Path | None,
    method: str,
    shard: int,
    num_shards: int,
    out_path: Path,
) -> dict:
    """SDEdit this shard's synthetic images of the subset with `method`; write them to `out_path`.

    `out_path` gets one row per synthetic image (pipeline.manifest.SHARD_SCHEMA, sorted by
    image_id then j) and the run's provenance as key-value metadata. Returns a summary.
    """
    subset_path, out_path = Path(subset_path), Path(out_path)
    tokens_dir = Path(tokens_dir) if tokens_dir is not None else None
    _check_arguments(config, method, tokens_dir, shard, num_shards)
    generate = config["generate"]
    rows = _read_subset(subset_path)
    items = plan_items(config, method, rows)
    batches = plan_batches(items, generate["batch_size"])[shard::num_shards]

    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["model"]["dtype"], device)
    provenance = _provenance(config, method, subset_path, tokens_dir, shard, num_shards, device, dtype)
    partial_dir = _partial_dir(out_path)
    tables = _load_partial(partial_dir, provenance)
    done = {sid for table in tables for sid in table.column("synthetic_id").to_pylist()}
    todo = [batch for batch in batches if not all(item.synthetic_id in done for item in batch)]
    if done:
        log.info("resuming %s: %d images already flushed, %d batches to go", out_path, len(done), len(todo))

    start = time.perf_counter()
    generated = 0
    if todo:
        desc = f"generate {method} shard {shard}/{num_shards}"
        generated = _generate_batches(config, method, tokens_dir, todo, partial_dir, len(tables), device, dtype, desc)
        tables = [read_parquet(part) for part in sorted(partial_dir.glob("part-*.parquet"))]
    seconds = time.perf_counter() - start

    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    order = {item.synthetic_id: i for i, item in enumerate(items)}
    ids = table.column("synthetic_id").to_pylist()
    table = table.take(sorted(range(table.num_rows), key=lambda i: order[ids[i]]))
    write_parquet(out_path, table, metadata=provenance)
    shutil.rmtree(partial_dir)

    summary = {
        "out": str(out_path),
        "method": method,
        "shard": shard,
        "num_shards": num_shards,
        "images": table.num_rows,
        "generated": generated,
        "resumed": len(done),
        "seconds": round(seconds, 3),
        "images_per_s": round(generated / seconds, 3) if generated else 0.0,
    }
    log.info(
        "generate %s shard %d/%d: %d images in %s (%d generated in %.1fs, %.2f images/s; %d resumed)",
        method, shard, num_shards, table.num_rows, out_path, generated, seconds, summary["images_per_s"], len(done),
    )  # fmt: skip
    return summary


def _generate_batches(config, method_name, tokens_dir, batches, partial_dir, first_part, device, dtype, desc) -> int:
    """Run `batches`, flushing rows to numbered part files in `partial_dir`; return images made."""
    generate = config["generate"]
    method = METHODS[method_name]
    pipe = sdedit.load_img2img(config["model"], generate, device, dtype)
    class_names = sorted({item.class_name for batch in batches for item in batch})
    class_tokens = add_tokens_to_pipeline(pipe, tokens_dir, class_names) if method.needs_tokens else {}
    prompts = {name: _prompt(method, name, class_tokens) for name in class_names}
    sources = _Sources(pipe, config["model"]["resolution"])

    pending: list[dict] = []
    part = first_part
    generated = 0
    with torch.inference_mode():
        prompt_embeds = {name: sdedit.encode_prompt(pipe, prompt) for name, prompt in prompts.items()}
        guided = sdedit.use_guidance(pipe, generate["guidance_scale"])
        negative_embeds = sdedit.encode_negative_prompt(pipe) if guided else None
        for count, batch in enumerate(progress(batches, len(batches), desc), 1):
            images = _run_batch(pipe, batch, sources, prompt_embeds, negative_embeds, generate)
            pending.extend(_rows(batch, images, sources, prompts, method_name, config))
            generated += len(batch)
            if count % generate["flush_every"] == 0 or count == len(batches):
                write_parquet(partial_dir / f"part-{part:05d}.parquet", pa.Table.from_pylist(pending, schema=SHARD_SCHEMA))
                pending, part = [], part + 1
    return generated
