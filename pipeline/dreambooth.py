"""DreamBooth-LoRA: adapt the model to a few-shot subset (Ruiz et al. 2023), for the `dreambooth`
and `dreambooth-sdedit` generation methods.

As diffusers' examples/dreambooth/train_dreambooth_lora.py: LoRA layers on the UNet's attention
projections (to_q, to_k, to_v, to_out.0, or the modules `dreambooth.lora_modules` names; rank
`dreambooth.rank`, alpha = rank, Gaussian init, so the adapted model starts as the base model) are trained on the denoising loss of the real images under
the instance prompt ("a photo of sks {class}"), plus `prior_loss_weight` times the same loss on
images the base model itself draws of the class prompt ("a photo of a {class}"): prior
preservation, which keeps the adapted model from collapsing every image of the class onto the few
real ones. The text encoder and VAE stay frozen.

One adapter per class, as the one-subject reference trains one model per subject and the Wisconsin
study one per class: a model adapted to one class draws that class whatever its text encoder makes
of the prompt. (A single adapter over all classes, each under its own prompt, was tried first on the
demo model: its text encoder barely tells class words apart, and every prompt then drew the same one
or two classes; BENCHMARKS.md, "DreamBooth-LoRA".) One job per subset trains its classes in turn,
each from its own seeds, so a class's adapter does not depend on the others.

How it is computed, and why:

* The real images are VAE-encoded once into a `finetune.LatentCache`. The prior images are drawn
  by the base model (DPM-Solver++, `class_image_steps` steps, guidance `class_image_guidance`) from
  seeds of (seed, class, i) alone, so trials share them; as the reference's saved files they are
  decoded and encoded again, but are kept in memory (and in the checkpoint) instead of written out.
* The frozen text encoder runs once per prompt, not once per step.
* Every random draw of step s comes from a generator seeded by (seed, trial, class, s), and each
  class's state is saved every `checkpoint_every` steps and when it is done beside the output
  (`<out>.ckpt/`), so a killed job resumes to bitwise the weights of an uninterrupted one. The
  loop, checkpoints and mixed precision (LoRA weights and Adam in fp32) are `pipeline.finetune`'s.

The output folder holds one folder per class (named by `layout.class_slug`) with
`pytorch_lora_weights.safetensors` (what `pipe.load_lora_weights(folder)` loads), `adapter.json`
(prompts, {class: folder}, base model, settings, sha256 of every weights file, final losses) and
`loss.csv` (step, class, instance and prior loss).
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import PipelineError, finetune, layout, sdedit
from pipeline.checkpoint import weight_hashes
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.finetune import checkpoint_dir_for
from pipeline.hashing import value_hash
from pipeline.io import atomic_path, file_sha256, open_image, output_lock, write_json
from pipeline.manifest import read_manifest, training_images_by_class
from pipeline.progress import progress
from pipeline.rng import derive_seed, torch_generator
from pipeline.settings.dreambooth import DreamBoothSettings

log = logging.getLogger(__name__)

STAGE = "dreambooth"
PRIOR_SCHEDULER = "dpm-solver++"
PRIOR_BATCH = 8


def train_dreambooth(config: dict, subset_path: str | Path, out_dir: str | Path) -> dict:
    """Train a DreamBooth-LoRA adapter per class of the subset and write them to `out_dir` (atomically).

    Resumes from `<out_dir>.ckpt/` if an earlier call was interrupted, and holds `<out_dir>.lock`
    throughout. The only reader of `config`: everything below gets the stage's DreamBoothSettings.
    """
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        return _train(DreamBoothSettings.from_config(config), Path(subset_path), out_dir)


@torch.no_grad()
def draw_prior_images(pipe, settings: DreamBoothSettings, class_name: str) -> list:
    """`num_class_images` images the base model draws from the class prompt (PIL); image i comes from
    the seed (seed, class, i) alone, so every trial of a task shares them."""
    guided = sdedit.use_guidance(pipe, settings.class_image_guidance)
    negative = sdedit.encode_negative_prompt(pipe) if guided else None
    embeds = sdedit.encode_prompt(pipe, settings.class_prompt.format(class_name))
    seeds = [derive_seed(settings.seed, STAGE, "prior", class_name, i) for i in range(settings.num_class_images)]
    images = []
    for start in progress(range(0, len(seeds), PRIOR_BATCH), -(-len(seeds) // PRIOR_BATCH), f"dreambooth prior images of {class_name}"):
        batch = seeds[start : start + PRIOR_BATCH]
        noise = torch.cat([sdedit.txt2img_noise(pipe, settings.resolution, torch.Generator().manual_seed(s)) for s in batch])
        images += sdedit.txt2img(pipe, noise, embeds.expand(len(batch), -1, -1), negative,
                                 settings.class_image_steps, settings.class_image_guidance)  # fmt: skip
    return images


def add_lora(unet, rank: int, modules: tuple[str, ...], seed: int) -> dict[str, torch.nn.Parameter]:
    """LoRA layers of `rank` on the UNet's `modules` (name suffixes); returns their (fp32) parameters by name.

    Gaussian init of A and zero B (peft's "gaussian"): the adapted UNet starts as the base one.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)  # peft freezes the base too; said here, since the optimiser relies on it
    torch.manual_seed(seed)  # peft draws A from the global generator
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(modules)))
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    for param in params.values():
        param.data = param.data.float()
    return params


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights of `unet` under the names diffusers' load_lora_weights reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def _train(settings: DreamBoothSettings, subset_path: Path, out_dir: Path) -> dict:
    from diffusers import DDPMScheduler

    rows, meta = read_manifest(subset_path)
    classes = list(meta["classes"])
    paths = training_images_by_class(rows, subset_path, classes)
    for template, key in ((settings.instance_prompt, "instance_prompt"), (settings.class_prompt, "class_prompt")):
        if "{}" not in template:
            raise PipelineError(f"dreambooth.{key} {template!r} has no '{{}}'. Expected a place for the class name.")
    slugs = {name: layout.class_slug(name) for name in classes}
    if len(set(slugs.values())) < len(slugs):
        raise PipelineError(f"{subset_path}: classes {classes} would share adapter folders {sorted(slugs.values())}. Expected distinct names.")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = sdedit.load_img2img(settings.model_id, device, dtype, scheduler=PRIOR_SCHEDULER)
    noise_scheduler = DDPMScheduler.from_pretrained(settings.model_id, subfolder="scheduler")
    trial_seed = derive_seed(settings.seed, STAGE, "trial", meta.get("trial_seed", 0))
    checkpoint_dir = checkpoint_dir_for(out_dir)
    fingerprint = value_hash({"settings": settings.key(), "subset_sha256": file_sha256(subset_path), "classes": classes,
                              "images": {c: [str(p) for p in paths[c]] for c in classes}, **cpu_numerics(device)})  # fmt: skip

    started = time.perf_counter()
    trained, losses = {}, {}
    for name in classes:
        run = _ClassRun(pipe, noise_scheduler, settings, name, paths[name], derive_seed(trial_seed, STAGE, name), device, dtype)
        trained[name], losses[name] = run.train(checkpoint_dir / f"{slugs[name]}.pt", fingerprint)
    seconds = time.perf_counter() - started

    prior = settings.prior_preservation
    final = {name: {"instance": _mean_last(losses[name], 0), "prior": _mean_last(losses[name], 1) if prior else None} for name in classes}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in classes:
            type(pipe).save_lora_weights(tmp / slugs[name], unet_lora_layers=trained[name], safe_serialization=True)
        with (tmp / layout.LOSS_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "class", "instance_loss", "prior_loss"])
            for name in classes:
                writer.writerows((i, name, f"{a:.6f}", f"{b:.6f}") for i, (a, b) in enumerate(losses[name], 1))
        write_json(tmp / layout.ADAPTER_INFO_FILE, {
            "kind": STAGE,
            "model": settings.model_id,
            "instance_prompt": settings.instance_prompt,
            "class_prompt": settings.class_prompt,
            "classes": slugs,
            "subset": str(subset_path),
            "steps": settings.steps,
            "settings": settings.key(),
            "final_loss": final,
            "sha256": weight_hashes(tmp),
            **cpu_numerics(device),
        })  # fmt: skip
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info(
        "dreambooth: %d LoRA adapters (rank %d), %d steps each, in %.1fs; final instance loss %s -> %s",
        len(classes), settings.rank, settings.steps, seconds,
        ", ".join(f"{name} {final[name]['instance']:.4f}" for name in classes), out_dir,
    )  # fmt: skip
    return {"out_dir": str(out_dir), "classes": classes, "steps": settings.steps, "seconds": seconds, "final_loss": final}


class _ClassRun:
    """One class's adapter: its real images' latents, its prior images, its LoRA and optimiser.

    Its random draws come from `seed` (the trial's and the class's) alone, so a class's adapter does
    not depend on which other classes the subset has.
    """

    def __init__(self, pipe, noise_scheduler, settings: DreamBoothSettings, class_name: str, paths: list[Path], seed: int, device, dtype):
        self.pipe, self.noise_scheduler, self.settings, self.class_name = pipe, noise_scheduler, settings, class_name
        self.paths, self.seed, self.device, self.dtype = paths, seed, device, dtype
        self.prior = settings.prior_preservation

    def train(self, checkpoint_path: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], list[tuple[float, float]]]:
        """(LoRA weights under diffusers' names, per-step (instance loss, prior loss or nan))."""
        settings, pipe, device, dtype = self.settings, self.pipe, self.device, self.dtype
        unet, name = pipe.unet, self.class_name
        checkpoint = finetune.Checkpoint(checkpoint_path, fingerprint)
        saved = checkpoint.load(device)
        with torch.no_grad():
            self.instance_hidden = sdedit.encode_prompt(pipe, settings.instance_prompt.format(name)).float()
            self.class_hidden = sdedit.encode_prompt(pipe, settings.class_prompt.format(name)).float()
            self.real = finetune.LatentCache.of([sdedit.encode_source(pipe, open_image(path), settings.resolution) for path in self.paths])
            if saved is not None:
                prior = finetune.LatentCache(saved["extra"]["prior_mean"], saved["extra"]["prior_std"])
            elif self.prior:
                images = draw_prior_images(pipe, settings, name)
                prior = finetune.LatentCache.of([sdedit.encode_source(pipe, image, settings.resolution) for image in images])
            else:
                prior = finetune.LatentCache(torch.empty(0, device=device), torch.empty(0, device=device))
            self.prior_latents = prior

        params = add_lora(unet, settings.rank, settings.lora_modules, derive_seed(self.seed, "lora-init"))
        run = finetune.FineTune(
            f"dreambooth {name}", params, finetune.adamw(list(params.values()), settings.learning_rate), settings.steps,
            device, dtype, checkpoint, settings.checkpoint_every, loss_name="instance loss",
        )  # fmt: skip
        unet.train()
        losses = run.run(lambda step: _step_loss(self, step), extra={"prior_mean": prior.mean, "prior_std": prior.std})
        unet.eval()
        weights = {k: v.detach().cpu().clone() for k, v in lora_state(unet).items()}
        unet.delete_adapters("default")
        return weights, losses


def _step_loss(run: _ClassRun, step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Step `step`'s loss, instance + prior_loss_weight * prior, and (instance, prior or nan) to log.

    Its draws, from the generator of (class seed, step): the real images and their latent samples,
    then the prior images' (with prior preservation), then noise and timesteps for both halves.
    """
    settings, device, dtype = run.settings, run.device, run.dtype
    generator = torch_generator(run.seed, "step", step)
    batch, latent_shape = settings.batch_size, run.real.latent_shape
    rows = torch.randint(len(run.real), (batch,), generator=generator)
    latents = run.real.sample(rows, torch.randn((batch, *latent_shape), generator=generator))
    hidden = run.instance_hidden.expand(batch, -1, -1)
    if run.prior:
        rows = torch.randint(len(run.prior_latents), (batch,), generator=generator)
        latents = torch.cat([latents, run.prior_latents.sample(rows, torch.randn((batch, *latent_shape), generator=generator))])
        hidden = torch.cat([hidden, run.class_hidden.expand(batch, -1, -1)])
    latents = latents * run.pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(run.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy, target = finetune.noised(run.noise_scheduler, latents, noise, timesteps, settings.model_id)
    with finetune.autocast(device, dtype):
        prediction = run.pipe.unet(noisy.to(dtype), timesteps, hidden.to(dtype)).sample.float()
    instance_loss = F.mse_loss(prediction[:batch], target[:batch])
    if not run.prior:
        return instance_loss, (instance_loss.detach(), torch.tensor(float("nan")))
    prior_loss = F.mse_loss(prediction[batch:], target[batch:])
    return instance_loss + settings.prior_loss_weight * prior_loss, (instance_loss.detach(), prior_loss.detach())


def _mean_last(losses: list[tuple[float, float]], column: int, count: int = 20) -> float:
    values = [loss[column] for loss in losses[-count:]]
    return sum(values) / len(values) if values else float("nan")
