from pathlib import Path

import pytest
import yaml

from pipeline import PipelineError
from pipeline.augment import parse_method
from pipeline.config import load_config, validate_config
from pipeline.settings.train import TrainSettings

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


def _merged(base: dict, overlay: dict) -> dict:
    """Config files merged key by key, as Snakemake merges several --configfile."""
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


@pytest.mark.parametrize("preset", ["pascal.yaml", "coco.yaml"])
def test_finetune_overlay_keeps_the_dataset_preset(preset):
    base = yaml.safe_load((REPO / "config" / preset).read_text())
    overlay = yaml.safe_load((REPO / "config" / "recipes" / "finetune.yaml").read_text())
    config = validate_config(_merged(base, overlay))
    train = config["train"]
    assert (train["recipe"], train["batch_size"], train["epochs"]) == ("finetune", 128, 35)
    assert (train["finetune"]["backbone_learning_rate"], train["finetune"]["head_learning_rate"]) == (1e-4, 5e-3)
    assert config["dataset"] == validate_config(base)["dataset"]
    for method in train["methods"]:  # every method of the table can run on the preset's synthetic sets
        parse_method(method, set(config["generate"]["methods"]))


@pytest.mark.parametrize(
    "files",
    [["pascal.yaml", "recipes/dreambooth.yaml"], ["coco.yaml", "recipes/dreambooth.yaml"],
     ["../config.yaml", "recipes/dreambooth.yaml", "recipes/dreambooth-demo.yaml"]],
    ids=["pascal", "coco", "demo"],
)
def test_dreambooth_recipes_are_valid_overlays(files):
    config: dict = {}
    for name in files:
        config = _merged(config, yaml.safe_load((REPO / "config" / name).read_text()))
    config = validate_config(config)
    assert {"txt2img", "txt2img-token", "dreambooth", "dreambooth-sdedit"} <= set(config["generate"]["methods"])
    for method in config["train"]["methods"]:
        TrainSettings.from_config(config, method)  # every training method has its synthetic source generated
    if "recipes/dreambooth-demo.yaml" in files:
        assert "conv1" in config["dreambooth"]["lora_modules"] and config["dreambooth"]["num_class_images"] == 0
    else:
        assert config["dreambooth"]["lora_modules"] == ["to_k", "to_q", "to_v", "to_out.0"]


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


@pytest.mark.parametrize(
    "files", [["experiments/mvc-caltech101.yaml"], ["../config.yaml", "recipes/mvc-demo.yaml"]], ids=["caltech101", "demo"]
)
def test_mvc_presets_are_valid_and_every_method_has_its_synthetic_source(files):
    config: dict = {}
    for name in files:
        config = _merged(config, yaml.safe_load((REPO / "config" / name).read_text()))
    config = validate_config(config)
    assert "mvc" in config["generate"]["methods"]
    for method in config["train"]["methods"]:
        TrainSettings.from_config(config, method)
