"""Concept erasure (ESD-x) on the tiny random Stable Diffusion: what is trained and written, resume,
and generation with the erased model. (Its effect, on the demo model: BENCHMARKS.md, "Concept erasure".)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CountedCalls, RecordingConfig, undeclared_reads
from test_dreambooth import RESOLUTION, unet_output, write_train_subset

from pipeline import PipelineError, adapters, layout, sdedit
from pipeline import erase as es
from pipeline.checkpoint import weight_hashes
from pipeline.config import validate_config
from pipeline.generate import generate_shard
from pipeline.io import read_metadata
from pipeline.manifest import read_shards
from pipeline.settings.erase import EraseSettings
from pipeline.tiny_sd import build_tiny_sd

CLASSES = ["zero", "one", "traffic light"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=RESOLUTION, seed=0)


@pytest.fixture(scope="module")
def classes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepare") / layout.CLASSES_FILE
    path.write_text(json.dumps(CLASSES))
    return path


def make_config(model: Path, **erase) -> dict:
    settings = {"steps": 4, "ddim_steps": 3, "learning_rate": 1e-3, "checkpoint_every": 0, **erase}
    return validate_config({"model": {"id": str(model), "resolution": RESOLUTION}, "device": "cpu", "erase": settings})


@pytest.fixture(scope="module")
def erased(tiny_model, classes_file, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("erase") / "erase"
    es.erase_classes(make_config(tiny_model), classes_file, out)
    return out


def test_only_the_cross_attention_changes_and_the_record_says_what_was_erased(tiny_model, erased):
    assert sorted(p.name for p in erased.iterdir()) == sorted([layout.ERASE_INFO_FILE, layout.ERASED_WEIGHTS_FILE, layout.LOSS_FILE])
    params = load_file(erased / layout.ERASED_WEIGHTS_FILE)
    base = sdedit.load_img2img(str(tiny_model), torch.device("cpu"), torch.float32)
    assert params and set(params) == set(es.erased_parameter_names(base.unet)) and all(".attn2." in name for name in params)
    state = base.unet.state_dict()
    assert any(not torch.equal(params[name], state[name]) for name in params), "erasure must change the cross-attention"
    info = json.loads((erased / layout.ERASE_INFO_FILE).read_text())
    assert info["classes"] == CLASSES and info["template"] == "a photo of a {}" and info["method"] == "ESD-x"
    assert info["sha256"] == weight_hashes(erased)
    lines = (erased / layout.LOSS_FILE).read_text().splitlines()
    assert lines[0] == "step,class,loss" and len(lines) == 1 + 4


def test_applying_the_erasure_gives_a_model_that_differs_from_the_base_only_there(tiny_model, erased):
    pipe = sdedit.load_img2img(str(tiny_model), torch.device("cpu"), torch.float32)
    before = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    base_output = unet_output(pipe)
    assert adapters.apply_erasure(pipe, erased) == weight_hashes(erased)
    after = pipe.unet.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".attn2." in name for name in changed)
    assert not torch.equal(unet_output(pipe), base_output)


def test_erasing_named_classes_only_and_refusing_unknown_ones(tiny_model, classes_file, tmp_path, one_thread):
    es.erase_classes(make_config(tiny_model, classes=["one"], steps=1), classes_file, tmp_path / "one")
    assert json.loads((tmp_path / "one" / layout.ERASE_INFO_FILE).read_text())["classes"] == ["one"]
    with pytest.raises(PipelineError, match=r"erase\.classes: \['eleven'\] are not classes of .*classes\.json"):
        es.erase_classes(make_config(tiny_model, classes=["eleven"]), classes_file, tmp_path / "eleven")
    assert not (tmp_path / "eleven").exists()


def test_erasure_is_seeded_and_resumes_to_the_same_weights(tiny_model, classes_file, erased, tmp_path, monkeypatch, one_thread):
    config = make_config(tiny_model, checkpoint_every=2)
    step = CountedCalls(es._ddim_towards, kill_at=3)
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(es, "_ddim_towards", step)
    with pytest.raises(KeyboardInterrupt):
        es.erase_classes(config, classes_file, resumed)
    assert not resumed.exists()
    assert torch.load(es.checkpoint_dir_for(resumed) / es.CHECKPOINT_FILE, weights_only=True)["step"] == 2
    step.resume()
    es.erase_classes(config, classes_file, resumed)
    assert step.calls == 2 and not es.checkpoint_dir_for(resumed).exists()
    ours, theirs = load_file(resumed / layout.ERASED_WEIGHTS_FILE), load_file(erased / layout.ERASED_WEIGHTS_FILE)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_stage_reads_only_its_settings(tiny_model, classes_file, tmp_path, one_thread):
    reads: set = set()
    es.erase_classes(RecordingConfig(make_config(tiny_model, steps=1), reads), classes_file, tmp_path / "erase")
    assert undeclared_reads(reads, EraseSettings) == set()


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return write_train_subset(tmp_path_factory.mktemp("data"), {name: 1 for name in CLASSES})


def test_generation_with_erase_enabled_uses_the_erased_model_and_records_it(tiny_model, erased, subset, tmp_path, one_thread):
    generate = {"num_per_image": 1, "num_inference_steps": 4}
    plain = validate_config({**make_config(tiny_model), "generate": generate})
    with_erasure = validate_config({**make_config(tiny_model, enabled=True), "generate": generate})
    generate_shard(plain, subset, None, "txt2img", 0, 1, tmp_path / "plain.parquet")
    generate_shard(with_erasure, subset, None, "txt2img", 0, 1, tmp_path / "erased.parquet", erased_dir=erased)
    meta = read_metadata(tmp_path / "erased.parquet")
    assert meta["erased"] == str(erased) and meta["erased_sha256"] == weight_hashes(erased)
    assert read_metadata(tmp_path / "plain.parquet")["erased_sha256"] is None
    plain_rows, erased_rows = read_shards([tmp_path / "plain.parquet"]), read_shards([tmp_path / "erased.parquet"])
    assert [r["seed"] for r in plain_rows] == [r["seed"] for r in erased_rows]
    assert all(a["image"] != b["image"] for a, b in zip(plain_rows, erased_rows))

    with pytest.raises(PipelineError, match=r"erase\.enabled is true: expected an erased model folder \(the erase stage\) got none"):
        generate_shard(with_erasure, subset, None, "txt2img", 0, 1, tmp_path / "a.parquet")
    with pytest.raises(PipelineError, match=r"erase\.enabled is false: expected no erased model folder, got .*erase"):
        generate_shard(plain, subset, None, "txt2img", 0, 1, tmp_path / "a.parquet", erased_dir=erased)


def test_dreambooth_adapters_go_on_top_of_the_erased_model(tiny_model, erased, subset, tmp_path, one_thread):
    from pipeline import dreambooth as db

    config = validate_config({**make_config(tiny_model, enabled=True), "generate": {"num_per_image": 1, "num_inference_steps": 4},
                              "dreambooth": {"steps": 1, "num_class_images": 0, "learning_rate": 1e-2}})  # fmt: skip
    db.train_dreambooth(config, subset, tmp_path / "adapters")
    pipe = sdedit.load_img2img(str(tiny_model), torch.device("cpu"), torch.float32)
    adapters.apply_erasure(pipe, erased)
    class_adapters = adapters.ClassAdapters(pipe, tmp_path / "adapters", "a photo of sks {}")
    erased_weights = load_file(erased / layout.ERASED_WEIGHTS_FILE)
    # The base the adapters are fused onto, and restored to between classes, is the erased model.
    shared = set(class_adapters.base) & set(erased_weights)
    assert shared and all(torch.equal(class_adapters.base[name], erased_weights[name]) for name in shared)
    generate_shard(config, subset, None, "dreambooth", 0, 1, tmp_path / "shard.parquet", adapter_dir=tmp_path / "adapters", erased_dir=erased)
    meta = read_metadata(tmp_path / "shard.parquet")
    assert meta["erased_sha256"] == weight_hashes(erased) and meta["adapter_sha256"] == weight_hashes(tmp_path / "adapters")
