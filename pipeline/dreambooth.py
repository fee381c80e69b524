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

* The real images are VAE-encoded once; each step samples a latent from the cached distribution,
  as `latent_dist.sample()` would. The prior images are drawn by the base model (DPM-Solver++,
  `class_image_steps` steps, guidance `class_image_guidance`) from seeds of (seed, class, i) alone,
  so trials share them; as the reference's saved files they are decoded and encoded again, but are
  kept in memory (and in the checkpoint) instead of written out.
* The frozen text encoder runs once per prompt, not once per step.
* Every random draw of step s comes from a generator seeded by (seed, trial, class, s), and each
  class's state is saved every `checkpoint_every` steps and when it is done beside the output
  (`<out>.ckpt/`), so a killed job resumes to bitwise the weights of an uninterrupted one.
* On CUDA the frozen weights run in half precision under autocast; the LoRA weights and Adam stay fp32.

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

from pipeline import PipelineError, layout, sdedit
from pipeline.checkpoint import weight_hashes
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.hashing import value_hash
from pipeline.io import atomic_path, file_sha256, open_image, output_lock, write_json
from pipeline.manifest import read_manifest, training_images_by_class
from pipeline.progress import progress
from pipeline.rng import derive_seed, torch_generator
from pipeline.settings.dreambooth import DreamBoothSettings

log = logging.getLogger(__name__)

STAGE = "dreambooth"
# AdamW settings of the reference (train_dreambooth_lora.py defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
PRIOR_SCHEDULER = "dpm-solver++"
PRIOR_BATCH = 8
CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_dir_for(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".ckpt")


def train_dreambooth(config: dict, subset_path: str | Path, out_dir: str | Path) -> dict:
    """Train a DreamBooth-LoRA adapter per class of the subset and write them to `out_dir` (atomically).

    Resumes from `<out_dir>.ckpt/` if an earlier call was interrupted, and holds `<out_dir>.lock`
    throughout. The only reader of `config`: everything below gets the stage's DreamBoothSettings.
    """
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        return _train(DreamBoothSettings.from_config(config), Path(subset_path), out_dir)


def _hidden_states(pipe, prompts: list[str]) -> torch.Tensor:
    """The frozen text encoder's hidden states [len(prompts), 77, dim], computed once."""
    return torch.cat([sdedit.encode_prompt(pipe, prompt) for prompt in prompts]).float()


@torch.no_grad()
def _encode(pipe, images, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, stds) [n, 4, h, w] of the VAE's latent distributions of PIL `images`, fp32."""
    means, stds = [], []
    for image in images:
        dist = sdedit.encode_source(pipe, image, resolution)
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


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


def add_lora(unet, rank: int, modules: tuple[str, ...], seed: int) -> list[torch.nn.Parameter]:
    """LoRA layers of `rank` on the UNet's `modules` (name suffixes); returns their (fp32) parameters.

    Gaussian init of A and zero B (peft's "gaussian"): the adapted UNet starts as the base one.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)  # peft freezes the base too; said here, since the optimiser relies on it
    torch.manual_seed(seed)  # peft draws A from the global generator
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
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
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        settings, pipe, device, dtype = self.settings, self.pipe, self.device, self.dtype
        unet, name = pipe.unet, self.class_name
        state = None
        if checkpoint_path.is_file():
            state = torch.load(checkpoint_path, map_location=device, weights_only=True)
            if state["fingerprint"] != fingerprint:
                log.warning("ignoring checkpoint %s: it belongs to another configuration", checkpoint_path)
                state = None
        with torch.no_grad():
            instance_hidden = _hidden_states(pipe, [settings.instance_prompt.format(name)])
            class_hidden = _hidden_states(pipe, [settings.class_prompt.format(name)])
            real_mean, real_std = _encode(pipe, [open_image(path) for path in self.paths], settings.resolution)
            if state is not None:
                prior_mean, prior_std = state["prior_mean"], state["prior_std"]
            elif self.prior:
                prior_mean, prior_std = _encode(pipe, draw_prior_images(pipe, settings, name), settings.resolution)
            else:
                prior_mean = prior_std = torch.empty(0, device=device)

        params = add_lora(unet, settings.rank, settings.lora_modules, derive_seed(self.seed, "lora-init"))
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        losses: list[tuple[float, float]] = []
        start, steps = 0, settings.steps
        if state is not None:
            set_peft_model_state_dict(unet, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            losses, start = [tuple(loss) for loss in state["losses"]], state["step"]
            log.info("resuming dreambooth of %s at step %d/%d from %s", name, start, steps, checkpoint_path)

        def save_checkpoint(step: int) -> None:
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            saved = {
                "fingerprint": fingerprint, "step": step, "lora": get_peft_model_state_dict(unet),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "losses": losses,
                "prior_mean": prior_mean, "prior_std": prior_std,
            }  # fmt: skip
            with atomic_path(checkpoint_path) as tmp:
                torch.save(saved, tmp)

        scaling = pipe.vae.config.scaling_factor
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        batch, latent_shape = settings.batch_size, tuple(real_mean.shape[1:])
        unet.train()
        for step in progress(range(start, steps), total=steps - start, desc=f"dreambooth {name}"):
            generator = torch_generator(self.seed, "step", step)
            rows = torch.randint(len(real_mean), (batch,), generator=generator)
            eps = torch.randn((batch, *latent_shape), generator=generator).to(device)
            latents, hidden = real_mean[rows] + real_std[rows] * eps, instance_hidden.expand(batch, -1, -1)
            if self.prior:
                rows = torch.randint(len(prior_mean), (batch,), generator=generator)
                eps = torch.randn((batch, *latent_shape), generator=generator).to(device)
                latents = torch.cat([latents, prior_mean[rows] + prior_std[rows] * eps])
                hidden = torch.cat([hidden, class_hidden.expand(batch, -1, -1)])
            latents = latents * scaling
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            with autocast:
                prediction = unet(noisy.to(dtype), timesteps, hidden.to(dtype)).sample.float()
            target = _target(self.noise_scheduler, latents, noise, timesteps, settings.model_id)
            instance_loss = F.mse_loss(prediction[:batch], target[:batch])
            prior_loss = F.mse_loss(prediction[batch:], target[batch:]) if self.prior else torch.zeros((), device=device)
            loss = instance_loss + settings.prior_loss_weight * prior_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append((instance_loss.item(), prior_loss.item() if self.prior else float("nan")))
            done = step + 1
            if done % 100 == 0:
                recent = losses[-100:]
                log.info("dreambooth %s step %d/%d: instance loss %.4f, prior loss %.4f (means of the last 100)", name, done, steps,
                         sum(r[0] for r in recent) / len(recent), sum(r[1] for r in recent) / len(recent))  # fmt: skip
            if settings.checkpoint_every and (done % settings.checkpoint_every == 0 or done == steps):
                save_checkpoint(done)
        unet.eval()
        weights = {k: v.detach().cpu().clone() for k, v in lora_state(unet).items()}
        unet.delete_adapters("default")
        return weights, losses


def _target(scheduler, latents, noise, timesteps, model_id: str) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise PipelineError(f"{model_id}: scheduler prediction_type {prediction_type!r} is not supported. Expected epsilon or v_prediction.")


def _mean_last(losses: list[tuple[float, float]], column: int, count: int = 20) -> float:
    values = [loss[column] for loss in losses[-count:]]
    return sum(values) / len(values) if values else float("nan")
