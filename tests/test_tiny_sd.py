"""The random Stable Diffusion builders: SD 1.x's real size, and tokenizer files from a folder."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import PipelineError
from pipeline.tiny_sd import TOKENIZER_FILES, build_modules, build_tiny_sd, sd1_architecture, write_clip_tokenizer_files

# Published parameter counts of SD 1.x (CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5): diffusers'
# own docstring of ModelMixin.num_parameters gives the UNet's; the text encoder is CLIP ViT-L/14's text half.
SD1_PARAMETERS = {"text_encoder": 123_060_480, "vae": 83_653_863, "unet": 859_520_964}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer_files(folder)
    return folder


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd1_modules_have_the_published_sizes(tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(*(str(tokenizer_dir / name) for name in TOKENIZER_FILES), model_max_length=77)
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        text_encoder, vae, unet = build_modules(sd1_architecture(), tokenizer)
    assert {"text_encoder": count(text_encoder), "vae": count(vae), "unet": count(unet)} == SD1_PARAMETERS
    assert len(tokenizer) == text_encoder.config.vocab_size == 49408
    assert text_encoder.config.hidden_act == "quick_gelu" and text_encoder.config.max_position_embeddings == 77
    assert vae.config.scaling_factor == 0.18215 and unet.config.sample_size == 64


def test_tiny_build_takes_ready_made_tokenizer_files(tmp_path, tokenizer_dir):
    """The same checkpoint whether the BPE files come from open-clip-torch or from a folder."""
    from_open_clip = build_tiny_sd(tmp_path / "a", resolution=32, seed=1)
    from_folder = build_tiny_sd(tmp_path / "b", resolution=32, seed=1, tokenizer_files=tokenizer_dir)
    files = sorted(p.relative_to(from_open_clip) for p in from_open_clip.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(from_folder) for p in from_folder.rglob("*") if p.is_file())
    assert all((from_open_clip / f).read_bytes() == (from_folder / f).read_bytes() for f in files)
    weights = [f for f in files if f.suffix == ".safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert weights and all((from_open_clip / f).stat().st_mode & 0o777 == 0o666 & ~umask for f in weights)  # not 0600


def test_missing_tokenizer_files_are_named(tmp_path):
    from pipeline.tiny_sd import build_sd1

    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "vocab.json").write_text("{}")
    with pytest.raises(PipelineError, match="merges.txt"):
        build_sd1(tmp_path / "model", tokenizer_files=tmp_path / "clip")
    assert not (tmp_path / "model").exists()
