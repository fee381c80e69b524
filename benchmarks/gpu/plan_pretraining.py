"""How many UNet steps the demo model's pretraining gets in what is left of a device call.

    python benchmarks/gpu/plan_pretraining.py --calibration DIR --config C --left S [--set KEY=VALUE ...]

Reads the seconds a short calibration run (pretrain_demo_on_device.sh) recorded per VAE and UNet step,
and prints one line: `unet_step_s vae_step_s steps`. The VAE phase of the real run (its step count from
the config) and `--reserve` seconds (corpus, saving, the text-to-image check) come off first; the rest
buys UNet steps, rounded down to `--round` and capped at `--max`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.sweeps import parse_overrides, with_overrides


def affordable_steps(left_s: float, reserve_s: float, unet_step_s: float, vae_step_s: float, vae_steps: int, round_to: int, most: int) -> int:
    """UNet steps that fit in `left_s` after the VAE phase and the reserve: a multiple of `round_to`,
    at least `round_to` (a run too short to learn anything still says what a step costs), at most `most`."""
    spare = left_s - reserve_s - vae_step_s * vae_steps
    return int(max(round_to, min(most, spare / unet_step_s // round_to * round_to)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=Path, required=True, help="the calibration run's model folder (its demo_model.json)")
    parser.add_argument("--config", required=True, help="the real run's config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="the real run's overrides")
    parser.add_argument("--left", type=float, required=True, help="seconds of the budget left")
    parser.add_argument("--reserve", type=float, default=90.0)
    parser.add_argument("--round", type=int, default=1000)
    parser.add_argument("--max", type=int, default=60000)
    args = parser.parse_args()

    info = json.loads((args.calibration / "demo_model.json").read_text())
    calibration = info["settings"]
    unet_step_s = info["train_seconds"]["unet"] / calibration["unet_steps"]
    vae_step_s = info["train_seconds"]["vae"] / calibration["vae_steps"]
    vae_steps = with_overrides(load_config(args.config), parse_overrides(args.overrides))["demo_model"]["vae"]["steps"]
    steps = affordable_steps(args.left, args.reserve, unet_step_s, vae_step_s, vae_steps, args.round, args.max)
    print(f"{unet_step_s:.4f} {vae_step_s:.4f} {steps}")


if __name__ == "__main__":
    main()
