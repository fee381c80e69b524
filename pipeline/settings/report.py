"""The report stage's settings: which results it gathers, and how it shows them."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from pipeline.settings import StageSettings, at


def derived(empty):
    """A field computed from config keys other fields already hold, so out of the key."""
    return field(default_factory=lambda: type(empty)(), metadata={"how": True})


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
    sweeps: dict = at("sweeps")
    zeroshot_model: str | None = at("zeroshot.model")  # a zero-shot CLIP row when set
    # Where the results are read from; the page names none of their paths.
    results: str = at("results", how=True)
    # Derived from the methods and sweeps above, which the key holds: out of it. Run names
    # (pipeline.sweeps): each method's base run and its sweep variants.
    generate_runs: tuple[str, ...] = derived(())
    train_runs: tuple[str, ...] = derived(())
    # run -> {swept key: value in effect}, the sweep columns of summary.csv
    sweep_settings: dict = derived({})
    # train run -> the generation run whose shards it trained on (None: real only)
    synthetic_runs: dict = derived({})
    # sweep -> [{"overrides": {key: value}, "runs": {train method: its run under those overrides}}]
    sweep_runs: dict = derived({})

    @classmethod
    def from_config(cls, config: dict) -> ReportSettings:
        from pipeline import sweeps

        train_runs = sweeps.train_runs(config)
        methods = config["train"]["methods"]
        return cls(
            **cls.read(config),
            generate_runs=tuple(sweeps.generate_runs(config)),
            train_runs=tuple(train_runs),
            sweep_settings={run: sweeps.setting_values(config, run) for run in train_runs},
            synthetic_runs={run: sweeps.synthetic_run(config, run) for run in train_runs},
            sweep_runs={
                name: [{"overrides": overrides, "runs": {m: sweeps.run_name(m, sweeps.train_overrides(config, m, overrides)) for m in methods}} for overrides in variants]
                for name, variants in sweeps.variants(config).items()
            },
        )

    @property
    def subsets(self) -> list[tuple[int, int]]:
        """Every (examples_per_class, trial_seed) pair, in the order of pipeline.layout.subsets_in."""
        return list(product(self.examples_per_class, self.trial_seeds))
