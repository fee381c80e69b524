from pathlib import Path

import pytest
import yaml

from pipeline import PipelineError
from pipeline.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_filled_recursively():
    config = validate_config({"generate": {"num_per_image": 3}})
    assert config["generate"]["num_per_image"] == 3
    assert config["generate"]["guidance_scale"] == 7.5  # paper default
    assert config["dataset"]["name"] == "demo"  # whole missing sections get their defaults too
    assert config["train"]["synthetic_probability"] == 0.5


def test_unknown_key_names_the_key_and_the_expected_ones():
    with pytest.raises(PipelineError) as info:
        validate_config({"generate": {"guidance_scal": 3.0}})
    message = str(info.value)
    assert "guidance_scal" in message and "'generate'" in message and "guidance_scale" in message


def test_wrong_type_names_the_key():
    with pytest.raises(PipelineError, match=r"generate\.num_shards"):
        validate_config({"generate": {"num_shards": "two"}})


def test_out_of_range_value_is_rejected():
    with pytest.raises(PipelineError, match=r"train\.synthetic_probability"):
        validate_config({"train": {"synthetic_probability": 1.5}})


@pytest.mark.parametrize("path", [REPO / "config.yaml", *sorted((REPO / "config").glob("*.yaml"))], ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config["dataset"]["examples_per_class"]


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config(bad)


def test_workflow_schema_is_the_package_schema():
    workflow_schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    package_schema = REPO / "pipeline" / "config.schema.yaml"
    assert yaml.safe_load(workflow_schema.read_text()) == yaml.safe_load(package_schema.read_text())
