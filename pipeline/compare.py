"""Compare runs: each sweep's gain against the swept value, accuracy averaged over k, a normalised
score across datasets, per-class FID and accuracy at every k, side by side for several results folders.

    python -m pipeline compare results/coco results/voc --out compare/ [--across-datasets]

The run report (pipeline.report) draws each of its own sweeps with the same functions, so a sweep's
figure reads the same in a run's page and in a comparison. A comparison reads only what a report
wrote: `summary.csv` (one row per classifier), `run.json` (what the run asked for: dataset, k,
trial seeds, methods, each sweep's runs) and the per-class CSV files.

Gains are paired: per trial seed, the mean over k of (accuracy of the run - accuracy of the
reference run on the same subset), then the mean and 68% interval over trial seeds. Both runs train
from the same initial weights and draw the same real images (pipeline.train), so pairing removes
most of the subset-to-subset variance. A trial seed missing some k is left out rather than averaged
over fewer k.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline import PipelineError
from pipeline.io import atomic_path
from pipeline.report_html import CSS, confidence_interval_68, fmt, png_data_uri, table, write_csv

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # a report folder: what the run asked for (pipeline.report writes it)
PER_CLASS_ACCURACY_FILE = "per_class_accuracy.csv"
PER_CLASS_FID_FILE = "per_class_fid.csv"


def accuracy_by_trial(rows: list[dict], value: str = "accuracy") -> dict[str, dict[tuple[int, int], float]]:
    """{run: {(k, trial seed): value}} of summary rows (dicts of summary.csv or the report's)."""
    out: dict[str, dict[tuple[int, int], float]] = defaultdict(dict)
    for row in rows:
        if row.get(value) not in (None, ""):
            out[row["method"]][(int(row["examples_per_class"]), int(row["trial_seed"]))] = float(row[value])
    return out


def _interval(values: list[float]) -> dict | None:
    if not values:
        return None
    mean, half = confidence_interval_68(values)
    return {"mean": mean, "ci68": half, "n": len(values)}


def mean_over_k(by_trial: dict, run: str, ks: list[int], reference: str | None = None) -> dict | None:
    """Mean over `ks` of the run's accuracy (minus the reference run's, paired), per trial seed;
    then mean and 68% interval over the trial seeds that have every k. None when no seed has all."""
    own, other = by_trial.get(run, {}), by_trial.get(reference, {}) if reference else {}
    seeds = sorted({seed for _, seed in own})
    per_seed = []
    for seed in seeds:
        keys = [(k, seed) for k in ks]
        if not all(key in own for key in keys) or (reference and not all(key in other for key in keys)):
            continue
        per_seed.append(float(np.mean([own[key] - (other[key] if reference else 0.0) for key in keys])))
    return _interval(per_seed)


def _cell(entry: dict | None, signed: bool = False) -> str:
    if entry is None:
        return "–"
    text = f"{100 * entry['mean']:+.1f}" if signed else f"{100 * entry['mean']:.1f}"
    if not np.isnan(entry["ci68"]):
        text += f" ± {100 * entry['ci68']:.1f}"
    if signed:
        css = "up" if entry["mean"] > 0 else "down" if entry["mean"] < 0 else ""
        text = f'<span class="{css}">{text}</span>'
    return text + f' <span class="n">n={entry["n"]}</span>'


def variant_label(overrides: dict) -> str:
    """A sweep variant as a reader sees it: `strength=0.5, num_intensities=1` (the last part of each key)."""
    from pipeline.sweeps import format_value

    return ", ".join(f"{key.rsplit('.', 1)[-1]}={format_value(value)}" for key, value in overrides.items()) or "base"


def sweep_gains(rows: list[dict], variants: list[dict], ks: list[int], baseline: str | None, reference: str | None) -> list[dict]:
    """One row per (variant, method whose run the sweep changes): its gain over the baseline run of
    that variant and over the reference method's run of that variant (Real Guidance in DA-Fusion's
    Fig. 11), each {mean, ci68, n} in accuracy units, or None when not measured."""
    by_trial = accuracy_by_trial(rows)
    methods = [m for m in variants[0]["runs"] if len({v["runs"][m] for v in variants}) > 1 and m not in (baseline, reference)]
    if reference and len({v["runs"][reference] for v in variants}) > 1:
        methods.append(reference)  # the reference itself moves with the sweep: its gain over the baseline
    out = []
    for variant in variants:
        runs = variant["runs"]
        for method in methods:
            out.append({
                "variant": variant_label(variant["overrides"]),
                "overrides": variant["overrides"],
                "method": method,
                "run": runs[method],
                "over_baseline": mean_over_k(by_trial, runs[method], ks, runs[baseline]) if baseline else None,
                "over_reference": mean_over_k(by_trial, runs[method], ks, runs[reference]) if reference and method != reference else None,
                "accuracy": mean_over_k(by_trial, runs[method], ks),
            })  # fmt: skip
    return out


def sweep_table(gains: list[dict], baseline: str | None, reference: str | None) -> str:
    header = ["setting", "method", "accuracy, mean over k (%)"]
    header += [f"gain over {baseline} (points)"] if baseline else []
    header += [f"gain over {reference} (points)"] if reference else []
    body = []
    for row in gains:
        cells = [html.escape(row["variant"]), f"<b>{html.escape(row['method'])}</b>", _cell(row["accuracy"])]
        cells += [_cell(row["over_baseline"], signed=True)] if baseline else []
        cells += [_cell(row["over_reference"], signed=True)] if reference else []
        body.append(cells)
    return table(header, body)


def sweep_plot(name: str, gains: list[dict], baseline: str | None, reference: str | None) -> str:
    """Gain (percentage points) against the swept value, one line per method and reference, 68% bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(row["variant"] for row in gains))
    keys = sorted({key for row in gains for key in row["overrides"]})
    # One numeric key: its values on the x axis; otherwise the variants in order, labelled.
    key = keys[0] if len(keys) == 1 else None
    numeric = key is not None and all(isinstance(row["overrides"].get(key), (int, float)) and not isinstance(row["overrides"].get(key), bool) for row in gains)
    positions = {row["variant"]: float(row["overrides"][key]) if numeric else labels.index(row["variant"]) for row in gains}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series = [("over_baseline", baseline, "-")] if baseline else []
    series += [("over_reference", reference, "--")] if reference else []
    for field, over, style in series:
        for method in dict.fromkeys(row["method"] for row in gains):
            points = [(positions[row["variant"]], row[field]) for row in gains if row["method"] == method and row[field] is not None]
            if not points:
                continue
            x = [p for p, _ in points]
            y = [100 * e["mean"] for _, e in points]
            err = [0.0 if np.isnan(e["ci68"]) else 100 * e["ci68"] for _, e in points]
            ax.errorbar(x, y, yerr=err, marker="o", linestyle=style, capsize=3, label=f"{method} over {over}")
    ax.axhline(0.0, color="#888", linewidth=0.8)
    if numeric:
        ax.set_xlabel(key)
    else:
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlabel("setting")
    ax.set_ylabel("gain in test accuracy, mean over k (points)")
    ax.set_title(f"sweep {name}")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    uri = png_data_uri(fig)
    plt.close(fig)
    return uri


def sweep_sections(rows: list[dict], sweep_runs: dict, ks: list[int], baseline: str | None, reference: str | None, heading: str = "h2") -> list[str]:
    """A table and a figure per sweep of one run."""
    sections = []
    for name, variants in sweep_runs.items():
        gains = sweep_gains(rows, variants, ks, baseline, reference)
        keys = sorted({key for v in variants for key in v["overrides"]})
        sections.append(f"<{heading}>Sweep {html.escape(name)}: {html.escape(', '.join(keys))}</{heading}>")
        if not gains:
            sections.append('<p class="note">No method\'s classifier depends on this sweep\'s settings: every variant is the base run.</p>')
            continue
        sections.append(
            '<p class="muted">Per trial seed, the mean over k of the paired difference in test accuracy to the reference '
            "run of the same variant (same subsets, same initial weights); mean ± 68% interval over trial seeds.</p>"
        )
        sections.append(sweep_table(gains, baseline, reference))
        sections.append(f'<img alt="sweep {html.escape(name)}: gain against the swept value" src="{sweep_plot(name, gains, baseline, reference)}">')
    return sections


def averaged_over_k_table(rows: list[dict], runs: list[str], ks: list[int], baseline: str | None) -> str:
    """Accuracy averaged over k (DA-Fusion Figs. 8 and 9, bottom rows) and the paired gain over the baseline."""
    by_trial = accuracy_by_trial(rows)
    body = []
    for run in runs:
        gain = mean_over_k(by_trial, run, ks, baseline) if baseline and run != baseline else None
        body.append([f"<b>{html.escape(run)}</b>", _cell(mean_over_k(by_trial, run, ks)), _cell(gain, signed=True) if gain else "–"])
    return table(["method", f"test accuracy, mean over k = {', '.join(map(str, ks))} (%)", f"gain over {baseline or 'baseline'} (points)"], body)


def normalised_scores(means: dict[str, dict[str, float]]) -> dict[str, dict]:
    """DA-Fusion section 6's score across datasets: per dataset, (y - y_min) / (y_max - y_min) over
    the methods compared; then each method's mean over the datasets. `means`: {dataset: {method: y}}.
    Only methods measured on every dataset are scored; a dataset where all methods tie scores them 0."""
    methods = set.intersection(*(set(by_method) for by_method in means.values())) if means else set()
    out = {}
    for method in sorted(methods):
        per_dataset = {}
        for dataset, by_method in means.items():
            values = [by_method[m] for m in methods]
            low, high = min(values), max(values)
            per_dataset[dataset] = (by_method[method] - low) / (high - low) if high > low else 0.0
        out[method] = {"per_dataset": per_dataset, "mean": float(np.mean(list(per_dataset.values())))}
    return out


def per_class_tables(rows: list[dict], value: str, digits: int, scale: float = 1.0) -> list[str]:
    """One table per k: a row per method, a column per class, from per_class_*.csv rows."""
    sections = []
    by_k: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    classes: list[str] = []
    for row in rows:
        if row.get(value) not in (None, ""):
            by_k[int(row["examples_per_class"])][row["method"]][row["class"]] = float(row[value])
        if row["class"] not in classes:
            classes.append(row["class"])
    for k in sorted(by_k):
        body = [[f"<b>{html.escape(m)}</b>"] + [fmt(scale * v[c], digits) if c in v else "–" for c in classes] for m, v in by_k[k].items()]
        sections.append(f"<h4>k={k}</h4>" + table(["method", *classes], body))
    return sections


# Reading report folders ---------------------------------------------------------------------------


def report_folder(path: str | Path) -> Path:
    """A results folder's report/ (or a report folder itself), checked to hold what a report writes."""
    path = Path(path)
    folder = path if (path / RUN_FILE).is_file() else path / "report"
    missing = [name for name in ("summary.csv", RUN_FILE) if not (folder / name).is_file()]
    if missing:
        raise PipelineError(f"{path}: no {' or '.join(missing)} in {folder}. Expected a results folder whose report stage has run (snakemake ... report), or its report/ folder")
    return folder


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_run(path: str | Path) -> dict:
    folder = report_folder(path)
    try:
        run = json.loads((folder / RUN_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{folder / RUN_FILE}: not valid JSON ({exc})") from None
    return {
        "label": str(path),
        **run,
        "rows": _read_csv(folder / "summary.csv"),
        "per_class_accuracy": _read_csv(folder / PER_CLASS_ACCURACY_FILE),
        "per_class_fid": _read_csv(folder / PER_CLASS_FID_FILE),
    }


def compare_runs(paths: list[str | Path], out_dir: str | Path, across_datasets: bool = False) -> dict:
    """Write <out_dir>/index.html and scores.csv comparing the runs of several results folders.

    Runs of one dataset are put side by side (accuracy averaged over each run's k). Runs of different
    datasets need `across_datasets`, which scores each method by the normalised score instead;
    without it they are refused, naming each folder's dataset, before anything is written.
    """
    if not paths:
        raise PipelineError("compare: no results folder given. Expected one or more results folders")
    runs = [read_run(p) for p in paths]
    datasets = {run["dataset"] for run in runs}
    if len(datasets) > 1 and not across_datasets:
        named = ", ".join(f"{run['label']} is {run['dataset']!r}" for run in runs)
        raise PipelineError(f"compare: the runs are of different datasets ({named}); a side-by-side comparison needs one. Expected runs of one dataset, or --across-datasets for the normalised score")
    if across_datasets and len(runs) < 2:
        raise PipelineError("compare --across-datasets: one run given. Expected runs of two or more datasets")

    sections = ["<h1>Comparison of runs</h1>"]
    sections.append(table(
        ["results", "dataset", "k", "trial seeds", "methods", "model", "backbone"],
        [[html.escape(r["label"]), html.escape(r["dataset"]), ", ".join(map(str, r["examples_per_class"])), ", ".join(map(str, r["trial_seeds"])),
          html.escape(", ".join(r["train_runs"])), html.escape(r.get("model_id", "")), html.escape(r.get("backbone", ""))] for r in runs],
    ))  # fmt: skip
    scores = []
    means: dict[str, dict[str, float]] = {}
    by_trial = {run["label"]: accuracy_by_trial(run["rows"]) for run in runs}
    for run in runs:
        for name in run["train_runs"]:
            entry = mean_over_k(by_trial[run["label"]], name, run["examples_per_class"])
            if entry is not None:
                scores.append({"results": run["label"], "dataset": run["dataset"], "method": name, "accuracy_mean_over_k": entry["mean"], "ci68": entry["ci68"], "n_trials": entry["n"]})
                means.setdefault(run["label"], {})[name] = entry["mean"]

    sections.append("<h2>Test accuracy averaged over k</h2>")
    sections.append(
        '<p class="muted">Per trial seed, the mean over the run\'s k of test accuracy; mean ± 68% interval over trial seeds '
        "(DA-Fusion Figs. 8 and 9, bottom rows). Runs with different k average over different k: compare within a row with care.</p>"
    )
    methods = list(dict.fromkeys(name for run in runs for name in run["train_runs"]))
    body = []
    for method in methods:
        cells = [f"<b>{html.escape(method)}</b>"]
        for run in runs:
            cells.append(_cell(mean_over_k(by_trial[run["label"]], method, run["examples_per_class"])) if method in run["train_runs"] else "–")
        body.append(cells)
    if any(run.get("zeroshot") for run in runs):  # no training image, so the same at every k
        body.append(["<b>zero-shot CLIP</b>"] + [
            f"{100 * run['zeroshot']['accuracy']:.1f} <span class=\"n\">{html.escape(run['zeroshot']['model'])} ({html.escape(str(run['zeroshot']['pretrained']))})</span>"
            if run.get("zeroshot") else "–" for run in runs
        ])  # fmt: skip
    sections.append(table(["method", *(r["label"] for r in runs)], body))

    normalised = normalised_scores(means) if across_datasets else {}
    if across_datasets:
        sections.append("<h2>Normalised score across datasets</h2>")
        sections.append(
            '<p class="muted">DA-Fusion section 6: per results folder, (y - y_min) / (y_max - y_min) of the accuracy averaged over k, '
            "over the methods every folder measured; then the mean over folders. 1: the best method on every dataset.</p>"
        )
        if not normalised:
            sections.append('<p class="note">No method was measured in every folder: there is nothing to score.</p>')
        else:
            ranked = sorted(normalised.items(), key=lambda item: -item[1]["mean"])
            sections.append(table(
                ["method", "normalised score", *(r["label"] for r in runs)],
                [[f"<b>{html.escape(m)}</b>", fmt(v["mean"], 3), *(fmt(v["per_dataset"][r["label"]], 3) for r in runs)] for m, v in ranked],
            ))  # fmt: skip
        for row in scores:
            row["normalised_score"] = normalised.get(row["method"], {}).get("per_dataset", {}).get(row["results"])

    for run in runs:
        sections.append(f"<h2>{html.escape(run['label'])} ({html.escape(run['dataset'])})</h2>")
        sections += sweep_sections(run["rows"], run["sweeps"], run["examples_per_class"], run.get("baseline"), run.get("reference"), heading="h3")
        if run["per_class_accuracy"]:
            sections.append("<h3>Per-class test accuracy (%), mean over trial seeds</h3>")
            sections += per_class_tables(run["per_class_accuracy"], "accuracy", 1, scale=100.0)
        if run["per_class_fid"]:
            sections.append("<h3>Per-class FID of the synthetic images, mean over trial seeds</h3>")
            sections += per_class_tables(run["per_class_fid"], "fid", 1)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "scores.csv", scores, ["results", "dataset", "method", "accuracy_mean_over_k", "ci68", "n_trials", "normalised_score"])
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>Comparison of runs</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>"
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(page)
    log.info("compare: %d runs of %d datasets, %d methods -> %s", len(runs), len(datasets), len(methods), out_dir / "index.html")
    return {"runs": len(runs), "datasets": sorted(datasets), "scores": scores, "normalised": normalised}
