"""Synthetic sets side by side, as the Wisconsin study's Table 1: per method, and per class, the
oracle's share of images assigned to their class, FID and KID against the real train images, and the
test accuracy of the classifier trained with the set. Reads a finished run's results; trains nothing.

    snakemake --cores all --configfile config.yaml config/recipes/dreambooth.yaml [overlay.yaml]
    python benchmarks/bench_synthetic_sets.py --config config.yaml config/recipes/dreambooth.yaml [overlay.yaml]

Needs the demo's oracle (`fid.oracle`); per-class FID rests on few images per class (num_per_image x k),
so read it beside KID and the oracle share, which are steadier at that size.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline import layout
from pipeline.config import validate_config
from pipeline.manifest import read_shards
from pipeline.oracle import load_oracle, predict


def merged_config(paths: list[str]) -> dict:
    """The config files merged key by key, later ones winning, as Snakemake merges --configfile."""

    def merge(into: dict, other: dict) -> dict:
        for key, value in other.items():
            into[key] = merge(dict(into.get(key, {})), value) if isinstance(value, dict) else value
        return into

    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return validate_config(config)


def oracle_shares(oracle, shard_paths: list[str]) -> dict[str, float]:
    """{class: share of its synthetic images the oracle assigns to it}."""
    import io

    rows = read_shards(shard_paths)
    predicted = predict(oracle, [Image.open(io.BytesIO(row["image"])).convert("RGB") for row in rows])
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, label in zip(rows, predicted):
        hits[row["class_name"]].append(int(label) == row["label"])
    return {name: float(np.mean(values)) for name, values in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["config.yaml"], help="the run's config files, in the order given to snakemake")
    args = parser.parse_args()
    config = merged_config(args.config)
    results, methods = config["results"], config["generate"]["methods"]
    pairs = layout.subsets_in(config)
    oracle = load_oracle(config["fid"]["oracle"])
    named = json.loads((Path(config["model"]["id"]) / "demo_model.json").read_text()).get("named_classes", [])
    accuracy = {}
    with open(f"{layout.report_dir(results)}/summary_by_method.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            accuracy[(row["method"], int(row["examples_per_class"]))] = float(row["accuracy_mean"])

    per_method, per_class = {}, defaultdict(dict)
    for method in methods:
        shares, fids, kids, class_fid = [], [], [], defaultdict(list)
        class_share = defaultdict(list)
        for k, seed in pairs:
            by_class = oracle_shares(oracle, layout.shards(results, method, k, seed, config["generate"]["num_shards"]))
            shares.append(np.mean(list(by_class.values())))
            for name, share in by_class.items():
                class_share[name].append(share)
            fid = json.loads(Path(layout.fid(results, method, k, seed)).read_text())
            fids.append(fid["fid"])
            kids.append(fid["kid"])
            for name, values in fid["per_class"].items():
                class_fid[name].append(values["fid"])
        ks = sorted({k for k, _ in pairs})
        per_method[method] = (np.mean(shares), np.mean(fids), np.mean(kids), [accuracy.get((method, k)) for k in ks])
        for name in class_share:
            per_class[name][method] = (np.mean(class_share[name]), np.mean(class_fid[name]))

    print(f"{len(pairs)} subsets ({', '.join(layout.subset_name(k, s) for k, s in pairs)}), means over them; chance is {100 / len(per_class):.0f}%\n")
    print("| method | oracle share | FID | KID | test accuracy of the classifier trained with it |")
    print("|---|---:|---:|---:|---:|")
    for method, (share, fid, kid, accs) in per_method.items():
        acc = ", ".join("n/a" if a is None else f"{100 * a:.1f}%" for a in accs)
        print(f"| {method} | {100 * share:.1f}% | {fid:.1f} | {kid:.3f} | {acc} |")
    baseline = [accuracy.get(("baseline", k)) for k in sorted({k for k, _ in pairs})]
    if all(a is not None for a in baseline):
        print(f"| (baseline: real images only) | | | | {', '.join(f'{100 * a:.1f}%' for a in baseline)} |")
    print("\nPer class, oracle share / FID:\n")
    print("| class | named in the captions | " + " | ".join(methods) + " |")
    print("|---|---|" + "---:|" * len(methods))
    classes = json.loads(Path(layout.prepared(results, layout.CLASSES_FILE)).read_text())
    for name in classes:
        by_method = per_class[name]
        cells = " | ".join(f"{100 * by_method[m][0]:.0f}% / {by_method[m][1]:.0f}" for m in methods)
        print(f"| {name} | {'yes' if name in named else 'no'} | {cells} |")


if __name__ == "__main__":
    main()
