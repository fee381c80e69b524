"""The `generate` stage: synthetic images of a few-shot subset into Parquet shards.

DA-Fusion (Trabucco et al., section 4.1 eq. 5) noises a real image to timestep t0 and denoises it
towards a prompt naming the class with its learned token; section 4.2 draws t0 per synthetic image
uniformly from {1/k, ..., k/k}. The methods differ in prompt, strength rule, starting point and
re-generated region; each is one entry of `pipeline.methods.METHODS`, and its `kind` picks the
maker (`pipeline.makers`) that turns a batch of work items into images: `img2img` (SDEdit of the
whole image or, by blended-latent inpainting, of only the object or only its background) and
`txt2img` (pure noise, a class-name template drawn per image from `generate.txt2img_templates`,
images at the model's resolution; it still makes `num_per_image` images per real image, whose
`image_id` they carry, so that counts match and the train stage can swap a real image for one of
its synthetic versions). Each module says how its rows reproduce with stock diffusers. A method
with an adapter (`dreambooth`, `dreambooth-sdedit`) runs on the subset's per-class DreamBooth-LoRA
adapters, fused into the UNet one class at a time, its batches grouped by class; with
`erase.enabled` every method runs on the UNet with the class names erased (`pipeline.adapters`).

The job reads nothing of the config but its `GenerateSettings` (pipeline.settings.generate), whose key is
also the rule's params and the resume key.

Work plan (`pipeline.generate_plan`). Copy j of source image `image_id` owns the seed
derive_seed(seed, "generate", method, image_id, j), from which its strength, template and noise
come alone; copies are split over shards and batched by strength. Neither the shard count nor the
batch size (`generate.batch_size: auto` probes the GPU for the largest batch that fits) changes a
seed, a strength or a prompt, and on CPU not a pixel either (`sdedit.batch_invariant_kernels`): the
union of the shards is byte for byte the 1-shard result at any batch size. GPU kernels sum in
batch-size-dependent orders, so there a pixel may move by a level or two.

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

Resume (`pipeline.shard_parts`). Finished batches are flushed every `flush_every` batches into
`<out>.partial/`; a restarted job with the same resume key skips the images there (whatever batch
size made them). The merge first checks that the merged synthetic_ids are the shard's planned ids
less those of skipped sources, each once, and writes nothing otherwise. A crash never leaves a file
at `out_path`.

One writer per shard. The job holds an exclusive lock on `<out>.lock` (pipeline.io.output_lock)
from start to end, and a second process with the same output (an orphan of a lost Snakemake
controller still running, or a second command with the same --out) stops at once naming the
holder's pid and host, rather than adopting the first one's `.partial/` folder: otherwise the
first to finish merges and deletes the folder, and the other merges only its own parts.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from pipeline import PipelineError, __version__, adapters, methods, sdedit, shard_parts
from pipeline.captions import read_captions
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.generate_plan import WorkItem, check_templates, plan_batches, plan_items, resample_seed, shard_items
from pipeline.checkpoint import weight_hashes
from pipeline.hashing import value_hash
from pipeline.io import encode_png, file_sha256, output_lock, read_metadata, read_parquet, write_parquet
from pipeline.makers import MAKERS
from pipeline.manifest import SHARD_SCHEMA, read_manifest, shard_file_table
from pipeline.methods import Method
from pipeline.progress import progress
from pipeline.settings.generate import GenerateSettings
from pipeline.layout import EMBEDDINGS_FILE
from pipeline.tokens import add_tokens_to_pipeline, load_token_file

log = logging.getLogger(__name__)

# generate.batch_size "auto": on a CPU, batching buys little (and costs memory at 512 px); on a GPU,
# the probe's upper bound (images per batch; throughput has long stopped growing there).
CPU_AUTO_BATCH_SIZE = 4
AUTO_BATCH_LIMIT = 64


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


def resolve_batch_size(settings: GenerateSettings, pipe, device: torch.device) -> int:
    """generate.batch_size, or with "auto" the largest batch whose denoising step fits the GPU
    (up to AUTO_BATCH_LIMIT), and CPU_AUTO_BATCH_SIZE on a CPU."""
    if settings.batch_size != "auto":
        return settings.batch_size
    if device.type != "cuda":
        return CPU_AUTO_BATCH_SIZE
    resolution = settings.resolution
    guided = sdedit.use_guidance(pipe, settings.guidance_scale)
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


def _check_masks(subset_path: Path, method: Method, rows: list[dict]) -> None:
    missing = sorted(row["image_id"] for row in rows if row["mask_path"] is None)
    if "masks" in method.needs and missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PipelineError(
            f"subset {subset_path}: method {method.name!r} re-generates only the {method.region} and needs each "
            f"image's mask. Got mask_path null for image {missing[0]!r}{more}."
        )


def _check_arguments(settings: GenerateSettings, tokens_dir, adapter_dir, erased_dir, captions_path, shard: int, num_shards: int) -> None:
    method = methods.get(settings.method)
    if "tokens" in method.needs and tokens_dir is None:
        raise PipelineError(f"method {method.name!r} prompts with learned class tokens. Expected a tokens folder, got none.")
    if method.captions != (captions_path is not None):
        raise PipelineError(f"method {method.name!r} " + ("mixes the subset's captions. Expected a caption file (the caption stage), got none." if method.captions
                            else f"does not use captions. Got a caption file {captions_path}; expected none."))
    if captions_path is not None:
        read_captions(captions_path)  # names a missing or broken file now, before the model loads
    if method.adapter == "mvc" and adapter_dir is not None:
        adapters.check_mvc_model(adapter_dir)
    if method.adapter and adapter_dir is None:
        raise PipelineError(f"method {method.name!r} generates with the subset's {method.adapter} adapter. Expected an adapter folder, got none.")
    if not method.adapter and adapter_dir is not None:
        raise PipelineError(f"method {method.name!r} uses the base model. Got an adapter folder {adapter_dir}; expected none.")
    if settings.erased != (erased_dir is not None):
        raise PipelineError(
            f"erase.enabled is {str(settings.erased).lower()}: expected {'an erased model folder (the erase stage) ' if settings.erased else 'no erased model folder, '}"
            f"got {erased_dir if erased_dir is not None else 'none'}."
        )
    if tokens_dir is not None:
        load_token_file(tokens_dir)  # names a missing or broken file now, before the model loads
    if not 0 <= shard < num_shards:
        raise PipelineError(f"shard {shard} of {num_shards}: expected 0 <= shard < num_shards.")
    MAKERS[method.kind].check(settings)
    check_templates(settings)


def _provenance(settings: GenerateSettings, subset_path, tokens_dir, adapter_dir, erased_dir, captions_path, shard, num_shards, device, dtype) -> dict:
    """The shard's key-value metadata, and (as it is) the resume key of its half-finished job:
    the settings' key hashed, what the job read, and what sets the last bits of its pixels."""
    return {
        "stage": "generate",
        "pipeline_version": __version__,
        "config_hash": value_hash(settings.key()),
        "method": settings.method,
        "shard": shard,
        "num_shards": num_shards,
        "model": settings.model_id,
        "subset": str(subset_path),
        "subset_sha256": file_sha256(subset_path),
        "tokens_sha256": file_sha256(tokens_dir / EMBEDDINGS_FILE) if tokens_dir is not None else None,
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "adapter_sha256": weight_hashes(adapter_dir) if adapter_dir is not None else None,
        "erased": str(erased_dir) if erased_dir is not None else None,
        "erased_sha256": weight_hashes(erased_dir) if erased_dir is not None else None,
        **({"captions": str(captions_path), "captions_sha256": file_sha256(captions_path)} if captions_path is not None else {}),
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        **cpu_numerics(device),
    }


@dataclass(frozen=True)
class Outcome:
    """What became of a work item: the item as last drawn (its seed), its image and the safety verdict."""

    item: WorkItem
    image: Image.Image
    nsfw: bool | None  # None: no safety checker ran
    resamples: int  # re-draws after a flagged image


def _checked(batch: list[WorkItem], make, checker, settings: GenerateSettings) -> list[Outcome]:
    """Make `batch` with `make` and re-draw flagged images, at most generate.max_resamples times each.

    A re-draw keeps the copy's strength and prompt and takes a new seed (`resample_seed`), which
    the row records, so the stored image reproduces like any other. An image still flagged after
    the last re-draw is kept as a black image with nsfw True (as diffusers blacks it out): the
    shard keeps one row per copy, and the train stage leaves such rows out.
    """
    outcomes: dict[str, Outcome] = {}
    attempt, drawn = 0, batch
    while drawn:
        images = make(drawn)
        redraw = []
        for item, image, flagged in zip(drawn, images, checker.flags(images)):
            if not flagged:
                outcomes[item.synthetic_id] = Outcome(item, image, False, attempt)
            elif attempt == settings.max_resamples:
                outcomes[item.synthetic_id] = Outcome(item, Image.new("RGB", image.size), True, attempt)
            else:
                redraw.append(replace(item, seed=resample_seed(settings, item, attempt + 1)))
        attempt, drawn = attempt + 1, redraw
    return [outcomes[item.synthetic_id] for item in batch]


def _rows(outcomes: list[Outcome], prompt_of, settings: GenerateSettings) -> list[dict]:
    rows = []
    for outcome in outcomes:
        item, image = outcome.item, outcome.image
        rows.append(
            {
                "synthetic_id": item.synthetic_id,
                "image_id": item.image_id,
                "label": item.label,
                "class_name": item.class_name,
                "method": settings.method,
                "strength": item.strength,
                "seed": item.seed,
                "prompt": prompt_of(item),
                "guidance_scale": settings.guidance_scale,
                "num_inference_steps": settings.num_inference_steps,
                "model": settings.model_id,
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
    adapter_dir: Path | None = None,
    erased_dir: Path | None = None,
    captions_path: Path | None = None,
) -> dict:
    """Make this shard's synthetic images of the subset with `method`; write them to `out_path`.

    `tokens_dir` is the invert stage's folder (methods that prompt with learned tokens), `adapter_dir`
    the subset's adapted-model folder (methods with an adapter, such as dreambooth), else None;
    `erased_dir` the erase stage's folder exactly when erase.enabled; `captions_path` the caption
    stage's file of the subset (methods that mix captions, such as mvc).

    The only reader of `config`: everything below gets the method's GenerateSettings.
    `out_path` gets one row per synthetic image (pipeline.manifest.SHARD_SCHEMA, sorted by
    image_id then j) and as key-value metadata the run's provenance plus `resamples`
    ({synthetic_id: safety re-draws}, only images re-drawn). Holds `<out_path>.lock` throughout
    (PipelineError at once if another process holds it). Returns a summary.
    """
    settings = GenerateSettings.from_config(config, method)
    subset_path, out_path = Path(subset_path), Path(out_path)
    tokens_dir = Path(tokens_dir) if tokens_dir is not None else None
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    erased_dir = Path(erased_dir) if erased_dir is not None else None
    captions_path = Path(captions_path) if captions_path is not None else None
    _check_arguments(settings, tokens_dir, adapter_dir, erased_dir, captions_path, shard, num_shards)
    folders = _Folders(tokens_dir, adapter_dir, erased_dir, captions_path)
    with output_lock(out_path):
        return _write_shard(settings, subset_path, folders, shard, num_shards, out_path)


@dataclass(frozen=True)
class _Folders:
    """What a job reads besides the subset and the base model (None where its method needs none)."""

    tokens: Path | None
    adapter: Path | None
    erased: Path | None
    captions: Path | None


def _write_shard(settings: GenerateSettings, subset_path, folders: _Folders, shard, num_shards, out_path) -> dict:
    """generate_shard's work, by the holder of the output's lock: resume, generate, merge."""
    method = settings.method
    rows = _read_subset(subset_path)
    if settings.on_bad_image == "error":
        _check_masks(subset_path, methods.get(method), rows)  # before the model loads; with skip, per image
    items = plan_items(settings, rows)
    mine = shard_items(items, shard, num_shards)

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    provenance = _provenance(settings, subset_path, folders.tokens, folders.adapter, folders.erased, folders.captions, shard, num_shards, device, dtype)
    partial = shard_parts.partial_dir(out_path)
    tables = shard_parts.load_partial(partial, provenance)
    done = {sid for table in tables for sid in table.column("synthetic_id").to_pylist()}
    todo = [item for item in mine if item.synthetic_id not in done]
    if done:
        log.info("resuming %s: %d images already flushed, %d to go", out_path, len(done), len(todo))

    start = time.perf_counter()
    generated = 0
    if todo:
        desc = f"generate {method} shard {shard}/{num_shards}"
        generated = _generate_items(settings, folders, todo, partial, len(tables), device, dtype, desc)
    parts = sorted(partial.glob("part-*.parquet"))
    tables = [read_parquet(part) for part in parts]
    metadata = [read_metadata(part) for part in parts]
    resamples = {sid: n for meta in metadata for sid, n in meta["resamples"].items()}
    skipped = {image_id: reason for meta in metadata for image_id, reason in meta.get("skipped", {}).items()}
    conditioning = {sid: record for meta in metadata for sid, record in meta.get("conditioning", {}).items()}
    seconds = time.perf_counter() - start

    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    expected = {item.synthetic_id for item in mine if item.image_id not in skipped}
    shard_parts.check_complete(table, expected, out_path, partial)
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
        metadata={**provenance, "resamples": dict(sorted(resamples.items())), "skipped": dict(sorted(skipped.items())),
                  **({"conditioning": dict(sorted(conditioning.items()))} if conditioning else {})},  # fmt: skip
    )
    shutil.rmtree(partial)

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


def _generate_items(settings: GenerateSettings, folders: _Folders, items, partial, first_part, device, dtype, desc) -> int:
    """Make `items` in batches, flushing rows to numbered part files in `partial`; return images made."""
    method = methods.get(settings.method)
    # An MVC model is a whole checkpoint, fine-tuned from the erased UNet when erase.enabled.
    own_model = method.adapter == "mvc"
    pipe = sdedit.load_img2img(
        str(folders.adapter) if own_model else settings.model_id, device, dtype, scheduler=settings.scheduler,
        channels_last=settings.channels_last, compile=settings.compile,
    )  # fmt: skip
    if folders.erased is not None and not own_model:  # before the adapters, which keep the weights they find as their base
        adapters.apply_erasure(pipe, folders.erased)
    class_adapters = adapters.ClassAdapters(pipe, folders.adapter, settings.adapter_prompt) if method.adapter == "dreambooth" else None
    checker = sdedit.SafetyChecker(settings.model_id, device, dtype) if settings.safety_checker else None
    # An adapted model is one class's: its batches hold one class each.
    batches = plan_batches(items, resolve_batch_size(settings, pipe, device), by_class=class_adapters is not None)
    class_names = sorted({item.class_name for item in items})
    class_tokens = add_tokens_to_pipeline(pipe, folders.tokens, class_names) if "tokens" in method.needs else {}
    # A caption-mixing method makes its own conditioning per image; every other prompts per (template, class).
    keys = sorted({item.prompt_key for item in items}) if not method.captions else []
    prompts = {key: method.prompt(*key, class_tokens) for key in keys}
    extra = {"captions": read_captions(folders.captions)} if method.captions else {}
    maker = MAKERS[method.kind](pipe, settings, method, **extra)
    prompt_of = maker.prompt if method.captions else (lambda item: prompts[item.prompt_key])
    records = getattr(maker, "records", None)  # per-image conditioning records of makers that keep them

    resamples: dict[str, int] = {}
    bad: dict[str, str] = {}  # sources skipped so far: image_id -> why
    made = 0
    parts = shard_parts.BackgroundParts(partial, first_part)
    with parts, torch.inference_mode(), sdedit.batch_invariant_kernels(device):
        prompt_embeds = {key: sdedit.encode_prompt(pipe, prompt) for key, prompt in prompts.items()}
        guided = sdedit.use_guidance(pipe, settings.guidance_scale)
        negative_embeds = sdedit.encode_negative_prompt(pipe) if guided else None

        def make(batch: list[WorkItem]) -> list[Image.Image]:
            conditions = torch.cat([prompt_embeds[item.prompt_key] for item in batch]) if prompt_embeds else None
            return maker.make(batch, conditions, negative_embeds)

        for count, batch in enumerate(progress(batches, len(batches), desc), 1):
            batch = _loadable(batch, maker, bad, settings.on_bad_image)
            if class_adapters is not None and batch:
                class_adapters.use(batch[0].class_name)
            made += len(batch)
            if not batch:
                outcomes = []
            elif checker is None:
                outcomes = [Outcome(item, image, None, 0) for item, image in zip(batch, make(batch))]
            else:
                outcomes = _checked(batch, make, checker, settings)
            parts.add(functools.partial(_rows, outcomes, prompt_of, settings))
            resamples.update((o.item.synthetic_id, o.resamples) for o in outcomes if o.resamples)
            if count % settings.flush_every == 0 or count == len(batches):
                # Every part lists all skips so far: the merged record is the same, whichever parts survive.
                kept = {"conditioning": dict(records)} if records else {}
                parts.flush({"resamples": resamples, "skipped": dict(bad), **kept})
                resamples = {}
                if records:
                    records.clear()
    return made


def _loadable(batch: list[WorkItem], maker, bad: dict[str, str], on_bad_image: str) -> list[WorkItem]:
    """The items of `batch` whose starting point (source image, mask) loads.

    A source that fails stops the job (on_bad_image "error"), or (on "skip") is logged once and
    recorded in `bad` as image_id -> reason.
    """
    kept = []
    for item in batch:
        if item.image_id in bad:
            continue
        try:
            maker.load(item)
        except PipelineError as exc:
            if on_bad_image == "error":
                raise PipelineError(f"{exc} (set generate.on_bad_image: skip to leave such images out)") from None
            log.warning("skipping source image %r and its synthetic copies: %s", item.image_id, exc)
            bad[item.image_id] = str(exc)
            continue
        kept.append(item)
    return kept
