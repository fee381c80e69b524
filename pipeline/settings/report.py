"""The report stage's settings: which results it gathers, and how it shows them."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from pipeline.settings import StageSettings, at


@dataclass(frozen=True)
class ReportSettings(StageSettings):
    """What the report's tables and page depend on, beside the results it reads (its inputs)."""

    dataset: str = at("dataset.name")
    examples_per_class: tuple[int, ...] = at("dataset.examples_per_class")
    trial_seeds: tuple[int, ...] = at("dataset.trial_seeds")
    model_id: str = at("model.id")
    build_tiny: bool = at("model.build_tiny")
    generate_methods: tuple[str, ...] = at("generate.methods")
    num_shards: int = at("generate.num_shards")
    train_methods: tuple[str, ...] = at("train.methods")
    backbone: str = at("train.backbone")
    oracle: str | None = at("fid.oracle")
    grid_images: int = at("report.grid_images")
    # Where the results are read from; the page names none of their paths.
    results: str = at("results", how=True)

    @property
    def subsets(self) -> list[tuple[int, int]]:
        """Every (examples_per_class, trial_seed) pair, in the order of pipeline.layout.subsets_in."""
        return list(product(self.examples_per_class, self.trial_seeds))
