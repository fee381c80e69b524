"""Textual inversion on the tiny random Stable Diffusion: what is trained, what is written, resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CountedCalls, RecordingConfig, undeclared_reads

from pipeline import PipelineError
from pipeline import invert as inv
from pipeline.config import validate_config
from pipeline.io import output_lock, write_parquet
from pipeline.manifest import manifest_table
from pipeline.settings.invert import InvertSettings
from pipeline.tiny_sd import build_tiny_sd
from pipeline.layout import EMBEDDINGS_FILE
from pipeline.tokens import format_prompt, load_token_file

CLASSES = ["zero", "one", "traffic light"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=64, seed=0)


def write_subset(folder: Path, images_per_class: dict[str, int], classes: list[str] = CLASSES, trial_seed: int = 0) -> Path:
    """A few-shot subset manifest over digit-like PNGs (a random blob per image, seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(classes):
        for k in range(images_per_class.get(name, 0)):
            pixels = np.random.default_rng(label * 100 + k).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            file_name = f"{label}-{k}.png"
            Image.fromarray(pixels).resize((48, 40)).save(folder / file_name)
            rows.append(
                dict(image_id=f"img-{label}-{k}", path=file_name, split="train", label=label,
                     class_name=name, mask_path=None, width=48, height=40)
            )
    # A held-out image that must never be trained on.
    rows.append(dict(image_id="img-test", path="missing.png", split="test", label=0, class_name=classes[0],
                     mask_path=None, width=48, height=40))
    subset = folder / "subset.parquet"
    meta = {"dataset_root": str(folder), "mask_root": str(folder), "classes": classes, "trial_seed": trial_seed, "examples_per_class": 2}
    write_parquet(subset, manifest_table(rows), meta)
    return subset


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return write_subset(tmp_path_factory.mktemp("data"), {name: 2 for name in CLASSES})


def make_config(model: Path, **invert) -> dict:
    settings = {"steps": 4, "batch_size": 2, "learning_rate": 5e-3, "checkpoint_every": 0, **invert}
    return validate_config({"device": "cpu", "model": {"id": str(model), "resolution": 64}, "invert": settings})


def loaded_components(model: Path, class_tokens: dict[str, str], num_vectors: int = 1):
    components = inv.load_components(str(model), torch.device("cpu"), torch.float32)
    initial = inv.add_class_tokens(components, class_tokens, "the", num_vectors)
    return components, initial, components.text_encoder.get_input_embeddings().num_embeddings


def test_only_the_new_token_rows_are_trained(tiny_model, subset):
    class_tokens = {"zero": "<zero>", "one": "<one>"}
    components, initial, first_new_id = loaded_components(tiny_model, class_tokens, num_vectors=2)
    frozen = {
        name: {key: value.clone() for key, value in getattr(components, name).state_dict().items()}
        for name in ("text_encoder", "vae", "unet")
    }
    paths = {"zero": sorted(subset.parent.glob("0-*.png")), "one": sorted(subset.parent.glob("1-*.png"))}
    config = make_config(tiny_model, num_vectors=2)
    vectors, losses = inv.train_token_vectors(components, paths, class_tokens, initial, first_new_id, InvertSettings.from_config(config), seed=0)

    assert vectors.shape == (4, 64) and len(losses) == 4
    assert torch.equal(initial[0], initial[1]), "every vector starts as the embedding of 'the'"
    changed = (vectors - initial).abs().amax(dim=1)
    assert (changed > 1e-4).all(), f"every new row should move, moved {changed.tolist()}"
    for name, before in frozen.items():
        after = getattr(components, name).state_dict()
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{name}.{key} changed"
    assert components.text_encoder.get_input_embeddings().num_embeddings == first_new_id
    assert not any(p.requires_grad for name in frozen for p in getattr(components, name).parameters())


def test_new_rows_are_looked_up_beside_the_frozen_vocabulary():
    frozen = torch.nn.Embedding(10, 3)
    new_rows = torch.arange(6.0).view(2, 3)
    lookup = inv._VocabularyWithNewTokens(frozen, new_rows, first_new_id=10)
    ids = torch.tensor([[1, 10, 4, 11]])
    out = lookup(ids)
    assert torch.equal(out[0, 0], frozen.weight[1]) and torch.equal(out[0, 2], frozen.weight[4])
    assert torch.equal(out[0, 1], new_rows[0]) and torch.equal(out[0, 3], new_rows[1])


def test_outputs_load_into_diffusers(tiny_model, subset, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tokens"
    summary = inv.invert_tokens(make_config(tiny_model, num_vectors=2), subset, out, ["zero", "traffic light"])
    assert summary["tokens"] == {"zero": "<zero>", "traffic light": "<traffic-light>"}

    class_tokens, vectors = load_token_file(out)
    assert class_tokens == summary["tokens"]
    assert all(v.shape == (2, 64) and v.dtype == torch.float32 for v in vectors.values())
    with (out / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # joint run: the batch loss of every step, and beside it the loss of each class drawn in that step
    assert [int(r["step"]) for r in rows if r["class"] == "all"] == [1, 2, 3, 4]
    assert {r["class"] for r in rows} <= {"all", "zero", "traffic light"} and len({r["class"] for r in rows}) > 1
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    for step in range(1, 5):
        of_step = {r["class"]: float(r["loss"]) for r in rows if int(r["step"]) == step}
        by_class = [v for k, v in of_step.items() if k != "all"]
        assert min(by_class) - 1e-6 <= of_step["all"] <= max(by_class) + 1e-6  # the batch mean lies among its classes'
    assert not inv.checkpoint_dir_for(out).exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_textual_inversion([str(out / "zero"), str(out / "traffic-light")])
    weight = pipe.text_encoder.get_input_embeddings().weight
    for token, tensor in vectors.items():
        assert torch.equal(load_file(out / token.strip("<>") / EMBEDDINGS_FILE)[token], tensor)
        ids = pipe.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
        assert pipe.tokenizer.unk_token_id not in ids
        assert torch.equal(weight[ids].detach(), tensor)
        prompt = pipe.maybe_convert_prompt(f"a photo of a {token}", pipe.tokenizer)
        assert prompt == format_prompt("a photo of a {}", token, 2)


def test_resume_after_interruption_gives_the_same_result(tiny_model, subset, tmp_path, monkeypatch):
    config = make_config(tiny_model, mode="per_class", steps=3, batch_size=1, checkpoint_every=2)
    classes = ["zero", "one"]
    uninterrupted = tmp_path / "uninterrupted"
    inv.invert_tokens(config, subset, uninterrupted, classes)

    # Kill the second class's run at its 3rd step, after its checkpoint at step 2.
    step = CountedCalls(inv._denoising_loss, kill_at=6)
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(inv, "_denoising_loss", step)
    with pytest.raises(KeyboardInterrupt):
        inv.invert_tokens(config, subset, resumed, classes)
    assert not resumed.exists()
    assert len(list(inv.checkpoint_dir_for(resumed).glob("*.pt"))) == 2

    step.resume()
    inv.invert_tokens(config, subset, resumed, classes)
    assert step.calls == 1, "only the lost step of the second class is redone"
    assert not inv.checkpoint_dir_for(resumed).exists()

    _, expected = load_token_file(uninterrupted)
    _, got = load_token_file(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[t], got[t]) for t in expected)
    assert (uninterrupted / "loss.csv").read_text() == (resumed / "loss.csv").read_text()

    # per_class runs are independent: one call per class, merged, equals the call for both.
    for name in classes:
        inv.invert_tokens(config, subset, tmp_path / name, [name])
    monkeypatch.undo()
    merged = tmp_path / "merged"
    summary = inv.merge_tokens([tmp_path / name for name in classes], merged)
    assert summary["tokens"] == {"zero": "<zero>", "one": "<one>"}
    _, merged_vectors = load_token_file(merged)
    assert all(torch.equal(merged_vectors[t], expected[t]) for t in expected)
    assert (merged / "loss.csv").read_text() == (uninterrupted / "loss.csv").read_text()


def test_a_second_job_on_the_same_tokens_folder_stops_before_touching_its_checkpoints(tiny_model, subset, tmp_path):
    out = tmp_path / "tokens"
    checkpoint = inv.checkpoint_dir_for(out) / "run.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"state of the live job")
    with output_lock(out):  # the live job
        with pytest.raises(PipelineError, match=rf"^{tmp_path}/tokens\.lock is held by pid {os.getpid()} on host "):
            inv.invert_tokens(make_config(tiny_model), subset, out)
    assert checkpoint.read_bytes() == b"state of the live job" and not out.exists()


def test_trials_draw_independent_noise(tiny_model, subset, tmp_path):
    """The same images under another trial seed train with other draws, hence other vectors."""
    other_trial = write_subset(tmp_path / "data", {name: 2 for name in CLASSES}, trial_seed=1)
    config = make_config(tiny_model, steps=2)
    inv.invert_tokens(config, subset, tmp_path / "trial0", ["zero"])
    inv.invert_tokens(config, other_trial, tmp_path / "trial1", ["zero"])
    _, first = load_token_file(tmp_path / "trial0")
    _, second = load_token_file(tmp_path / "trial1")
    assert first.keys() == second.keys()
    assert not any(torch.equal(first[t], second[t]) for t in first)


def test_merge_refuses_mixed_settings_and_repeated_classes(tiny_model, subset, tmp_path):
    inv.invert_tokens(make_config(tiny_model, steps=1), subset, tmp_path / "a", ["zero"])
    inv.invert_tokens(make_config(tiny_model, steps=2), subset, tmp_path / "b", ["one"])
    with pytest.raises(PipelineError, match="steps"):
        inv.merge_tokens([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    with pytest.raises(PipelineError, match="zero"):
        inv.merge_tokens([tmp_path / "a", tmp_path / "a"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_class_name_of_several_tokens_starts_from_the_mean_of_their_embeddings(tiny_model):
    components = inv.load_components(str(tiny_model), torch.device("cpu"), torch.float32)
    tokenizer, embedding = components.tokenizer, components.text_encoder.get_input_embeddings().weight
    parts = tokenizer.encode("pottedplant", add_special_tokens=False)  # a VOC class: pot, ted, plant
    assert len(parts) == 3
    initial = inv.add_class_tokens(components, {"pottedplant": "<pottedplant>", "one": "<one>"}, "class_name", 2)
    torch.testing.assert_close(initial[0], embedding[parts].float().mean(dim=0))
    assert torch.equal(initial[0], initial[1])  # every vector of the token starts there
    torch.testing.assert_close(initial[2], embedding[tokenizer.encode("one", add_special_tokens=False)[0]].float())


def test_bad_inputs_name_the_class_or_word(tiny_model, tmp_path):
    lonely = write_subset(tmp_path / "data", {"zero": 1, "one": 0, "traffic light": 1})
    with pytest.raises(PipelineError, match=r"no training images for classes \['one'\]"):
        inv.invert_tokens(make_config(tiny_model), lonely, tmp_path / "out")
    with pytest.raises(PipelineError, match=r"initializer ' ' \(class 'zero'\) is no token at all"):
        inv.invert_tokens(make_config(tiny_model, init=" "), lonely, tmp_path / "out", ["zero"])
    with pytest.raises(PipelineError, match="'two'.*not classes"):
        inv.invert_tokens(make_config(tiny_model), lonely, tmp_path / "out", ["two"])
    components, _, _ = loaded_components(tiny_model, {"zero": "<zero>"})
    with pytest.raises(PipelineError, match="'zero'.*'<zero>' is already in the vocabulary"):
        inv.add_class_tokens(components, {"zero": "<zero>"}, "the", 1)
    assert not (tmp_path / "out").exists()


def test_training_lowers_the_loss_on_a_fixed_image(tiny_model, subset):
    """Overfit sanity check: the denoising loss on fixed noise draws falls once the token is learned."""
    class_tokens = {"zero": "<zero>"}
    components, initial, first_new_id = loaded_components(tiny_model, class_tokens)
    paths = {"zero": sorted(subset.parent.glob("0-0.png"))}
    config = make_config(tiny_model, steps=15, learning_rate=2e-2, flip=False)
    vectors, _ = inv.train_token_vectors(components, paths, class_tokens, initial, first_new_id, InvertSettings.from_config(config), seed=0)

    cache = inv.encode_latents(components, [paths["zero"]], 64, flip=False)
    prompt_ids = inv._prompt_ids(components, ["<zero>"], ["a photo of a {}"], 1)
    held_out_draws = inv._StepDraws(1, ("held-out",), 1, 1, batch_size=32, flip=False).draw(0, (4, 16, 16), 1000)

    def loss_with(rows):
        with torch.no_grad(), inv._new_token_rows(components.text_encoder, rows, first_new_id):
            return inv._denoising_loss(components, cache, prompt_ids, held_out_draws).mean().item()

    before, after = loss_with(initial), loss_with(vectors)
    assert after < before - 1e-3, f"loss {before:.5f} -> {after:.5f}"


def test_gradient_checkpointing_trains_the_same_vectors(tiny_model, subset, tmp_path, monkeypatch):
    """invert.gradient_checkpointing recomputes the UNet's activations in the backward pass instead
    of keeping them: the gradient reaching the token rows, hence the vectors, must not change."""
    real_load, resnet_calls = inv.load_components, []

    def counting_load(*args, **kwargs):
        components = real_load(*args, **kwargs)
        # A block past the first cross-attention, so on the gradient's path from the loss to the tokens.
        # Its forward is wrapped, not hooked: PyTorch runs no forward hooks when checkpointing recomputes.
        resnet = components.unet.up_blocks[0].resnets[0]
        forward = resnet.forward
        resnet.forward = lambda *a, **k: resnet_calls.append(1) or forward(*a, **k)
        return components

    monkeypatch.setattr(inv, "load_components", counting_load)
    calls = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        resnet_calls.clear()
        inv.invert_tokens(make_config(tiny_model, steps=3, gradient_checkpointing=checkpointing), subset, tmp_path / name, ["zero"])
        calls[name] = len(resnet_calls)
    assert calls["checkpointed"] == 2 * calls["plain"] > 0, f"the backward pass should run each block again: {calls}"

    _, plain = load_token_file(tmp_path / "plain")
    _, recomputed = load_token_file(tmp_path / "checkpointed")
    initial = inv.add_class_tokens(real_load(str(tiny_model), torch.device("cpu"), torch.float32), {"zero": "<zero>"}, "the", 1)
    assert plain.keys() == recomputed.keys()
    for token in plain:
        assert not torch.equal(plain[token], initial.reshape(plain[token].shape)), "training moved nothing"
        assert torch.equal(recomputed[token], plain[token])


def test_scale_lr_multiplies_the_learning_rate_by_the_batch_size(tiny_model, subset, tmp_path):
    scaled = make_config(tiny_model, steps=2, batch_size=2, learning_rate=5e-3, scale_lr=True)
    inv.invert_tokens(scaled, subset, tmp_path / "scaled", ["zero"])
    inv.invert_tokens(make_config(tiny_model, steps=2, batch_size=2, learning_rate=1e-2), subset, tmp_path / "doubled", ["zero"])
    inv.invert_tokens(make_config(tiny_model, steps=2, batch_size=2, learning_rate=5e-3), subset, tmp_path / "plain", ["zero"])
    _, by_scale = load_token_file(tmp_path / "scaled")
    _, by_hand = load_token_file(tmp_path / "doubled")
    _, unscaled = load_token_file(tmp_path / "plain")
    assert all(torch.equal(by_scale[t], by_hand[t]) for t in by_scale)
    assert not any(torch.equal(by_scale[t], unscaled[t]) for t in by_scale)


def test_the_stage_reads_only_config_keys_its_settings_declare(tiny_model, subset, tmp_path):
    reads: set[str] = set()
    inv.invert_tokens(RecordingConfig(make_config(tiny_model, steps=1), reads), subset, tmp_path / "tokens", ["zero"])
    assert undeclared_reads(reads, InvertSettings) == set()
