"""Build a tiny, randomly initialised Stable Diffusion checkpoint in diffusers format.

It has the architecture of SD 1.x (CLIP text encoder with the real 49,408-token BPE vocabulary,
AutoencoderKL, UNet2DConditionModel with cross-attention, PNDM scheduler with SD 1.4's settings)
at a size a 2-core CPU runs in seconds. Every stage loads it with `from_pretrained(path)` exactly as
it loads `CompVis/stable-diffusion-v1-4`, so the offline tests and the embedded default exercise the
real loading and sampling code. Its images are noise: it tests machinery, not image quality.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import torch

from pipeline.io import atomic_path, write_json

log = logging.getLogger(__name__)

# CLIP's BPE vocabulary: 256 byte symbols, the same with an end-of-word marker, 48,894 merges, 2 specials.
NUM_MERGES = 49152 - 256 - 2


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
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_tiny_sd(out_dir: str | Path, resolution: int = 64, seed: int = 0) -> Path:
    """Save a tiny SD 1.x-shaped pipeline to `out_dir` (atomically) and return the path."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocab_path, merges_path = write_clip_tokenizer_files(tmp.parent / "bpe")
        tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=resolution,
        )
        unet = UNet2DConditionModel(
            sample_size=resolution // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        # Stable Diffusion 1.4's scheduler settings.
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            skip_prk_steps=True,
            steps_offset=1,
            set_alpha_to_one=False,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        write_json(tmp / "tiny_sd.json", {"resolution": resolution, "seed": seed, "note": "random weights"})
    log.info("built tiny Stable Diffusion (%d px, seed %d) at %s", resolution, seed, out_dir)
    return out_dir
