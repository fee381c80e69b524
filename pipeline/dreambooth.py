"""DreamBooth-LoRA: adapt the model to a few-shot subset (Ruiz et al. 2023), for the `dreambooth`
and `dreambooth-sdedit` generation methods.

As diffusers' examples/dreambooth/train_dreambooth_lora.py: LoRA layers on the UNet's attention
projections (to_q, to_k, to_v, to_out.0; rank `dreambooth.rank`, alpha = rank, Gaussian init, so the
adapted model starts as the base model) are trained on the denoising loss of the real images under
the instance prompt ("a photo of sks {class}"), plus `prior_loss_weight` times the same loss on
images the base model itself draws of the class prompt ("a photo of a {class}"): prior
preservation, which keeps the adapted model from collapsing every image of the class onto the few
real ones. The text encoder and VAE stay frozen.

One adapter per subset, trained on all its classes at once (each step draws real and prior images of
any class, each under its own class's prompts), rather than one per class as the one-subject
reference does. The class noun in the prompt keeps the classes apart, so one model serves a whole
generation job (no adapter swapped between batches), and a task of C classes trains C x
`steps_per_class` steps in one job instead of C jobs that each load the model and draw priors.

How it is computed, and why:

* The real images are VAE-encoded once; each step samples a latent from the cached distribution,
  as `latent_dist.sample()` would. The prior images are drawn once by the base model (DPM-Solver++,
  `class_image_steps` steps, guidance `class_image_guidance`) from seeds of (seed, class, i) alone,
  so trials share them, and are kept as latents: the reference saves them as files and re-encodes
  them, which costs a VAE round trip and changes nothing the loss sees but that round trip's error.
* The frozen text encoder runs once per prompt, not once per step.
* Every random draw of step s comes from a generator seeded by (seed, trial, s), and the state is
  saved every `checkpoint_every` steps beside the output (`<out>.ckpt/`), so a killed job resumes to
  bitwise the weights of an uninterrupted one.
* On CUDA the frozen weights run in half precision under autocast; the LoRA weights and Adam stay fp32.

The output folder holds `pytorch_lora_weights.safetensors` (what `pipe.load_lora_weights(folder)`
loads), `adapter.json` (prompts, classes, base model, settings, sha256 of the weights, final losses)
and `loss.csv`.
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
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
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
    """Train the subset's DreamBooth-LoRA adapter and write it to `out_dir` (atomically).

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
def draw_prior_images(pipe, settings: DreamBoothSettings, classes: list[str]):
    """`num_class_images` images of each class drawn by the base model from the class prompt, as
    PIL images per class; image i of class c comes from the seed (seed, class, i) alone."""
    guided = sdedit.use_guidance(pipe, settings.class_image_guidance)
    negative = sdedit.encode_negative_prompt(pipe) if guided else None
    drawn = {}
    for name in progress(classes, len(classes), "dreambooth prior images"):
        embeds = sdedit.encode_prompt(pipe, settings.class_prompt.format(name))
        seeds = [derive_seed(settings.seed, STAGE, "prior", name, i) for i in range(settings.num_class_images)]
        images = []
        for start in range(0, len(seeds), PRIOR_BATCH):
            batch = seeds[start : start + PRIOR_BATCH]
            noise = torch.cat([sdedit.txt2img_noise(pipe, settings.resolution, torch.Generator().manual_seed(s)) for s in batch])
            images += sdedit.txt2img(pipe, noise, embeds.expand(len(batch), -1, -1), negative,
                                     settings.class_image_steps, settings.class_image_guidance)  # fmt: skip
        drawn[name] = images
    return drawn


def add_lora(unet, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """LoRA layers of `rank` on the UNet's attention projections; returns their (fp32) parameters.

    Gaussian init of A and zero B (peft's "gaussian"): the adapted UNet starts as the base one.
    """
    from peft import LoraConfig

    torch.manual_seed(seed)  # peft draws A from the global generator
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
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
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    rows, meta = read_manifest(subset_path)
    classes = list(meta["classes"])
    paths = training_images_by_class(rows, subset_path, classes)
    for template, key in ((settings.instance_prompt, "instance_prompt"), (settings.class_prompt, "class_prompt")):
        if "{}" not in template:
            raise PipelineError(f"dreambooth.{key} {template!r} has no '{{}}'. Expected a place for the class name.")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = sdedit.load_img2img(settings.model_id, device, dtype, scheduler=PRIOR_SCHEDULER)
    noise_scheduler = DDPMScheduler.from_pretrained(settings.model_id, subfolder="scheduler")
    unet = pipe.unet
    trial_seed = derive_seed(settings.seed, STAGE, "trial", meta.get("trial_seed", 0))
    steps = settings.steps_per_class * len(classes)
    prior = settings.num_class_images > 0 and settings.prior_loss_weight > 0

    fingerprint = value_hash(
        {
            "settings": settings.key(),
            "subset_sha256": file_sha256(subset_path),
            "classes": classes,
            "images": {c: [str(p) for p in paths[c]] for c in classes},
            **cpu_numerics(device),
        }
    )
    checkpoint_path = checkpoint_dir_for(out_dir) / CHECKPOINT_FILE
    state = None
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            log.warning("ignoring checkpoint %s: it belongs to another configuration", checkpoint_path)
            state = None

    started = time.perf_counter()
    with torch.no_grad():
        instance_hidden = _hidden_states(pipe, [settings.instance_prompt.format(c) for c in classes])
        class_hidden = _hidden_states(pipe, [settings.class_prompt.format(c) for c in classes])
        real = [(c, path) for c, name in enumerate(classes) for path in paths[name]]
        real_mean, real_std = _encode(pipe, [open_image(path) for _, path in real], settings.resolution)
        real_class = torch.tensor([c for c, _ in real], device=device)
        if state is not None:
            prior_mean, prior_std, prior_class = state["prior_mean"], state["prior_std"], state["prior_class"]
        elif prior:
            drawn = draw_prior_images(pipe, settings, classes)
            prior_mean, prior_std = _encode(pipe, [image for name in classes for image in drawn[name]], settings.resolution)
            prior_class = torch.tensor([c for c in range(len(classes)) for _ in range(settings.num_class_images)], device=device)
        else:
            prior_mean = prior_std = prior_class = torch.empty(0, device=device)

    params = add_lora(unet, settings.rank, derive_seed(trial_seed, STAGE, "lora-init"))
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    losses: list[tuple[float, float]] = []  # per step: (instance loss, prior loss or nan)
    start = 0
    if state is not None:
        set_peft_model_state_dict(unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        losses, start = [tuple(loss) for loss in state["losses"]], state["step"]
        log.info("resuming dreambooth at step %d/%d from %s", start, steps, checkpoint_path)

    def save_checkpoint(step: int) -> None:
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        saved = {
            "fingerprint": fingerprint, "step": step, "lora": get_peft_model_state_dict(unet),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "losses": losses,
            "prior_mean": prior_mean, "prior_std": prior_std, "prior_class": prior_class,
        }  # fmt: skip
        with atomic_path(checkpoint_path) as tmp:
            torch.save(saved, tmp)

    scaling = pipe.vae.config.scaling_factor
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    unet.train()
    for step in progress(range(start, steps), total=steps - start, desc=f"dreambooth {len(classes)} classes"):
        generator = torch_generator(trial_seed, STAGE, "step", step)
        batch = settings.batch_size
        rows_real = torch.randint(len(real_class), (batch,), generator=generator)
        latent_shape = tuple(real_mean.shape[1:])
        latents = real_mean[rows_real] + real_std[rows_real] * torch.randn((batch, *latent_shape), generator=generator).to(device)
        hidden = instance_hidden[real_class[rows_real]]
        if prior:
            rows_prior = torch.randint(len(prior_class), (batch,), generator=generator)
            eps = torch.randn((batch, *latent_shape), generator=generator).to(device)
            latents = torch.cat([latents, prior_mean[rows_prior] + prior_std[rows_prior] * eps])
            hidden = torch.cat([hidden, class_hidden[prior_class[rows_prior]]])
        latents = latents * scaling
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy.to(dtype), timesteps, hidden.to(dtype)).sample.float()
        target = _target(noise_scheduler, latents, noise, timesteps, settings.model_id)
        instance_loss = F.mse_loss(prediction[:batch], target[:batch])
        prior_loss = F.mse_loss(prediction[batch:], target[batch:]) if prior else torch.zeros((), device=device)
        loss = instance_loss + settings.prior_loss_weight * prior_loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append((instance_loss.item(), prior_loss.item() if prior else float("nan")))
        done = step + 1
        if done % 100 == 0:
            recent = losses[-100:]
            log.info("dreambooth step %d/%d: instance loss %.4f, prior loss %.4f (means of the last 100)", done, steps,
                     sum(r[0] for r in recent) / len(recent), sum(r[1] for r in recent) / len(recent))  # fmt: skip
        if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < steps:
            save_checkpoint(done)
    unet.eval()
    seconds = time.perf_counter() - started

    final = {"instance": _mean_last(losses, 0), "prior": _mean_last(losses, 1) if prior else None}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        type(pipe).save_lora_weights(tmp, unet_lora_layers=lora_state(unet), safe_serialization=True)
        with (tmp / layout.LOSS_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "instance_loss", "prior_loss"])
            writer.writerows((i, f"{a:.6f}", f"{b:.6f}") for i, (a, b) in enumerate(losses, 1))
        write_json(tmp / layout.ADAPTER_INFO_FILE, {
            "kind": STAGE,
            "model": settings.model_id,
            "instance_prompt": settings.instance_prompt,
            "class_prompt": settings.class_prompt,
            "classes": classes,
            "subset": str(subset_path),
            "steps": steps,
            "settings": settings.key(),
            "final_loss": final,
            "sha256": weight_hashes(tmp),
            **cpu_numerics(device),
        })  # fmt: skip
    shutil.rmtree(checkpoint_dir_for(out_dir), ignore_errors=True)
    log.info(
        "dreambooth: LoRA rank %d on %d classes, %d steps in %.1fs (%.2f steps/s); final instance loss %.4f%s -> %s",
        settings.rank, len(classes), steps - start, seconds, (steps - start) / seconds if seconds else 0.0,
        final["instance"], f", prior loss {final['prior']:.4f}" if prior else "", out_dir,
    )  # fmt: skip
    return {"out_dir": str(out_dir), "classes": classes, "steps": steps, "seconds": seconds, "final_loss": final}


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
