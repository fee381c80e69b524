"""DreamBooth-LoRA on the tiny random Stable Diffusion: what is trained and written, that stock
diffusers loads it, resume, and generation with the adapted model. (Its effect, on the demo model:
BENCHMARKS.md, "DreamBooth-LoRA".)"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CountedCalls, RecordingConfig, undeclared_reads
from test_invert import CLASSES, write_subset

from pipeline import PipelineError, adapters, layout, sdedit
from pipeline import dreambooth as db
from pipeline.config import validate_config
from pipeline.generate import generate_shard
from pipeline.checkpoint import weight_hashes
from pipeline.io import file_sha256, read_metadata, write_parquet
from pipeline.manifest import manifest_table, read_manifest, read_shards
from pipeline.settings.dreambooth import DreamBoothSettings
from pipeline.settings.generate import GenerateSettings
from pipeline.tiny_sd import build_tiny_sd

RESOLUTION = 32


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=RESOLUTION, seed=0)


def write_train_subset(folder: Path, images_per_class: dict[str, int], classes: list[str] = CLASSES) -> Path:
    """Training images and nothing else, as the fewshot stage writes a subset."""
    path = write_subset(folder, images_per_class, classes)
    rows, meta = read_manifest(path)
    write_parquet(path, manifest_table([row for row in rows if row["split"] == "train"]), meta)
    return path


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return write_train_subset(tmp_path_factory.mktemp("data"), {name: 2 for name in CLASSES})


def make_config(model: Path, **dreambooth) -> dict:
    settings = {"num_class_images": 2, "class_image_steps": 2, "steps": 2, "batch_size": 2,
                "learning_rate": 1e-2, "checkpoint_every": 0, **dreambooth}  # fmt: skip
    return validate_config({"model": {"id": str(model), "resolution": RESOLUTION}, "device": "cpu", "dreambooth": settings})


@pytest.fixture(scope="module")
def adapter(tiny_model, subset, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "k2_seed0"
    db.train_dreambooth(make_config(tiny_model), subset, out)
    return out


def unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    side = RESOLUTION // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=generator)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, 500, encoder_hidden_states=text).sample


SLUGS = {"zero": "zero", "one": "one", "traffic light": "traffic-light"}


def test_each_class_gets_an_adapter_that_stock_diffusers_loads_and_that_changes_the_model(tiny_model, adapter):
    from diffusers import StableDiffusionPipeline

    assert sorted(p.name for p in adapter.iterdir()) == sorted([layout.ADAPTER_INFO_FILE, layout.LOSS_FILE, *SLUGS.values()])
    info = json.loads((adapter / layout.ADAPTER_INFO_FILE).read_text())
    assert info["instance_prompt"] == "a photo of sks {}" and info["class_prompt"] == "a photo of a {}"
    assert info["classes"] == SLUGS and info["steps"] == 2
    assert info["sha256"] == {f"{slug}/{layout.ADAPTER_WEIGHTS_FILE}": file_sha256(adapter / slug / layout.ADAPTER_WEIGHTS_FILE) for slug in SLUGS.values()}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base = unet_output(pipe)
    outputs = []
    for slug in SLUGS.values():
        weights = load_file(adapter / slug / layout.ADAPTER_WEIGHTS_FILE)
        assert weights and all(name.startswith("unet.") and "lora" in name for name in weights)
        # Only the attention projections are adapted, at the configured rank.
        assert {name.split(".lora")[0].rsplit(".", 1)[-1] for name in weights} <= {"to_q", "to_k", "to_v", "0"}
        assert {t.shape[0] for name, t in weights.items() if "lora_A" in name or "lora.down" in name} == {4}
        pipe.load_lora_weights(str(adapter / slug), adapter_name=slug)
        pipe.set_adapters(slug)
        outputs.append(unet_output(pipe))
    assert all(not torch.equal(output, base) for output in outputs), "a trained adapter must change the UNet"
    assert not torch.equal(outputs[0], outputs[1]), "each class has its own adapter"
    with (adapter / layout.LOSS_FILE).open() as handle:
        losses = list(csv.DictReader(handle))
    assert [(int(row["step"]), row["class"]) for row in losses] == [(step, name) for name in SLUGS for step in (1, 2)]
    assert all(float(row["instance_loss"]) > 0 and float(row["prior_loss"]) > 0 for row in losses)


def test_a_fused_class_adapter_gives_the_unfused_models_output_and_switching_leaves_nothing_behind(tiny_model, adapter):
    from diffusers import StableDiffusionPipeline

    def unfused(slug):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(adapter / slug))
        return unet_output(pipe)

    fused = sdedit.load_img2img(str(tiny_model), torch.device("cpu"), torch.float32)
    base = unet_output(fused)
    class_adapters = adapters.ClassAdapters(fused, adapter, "a photo of sks {}")
    assert class_adapters.hashes == json.loads((adapter / layout.ADAPTER_INFO_FILE).read_text())["sha256"]
    class_adapters.use("zero")
    assert not any("lora" in name for name in fused.unet.state_dict()), "fused and unloaded: a plain UNet again"
    torch.testing.assert_close(unet_output(fused), unfused("zero"), rtol=1e-4, atol=1e-5)
    class_adapters.use("traffic light")
    torch.testing.assert_close(unet_output(fused), unfused("traffic-light"), rtol=1e-4, atol=1e-5)
    with pytest.raises(PipelineError, match=r"no adapter for class 'two'\. Expected one of \['one', 'traffic light', 'zero'\]"):
        class_adapters.use("two")
    with torch.no_grad():
        fused.unet.load_state_dict(class_adapters.base, strict=False)
    assert torch.equal(unet_output(fused), base), "the saved base weights are the base model's"


def test_training_is_seeded_and_resumes_to_the_same_weights(tiny_model, subset, adapter, tmp_path, monkeypatch, one_thread):
    config = make_config(tiny_model, checkpoint_every=2)
    step = CountedCalls(db._step_loss, kill_at=5)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(db, "_step_loss", step)
    with pytest.raises(KeyboardInterrupt):
        db.train_dreambooth(config, subset, resumed)
    assert not resumed.exists(), "nothing half-written at the output"
    assert sorted(p.name for p in db.checkpoint_dir_for(resumed).iterdir()) == ["one.pt", "zero.pt"]

    step.resume()
    db.train_dreambooth(config, subset, resumed)
    assert step.calls == 2, "the resumed run trains only the class that was not done"
    assert not db.checkpoint_dir_for(resumed).exists()
    for slug in SLUGS.values():  # bitwise the fixture's uninterrupted run: checkpointing changes no weight
        ours, theirs = load_file(resumed / slug / layout.ADAPTER_WEIGHTS_FILE), load_file(adapter / slug / layout.ADAPTER_WEIGHTS_FILE)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (resumed / layout.LOSS_FILE).read_text() == (adapter / layout.LOSS_FILE).read_text()


def test_a_classs_adapter_does_not_depend_on_the_other_classes(tiny_model, adapter, tmp_path, one_thread):
    path = write_train_subset(tmp_path / "data", {"zero": 2}, classes=["zero"])
    db.train_dreambooth(make_config(tiny_model), path, tmp_path / "adapter")
    alone, among_others = load_file(tmp_path / "adapter" / "zero" / layout.ADAPTER_WEIGHTS_FILE), load_file(adapter / "zero" / layout.ADAPTER_WEIGHTS_FILE)
    assert alone.keys() == among_others.keys() and all(torch.equal(alone[k], among_others[k]) for k in alone)


def test_without_prior_preservation_only_the_instance_loss_is_trained(tiny_model, subset, tmp_path, one_thread):
    summary = db.train_dreambooth(make_config(tiny_model, num_class_images=0), subset, tmp_path / "adapter")
    assert all(loss["prior"] is None and loss["instance"] > 0 for loss in summary["final_loss"].values())


def test_lora_modules_choose_what_is_adapted_and_generation_restores_them_between_classes(tiny_model, subset, tmp_path, one_thread):
    modules = ["to_v", "conv1"]
    out = tmp_path / "adapter"
    db.train_dreambooth(make_config(tiny_model, lora_modules=modules), subset, out)
    adapted = adapters.adapted_weights(out / "zero" / layout.ADAPTER_WEIGHTS_FILE)
    assert adapted and {name.rsplit(".", 2)[-2] for name in adapted} == {"to_v", "conv1"}
    pipe = sdedit.load_img2img(str(tiny_model), torch.device("cpu"), torch.float32)
    class_adapters = adapters.ClassAdapters(pipe, out, "a photo of sks {}")
    assert set(class_adapters.base) == adapted
    class_adapters.use("zero")
    zero = unet_output(pipe)
    class_adapters.use("one")
    class_adapters.use("zero")
    assert torch.equal(unet_output(pipe), zero), "switching back gives the class's model again, with nothing of the other left"


def test_the_stage_reads_only_its_settings(tiny_model, subset, tmp_path, one_thread):
    reads: set = set()
    db.train_dreambooth(RecordingConfig(make_config(tiny_model, steps=1), reads), subset, tmp_path / "adapter")
    assert undeclared_reads(reads, DreamBoothSettings) == set()


def test_the_instance_prompt_is_in_the_key_of_the_adapted_methods_only():
    def key(method, prompt):
        return GenerateSettings.from_config(validate_config({"dreambooth": {"instance_prompt": prompt}}), method).key()

    changed = {m for m in ("dafusion", "txt2img", "dreambooth", "dreambooth-sdedit") if key(m, "a sks {}") != key(m, "a photo of sks {}")}
    assert changed == {"dreambooth", "dreambooth-sdedit"}


@pytest.mark.parametrize("method", ["dreambooth", "dreambooth-sdedit"])
def test_generation_uses_the_adapted_model_and_its_prompt(tiny_model, subset, adapter, tmp_path, monkeypatch, method, one_thread):
    config = validate_config({**make_config(tiny_model), "generate": {"num_per_image": 1, "num_inference_steps": 4, "methods": [method]}})
    out = tmp_path / "shard.parquet"
    generate_shard(config, subset, None, method, 0, 1, out, adapter_dir=adapter)
    rows = read_shards([out])
    assert len(rows) == 2 * len(CLASSES)
    assert {row["prompt"] for row in rows} == {f"a photo of sks {name}" for name in CLASSES}
    meta = read_metadata(out)
    assert meta["adapter_sha256"] == weight_hashes(adapter) and meta["adapter"] == str(adapter)

    # The same work items with the adapters left unfused give other images: the adapters made them.
    monkeypatch.setattr(adapters.ClassAdapters, "use", lambda self, class_name: None)
    base = tmp_path / "base.parquet"
    generate_shard(config, subset, None, method, 0, 1, base, adapter_dir=adapter)
    base_rows = read_shards([base])
    assert [r["seed"] for r in base_rows] == [r["seed"] for r in rows]
    assert all(a["image"] != b["image"] for a, b in zip(base_rows, rows))


def test_generation_refuses_a_missing_or_stale_adapter(tiny_model, subset, adapter, tmp_path):
    config = validate_config({**make_config(tiny_model), "generate": {"num_per_image": 1, "num_inference_steps": 4}})
    with pytest.raises(PipelineError, match=r"method 'dreambooth' generates with the subset's dreambooth adapter\. Expected an adapter folder"):
        generate_shard(config, subset, None, "dreambooth", 0, 1, tmp_path / "a.parquet")
    with pytest.raises(PipelineError, match=r"method 'txt2img' uses the base model\. Got an adapter folder"):
        generate_shard(config, subset, None, "txt2img", 0, 1, tmp_path / "a.parquet", adapter_dir=adapter)
    other = validate_config({**config, "dreambooth": {"instance_prompt": "a picture of zwx {}"}})
    with pytest.raises(PipelineError, match=r"adapter\.json: the adapters were trained with instance prompt 'a photo of sks \{\}'\. Expected dreambooth\.instance_prompt 'a picture of zwx \{\}'"):
        generate_shard(other, subset, None, "dreambooth", 0, 1, tmp_path / "b.parquet", adapter_dir=adapter)
    assert not (tmp_path / "b.parquet").exists()


def test_generation_refuses_an_adapter_whose_weights_changed(tiny_model, subset, adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    weights = copy / "one" / layout.ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8])
    config = validate_config({**make_config(tiny_model), "generate": {"num_per_image": 1, "num_inference_steps": 4}})
    with pytest.raises(PipelineError, match=r"one/pytorch_lora_weights\.safetensors: sha256 .* does not match .* recorded in .*adapter\.json"):
        generate_shard(config, subset, None, "dreambooth", 0, 1, tmp_path / "a.parquet", adapter_dir=copy)
