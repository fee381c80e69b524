"""The settings of the stages before any model runs: building the tiny model and the demo dataset,
preparing the manifest, drawing few-shot subsets."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class TinyModelSettings(StageSettings):
    """What the randomly initialised tiny checkpoint (model.build_tiny) depends on."""

    seed: int = at("seed")
    resolution: int = at("model.resolution")


@dataclass(frozen=True)
class DemoDatasetSettings(StageSettings):
    """What the embedded demo dataset's scenes depend on."""

    seed: int = at("seed")
    demo: dict = at("dataset.demo")  # image_size, train_images, val_images, max_objects
    # Only checked against: the dataset's digits must be disjoint from the model's pretraining corpus.
    model_id: str = at("model.id", how=True)


@dataclass(frozen=True)
class PrepareSettings(StageSettings):
    """What the manifest, classes, statistics and masks of a dataset depend on (the files under its
    root enter the rule separately, as a listing fingerprint)."""

    seed: int = at("seed")
    name: str = at("dataset.name")
    root: str = at("dataset.root")
    classes: tuple[str, ...] | None = at("dataset.classes")
    num_classes: int | None = at("dataset.num_classes")
    test_fraction: float = at("dataset.test_fraction")
    holdout_fraction: float = at("dataset.holdout_fraction")
    on_bad_image: str = at("dataset.on_bad_image")
    csv: str | None = at("dataset.csv")  # the listing of a `folder` dataset


@dataclass(frozen=True)
class FewshotSettings(StageSettings):
    """What a few-shot subset depends on, beside its k and trial seed (from the job)."""

    seed: int = at("seed")
    allow_fewer: bool = at("dataset.allow_fewer")
