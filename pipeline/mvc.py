"""MVC, "Dataset Augmentation by Mixing Visual Concepts" (Rahat and Venkateswara): mixed caption
embeddings, and Stable Diffusion fine-tuned to draw a class's images conditioned on one of them.

Mixing (the study's Algorithm 1) is `pipeline.mixing`, shared with generation (`pipeline.makers.mvc`).

Fine-tune (`train_mvc`, the mvc stage), as diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py:
the UNet's input convolution is widened to take the VAE latent of a conditioning image beside z_t
(the new input channels start at zero, so the widened model is the base model until it learns to
look), and the whole UNet is trained on the subset's images: the target image's noised latent, the
conditioning image's latent (its distribution's mode, unscaled, as InstructPix2Pix) and a mixed
embedding of the target's caption. The conditioning image is another random training image of the
target's class (`mvc.conditioning: same-class`, which the study found better) or the target itself
(`paired`). Conditioning dropout as InstructPix2Pix: the text is replaced by CLIP("") with
probability 2p and the image by zeros with probability 2p, both together with probability p, so one
model gives the conditional and the unconditional predictions guidance needs. The VAE and text
encoder stay frozen. The loop, checkpoints and resume are `pipeline.finetune`'s.

With `erase.enabled` the fine-tune starts from the erased UNet, so the mvc method's images are
generated with the class names erased like every other method's.

The output folder is a complete diffusers checkpoint, `StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)`
loads it, plus `mvc.json` (settings, base model, sha256 of every weights file, checked before a load)
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
from torch import nn

from pipeline import PipelineError, adapters, finetune, layout, sdedit
from pipeline.captions import read_captions
from pipeline.checkpoint import weight_hashes
from pipeline.device import cpu_numerics, resolve_device, resolve_dtype
from pipeline.finetune import CHECKPOINT_FILE, checkpoint_dir_for
from pipeline.hashing import value_hash
from pipeline.io import atomic_path, file_sha256, open_image, output_lock, write_json
from pipeline.manifest import read_manifest
from pipeline.mixing import apply_mix, draw_mix, other_index
from pipeline.rng import derive_seed, torch_generator
from pipeline.settings.mvc import MVCSettings

log = logging.getLogger(__name__)

STAGE = "mvc"


# The image-conditioned UNet ----------------------------------------------------------------------


def widen_input(unet, extra_channels: int) -> None:
    """Give the UNet's input convolution `extra_channels` more input channels, their weights zero."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


# The fine-tune -----------------------------------------------------------------------------------


def train_mvc(config: dict, subset_path: str | Path, captions_path: str | Path, out_dir: str | Path, erased_dir: str | Path | None = None) -> dict:
    """Fine-tune the image-conditioned model on the subset's captioned images; write it to `out_dir`
    (atomically). `erased_dir`: the erase stage's folder, exactly when erase.enabled. Resumes from
    `<out_dir>.ckpt/` and holds `<out_dir>.lock` throughout. The only reader of `config`."""
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        settings = MVCSettings.from_config(config)
        return _train(settings, Path(subset_path), Path(captions_path), out_dir, Path(erased_dir) if erased_dir else None)


class _Examples:
    """The subset's training images as the loss sees them: latents, captions' embeddings, classes."""

    def __init__(self, pipe, settings: MVCSettings, rows: list[dict], captions: dict[str, tuple[str, str]], captions_path: Path):
        missing = [row["image_id"] for row in rows if row["image_id"] not in captions]
        if missing:
            raise PipelineError(f"{captions_path}: no caption for training image {missing[0]!r}. Expected the caption stage's file of this subset.")
        with torch.no_grad():
            self.latents = finetune.LatentCache.of([sdedit.encode_source(pipe, open_image(row["path"]), settings.resolution) for row in rows])
            self.embeddings = sdedit.encode_prompts(pipe, [captions[row["image_id"]][1] for row in rows]).float()
            self.empty = sdedit.encode_negative_prompt(pipe).float()
        labels = [row["label"] for row in rows]
        # members[i]: the indices of example i's class, in subset order; position[i]: i's place among them.
        by_label: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        self.members = [by_label[label] for label in labels]
        self.position = [by_label[label].index(i) for i, label in enumerate(labels)]


def _step_loss(pipe, scheduler, examples: _Examples, settings: MVCSettings, seed: int, step: int, device, dtype):
    """Step `step`'s denoising loss; its draws, from the generator of (seed, step): the targets and
    their latent samples, each target's conditioning image and mix, dropout, noise and timesteps."""
    generator = torch_generator(seed, "step", step)
    batch, latents_of = settings.batch_size, examples.latents
    rows = torch.randint(len(latents_of), (batch,), generator=generator)
    latents = latents_of.sample(rows, torch.randn((batch, *latents_of.latent_shape), generator=generator))
    conditioning, hidden = [], []
    for row in rows.tolist():
        members, own = examples.members[row], examples.position[row]
        other = members[other_index(generator, own, len(members))] if settings.conditioning == "same-class" else row
        conditioning.append(latents_of.mean[other])
        mix = draw_mix(generator, own, len(members), examples.embeddings.shape[1], examples.embeddings.shape[2],
                       settings.coarse_swaps, settings.fine_swaps)  # fmt: skip
        hidden.append(apply_mix(examples.embeddings[members], own, mix))
    conditioning, hidden = torch.stack(conditioning), torch.stack(hidden)
    drop = torch.rand(batch, generator=generator).to(device)
    p = settings.conditioning_dropout
    hidden = torch.where((drop < 2 * p)[:, None, None], examples.empty.expand(batch, -1, -1), hidden)
    conditioning = conditioning * ~((drop >= p) & (drop < 3 * p))[:, None, None, None]
    latents = latents * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
    noisy, target = finetune.noised(scheduler, latents, noise, timesteps, settings.model_id)
    with finetune.autocast(device, dtype):
        prediction = pipe.unet(torch.cat([noisy, conditioning], dim=1), timesteps, hidden).sample.float()
    loss = F.mse_loss(prediction, target.float())
    return loss, (loss.detach(),)


def _train(settings: MVCSettings, subset_path: Path, captions_path: Path, out_dir: Path, erased_dir: Path | None) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionInstructPix2PixPipeline

    all_rows, meta = read_manifest(subset_path)
    rows = [row for row in all_rows if row["split"] == "train"]
    if not rows:
        raise PipelineError(f"subset {subset_path} has no training images. Expected at least one.")
    captions = read_captions(captions_path)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = sdedit.load_img2img(settings.model_id, device, dtype)
    if erased_dir is not None:
        adapters.apply_erasure(pipe, erased_dir)
    examples = _Examples(pipe, settings, rows, captions, captions_path)
    scheduler = DDPMScheduler.from_pretrained(settings.model_id, subfolder="scheduler")
    unet = pipe.unet
    if unet.dtype != torch.float32:
        unet.to(torch.float32)  # trained whole: its weights and Adam's state stay fp32, autocast runs it in `dtype`
    widen_input(unet, pipe.vae.config.latent_channels)
    unet.requires_grad_(True)
    params = dict(unet.named_parameters())

    trial_seed = derive_seed(settings.seed, STAGE, "trial", meta.get("trial_seed", 0))
    fingerprint = value_hash({"settings": settings.key(), "subset_sha256": file_sha256(subset_path), "captions_sha256": file_sha256(captions_path),
                              "erased": weight_hashes(erased_dir) if erased_dir else None, **cpu_numerics(device)})  # fmt: skip
    checkpoint = finetune.Checkpoint(checkpoint_dir_for(out_dir) / CHECKPOINT_FILE, fingerprint)
    run = finetune.FineTune("mvc fine-tune", params, finetune.adamw(list(params.values()), settings.learning_rate), settings.steps,
                            device, dtype, checkpoint, settings.checkpoint_every, save_when_done=False)  # fmt: skip
    started = time.perf_counter()
    unet.train()
    losses = run.run(lambda step: _step_loss(pipe, scheduler, examples, settings, trial_seed, step, device, dtype))
    unet.eval()
    seconds = time.perf_counter() - started

    model = StableDiffusionInstructPix2PixPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet if dtype == torch.float32 else unet.to(dtype),
        scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    final = sum(row[0] for row in losses[-20:]) / len(losses[-20:])
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        with (tmp / layout.LOSS_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss"])
            writer.writerows((i, f"{row[0]:.6f}") for i, row in enumerate(losses, 1))
        write_json(tmp / layout.MVC_INFO_FILE, {
            "kind": STAGE,
            "model": settings.model_id,
            "subset": str(subset_path),
            "captions": str(captions_path),
            "erased": str(erased_dir) if erased_dir else None,
            "images": len(rows),
            "settings": settings.key(),
            "final_loss": final,
            "sha256": weight_hashes(tmp),
            **cpu_numerics(device),
        })  # fmt: skip
    shutil.rmtree(checkpoint_dir_for(out_dir), ignore_errors=True)
    log.info("mvc: fine-tuned the image-conditioned UNet on %d images, %d steps in %.1fs; final loss %.4f -> %s",
             len(rows), settings.steps, seconds, final, out_dir)  # fmt: skip
    return {"out_dir": str(out_dir), "images": len(rows), "steps": settings.steps, "seconds": seconds, "final_loss": final}
