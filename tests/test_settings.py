"""Stage settings (pipeline.settings): the one key of a job (rule params, resume key), built from the config."""

import subprocess
import sys
from dataclasses import fields

import pytest

from pipeline import PipelineError, methods
from pipeline.config import validate_config
from pipeline.settings.caption import CaptionSettings
from pipeline.settings.fid import FidFeatureSettings, FidSettings, OracleScoreSettings
from pipeline.settings.generate import GenerateSettings
from pipeline.settings.invert import InvertSettings
from pipeline.settings.mvc import MVCSettings
from pipeline.settings.prepare import DemoDatasetSettings, FewshotSettings, PrepareSettings, TinyModelSettings
from pipeline.settings.report import ReportSettings
from pipeline.settings.token_samples import TokenSampleSettings
from pipeline.settings.train import TrainSettings

# Settings that take nothing from the job; GenerateSettings and TrainSettings take the method.
PLAIN = [FidFeatureSettings, FidSettings, OracleScoreSettings, InvertSettings, DemoDatasetSettings, FewshotSettings,
         PrepareSettings, ReportSettings, TinyModelSettings, TokenSampleSettings, CaptionSettings, MVCSettings]


def key(method: str, **generate) -> dict:
    return GenerateSettings.from_config(validate_config({"generate": generate}), method).key()


def test_how_a_job_runs_is_not_in_its_key():
    assert key("dafusion", batch_size=1, flush_every=1) == key("dafusion", batch_size=16, flush_every=9)
    assert "device" not in key("dafusion") and "batch_size" not in key("dafusion")


@pytest.mark.parametrize(
    ("setting", "changes"),
    [
        ({"txt2img_templates": ["a drawing of a {}"]}, {"txt2img"}),
        ({"real_guidance_templates": ["a photo of a {}, a kind of digit"]}, {"real-guidance"}),
        ({"mask_dilation": 3}, {"inpaint-fg", "inpaint-bg"}),
        ({"strength": 0.75}, {"dafusion", "class-agnostic", "inpaint-fg", "inpaint-bg", "dreambooth-sdedit"}),
        ({"num_intensities": 2}, {"dafusion", "class-agnostic", "inpaint-fg", "inpaint-bg", "dreambooth-sdedit"}),
        ({"guidance_scale": 3.0}, set(methods.METHODS)),
    ],
)
def test_a_setting_is_in_the_key_of_exactly_the_methods_it_can_change(setting, changes):
    changed = {name for name in methods.METHODS if key(name, **setting) != key(name)}
    assert changed == changes


@pytest.mark.parametrize(
    ("section", "changes"),
    [
        ({"mvc": {"coarse_swaps": 3}}, {"mvc", "mvc-pretrained"}),
        ({"mvc": {"steps": 7}}, set()),  # the mvc model's own setting: its folder's hash, not the method's key
        ({"dreambooth": {"instance_prompt": "a drawing of sks {}"}}, {"dreambooth", "dreambooth-sdedit"}),
    ],
)
def test_another_stages_setting_is_in_the_key_of_exactly_the_methods_that_use_it(section, changes):
    def stage_key(name: str, config: dict) -> dict:
        return GenerateSettings.from_config(validate_config(config), name).key()

    assert {name for name in methods.METHODS if stage_key(name, section) != stage_key(name, {})} == changes


def test_a_fixed_strength_is_the_methods_own_and_leaves_k_out():
    real_guidance = GenerateSettings.from_config(validate_config({"generate": {"strength": 0.25}}), "real-guidance")
    assert (real_guidance.strength, real_guidance.num_intensities) == (0.5, None)
    dafusion = GenerateSettings.from_config(validate_config({"generate": {"strength": 0.25}}), "dafusion")
    assert (dafusion.strength, dafusion.num_intensities) == (0.25, None)


def test_an_unknown_method_is_named():
    with pytest.raises(PipelineError, match=r"unknown generation method 'txt2vid'\. Expected one of \["):
        GenerateSettings.from_config(validate_config({}), "txt2vid")


@pytest.mark.parametrize("settings_class", PLAIN, ids=lambda c: c.__name__)
def test_the_key_is_every_field_but_how_the_job_runs(settings_class):
    settings = settings_class.from_config(validate_config({}))  # every field's config key is in the schema
    how = {f.name for f in fields(settings_class) if f.metadata.get("how")}
    assert set(settings.key()) == set(settings_class.config_keys()) - how
    assert "device" not in settings.key()


def test_settings_hold_no_list_a_helper_could_change():
    settings = InvertSettings.from_config(validate_config({"invert": {"templates": ["a {}", "the {}"]}}))
    assert settings.templates == ("a {}", "the {}") and settings.key()["templates"] == ["a {}", "the {}"]


TRAIN_NAMES = ["baseline", "dafusion", "dafusion+synthetic-only", "dafusion+mixup", "mixup", "randaugment"]


def train_key(method: str, **train) -> dict:
    return TrainSettings.from_config(validate_config({"train": train}), method).key()


@pytest.mark.parametrize(
    ("setting", "changes"),
    [
        ({"synthetic_probability": 0.3}, {"dafusion", "dafusion+mixup"}),
        ({"synthetic_proportion": 0.3}, set()),  # probability mode
        ({"mixing": "proportion"}, set(TRAIN_NAMES) - {"dafusion+synthetic-only"}),  # recorded by real-only runs too
        ({"mixup_alpha": 0.4}, {"dafusion+mixup", "mixup"}),
        ({"randaugment": {"num_ops": 3, "magnitude": 9}}, {"randaugment"}),
        ({"finetune": {"backbone_learning_rate": 0.5}}, set()),  # recipe "paper": the backbone is frozen
        ({"learning_rate": 0.5}, set(TRAIN_NAMES)),
        ({"optimizer": "sgd"}, set(TRAIN_NAMES)),
        ({"momentum": 0.5}, set()),  # Adam's head: no momentum
    ],
)
def test_a_train_setting_is_in_the_key_of_exactly_the_methods_it_can_change(setting, changes):
    assert {name for name in TRAIN_NAMES if train_key(name, **setting) != train_key(name)} == changes


def test_the_heads_optimizer_is_out_of_the_finetune_recipes_key():
    assert train_key("baseline", recipe="finetune", optimizer="sgd", momentum=0.5) == train_key("baseline", recipe="finetune")


def test_train_epochs_replace_steps_and_speed_settings_stay_out():
    assert train_key("baseline", epochs=3, steps=5) == train_key("baseline", epochs=3, steps=7)
    assert train_key("baseline", num_workers=4, inference_batch_size=7) == train_key("baseline")
    assert train_key("dafusion")["synthetic_method"] == "dafusion" and train_key("baseline")["synthetic_method"] is None


def test_bad_two_phase_settings_are_refused_for_every_method():
    bad = {"mixing": "proportion", "two_phase": {"synthetic_steps": 2, "real_learning_rate_scale": 0.1}}
    with pytest.raises(PipelineError, match=r"train\.two_phase.*Got train\.mixing: proportion"):
        train_key("baseline", **bad)


def test_the_settings_import_no_torch():
    """The Snakefile builds every job's settings while it makes the DAG: importing them stays cheap."""
    code = "import sys, pipeline.settings.fid, pipeline.settings.generate, pipeline.settings.invert, " \
           "pipeline.settings.prepare, pipeline.settings.report, pipeline.settings.token_samples, pipeline.settings.train; " \
           "print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_leakage_prevention_mode_follows_the_prompt_and_the_erasure():
    def settings(method: str, erased: bool) -> TrainSettings:
        generate = ["dafusion", "real-guidance", "real-guidance-no-name", "class-agnostic"]
        return TrainSettings.from_config(validate_config({"erase": {"enabled": erased}, "generate": {"methods": generate}}), method)

    names = ["baseline", "dafusion+mixup", "real-guidance", "real-guidance-no-name", "class-agnostic"]
    assert [settings(m, False).leakage_prevention for m in names] == ["none", "data-centric", "none", "data-centric", "data-centric"]
    assert [settings(m, True).leakage_prevention for m in names] == ["none", "both", "model-centric", "both", "both"]
    # Erasing reruns the training of the methods with synthetic images only.
    assert settings("baseline", True).key() == settings("baseline", False).key()
    assert settings("dafusion", True).key() != settings("dafusion", False).key()


def test_a_captioner_setting_is_in_the_key_only_for_its_captioner():
    def caption_key(**caption) -> dict:
        return CaptionSettings.from_config(validate_config({"caption": caption})).key()

    assert caption_key(csv="a.csv") == caption_key(csv="b.csv") and caption_key(blip2_model="x") == caption_key()
    assert caption_key(captioner="csv", csv="a.csv") != caption_key(captioner="csv", csv="b.csv")
    assert caption_key(captioner="blip2", max_new_tokens=5) != caption_key(captioner="blip2")
