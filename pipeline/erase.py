"""Concept erasure of the task's class names (ESD-x, Gandikota et al. 2023): DA-Fusion's model-centric
leakage prevention (section 6.1, eq. 8), for generation with `erase.enabled`.

The UNet's cross-attention parameters (every parameter of its `attn2` blocks, as ESD's "xattn"
method) are fine-tuned so that its noise prediction for a class's prompt c matches the frozen
model's prediction guided away from the concept:

    eps_theta(x_t, c)  ->  eps*(x_t, 0) - eta * (eps*(x_t, c) - eps*(x_t, 0))

where x_t is drawn as ESD draws it: from fresh noise, the model being trained denoises towards c
(DDIM, `ddim_steps` steps, guidance `start_guidance`) for a random number of steps, so the loss
looks at the states the model would pass through when asked for the class. Only the text path into
the image changes, so images of other prompts move little: what erasure should cost.

All of a task's classes are erased into one model, jointly: each step erases one class drawn at
random. Sequential erasure (one class after another) would let each later fine-tune partly restore
the earlier classes, and its result would depend on the order of the class list.

Resumable as inversion and DreamBooth are: every draw of step s comes from (seed, s), and the state is
saved every `checkpoint_every` steps beside the output (`<out>.ckpt/`). The output folder holds the
changed parameters (`unet_erased.safetensors`, loaded over the base UNet's by
`pipeline.adapters.apply_erasure`), `erase.json` (classes, prompt, settings, sha256) and `loss.csv`.
"""

from __future__ import annotations

import copy
import csv
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline import PipelineError, finetune, layout, sdedit
from pipeline.checkpoint import weight_hashes
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.finetune import CHECKPOINT_FILE, checkpoint_dir_for
from pipeline.hashing import value_hash
from pipeline.io import atomic_path, output_lock, read_json, write_json
from pipeline.rng import torch_generator
from pipeline.settings.erase import EraseSettings

log = logging.getLogger(__name__)

STAGE = "erase"


def erased_parameter_names(unet) -> list[str]:
    """ESD-x's trainable parameters: every parameter of the UNet's cross-attention (attn2) blocks."""
    return [name for name, _ in unet.named_parameters() if ".attn2." in name]


def erase_classes(config: dict, classes_file: str | Path, out_dir: str | Path) -> dict:
    """Erase the task's class names (those of `classes_file`, or `erase.classes`) from the model's
    UNet and write the changed parameters to `out_dir` (atomically). The only reader of `config`."""
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        return _erase(EraseSettings.from_config(config), Path(classes_file), out_dir)


def _erase(settings: EraseSettings, classes_file: Path, out_dir: Path) -> dict:
    from diffusers import DDIMScheduler

    task_classes = read_json(classes_file)
    classes = list(settings.classes) if settings.classes is not None else task_classes
    unknown = [name for name in classes if name not in task_classes]
    if unknown:
        raise PipelineError(f"erase.classes: {unknown} are not classes of {classes_file}. Expected some of {task_classes}")
    if "{}" not in settings.template:
        raise PipelineError(f"erase.template {settings.template!r} has no '{{}}'. Expected a place for the class name.")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = sdedit.load_img2img(settings.model_id, device, dtype)
    unet = pipe.unet
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    names = erased_parameter_names(unet)
    if not names:
        raise PipelineError(f"{settings.model_id}: its UNet has no cross-attention (attn2) parameters to erase with.")
    trained = dict(unet.named_parameters())
    params = [trained[name] for name in names]
    unet.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
        param.data = param.data.float()
    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    sampler.set_timesteps(settings.ddim_steps, device=device)

    with torch.no_grad():
        concept = sdedit.encode_prompts(pipe, [settings.template.format(name) for name in classes])
        empty = sdedit.encode_negative_prompt(pipe)
    fingerprint = value_hash({"settings": settings.key(), "classes": classes, **cpu_numerics(device)})
    checkpoint = finetune.Checkpoint(checkpoint_dir_for(out_dir) / CHECKPOINT_FILE, fingerprint)
    # ESD's optimiser: Adam without weight decay.
    run = finetune.FineTune(
        f"erase {len(classes)} classes", {name: trained[name] for name in names}, torch.optim.Adam(params, lr=settings.learning_rate),
        settings.steps, device, dtype, checkpoint, settings.checkpoint_every, to_row=lambda r: (float(r[1]), classes[int(r[0])]),
        save_when_done=False,
    )  # fmt: skip
    side = settings.resolution // pipe.vae_scale_factor
    latent_shape = (1, unet.config.in_channels, side, side)

    def step_loss(step: int) -> tuple[torch.Tensor, tuple[int, torch.Tensor]]:
        """ESD-x's loss at step `step`; its draws: the class, where to stop sampling, the start noise."""
        generator = torch_generator(settings.seed, STAGE, "step", step)
        index = int(torch.randint(len(classes), (1,), generator=generator))
        stop = int(torch.randint(settings.ddim_steps, (1,), generator=generator))
        latents = torch.randn(latent_shape, generator=generator).to(device, dtype)
        cond = concept[index : index + 1]
        with torch.no_grad(), finetune.autocast(device, dtype):
            unet.eval()
            latents = _ddim_towards(unet, sampler, latents, cond, empty, settings.start_guidance, stop)
            t = sampler.timesteps[stop]
            e0 = frozen(latents, t, encoder_hidden_states=empty).sample.float()
            ep = frozen(latents, t, encoder_hidden_states=cond).sample.float()
        target = e0 - settings.eta * (ep - e0)
        unet.train()
        with finetune.autocast(device, dtype):
            prediction = unet(latents, t, encoder_hidden_states=cond).sample.float()
        loss = F.mse_loss(prediction, target)
        return loss, (index, loss.detach())

    started = time.perf_counter()
    losses = run.run(step_loss)
    unet.eval()
    seconds = time.perf_counter() - started

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file({name: trained[name].detach().to(torch.float32).cpu().contiguous() for name in names}, str(tmp / layout.ERASED_WEIGHTS_FILE))
        with (tmp / layout.LOSS_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "class", "loss"])
            writer.writerows((i, name, f"{value:.6f}") for i, (value, name) in enumerate(losses, 1))
        write_json(tmp / layout.ERASE_INFO_FILE, {
            "kind": STAGE,
            "method": "ESD-x",
            "model": settings.model_id,
            "classes": classes,
            "template": settings.template,
            "settings": settings.key(),
            "parameters": len(names),
            "sha256": weight_hashes(tmp),
            **cpu_numerics(device),
        })  # fmt: skip
    shutil.rmtree(checkpoint_dir_for(out_dir), ignore_errors=True)
    log.info("erased %d classes (%s) from %s: %d steps in %.1fs -> %s", len(classes), ", ".join(classes),
             settings.model_id, settings.steps, seconds, out_dir)  # fmt: skip
    return {"out_dir": str(out_dir), "classes": classes, "steps": settings.steps, "seconds": seconds}


def _ddim_towards(unet, sampler, latents, cond, empty, guidance: float, stop: int) -> torch.Tensor:
    """`stop` DDIM steps from noise `latents` towards `cond` with classifier-free guidance."""
    embeds = torch.cat([empty, cond])
    for t in sampler.timesteps[:stop]:
        uncond, conditional = unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample.chunk(2)
        latents = sampler.step(uncond + guidance * (conditional - uncond), t, latents).prev_sample
    return latents
