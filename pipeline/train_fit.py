"""The train stage's fitting: a classifier trained along a `TrainingPlan`, selected on val.

Two paths, one plan (pipeline.train_plan):
  * cached features (recipe "paper" and no pixel-space augmentation beyond the standard one): the
    frozen backbone embeds every view (flip x angle) of every drawn training image once, then the linear head
    trains on those features, at hundreds of steps per second on one CPU core (benchmarks/bench_train.py).
  * pixels (RandAugment, AutoAugment, Cutout, MixUp, CutMix, or recipe "finetune"): each draw is
    augmented and goes through the backbone at every step.
Images are decoded from files and PNG bytes and resized to train.image_size once, when loaded; pool
images that the plan never draws (most synthetic versions in proportion mode) are not loaded at all.

Model selection: the step with the best validation accuracy (earliest on ties). Val is scored every
train.eval_every steps, after the last step and, in two-phase runs, after the last step of phase 1;
phase 2 trains at the learning rate(s) times real_learning_rate_scale, and curve points carry their
`phase` (1 or 2).

The paper-compatible protocol (train.paper_protocol) also scores the official validation images
(val and the held-out test split together) at every evaluation, into the curve's
`official_val_accuracy`: the published protocol reports its best value over checkpoints. Selection
never looks at it, so the held-out number stays what it is without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import rotate

from pipeline.augment import batch_transform, image_transform
from pipeline.backbones import Classifier
from pipeline.device import host_threads
from pipeline.io import batched, decode_image, open_image, threaded_map
from pipeline.progress import progress
from pipeline.settings.train import TrainSettings
from pipeline.train_plan import TrainingPlan, standard_angles


@dataclass
class FitResult:
    curve: list[dict]
    best_step: int
    best_val_accuracy: float
    best_state: dict


def _decode_row(row: dict, size: int) -> torch.Tensor:
    """A row's image from its file (real) or PNG bytes (synthetic), resized to a square, as uint8 [3, S, S]."""
    if "synthetic_id" in row:
        image = decode_image(row["image"], what=f"synthetic image {row['synthetic_id']}")
    else:
        image = open_image(row["path"])
    image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class Loader:
    """Decodes image rows on the job's threads (PIL releases the GIL) while the caller works on the
    batch before, and turns uint8 batches into model inputs on the device."""

    def __init__(self, image_size: int, batch_size: int, device: torch.device, threads: int | None = None):
        self.size = image_size
        self.batch_size = batch_size
        self.threads = threads or host_threads()
        self.device = device

    def batches(self, rows: list[dict], desc: str) -> Iterator[torch.Tensor]:
        decode = partial(_decode_row, size=self.size)
        with threaded_map(decode, rows, self.threads, 2 * self.batch_size) as images:
            batches = (torch.stack(batch) for batch in batched(images, self.batch_size))
            yield from progress(batches, total=math.ceil(len(rows) / self.batch_size), desc=desc)

    def decode_all(self, rows: list[dict], desc: str) -> torch.Tensor:
        return torch.cat(list(self.batches(rows, desc)))

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).float().div_(255)


@torch.no_grad()
def _embed(model: Classifier, loader: Loader, rows: list[dict], desc: str, flips: bool = False, angles: Sequence[float] = (0.0,)) -> torch.Tensor:
    """Backbone features [views, N, D] of the images as they are, or of every standard view of them:
    view flip * len(angles) + a is the image, mirrored if flip, rotated by angles[a]."""
    chunks = []
    for batch in loader.batches(rows, desc):
        mirrored = [False, True] if flips else [False]
        views = [standard_view(batch, flip, angle) for flip in mirrored for angle in angles]
        chunks.append(torch.stack([model.backbone(loader.to_input(view)) for view in views]))
    return torch.cat(chunks, dim=1)


def standard_view(images: torch.Tensor, flip: bool, angle: float) -> torch.Tensor:
    """uint8 images [..., 3, H, W] mirrored (if `flip`), then rotated by `angle` degrees about the centre."""
    if flip:
        images = images.flip(-1)
    if angle:
        images = rotate(images, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    return images


def fit_cached_features(
    model: Classifier,
    pool: list[dict],
    val: list[dict],
    plan: TrainingPlan,
    loader: Loader,
    settings: TrainSettings,
    two_phase: dict | None,
    desc: str,
    official_rest: list[dict] | None = None,
) -> FitResult:
    """Recipe "paper" without pixel augmentations: embed once, then train the head on features.
    `official_rest`: the images that, with val, are the official validation split (the test split;
    paper protocol)."""
    angles = standard_angles(settings.rotation_degrees, settings.rotation_angles)
    pool_features = _embed(model, loader, pool, "embed training images", settings.flip, angles)
    pool_labels = _labels(pool).to(loader.device)
    val_features = _embed(model, loader, val, "embed val images")[0]
    rest_features = _embed(model, loader, official_rest, "embed the other official val images")[0] if official_rest else None
    pool_index = torch.from_numpy(plan.pool_index).to(loader.device)
    view = torch.from_numpy(plan.flip.astype(np.int64) * len(angles) + plan.angle_index).to(loader.device)
    batch_size = settings.batch_size

    def batches():
        for step in range(settings.steps):
            draws = slice(step * batch_size, (step + 1) * batch_size)
            yield pool_features[view[draws], pool_index[draws]], pool_labels[pool_index[draws]]

    evaluate = _evaluator(model.head, val_features, _labels(val), rest_features, _labels(official_rest) if official_rest else None, loader.batch_size)
    optimizer = head_optimizer(model.head, settings)
    return _fit(model, model.head, batches(), optimizer, False, two_phase, evaluate, settings, desc)


def head_optimizer(head: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The frozen-backbone recipe's optimizer of the linear head: Adam (DA-Fusion) or SGD with momentum."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(head.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    return torch.optim.Adam(head.parameters(), lr=settings.learning_rate)


class PlanDataset(Dataset):
    """Draw k of the plan: the pool image in its planned standard view, augmented with the draw's own seed."""

    def __init__(self, pool_images: torch.Tensor, pool_labels: torch.Tensor, plan: TrainingPlan, angles: Sequence[float], transform: Callable):
        self.pool_images = pool_images
        self.pool_labels = pool_labels
        self.plan = plan
        self.angles = angles
        self.transform = transform

    def __len__(self) -> int:
        return len(self.plan.pool_index)

    def __getitem__(self, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.plan.pool_index[draw])
        image = standard_view(self.pool_images[index], bool(self.plan.flip[draw]), self.angles[self.plan.angle_index[draw]])
        # torchvision transforms draw from torch's global generator: seed it per draw, and restore
        # it afterwards, so the draw's augmentation is the same in any worker or in the main process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.plan.augment_seed[draw]))
            image = self.transform(image)
        return image, self.pool_labels[index]


def fit_pixels(
    model: Classifier,
    pool: list[dict],
    val: list[dict],
    plan: TrainingPlan,
    loader: Loader,
    settings: TrainSettings,
    two_phase: dict | None,
    desc: str,
    augmentations: list[str],
    official_rest: list[dict] | None = None,
) -> FitResult:
    """Every draw augmented in pixel space and passed through the backbone at every step.
    `official_rest`: as in fit_cached_features."""
    pool_images = loader.decode_all(pool, "decode training images")
    dataset = PlanDataset(pool_images, _labels(pool), plan, standard_angles(settings.rotation_degrees, settings.rotation_angles), image_transform(augmentations, settings))
    draws = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.num_workers, pin_memory=loader.device.type == "cuda")
    mix = batch_transform(augmentations, model.head.out_features, settings)

    def batches():
        for images, labels in draws:
            images, labels = images.to(loader.device, non_blocking=True), labels.to(loader.device, non_blocking=True)
            yield mix(images, labels) if mix else (images, labels)

    if model.frozen:
        # The backbone never changes: embed val once and score the head alone.
        val_inputs = _embed(model, loader, val, "embed val images")[0]
        rest_inputs = _embed(model, loader, official_rest, "embed the other official val images")[0] if official_rest else None
        score = model.head
        optimizer = head_optimizer(model.head, settings)
    else:
        val_inputs = loader.decode_all(val, "decode val images")
        rest_inputs = loader.decode_all(official_rest, "decode the other official val images") if official_rest else None
        score = lambda images: model(loader.to_input(images))  # noqa: E731
        finetune = settings.finetune
        optimizer = torch.optim.SGD(
            [
                {"params": model.backbone.parameters(), "lr": finetune["backbone_learning_rate"]},
                {"params": model.head.parameters(), "lr": finetune["head_learning_rate"]},
            ],
            momentum=finetune["momentum"],
            weight_decay=finetune["weight_decay"],
        )
    evaluate = _evaluator(score, val_inputs, _labels(val), rest_inputs, _labels(official_rest) if official_rest else None, loader.batch_size)
    # Fine-tuning follows a cosine schedule; the head alone trains at a constant rate.
    return _fit(model, model, batches(), optimizer, not model.frozen, two_phase, evaluate, settings, desc)


def _evaluator(score: Callable, val_inputs: torch.Tensor, val_labels: torch.Tensor, rest_inputs, rest_labels, batch_size: int) -> Callable[[], dict]:
    """What _fit scores at each evaluation: val accuracy (which selects) and, with the paper
    protocol's other official validation images, the accuracy on val and those together."""

    def evaluate() -> dict:
        val_correct = _predict(score, val_inputs, batch_size) == val_labels
        scores = {"val_accuracy": float(val_correct.float().mean())}
        if rest_inputs is not None:
            other_correct = _predict(score, rest_inputs, batch_size) == rest_labels
            scores["official_val_accuracy"] = float(torch.cat([val_correct, other_correct]).float().mean())
        return scores

    return evaluate


def train_step(forward: Callable, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step on cross-entropy; `targets` are class indices or (MixUp/CutMix) soft labels."""
    loss = F.cross_entropy(forward(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _fit(
    model: Classifier,
    forward: Callable,
    batches: Iterator,
    optimizer: torch.optim.Optimizer,
    cosine: bool,
    two_phase: dict | None,
    evaluate: Callable[[], dict],
    settings: TrainSettings,
    desc: str,
) -> FitResult:
    """Train for train.steps steps, score val every train.eval_every steps, after the last step
    and (two-phase runs) after the last step of phase 1, and keep the weights of the best-scoring
    step (the earliest on ties)."""
    steps, eval_every = settings.steps, settings.eval_every
    phase_1_steps = two_phase["synthetic_steps"] if two_phase else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_learning_rate_factor, steps=steps, cosine=cosine, two_phase=two_phase))
    weights = trainable(model)
    curve: list[dict] = []
    best_step, best_accuracy, best_state = 0, -1.0, {}
    loss_sum, loss_count = 0.0, 0
    model.train()
    for step, (inputs, targets) in enumerate(progress(batches, total=steps, desc=desc), start=1):
        loss_sum = loss_sum + train_step(forward, optimizer, inputs, targets)
        loss_count += 1
        scheduler.step()
        if step % eval_every and step not in (steps, phase_1_steps):
            continue
        model.eval()
        scores = evaluate()
        model.train()
        accuracy = scores["val_accuracy"]
        point = {"step": step, "train_loss": float(loss_sum / loss_count), **scores}
        if two_phase:
            point["phase"] = 1 if step <= phase_1_steps else 2
        curve.append(point)
        loss_sum, loss_count = 0.0, 0
        if accuracy > best_accuracy:
            best_step, best_accuracy = step, accuracy
            best_state = {name: value.detach().clone() for name, value in weights.state_dict().items()}
    model.eval()
    return FitResult(curve, best_step, best_accuracy, best_state)


def _learning_rate_factor(steps_taken: int, steps: int, cosine: bool, two_phase: dict | None) -> float:
    """Multiplier of the base learning rates for the step after `steps_taken` steps (LambdaLR's
    argument): cosine annealing to 0 over the run if asked, times the scale of phase 2 in it."""
    factor = (1 + math.cos(math.pi * steps_taken / steps)) / 2 if cosine else 1.0
    if two_phase and steps_taken >= two_phase["synthetic_steps"]:
        factor *= two_phase["real_learning_rate_scale"]
    return factor


def trainable(model: Classifier) -> nn.Module:
    """The part of the model that training changes: the head alone when the backbone is frozen."""
    return model.head if model.frozen else model


@torch.no_grad()
def _predict(score: Callable, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([score(inputs[i : i + batch_size]).argmax(dim=1).cpu() for i in range(0, len(inputs), batch_size)])


@torch.no_grad()
def predict_split(model: Classifier, rows: list[dict], loader: Loader, split: str) -> np.ndarray:
    model.eval()
    predictions = [model(loader.to_input(batch)).argmax(dim=1).cpu() for batch in loader.batches(rows, f"predict {split}")]
    return torch.cat(predictions).numpy()


def _labels(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([row["label"] for row in rows], dtype=torch.long)
