"""The `generate` stage: synthetic images of a few-shot subset into Parquet shards.

DA-Fusion (Trabucco et al., section 4.1 eq. 5) noises a real image to timestep t0 and denoises it
towards a prompt naming the class with its learned token; section 4.2 draws t0 per synthetic image
uniformly from {1/k, ..., k/k}. The methods (`METHODS`, one entry each) differ in prompt, strength
rule, starting point and re-generated region:

* SDEdit of the whole image: `dafusion`, `real-guidance`, `class-agnostic`;
* `txt2img`: plain text-to-image (the vanilla Stable Diffusion synthetic set), no source image:
  pure noise over the whole schedule, a class-name template from `generate.txt2img_templates`
  drawn per image; strength null, images at the model's resolution. It still makes
  `num_per_image` images per real image, whose `image_id` they carry, so that counts match and the
  train stage can swap a real image for one of its synthetic versions;
* `inpaint-fg` / `inpaint-bg` (DA-Fusion eq. 7, object-centric): dafusion's prompt and strength,
  but only the labelled object (the subset's `mask_path`, grown by `generate.mask_dilation` px) or
  only the rest is re-generated, by blended-latent inpainting (any SD checkpoint); the kept pixels
  are pasted back from the source, so they are exact.

Work plan. Every source image (sorted by image_id) gets `num_per_image` synthetic copies j. Copy
(image_id, j) owns the seed derive_seed(seed, "generate", method, image_id, j): its strength and
template draws and its noise come from it alone (inpainting re-noises the kept part with that
same start noise at every step). Copies are grouped by strength (strength fixes the denoising
steps); the i-th copy of each group goes to shard i % num_shards (`shard_items`), and each shard
batches its copies by strength, `batch_size` at a time (`generate.batch_size: auto` probes the
GPU for the largest batch that fits). Neither choice changes a seed, a strength or a prompt, and
on CPU not a pixel either (`sdedit.batch_invariant_kernels`): the union of the shards is byte for
byte the 1-shard result at any batch size. GPU kernels sum in batch-size-dependent orders, so
there a pixel may move by a level or two.

Safety (`generate.safety_checker`, off by default). Stable Diffusion's NSFW checker judges every
image; a flagged one is re-drawn with the seed derived from (seed, image_id, j, attempt), at most
`generate.max_resamples` times (the reference implementation retries forever), and the row records
the seed that made its image. Still flagged after the last re-draw, it is kept black with nsfw
true (one row per copy; train leaves it out). The shard's metadata `resamples` maps each re-drawn
synthetic_id to its number of re-draws. Without the checker nsfw is null.

Bad sources. A source image that cannot be decoded, or (inpainting) whose mask is null, unreadable,
of another size or empty, stops the job naming the file (`generate.on_bad_image: error`), or with
`skip` its copies are left out, logged, and listed in the shard's metadata `skipped` ({image_id:
reason}). Skipping changes no other image's seed, strength, shard or pixels.

Each SDEdit row reproduces with stock diffusers:
`StableDiffusionImg2ImgPipeline(image=source.resize((R, R)), prompt=prompt, strength=strength,
num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
generator=torch.Generator().manual_seed(seed))`, resized back to the source's size (as DA-Fusion
does), on a pipeline from `sdedit.load_img2img` within `sdedit.batch_invariant_kernels`.
`num_inference_steps` is the length of the schedule; img2img runs
min(int(num_inference_steps * strength), num_inference_steps) of its steps. Each txt2img row
reproduces with `StableDiffusionPipeline(prompt, height=R, width=R, ...)` and the same generator.

Resume. Finished batches are flushed every `flush_every` batches as Parquet files in a folder
beside the output (`<out>.partial/`, with the run's resume key in run.json: its provenance, with
a config hash that leaves out the settings that change no image, `RESUME_IGNORES`: batch size,
flush interval). A restarted job with the same key skips the images that are there (whatever
batch size made them); at the end all rows are merged into `out_path` atomically and the folder
removed. The merge first checks that the merged synthetic_ids are the shard's planned ids less
those of skipped sources, each once, and writes nothing otherwise. A crash never leaves a file at
`out_path`.

One writer per shard. The job holds an exclusive lock on `<out>.lock` (pipeline.io.output_lock)
from start to end, and a second process with the same output (an orphan of a lost Snakemake
controller still running, or a second command with the same --out) stops at once naming the
holder's pid and host, rather than adopting the first one's `.partial/` folder: otherwise the
first to finish merges and deletes the folder, and the other merges only its own parts.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

from pipeline import PipelineError, __version__, sdedit
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.hashing import value_hash
from pipeline.io import (
    encode_png,
    open_image,
    output_lock,
    read_json,
    read_metadata,
    read_parquet,
    write_json,
    write_parquet,
)
from pipeline.manifest import SHARD_SCHEMA, read_manifest, shard_file_table
from pipeline.progress import progress
from pipeline.rng import derive_seed, numpy_rng
from pipeline.tokens import EMBEDDINGS_FILE, add_tokens_to_pipeline, load_token_file

log = logging.getLogger(__name__)

# generate.batch_size "auto": on a CPU, batching buys little (and costs memory at 512 px); on a GPU,
# the probe's upper bound (images per batch; throughput has long stopped growing there).
CPU_AUTO_BATCH_SIZE = 4
AUTO_BATCH_LIMIT = 64


@dataclass(frozen=True)
class Method:
    """What a method starts from, how it prompts, and which part of the source it re-generates."""

    template: str | None  # "{}" is filled with `fill`; None: one of generate.txt2img_templates per image
    fill: str | None  # "token" (learned class token), "class_name", or None (no class in the prompt)
    fixed_strength: float | None  # None: generate.strength if set, else drawn from {1/k, ..., k/k}
    from_source: bool = True  # False: text-to-image from pure noise, no strength
    region: str | None = None  # "object" or "background": re-generate only that part of the source

    @property
    def needs_tokens(self) -> bool:
        return self.fill == "token"


METHODS = {
    "dafusion": Method("a photo of a {}", "token", None),
    # Real Guidance (He et al. 2022): the class name in the prompt, t0 = 0.5.
    "real-guidance": Method("a photo of a {}", "class_name", 0.5),
    "class-agnostic": Method("a photo", None, None),
    # Vanilla Stable Diffusion synthetic data: the class name in a template, no real image.
    "txt2img": Method(None, "class_name", None, from_source=False),
    # DA-Fusion eq. 7 (object-centric): only the labelled object, or only its background, changes.
    "inpaint-fg": Method("a photo of a {}", "token", None, region="object"),
    "inpaint-bg": Method("a photo of a {}", "token", None, region="background"),
}


@dataclass(frozen=True)
class WorkItem:
    """One synthetic image to make: copy j of source image `image_id` (txt2img: the j-th stand-in for it)."""

    synthetic_id: str
    image_id: str
    j: int
    label: int
    class_name: str
    path: str
    mask_path: str | None
    template: str
    strength: float | None  # None: text-to-image
    seed: int

    @property
    def prompt_key(self) -> tuple[str, str]:
        """What its prompt is made of: (template, class name)."""
        return self.template, self.class_name


def fixed_strength(config: dict, method_name: str) -> float | None:
    """The method's own t0, else generate.strength; None means t0 is drawn per image."""
    method = METHODS[method_name]
    return method.fixed_strength if method.fixed_strength is not None else config["generate"]["strength"]


def strength_for(config: dict, method_name: str, image_id: str, j: int) -> float | None:
    if not METHODS[method_name].from_source:
        return None
    fixed = fixed_strength(config, method_name)
    if fixed is not None:
        return float(fixed)
    k = config["generate"]["num_intensities"]
    draw = numpy_rng(config["seed"], "generate", method_name, image_id, j, "strength").integers(k)
    return (int(draw) + 1) / k


def template_for(config: dict, method_name: str, image_id: str, j: int) -> str:
    """The method's prompt template; text-to-image draws one of generate.txt2img_templates per image."""
    method = METHODS[method_name]
    if method.template is not None:
        return method.template
    templates = config["generate"]["txt2img_templates"]
    draw = numpy_rng(config["seed"], "generate", method_name, image_id, j, "template").integers(len(templates))
    return templates[int(draw)]


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
                    mask_path=row["mask_path"],
                    template=template_for(config, method_name, row["image_id"], j),
                    strength=strength_for(config, method_name, row["image_id"], j),
                    seed=derive_seed(config["seed"], "generate", method_name, row["image_id"], j),
                )
            )
    return items


def plan_batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Items grouped by strength (ascending), each group chunked into batches in (image_id, j) order.

    A method's items either all have a strength or none do (text-to-image): one group then.
    """
    batches = []
    for strength in sorted({item.strength for item in items}, key=lambda s: -1.0 if s is None else s):
        group = [item for item in items if item.strength == strength]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def shard_items(items: list[WorkItem], shard: int, num_shards: int) -> list[WorkItem]:
    """Shard `shard`'s items: the i-th item of each strength group (in (image_id, j) order) goes to
    shard i % num_shards.

    The split depends on neither the batch size nor the machine (with `batch_size: auto` shards on
    different GPUs batch differently), and every shard gets its share of each strength, which fixes
    the number of denoising steps: the same work.
    """
    seen: dict[float | None, int] = {}
    mine = []
    for item in items:
        position = seen.get(item.strength, 0)
        seen[item.strength] = position + 1
        if position % num_shards == shard:
            mine.append(item)
    return mine


def largest_fitting_batch(fits, limit: int) -> int:
    """The largest batch size b <= `limit` with fits(b), for a `fits` that holds up to some size.

    Halves from `limit` until a size fits (each failure is one out-of-memory probe), then bisects
    between that size and the last failure.
    """
    fitting, failing = limit, limit + 1
    while not fits(fitting):
        failing = fitting
        fitting //= 2
        if fitting == 0:
            raise PipelineError("generate.batch_size auto: not even one image fits in memory. Expected a smaller "
                                "model.resolution, model.dtype float16, or another device.")  # fmt: skip
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def resolve_batch_size(config: dict, pipe, device: torch.device) -> int:
    """generate.batch_size, or with "auto" the largest batch whose denoising step fits the GPU
    (up to AUTO_BATCH_LIMIT), and CPU_AUTO_BATCH_SIZE on a CPU."""
    batch_size = config["generate"]["batch_size"]
    if batch_size != "auto":
        return batch_size
    if device.type != "cuda":
        return CPU_AUTO_BATCH_SIZE
    resolution = config["model"]["resolution"]
    guided = sdedit.use_guidance(pipe, config["generate"]["guidance_scale"])
    start = time.perf_counter()
    chosen = largest_fitting_batch(lambda b: sdedit.fits_in_memory(pipe, b, resolution, guided), AUTO_BATCH_LIMIT)
    log.info(
        "generate.batch_size auto: %d images per batch fit %s at %d px %s (probed in %.1fs)",
        chosen, torch.cuda.get_device_name(device), resolution, pipe.unet.dtype, time.perf_counter() - start,
    )  # fmt: skip
    return chosen


def _read_subset(subset_path: Path) -> list[dict]:
    rows, _ = read_manifest(subset_path)
    if not rows:
        raise PipelineError(f"subset {subset_path} has no images. Expected at least one row.")
    ids = [row["image_id"] for row in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PipelineError(f"subset {subset_path}: image_id values must be unique. Got duplicates {duplicates[:5]}")
    return rows


def _check_masks(subset_path: Path, method_name: str, rows: list[dict]) -> None:
    region = METHODS[method_name].region
    missing = sorted(row["image_id"] for row in rows if row["mask_path"] is None)
    if region is not None and missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PipelineError(
            f"subset {subset_path}: method {method_name!r} re-generates only the {region} and needs each image's "
            f"mask. Got mask_path null for image {missing[0]!r}{more}."
        )


def _check_arguments(config: dict, method_name: str, tokens_dir: Path | None, shard: int, num_shards: int) -> None:
    if method_name not in METHODS:
        raise PipelineError(f"unknown generation method {method_name!r}. Expected one of {sorted(METHODS)}.")
    if METHODS[method_name].needs_tokens and tokens_dir is None:
        raise PipelineError(f"method {method_name!r} prompts with learned class tokens. Expected a tokens folder, got none.")
    if tokens_dir is not None:
        load_token_file(tokens_dir)  # names a missing or broken file now, before the model loads
    if not 0 <= shard < num_shards:
        raise PipelineError(f"shard {shard} of {num_shards}: expected 0 <= shard < num_shards.")
    if not METHODS[method_name].from_source:
        for i, template in enumerate(config["generate"]["txt2img_templates"]):
            if "{}" not in template:
                raise PipelineError(
                    f"generate.txt2img_templates[{i}] {template!r} has no '{{}}'. Expected a place for the class name."
                )
        return
    check_denoising_steps(config, method_name)


def check_denoising_steps(config: dict, method_name: str) -> None:
    """Refuse settings where the lowest strength the method draws runs no denoising step."""
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


# generate settings that change no image of a shard: how it is batched and flushed, and what the
# workflow does around it. A resumed job ignores them, so lowering batch_size after an out-of-memory
# error keeps the flushed images. (On a GPU a batch size may move a pixel by a level or two, as
# in an uninterrupted run at another batch size; the workflow does not rerun for it either.)
RESUME_IGNORES = ("batch_size", "flush_every", "methods", "num_shards", "export_dir")


def _provenance(config: dict, method_name, subset_path, tokens_dir, shard, num_shards, device, dtype) -> dict:
    """The shard's key-value metadata."""
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
        **cpu_numerics(device),
    }


def _resume_key(config: dict, provenance: dict) -> dict:
    """What a partial run must match to be resumed: the provenance, with a config hash blind to RESUME_IGNORES."""
    generate = {k: v for k, v in config["generate"].items() if k not in RESUME_IGNORES}
    return {**provenance, "config_hash": value_hash({"seed": config["seed"], "model": config["model"], "generate": generate})}


def _partial_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".partial")


def _load_partial(partial_dir: Path, resume_key: dict) -> list[pa.Table]:
    """Tables flushed by an earlier attempt of this very job; a stale folder is discarded.

    Only the holder of the output's lock calls this, so the folder is no other live job's.
    """
    run_file = partial_dir / "run.json"
    if partial_dir.is_dir() and run_file.is_file() and read_json(run_file) == resume_key:
        return [read_parquet(part) for part in sorted(partial_dir.glob("part-*.parquet"))]
    if partial_dir.exists():
        log.warning("discarding %s: it was written by a different run", partial_dir)
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(parents=True)
    write_json(run_file, resume_key)
    return []


def _check_complete(table: pa.Table, expected: set[str], out_path: Path, partial_dir: Path) -> None:
    """Refuse a merge whose synthetic_ids are not exactly `expected`, each once."""
    ids = table.column("synthetic_id").to_pylist()
    duplicates = sorted(sid for sid, n in Counter(ids).items() if n > 1)
    missing, unplanned = sorted(expected - set(ids)), sorted(set(ids) - expected)
    if duplicates or missing or unplanned:
        raise PipelineError(
            f"{partial_dir}: the flushed parts do not make up {out_path}. Expected each of the shard's "
            f"{len(expected)} planned images (less skipped sources) once; got {len(missing)} missing "
            f"{missing[:3]}, {len(unplanned)} unplanned {unplanned[:3]}, {len(duplicates)} duplicated "
            f"{duplicates[:3]}. Nothing was written; delete the folder and rerun."
        )


def _prompt(method: Method, template: str, class_name: str, class_tokens: dict[str, str]) -> str:
    if method.fill == "token":
        return template.format(class_tokens[class_name])
    if method.fill == "class_name":
        return template.format(class_name)
    return template


def object_region(mask_path: str, image_id: str, size: tuple[int, int], dilation: int) -> np.ndarray:
    """Boolean [H,W] map of image `image_id`'s labelled object (non-zero mask pixels) grown by `dilation` px.

    The margin lets inpainting re-draw the object's outline too (masks are rarely pixel-exact), and for
    the background mode keeps a rim of context around the object.
    """
    mask = open_image(mask_path)
    if mask.size != size:
        raise PipelineError(
            f"mask {mask_path} of image {image_id!r} is {mask.size[0]}x{mask.size[1]}. "
            f"Expected the image's size {size[0]}x{size[1]}."
        )
    obj = np.asarray(mask).any(axis=2)
    if not obj.any():
        raise PipelineError(
            f"mask {mask_path} of image {image_id!r} marks no object pixel. Expected some non-zero pixels."
        )
    return distance_transform_edt(~obj) <= dilation


class _Sources:
    """Source images' sizes, VAE latent distributions and re-generated regions, made once each on first use."""

    def __init__(self, pipe, resolution: int, method: Method, mask_dilation: int):
        self.pipe, self.resolution, self.method, self.mask_dilation = pipe, resolution, method, mask_dilation
        self.sizes: dict[str, tuple[int, int]] = {}
        self.images: dict[str, Image.Image] = {}  # only for inpainting, which pastes the source back
        self.latents: dict[str, object] = {}
        self.regions: dict[str, np.ndarray] = {}

    def image(self, item: WorkItem) -> Image.Image:
        if item.image_id in self.images:
            return self.images[item.image_id]
        image = open_image(item.path)
        self.sizes[item.image_id] = image.size
        if self.method.region is not None:
            self.images[item.image_id] = image
        return image

    def load(self, item: WorkItem) -> None:
        """Decode, encode and (inpainting) read the mask of `item`'s source now; PipelineError if it is bad."""
        self.latent_dist(item)
        if self.method.region is not None:
            self.region(item)

    def latent_dist(self, item: WorkItem):
        if item.image_id not in self.latents:
            self.latents[item.image_id] = sdedit.encode_source(self.pipe, self.image(item), self.resolution)
        return self.latents[item.image_id]

    def region(self, item: WorkItem) -> np.ndarray:
        """Boolean [H,W] map of the part of the source the method re-generates."""
        if item.image_id not in self.regions:
            if item.mask_path is None:
                raise PipelineError(
                    f"image {item.image_id!r} has no mask (mask_path null). Expected a mask: this method "
                    f"re-generates only the {self.method.region}."
                )
            obj = object_region(item.mask_path, item.image_id, self.image(item).size, self.mask_dilation)
            self.regions[item.image_id] = obj if self.method.region == "object" else ~obj
        return self.regions[item.image_id]

    def keep_latents(self, item: WorkItem, latent_shape: tuple[int, int]) -> torch.Tensor:
        """[1,1,h,w] latent mask, 1 where the source is kept; a latent cell touching the region is re-generated."""
        region = torch.from_numpy(self.region(item)).to(self.pipe.device, self.pipe.unet.dtype)
        return 1 - torch.nn.functional.adaptive_max_pool2d(region[None, None], latent_shape)


def _run_batch(pipe, method, batch, sources, prompt_embeds, negative_embeds, config) -> list[Image.Image]:
    """The batch's images: at the model's resolution for text-to-image, else at each source's size."""
    generate = config["generate"]
    steps, guidance_scale = generate["num_inference_steps"], generate["guidance_scale"]
    generators = [torch.Generator().manual_seed(item.seed) for item in batch]
    conditions = torch.cat([prompt_embeds[item.prompt_key] for item in batch])
    if not method.from_source:
        resolution = config["model"]["resolution"]
        noise = torch.cat([sdedit.txt2img_noise(pipe, resolution, generator) for generator in generators])
        return sdedit.txt2img(pipe, noise, conditions, negative_embeds, steps, guidance_scale)

    starts = [sdedit.start_latents(pipe, sources.latent_dist(item), g) for item, g in zip(batch, generators)]
    clean = torch.cat([clean for clean, _ in starts])
    noise = torch.cat([noise for _, noise in starts])
    keep = None
    if method.region is not None:
        keep = torch.cat([sources.keep_latents(item, clean.shape[2:]) for item in batch])
    strength = batch[0].strength
    images = sdedit.sdedit(pipe, clean, noise, conditions, negative_embeds, strength, steps, guidance_scale, keep=keep)
    outputs = []
    for item, image in zip(batch, images):
        size = sources.sizes[item.image_id]
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        if method.region is not None:
            # The latents only approximate the kept part (VAE round trip): paste the exact source back.
            region = Image.fromarray(sources.region(item).astype(np.uint8) * 255)
            image = Image.composite(image, sources.image(item), region)
        outputs.append(image)
    return outputs


@dataclass(frozen=True)
class Outcome:
    """What became of a work item: the item as last drawn (its seed), its image and the safety verdict."""

    item: WorkItem
    image: Image.Image
    nsfw: bool | None  # None: no safety checker ran
    resamples: int  # re-draws after a flagged image


def resample_seed(config: dict, method_name: str, item: WorkItem, attempt: int) -> int:
    """Seed of re-draw `attempt` (1, 2, ...) of copy (image_id, j) after the safety checker flagged it."""
    return derive_seed(config["seed"], "generate", method_name, item.image_id, item.j, "resample", attempt)


def _checked(batch: list[WorkItem], make, checker, config: dict, method_name: str) -> list[Outcome]:
    """Make `batch` with `make` and re-draw flagged images, at most generate.max_resamples times each.

    A re-draw keeps the copy's strength and prompt and takes a new seed (`resample_seed`), which
    the row records, so the stored image reproduces like any other. An image still flagged after
    the last re-draw is kept as a black image with nsfw True (as diffusers blacks it out): the
    shard keeps one row per copy, and the train stage leaves such rows out.
    """
    max_resamples = config["generate"]["max_resamples"]
    outcomes: dict[str, Outcome] = {}
    attempt, drawn = 0, batch
    while drawn:
        images = make(drawn)
        redraw = []
        for item, image, flagged in zip(drawn, images, checker.flags(images)):
            if not flagged:
                outcomes[item.synthetic_id] = Outcome(item, image, False, attempt)
            elif attempt == max_resamples:
                outcomes[item.synthetic_id] = Outcome(item, Image.new("RGB", image.size), True, attempt)
            else:
                redraw.append(replace(item, seed=resample_seed(config, method_name, item, attempt + 1)))
        attempt, drawn = attempt + 1, redraw
    return [outcomes[item.synthetic_id] for item in batch]


def _rows(outcomes: list[Outcome], prompts, method_name, config) -> list[dict]:
    rows = []
    for outcome in outcomes:
        item, image = outcome.item, outcome.image
        rows.append(
            {
                "synthetic_id": item.synthetic_id,
                "image_id": item.image_id,
                "label": item.label,
                "class_name": item.class_name,
                "method": method_name,
                "strength": item.strength,
                "seed": item.seed,
                "prompt": prompts[item.prompt_key],
                "guidance_scale": config["generate"]["guidance_scale"],
                "num_inference_steps": config["generate"]["num_inference_steps"],
                "model": config["model"]["id"],
                "image": encode_png(image),
                "width": image.size[0],
                "height": image.size[1],
                "nsfw": outcome.nsfw,
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
    image_id then j) and as key-value metadata the run's provenance plus `resamples`
    ({synthetic_id: safety re-draws}, only images re-drawn). Holds `<out_path>.lock` throughout
    (PipelineError at once if another process holds it). Returns a summary.
    """
    subset_path, out_path = Path(subset_path), Path(out_path)
    tokens_dir = Path(tokens_dir) if tokens_dir is not None else None
    _check_arguments(config, method, tokens_dir, shard, num_shards)
    with output_lock(out_path):
        return _write_shard(config, subset_path, tokens_dir, method, shard, num_shards, out_path)


def _write_shard(config, subset_path, tokens_dir, method, shard, num_shards, out_path) -> dict:
    """generate_shard's work, by the holder of the output's lock: resume, generate, merge."""
    generate = config["generate"]
    rows = _read_subset(subset_path)
    if generate["on_bad_image"] == "error":
        _check_masks(subset_path, method, rows)  # before the model loads; with skip, per image as it loads
    items = plan_items(config, method, rows)
    mine = shard_items(items, shard, num_shards)

    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["model"]["dtype"], device)
    provenance = _provenance(config, method, subset_path, tokens_dir, shard, num_shards, device, dtype)
    partial_dir = _partial_dir(out_path)
    tables = _load_partial(partial_dir, _resume_key(config, provenance))
    done = {sid for table in tables for sid in table.column("synthetic_id").to_pylist()}
    todo = [item for item in mine if item.synthetic_id not in done]
    if done:
        log.info("resuming %s: %d images already flushed, %d to go", out_path, len(done), len(todo))

    start = time.perf_counter()
    generated = 0
    if todo:
        desc = f"generate {method} shard {shard}/{num_shards}"
        generated = _generate_items(config, method, tokens_dir, todo, partial_dir, len(tables), device, dtype, desc)
    parts = sorted(partial_dir.glob("part-*.parquet"))
    tables = [read_parquet(part) for part in parts]
    metadata = [read_metadata(part) for part in parts]
    resamples = {sid: n for meta in metadata for sid, n in meta["resamples"].items()}
    skipped = {image_id: reason for meta in metadata for image_id, reason in meta.get("skipped", {}).items()}
    seconds = time.perf_counter() - start

    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    _check_complete(table, {item.synthetic_id for item in mine if item.image_id not in skipped}, out_path, partial_dir)
    order = {item.synthetic_id: i for i, item in enumerate(items)}
    ids = table.column("synthetic_id").to_pylist()
    # Typed indices: an empty Python list would be a null array, which `take` rejects (a shard
    # with no batch, when there are fewer batches than shards).
    table = table.take(pa.array(sorted(range(table.num_rows), key=lambda i: order[ids[i]]), type=pa.int64()))
    # Images re-drawn because the safety checker flagged them: synthetic_id -> re-draws.
    # Source images left out by generate.on_bad_image: skip: image_id -> why.
    write_parquet(
        out_path,
        shard_file_table(table, read_metadata(subset_path)["classes"]),
        metadata={**provenance, "resamples": dict(sorted(resamples.items())), "skipped": dict(sorted(skipped.items()))},
    )
    shutil.rmtree(partial_dir)

    summary = {
        "out": str(out_path),
        "method": method,
        "shard": shard,
        "num_shards": num_shards,
        "images": table.num_rows,
        "generated": generated,
        "resampled": len(resamples),
        "nsfw": sum(1 for flag in table.column("nsfw").to_pylist() if flag),
        "resumed": len(done),
        "skipped_sources": len(skipped),
        "skipped_images": sum(1 for item in mine if item.image_id in skipped),
        "seconds": round(seconds, 3),
        "images_per_s": round(generated / seconds, 3) if generated else 0.0,
    }
    log.info(
        "generate %s shard %d/%d: %d images in %s (%d generated in %.1fs, %.2f images/s; %d resumed; "
        "%d source images skipped)",
        method, shard, num_shards, table.num_rows, out_path, generated, seconds, summary["images_per_s"], len(done),
        len(skipped),
    )  # fmt: skip
    return summary


def _generate_items(config, method_name, tokens_dir, items, partial_dir, first_part, device, dtype, desc) -> int:
    """Make `items` in batches, flushing rows to numbered part files in `partial_dir`; return images made."""
    generate = config["generate"]
    method = METHODS[method_name]
    pipe = sdedit.load_img2img(config["model"], generate, device, dtype)
    checker = sdedit.SafetyChecker(config["model"]["id"], device, dtype) if generate["safety_checker"] else None
    batches = plan_batches(items, resolve_batch_size(config, pipe, device))
    class_names = sorted({item.class_name for item in items})
    class_tokens = add_tokens_to_pipeline(pipe, tokens_dir, class_names) if method.needs_tokens else {}
    keys = sorted({item.prompt_key for item in items})
    prompts = {key: _prompt(method, *key, class_tokens) for key in keys}
    sources = _Sources(pipe, config["model"]["resolution"], method, generate["mask_dilation"])

    resamples: dict[str, int] = {}
    bad: dict[str, str] = {}  # sources skipped so far: image_id -> why
    made = 0
    parts = _BackgroundParts(partial_dir, first_part)
    with parts, torch.inference_mode(), sdedit.batch_invariant_kernels(device):
        prompt_embeds = {key: sdedit.encode_prompt(pipe, prompt) for key, prompt in prompts.items()}
        guided = sdedit.use_guidance(pipe, generate["guidance_scale"])
        negative_embeds = sdedit.encode_negative_prompt(pipe) if guided else None

        def make(batch: list[WorkItem]) -> list[Image.Image]:
            return _run_batch(pipe, method, batch, sources, prompt_embeds, negative_embeds, config)

        for count, batch in enumerate(progress(batches, len(batches), desc), 1):
            if method.from_source:
                batch = _loadable(batch, sources, bad, generate["on_bad_image"])
            made += len(batch)
            if not batch:
                outcomes = []
            elif checker is None:
                outcomes = [Outcome(item, image, None, 0) for item, image in zip(batch, make(batch))]
            else:
                outcomes = _checked(batch, make, checker, config, method_name)
            parts.add(functools.partial(_rows, outcomes, prompts, method_name, config))
            resamples.update((o.item.synthetic_id, o.resamples) for o in outcomes if o.resamples)
            if count % generate["flush_every"] == 0 or count == len(batches):
                # Every part lists all skips so far: the merged record is the same, whichever parts survive.
                parts.flush({"resamples": resamples, "skipped": dict(bad)})
                resamples = {}
    return made


class _BackgroundParts:
    """Encodes finished batches to rows and writes them as numbered part files, on one background
    thread, in the order given, while the caller's thread goes on with the next batch.

    PNG encoding takes about 30 ms per 512 px image on one CPU core (zlib, which releases the GIL),
    about what a fast GPU spends denoising it: done inline, the GPU would idle while the host
    encodes. At most `max_jobs` jobs wait, so finished images do not pile up in memory when the
    host is the slower side. After a job fails no other job runs, and the caller's next `add` or
    `flush` raises its error. Used as a context: leaving it waits for the jobs, so the parts
    submitted before an error in the caller are still written (a restarted job resumes after them).
    """

    def __init__(self, partial_dir: Path, first_part: int, max_jobs: int = 3):
        self.partial_dir, self.part, self.max_jobs = partial_dir, first_part, max_jobs
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-rows")
        self.jobs: deque[Future] = deque()
        self.batches: list[Future] = []  # encoded rows of the part being filled
        self.error: BaseException | None = None  # of the first job that failed

    def add(self, encode: Callable[[], list[dict]]) -> None:
        self.batches.append(self._submit(encode))

    def flush(self, metadata: dict) -> None:
        batches, path = self.batches, self.partial_dir / f"part-{self.part:05d}.parquet"

        def write() -> None:
            rows = [row for batch in batches for row in batch.result()]
            write_parquet(path, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), metadata=metadata)

        self._submit(write)
        self.batches, self.part = [], self.part + 1

    def _submit(self, job) -> Future:
        self._raise_error()
        future = self.worker.submit(self._run, job)
        self.jobs.append(future)
        while len(self.jobs) > self.max_jobs:
            self.jobs.popleft().exception()
        return future

    def _run(self, job):
        if self.error is None:
            try:
                return job()
            except BaseException as exc:
                self.error = exc
                raise
        return None

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> _BackgroundParts:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.worker.shutdown(wait=True)
        if exc_type is None:
            self._raise_error()


def _loadable(batch: list[WorkItem], sources: _Sources, bad: dict[str, str], on_bad_image: str) -> list[WorkItem]:
    """The items of `batch` whose source (and, for inpainting, mask) loads.

    A source that fails stops the job (on_bad_image "error"), or (on "skip") is logged once and
    recorded in `bad` as image_id -> reason.
    """
    kept = []
    for item in batch:
        if item.image_id in bad:
            continue
        try:
            sources.load(item)
        except PipelineError as exc:
            if on_bad_image == "error":
                raise PipelineError(f"{exc} (set generate.on_bad_image: skip to leave such images out)") from None
            log.warning("skipping source image %r and its synthetic copies: %s", item.image_id, exc)
            bad[item.image_id] = str(exc)
            continue
        kept.append(item)
    return kept
