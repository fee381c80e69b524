"""The train stage's plan: every draw of a run fixed up front (torch-free).

Training draws real images uniformly with replacement; synthetic images enter by replacing draws, in
one of four ways, all fixed for the whole run as a `TrainingPlan` (which image, flipped or not,
rotated by which angle, real or synthetic, the seed of its pixel augmentations), so both fitting
paths (pipeline.train_fit) obey the same plan and results do not depend on the number of
data-loading workers:
  * train.mixing: probability (DA-Fusion, eq. 6-7): each draw is replaced, with probability
    alpha = train.synthetic_probability, by one of that image's synthetic versions, chosen uniformly.
  * train.mixing: proportion (a fixed real/synthetic ratio): a share p = train.synthetic_proportion
    of the real images is swapped for synthetic images for the whole run. In each class of n_c
    images, round(p * n_c) of them (halves round up) are swapped, each for one synthetic version of
    itself chosen uniformly; the images are taken in a seeded order of the class that does not depend
    on p, so the images swapped at a smaller p are among those swapped at a larger p. p = 0 trains
    exactly like the baseline, p = 1 on synthetic images only (the `+synthetic-only` methods).
  * train.mixing: combined (MVC's "combined"): every draw is uniform over the union of the real
    images and their synthetic versions: a real image with M versions is replaced with probability
    M / (M + 1), by one of them chosen uniformly.
  * train.two_phase {synthetic_steps, real_learning_rate_scale, phase_1}: the first synthetic_steps
    steps replace every draw by a synthetic version (alpha = 1; phase_1: synthetic, the default) or
    draw from the union as combined does (phase_1: combined, MVC's two-phase training), the
    remaining steps draw real images only.
A real image whose synthetic versions were all flagged nsfw stays real in every mode.

The standard augmentation every method gets (DA-Fusion's): a horizontal flip with probability 1/2
(train.flip) and a small rotation, drawn uniformly from train.rotation_angles evenly spaced angles in
[-train.rotation_degrees, +train.rotation_degrees]. A finite set of angles, rather than a continuous
one, is what lets the cached-feature path embed every view once.

Paired comparisons: the real-image draws, the flips and the rotations come from a generator seeded
by (seed, "train", trial_seed) only (`shared_rng`), so every method of a trial sees the same real
images in the same order; the synthetic substitutions and the augmentation seeds come from one
seeded by (seed, "train", method, trial_seed) (`method_rng`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline import PipelineError
from pipeline.settings.train import TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mixing:
    """How synthetic images replace real draws in one run, as the method and train.mixing /
    train.two_phase together decide (see the module docstring)."""

    mode: str  # train.mixing: "probability", "proportion" or "combined"
    probability: float | None  # alpha of probability mode; None in the other modes and two-phase runs
    proportion: float | None  # p of proportion mode; None otherwise
    two_phase: dict | None  # {"synthetic_steps", "real_learning_rate_scale"[, "phase_1"]} of a two-phase run
    combined: bool = False  # draws uniform over the union of real and synthetic images (combined mode)
    only_original: bool = False  # proportion mode's replaced images left out, not replaced (its control)

    @property
    def uses_synthetic(self) -> bool:
        return bool(self.probability or self.proportion or self.two_phase or self.combined)


@dataclass
class TrainingPlan:
    """Draw k of the run (step k // batch_size, position k % batch_size)."""

    pool_index: np.ndarray  # int64: index into the image pool
    flip: np.ndarray  # bool: mirror the image horizontally
    angle_index: np.ndarray  # int64: index into `standard_angles` of the draw's rotation
    synthetic: np.ndarray  # bool: the draw was replaced by a synthetic version
    augment_seed: np.ndarray  # int64: seed of the draw's pixel augmentations


def with_schedule(settings: TrainSettings, n_real: int) -> TrainSettings:
    """The settings with the `steps` and `eval_every` in effect: from train.epochs when it is set."""
    if settings.epochs is not None:
        steps_per_epoch = math.ceil(n_real / settings.batch_size)
        settings = dataclasses.replace(settings, steps=settings.epochs * steps_per_epoch, eval_every=steps_per_epoch)
    two_phase = settings.two_phase
    if two_phase is not None and two_phase["synthetic_steps"] >= settings.steps:
        where = "train.steps" if settings.epochs is None else f"train.epochs {settings.epochs} x {steps_per_epoch} steps per epoch"
        raise PipelineError(
            f"train.two_phase.synthetic_steps: got {two_phase['synthetic_steps']} with {settings.steps} steps "
            f"({where}). Expected fewer, so that phase 2 trains on real images."
        )
    return settings


def resolve_mixing(settings: TrainSettings) -> Mixing:
    """The mixing of one run: real only without a synthetic source (mixing.mode is still recorded),
    synthetic only for `+synthetic-only`, else as train.mixing and train.two_phase say."""
    mode = settings.mixing
    if settings.synthetic_only:
        return Mixing("proportion", None, 1.0, None)
    if settings.only_original:
        return Mixing("proportion", None, settings.synthetic_proportion, None, only_original=True)
    if settings.synthetic_method is None:
        return Mixing(mode, 0.0 if mode == "probability" else None, 0.0 if mode == "proportion" else None, None)
    if settings.two_phase is not None:
        return Mixing(mode, None, None, dict(settings.two_phase))
    if mode == "proportion":
        return Mixing(mode, None, settings.synthetic_proportion, None)
    if mode == "combined":
        return Mixing(mode, None, None, None, combined=True)
    return Mixing(mode, settings.synthetic_probability, None, None)


def training_plan(
    mixing: Mixing,
    real_labels: np.ndarray,
    synthetic_counts: np.ndarray,
    steps: int,
    batch_size: int,
    flip: bool,
    num_angles: int,
    shared_rng: np.random.Generator,
    method_rng: np.random.Generator,
) -> TrainingPlan:
    """The draws of a run of `steps` steps of `batch_size` draws under `mixing`."""
    draws = steps * batch_size
    views = draw_views(draws, flip, num_angles, shared_rng)
    if mixing.proportion is not None:
        return draw_proportion_plan(real_labels, synthetic_counts, draws, mixing.proportion, views, shared_rng, method_rng, mixing.only_original)
    if mixing.two_phase is not None:
        phase_1 = np.arange(draws) < mixing.two_phase["synthetic_steps"] * batch_size
        if mixing.two_phase.get("phase_1", "synthetic") == "combined":
            return draw_plan(len(real_labels), synthetic_counts, draws, 0.0, views, shared_rng, method_rng, union=phase_1)
        probability = phase_1.astype(np.float64)
    elif mixing.combined:
        return draw_plan(len(real_labels), synthetic_counts, draws, 0.0, views, shared_rng, method_rng, union=True)
    else:
        probability = mixing.probability
    return draw_plan(len(real_labels), synthetic_counts, draws, probability, views, shared_rng, method_rng)


def draw_plan(
    n_real: int,
    synthetic_counts: np.ndarray,
    draws: int,
    synthetic_probability: float | np.ndarray,
    views: tuple[np.ndarray, np.ndarray],
    shared_rng: np.random.Generator,
    method_rng: np.random.Generator,
    union: bool | np.ndarray = False,
) -> TrainingPlan:
    """Draw real images uniformly with replacement; replace each by a uniformly chosen synthetic
    version of it with probability `synthetic_probability` (images without versions stay real).

    Draws where `union` holds (all, or a mask per draw) are replaced with probability M/(M+1) for a
    real image with M versions instead: uniform over the union of real and synthetic images when
    every real image has the same number of versions, as generation makes them (num_per_image each).
    `synthetic_probability` is one number, or one per draw (two-phase runs: 1 in phase 1, then 0);
    `views` the (flip, angle_index) of every draw, from `draw_views`.
    Pool layout: real images 0..n_real-1, then the synthetic versions of image i at
    n_real + sum(synthetic_counts[:i]) + j, j < synthetic_counts[i].
    """
    synthetic_counts = np.asarray(synthetic_counts, dtype=np.int64)
    real_index = shared_rng.integers(n_real, size=draws)
    versions = synthetic_counts[real_index]
    probability = np.where(union, versions / (1 + versions), synthetic_probability)
    replaced = (method_rng.random(draws) < probability) & (versions > 0)
    version = np.floor(method_rng.random(draws) * versions).astype(np.int64)
    return _plan(real_index, views, np.where(replaced, version, -1), synthetic_counts, method_rng)


def draw_proportion_plan(
    real_labels: np.ndarray,
    synthetic_counts: np.ndarray,
    draws: int,
    synthetic_proportion: float,
    views: tuple[np.ndarray, np.ndarray],
    shared_rng: np.random.Generator,
    method_rng: np.random.Generator,
    only_original: bool = False,
) -> TrainingPlan:
    """Draw real images uniformly with replacement, where the images that `fixed_replacements`
    swaps are always replaced by their one synthetic version. Pool layout as in `draw_plan`.
    `only_original`: draw from the images it keeps alone instead, and replace none (the control;
    given its partner's `method_rng`, it leaves out exactly the images the partner replaces)."""
    synthetic_counts = np.asarray(synthetic_counts, dtype=np.int64)
    replacement = fixed_replacements(real_labels, synthetic_counts, synthetic_proportion, method_rng)
    if only_original:
        kept = np.flatnonzero(replacement < 0)
        if len(kept) == 0:
            raise PipelineError(f"train.synthetic_proportion {synthetic_proportion}: the only-original control keeps no real image. Expected a proportion below 1")
        real_index = kept[shared_rng.integers(len(kept), size=draws)]
        return _plan(real_index, views, np.full(draws, -1, dtype=np.int64), synthetic_counts, method_rng)
    real_index = shared_rng.integers(len(real_labels), size=draws)
    return _plan(real_index, views, replacement[real_index], synthetic_counts, method_rng)


def fixed_replacements(real_labels: np.ndarray, synthetic_counts: np.ndarray, proportion: float, rng: np.random.Generator) -> np.ndarray:
    """Per real image, the synthetic version j that replaces it for the whole run, or -1 (stays real).

    In each class of n_c images, the first round(p * n_c) (halves up) of a random order of the
    class's images that have versions are replaced, each by a uniformly chosen version. The random
    draws do not depend on p, so a larger p replaces a superset of the images, with the same versions.
    """
    real_labels = np.asarray(real_labels)
    replacement = np.full(len(real_labels), -1, dtype=np.int64)
    version = np.floor(rng.random(len(real_labels)) * synthetic_counts).astype(np.int64)
    for label in np.unique(real_labels):
        members = np.flatnonzero(real_labels == label)
        order = members[rng.permutation(len(members))]
        replaceable = order[synthetic_counts[order] > 0]
        wanted = int(math.floor(proportion * len(members) + 0.5))
        if wanted > len(replaceable):
            log.warning(
                "class %d: %d of its %d images should be replaced by synthetic ones, but only %d have synthetic versions",
                label, wanted, len(members), len(replaceable),
            )
        chosen = replaceable[:wanted]
        replacement[chosen] = version[chosen]
    return replacement


def standard_angles(degrees: float, count: int) -> list[float]:
    """The rotation angles (degrees) of the standard augmentation; [0.0] when rotation is off."""
    if degrees == 0 or count == 1:
        return [0.0]
    return np.linspace(-float(degrees), float(degrees), count).tolist()


def draw_views(draws: int, flip: bool, num_angles: int, shared_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Whether every draw is mirrored and the index of its rotation angle: the same for every method of a trial."""
    flips = shared_rng.random(draws) < 0.5 if flip else np.zeros(draws, dtype=bool)
    angle_index = shared_rng.integers(num_angles, size=draws) if num_angles > 1 else np.zeros(draws, dtype=np.int64)
    return flips, angle_index


def _plan(real_index: np.ndarray, views: tuple[np.ndarray, np.ndarray], version: np.ndarray, synthetic_counts: np.ndarray, method_rng: np.random.Generator) -> TrainingPlan:
    """The plan of draws of real images `real_index`, each replaced by its synthetic version `version` (-1: not)."""
    n_real = len(synthetic_counts)
    first_version = n_real + np.concatenate([[0], np.cumsum(synthetic_counts)[:-1]])
    replaced = version >= 0
    pool_index = np.where(replaced, first_version[real_index] + version, real_index)
    augment_seed = method_rng.integers(2**63 - 1, size=len(real_index), dtype=np.int64)
    flips, angle_index = views
    return TrainingPlan(pool_index, flips, angle_index, replaced, augment_seed)


def drawn_pool(pool: list[dict], plan: TrainingPlan) -> tuple[list[dict], TrainingPlan]:
    """The pool images that `plan` draws (in pool order), and the plan re-indexed into them."""
    drawn, pool_index = np.unique(plan.pool_index, return_inverse=True)
    return [pool[i] for i in drawn], dataclasses.replace(plan, pool_index=pool_index.astype(np.int64))
