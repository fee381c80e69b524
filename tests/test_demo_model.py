"""The demo model: deterministic, resumable pretraining; checkpoint checks; the shipped model's quality."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import PipelineError
from pipeline import demo_model as dm
from pipeline.checkpoint import INFO_FILE, check_corpus_disjoint, model_files, verify_checkpoint, weight_hashes
from pipeline.demo import CLASS_NAMES, NAMED_CLASSES, Layer, build_demo_coco, caption_scene, load_mnist, pretraining_corpus, split_digit_pools

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "demo-sd"
ORACLE = REPO / "models" / "oracle"

TINY = dm.PretrainSettings(
    seed=0, resolution=32, corpus_images=24, max_objects=2, named_classes=NAMED_CLASSES, caption_dropout=0.25,
    vae_steps=2, vae_batch_size=2, vae_learning_rate=1e-3, vae_crop=16, kl_weight=1e-9,
    unet_steps=3, unet_batch_size=2, unet_learning_rate=1e-3, warmup_steps=1, cpu_threads=1, checkpoint_every=1,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_thread):
    return dm.pretrain_demo_model(TINY, tmp_path_factory.mktemp("pretrained") / "model")


def test_pretraining_is_bitwise_reproducible_and_resumes_to_the_same_weights(pretrained, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "model"
    real_step = dm.unet_step
    calls = {"n": 0}

    def killed_after_two_steps(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(dm, "unet_step", killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        dm.pretrain_demo_model(TINY, out)
    assert not out.exists() and (tmp_path / "model.partial" / dm.CHECKPOINT_FILE).is_file()
    monkeypatch.setattr(dm, "unet_step", real_step)
    dm.pretrain_demo_model(TINY, out)
    assert not (tmp_path / "model.partial").exists()
    assert weight_hashes(out) == weight_hashes(pretrained)
    losses = (out / dm.LOSS_FILE).read_text().splitlines()
    assert losses[0] == "phase,step,loss" and len(losses) == 1 + TINY.vae_steps + TINY.unet_steps


def test_pretrained_folder_loads_as_stable_diffusion_and_records_its_corpus(pretrained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pretrained, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the corpus latents
    info = json.loads((pretrained / INFO_FILE).read_text())
    _, labels = load_mnist()
    pools = split_digit_pools(labels)
    assert set(info["corpus_mnist_indices"]) == {int(i) for pool in pools["pretrain"] for i in pool}
    assert info["sha256"] == weight_hashes(pretrained)
    verify_checkpoint(pretrained)


def test_tokenizer_files_from_a_folder_give_the_same_weights_and_the_device_is_recorded(pretrained, tmp_path, one_thread):
    """The lent GPU machine has no open-clip-torch: it passes CLIP's vocab.json and merges.txt instead."""
    from pipeline.tiny_sd import write_clip_tokenizer_files

    write_clip_tokenizer_files(tmp_path / "clip")
    out = dm.pretrain_demo_model(TINY, tmp_path / "model", tokenizer_files=tmp_path / "clip")
    assert weight_hashes(out) == weight_hashes(pretrained)
    assert json.loads((out / INFO_FILE).read_text())["settings"]["device"] == "cpu"
    with pytest.raises(PipelineError, match="vocab.json"):
        dm.pretrain_demo_model(TINY, tmp_path / "other", tokenizer_files=tmp_path / "missing")


def test_the_device_is_part_of_the_settings_a_checkpoint_must_match(tmp_path, monkeypatch):
    from pipeline.config import load_config

    config = load_config(REPO / "config" / "demo-model.yaml")
    assert dm.PretrainSettings.from_config(config).device == "cpu" or torch.cuda.is_available()
    assert dm.PretrainSettings.from_config({**config, "device": "cpu"}).key()["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="cuda"):
        dm.PretrainSettings.from_config(load_config(REPO / "config" / "demo-model-gpu.yaml"))


def test_changed_settings_do_not_resume_a_checkpoint(tmp_path, one_thread):
    partial = tmp_path / "model.partial"
    partial.mkdir()
    tokenizer = _tokenizer(tmp_path)
    dm._Run(TINY, tokenizer, partial).save()
    assert not dm._Run(replace(TINY, unet_steps=4), tokenizer, partial).restore()
    assert not dm._Run(replace(TINY, device="meta"), tokenizer, partial).restore()
    assert dm._Run(replace(TINY, checkpoint_every=7), tokenizer, partial).restore()


def _tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from pipeline.tiny_sd import write_clip_tokenizer_files

    vocab, merges = write_clip_tokenizer_files(tmp_path / "bpe")
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


# -- checkpoint checks ---------------------------------------------------------------------------


@pytest.fixture
def copy_of(pretrained, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(pretrained, target)
    return target


def test_a_truncated_weights_file_is_named(copy_of):
    weights = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PipelineError, match=r"unet/diffusion_pytorch_model.safetensors: sha256 .* does not match .* recorded in"):
        verify_checkpoint(copy_of)


def test_a_missing_weights_file_and_an_unrecorded_one_are_named(copy_of):
    shutil.copy(copy_of / "vae" / "diffusion_pytorch_model.safetensors", copy_of / "vae" / "extra.safetensors")
    with pytest.raises(PipelineError, match=r"weights vae/extra.safetensors are not recorded"):
        verify_checkpoint(copy_of)
    (copy_of / "vae" / "extra.safetensors").unlink()
    (copy_of / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"text_encoder/model.safetensors: missing; demo_model.json records it"):
        verify_checkpoint(copy_of)


def test_a_folder_mixing_two_architectures_is_refused(copy_of):
    config_path = copy_of / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 768
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"not one Stable Diffusion checkpoint: expected unet cross_attention_dim = text_encoder hidden_size, got 768 and 48"):
        verify_checkpoint(copy_of)


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(PipelineError, match=r"is not a Stable Diffusion checkpoint in diffusers format: missing model_index.json"):
        verify_checkpoint(tmp_path)


def test_a_demo_dataset_overlapping_the_corpus_is_refused(pretrained, tmp_path):
    info = json.loads((pretrained / INFO_FILE).read_text())
    overlapping = {"train": [5, info["corpus_mnist_indices"][3]]}
    with pytest.raises(PipelineError, match=r"1 MNIST digits of the demo's train split .* are in the pretraining corpus"):
        check_corpus_disjoint(str(pretrained), overlapping, "demo dataset")
    check_corpus_disjoint(str(pretrained), {"train": [i for i in range(5000) if i not in set(info["corpus_mnist_indices"])]}, "demo dataset")


def test_the_demo_dataset_records_its_digit_pools_and_checks_them_against_the_model(pretrained, tmp_path):
    root = tmp_path / "demo"
    build_demo_coco(root, {"image_size": 32, "train_images": 2, "val_images": 2, "max_objects": 1}, seed=3, model_id=str(pretrained))
    recorded = json.loads((root / "mnist_indices.json").read_text())
    corpus = set(json.loads((pretrained / INFO_FILE).read_text())["corpus_mnist_indices"])
    assert set(recorded) == {"train", "val"} and not corpus & set(recorded["train"] + recorded["val"])
    assert len(corpus) + len(recorded["train"]) + len(recorded["val"]) == 5000


# -- captions ----------------------------------------------------------------------------------


def test_captions_name_only_the_named_classes_largest_digit_first():
    ink_small = np.zeros((8, 8), bool)
    ink_small[0, :2] = True
    ink_large = np.zeros((8, 8), bool)
    ink_large[4:, 4:] = True
    layers = [Layer(CLASS_NAMES.index("three") + 1, ink_small, (255, 0, 0)), Layer(CLASS_NAMES.index("seven") + 1, ink_large, (0, 0, 255))]
    assert caption_scene(layers, [ink_small, ink_large]) == "a photo of a blue digit and a red three"
    assert caption_scene(layers, [ink_small, np.zeros((8, 8), bool)]) == "a photo of a red three"


def test_corpus_labels_are_the_largest_visible_digit_and_captions_vary():
    scenes = list(pretraining_corpus(40, 32, 3, seed=0))
    assert len({s.caption for s in scenes}) > 20
    for scene in scenes:
        first = scene.caption.removeprefix("a photo of a ").split(" and ")[0].split()[-1]
        name = CLASS_NAMES[scene.label]
        assert first == (name if name in NAMED_CLASSES else "digit")


# -- the shipped model ---------------------------------------------------------------------------


def test_the_shipped_demo_model_matches_its_recorded_hashes():
    verify_checkpoint(SHIPPED)
    info = json.loads((SHIPPED / INFO_FILE).read_text())
    assert info["named_classes"] == list(NAMED_CLASSES)
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*.safetensors")) <= 20 * 2**20


@pytest.fixture(scope="module")
def held_out_scenes():
    """Eight scenes of the demo's val digit pool, which neither the model nor the oracle has seen."""
    from pipeline.demo import draw_scene, largest_visible
    from pipeline.rng import numpy_rng

    digits, labels = load_mnist()
    pool = split_digit_pools(labels)["val"]
    scenes = []
    for i in range(8):
        image, layers, visible = draw_scene(numpy_rng(99, "held-out", i), digits, pool, 64, 2)
        scenes.append((Image.fromarray(image), layers[largest_visible(layers, visible)[0]].category_id - 1))
    return scenes


def test_the_shipped_vae_reconstructs_held_out_scenes_at_24_db(held_out_scenes, one_thread):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(SHIPPED, subfolder="vae").eval()
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image, _ in held_out_scenes]).float() / 127.5 - 1
    with torch.no_grad():
        out = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = float((((out + 1) / 2 - (pixels + 1) / 2) ** 2).mean())
    assert 10 * np.log10(1 / mse) >= 24


def test_sdedit_at_low_strength_keeps_the_class_the_oracle_sees(held_out_scenes, one_thread):
    from pipeline import sdedit
    from pipeline.oracle import load_oracle, mean_abs_difference, predict

    pipe = sdedit.load_img2img(str(SHIPPED), torch.device("cpu"), torch.float32)
    images = [image for image, _ in held_out_scenes]
    out = pipe(prompt=["a photo"] * len(images), image=images, strength=0.25, num_inference_steps=20, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0)).images
    oracle = load_oracle(ORACLE)
    labels = np.array([label for _, label in held_out_scenes])
    real, synthetic = (float(np.mean(predict(oracle, batch) == labels)) for batch in (images, out))
    assert real >= 0.75
    assert synthetic >= 0.9 * real
    assert np.mean([mean_abs_difference(s, r) for s, r in zip(out, images)]) <= 0.08


def test_the_oracle_scores_a_shard_per_strength_by_class_name(held_out_scenes, tmp_path):
    """A 'synthetic' set that is the real scenes themselves: agreement is the oracle's own accuracy on
    them, the pixel distance is 0, and a run on two of the classes is scored by class name."""
    import pyarrow as pa

    from pipeline.io import encode_png, write_parquet
    from pipeline.manifest import SHARD_SCHEMA, manifest_table
    from pipeline.oracle import load_oracle, predict, score_shards

    present = sorted({label for _, label in held_out_scenes})[:2]
    kept = [(i, image, label) for i, (image, label) in enumerate(held_out_scenes) if label in present]
    classes = [CLASS_NAMES[label] for label in present]
    manifest_rows, shard_rows = [], []
    for i, image, label in kept:
        image.save(tmp_path / f"{i}.png")
        row = dict(image_id=f"s{i}", path=f"{i}.png", label=classes.index(CLASS_NAMES[label]), class_name=CLASS_NAMES[label], mask_path=None, width=64, height=64)
        manifest_rows += [{**row, "split": "train"}, {**row, "image_id": f"t{i}", "split": "test"}]
        shard_rows.append(dict(synthetic_id=f"x{i}", image_id=f"s{i}", label=row["label"], class_name=row["class_name"], method="dafusion",
                               strength=0.25 if i % 2 else 0.5, seed=0, prompt="p", guidance_scale=7.5, num_inference_steps=4, model="m",
                               image=encode_png(image), width=64, height=64, nsfw=None))
    write_parquet(tmp_path / "m.parquet", manifest_table(manifest_rows), metadata={"dataset_root": str(tmp_path), "mask_root": str(tmp_path), "classes": classes})
    write_parquet(tmp_path / "s.parquet", pa.Table.from_pylist(shard_rows, schema=SHARD_SCHEMA))
    result = score_shards(ORACLE, [tmp_path / "s.parquet"], tmp_path / "m.parquet", tmp_path / "o.json")
    expected = float(np.mean(predict(load_oracle(ORACLE), [image for _, image, _ in kept]) == np.array([label for _, _, label in kept])))
    assert result["agreement"] == pytest.approx(expected) == pytest.approx(result["real_test_agreement"])
    assert result["source_agreement"] == pytest.approx(expected)  # unedited, they are their own sources
    assert all(v["source_agreement"] == v["agreement"] for v in result["by_strength"].values())
    assert sum(v["n"] for v in result["by_strength"].values()) == len(kept)
    assert all(v["mean_abs_difference"] == 0 for v in result["by_strength"].values())


def test_an_oracle_whose_weights_changed_is_refused(tmp_path):
    from pipeline.oracle import WEIGHTS_FILE, load_oracle

    copy = tmp_path / "oracle"
    shutil.copytree(ORACLE, copy)
    (copy / WEIGHTS_FILE).write_bytes((copy / WEIGHTS_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PipelineError, match=r"oracle.safetensors: sha256 .* does not match"):
        load_oracle(copy)


def test_the_workflow_refuses_a_corrupt_model_before_any_job(project, pretrained):
    from conftest import tiny_config

    model = project.root / "model"
    shutil.copytree(pretrained, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = tiny_config()
    config["model"] = {"id": str(model), "resolution": 64}
    project.write_config(config)
    proc = project.snakemake("-n", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unet/diffusion_pytorch_model.safetensors: sha256" in output and "recorded in" in output
    assert not (project.root / "results" / "logs").exists()


def test_a_model_folders_readme_and_training_log_are_not_inputs_of_its_jobs():
    """Editing models/demo-sd/README.md must rerun no generation; replacing a weights file must."""
    names = {Path(path).relative_to(SHIPPED).as_posix() for path in model_files(SHIPPED)}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json", INFO_FILE} <= names
    assert not names & {"README.md", "loss.csv"}
    assert {Path(path).name for path in model_files(ORACLE)} == {"oracle.safetensors", "oracle.json"}
