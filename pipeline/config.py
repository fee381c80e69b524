"""Load and validate the YAML configuration shared by the workflow and the command line.

The schema (config.schema.yaml, also at workflow/schemas/) is the single source of truth for keys,
types and defaults. The workflow (rules/common.smk) and `load_config` below both validate with
`validate_config`, so a stage run by hand sees exactly the configuration the workflow would have
given it, and a bad key gives the same one-line error in both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline import PipelineError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _extend_with_defaults(validator_class):
    """A validator that fills in `default` values for missing properties, recursively."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        return f"{error.message} at '{where}'. Expected one of: {', '.join(known)}"
    return f"'{where}': {error.message}"


def validate_config(config: dict) -> dict:
    """Validate `config` in place against the schema, filling defaults; return it.

    Raises PipelineError naming the offending key and what was expected.
    """
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise PipelineError("invalid configuration: " + "; ".join(_describe(e) for e in errors))
    return config


def load_config(path: str | Path) -> dict:
    """Read a YAML config file, validate it and fill in defaults."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise PipelineError(f"config file {path}: expected a mapping at the top level, got {type(config).__name__}")
    try:
        return validate_config(config)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None


def stable_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace): equal values give equal strings, hence equal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
