"""Typed records of the per-subset results the report reads: training metrics, FID/KID, oracle scores.

Each record knows which method, examples per class and trial seed it belongs to from the run's plan
(`read_results` walks the report settings' methods and subsets and asks `pipeline.layout` for the
paths), never from parsing a file name. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import layout
from pipeline.io import read_json
from pipeline.settings.report import ReportSettings


@dataclass(frozen=True)
class Metrics:
    """One training run's test metrics (the train stage's JSON)."""

    method: str
    examples_per_class: int
    trial_seed: int
    dataset: str
    split: str
    accuracy: float
    mean_class_accuracy: float
    val_accuracy: float | None
    best_step: int | None
    n_train_real: int | None
    n_synthetic: int | None
    backbone: str | None
    per_class_accuracy: dict[str, float | None]  # None: the class has no test image
    leakage_prevention: str | None  # pipeline.methods.LEAKAGE_MODES; None in results written before it was recorded
    paper_accuracy: float | None = None  # train.paper_protocol: best accuracy over checkpoints on val + test

    @classmethod
    def read(cls, path: str, method: str, k: int, trial_seed: int) -> Metrics:
        value = read_json(path)
        return cls(
            method, k, trial_seed, value["dataset"], value["split"], value["accuracy"], value["mean_class_accuracy"],
            value.get("val_accuracy"), value.get("best_step"), value.get("n_train_real"), value.get("n_synthetic"),
            value.get("backbone"), value.get("per_class_accuracy") or {}, value.get("leakage_prevention"), value.get("paper_accuracy"),
        )  # fmt: skip


@dataclass(frozen=True)
class Fid:
    """FID and KID of one method's synthetic images of one subset (the fid stage's JSON)."""

    method: str
    examples_per_class: int
    trial_seed: int
    fid: float | None
    kid: float | None
    kid_std: float | None
    n_real: int
    n_synthetic: int
    floor_fid: float | None  # real-vs-real: the value the reference split itself scores
    by_strength: dict[str, dict]  # t0 -> {fid, kid, ...}
    feature_extractor: str
    resize: dict
    per_class: dict[str, dict]  # class -> {fid, kid, n_real, n_synthetic, ...}

    @classmethod
    def read(cls, path: str, method: str, k: int, trial_seed: int) -> Fid:
        value = read_json(path)
        floor = value.get("floor") or {}
        return cls(
            method, k, trial_seed, value.get("fid"), value.get("kid"), value.get("kid_std"), value.get("n_real", 0),
            value.get("n_synthetic", 0), floor.get("fid"), value.get("by_strength") or {}, value.get("feature_extractor", ""),
            value.get("resize") or {}, value.get("per_class") or {},
        )  # fmt: skip


@dataclass(frozen=True)
class OracleScores:
    """The oracle's reading of one method's synthetic images of one subset, per t0 (the oracle_scores JSON)."""

    method: str
    examples_per_class: int
    trial_seed: int
    real_test_agreement: float
    by_strength: dict[str, dict]  # t0 -> {n, agreement, source_agreement, mean_abs_difference}

    @classmethod
    def read(cls, path: str, method: str, k: int, trial_seed: int) -> OracleScores:
        value = read_json(path)
        return cls(method, k, trial_seed, value["real_test_agreement"], value["by_strength"])


@dataclass(frozen=True)
class Results:
    metrics: list[Metrics]
    fid: list[Fid]
    oracle: list[OracleScores]


def read_results(settings: ReportSettings) -> Results:
    """Every metrics, FID and oracle record a complete run has written, under run names (methods and
    their sweep variants, pipeline.sweeps)."""
    results, pairs, generation = settings.results, settings.subsets, settings.generate_runs
    return Results(
        metrics=[Metrics.read(layout.metrics(results, m, k, s), m, k, s) for m in settings.train_runs for k, s in pairs],
        fid=[Fid.read(layout.fid(results, m, k, s), m, k, s) for m in generation for k, s in pairs],
        oracle=[OracleScores.read(layout.oracle_scores(results, m, k, s), m, k, s) for m in generation for k, s in pairs] if settings.oracle else [],
    )
