"""Train a classifier on a few-shot subset, with synthetic images mixed in, and report honest test accuracy.

One run, top to bottom (`train_classifier`): its `TrainSettings` (pipeline.settings.train), the
checked inputs (pipeline.train_data), the plan of every draw, fixed up front (pipeline.train_plan:
how synthetic images replace real draws, the standard flip and rotation, paired seeds), the fit
along that plan and the selection on val (pipeline.train_fit), then the test split, which nothing
before has touched, scored once with the selected model.

A method without a synthetic part (baseline, randaugment, ...) trains on real images at one learning
rate whatever the mixing settings say: it is the real-only control of every mode, and its JSON says
so (synthetic_probability or synthetic_proportion 0, two_phase null). The initial weights come from
a generator seeded by (seed, "train", trial_seed) only, so every method of a trial starts from the
same point; stochastic-depth, MixUp and CutMix draws from one seeded by (seed, "train", method,
trial_seed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.augment import partner_method
from pipeline.backbones import Classifier, build_backbone
from pipeline.device import cpu_numerics, resolve_device
from pipeline.io import write_json
from pipeline.metrics import classification_metrics
from pipeline.rng import derive_seed, numpy_rng
from pipeline.settings.train import TrainSettings
from pipeline.train_data import load_training_data
from pipeline.train_fit import Loader, fit_cached_features, fit_pixels, predict_split, trainable
from pipeline.train_plan import drawn_pool, resolve_mixing, standard_angles, training_plan, with_schedule

log = logging.getLogger(__name__)


def train_classifier(
    config: dict,
    subset_path: Path,
    manifest_path: Path,
    shard_paths: list[Path],
    method: str,
    trial_seed: int,
    out_path: Path,
    overrides: dict | None = None,
) -> dict:
    """Train `method` on the subset (+ synthetic shards), select on val, write test metrics to `out_path`.

    The JSON written (and returned) holds the metrics of the selected model on the test split,
    its validation accuracy and step, with train.paper_protocol the papers' number
    (`paper_accuracy`), the mixing settings in effect (`mixing`, `synthetic_probability`,
    `synthetic_proportion`, `two_phase`, see pipeline.train_plan) with the share of draws that were
    synthetic (`synthetic_fraction`), and the validation curve (`curve`: step, train_loss averaged
    over the steps since the previous evaluation, val_accuracy, and in two-phase runs `phase`).
    `overrides` (the --set keys of a sweep's variant, pipeline.sweeps) are recorded as they are.
    The only reader of `config`: everything below gets the method's TrainSettings.
    """
    start = time.perf_counter()
    settings = TrainSettings.from_config(config, method)
    mixing = resolve_mixing(settings)
    data = load_training_data(
        Path(subset_path), Path(manifest_path), [Path(p) for p in shard_paths], settings.synthetic_method, mixing.uses_synthetic,
        all_train=settings.real_images == "all",
    )
    if data.subset_meta.get("trial_seed", trial_seed) != trial_seed:
        raise PipelineError(f"{subset_path}: subset of trial seed {data.subset_meta['trial_seed']}, but trial seed {trial_seed} was asked for.")

    settings = with_schedule(settings, len(data.real))
    augmentations = list(settings.augmentations)
    device = resolve_device(settings.device)
    frozen = settings.recipe == "paper"
    cached = frozen and augmentations == []
    seed = settings.seed

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "train", trial_seed, "init"))
        backbone = build_backbone(settings.backbone, settings.weights, settings.image_size)
        model = Classifier(backbone, len(data.classes), frozen).to(device)
        torch.manual_seed(derive_seed(seed, "train", method, trial_seed))
        plan = training_plan(
            mixing,
            np.array([row["label"] for row in data.real]),
            data.synthetic_counts,
            settings.steps,
            settings.batch_size,
            settings.flip,
            len(standard_angles(settings.rotation_degrees, settings.rotation_angles)),
            shared_rng=numpy_rng(seed, "train", trial_seed, "draws"),
            # The only-original control draws its partner's replacements, to leave exactly those out.
            method_rng=numpy_rng(seed, "train", partner_method(method) if settings.only_original else method, trial_seed, "draws"),
        )
        real_images_drawn = len(np.unique(plan.pool_index[~plan.synthetic]))
        pool, plan = drawn_pool(data.real + data.synthetic, plan)
        loader = Loader(settings.image_size, settings.inference_batch_size, device)
        desc = f"train {method}"
        # The paper protocol looks at the test images at every evaluation; selection never does.
        official_rest = data.test if settings.paper_protocol else None
        if cached:
            fit = fit_cached_features(model, pool, data.val, plan, loader, settings, mixing.two_phase, desc, official_rest)
        else:
            fit = fit_pixels(model, pool, data.val, plan, loader, settings, mixing.two_phase, desc, augmentations, official_rest)

        # Only now, with the model chosen on val, is the test split loaded and scored.
        trainable(model).load_state_dict(fit.best_state)
        test_predictions = predict_split(model, data.test, loader, "test")

    test_labels = np.array([row["label"] for row in data.test])
    metrics = classification_metrics(test_predictions, test_labels, data.classes)
    result = {
        "dataset": settings.dataset,
        "method": method,
        "overrides": overrides or {},
        "synthetic_method": settings.synthetic_method,
        "leakage_prevention": settings.leakage_prevention,
        "augmentations": augmentations,
        "recipe": settings.recipe,
        "optimizer": settings.optimizer or "sgd",  # the finetune recipe's is always SGD
        "examples_per_class": data.subset_meta.get("examples_per_class"),
        "trial_seed": trial_seed,
        "split": "test",
        **metrics,
        "val_accuracy": fit.best_val_accuracy,
        # The papers' protocol (train.paper_protocol): the best accuracy over checkpoints on val + test.
        "paper_protocol": settings.paper_protocol,
        "paper_accuracy": max(point["official_val_accuracy"] for point in fit.curve) if settings.paper_protocol else None,
        "best_step": fit.best_step,
        "steps": settings.steps,
        "epochs": settings.epochs,
        "real_images": settings.real_images,
        "n_train_real": len(data.real),
        "real_images_drawn": real_images_drawn,  # fewer than n_train_real where proportion mode replaces or leaves some out
        "n_synthetic": len(data.synthetic),
        "mixing": mixing.mode,
        "synthetic_probability": mixing.probability,
        "synthetic_proportion": mixing.proportion,
        "two_phase": mixing.two_phase,
        "synthetic_fraction": float(plan.synthetic.mean()),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "backbone": settings.backbone,
        "weights": settings.weights,
        "image_size": settings.image_size,
        "cached_features": cached,
        "device": str(device),
        **cpu_numerics(device),
        "curve": fit.curve,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_path, result)
    log.info(
        "%s: test accuracy %.4f (mean per class %.4f) with the model of step %d (val accuracy %.4f); "
        "%d real + %d synthetic images, %.1f%% of draws synthetic, %.0fs",
        method, result["accuracy"], result["mean_class_accuracy"], fit.best_step, fit.best_val_accuracy,
        len(data.real), len(data.synthetic), 100 * result["synthetic_fraction"], result["seconds"],
    )
    return result
