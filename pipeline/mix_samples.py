"""What mixing visual concepts does to an MVC model's images: a grid and a distance per setting.

For `mvc.samples.per_class` training images of each class, `render_mix_samples` draws from one start
noise and one conditioning image (the image itself, as the mvc method conditions): the unmixed
sample (the image's own caption embedding), then for each n in `mvc.samples.swaps` the sample under
n fine swaps only (P = 0, Q = n) and under n coarse swaps only (P = n, Q = 0), each over
`mvc.samples.draws` seeded mixes. Its distance is the mean absolute pixel difference (0-1 scale) to
the unmixed sample: what the mix changed, with everything else held fixed. The study's claim to
check is that coarse mixing (whole row blocks of the embedding) changes images more than fine
mixing (part of one row).

Writes the grid (rows: images; columns: conditioning image, unmixed, fine x n, coarse x n, each
mix's first draw) and a JSON legend beside it with the per-setting distances, atomically.
Sampling is the mvc method's: generate.scheduler, num_inference_steps and guidance_scale, from CLIP("").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError, adapters, layout, mixing, sdedit
from pipeline.captions import read_captions
from pipeline.device import resolve_device, resolve_dtype
from pipeline.io import atomic_path, open_image, write_json
from pipeline.manifest import read_manifest
from pipeline.progress import progress
from pipeline.rng import derive_seed, torch_generator
from pipeline.settings.mix_samples import MixSampleSettings
from pipeline.token_samples import grid_image

log = logging.getLogger(__name__)

STAGE = "mix_samples"
KINDS = ("fine", "coarse")


def probe_images(rows: list[dict], per_class: int) -> list[dict]:
    """The first `per_class` subset rows of each class by image_id, classes in label order."""
    by_class: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda row: row["image_id"]):
        by_class.setdefault(row["label"], []).append(row)
    return [row for label in sorted(by_class) for row in by_class[label][:per_class]]


def swap_counts(kind: str, n: int) -> tuple[int, int]:
    """(P, Q) of a setting: n fine swaps only, or n coarse swaps only."""
    return (0, n) if kind == "fine" else (n, 0)


def pixel_distance(a, b) -> float:
    """Mean absolute difference of two RGB images, 0-1 scale."""
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean() / 255)


def render_mix_samples(config: dict, model_dir: str | Path, subset_path: str | Path, captions_path: str | Path, out_path: str | Path) -> dict:
    """Render the grid PNG `out_path` and its legend JSON (`layout.grid_legend(out_path)`) for
    the mvc model in `model_dir`. Returns the legend. The only reader of `config`."""
    settings = MixSampleSettings.from_config(config)
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise PipelineError(f"mix samples: output {out_path} must be a .png file. Got suffix {out_path.suffix!r}")
    adapters.check_mvc_model(model_dir)
    captions = read_captions(captions_path)
    rows, _ = read_manifest(subset_path)
    probes = probe_images(rows, settings.per_class)
    missing = [row["image_id"] for row in probes if row["image_id"] not in captions]
    if missing:
        raise PipelineError(f"{captions_path}: no caption for image {missing[0]!r} of {subset_path}. Expected one per training image.")
    class_ids: dict[str, list[str]] = {}
    for image_id, (class_name, _) in captions.items():  # the caption file's order, as the mvc method mixes
        class_ids.setdefault(class_name, []).append(image_id)

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = sdedit.load_img2img(str(model_dir), device, dtype, scheduler=settings.scheduler)
    if not adapters.is_image_conditioned(pipe.unet, pipe.vae):
        raise PipelineError(f"{model_dir}: the UNet takes {pipe.unet.config.in_channels} input channels. Expected an image-conditioned one (the mvc stage's).")
    settings_list = [(kind, n) for kind in KINDS for n in settings.swaps]

    started = time.perf_counter()
    grid_rows, legend_rows = [], []
    distances = {kind: {n: [] for n in settings.swaps} for kind in KINDS}
    with torch.inference_mode():
        guided = sdedit.use_guidance(pipe, settings.guidance_scale)
        negative_embeds = sdedit.encode_negative_prompt(pipe) if guided else None
        embeddings = {name: sdedit.encode_prompts(pipe, [captions[i][1] for i in ids]) for name, ids in class_ids.items()}
        for row in progress(probes, len(probes), "mix samples"):
            image_id = row["image_id"]
            class_name = captions[image_id][0]
            ids, class_embeddings = class_ids[class_name], embeddings[class_name]
            own = ids.index(image_id)
            rows_, dim = class_embeddings.shape[1:]
            mixed = [class_embeddings[own]]
            for kind, n in settings_list:
                coarse, fine = swap_counts(kind, n)
                for draw in range(settings.draws):
                    generator = torch_generator(settings.seed, STAGE, image_id, kind, n, draw)
                    mix = mixing.draw_mix(generator, own, len(ids), rows_, dim, coarse, fine)
                    mixed.append(mixing.apply_mix(class_embeddings, own, mix))
            source = open_image(row["path"])
            latent = sdedit.encode_source(pipe, source, settings.resolution).mode()
            noise = sdedit.txt2img_noise(pipe, settings.resolution, torch.Generator().manual_seed(derive_seed(settings.seed, STAGE, image_id)))
            count = len(mixed)
            images = sdedit.txt2img(pipe, noise.expand(count, -1, -1, -1), torch.stack(mixed), negative_embeds,
                                    settings.steps, settings.guidance_scale, latent.expand(count, -1, -1, -1))  # fmt: skip
            unmixed, rest = images[0], images[1:]
            shown = [source.convert("RGB").resize((settings.resolution,) * 2), unmixed]
            row_distances = {}
            for index, (kind, n) in enumerate(settings_list):
                draws = rest[index * settings.draws : (index + 1) * settings.draws]
                values = [pixel_distance(image, unmixed) for image in draws]
                distances[kind][n].extend(values)
                row_distances[f"{kind}-{n}"] = float(np.mean(values))
                shown.append(draws[0])
            grid_rows.append(shown)
            legend_rows.append({"image_id": image_id, "class_name": class_name, "caption": captions[image_id][1], "distances": row_distances})
    seconds = time.perf_counter() - started

    summary = {kind: {str(n): float(np.mean(values)) for n, values in by_n.items()} for kind, by_n in distances.items()}
    legend = {
        "image": out_path.name,
        "tile_size": settings.resolution,
        "columns": ["conditioning image", "unmixed"] + [f"{kind} {'Q' if kind == 'fine' else 'P'}={n}" for kind, n in settings_list],
        "rows": legend_rows,
        "mean_pixel_distance": summary,  # kind -> n -> mean over every probe image and draw
        "draws": settings.draws,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": settings.scheduler,
        "model": str(model_dir),
    }
    with atomic_path(out_path) as tmp:
        grid_image(grid_rows, settings.resolution).save(tmp, format="PNG")
    write_json(Path(layout.grid_legend(out_path)), legend)
    log.info(
        "mix samples of %d images in %.1fs; mean pixel distance to the unmixed sample: %s -> %s",
        len(probes), seconds,
        ", ".join(f"{kind} {n}: {value:.3f}" for kind, by_n in summary.items() for n, value in by_n.items()), out_path,
    )  # fmt: skip
    return legend
