"""Text-to-image samples of learned tokens: the quick look that tells whether a token learned anything.

`render_token_samples` loads the checkpoint and a tokens folder (from `invert` or `merge-tokens`),
renders `invert.samples.per_class` images of "a photo of a <token>" per class with a few
DPM-Solver++ steps, and writes them as one grid, one row per class in the folder's class order,
plus a JSON legend beside it.

Column j starts from the same noise in every row (seed derive_seed(seed, "token_samples", j)), so
within a column the rows differ only by their token: a token that learned nothing gives a row
close to its neighbours', and the same column of two subsets' grids compares their tokens directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline import PipelineError, layout, sdedit
from pipeline.device import resolve_device, resolve_dtype
from pipeline.io import atomic_path, write_json
from pipeline.progress import progress
from pipeline.rng import derive_seed
from pipeline.settings.token_samples import TokenSampleSettings
from pipeline.tokens import add_tokens_to_pipeline, load_token_file

log = logging.getLogger(__name__)

STAGE = "token_samples"
# Deterministic and good in 10 to 20 steps; the checkpoint's own scheduler may need 50 or draw noise per step.
SCHEDULER = "dpm-solver++"


def column_seeds(seed: int, per_class: int) -> list[int]:
    """The start-noise seed of each grid column, shared by every class's row."""
    return [derive_seed(seed, STAGE, j) for j in range(per_class)]


def grid_image(rows: list[list[Image.Image]], tile: int) -> Image.Image:
    """Paste rows of equal-length lists of tile x tile images into one RGB image."""
    grid = Image.new("RGB", (tile * len(rows[0]), tile * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (j * tile, i * tile))
    return grid


def render_token_samples(config: dict, tokens_dir: str | Path, out_path: str | Path) -> dict:
    """Render every token's samples of `tokens_dir` into the grid PNG `out_path` and its legend JSON.

    The grid has one row per class and `invert.samples.per_class` columns of model.resolution²
    tiles. The legend (`layout.grid_legend(out_path)`) names each row's class, token and prompt, and each
    column's seed. Both are written atomically. Returns the legend. The only reader of `config`: the
    rest gets the stage's TokenSampleSettings.
    """
    settings = TokenSampleSettings.from_config(config)
    tokens_dir, out_path = Path(tokens_dir), Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise PipelineError(f"token samples: output {out_path} must be a .png file. Got suffix {out_path.suffix!r}")
    class_tokens, _ = load_token_file(tokens_dir)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = sdedit.load_img2img(settings.model_id, device, dtype, scheduler=SCHEDULER)
    add_tokens_to_pipeline(pipe, tokens_dir, list(class_tokens))

    resolution = settings.resolution
    seeds = column_seeds(settings.seed, settings.per_class)
    prompts = {name: settings.template.format(token) for name, token in class_tokens.items()}
    started = time.perf_counter()
    rows = []
    with torch.inference_mode():
        noise = torch.cat([sdedit.txt2img_noise(pipe, resolution, torch.Generator().manual_seed(s)) for s in seeds])
        guided = sdedit.use_guidance(pipe, settings.guidance_scale)
        negative_embeds = sdedit.encode_negative_prompt(pipe) if guided else None
        for name in progress(list(class_tokens), len(class_tokens), "token samples"):
            prompt_embeds = sdedit.encode_prompt(pipe, prompts[name]).expand(len(seeds), -1, -1)
            rows.append(sdedit.txt2img(pipe, noise, prompt_embeds, negative_embeds, settings.steps, settings.guidance_scale))
    seconds = time.perf_counter() - started

    legend = {
        "image": out_path.name,
        "tile_size": resolution,
        "rows": [{"class_name": name, "token": class_tokens[name], "prompt": prompts[name]} for name in class_tokens],
        "column_seeds": seeds,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": SCHEDULER,
        "model": settings.model_id,
        "tokens_dir": str(tokens_dir),
    }
    with atomic_path(out_path) as tmp:
        grid_image(rows, resolution).save(tmp, format="PNG")
    write_json(Path(layout.grid_legend(out_path)), legend)
    log.info(
        "rendered %d samples of each of %d tokens (%d steps) in %.1fs -> %s",
        len(seeds), len(class_tokens), settings.steps, seconds, out_path,
    )  # fmt: skip
    return legend
