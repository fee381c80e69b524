"""Token files: names, prompts, validation on load, and loading into a diffusers pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import PipelineError
from pipeline.io import write_json
from pipeline.tiny_sd import build_tiny_sd
from pipeline.tokens import (
    EMBEDDINGS_FILE,
    TOKENS_FILE,
    add_tokens_to_pipeline,
    class_slug,
    format_prompt,
    load_token_file,
    token_for_class,
    vector_tokens,
    write_token_files,
)

DIM = 64  # hidden size of the tiny Stable Diffusion's text encoder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=64, seed=0)


@pytest.fixture()
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


def write_tokens(folder: Path, class_tokens: dict[str, str], num_vectors: int = 2, dim: int = DIM) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vectors = {token: torch.randn(num_vectors, dim, generator=generator) for token in class_tokens.values()}
    folder.mkdir(parents=True)
    write_token_files(folder, class_tokens, vectors, {"num_vectors": num_vectors, "model": "tiny"})
    return vectors


def test_token_names_and_prompts():
    assert class_slug("Traffic  Light") == "traffic-light"
    assert token_for_class("potted plant") == "<potted-plant>"
    assert token_for_class("AC/DC <live>") == "<ac-dc--live->"
    with pytest.raises(PipelineError, match="'<>'"):
        class_slug("<>")
    assert vector_tokens("<dog>", 3) == ["<dog>", "<dog>_1", "<dog>_2"]
    assert format_prompt("a photo of a {}", "<dog>", 1) == "a photo of a <dog>"
    assert format_prompt("a {} on grass", "<dog>", 3) == "a <dog> <dog>_1 <dog>_2 on grass"


def test_token_files_round_trip(tmp_path):
    class_tokens = {"dog": "<dog>", "traffic light": "<traffic-light>"}
    vectors = write_tokens(tmp_path / "tokens", class_tokens)
    loaded_classes, loaded = load_token_file(tmp_path / "tokens")
    assert loaded_classes == class_tokens
    assert all(torch.equal(loaded[t], vectors[t]) for t in vectors)
    single = load_file(tmp_path / "tokens" / "traffic-light" / EMBEDDINGS_FILE)
    assert list(single) == ["<traffic-light>"] and torch.equal(single["<traffic-light>"], vectors["<traffic-light>"])


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_token_files_get_the_mode_the_umask_allows(tmp_path):
    """safetensors alone writes 0600; outputs are readable as the umask allows, like every other one."""
    write_tokens(tmp_path / "tokens", {"dog": "<dog>"})
    for path in (tmp_path / "tokens" / EMBEDDINGS_FILE, tmp_path / "tokens" / "dog" / EMBEDDINGS_FILE):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / EMBEDDINGS_FILE).unlink(), "learned_embeds.safetensors does not exist"),
        (lambda d: (d / TOKENS_FILE).unlink(), "tokens.json does not exist"),
        (lambda d: save_file({}, str(d / EMBEDDINGS_FILE)), "holds no tensors"),
        (lambda d: (d / EMBEDDINGS_FILE).write_bytes(b"not a tensor file"), "not a readable safetensors"),
        (lambda d: save_file({"<cat>": torch.zeros(2, DIM)}, str(d / EMBEDDINGS_FILE)), r"without a tensor \['<dog>'\]"),
        (lambda d: save_file({"<dog>": torch.zeros(3, DIM)}, str(d / EMBEDDINGS_FILE)), r"shape \(3, 64\).*\(2, 64\)"),
        (lambda d: save_file({"<dog>": torch.full((2, DIM), float("nan"))}, str(d / EMBEDDINGS_FILE)), "non-finite"),
        (lambda d: write_json(d / TOKENS_FILE, {"tokens": {}}), "non-empty 'tokens'"),
    ],
)
def test_damaged_token_files_are_refused(tmp_path, damage, message):
    folder = tmp_path / "tokens"
    write_tokens(folder, {"dog": "<dog>"})
    damage(folder)
    with pytest.raises(PipelineError, match=message):
        load_token_file(folder)


def test_add_tokens_to_pipeline_loads_exactly_the_vectors(tmp_path, pipe):
    class_tokens = {"dog": "<dog>", "traffic light": "<traffic-light>"}
    vectors = write_tokens(tmp_path / "tokens", class_tokens)
    loaded = add_tokens_to_pipeline(pipe, tmp_path / "tokens", ["traffic light"])
    assert loaded == {"traffic light": "<traffic-light>"}
    assert "<dog>" not in pipe.tokenizer.get_vocab()

    prompt = format_prompt("a photo of a {}", "<traffic-light>", 2)
    assert pipe.maybe_convert_prompt("a photo of a <traffic-light>", pipe.tokenizer) == prompt
    ids = pipe.tokenizer(prompt).input_ids
    new_ids = pipe.tokenizer.convert_tokens_to_ids(["<traffic-light>", "<traffic-light>_1"])
    assert ids[5:7] == new_ids
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[new_ids].detach(), vectors["<traffic-light>"])


def test_add_tokens_to_pipeline_refuses_mismatches(tmp_path, pipe):
    write_tokens(tmp_path / "narrow", {"dog": "<dog>"}, dim=32)
    with pytest.raises(PipelineError, match=r"'<dog>' \(class 'dog'\) has dimension 32.*embeds in 64"):
        add_tokens_to_pipeline(pipe, tmp_path / "narrow", ["dog"])
    write_tokens(tmp_path / "tokens", {"dog": "<dog>"})
    with pytest.raises(PipelineError, match=r"no token for classes \['cat'\]"):
        add_tokens_to_pipeline(pipe, tmp_path / "tokens", ["dog", "cat"])
    with pytest.raises(PipelineError, match="does not exist"):
        add_tokens_to_pipeline(pipe, tmp_path / "wrong-path", ["dog"])
    assert "<dog>" not in pipe.tokenizer.get_vocab()
    add_tokens_to_pipeline(pipe, tmp_path / "tokens", ["dog"])
    with pytest.raises(PipelineError, match="already in the pipeline's tokenizer"):
        add_tokens_to_pipeline(pipe, tmp_path / "tokens", ["dog"])
