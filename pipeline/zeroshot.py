"""Zero-shot CLIP: the accuracy a pretrained CLIP reaches on the test split with no training image,
the reference row beside the trained classifiers (study 001's 97%).

Each class's text embedding is the normalised mean of its prompts' normalised embeddings (one per
template of zeroshot.templates, "{}" the class name), as in CLIP's own zero-shot evaluation; an
image gets the class of the highest cosine similarity. The model is loaded with open_clip:
`zeroshot.model` an architecture name (ViT-L-14) or a .json model config (registered under its
file name), `zeroshot.pretrained` a tag (openai, laion2b_s32b_b82k) or a local weights file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.device import resolve_device
from pipeline.io import batched, open_image, write_json
from pipeline.manifest import read_manifest
from pipeline.metrics import classification_metrics
from pipeline.progress import progress
from pipeline.settings.zeroshot import ZeroShotSettings

log = logging.getLogger(__name__)


def load_clip(model: str, pretrained: str | None, device: torch.device):
    """(model, image preprocessing, tokenizer) from open_clip; a .json `model` is registered first."""
    import open_clip

    name = model
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise PipelineError(f"zeroshot.model: {model} does not exist. Expected an open_clip architecture name or a model config .json file")
        open_clip.add_model_config(model)
        name = Path(model).stem
    elif model not in open_clip.list_models():
        raise PipelineError(f"zeroshot.model: {model!r} is not an open_clip architecture. Expected one of open_clip.list_models(), e.g. ViT-L-14, or a .json model config")
    if pretrained is None:
        log.warning("zeroshot.pretrained is null: %s has random weights, so its accuracy is chance (for tests only)", name)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as exc:  # open_clip's message names the tag and the model
        raise PipelineError(f"zeroshot.pretrained: {exc}") from None
    clip.eval()
    return clip, preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def class_embeddings(clip, tokenizer, classes: list[str], templates: list[str], device: torch.device) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompts' normalised text embeddings."""
    rows = []
    for name in classes:
        text = clip.encode_text(tokenizer([template.format(name) for template in templates]).to(device)).float()
        mean = torch.nn.functional.normalize(text, dim=-1).mean(dim=0)
        rows.append(torch.nn.functional.normalize(mean, dim=0))
    return torch.stack(rows)


@torch.no_grad()
def predict(clip, preprocess, text: torch.Tensor, rows: list[dict], batch_size: int, device: torch.device) -> np.ndarray:
    predictions = []
    batches = list(batched(rows, batch_size))
    for batch in progress(batches, total=len(batches), desc="zero-shot CLIP"):
        images = torch.stack([preprocess(open_image(row["path"])) for row in batch]).to(device)
        features = torch.nn.functional.normalize(clip.encode_image(images).float(), dim=-1)
        predictions.append((features @ text.T).argmax(dim=1).cpu())
    return torch.cat(predictions).numpy()


def zero_shot_accuracy(config: dict, manifest_path: str | Path, out_path: str | Path) -> dict:
    """Score zero-shot CLIP on the manifest's test split; write and return the JSON
    ({model, pretrained, templates, split, accuracy, mean_class_accuracy, per_class_accuracy, n_test})."""
    start = time.perf_counter()
    settings = ZeroShotSettings.from_config(config)
    if settings.model is None:
        raise PipelineError("zeroshot: zeroshot.model is null. Expected an open_clip architecture, e.g. ViT-L-14")
    rows, meta = read_manifest(manifest_path)
    test = [row for row in rows if row["split"] == "test"]
    if not test:
        raise PipelineError(f"{manifest_path}: no images in the test split. Expected the held-out split the classifiers are scored on")
    device = resolve_device(settings.device)
    clip, preprocess, tokenizer = load_clip(settings.model, settings.pretrained, device)
    classes = list(meta["classes"])
    text = class_embeddings(clip, tokenizer, classes, list(settings.templates), device)
    predicted = predict(clip, preprocess, text, test, settings.batch_size, device)
    result = {
        "model": settings.model,
        "pretrained": settings.pretrained,
        "templates": list(settings.templates),
        "split": "test",
        **classification_metrics(predicted, np.array([row["label"] for row in test]), classes),
        "n_test": len(test),
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_path, result)
    log.info("zero-shot %s (%s): test accuracy %.4f on %d images, %.0fs", settings.model, settings.pretrained, result["accuracy"], len(test), result["seconds"])
    return result
