"""Sweeps: run names, which jobs a variant shares with the base run, and the errors of a bad sweep."""

import pytest

from pipeline import PipelineError, sweeps
from pipeline.__main__ import main
from pipeline.config import validate_config
from pipeline.settings.train import TrainSettings


def config_with(sweep: dict, **sections) -> dict:
    config = {"generate": {"methods": ["dafusion", "real-guidance"], "num_per_image": 10}, "train": {"methods": ["baseline", "dafusion", "real-guidance", "dafusion+synthetic-only"]}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return validate_config({**config, "sweeps": sweep})


@pytest.mark.parametrize("value", [0.3, 1e-05, 10, 10.0, None, True, False, "dpm-solver++", "ddim"])
def test_a_run_name_gives_back_its_overrides_with_their_types(value):
    name = sweeps.run_name("dafusion+mixup", {"generate.strength": value, "train.batch_size": 4})
    method, overrides = sweeps.split_run_name(name)
    assert method == "dafusion+mixup" and overrides == {"generate.strength": value, "train.batch_size": 4}
    assert type(overrides["generate.strength"]) is type(value)
    assert sweeps.run_name("dafusion", {}) == "dafusion" and sweeps.split_run_name("dafusion") == ("dafusion", {})


def test_a_variant_shares_every_job_whose_settings_equal_the_base_runs():
    config = config_with({"alpha": {"train.synthetic_probability": [0.3, 0.5]}, "M": {"generate.num_per_image": [5, 10]}})
    # alpha = 0.5 and M = 10 are the base run's; the real-only baseline and the synthetic-only
    # classifier do not mix, so alpha leaves them alone; real-guidance's t0 is its own.
    assert sweeps.generate_runs(config) == [
        "dafusion", "dafusion@generate.num_per_image=5", "real-guidance", "real-guidance@generate.num_per_image=5",
    ]  # fmt: skip
    assert sweeps.train_runs(config) == [
        "baseline",
        "dafusion", "dafusion@train.synthetic_probability=0.3", "dafusion@generate.num_per_image=5",
        "real-guidance", "real-guidance@train.synthetic_probability=0.3", "real-guidance@generate.num_per_image=5",
        "dafusion+synthetic-only", "dafusion+synthetic-only@generate.num_per_image=5",
    ]  # fmt: skip
    # A classifier of a generate.* variant trains on that variant's shards; one of a train.* variant on the base shards.
    assert sweeps.synthetic_run(config, "dafusion@generate.num_per_image=5") == "dafusion@generate.num_per_image=5"
    assert sweeps.synthetic_run(config, "dafusion@train.synthetic_probability=0.3") == "dafusion"
    assert sweeps.synthetic_run(config, "baseline") is None


def test_a_fixed_t0_variant_leaves_methods_with_their_own_t0_alone():
    config = config_with({"t0": {"generate.strength": [None, 0.5]}})
    assert sweeps.generate_runs(config) == ["dafusion", "dafusion@generate.strength=0.5", "real-guidance"]


def test_adding_a_value_keeps_every_other_runs_settings():
    """What makes caching per combination: a run's job key does not depend on the sweep's other values."""
    before = config_with({"alpha": {"train.synthetic_probability": [0.3]}})
    after = config_with({"alpha": {"train.synthetic_probability": [0.3, 0.7]}})
    assert set(sweeps.train_runs(after)) - set(sweeps.train_runs(before)) == {"dafusion@train.synthetic_probability=0.7", "real-guidance@train.synthetic_probability=0.7"}
    for run in sweeps.train_runs(before):
        method, overrides = sweeps.split_run_name(run)
        keys = [TrainSettings.from_config(sweeps.with_overrides(c, overrides), method).key() for c in (before, after)]
        assert keys[0] == keys[1], run


def test_setting_values_are_the_sweep_columns_of_a_run():
    config = config_with({"alpha": {"train.synthetic_probability": [0.3]}, "M": {"generate.num_per_image": [5]}})
    assert sweeps.setting_values(config, "dafusion@train.synthetic_probability=0.3") == {"generate.num_per_image": 10, "train.synthetic_probability": 0.3}
    assert sweeps.setting_values(config, "baseline") == {"generate.num_per_image": None, "train.synthetic_probability": None}


@pytest.mark.parametrize(
    "sweep, sections, message",
    [
        ({"a": {"invert.steps": [10, 20]}}, {}, r"sweeps\.a\.invert\.steps: invert\.steps cannot be swept inside one run .*generate or train"),
        ({"a": {"generate.nope": [1]}}, {}, r"sweeps\.a\.generate\.nope: value 1: generate\.nope: no such config key"),
        ({"a": {"train.synthetic_probability": [0.5, 1.5]}}, {}, r"sweeps\.a\.train\.synthetic_probability: value 1\.5: .*1\.5 is greater than the maximum of 1"),
        ({"a": {"generate.batch_size": [1, 2]}}, {}, r"sweeps\.a\.generate\.batch_size: no job of generate\.methods .* depends on generate\.batch_size"),
        ({"a": {"train.mixup_alpha": [0.2]}}, {}, r"no job .* depends on train\.mixup_alpha"),  # no method mixes up
        ({"a": {"generate.scheduler": ["not a word"]}}, {}, r"sweeps\.a\.generate\.scheduler: value 'not a word' cannot be swept"),
        ({"a": {"erase.enabled": [True]}}, {"generate": {"methods": ["dafusion", "mvc"]}}, r"sweeps\.a\.erase\.enabled: the mvc stage fine-tunes the erased model"),
    ],
    ids=["upstream key", "unknown key", "out of range", "changes no result", "no method reads it", "not a word", "erase with mvc"],
)
def test_a_bad_sweep_is_one_line_naming_the_sweep_and_key(sweep, sections, message):
    with pytest.raises(PipelineError, match=message):
        sweeps.check_sweeps(config_with(sweep, **sections))


def test_a_sweep_of_the_base_value_alone_is_the_base_run():
    config = config_with({"a": {"train.mixup_alpha": [0.8]}})  # no method mixes up, but 0.8 is the base value
    sweeps.check_sweeps(config)
    assert sweeps.train_runs(config) == config["train"]["methods"]


def test_a_sweep_of_a_list_value_is_refused_by_the_schema():
    with pytest.raises(PipelineError, match=r"sweeps\.a\.train\.cutout_scale\.0"):
        config_with({"a": {"train.cutout_scale": [[0.1, 0.2]]}})


def test_the_command_line_sets_one_key_and_names_a_bad_one(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("results: r\n")
    assert main(["report", "--config", str(config), "--set", "generate.nope=1", "--out", str(tmp_path / "out")]) == 2
    assert "generate.nope: no such config key" in capsys.readouterr().err
    assert main(["report", "--config", str(config), "--set", "generate.strength", "--out", str(tmp_path / "out")]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    changed = sweeps.with_overrides(validate_config({}), sweeps.parse_overrides(["generate.strength=0.5", "train.flip=false"]))
    assert changed["generate"]["strength"] == 0.5 and changed["train"]["flip"] is False
