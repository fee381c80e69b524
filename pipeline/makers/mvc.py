"""MVC's generation (Rahat and Venkateswara): from pure noise, conditioned on a mixed embedding of
the class's captions (`pipeline.mixing`, P = mvc.coarse_swaps, Q = mvc.fine_swaps) and, with
the subset's image-conditioned model (method `mvc`), on the latent of the source image itself, a
real image of the class. Guidance pushes from CLIP("") with the same image conditioning (the
study's eq. 6): eps = eps(z, c_img, "") + w * (eps(z, c_img, e_mix) - eps(z, c_img, "")).

Copy j of source image i mixes the embedding of i's caption; its swaps come from the generator of
(its seed, "mix") and its start noise from its seed, as a text-to-image row's. A row reproduces with
`StableDiffusionInstructPix2PixPipeline(prompt_embeds=mixed, negative_prompt_embeds=CLIP(""),
image=source resized to R, guidance_scale=w, image_guidance_scale=1, generator=seed)`, up to float
rounding (with image guidance 1 its three branches reduce to these two). Method `mvc-pretrained`
(the study's variant for natural images) is plain text-to-image from the base model with the same
mixed embedding. What each copy mixed, and its conditioning image, go to the shard's metadata
`conditioning` ({synthetic_id: record}).
"""

from __future__ import annotations

import torch
from PIL import Image

from pipeline import PipelineError, adapters, mixing, sdedit
from pipeline.generate_plan import WorkItem
from pipeline.io import open_image
from pipeline.methods import Method
from pipeline.rng import torch_generator
from pipeline.settings.generate import GenerateSettings


class MVCMaker:
    def __init__(self, pipe, settings: GenerateSettings, method: Method, captions: dict[str, tuple[str, str]]):
        self.pipe, self.settings, self.captions = pipe, settings, captions
        self.image_conditioned = method.adapter == "mvc"
        if self.image_conditioned and not adapters.is_image_conditioned(pipe.unet, pipe.vae):
            raise PipelineError(f"method {method.name!r}: the model's UNet takes {pipe.unet.config.in_channels} input channels. "
                                "Expected an image-conditioned one (the mvc stage's).")  # fmt: skip
        self.class_ids: dict[str, list[str]] = {}
        for image_id, (class_name, _) in captions.items():
            self.class_ids.setdefault(class_name, []).append(image_id)
        self._embeddings: dict[str, torch.Tensor] = {}
        self._conditioning: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}  # synthetic_id -> what it mixed; the stage takes them at each flush

    @staticmethod
    def check(settings: GenerateSettings) -> None:
        """Nothing to refuse: P and Q are validated by the schema."""

    def load(self, item: WorkItem) -> None:
        if item.image_id not in self.captions:
            raise PipelineError(f"image {item.image_id!r} has no caption in the caption stage's file. Expected one per training image.")
        if self.image_conditioned and item.image_id not in self._conditioning:
            latent = sdedit.encode_source(self.pipe, open_image(item.path), self.settings.resolution).mode()
            self._conditioning[item.image_id] = latent

    def _class_embeddings(self, class_name: str) -> torch.Tensor:
        if class_name not in self._embeddings:
            texts = [self.captions[i][1] for i in self.class_ids[class_name]]
            self._embeddings[class_name] = sdedit.encode_prompts(self.pipe, texts)
        return self._embeddings[class_name]

    def mixed(self, item: WorkItem) -> torch.Tensor:
        """Item's mixed caption embedding [1, 77, dim]; records what it mixed."""
        class_name, settings = self.captions[item.image_id][0], self.settings
        ids, embeddings = self.class_ids[class_name], self._class_embeddings(class_name)
        own = ids.index(item.image_id)
        mix = mixing.draw_mix(torch_generator(item.seed, "mix"), own, len(ids), embeddings.shape[1], embeddings.shape[2],
                           settings.coarse_swaps, settings.fine_swaps)  # fmt: skip
        self.records[item.synthetic_id] = {
            "caption_of": item.image_id,
            "conditioning_image": item.image_id if self.image_conditioned else None,
            "coarse": [[ids[other], r, s] for other, r, s in mix.coarse],
            "fine": [[ids[other], w, u, v] for other, w, u, v in mix.fine],
        }
        return mixing.apply_mix(embeddings, own, mix).unsqueeze(0)

    def prompt(self, item: WorkItem) -> str:
        """The row's prompt: the caption the mix started from."""
        return self.captions[item.image_id][1]

    def make(self, batch: list[WorkItem], conditions, negative_embeds) -> list[Image.Image]:
        settings = self.settings
        noise = torch.cat([sdedit.txt2img_noise(self.pipe, settings.resolution, torch.Generator().manual_seed(item.seed)) for item in batch])
        mixed = torch.cat([self.mixed(item) for item in batch])
        image_latents = torch.cat([self._conditioning[item.image_id] for item in batch]) if self.image_conditioned else None
        return sdedit.txt2img(self.pipe, noise, mixed, negative_embeds, settings.num_inference_steps, settings.guidance_scale, image_latents)
