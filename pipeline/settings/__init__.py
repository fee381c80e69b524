"""Per-stage settings: the frozen values a stage runs with, built once from the validated config.

A settings object is the stage's whole view of the configuration: the stage builds it once, at its
entry point, and its helpers receive fields, never the config. Each field names the config key it
is read from (`at("train.steps")`); `key()` is every field that can change the stage's output. That
one key is the rule's params (so Snakemake reruns a job exactly when its output could change) and,
where a stage resumes, its resume key. A field that only says how the work is done (batch size,
device, checkpoint interval) is declared `how=True` and stays out of the key. A stage that starts
reading a new setting has to add a field, which puts it in the key: tests/test_settings.py runs
every stage on a config that records its reads and fails on a key no field declares.

One module per stage (its code hash covers only its own settings), all torch-free: the Snakefile
builds these while it makes the DAG.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any

from pipeline import PipelineError


def at(path: str, *, how: bool = False) -> Any:
    """A settings field read from the dotted config key `path`. how=True: it changes how the stage
    runs, not what it writes, and stays out of the key."""
    return field(metadata={"config": path, "how": how})


def lookup(config: dict, dotted: str):
    """The value at a dotted config key ("train.steps")."""
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def frozen(value):
    """Lists as tuples, recursively, so a settings object holds no list a helper could append to."""
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    return value


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class StageSettings:
    """Base of the per-stage settings dataclasses (each `@dataclass(frozen=True)`)."""

    @classmethod
    def config_keys(cls) -> dict[str, str]:
        """Each config-read field's name and the dotted config key it comes from."""
        return {f.name: f.metadata["config"] for f in fields(cls) if "config" in f.metadata}

    @classmethod
    def read(cls, config: dict) -> dict:
        """The config-read fields' values, lists frozen to tuples."""
        try:
            return {name: frozen(lookup(config, path)) for name, path in cls.config_keys().items()}
        except KeyError as exc:  # a config that skipped validation
            raise PipelineError(f"{cls.__name__}: the config has no key {exc}. Expected a config validated against the schema (pipeline.config.load_config)") from None

    @classmethod
    def from_config(cls, config: dict, **job):
        """The settings of one job: the config's values, plus the job's own (a method, a split)."""
        return cls(**job, **cls.read(config))

    def key(self) -> dict:
        """Every field that can change the output, by name, as JSON-able values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if not f.metadata.get("how")}
