"""Sweeps: settings that take several values in one run, each value its own jobs and result paths.

    sweeps:
      alpha: {train.synthetic_probability: [0.3, 0.5, 0.7]}        # DA-Fusion Fig. 11
      t0:    {generate.strength: [null, 0.5], generate.num_intensities: [4]}

A sweep names config keys and their values; each combination of its values (their product) is a
variant, an override of the base config. Sweeps are not crossed with each other: each is one figure.

A variant's results live beside the base run's, under a run name that carries the overrides a job
depends on: `dafusion@generate.strength=0.5` (synthetic/, fid/, oracle/, train/ paths). Only the
overrides that change a job's settings key (pipeline.settings) go into its name, so

  * a variant's job whose settings equal the base run's IS the base run's job (alpha = 0.5 when the
    base is 0.5; the baseline classifier under any generate.* sweep): nothing is trained twice, and
    gains are paired against the very baseline classifier;
  * each combination's jobs are independent: adding a value runs only that value's jobs.

Sweepable: keys of `generate` and `train`, and erase.enabled (leakage prevention: the erase stage's
own settings are the base run's) and MVC's swap counts, mvc.coarse_swaps / mvc.fine_swaps (read at
generation only). Keys upstream of generation (dataset, model, invert, ...) would need their own
tokens and adapters per value: run those as separate results folders and `python -m pipeline compare`.
Torch-free: the Snakefile expands sweeps while it builds the DAG.
"""

from __future__ import annotations

import copy
import json
import re
from itertools import product

from pipeline import PipelineError
from pipeline.augment import parse_method
from pipeline.config import validate_config
from pipeline.methods import needing
from pipeline.settings import lookup
from pipeline.settings.generate import GenerateSettings
from pipeline.settings.train import TrainSettings

SWEEPABLE_SECTIONS = ("generate", "train")
SWEEPABLE_KEYS = ("erase.enabled", "mvc.coarse_swaps", "mvc.fine_swaps")
# Between a method and its overrides in a run name; between overrides.
RUN_MARK = "@"
OVERRIDE_SEPARATOR = ","
# A string value is a word that is safe in a path and cannot be read back as another type.
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_.+-]*$")


def format_value(value) -> str:
    """A swept value as written in a run name and on the command line (JSON scalars)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def parse_value(text: str):
    """The inverse of format_value: a JSON scalar, else the word itself."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value


def _check_value(where: str, value) -> None:
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str) and _WORD.match(value) and parse_value(value) == value:
        return
    raise PipelineError(f"{where}: value {value!r} cannot be swept. Expected a number, true/false, null or a word of letters, digits and _.+- (lists and mappings are not sweepable)")


def run_name(method: str, overrides: dict) -> str:
    """`method`, or `method@key=value,...` with the overrides sorted by key."""
    if not overrides:
        return method
    return method + RUN_MARK + OVERRIDE_SEPARATOR.join(f"{key}={format_value(overrides[key])}" for key in sorted(overrides))


def split_run_name(name: str) -> tuple[str, dict]:
    """(method, overrides) of a run name (pipeline.layout paths, the workflow's {method} wildcard)."""
    method, mark, tag = name.partition(RUN_MARK)
    if not mark:
        return name, {}
    overrides = {}
    for item in tag.split(OVERRIDE_SEPARATOR):
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise PipelineError(f"run name {name!r}: {item!r} is not key=value")
        overrides[key] = parse_value(text)
    return method, overrides


def parse_overrides(items: list[str] | None) -> dict:
    """`--set key=value` arguments of the command line as overrides."""
    overrides = {}
    for item in items or []:
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise PipelineError(f"--set {item!r}: expected KEY=VALUE, for example generate.strength=0.5")
        overrides[key] = parse_value(text)
    return overrides


def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise PipelineError(f"{dotted}: no such config key ({part!r} is not a section)")
        node = node[part]
    if last not in node:
        raise PipelineError(f"{dotted}: no such config key")
    node[last] = value


def with_overrides(config: dict, overrides: dict) -> dict:
    """A validated copy of `config` with the dotted keys of `overrides` set (the config itself untouched)."""
    if not overrides:
        return config
    changed = copy.deepcopy(config)
    for key, value in overrides.items():
        _set(changed, key, value)
    return validate_config(changed)


def _sweepable(key: str) -> bool:
    return key.split(".", 1)[0] in SWEEPABLE_SECTIONS or key in SWEEPABLE_KEYS


def variants(config: dict) -> dict[str, list[dict]]:
    """Each sweep's variants (overrides), in the order of the product of its values as written."""
    out = {}
    for name, keys in config.get("sweeps", {}).items():
        names = list(keys)
        out[name] = [dict(zip(names, values)) for values in product(*(keys[n] for n in names))]
    return out


def generate_overrides(config: dict, method: str, overrides: dict) -> dict:
    """The part of `overrides` a generation method's shards depend on: none when its settings key
    equals the base run's, else every override of a generation-time key (generate.*, erase.enabled, mvc.*)."""
    relevant = {key: value for key, value in overrides.items() if not key.startswith("train.")}
    if not relevant:
        return {}
    base = GenerateSettings.from_config(config, method).key()
    if GenerateSettings.from_config(with_overrides(config, relevant), method).key() == base:
        return {}
    return relevant


def train_overrides(config: dict, method: str, overrides: dict) -> dict:
    """The part of `overrides` a training method's classifier depends on: that of its synthetic
    source's shards, plus the train.* overrides when they change its settings key."""
    synthetic, _ = parse_method(method, set(config["generate"]["methods"]))
    out = generate_overrides(config, synthetic, overrides) if synthetic else {}
    relevant = {key: value for key, value in overrides.items() if key.startswith("train.")}
    if relevant:
        base = TrainSettings.from_config(config, method).key()
        if TrainSettings.from_config(with_overrides(config, relevant), method).key() != base:
            out.update(relevant)
    return out


def synthetic_run(config: dict, train_run: str) -> str | None:
    """The generation run whose shards a training run trains on; None for a real-only method."""
    method, overrides = split_run_name(train_run)
    synthetic, _ = parse_method(method, set(config["generate"]["methods"]))
    if synthetic is None:
        return None
    return run_name(synthetic, generate_overrides(config, synthetic, overrides))


def generate_runs(config: dict) -> list[str]:
    """Every generation run: each method's base run, then its distinct variants, in sweep order."""
    return _runs(config, config["generate"]["methods"], generate_overrides)


def train_runs(config: dict) -> list[str]:
    """Every training run: each method's base run, then its distinct variants, in sweep order."""
    return _runs(config, config["train"]["methods"], train_overrides)


def _runs(config, method_names, relevant) -> list[str]:
    all_variants = [v for sweep in variants(config).values() for v in sweep]
    out = []
    for method in method_names:
        for overrides in [{}, *all_variants]:
            name = run_name(method, relevant(config, method, overrides))
            if name not in out:
                out.append(name)
    return out


def check_sweeps(config: dict) -> None:
    """Each sweep key sweepable and read by some job, each value valid for its key; one line naming
    `sweeps.<name>.<key>` and what was expected, before any job starts."""
    generation, training = config["generate"]["methods"], config["train"]["methods"]
    for name, keys in config.get("sweeps", {}).items():
        for key, values in keys.items():
            where = f"sweeps.{name}.{key}"
            if not _sweepable(key):
                raise PipelineError(
                    f"{where}: {key} cannot be swept inside one run (it changes stages before generation). "
                    f"Expected a key of {' or '.join(SWEEPABLE_SECTIONS)}, or one of {', '.join(SWEEPABLE_KEYS)}; "
                    "run other settings as separate results folders and `python -m pipeline compare` them"
                )
            if key == "erase.enabled" and needing("mvc", generation):
                raise PipelineError(f"{where}: the mvc stage fine-tunes the erased model itself, so erase.enabled cannot be swept with the methods {needing('mvc', generation)}. Expected separate results folders for erase.enabled true and false")
            for value in values:
                _check_value(where, value)
                try:
                    changed = with_overrides(config, {key: value})
                    for method in training:
                        TrainSettings.from_config(changed, method)
                except PipelineError as exc:
                    raise PipelineError(f"{where}: value {value!r}: {exc}") from None
            if not any(generate_overrides(config, m, {key: v}) for m in generation for v in values) and not any(
                train_overrides(config, m, {key: v}) for m in training for v in values
            ):
                if all(lookup(config, key) == v for v in values):
                    continue  # only the base value: the sweep is the base run
                raise PipelineError(f"{where}: no job of generate.methods {generation} or train.methods {training} depends on {key}, so its values would give identical results. Expected a setting the methods read")
        for overrides in variants(config)[name]:
            try:
                changed = with_overrides(config, overrides)
                for method in training:
                    TrainSettings.from_config(changed, method)
            except PipelineError as exc:
                raise PipelineError(f"sweeps.{name}: variant {run_name('', overrides).lstrip(RUN_MARK)}: {exc}") from None


def setting_values(config: dict, run: str) -> dict:
    """The value every swept key has in a run, for the sweep columns of summary.csv: its override,
    else the base config's where some value of the key would change the run, else None (alpha of
    the real-only baseline)."""
    method, overrides = split_run_name(run)
    swept: dict[str, list] = {}
    for keys in config.get("sweeps", {}).values():
        for key, values in keys.items():
            swept.setdefault(key, []).extend(values)
    out = {}
    for key in sorted(swept):
        if key in overrides:
            out[key] = overrides[key]
        elif any(train_overrides(config, method, {key: v}) for v in swept[key]):
            out[key] = lookup(config, key)
        else:
            out[key] = None
    return out
