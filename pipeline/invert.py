"""Textual inversion: learn one new pseudo-word per class (DA-Fusion section 4.1).

For each class, a new token `<class-slug>` (with `num_vectors` embedding vectors) is added to
Stable Diffusion's tokenizer and trained so that "a photo of a <class-slug>" reconstructs the
class's few-shot images under the usual denoising loss; the UNet, VAE and text encoder stay frozen.

How this differs from the straightforward loop (diffusers examples/textual_inversion):

* The new vectors are a separate fp32 parameter looked up beside the frozen vocabulary
  (`_VocabularyWithNewTokens`), so no other weight can change and the optimizer state covers
  only the new rows instead of the whole 49,408-row embedding matrix.
* Every training image and its horizontal flip is VAE-encoded once, up front, into a
  `finetune.LatentCache`; the loop, checkpoints and mixed precision are `pipeline.finetune`'s.
* Every random draw of step s comes from a generator seeded by (seed, "invert", classes, s), so
  a run resumed from a checkpoint ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import PipelineError, finetune, layout
from pipeline.checkpoint import verify_if_local
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.finetune import checkpoint_dir_for
from pipeline.hashing import value_hash
from pipeline.io import atomic_path, open_image, output_lock, read_json
from pipeline.manifest import read_manifest, training_images_by_class
from pipeline.rng import derive_seed, torch_generator
from pipeline.settings.invert import InvertSettings
from pipeline.tokens import (
    TOKENS_FILE,
    format_prompt,
    load_token_file,
    token_for_class,
    vector_tokens,
    write_token_files,
)

log = logging.getLogger(__name__)

STAGE = "invert"
FLIP_PROBABILITY = 0.5
VAE_ENCODE_BATCH = 8


@dataclass
class Components:
    """The parts of a Stable Diffusion checkpoint that textual inversion needs."""

    model_id: str
    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object
    device: torch.device
    dtype: torch.dtype  # of the frozen VAE and UNet; also the autocast dtype


@dataclass
class ClassLatents:
    """Latents of the n training images: rows [0, n) as given, rows [n, 2n) mirrored (if flip)."""

    latents: finetune.LatentCache
    class_index: torch.Tensor  # [n], index into the run's classes
    count: int


class _VocabularyWithNewTokens(nn.Module):
    """The frozen token embedding followed by trainable rows for ids >= its vocabulary size."""

    def __init__(self, frozen: nn.Embedding, new_rows: torch.Tensor, first_new_id: int):
        super().__init__()
        if first_new_id < frozen.num_embeddings:
            raise ValueError(f"new token ids start at {first_new_id}, inside the frozen vocabulary of {frozen.num_embeddings}")
        self.frozen = frozen
        self.new_rows = new_rows
        self.first_new_id = first_new_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        old = self.frozen(input_ids.masked_fill(is_new, 0))
        new = self.new_rows[(input_ids - self.first_new_id).clamp(min=0)]
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)


@contextlib.contextmanager
def _new_token_rows(text_encoder: nn.Module, new_rows: torch.Tensor, first_new_id: int):
    """Let `text_encoder` embed the new tokens from `new_rows` for the duration of the block."""
    frozen = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(_VocabularyWithNewTokens(frozen, new_rows, first_new_id))
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(frozen)


def load_components(model_id: str, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool = False) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and DDPM schedule of a diffusers-format checkpoint, frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    verify_if_local(model_id)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
        # The text encoder stays fp32: gradients flow through it to the new vectors; autocast
        # still runs its matmuls in half precision on CUDA.
        text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"model.id: cannot load a Stable Diffusion checkpoint from {model_id!r}: {exc}") from None
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.eval()
        model.to(device)
    if gradient_checkpointing:
        # diffusers checkpoints UNet blocks whenever grad is enabled, even in eval mode.
        unet.enable_gradient_checkpointing()
    return Components(model_id, tokenizer, text_encoder, vae, unet, noise_scheduler, device, dtype)


def add_class_tokens(components: Components, class_tokens: dict[str, str], init: str, num_vectors: int) -> torch.Tensor:
    """Add every class's vector tokens to the tokenizer; return their initial vectors [classes * num_vectors, dim].

    Rows are in the order of `class_tokens`, `num_vectors` consecutive rows per class, each a copy
    of the initializer's embedding (`init`, or the class name when init is "class_name"). An
    initializer of several tokens ("traffic light", "aeroplane" for CLIP's BPE) starts from the mean of
    their embeddings: the point nearest to all its parts, so a one-vector token can grow towards any.
    """
    tokenizer = components.tokenizer
    vocab = tokenizer.get_vocab()
    embedding = components.text_encoder.get_input_embeddings().weight
    rows = []
    for class_name, token in class_tokens.items():
        taken = [t for t in vector_tokens(token, num_vectors) if t in vocab]
        if taken:
            raise PipelineError(
                f"class {class_name!r}: token {taken[0]!r} is already in the vocabulary of {components.model_id}. "
                "Expected a new word; rename the class or use another model."
            )
        word = class_name if init == "class_name" else init
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise PipelineError(
                f"invert.init: the initializer {word!r} (class {class_name!r}) is no token at all for the tokenizer "
                f"of {components.model_id}. Expected a word."
            )
        rows.append(embedding[ids].detach().float().mean(dim=0).expand(num_vectors, -1))
    added = [t for token in class_tokens.values() for t in vector_tokens(token, num_vectors)]
    tokenizer.add_tokens(added)
    ids = tokenizer.convert_tokens_to_ids(added)
    first = embedding.shape[0]
    if ids != list(range(first, first + len(added))):
        raise PipelineError(
            f"{components.model_id}: the tokenizer has {len(tokenizer) - len(added)} entries but the text encoder "
            f"embeds {first}. Expected them to agree."
        )
    return torch.cat(rows).clone()


def _load_pixels(paths: list[Path], resolution: int) -> torch.Tensor:
    """Images as [n, 3, resolution, resolution] in [-1, 1], resized (not cropped) as the reference does."""
    pixels = []
    for path in paths:
        image = open_image(path).resize((resolution, resolution), resample=3)  # 3 = PIL bicubic
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(pixels)


@torch.no_grad()
def encode_latents(components: Components, class_paths: list[list[Path]], resolution: int, flip: bool) -> ClassLatents:
    """VAE-encode every image of every class (and its mirror image when `flip`), once."""
    paths = [path for paths in class_paths for path in paths]
    class_index = torch.tensor([c for c, paths in enumerate(class_paths) for _ in paths])
    pixels = _load_pixels(paths, resolution)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    batches = [pixels[start : start + VAE_ENCODE_BATCH].to(components.device, components.dtype) for start in range(0, len(pixels), VAE_ENCODE_BATCH)]
    latents = finetune.LatentCache.of([components.vae.encode(batch).latent_dist for batch in batches])
    return ClassLatents(latents, class_index.to(components.device), len(paths))


def _prompt_ids(components: Components, class_tokens: list[str], templates: list[str], num_vectors: int) -> torch.Tensor:
    """Token ids [classes, templates, max_length] of every (class, template) prompt."""
    prompts = [format_prompt(template, token, num_vectors) for token in class_tokens for template in templates]
    tokenizer = components.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.view(len(class_tokens), len(templates), -1).to(components.device)


class _StepDraws:
    """Every random choice of one training step, from generators seeded by the run key and the step.

    Examples are visited in a fresh random order each epoch, like a shuffled data loader.
    """

    def __init__(self, seed: int, run_key: tuple[str, ...], num_examples: int, num_templates: int, batch_size: int, flip: bool):
        self.seed, self.run_key = seed, run_key
        self.num_examples, self.num_templates, self.batch_size, self.flip = num_examples, num_templates, batch_size, flip
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch_generator(self.seed, STAGE, *self.run_key, "epoch", epoch)
            self._orders[epoch] = torch.randperm(self.num_examples, generator=generator)
        return self._orders[epoch]

    def examples(self, step: int) -> torch.Tensor:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._order(p // self.num_examples)[p % self.num_examples] for p in positions])

    def draw(self, step: int, latent_shape: tuple[int, ...], num_train_timesteps: int) -> dict[str, torch.Tensor]:
        generator = torch_generator(self.seed, STAGE, *self.run_key, "step", step)
        batch = self.batch_size
        flipped = torch.rand(batch, generator=generator) < FLIP_PROBABILITY
        return {
            "example": self.examples(step),
            "flipped": flipped & self.flip,
            "template": torch.randint(self.num_templates, (batch,), generator=generator),
            "latent_eps": torch.randn((batch, *latent_shape), generator=generator),
            "noise": torch.randn((batch, *latent_shape), generator=generator),
            "timestep": torch.randint(num_train_timesteps, (batch,), generator=generator),
        }


def _denoising_loss(components: Components, cache: ClassLatents, prompt_ids: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Noise-prediction MSE of each example of one batch, shape [batch] (epsilon or v target, as the
    checkpoint's scheduler says); training minimises their mean."""
    device = components.device
    draws = {name: value.to(device) for name, value in draws.items()}
    rows = draws["example"] + cache.count * draws["flipped"].long()
    latents = cache.latents.sample(rows, draws["latent_eps"]) * components.vae.config.scaling_factor
    timesteps = draws["timestep"]
    noisy, target = finetune.noised(components.noise_scheduler, latents, draws["noise"], timesteps, components.model_id)
    input_ids = prompt_ids[cache.class_index[draws["example"]], draws["template"]]
    with finetune.autocast(device, components.dtype):
        hidden = components.text_encoder(input_ids)[0]
        prediction = components.unet(noisy.to(components.dtype), timesteps, hidden.to(components.dtype)).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


def train_token_vectors(
    components: Components,
    class_paths: dict[str, list[Path]],
    class_tokens: dict[str, str],
    initial: torch.Tensor,
    first_new_id: int,
    settings: InvertSettings,
    seed: int,
    checkpoint_path: Path | None = None,
) -> tuple[torch.Tensor, list[tuple[float, dict[str, float]]]]:
    """Train the new vectors of the classes in `class_tokens` together; return (vectors, losses).

    losses[i] is step i+1's (batch loss, {class: mean loss of its examples in the batch}): in a run
    of several classes, each class's own curve shows whether its token learns.

    `initial` holds num_vectors rows per class in the order of `class_tokens`; their tokens are
    already in the tokenizer with ids first_new_id, first_new_id + 1, ...  With `checkpoint_path`,
    the state is saved every `checkpoint_every` steps and at the end, and a matching saved state
    is resumed from.
    """
    classes = list(class_tokens)
    num_vectors, batch_size, steps, resolution = settings.num_vectors, settings.batch_size, settings.steps, settings.resolution
    if initial.shape[0] != len(classes) * num_vectors:
        raise ValueError(f"expected {num_vectors} initial rows for each of {classes}, got {initial.shape[0]} rows")
    vectors = nn.Parameter(initial.to(components.device, torch.float32, copy=True))
    learning_rate = settings.learning_rate * (batch_size if settings.scale_lr else 1)
    fingerprint = value_hash(
        {
            "model": components.model_id,
            "resolution": resolution,
            "seed": seed,
            "classes": class_tokens,
            "images": {c: [str(p) for p in class_paths[c]] for c in classes},
            "initial": initial.tolist(),
            "settings": settings.key(),
            **cpu_numerics(components.device),
        }
    )
    checkpoint = finetune.Checkpoint(checkpoint_path, fingerprint) if checkpoint_path is not None else None
    class_index: list[torch.Tensor] = []  # set once the latents are encoded

    def to_row(record: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict[str, float]]:
        per_example, examples = record[0].float().cpu(), record[1].cpu()
        example_classes = class_index[0][examples]
        by_class = {classes[c]: float(per_example[example_classes == c].mean()) for c in example_classes.unique().tolist()}
        return float(per_example.mean()), by_class

    label = classes[0] if len(classes) == 1 else f"{len(classes)} classes"
    run = finetune.FineTune(
        f"invert {label}", {"vectors": vectors}, finetune.adamw([vectors], learning_rate), steps,
        components.device, components.dtype, checkpoint, settings.checkpoint_every, to_row,
    )  # fmt: skip
    if run.finished:
        return vectors.detach().cpu(), run.rows

    cache = encode_latents(components, [class_paths[c] for c in classes], resolution, settings.flip)
    class_index.append(cache.class_index.cpu())
    prompt_ids = _prompt_ids(components, list(class_tokens.values()), settings.templates, num_vectors)
    draws = _StepDraws(seed, tuple(classes), cache.count, len(settings.templates), batch_size, settings.flip)
    latent_shape = cache.latents.latent_shape
    num_train_timesteps = components.noise_scheduler.config.num_train_timesteps

    def step_loss(step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        step_draws = draws.draw(step, latent_shape, num_train_timesteps)
        per_example = _denoising_loss(components, cache, prompt_ids, step_draws)
        return per_example.mean(), (per_example.detach(), step_draws["example"])

    with _new_token_rows(components.text_encoder, vectors, first_new_id):
        losses = run.run(step_loss)
    return vectors.detach().cpu(), losses


def _select_classes(meta: dict, subset_path: Path, class_names: list[str] | None) -> dict[str, str]:
    """{class_name: token} of the classes to learn, checking names and token clashes."""
    known = list(meta["classes"])
    if class_names is None:
        class_names = known
    unknown = [name for name in class_names if name not in known]
    if unknown or not class_names:
        raise PipelineError(f"classes {unknown or class_names} are not classes of {subset_path}. Expected some of {known}")
    class_tokens = {name: token_for_class(name) for name in class_names}
    by_token: dict[str, list[str]] = {}
    for name, token in class_tokens.items():
        by_token.setdefault(token, []).append(name)
    clashes = {token: names for token, names in by_token.items() if len(names) > 1}
    if clashes:
        raise PipelineError(f"{subset_path}: classes {list(clashes.values())} would share the tokens {list(clashes)}. Expected distinct names.")
    return class_tokens


def _write_loss_csv(path: Path, loss_rows: list[tuple[int, str, float]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "class", "loss"])
        writer.writerows(loss_rows)


def invert_tokens(config: dict, subset_path: Path, out_dir: Path, class_names: list[str] | None = None) -> dict:
    """Learn a token per class of the few-shot subset (or of `class_names`) and write them to `out_dir`.

    Mode "joint" trains all classes in one run whose batches mix classes; "per_class" trains each
    class in its own run (the workflow calls this once per class and then `merge_tokens`). Writes
    learned_embeds.safetensors, one folder per class, tokens.json and loss.csv atomically, and
    resumes from `<out_dir>.ckpt/` if an earlier call was interrupted. Holds `<out_dir>.lock`
    throughout (PipelineError at once if another process holds it), so that no second process
    resumes from, or deletes, the checkpoints of a live one. The only reader of `config`:
    everything below gets the stage's InvertSettings.
    """
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        return _learn_tokens(InvertSettings.from_config(config), Path(subset_path), out_dir, class_names)


def _learn_tokens(settings: InvertSettings, subset_path: Path, out_dir: Path, class_names: list[str] | None) -> dict:
    """invert_tokens' work, by the holder of the output's lock."""
    rows, meta = read_manifest(subset_path)
    class_tokens = _select_classes(meta, subset_path, class_names)
    class_paths = training_images_by_class(rows, subset_path, list(class_tokens))
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    components = load_components(settings.model_id, device, dtype, settings.gradient_checkpointing)
    num_vectors = settings.num_vectors
    initial = add_class_tokens(components, class_tokens, settings.init, num_vectors)
    first_new_id = components.text_encoder.get_input_embeddings().num_embeddings

    # Each trial draws its own timesteps, noise and batches, so trials are independent repetitions.
    trial_seed = derive_seed(settings.seed, STAGE, "trial", meta.get("trial_seed", 0))
    classes = list(class_tokens)
    runs = [[name] for name in classes] if settings.mode == "per_class" else [classes]
    checkpoint_dir = checkpoint_dir_for(out_dir)
    vectors: dict[str, torch.Tensor] = {}
    loss_rows: list[tuple[int, str, float]] = []
    final_loss: dict[str, float] = {}
    started = time.perf_counter()
    for run in runs:
        offset = classes.index(run[0]) * num_vectors  # classes of a run are consecutive in `classes`
        rows_of_run = slice(offset, offset + len(run) * num_vectors)
        run_vectors, losses = train_token_vectors(
            components,
            class_paths,
            {name: class_tokens[name] for name in run},
            initial[rows_of_run],
            first_new_id + offset,
            settings,
            trial_seed,
            checkpoint_dir / f"{value_hash(run)}.pt",
        )
        for i, name in enumerate(run):
            vectors[class_tokens[name]] = run_vectors[i * num_vectors : (i + 1) * num_vectors]
        label = run[0] if len(run) == 1 else layout.JOINT_LOSS_LABEL
        for step, (batch_loss, by_class) in enumerate(losses, 1):
            loss_rows.append((step, label, batch_loss))
            if len(run) > 1:
                loss_rows += [(step, name, value) for name, value in by_class.items()]
        final_loss[label] = float(np.mean([batch_loss for batch_loss, _ in losses[-10:]]))
    seconds = time.perf_counter() - started

    metadata = {
        "num_vectors": num_vectors,
        "init": settings.init,
        "model": settings.model_id,
        "resolution": settings.resolution,
        "templates": list(settings.templates),
        "steps": settings.steps,
        "seed": settings.seed,
        "subset": str(subset_path),
        **cpu_numerics(device),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_token_files(tmp, class_tokens, vectors, metadata)
        _write_loss_csv(tmp / layout.LOSS_FILE, loss_rows)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    total_steps = settings.steps * len(runs)
    log.info(
        "learned %d tokens (%d vectors each) in %d run(s) of %d steps, %.1fs (%.2f steps/s); final loss %s -> %s",
        len(class_tokens), num_vectors, len(runs), settings.steps, seconds, total_steps / seconds,
        ", ".join(f"{k} {v:.4f}" for k, v in final_loss.items()), out_dir,
    )
    return {
        "out_dir": str(out_dir),
        "tokens": class_tokens,
        "num_vectors": num_vectors,
        "runs": len(runs),
        "steps": settings.steps,
        "seconds": seconds,
        "final_loss": final_loss,
    }


def merge_tokens(token_dirs: list[Path], out_dir: Path) -> dict:
    """Combine tokens folders (e.g. one per class from per_class mode) into one folder `out_dir`.

    Every folder must come from the same subset, model and settings (tokens.json metadata other
    than the tokens themselves must agree) and no class may appear twice. Given the per_class
    folders of a subset in class order, the result equals that of one per_class run over all classes.
    """
    if not token_dirs:
        raise PipelineError("merge_tokens: no token folders given. Expected at least one.")

    class_tokens: dict[str, str] = {}
    vectors: dict[str, torch.Tensor] = {}
    loss_rows: list[list[str]] = []
    reference_meta, reference_dir = None, None
    for token_dir in map(Path, token_dirs):
        dir_classes, dir_vectors = load_token_file(token_dir)
        meta = {k: v for k, v in read_json(token_dir / TOKENS_FILE).items() if k not in ("tokens", "dim")}
        if reference_meta is None:
            reference_meta, reference_dir = meta, token_dir
        differing = sorted(k for k in set(meta) | set(reference_meta) if meta.get(k) != reference_meta.get(k))
        if differing:
            raise PipelineError(
                f"{token_dir / TOKENS_FILE} differs from {reference_dir / TOKENS_FILE} in {differing}. "
                "Expected tokens learned on the same subset with the same model and settings."
            )
        repeated = sorted(set(dir_classes) & set(class_tokens))
        if repeated:
            raise PipelineError(f"{token_dir}: classes {repeated} already come from another folder being merged")
        class_tokens.update(dir_classes)
        vectors.update(dir_vectors)
        loss_path = token_dir / layout.LOSS_FILE
        if loss_path.is_file():
            with loss_path.open(newline="") as handle:
                loss_rows += list(csv.reader(handle))[1:]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_token_files(tmp, class_tokens, vectors, reference_meta)
        _write_loss_csv(tmp / layout.LOSS_FILE, loss_rows)
    log.info("merged %d tokens from %d folders into %s", len(class_tokens), len(token_dirs), out_dir)
    return {"out_dir": str(out_dir), "tokens": class_tokens, "num_vectors": reference_meta["num_vectors"], "sources": len(token_dirs)}
