"""Build the random full-size SD 1.x that run_on_device.sh's benchmarks load, and check its size.

    python benchmarks/gpu/build_random_sd1.py --out DIR [--device cuda] [--dtype float32] [--tokenizer-files DIR]

Prints a Markdown table: each component's parameters, read back from the saved safetensors files,
against SD 1.x's published counts, and the build's seconds. Exits 1 if a count differs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.tiny_sd import SD1_PARAMETERS, build_sd1


def saved_parameters(folder: Path) -> tuple[int, int]:
    """(parameters, bytes) of the safetensors files in a component's folder, from their headers alone."""
    parameters = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            parameters += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return parameters, sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tokenizer-files", type=Path, default=None, help="folder with CLIP's vocab.json and merges.txt")
    args = parser.parse_args()

    start = time.perf_counter()
    build_sd1(args.out, device=args.device, dtype=getattr(torch, args.dtype), tokenizer_files=args.tokenizer_files)
    seconds = time.perf_counter() - start
    print(f"random SD 1.x built on {args.device} and saved in {args.dtype} to {args.out} in {seconds:.1f} s\n")
    print("| component | parameters | published | on disk (MiB) |\n|---|---:|---:|---:|")
    wrong = []
    for component, published in SD1_PARAMETERS.items():
        parameters, size = saved_parameters(args.out / component)
        print(f"| {component} | {parameters:,} | {published:,} | {size / 2**20:.0f} |")
        if parameters != published:
            wrong.append(component)
    if wrong:
        print(f"\nbuild_random_sd1: expected the published parameter counts, got others for {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
