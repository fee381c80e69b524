"""Build randomly initialised Stable Diffusion checkpoints in diffusers format.

`build_tiny_sd`: the architecture of SD 1.x (CLIP text encoder with the real 49,408-token BPE
vocabulary, AutoencoderKL, UNet2DConditionModel with cross-attention, PNDM scheduler with SD 1.4's
settings) at a size a 2-core CPU runs in seconds. Every stage loads it with `from_pretrained(path)`
exactly as it loads `CompVis/stable-diffusion-v1-4`, so the offline tests and the embedded default
exercise the real loading and sampling code. Its images are noise: it tests machinery, not image quality.

`build_sd1`: the same at SD 1.x's real size (`SD1_PARAMETERS`), for speed and memory benchmarks,
which do not depend on weight values. It can be initialised straight on a GPU, and it takes the
tokenizer files ready-made where open-clip-torch is not installed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
from pathlib import Path

import torch

from pipeline import PipelineError
from pipeline.io import atomic_path, grant_umask_permissions, write_json

log = logging.getLogger(__name__)

# CLIP's BPE vocabulary: 256 byte symbols, the same with an end-of-word marker, 48,894 merges, 2 specials.
NUM_MERGES = 49152 - 256 - 2
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# `benchmark_checkpoint`'s name for a freshly built full-size SD 1.x.
RANDOM_SD1 = "random-sd1"
# Parameters of SD 1.x's components (CompVis/stable-diffusion-v1-4 and v1-5), which `build_sd1` matches.
SD1_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(out_dir: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt for CLIPTokenizer from the BPE file that open-clip-torch ships."""
    import open_clip

    bpe_path = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = (out_dir / name for name in TOKENIZER_FILES)
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def _tokenizer_files(tokenizer_files: str | Path | None, scratch: Path) -> tuple[Path, Path]:
    """(vocab.json, merges.txt): from the `tokenizer_files` folder, else written from open-clip-torch into `scratch`."""
    if tokenizer_files is None:
        return write_clip_tokenizer_files(scratch)
    vocab_path, merges_path = (Path(tokenizer_files) / name for name in TOKENIZER_FILES)
    missing = [str(path) for path in (vocab_path, merges_path) if not path.is_file()]
    if missing:
        raise PipelineError(
            f"tokenizer files: expected {' and '.join(TOKENIZER_FILES)} in {tokenizer_files}, missing {', '.join(missing)}. "
            "Write them with pipeline.tiny_sd.write_clip_tokenizer_files where open-clip-torch is installed."
        )
    return vocab_path, merges_path


def tiny_architecture(resolution: int) -> dict[str, dict]:
    """Constructor arguments of the tiny model's text encoder (CLIPTextConfig), VAE and UNet."""
    return {
        "text_encoder": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (32, 32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 16,
            "sample_size": resolution,
        },
        "unet": {
            "sample_size": resolution // 4,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
    }


def sd1_architecture() -> dict[str, dict]:
    """Constructor arguments of SD 1.x: the configs of CompVis/stable-diffusion-v1-4's unet and vae
    folders, and the text half of CLIP ViT-L/14 (openai/clip-vit-large-patch14)."""
    return {
        "text_encoder": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "max_position_embeddings": 77,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
    }


def build_modules(architecture: dict[str, dict], tokenizer):
    """(text encoder, VAE, UNet), randomly initialised on the current default device.

    They are made in this order, which fixes which random numbers each gets (and so the bytes of
    `build_tiny_sd`'s files) for a given seed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **architecture["text_encoder"],
        )
    )
    return text_encoder, AutoencoderKL(**architecture["vae"]), UNet2DConditionModel(**architecture["unet"])


def _sd14_scheduler():
    """PNDM with Stable Diffusion 1.4's settings (its scheduler_config.json)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    """Within: the random state of the CPU, and of `device` if it is a GPU, seeded with `seed`; restored after."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _build(
    out_dir: str | Path,
    architecture: dict[str, dict],
    seed: int,
    info_file: str,
    info: dict,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    tokenizer_files: str | Path | None = None,
) -> Path:
    """Save a random pipeline of `architecture` to `out_dir` (atomically), with `info` in `info_file`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp, _seeded_rng(seed, device):
        vocab_path, merges_path = _tokenizer_files(tokenizer_files, tmp.parent / "bpe")
        tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
        with device:
            text_encoder, vae, unet = (module.to(dtype) for module in build_modules(architecture, tokenizer))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_sd14_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        grant_umask_permissions(tmp)
        write_json(tmp / info_file, info)
    return out_dir


def build_tiny_sd(out_dir: str | Path, resolution: int = 64, seed: int = 0, tokenizer_files: str | Path | None = None) -> Path:
    """Save a tiny SD 1.x-shaped pipeline to `out_dir` (atomically) and return the path.

    `tokenizer_files`: as for `build_sd1`; the checkpoint is the same either way.
    """
    info = {"resolution": resolution, "seed": seed, "note": "random weights"}
    out_dir = _build(out_dir, tiny_architecture(resolution), seed, "tiny_sd.json", info, tokenizer_files=tokenizer_files)
    log.info("built tiny Stable Diffusion (%d px, seed %d) at %s", resolution, seed, out_dir)
    return out_dir


def build_sd1(
    out_dir: str | Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer_files: str | Path | None = None,
) -> Path:
    """Save a randomly initialised full-size SD 1.x pipeline to `out_dir` (atomically) and return the path.

    The weights are initialised on `device` (a GPU does the billion draws in a moment) and saved in
    `dtype`. Keep float32, as the real checkpoints store, unless only img2img loads it: transformers
    loads a text encoder in the dtype it was saved in, and textual inversion trains through it in
    float32. `tokenizer_files` is a folder with CLIP's vocab.json and merges.txt; without it they
    are written from open-clip-torch's BPE file.
    """
    device = torch.device(device)
    info = {"architecture": "sd1", "seed": seed, "dtype": str(dtype).removeprefix("torch."), "note": "random weights"}
    out_dir = _build(out_dir, sd1_architecture(), seed, "random_sd.json", info, device, dtype, tokenizer_files)
    log.info("built random full-size Stable Diffusion 1.x (seed %d, %s) at %s", seed, dtype, out_dir)
    return out_dir


def benchmark_checkpoint(model: str | None, folder: Path, resolution: int, device: str | torch.device, dtype: torch.dtype) -> str:
    """The checkpoint a benchmark runs on: `model` itself (hub id or folder); for None the tiny random
    model at `resolution`, built in `folder`; for RANDOM_SD1 a random full-size SD 1.x built there on
    `device` in `dtype`."""
    if model is None:
        return str(build_tiny_sd(Path(folder) / "tiny-sd", resolution=resolution, seed=0))
    if model == RANDOM_SD1:
        return str(build_sd1(Path(folder) / RANDOM_SD1, device=device, dtype=dtype))
    return model
