"""The oracle: an independent classifier of the demo domain that measures synthetic images.

A method's claim ("SDEdit at low t0 keeps the class", "the learned token draws its class") is
checked by asking a classifier that is neither the classifier under test nor trained on anything
the pipeline made. This one is a small CNN trained by the project on scenes of the demo's
`pretrain` digit pool (`demo.pretraining_corpus`), labelled like `prepare` labels the demo (the
largest visible digit), so it has seen no digit of the demo's train, val or test images. It is
shipped in `models/oracle/` beside the demo model (`python -m pipeline train-oracle`), its sha256
recorded and checked on load like the demo model's.

`score_shards` gives, for a synthetic set, the share of images the oracle assigns to the source
image's class and the mean absolute pixel difference to the source, per t0 (strength).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline import PipelineError
from pipeline.checkpoint import check_recorded_hashes, weight_hashes
from pipeline.io import atomic_path, decode_image, grant_umask_permissions, open_image, write_json
from pipeline.progress import progress
from pipeline.rng import numpy_rng

log = logging.getLogger(__name__)

WEIGHTS_FILE = "oracle.safetensors"
INFO_FILE = "oracle.json"
# The oracle sees every image at the demo's resolution.
ORACLE_SIZE = 64
NUM_CLASSES = 10


class OracleNet(nn.Module):
    """Four conv stages (64 -> 4 px) and a linear head: small, and enough for digit scenes."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, 64, 64) float in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB").resize((ORACLE_SIZE, ORACLE_SIZE), Image.BILINEAR)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


@dataclass(frozen=True)
class OracleSettings:
    seed: int
    corpus_images: int
    steps: int
    batch_size: int
    learning_rate: float
    max_objects: int


def train_oracle(settings: OracleSettings, out_dir: str | Path) -> Path:
    """Train the oracle on its own draw of pretraining scenes; save weights and a record atomically."""
    from safetensors.torch import save_file

    from pipeline.demo import pretraining_corpus

    torch.manual_seed(settings.seed)
    # Another stream of scenes than the demo model's corpus (seed + 1), from the same digit pool.
    scenes = list(progress(pretraining_corpus(settings.corpus_images, ORACLE_SIZE, settings.max_objects, settings.seed + 1),
                           total=settings.corpus_images, desc="oracle corpus"))
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([s.label for s in scenes])
    held_out = settings.corpus_images // 10
    model = OracleNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate, total_steps=settings.steps)
    model.train()
    for step in progress(range(settings.steps), total=settings.steps, desc="oracle"):
        idx = torch.from_numpy(numpy_rng(settings.seed, "oracle", step).integers(held_out, len(labels), settings.batch_size))
        batch = images[idx].float().div(255)
        # Random flips would change a digit's class; small shifts do not.
        shift = numpy_rng(settings.seed, "oracle", "shift", step).integers(-4, 5, size=2)
        batch = torch.roll(batch, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        loss = F.cross_entropy(model(batch), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[i : min(i + 256, held_out)].float().div(255)).argmax(1) for i in range(0, held_out, 256)])
    held_out_accuracy = float((predicted == labels[:held_out]).float().mean())
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(model.state_dict(), tmp / WEIGHTS_FILE)
        grant_umask_permissions(tmp)
        write_json(tmp / INFO_FILE, {
            "note": "independent demo-domain classifier (pipeline.oracle), trained on the demo's pretrain digit pool only",
            "settings": settings.__dict__,
            "held_out_accuracy": held_out_accuracy,
            "sha256": weight_hashes(tmp),
        })
    log.info("oracle at %s: %.1f%% on %d held-out pretraining scenes", out_dir, 100 * held_out_accuracy, held_out)
    return Path(out_dir)


def load_oracle(path: str | Path) -> OracleNet:
    """The shipped oracle, after checking its weights against the recorded sha256."""
    from safetensors.torch import load_file

    path = Path(path)
    check_recorded_hashes(path, path / INFO_FILE)
    model = OracleNet()
    model.load_state_dict(load_file(path / WEIGHTS_FILE))
    return model.eval()


@torch.no_grad()
def predict(model: OracleNet, images: list[Image.Image], batch_size: int = 128) -> np.ndarray:
    """The oracle's class index for each image."""
    out = [model(to_batch(images[i : i + batch_size])).argmax(1).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def mean_abs_difference(synthetic: Image.Image, source: Image.Image) -> float:
    """Mean absolute pixel difference on a 0-1 scale, at the source's size."""
    a = np.asarray(synthetic.convert("RGB").resize(source.size, Image.BILINEAR), dtype=np.float32)
    b = np.asarray(source.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean() / 255)


def score_shards(oracle_dir: str | Path, shard_paths: list[str | Path], manifest_path: str | Path, out_path: str | Path) -> dict:
    """Oracle agreement with the source class, and pixel distance to the source, per strength.

    Beside each agreement stands the oracle's agreement on the unedited sources of the same images
    (`source_agreement`): the paired reference for what an edit keeps, since the oracle misreads
    some scenes whatever is done to them. The oracle names the ten digit classes, so agreement
    compares class names: a run on a subset of the classes (dataset.classes) is scored the same way.
    """
    from pipeline.demo import CLASS_NAMES
    from pipeline.manifest import read_manifest, read_shards

    oracle = load_oracle(oracle_dir)
    manifest_rows, meta = read_manifest(manifest_path)
    unknown = sorted(set(meta["classes"]) - set(CLASS_NAMES))
    if unknown:
        raise PipelineError(f"{manifest_path}: classes {unknown} are not digit classes the oracle knows ({', '.join(CLASS_NAMES)}). Expected the demo dataset, or fid.oracle: null")
    sources = {row["image_id"]: row for row in manifest_rows}
    rows = [r for r in read_shards(shard_paths) if not r.get("nsfw")]
    images = [decode_image(r["image"], f"synthetic image {r['synthetic_id']}") for r in rows]
    agrees = [CLASS_NAMES[guess] == row["class_name"] for row, guess in zip(rows, predict(oracle, images))]
    source_images = {image_id: open_image(sources[image_id]["path"]) for image_id in sorted({r["image_id"] for r in rows})}
    source_guesses = dict(zip(source_images, predict(oracle, list(source_images.values())))) if source_images else {}
    source_agrees = [CLASS_NAMES[source_guesses[row["image_id"]]] == sources[row["image_id"]]["class_name"] for row in rows]
    by_strength: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"agree": [], "source_agree": [], "mad": []})
    for row, image, agree, source_agree in zip(rows, images, agrees, source_agrees):
        key = "none" if row["strength"] is None else f"{row['strength']:.4g}"
        by_strength[key]["agree"].append(float(agree))
        by_strength[key]["source_agree"].append(float(source_agree))
        by_strength[key]["mad"].append(mean_abs_difference(image, source_images[row["image_id"]]))
    test_rows = [r for r in manifest_rows if r["split"] == "test"]
    test_guesses = predict(oracle, [open_image(r["path"]) for r in test_rows])
    result = {
        "oracle": str(oracle_dir),
        "real_test_agreement": float(np.mean([CLASS_NAMES[g] == r["class_name"] for g, r in zip(test_guesses, test_rows)])) if test_rows else None,
        "n_real_test": len(test_rows),
        "agreement": float(np.mean(agrees)) if rows else None,
        "source_agreement": float(np.mean(source_agrees)) if rows else None,
        "n_synthetic": len(rows),
        "by_strength": {
            key: {
                "n": len(v["agree"]),
                "agreement": float(np.mean(v["agree"])),
                "source_agreement": float(np.mean(v["source_agree"])),
                "mean_abs_difference": float(np.mean(v["mad"])),
            }
            for key, v in sorted(by_strength.items())
        },
    }
    write_json(out_path, result)
    log.info("oracle: %d synthetic images, %.1f%% agreement with the source class (real test images: %s) -> %s",
             len(rows), 100 * (result["agreement"] or 0), result["real_test_agreement"], out_path)
    return result
