"""Estimated peak GPU memory of batched SDEdit with full-size SD 1.x, per batch size, without a GPU.

The modules are built as fake tensors on a fake CUDA device (`FakeTensorMode`: shapes, dtypes and
devices, no storage, no arithmetic), and PyTorch's `MemTracker` follows every tensor's lifetime
through what `batch_size: auto` probes on a real GPU (`sdedit._probe_step`): one UNet call on the
batch's rows (twice the images under classifier-free guidance) and one image's VAE decode. Its
peak, plus the weights, is the estimate.

Scaled dot-product attention is counted as the flash kernel allocates on an H100 or H200 in half
precision (its output and a float32 log-sum-exp per query; the UNet's head sizes 40, 80 and 160 are
all within flash's limit), since on a fake device PyTorch would take its math path and count every
4096 x 4096 attention matrix. The VAE's one 512-wide head is beyond flash's limit of 256, but one
image's attention matrix at 512 px is 32 MiB in half precision, whichever kernel runs it. Not counted: cuDNN and cuBLAS workspaces and the caching allocator's
rounding and fragmentation. So this is a floor for `torch.cuda.max_memory_allocated`; the measured
figures come from `benchmarks/bench_generate_memory.py` on a GPU.

    python benchmarks/estimate_generate_memory.py [--resolution 512] [--dtype float16] [--batch-sizes 1 2 4 ...]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from pipeline.generate import AUTO_BATCH_LIMIT
from pipeline.tiny_sd import build_modules, sd1_architecture, write_clip_tokenizer_files

GIB = 1024**3
# Memory of the cards the GPU target names (as nvidia-smi reports it), and the share of it
# `sdedit.fits_in_memory` allows.
CARDS = {"H100 80GB": 81559 * 2**20, "H200": 143771 * 2**20}
BUDGET = 0.9


def flash_attention_allocations(query, key, value, *args, **kwargs):
    """Stand-in for F.scaled_dot_product_attention that allocates what the flash kernel does."""
    torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)  # log-sum-exp, freed at once
    return torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)


@contextlib.contextmanager
def attention_counted_as_flash():
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_attention_allocations
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def peak_bytes(track, run) -> tuple[int, int]:
    """(weights, peak total) in bytes on the fake GPU while `run()` runs, with `track`'s modules counted as weights."""
    tracker = MemTracker()
    tracker.track_external(*track)
    with tracker, torch.no_grad():  # no_grad, not inference_mode: MemTracker does not see inference tensors
        run()
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cuda", 0)]
    weights = sum(size for kind, size in snapshot.items() if kind != "Total" and kind.name == "PARAM")
    return weights, snapshot["Total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = parser.parse_args()

    from transformers import CLIPTokenizer

    with TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(*map(str, write_clip_tokenizer_files(Path(tmp))), model_max_length=77)
    dtype = getattr(torch, args.dtype)
    guided = args.guidance_scale > 1
    torch.set_default_dtype(dtype)
    with FakeTensorMode(), torch.device("cuda"), attention_counted_as_flash():
        text_encoder, vae, unet = (module.eval() for module in build_modules(sd1_architecture(), tokenizer))
        side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)

        def probe(images: int):
            rows = 2 * images if guided else images
            latents = torch.zeros(rows, unet.config.in_channels, side, side)
            text = torch.zeros(rows, tokenizer.model_max_length, unet.config.cross_attention_dim)
            timestep = torch.full((1,), 999.0)  # a tensor: the UNet would build one from a Python number on the real device
            return lambda: (unet(latents, timestep, encoder_hidden_states=text), vae.decode(latents[:1]))

        print(f"SD 1.x (UNet {sum(p.numel() for p in unet.parameters()):,} parameters), {args.resolution} px, "
              f"{args.dtype}, guidance {'on' if guided else 'off'}: estimated peak GPU memory of one denoising "
              "step of the batch and one image's decode")  # fmt: skip
        print("\n| batch size | UNet rows | weights (GiB) | estimated peak (GiB) |\n|---:|---:|---:|---:|")
        peaks = {}
        for images in args.batch_sizes:
            weights, peak = peak_bytes((text_encoder, vae, unet), probe(images))
            peaks[images] = peak
            print(f"| {images} | {2 * images if guided else images} | {weights / GIB:.2f} | {peak / GIB:.2f} |")
    print()
    for card, memory in CARDS.items():
        fitting = [b for b, peak in peaks.items() if peak <= BUDGET * memory and b <= AUTO_BATCH_LIMIT]
        print(f"{card}: batch_size auto would pick {max(fitting) if fitting else 'none'} "
              f"(largest listed size within {BUDGET:.0%} of {memory / GIB:.0f} GiB, at most {AUTO_BATCH_LIMIT})")  # fmt: skip


if __name__ == "__main__":
    main()
