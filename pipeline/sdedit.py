"""Batched SDEdit (img2img), blended-latent inpainting and text-to-image with Stable Diffusion,
one seed per image, no hidden random state.

This is the sampling loop of diffusers' `StableDiffusionImg2ImgPipeline` (SDEdit, Meng et al. 2022;
DA-Fusion eq. 5) taken apart so that a batch can mix source images, prompts and seeds while every
image keeps its own random stream:

* each source image is VAE-encoded once (`encode_source`) and reused for all its synthetic copies;
* each synthetic image draws, from its own CPU generator and in img2img's order, first the VAE
  latent sample and then the start noise (`start_latents`), so its randomness does not depend on
  which batch it lands in, and `StableDiffusionImg2ImgPipeline(..., generator=torch.Generator().
  manual_seed(seed))` on the same inputs draws the very same numbers;
* one UNet call per step covers the whole batch, unconditional and conditional halves together;
* on CPU a row's pixels do not depend on its batch either (`batch_invariant_kernels`): the same
  image comes out at batch size 1 or 8, byte for byte.

All images of a batch share one strength, since the strength decides where on the schedule
denoising starts and hence how many steps run.

The same loop serves two variants: `sdedit(..., keep=mask)` re-generates only part of each image
(blended latent diffusion, Avrahami et al. 2023: any SD checkpoint, no inpainting UNet), and
`txt2img` starts from pure noise over the whole schedule as `StableDiffusionPipeline` does.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from PIL import Image

from pipeline import PipelineError
from pipeline.checkpoint import verify_if_local

log = logging.getLogger(__name__)

SCHEDULERS = ("default", "dpm-solver++", "ddim")

# Schedulers that draw fresh noise inside every step. They would take it from the global RNG
# (the batch shares one scheduler), so an image would depend on its batch: refuse them.
STOCHASTIC_SCHEDULERS = {
    "DDPMScheduler",
    "EulerAncestralDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "LCMScheduler",
}


def load_img2img(
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    scheduler: str = "default",
    channels_last: bool = False,
    compile: bool = False,
):
    """StableDiffusionImg2ImgPipeline for `model_id` on `device`, without safety checker.

    `scheduler` (generate.scheduler) swaps the checkpoint's own scheduler for DPM-Solver++ or DDIM (same
    noise schedule); `channels_last` and `compile` trade start-up time for speed on GPUs.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    verify_if_local(model_id)
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            model_id, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"model.id {model_id!r}: cannot load a Stable Diffusion checkpoint ({exc}). "
            "Expected a diffusers-format folder or a Hugging Face model id."
        ) from None
    if scheduler == "dpm-solver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler_name = type(pipe.scheduler).__name__
    if scheduler_name in STOCHASTIC_SCHEDULERS or "sde" in str(pipe.scheduler.config.get("algorithm_type", "")):
        raise PipelineError(
            f"model.id {model_id!r} ships the stochastic scheduler {scheduler_name}, which draws noise at every "
            f"step from global random state. Expected generate.scheduler set to one of {SCHEDULERS[1:]}."
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.time_proj.register_forward_pre_hook(_embed_shared_timestep_once)
    # Decode one image at a time. The peak memory of a decode then stays that of one image, and a
    # row's pixels do not depend on its batch: the VAE's attention hands GroupNorm a tensor whose
    # layout (NCHW or channels-last, hence its summation order) changes with the batch size.
    pipe.vae.enable_slicing()
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet.compile()
    return pipe


def _embed_shared_timestep_once(time_proj, args):
    """Forward pre-hook of the UNet's timestep projection: embed a batch's one timestep once.

    The UNet expands a scalar timestep to the batch (a stride-0 view) and pushes it through small
    [B, dim] matmuls (time embedding, each ResNet's projection). BLAS kernels choose their summation
    order by matrix height, so a row's embedding would change in the last bit with B. Embedding one
    row instead, which the ResNets broadcast over the batch, gives every batch size the same bits.
    """
    (timesteps,) = args
    if timesteps.dim() == 1 and timesteps.shape[0] > 1 and timesteps.stride(0) == 0:
        return (timesteps[:1],)
    return None


@contextlib.contextmanager
def batch_invariant_kernels(device: torch.device):
    """Within: on CPU, each image of a UNet or VAE batch gets the bits it would get alone.

    oneDNN picks its convolution algorithm (and so its summation order) by tensor shape, batch
    included, which moved pixels of the tiny test model by up to two levels between batch sizes;
    without oneDNN, PyTorch switches to NNPACK's convolution from a batch of 16 rows on (8 images
    with guidance), which sums in another order again. Its own convolution (im2col and one matmul
    per image) does not depend on the batch. It is slower than oneDNN on the tiny UNet: 0-12% per
    row on one thread, 1.6-1.8x on two (BENCHMARKS.md). With `_embed_shared_timestep_once` and the
    one-image VAE decode that `load_img2img` sets, batching is then invisible in the output. GPU
    kernels keep their batch-dependent choices: there batching changes pixels by float rounding only.
    """
    if device.type != "cpu":
        yield
        return
    no_onednn = torch.backends.mkldnn.flags(enabled=False, allow_tf32=None, fp32_precision=None)
    with no_onednn, torch.backends.nnpack.flags(enabled=False):
        yield


class SafetyChecker:
    """Stable Diffusion's NSFW classifier (CLIP image embedding against concept embeddings), loaded
    from the `safety_checker` and `feature_extractor` folders a real SD 1.x checkpoint ships."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        self.device, self.dtype = device, dtype
        self.model = self._load(StableDiffusionSafetyChecker, model_id, "safety_checker", dtype=dtype).to(device).eval()
        self.processor = self._load(CLIPImageProcessor, model_id, "feature_extractor")

    @staticmethod
    def _load(cls, model_id: str, subfolder: str, **kwargs):
        try:
            return cls.from_pretrained(model_id, subfolder=subfolder, **kwargs)
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"generate.safety_checker is on, but model.id {model_id!r} has no loadable {subfolder!r} folder "
                f"({exc}). Expected a checkpoint that ships the safety checker (as CompVis/stable-diffusion-v1-4 "
                "does), or generate.safety_checker: false."
            ) from None

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Per image: True when the checker sees NSFW content."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        # The checker blacks out flagged entries of `images` in place; only its verdicts are used here.
        _, verdicts = self.model(clip_input=pixels, images=[np.asarray(image) for image in images])
        return [bool(v) for v in verdicts]


def fits_in_memory(pipe, batch_size: int, resolution: int, guided: bool, budget: float = 0.9) -> bool:
    """Whether a denoising step of `batch_size` images and an image's decode run on the pipe's GPU
    with a peak below `budget` of its memory (the rest is headroom for the sampler's state and for
    allocator fragmentation)."""
    device = pipe.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        _probe_step(pipe, 2 * batch_size if guided else batch_size, resolution // pipe.vae_scale_factor)
        fits = torch.cuda.max_memory_allocated(device) <= budget * torch.cuda.get_device_properties(device).total_memory
    except torch.cuda.OutOfMemoryError:
        fits = False
    torch.cuda.empty_cache()
    return fits


def _probe_step(pipe, rows: int, side: int) -> None:
    """One UNet call on `rows` latents of side `side` and one latent's decode, on zeros."""
    unet = pipe.unet
    like = {"device": pipe.device, "dtype": unet.dtype}
    with torch.inference_mode():
        latents = torch.zeros(rows, unet.config.in_channels, side, side, **like)
        text = torch.zeros(rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, **like)
        unet(latents, pipe.scheduler.config.num_train_timesteps - 1, encoder_hidden_states=text)
        pipe.vae.decode(latents[:1, : pipe.vae.config.latent_channels])


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps img2img runs at `strength` on an `num_inference_steps` schedule (as diffusers counts)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def use_guidance(pipe, guidance_scale: float) -> bool:
    """Classifier-free guidance is on above scale 1, as in diffusers (a scale of 1 is the conditional model)."""
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def encode_prompt(pipe, prompt: str) -> torch.Tensor:
    """Text-encoder hidden states [1, 77, dim] of one prompt (multi-vector tokens expanded by diffusers)."""
    embeds, _ = pipe.encode_prompt(prompt, pipe.device, 1, do_classifier_free_guidance=False)
    return embeds


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """`encode_prompt` of each prompt, stacked: [len(prompts), 77, dim]."""
    return torch.cat([encode_prompt(pipe, prompt) for prompt in prompts])


def encode_negative_prompt(pipe) -> torch.Tensor:
    """The unconditional embedding [1, 77, dim] img2img guides away from (the empty prompt)."""
    _, negative = pipe.encode_prompt("", pipe.device, 1, do_classifier_free_guidance=True)
    return negative


def encode_source(pipe, image: Image.Image, resolution: int):
    """The VAE's latent distribution of `image` resized to `resolution`² (bilinear, as DA-Fusion does).

    Resizing, not cropping, keeps every object of a multi-object scene in view.
    """
    canvas = image.resize((resolution, resolution), Image.BILINEAR)
    pixels = pipe.image_processor.preprocess(canvas).to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist


def start_latents(pipe, latent_dist, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled clean latent, start noise) for one synthetic image, both drawn from its own CPU `generator`.

    The order of draws is img2img's: the VAE sample first, then the noise.
    """
    from diffusers.utils.torch_utils import randn_tensor

    clean = pipe.vae.config.scaling_factor * latent_dist.sample(generator)
    noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return clean, noise


def sdedit(
    pipe,
    clean: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    strength: float,
    num_inference_steps: int,
    guidance_scale: float,
    keep: torch.Tensor | None = None,
) -> list[Image.Image]:
    """Noise the clean latents [B,4,h,w] to the strength's timestep and denoise them; decode to images.

    `negative_embeds` is the unconditional embedding [1,77,dim], or None when guidance is off.
    `keep` [B,1,h,w] (1 = keep the source) turns SDEdit into blended-latent inpainting: after every
    step the kept latents are replaced by the clean latents noised to the next timestep, with each
    image's own start noise (as diffusers' inpainting pipeline does for a plain UNet), and by the
    clean latents themselves after the last step. The caller holds torch.inference_mode.
    """
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    start = num_inference_steps - denoising_steps(num_inference_steps, strength)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    batch = clean.shape[0]
    latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(batch))
    inpaint = (clean, noise, keep) if keep is not None else None
    latents = _denoise(pipe, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale, inpaint)
    return decode(pipe, latents)


def txt2img_noise(pipe, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Start noise [1,4,R/8,R/8] of one text-to-image sample, drawn as StableDiffusionPipeline draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    side = resolution // pipe.vae_scale_factor
    shape = (1, pipe.vae.config.latent_channels, side, side)
    return randn_tensor(shape, generator=generator, device=pipe.device, dtype=pipe.unet.dtype)


def txt2img(
    pipe,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    num_inference_steps: int,
    guidance_scale: float,
    image_latents: torch.Tensor | None = None,
) -> list[Image.Image]:
    """Text-to-image from pure noise [B,4,h,w] over the whole schedule, as StableDiffusionPipeline samples.

    `image_latents` [B,4,h,w]: for an image-conditioned UNet (MVC, InstructPix2Pix), the conditioning
    images' latents, concatenated to every UNet input, the unconditional half's too. The caller holds
    torch.inference_mode.
    """
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    latents = noise * scheduler.init_noise_sigma
    latents = _denoise(pipe, latents, scheduler.timesteps, prompt_embeds, negative_embeds, guidance_scale, None, image_latents)
    return decode(pipe, latents)


def _denoise(pipe, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale, inpaint, image_latents=None) -> torch.Tensor:
    """Run the scheduler over `timesteps`.

    `inpaint` = (clean, noise, keep) re-imposes the noised source on the kept latents after each step;
    `image_latents` are concatenated to the UNet's input channels (an image-conditioned UNet).
    """
    scheduler = pipe.scheduler
    batch = latents.shape[0]
    if negative_embeds is not None:
        # One UNet call for both halves: [uncond x B, cond x B].
        prompt_embeds = torch.cat([negative_embeds.expand(batch, -1, -1), prompt_embeds])
    for index, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if negative_embeds is not None else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if image_latents is not None:
            model_input = torch.cat([model_input, image_latents.repeat(model_input.shape[0] // batch, 1, 1, 1)], dim=1)
        noise_pred = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        if negative_embeds is not None:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if inpaint is not None:
            clean, noise, keep = inpaint
            upcoming = timesteps[index + 1 : index + 2]  # empty after the last step: the source itself
            source = scheduler.add_noise(clean, noise, upcoming.repeat(batch)) if len(upcoming) else clean
            latents = keep * source + (1 - keep) * latents
    return latents


def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-decode scaled latents [B,4,h,w] to PIL images."""
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")
