"""SDEdit of a source image (Meng et al. 2022; DA-Fusion eq. 5), of all of it or of one region.

Each copy draws from its own CPU generator, in img2img's order, the VAE latent sample and then the
start noise, is noised to its strength's timestep and denoised towards its prompt; the image is
resized back to the source's size, as DA-Fusion does. A row re-generating the whole image
reproduces with stock diffusers: `StableDiffusionImg2ImgPipeline(image=source.resize((R, R)),
prompt=prompt, strength=strength, num_inference_steps=..., guidance_scale=...,
generator=torch.Generator().manual_seed(seed))`, resized to the source's size, on a pipeline from
`sdedit.load_img2img` within `sdedit.batch_invariant_kernels`. img2img runs
min(int(num_inference_steps * strength), num_inference_steps) steps of the schedule.

A method with region "object" or "background" (DA-Fusion eq. 7, object-centric) re-generates only
the labelled object (its mask grown by `mask_dilation` px) or only the rest, by blended-latent
inpainting (any SD checkpoint; the kept part is re-noised with the copy's own start noise at every
step), and pastes the kept pixels back from the source, so they are exact.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

from pipeline import PipelineError, sdedit
from pipeline.generate_plan import WorkItem, lowest_strength
from pipeline.io import open_image, read_object_mask
from pipeline.methods import Method
from pipeline.settings.generate import GenerateSettings


def object_region(mask_path: str, image_id: str, size: tuple[int, int], dilation: int) -> np.ndarray:
    """Boolean [H,W] map of image `image_id`'s labelled object (non-zero mask pixels) grown by `dilation` px.

    The margin lets inpainting re-draw the object's outline too (masks are rarely pixel-exact), and for
    the background mode keeps a rim of context around the object.
    """
    return distance_transform_edt(~read_object_mask(mask_path, image_id, size)) <= dilation


class Img2ImgMaker:
    """Sources' sizes, VAE latent distributions and re-generated regions are made once each, on first use."""

    def __init__(self, pipe, settings: GenerateSettings, method: Method):
        self.pipe, self.settings, self.region_name = pipe, settings, method.region
        self.sizes: dict[str, tuple[int, int]] = {}
        self.images: dict[str, Image.Image] = {}  # only for inpainting, which pastes the source back
        self.latents: dict[str, object] = {}
        self.regions: dict[str, np.ndarray] = {}

    @property
    def inpaints(self) -> bool:
        return self.region_name != "image"

    @staticmethod
    def check(settings: GenerateSettings) -> None:
        """Refuse settings where the lowest strength the method draws runs no denoising step."""
        steps, lowest = settings.num_inference_steps, lowest_strength(settings)
        if sdedit.denoising_steps(steps, lowest) < 1:
            raise PipelineError(
                f"generate.num_inference_steps={steps} at strength {lowest:g} runs no denoising step. "
                f"Expected num_inference_steps * strength >= 1."
            )

    def load(self, item: WorkItem) -> None:
        """Decode, encode and (inpainting) read the mask of `item`'s source now; PipelineError if it is bad."""
        self._latent_dist(item)
        if self.inpaints:
            self._region(item)

    def make(self, batch: list[WorkItem], conditions: torch.Tensor, negative_embeds) -> list[Image.Image]:
        """The batch's images, each at its source's size. All items of a batch share one strength."""
        pipe, settings = self.pipe, self.settings
        generators = [torch.Generator().manual_seed(item.seed) for item in batch]
        starts = [sdedit.start_latents(pipe, self._latent_dist(item), g) for item, g in zip(batch, generators)]
        clean = torch.cat([clean for clean, _ in starts])
        noise = torch.cat([noise for _, noise in starts])
        keep = torch.cat([self._keep_latents(item, clean.shape[2:]) for item in batch]) if self.inpaints else None
        images = sdedit.sdedit(
            pipe, clean, noise, conditions, negative_embeds, batch[0].strength, settings.num_inference_steps,
            settings.guidance_scale, keep=keep,
        )  # fmt: skip
        outputs = []
        for item, image in zip(batch, images):
            size = self.sizes[item.image_id]
            if image.size != size:
                image = image.resize(size, Image.BILINEAR)
            if self.inpaints:
                # The latents only approximate the kept part (VAE round trip): paste the exact source back.
                region = Image.fromarray(self._region(item).astype(np.uint8) * 255)
                image = Image.composite(image, self._image(item), region)
            outputs.append(image)
        return outputs

    def _image(self, item: WorkItem) -> Image.Image:
        if item.image_id in self.images:
            return self.images[item.image_id]
        image = open_image(item.path)
        self.sizes[item.image_id] = image.size
        if self.inpaints:
            self.images[item.image_id] = image
        return image

    def _latent_dist(self, item: WorkItem):
        if item.image_id not in self.latents:
            self.latents[item.image_id] = sdedit.encode_source(self.pipe, self._image(item), self.settings.resolution)
        return self.latents[item.image_id]

    def _region(self, item: WorkItem) -> np.ndarray:
        """Boolean [H,W] map of the part of the source the method re-generates."""
        if item.image_id not in self.regions:
            if item.mask_path is None:
                raise PipelineError(
                    f"image {item.image_id!r} has no mask (mask_path null). Expected a mask: this method "
                    f"re-generates only the {self.region_name}."
                )
            obj = object_region(item.mask_path, item.image_id, self._image(item).size, self.settings.mask_dilation)
            self.regions[item.image_id] = obj if self.region_name == "object" else ~obj
        return self.regions[item.image_id]

    def _keep_latents(self, item: WorkItem, latent_shape: tuple[int, int]) -> torch.Tensor:
        """[1,1,h,w] latent mask, 1 where the source is kept; a latent cell touching the region is re-generated."""
        region = torch.from_numpy(self._region(item)).to(self.pipe.device, self.pipe.unet.dtype)
        return 1 - torch.nn.functional.adaptive_max_pool2d(region[None, None], latent_shape)
