"""GenerateSettings: the one key of a generate job (rule params, resume key), built from the config."""

import pytest

from pipeline import PipelineError, methods
from pipeline.config import validate_config
from pipeline.settings import GenerateSettings


def key(method: str, **generate) -> dict:
    return GenerateSettings.from_config(validate_config({"generate": generate}), method).key()


def test_how_a_job_runs_is_not_in_its_key():
    assert key("dafusion", batch_size=1, flush_every=1) == key("dafusion", batch_size=16, flush_every=9)
    assert "device" not in key("dafusion") and "batch_size" not in key("dafusion")


@pytest.mark.parametrize(
    ("setting", "changes"),
    [
        ({"txt2img_templates": ["a drawing of a {}"]}, {"txt2img"}),
        ({"mask_dilation": 3}, {"inpaint-fg", "inpaint-bg"}),
        ({"strength": 0.75}, {"dafusion", "class-agnostic", "inpaint-fg", "inpaint-bg"}),
        ({"num_intensities": 2}, {"dafusion", "class-agnostic", "inpaint-fg", "inpaint-bg"}),
        ({"guidance_scale": 3.0}, set(methods.METHODS)),
    ],
)
def test_a_setting_is_in_the_key_of_exactly_the_methods_it_can_change(setting, changes):
    changed = {name for name in methods.METHODS if key(name, **setting) != key(name)}
    assert changed == changes


def test_a_fixed_strength_is_the_methods_own_and_leaves_k_out():
    real_guidance = GenerateSettings.from_config(validate_config({"generate": {"strength": 0.25}}), "real-guidance")
    assert (real_guidance.strength, real_guidance.num_intensities) == (0.5, None)
    dafusion = GenerateSettings.from_config(validate_config({"generate": {"strength": 0.25}}), "dafusion")
    assert (dafusion.strength, dafusion.num_intensities) == (0.25, None)


def test_an_unknown_method_is_named():
    with pytest.raises(PipelineError, match=r"unknown generation method 'txt2vid'\. Expected one of \["):
        GenerateSettings.from_config(validate_config({}), "txt2vid")
