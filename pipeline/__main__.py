"""Command line: each workflow stage as a subcommand, taking the same config file as the workflow.

    python -m pipeline <stage> --config config.yaml ...   (see `python -m pipeline <stage> --help`)

The Snakemake rules call exactly these subcommands, so a stage run by hand behaves as in the workflow.
Bad input ends with one line `error: ...` and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import PipelineError, __version__
from pipeline.config import load_config
from pipeline.progress import setup_logging
from pipeline.sweeps import parse_overrides, with_overrides

log = logging.getLogger("pipeline")


def cmd_build_model(args, config):
    from pipeline.settings.prepare import TinyModelSettings
    from pipeline.tiny_sd import build_tiny_sd

    settings = TinyModelSettings.from_config(config)
    build_tiny_sd(args.out, resolution=settings.resolution, seed=settings.seed)


def cmd_pretrain_demo_model(args, config):
    from pipeline.demo_model import PretrainSettings, pretrain_demo_model

    pretrain_demo_model(PretrainSettings.from_config(config), args.out, tokenizer_files=args.tokenizer_files)


def cmd_train_oracle(args, config):
    from pipeline.oracle import OracleSettings, train_oracle

    section = config["demo_model"]["oracle"]
    settings = OracleSettings(config["seed"], section["corpus_images"], section["steps"], section["batch_size"], section["learning_rate"], config["dataset"]["demo"]["max_objects"])
    train_oracle(settings, args.out)


def cmd_build_demo(args, config):
    from pipeline.demo import build_demo_coco
    from pipeline.settings.prepare import DemoDatasetSettings

    settings = DemoDatasetSettings.from_config(config)
    build_demo_coco(args.out, settings.demo, settings.seed, model_id=settings.model_id)


def cmd_download(args, config):
    from pipeline.download import download_dataset

    dataset = config["dataset"]
    download_dataset(dataset["name"], args.root or dataset["root"], timeout=args.timeout)


def cmd_prepare(args, config):
    from pipeline.prepare import prepare_dataset

    prepare_dataset(config, args.out, threads=args.threads)


def cmd_fewshot(args, config):
    from pipeline.fewshot import draw_subset
    from pipeline.settings.prepare import FewshotSettings

    settings = FewshotSettings.from_config(config)
    draw_subset(args.manifest, args.examples_per_class, args.trial_seed, settings.seed, settings.allow_fewer, args.out)


def cmd_invert(args, config):
    from pipeline.invert import invert_tokens

    invert_tokens(config, args.subset, args.out, class_names=args.class_names)


def cmd_dreambooth(args, config):
    from pipeline.dreambooth import train_dreambooth

    train_dreambooth(config, args.subset, args.out)


def cmd_erase(args, config):
    from pipeline.erase import erase_classes

    erase_classes(config, args.classes, args.out)


def cmd_caption(args, config):
    from pipeline.captions import caption_subset

    caption_subset(config, args.subset, args.out)


def cmd_mvc(args, config):
    from pipeline.mvc import train_mvc

    train_mvc(config, args.subset, args.captions, args.out, erased_dir=args.erased)


def cmd_merge_tokens(args, config):
    from pipeline.invert import merge_tokens

    merge_tokens(args.tokens, args.out)


def cmd_token_samples(args, config):
    from pipeline.token_samples import render_token_samples

    render_token_samples(config, args.tokens, args.out)


def cmd_mix_samples(args, config):
    from pipeline.mix_samples import render_mix_samples

    render_mix_samples(config, args.model, args.subset, args.captions, args.out)


def cmd_generate(args, config):
    from pipeline.generate import generate_shard

    generate_shard(config, args.subset, args.tokens, args.method, args.shard, args.num_shards, args.out,
                   adapter_dir=args.adapter, erased_dir=args.erased, captions_path=args.captions)


def cmd_export(args, config):
    from pipeline.export import export_images

    export_images(args.synthetic, args.out)


def cmd_fid_features(args, config):
    from pipeline.fid import real_features

    real_features(config, args.manifest, args.out, split=args.split)


def cmd_fid(args, config):
    from pipeline.fid import compute_fid

    compute_fid(config, args.real, args.synthetic, args.out, real_reference_path=args.reference)


def cmd_oracle_scores(args, config):
    from pipeline.oracle import score_shards
    from pipeline.settings.fid import OracleScoreSettings

    settings = OracleScoreSettings.from_config(config)
    if not settings.oracle:
        raise PipelineError("oracle-scores: fid.oracle is not set. Expected the oracle folder, e.g. models/oracle")
    score_shards(settings.oracle, args.synthetic, args.manifest, args.out)


def cmd_train(args, config):
    from pipeline.train import train_classifier

    train_classifier(config, args.subset, args.manifest, args.synthetic, args.method, args.seed, args.out, overrides=parse_overrides(args.overrides))


def cmd_zeroshot(args, config):
    from pipeline.zeroshot import zero_shot_accuracy

    zero_shot_accuracy(config, args.manifest, args.out)


def cmd_report(args, config):
    from pipeline.report import build_report

    build_report(config, args.out)


def cmd_compare(args, config):
    from pipeline.compare import compare_runs

    compare_runs(args.results, args.out, across_datasets=args.across_datasets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, required=True, help="YAML config (validated; defaults filled in)")
        p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override one config key, e.g. generate.strength=0.5 (repeatable; how the workflow runs a sweep's variant)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.set_defaults(func=func)
        return p

    p = stage("build-model", cmd_build_model, "Build the tiny random Stable Diffusion checkpoint (offline demo and tests).")
    p.add_argument("--out", type=Path, required=True, help="folder to write the diffusers-format checkpoint to")

    p = stage("pretrain-demo-model", cmd_pretrain_demo_model, "Train the demo's small text-to-image model on captioned digit scenes (resumable).")
    p.add_argument("--out", type=Path, required=True, help="folder to write the diffusers-format checkpoint to")
    p.add_argument("--tokenizer-files", type=Path, default=None, help="folder with CLIP's vocab.json and merges.txt (default: written from open-clip-torch)")

    p = stage("train-oracle", cmd_train_oracle, "Train the oracle: the independent demo-domain classifier that measures synthetic images.")
    p.add_argument("--out", type=Path, required=True, help="folder to write oracle.safetensors and oracle.json to")

    p = stage("build-demo", cmd_build_demo, "Write the embedded demo dataset (MNIST scenes) in COCO format.")
    p.add_argument("--out", type=Path, required=True, help="dataset root to create")

    p = stage("download", cmd_download, "Fetch the configured dataset (voc, coco, caltech101, flowers102) into its root, verified.")
    p.add_argument("--root", type=Path, default=None, help="folder to download into (default: dataset.root)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on the network before trying a mirror")

    p = stage("prepare", cmd_prepare, "Turn the configured dataset into manifest.parquet, classes.json, stats.json and masks/.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1, help="worker processes for mask decoding")

    p = stage("fewshot", cmd_fewshot, "Draw a nested few-shot training subset (k images per class) from a manifest.")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--examples-per-class", type=int, required=True)
    p.add_argument("--trial-seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="subset .parquet to write")

    p = stage("invert", cmd_invert, "Textual inversion: learn one token per class on a few-shot subset.")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="tokens folder (learned_embeds.safetensors, tokens.json)")
    p.add_argument("--class", dest="class_names", action="append", help="only this class (repeatable)")

    p = stage("dreambooth", cmd_dreambooth, "DreamBooth-LoRA: adapt the model to a few-shot subset, every class under its own prompt.")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="adapter folder (pytorch_lora_weights.safetensors, adapter.json)")

    p = stage("erase", cmd_erase, "ESD-x: erase the task's class names from the UNet (model-centric leakage prevention).")
    p.add_argument("--classes", type=Path, required=True, help="classes.json of prepare (the task's class names)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (unet_erased.safetensors, erase.json)")

    p = stage("caption", cmd_caption, "Caption every training image of a few-shot subset (caption.captioner), for MVC.")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="captions .parquet to write (image_id, class_name, caption)")

    p = stage("mvc", cmd_mvc, "MVC: fine-tune the image-conditioned model on a subset's captioned images.")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--captions", type=Path, required=True, help="the caption stage's file of the subset")
    p.add_argument("--erased", type=Path, default=None, help="erased model folder (the erase stage; with erase.enabled)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (a diffusers checkpoint plus mvc.json)")

    p = stage("merge-tokens", cmd_merge_tokens, "Combine tokens folders (one per class in invert.mode per_class) into one.")
    p.add_argument("--tokens", type=Path, nargs="+", required=True, help="tokens folders, in class order")
    p.add_argument("--out", type=Path, required=True, help="tokens folder to write")

    p = stage("token-samples", cmd_token_samples, "Render a few text-to-image samples of every learned token into a grid.")
    p.add_argument("--tokens", type=Path, required=True, help="tokens folder (invert or merge-tokens)")
    p.add_argument("--out", type=Path, required=True, help="grid .png to write (its legend goes beside it as .json)")

    p = stage("mix-samples", cmd_mix_samples, "Draw an mvc model's images unmixed, fine-mixed and coarse-mixed from the same noise, into a grid.")
    p.add_argument("--model", type=Path, required=True, help="the mvc stage's model folder of the subset")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--captions", type=Path, required=True, help="the caption stage's file of the subset")
    p.add_argument("--out", type=Path, required=True, help="grid .png to write (its legend goes beside it as .json)")

    p = stage("generate", cmd_generate, "SDEdit synthetic images for one shard of a subset into a Parquet shard.")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--tokens", type=Path, default=None, help="tokens folder (methods that use learned tokens)")
    p.add_argument("--adapter", type=Path, default=None, help="adapter folder (methods with an adapted model: dreambooth, mvc)")
    p.add_argument("--captions", type=Path, default=None, help="caption file (methods that mix captions: mvc, mvc-pretrained)")
    p.add_argument("--erased", type=Path, default=None, help="erased model folder (the erase stage; with erase.enabled)")
    p.add_argument("--method", required=True, help="a generate.methods entry, e.g. dafusion, real-guidance, txt2img")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="shard .parquet to write")

    p = stage("export", cmd_export, "Write synthetic shards as plain <class>/<synthetic_id>.png folders with an images.csv index.")
    p.add_argument("--synthetic", type=Path, nargs="+", required=True, help="synthetic shard .parquet files")
    p.add_argument("--out", type=Path, required=True, help="folder to write (e.g. <export_dir>/<method>/<subset>)")

    p = stage("fid-features", cmd_fid_features, "Inception features of a manifest's real images (computed once, reused).")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--out", type=Path, required=True, help=".npz to write")

    p = stage("fid", cmd_fid, "FID and KID of synthetic shards against real features, overall and per class.")
    p.add_argument("--real", type=Path, required=True, help="real features .npz (fid-features)")
    p.add_argument("--reference", type=Path, default=None, help="second real features .npz: real-vs-real floor")
    p.add_argument("--synthetic", type=Path, nargs="+", required=True, help="synthetic shard .parquet files")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")

    p = stage("oracle-scores", cmd_oracle_scores, "Oracle agreement and pixel distance of synthetic shards, per t0 (demo dataset).")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--synthetic", type=Path, nargs="+", required=True, help="synthetic shard .parquet files")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")

    p = stage("train", cmd_train, "Train and evaluate a classifier for one method on one few-shot subset.")
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True, help="full manifest (val for selection, test for the score)")
    p.add_argument("--synthetic", type=Path, nargs="*", default=[], help="synthetic shards of the method's synthetic part")
    p.add_argument("--method", required=True, help="e.g. baseline, dafusion, randaugment, dafusion+mixup")
    p.add_argument("--seed", type=int, required=True, help="trial seed")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")

    p = stage("zeroshot", cmd_zeroshot, "Zero-shot CLIP (zeroshot.model) on the manifest's test split: the reference row with no training image.")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON to write")

    p = stage("report", cmd_report, "Gather the results the config asks for (under its `results` folder) into summary.csv and an HTML page.")
    p.add_argument("--out", type=Path, required=True, help="report folder")

    # Reads only what reports wrote: no config.
    help_text = "Compare the reports of several results folders: sweeps, accuracy averaged over k, normalised score, per class."
    p = sub.add_parser("compare", help=help_text, description=help_text)
    p.add_argument("results", type=Path, nargs="+", help="results folders (or their report/ folders)")
    p.add_argument("--out", type=Path, required=True, help="folder to write index.html and scores.csv to")
    p.add_argument("--across-datasets", action="store_true", help="runs of different datasets: score each method by DA-Fusion's normalised score")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_compare, config=None, overrides=None)
    return parser


# Stages whose outputs are data that later stages consume byte for byte: they compute on the config's
# `cpu_threads`, whatever the job was given (pipeline.device, "CPU threads"). FID and the oracle's
# scores are measurements printed to a few digits; they keep the job's threads for speed.
PINNED_THREADS = {cmd_pretrain_demo_model, cmd_train_oracle, cmd_invert, cmd_dreambooth, cmd_erase, cmd_mvc, cmd_caption, cmd_token_samples, cmd_mix_samples, cmd_generate, cmd_train}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = None if args.config is None else with_overrides(load_config(args.config), parse_overrides(args.overrides))
        if args.func in PINNED_THREADS:
            from pipeline.device import pin_cpu_threads

            pin_cpu_threads(config["cpu_threads"])
        args.func(args, config)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
