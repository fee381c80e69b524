"""Text-to-image from pure noise over the whole schedule (the vanilla Stable Diffusion synthetic set).

Each row reproduces with `StableDiffusionPipeline(prompt, height=R, width=R, num_inference_steps=...,
guidance_scale=..., generator=torch.Generator().manual_seed(seed))`; images come at the model's
resolution R.
"""

from __future__ import annotations

import torch
from PIL import Image

from pipeline import sdedit
from pipeline.generate_plan import WorkItem
from pipeline.methods import Method
from pipeline.settings.generate import GenerateSettings


class Txt2ImgMaker:
    def __init__(self, pipe, settings: GenerateSettings, method: Method):
        self.pipe, self.settings = pipe, settings

    @staticmethod
    def check(settings: GenerateSettings) -> None:
        """Nothing of its own to refuse: its templates are checked for every method (generate_plan.check_templates)."""

    def load(self, item: WorkItem) -> None:
        """Nothing to read: text-to-image has no source."""

    def make(self, batch: list[WorkItem], conditions: torch.Tensor, negative_embeds) -> list[Image.Image]:
        settings = self.settings
        generators = [torch.Generator().manual_seed(item.seed) for item in batch]
        noise = torch.cat([sdedit.txt2img_noise(self.pipe, settings.resolution, g) for g in generators])
        return sdedit.txt2img(
            self.pipe, noise, conditions, negative_embeds, settings.num_inference_steps, settings.guidance_scale
        )
