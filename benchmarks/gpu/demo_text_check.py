"""Does a demo model draw digits from text? The oracle's share of text-to-image samples per class.

    python benchmarks/gpu/demo_text_check.py --model models/demo-sd [--device cuda] [--samples 16]

For each class, `--samples` images of "a photo of a {class}" and "a photo of a red {class}" (every
pretraining caption names a colour), DPM-Solver++ at 20 steps, guidance 7.5, the same seeds for every
model, scored by the oracle (models/oracle). Chance is 10%. The classes the captions name show
whether the UNet binds a word to a digit shape; the unnamed ones are the control (their names never
occur in a caption, so they should stay at chance until textual inversion gives them a word). This
is the quick read of issue 14's open target; the full one (tokens learned on the k = 4 subsets) is
`benchmarks/bench_demo_model.py --sections tokens` after a run of the workflow.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.demo import CLASS_NAMES
from pipeline.oracle import load_oracle, predict

PROMPTS = {"class name": "a photo of a {name}", "red + class name": "a photo of a red {name}"}


def load_pipeline(model: str, device: torch.device):
    """The text-to-image pipeline of `model` (its hashes checked), with DPM-Solver++."""
    from diffusers import StableDiffusionPipeline

    from pipeline import sdedit

    img2img = sdedit.load_img2img(model, device, torch.float32, scheduler="dpm-solver++")
    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_shares(pipe, samples: int, oracle) -> dict[str, dict[str, float]]:
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    shares: dict[str, dict[str, float]] = {form: {} for form in PROMPTS}
    for form, template in PROMPTS.items():
        for label, name in enumerate(CLASS_NAMES):
            generators = [torch.Generator().manual_seed(5000 + i) for i in range(samples)]
            images = pipe(prompt=[template.format(name=name)] * samples, height=resolution, width=resolution,
                          num_inference_steps=20, guidance_scale=7.5, generator=generators).images
            shares[form][name] = float(np.mean(predict(oracle, images) == label))
    return shares


def markdown(shares: dict[str, dict[str, float]], named: list[str]) -> list[str]:
    rows = ["| class | named in the captions | " + " | ".join(PROMPTS) + " |", "|---|---|" + "---:|" * len(PROMPTS)]
    for name in CLASS_NAMES:
        rows.append(f"| {name} | {'yes' if name in named else 'no'} | " + " | ".join(f"{100 * shares[f][name]:.0f}%" for f in PROMPTS) + " |")
    for group, members in (("named", [n for n in CLASS_NAMES if n in named]), ("unnamed", [n for n in CLASS_NAMES if n not in named])):
        rows.append(f"| **{group} (mean)** | | " + " | ".join(f"**{100 * np.mean([shares[f][n] for n in members]):.0f}%**" for f in PROMPTS) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a demo model folder (diffusers format, with demo_model.json)")
    parser.add_argument("--oracle", default=str(Path(__file__).resolve().parents[2] / "models" / "oracle"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="images per class and prompt")
    args = parser.parse_args()

    named = json.loads((Path(args.model) / "demo_model.json").read_text())["named_classes"]
    start = time.perf_counter()
    shares = class_shares(load_pipeline(args.model, torch.device(args.device)), args.samples, load_oracle(args.oracle))
    print(f"Oracle share of {args.samples} text-to-image samples per class and prompt, {args.model}, "
          f"DPM-Solver++ 20 steps, guidance 7.5, on {args.device} ({time.perf_counter() - start:.0f} s). Chance is 10%.\n")
    print("\n".join(markdown(shares, named)))


if __name__ == "__main__":
    main()
