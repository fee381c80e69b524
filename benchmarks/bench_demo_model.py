"""What the demo model (models/demo-sd) has learned, measured with the oracle (models/oracle).

    snakemake --cores all                         # the embedded default run, whose outputs this reads
    python benchmarks/bench_demo_model.py [--samples 16] [--steps 10 20 50] [--sections real strengths ...]

Prints Markdown tables for BENCHMARKS.md ("The demo model"):
  * the VAE round trip on the demo's held-out val/test scenes (PSNR), and the oracle on the real
    test images;
  * per SDEdit strength t0, over the default run's DA-Fusion shards: oracle agreement with the
    source's class beside its agreement on the same unedited sources, mean absolute pixel
    difference to the source (both pooled over the subsets' images), FID and KID against the real
    training images (averaged over the subsets), from the workflow's oracle_scores and fid outputs;
  * SDEdit at a fixed t0 = 0.25 on every k = 4 subset, with the learned token or "a photo", with
    and without classifier-free guidance;
  * text-to-image samples of every learned token of the k = 4 subsets ("a photo of a <token>"),
    the share the oracle assigns to the token's class, for the classes the model can name and for
    those it cannot, beside the class-name prompt and the generic "a photo of a digit";
  * the same shares per prompt form (with a colour word, as every pretraining caption has one) and
    guidance scale: whether the prompt or the model is what keeps text-to-image near chance;
  * quality per UNet call: FID/KID of DA-Fusion images of one k = 4 subset at each scheduler and
    step count (generate.scheduler x num_inference_steps), and the cheapest within 5% of the best;
  * the Classification Accuracy Score (train.methods `<source>+synthetic-only`) beside accuracy.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import layout
from pipeline.config import load_config
from pipeline.demo import CLASS_NAMES
from pipeline.io import open_image, read_json
from pipeline.manifest import read_manifest
from pipeline.oracle import load_oracle, predict
from pipeline.records import OracleScores


def vae_psnr(model_dir: str, images: list[Image.Image], batch_size: int = 32) -> float:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    errors = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1) for im in images[i : i + batch_size]]).float() / 255
        with torch.no_grad():
            out = (vae.decode(vae.encode(pixels * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
        errors.append(((out - pixels) ** 2).mean(dim=(1, 2, 3)).numpy())
    mse = float(np.concatenate(errors).mean())
    return 10 * np.log10(1 / mse)


def strength_rows(results: str, config: dict) -> list[str]:
    from pipeline.report import pool_oracle_scores

    oracle = pool_oracle_scores([OracleScores.read(layout.oracle_scores(results, "dafusion", k, seed), "dafusion", k, seed) for k, seed in layout.subsets_in(config)])
    fid: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for k, seed in layout.subsets_in(config):
        for t0, v in read_json(layout.fid(results, "dafusion", k, seed))["by_strength"].items():
            if v["fid"] is not None:
                fid[t0]["fid"].append(v["fid"])
                fid[t0]["kid"].append(v["kid"])
    rows = ["| t0 | images | oracle agreement | on their sources, unedited | ratio | mean abs. pixel difference | FID | KID |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t0 in sorted(oracle, key=float):
        o, ratio = oracle[t0], oracle[t0]["agreement"] / oracle[t0]["source_agreement"]
        rows.append(f"| {t0} | {o['n']} | {100 * o['agreement']:.1f}% | {100 * o['source_agreement']:.1f}% | {100 * ratio:.0f}% | {o['mean_abs_difference']:.3f} | {np.mean(fid[t0]['fid']):.1f} | {np.mean(fid[t0]['kid']):.4f} |")
    return rows


def token_sample_rows(results: str, config: dict, oracle, samples: int, named: list[str]) -> list[str]:
    """Text-to-image samples per class of each k=4 subset's tokens, classified by the oracle."""
    from pipeline import sdedit
    from pipeline.tokens import add_tokens_to_pipeline

    from diffusers import StableDiffusionPipeline

    def fresh_pipeline():
        """A text-to-image pipeline of the run's model (tokens are added to a fresh one per subset)."""
        img2img = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32)
        pipe = StableDiffusionPipeline(**img2img.components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    k = max(config["dataset"]["examples_per_class"])
    shares: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    resolution = config["model"]["resolution"]

    def share_of(prompt: str, label: int, seed: int) -> float:
        images = pipe(prompt=[prompt] * samples, height=resolution, width=resolution, num_inference_steps=20, guidance_scale=7.5,
                         generator=[torch.Generator().manual_seed(seed * 1000 + i) for i in range(samples)]).images
        return float(np.mean(predict(oracle, images) == label))

    for trial_seed in config["dataset"]["trial_seeds"]:
        pipe = fresh_pipeline()
        class_tokens = add_tokens_to_pipeline(pipe, layout.tokens(results, k, trial_seed), list(CLASS_NAMES))
        for label, name in enumerate(CLASS_NAMES):
            shares[name]["token"].append(share_of(f"a photo of a {class_tokens[name]}", label, trial_seed))
            if trial_seed == config["dataset"]["trial_seeds"][0]:
                shares[name]["name"].append(share_of(f"a photo of a {name}", label, 99))
                shares[name]["digit"].append(share_of("a photo of a digit", label, 98))
    rows = ["| class | named in captions | token (k=4) | class-name prompt | \"a photo of a digit\" |", "|---|---|---:|---:|---:|"]
    for name in CLASS_NAMES:
        v = shares[name]
        rows.append(f"| {name} | {'yes' if name in named else 'no'} | {100 * np.mean(v['token']):.0f}% | {100 * np.mean(v['name']):.0f}% | {100 * np.mean(v['digit']):.0f}% |")
    for group, members in (("named", [n for n in CLASS_NAMES if n in named]), ("unnamed", [n for n in CLASS_NAMES if n not in named])):
        mean = lambda key: 100 * np.mean([np.mean(shares[n][key]) for n in members])
        rows.append(f"| **{group} (mean)** | | **{mean('token'):.0f}%** | {mean('name'):.0f}% | {mean('digit'):.0f}% |")
    return rows


def prompt_form_rows(results: str, config: dict, oracle, samples: int, named: list[str]) -> list[str]:
    """Whether a prompt closer to the captions (a colour word) or another guidance scale makes the
    model draw the class: oracle share of text-to-image samples of the class name and of the first
    k=4 subset's token, with and without "red", at guidance 3, 7.5 and 12 (DPM-Solver++, 20 steps)."""
    from diffusers import StableDiffusionPipeline

    from pipeline import sdedit
    from pipeline.tokens import add_tokens_to_pipeline

    k, trial_seed = max(config["dataset"]["examples_per_class"]), config["dataset"]["trial_seeds"][0]
    img2img = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, scheduler="dpm-solver++")
    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.set_progress_bar_config(disable=True)
    class_tokens = add_tokens_to_pipeline(pipe, layout.tokens(results, k, trial_seed), list(CLASS_NAMES))
    resolution = config["model"]["resolution"]
    forms = {"class name": "a photo of a {name}", "red class name": "a photo of a red {name}",
             "token": "a photo of a {token}", "red token": "a photo of a red {token}"}
    rows = ["| guidance | " + " | ".join(f"{form}: named / unnamed" for form in forms) + " |", "|---:|" + "---:|" * len(forms)]
    for guidance in (3.0, 7.5, 12.0):
        cells = []
        for template in forms.values():
            shares = {}
            for label, name in enumerate(CLASS_NAMES):
                prompt = template.format(name=name, token=class_tokens[name])
                images = pipe(prompt=[prompt] * samples, height=resolution, width=resolution, num_inference_steps=20, guidance_scale=guidance,
                              generator=[torch.Generator().manual_seed(7000 + i) for i in range(samples)]).images
                shares[name] = float(np.mean(predict(oracle, images) == label))
            named_share = np.mean([v for n, v in shares.items() if n in named])
            unnamed_share = np.mean([v for n, v in shares.items() if n not in named])
            cells.append(f"{100 * named_share:.0f}% / {100 * unnamed_share:.0f}%")
        rows.append(f"| {guidance} | " + " | ".join(cells) + " |")
    return rows


def scheduler_rows(results: str, config: dict, steps_list: list[int]) -> list[str]:
    """FID/KID of DA-Fusion on the first k=4 subset per scheduler and step count, all else equal."""
    from pipeline.fid import compute_fid
    from pipeline.generate import generate_shard

    k, seed = max(config["dataset"]["examples_per_class"]), config["dataset"]["trial_seeds"][0]
    subset, tokens = layout.subset(results, k, seed), layout.tokens(results, k, seed)
    real, reference = layout.real_features(results, "train"), layout.real_features(results, "val")
    measured = []
    with tempfile.TemporaryDirectory() as scratch:
        for scheduler in ("default", "dpm-solver++", "ddim"):
            for steps in steps_list:
                run = copy.deepcopy(config)
                run["generate"].update(scheduler=scheduler, num_inference_steps=steps)
                shard = Path(scratch) / f"{scheduler}-{steps}.parquet"
                start = time.perf_counter()
                generate_shard(run, subset, tokens, "dafusion", 0, 1, shard)
                seconds = time.perf_counter() - start
                fid = compute_fid(run, real, [shard], Path(scratch) / f"{scheduler}-{steps}.json", real_reference_path=reference)
                measured.append((scheduler, steps, fid["fid"], fid["kid"], fid["n_synthetic"], seconds))
    best = min(m[2] for m in measured)
    cheapest = min((m for m in measured if m[2] <= 1.05 * best), key=lambda m: (m[1], m[5]))
    rows = ["| scheduler | steps | FID | KID | images | generation s |", "|---|---:|---:|---:|---:|---:|"]
    for scheduler, steps, fid, kid, n, seconds in measured:
        mark = " **(recommended)**" if (scheduler, steps) == cheapest[:2] else ""
        rows.append(f"| {scheduler}{mark} | {steps} | {fid:.1f} | {kid:.4f} | {n} | {seconds:.0f} |")
    rows.append(f"\nBest FID {best:.1f}; cheapest within 5%: {cheapest[0]} at {cheapest[1]} steps.")
    return rows


def fixed_t0_rows(results: str, config: dict, t0: float = 0.25) -> list[str]:
    """Oracle agreement of SDEdit at one fixed t0 on every k = 4 subset, per prompt and guidance:
    more images per cell than the default run's drawn strengths give, and whether the learned
    token or classifier-free guidance is what moves the digits."""
    from pipeline.generate import generate_shard
    from pipeline.oracle import score_shards

    k = max(config["dataset"]["examples_per_class"])
    rows = [f"| method (t0 = {t0}) | guidance | images | oracle agreement | on their sources, unedited | ratio | pixel difference |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as scratch:
        for method, guidance in (("dafusion", 7.5), ("dafusion", 1.0), ("class-agnostic", 7.5), ("class-agnostic", 1.0)):
            run = copy.deepcopy(config)
            run["generate"].update(strength=t0, guidance_scale=guidance)
            shards = []
            for seed in config["dataset"]["trial_seeds"]:
                shards.append(Path(scratch) / f"{method}-{guidance}-{seed}.parquet")
                generate_shard(run, layout.subset(results, k, seed), layout.tokens(results, k, seed), method, 0, 1, shards[-1])
            scores = score_shards(config["fid"]["oracle"], shards, layout.manifest(results), Path(scratch) / "oracle.json")["by_strength"][f"{t0:.4g}"]
            ratio = scores["agreement"] / scores["source_agreement"]
            rows.append(f"| {method} | {guidance} | {scores['n']} | {100 * scores['agreement']:.1f}% | {100 * scores['source_agreement']:.1f}% | {100 * ratio:.0f}% | {scores['mean_abs_difference']:.3f} |")
    return rows


def cas_rows(results: str, config: dict) -> list[str]:
    by_method: dict[str, list[float]] = defaultdict(list)
    for method in config["train"]["methods"]:
        for k, seed in layout.subsets_in(config):
            by_method[(method, k)].append(read_json(layout.metrics(results, method, k, seed))["accuracy"])
    rows = ["| method | k | test accuracy (mean over trials) |", "|---|---:|---:|"]
    for (method, k), values in sorted(by_method.items(), key=lambda item: (item[0][1], item[0][0])):
        rows.append(f"| {method} | {k} | {100 * np.mean(values):.1f}% |")
    return rows


SECTIONS = ["real", "strengths", "fixed-t0", "tokens", "prompt-forms", "cas", "schedulers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--samples", type=int, default=16, help="text-to-image samples per class and prompt")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50], help="step counts of the scheduler study")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="which tables to print (the scheduler study alone takes about 20 min on 2 cores)")
    args = parser.parse_args()
    wanted = set(args.sections)
    config = load_config(args.config)
    results = config["results"]
    print(f"# bench_demo_model: {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    if "real" in wanted:
        rows, _ = read_manifest(layout.manifest(results))
        held_out = [r for r in rows if r["split"] in ("val", "test")]
        test = [r for r in rows if r["split"] == "test"]
        oracle = load_oracle(config["fid"]["oracle"])
        real_agreement = float(np.mean(predict(oracle, [open_image(r["path"]) for r in test]) == np.array([r["label"] for r in test])))
        print(f"VAE round trip on {len(held_out)} held-out demo scenes: PSNR {vae_psnr(config['model']['id'], [open_image(r['path']) for r in held_out]):.2f} dB")
        print(f"Oracle on the {len(test)} real test scenes: {100 * real_agreement:.1f}% agreement with the label\n")
    if "strengths" in wanted:
        print("\n".join(strength_rows(results, config)) + "\n")
    if "fixed-t0" in wanted:
        print("\n".join(fixed_t0_rows(results, config)) + "\n")
    if "tokens" in wanted:
        named = read_json(Path(config["model"]["id"]) / "demo_model.json")["named_classes"]
        print("\n".join(token_sample_rows(results, config, load_oracle(config["fid"]["oracle"]), args.samples, named)) + "\n")
    if "prompt-forms" in wanted:
        named = read_json(Path(config["model"]["id"]) / "demo_model.json")["named_classes"]
        print("\n".join(prompt_form_rows(results, config, load_oracle(config["fid"]["oracle"]), args.samples, named)) + "\n")
    if "cas" in wanted:
        print("\n".join(cas_rows(results, config)) + "\n")
    if "schedulers" in wanted:
        print("\n".join(scheduler_rows(results, config, args.steps)) + "\n")

if __name__ == "__main__":
    main()
