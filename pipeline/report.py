"""Gather a run's results into summary.csv and a self-contained HTML page a person reads at a glance.

The page holds: accuracy by method and examples per class (mean, 68% confidence interval, trials),
the few-shot curves with CI bands, per-class accuracy, FID/KID beside accuracy (with sample sizes and
a warning when they are small), and grids of real images next to their synthetic versions.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline import PipelineError, layout
from pipeline.compare import PER_CLASS_ACCURACY_FILE, PER_CLASS_FID_FILE, RUN_FILE, averaged_over_k_table, sweep_sections
from pipeline.io import atomic_path, decode_image, read_json, write_json
from pipeline.manifest import read_manifest, read_shards
from pipeline.methods import needing, real_guidance_reference
from pipeline.records import Fid, Metrics, OracleScores, read_results
from pipeline.report_html import CSS, confidence_interval_68, fmt, png_data_uri, table, write_csv
from pipeline.settings.report import ReportSettings

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "dataset",
    "method",
    "examples_per_class",
    "trial_seed",
    "split",
    "accuracy",
    "mean_class_accuracy",
    "val_accuracy",
    "best_step",
    "n_train_real",
    "n_synthetic",
    "backbone",
    "leakage_prevention",
    "paper_accuracy",
]
# FID's covariance is rank-deficient below the feature dimension: values are biased upwards.
FID_RELIABLE_N = 2048


def summary_rows(metrics: list[Metrics], sweep_settings: dict[str, dict] | None = None) -> list[dict]:
    """One row per classifier; `method` is its run name (pipeline.sweeps), and each swept key has a
    column with the value in effect (`sweep_settings`: run -> {key: value}, ReportSettings)."""
    sweep_settings = sweep_settings or {}
    rows = [{**{column: getattr(m, column) for column in SUMMARY_COLUMNS}, **sweep_settings.get(m.method, {})} for m in metrics]
    return sorted(rows, key=lambda r: (str(r["method"]), r["examples_per_class"], r["trial_seed"]))


def aggregate(rows: list[dict], value: str = "accuracy") -> dict[tuple[str, int], dict]:
    """(method, k) -> {mean, ci68, n} of `value` over trial seeds."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row.get(value) is not None:
            groups[(row["method"], int(row["examples_per_class"]))].append(float(row[value]))
    out = {}
    for key, values in groups.items():
        mean, half = confidence_interval_68(values)
        out[key] = {"mean": mean, "ci68": half, "n": len(values)}
    return out


def per_class_quality(fid_records: list[Fid], k: int | None) -> dict[str, dict[str, dict]]:
    """{generation method: {class: {fid, kid}}} at `k` examples per class, means over trial seeds
    (the Wisconsin study's Table 1 compares its synthetic sets so); classes without a value are absent."""
    values: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in fid_records:
        if record.examples_per_class != k:
            continue
        for name, scores in record.per_class.items():
            for metric in ("fid", "kid"):
                if scores.get(metric) is not None:
                    values[record.method][name][metric].append(float(scores[metric]))
    return {
        method: {name: {metric: float(np.mean(v)) if v else None for metric, v in (("fid", m["fid"]), ("kid", m["kid"]))} for name, m in by_class.items()}
        for method, by_class in values.items()
    }


def zeroshot_label(record: dict) -> str:
    """The zero-shot row's name in the tables: the model and its pretrained weights."""
    return f"zero-shot CLIP {record['model'].rsplit('/', 1)[-1].removesuffix('.json')} ({record['pretrained'] or 'random weights'})"


def per_class_accuracy_rows(metrics: list[Metrics]) -> list[dict]:
    """per_class_accuracy.csv: each run's accuracy on each class at each k, mean over trial seeds
    (classes without a test image left out)."""
    values: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for m in metrics:
        for name, acc in m.per_class_accuracy.items():
            if acc is not None:
                values[(m.method, m.examples_per_class, name)].append(acc)
    return [{"method": run, "examples_per_class": k, "class": name, "accuracy": float(np.mean(v)), "n_trials": len(v)} for (run, k, name), v in values.items()]


def per_class_fid_rows(fid_records: list[Fid]) -> list[dict]:
    """per_class_fid.csv: FID and KID of each generation run's images of each class at each k, mean
    over trial seeds (study 001's Table 1)."""
    rows = []
    for k in sorted({record.examples_per_class for record in fid_records}):
        for run, by_class in per_class_quality(fid_records, k).items():
            for name, scores in by_class.items():
                n = sum(1 for r in fid_records if r.method == run and r.examples_per_class == k and name in r.per_class)
                rows.append({"method": run, "examples_per_class": k, "class": name, "fid": scores["fid"], "kid": scores["kid"], "n_trials": n})
    return rows


def synthetic_quality(fid_records: list[Fid], synthetic_runs: dict[str, str | None]) -> dict[tuple[str, int], dict]:
    """FID and KID of each training run's synthetic source by examples per class, averaged over
    trial seeds: {(train run, k): {"synthetic_method", "fid", "kid", "n"}}; real-only runs are absent.
    `synthetic_runs`: train run -> the generation run it trained on (ReportSettings)."""
    quality = {}
    for method, source in synthetic_runs.items():
        if source is None:
            continue
        by_k = defaultdict(list)
        for record in fid_records:
            if record.method == source:
                by_k[record.examples_per_class].append(record)
        for k, values in by_k.items():
            fids = [v.fid for v in values if v.fid is not None]
            kids = [v.kid for v in values if v.kid is not None]
            quality[(method, k)] = {
                "synthetic_method": source,
                "fid": float(np.mean(fids)) if fids else None,
                "kid": float(np.mean(kids)) if kids else None,
                "n": len(values),
            }
    return quality


def quality_table(agg: dict, quality: dict, methods: list[str], ks: list[int], baseline: str | None) -> str:
    """One row per (method, k): accuracy beside the FID/KID of the synthetic images the method trained on."""
    rows = []
    for method in methods:
        for k in ks:
            entry = agg.get((method, k))
            if entry is None:
                continue
            accuracy = f"{100 * entry['mean']:.1f}" + (f" ± {100 * entry['ci68']:.1f}" if not math.isnan(entry["ci68"]) else "")
            base = agg.get((baseline, k)) if baseline and method != baseline else None
            delta = f"{100 * (entry['mean'] - base['mean']):+.1f}" if base is not None else "–"
            synthetic = quality.get((method, k))
            rows.append([
                f"<b>{html.escape(method)}</b>", str(k), accuracy, delta,
                html.escape(synthetic["synthetic_method"]) if synthetic else "real only",
                fmt(synthetic["fid"], 2) if synthetic else "–",
                fmt(synthetic["kid"], 4) if synthetic else "–",
            ])
    return table(["method", "k", "test accuracy (%)", "vs baseline", "synthetic images", "FID ↓", "KID ↓"], rows)


def accuracy_plot(agg: dict, methods: list[str], ks: list[int], title: str) -> str:
    """Few-shot curves: mean accuracy vs examples per class, one line per method, 68% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method in methods:
        points = [(k, agg[(method, k)]) for k in ks if (method, k) in agg]
        if not points:
            continue
        x = np.array([k for k, _ in points], dtype=float)
        mean = np.array([p["mean"] for _, p in points])
        half = np.nan_to_num(np.array([p["ci68"] for _, p in points]))
        ax.plot(x, mean, marker="o", label=method)
        ax.fill_between(x, mean - half, mean + half, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("examples per class")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    uri = png_data_uri(fig)
    plt.close(fig)
    return uri


def inversion_loss_plot(loss_files: dict[str, Path]) -> str:
    """Textual-inversion loss against step, one panel per subset, one line per class (and in joint
    mode a bold one for the whole batch, "all"), smoothed over a tenth of each curve's points so a
    trend shows through the noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loss_files), figsize=(3.2 * len(loss_files), 2.8), sharey=True, squeeze=False)
    for ax, (subset, path) in zip(axes[0], loss_files.items()):
        curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
        with open(path) as handle:
            for row in csv.DictReader(handle):
                curves[row["class"]].append((int(row["step"]), float(row["loss"])))
        for name, points in sorted(curves.items()):
            steps = np.array([s for s, _ in points])
            losses = np.array([v for _, v in points])
            window = max(1, len(losses) // 10)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            bold = name == layout.JOINT_LOSS_LABEL
            ax.plot(steps[window - 1 :], smooth, label=name, linewidth=2 if bold else 0.8, color="black" if bold else None, zorder=3 if bold else 2)
        ax.set_title(subset, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("noise-prediction MSE")
    # A legend of a dozen classes still reads; beyond that only the bold batch curve is named.
    lines = axes[0][-1].get_lines()
    named = lines if len(lines) <= 12 else [line for line in lines if line.get_label() == layout.JOINT_LOSS_LABEL]
    if named:
        axes[0][-1].legend(handles=named, frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    uri = png_data_uri(fig)
    plt.close(fig)
    return uri


def image_grid(manifest_rows: dict[str, dict], shard_rows: list[dict], max_sources: int, thumb: int = 96) -> str:
    """One row per source image: the real image, then its synthetic versions by increasing strength,
    as a PNG data URI ("" when there is nothing to show)."""
    from PIL import Image, ImageDraw

    from pipeline.io import open_image

    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in shard_rows:
        by_source[row["image_id"]].append(row)
    sources = sorted(by_source)[:max_sources]
    if not sources:
        return ""
    columns = max(len(by_source[s]) for s in sources) + 1
    label_h = 14
    canvas = Image.new("RGB", (columns * thumb, len(sources) * (thumb + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, source in enumerate(sources):
        y = r * (thumb + label_h)
        real = manifest_rows.get(source)
        if real is None:
            raise PipelineError(f"synthetic image source {source!r} is not in the manifest")
        canvas.paste(open_image(real["path"]).resize((thumb, thumb)), (0, y))
        draw.text((2, y + thumb), f"real: {real['class_name']}"[:16], fill="black")
        versions = sorted(by_source[source], key=lambda v: (v["strength"] if v["strength"] is not None else 2.0, v["synthetic_id"]))
        for c, version in enumerate(versions, 1):
            image = decode_image(version["image"], what=version["synthetic_id"]).resize((thumb, thumb))
            canvas.paste(image, (c * thumb, y))
            strength = "txt2img" if version["strength"] is None else f"t0={version['strength']:.2f}"
            draw.text((c * thumb + 2, y + thumb), strength, fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _labelled_grid(grid_path: Path, tile: int, row_labels: list[str], column_labels: list[str] | None, thumb: int, label_w: int) -> str:
    """A sample grid of tile x tile images with each row's label at its left (and, given, each
    column's above it), tiles shrunk to `thumb` px, as a PNG data URI."""
    from PIL import Image, ImageDraw

    header_h = 16 if column_labels else 0
    with Image.open(grid_path) as grid:
        grid = grid.convert("RGB")
    rows, columns = len(row_labels), grid.width // tile
    canvas = Image.new("RGB", (label_w + columns * thumb, header_h + rows * thumb), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(column_labels or ()):
        draw.text((label_w + c * thumb + 2, 2), name, fill="black")
    for r, label in enumerate(row_labels):
        for c in range(columns):
            sample = grid.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)).resize((thumb, thumb))
            canvas.paste(sample, (label_w + c * thumb, header_h + r * thumb))
        draw.text((4, header_h + r * thumb + thumb // 2 - 6), label, fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def token_samples_grid(grid_path: Path, thumb: int = 64) -> str:
    """A subset's token sample grid (pipeline.token_samples), each row labelled by its class."""
    legend = read_json(Path(layout.grid_legend(grid_path)))
    return _labelled_grid(grid_path, legend["tile_size"], [row["class_name"][:22] for row in legend["rows"]], None, thumb, 150)


def mix_samples_grid(grid_path: Path, thumb: int = 64) -> str:
    """A subset's mix sample grid (pipeline.mix_samples) under a header naming each column, each row
    labelled by its class."""
    legend = read_json(Path(layout.grid_legend(grid_path)))
    columns = [name.replace("conditioning image", "condition")[:11] for name in legend["columns"]]
    return _labelled_grid(grid_path, legend["tile_size"], [row["class_name"][:10] for row in legend["rows"]], columns, thumb, 70)


def mix_distance_table(legends: list[dict]) -> str:
    """Mean pixel distance to the unmixed sample per swap count, fine against coarse, averaged over subsets."""
    counts = sorted({int(n) for legend in legends for n in legend["mean_pixel_distance"]["fine"]})

    def mean(kind: str, n: int) -> float:
        values = [legend["mean_pixel_distance"][kind][str(n)] for legend in legends if str(n) in legend["mean_pixel_distance"][kind]]
        return float(np.mean(values))

    rows = [[str(n), fmt(mean("fine", n)), fmt(mean("coarse", n)), fmt(mean("coarse", n) / mean("fine", n), 2) if mean("fine", n) else "–"]
            for n in counts]  # fmt: skip
    return table(["swaps n", "fine (Q = n)", "coarse (P = n)", "coarse / fine"], rows)


def accuracy_table(agg: dict, methods: list[str], ks: list[int], baseline: str | None) -> str:
    header = ["method"] + [f"k={k}" for k in ks]
    rows = []
    for method in methods:
        cells = [f"<b>{html.escape(method)}</b>"]
        for k in ks:
            entry = agg.get((method, k))
            if entry is None:
                cells.append("–")
                continue
            text = f"{100 * entry['mean']:.1f}"
            if not math.isnan(entry["ci68"]):
                text += f" ± {100 * entry['ci68']:.1f}"
            base = agg.get((baseline, k)) if baseline and method != baseline else None
            if base is not None:
                delta = 100 * (entry["mean"] - base["mean"])
                css = "up" if delta > 0 else "down" if delta < 0 else ""
                text += f' <span class="{css}">({delta:+.1f})</span>'
            text += f' <span class="n">n={entry["n"]}</span>'
            cells.append(text)
        rows.append(cells)
    return table(header, rows)


def model_banner(settings: ReportSettings) -> str:
    """What the diffusion model of this run is, when it is not a real Stable Diffusion checkpoint."""
    from pipeline.checkpoint import INFO_FILE, is_local

    if settings.build_tiny:
        return (
            "This run uses a tiny, <b>randomly initialised</b> Stable Diffusion built offline: its synthetic images are "
            "noise, so accuracy differences here test the machinery, not DA-Fusion. Use a real checkpoint "
            "(config/coco.yaml, config/pascal.yaml) for meaningful numbers."
        )
    info_path = Path(settings.model_id) / INFO_FILE
    if not (is_local(settings.model_id) and info_path.is_file()):
        return ""
    named = read_json(info_path).get("named_classes", [])
    return (
        "This run uses the <b>demo model</b>: a small Stable Diffusion-architecture model this project trained offline, "
        "on a CPU, on captioned digit scenes drawn from MNIST digits that no demo split uses. Its captions name "
        f"{html.escape(', '.join(named))} and call every other class only \"digit\", so those classes can be drawn but "
        "not named: their tokens come from textual inversion alone. The numbers show the methods' effects at a small "
        "scale, not the paper's figures (config/coco.yaml, config/pascal.yaml)."
    )


def pool_oracle_scores(results: list[OracleScores]) -> dict[str, dict[str, float]]:
    """Per t0, the oracle scores of several subsets pooled over their images: agreement, the sources'
    agreement and pixel distance weighted by each subset's image count, since a k = 1 subset holds a
    few images per t0 and must not weigh as much as a k = 16 one."""
    parts: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        for t0, scores in result.by_strength.items():
            parts[t0].append(scores)
    pooled = {}
    for t0, scores in parts.items():
        counts = [part["n"] for part in scores]
        averages = {key: float(np.average([part[key] for part in scores], weights=counts)) for key in ("agreement", "source_agreement", "mean_abs_difference")}
        pooled[t0] = {"n": sum(counts), **averages}
    return pooled


def strength_table(fid_records: list[Fid], oracle_records: list[OracleScores]) -> str:
    """FID/KID per t0 averaged over the subsets, beside the oracle's scores pooled over their images."""
    columns: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for record in fid_records:
        for t0, scores in record.by_strength.items():
            for key in ("fid", "kid"):
                if scores.get(key) is not None:
                    columns[(record.method, t0)][key].append(scores[key])
    real: list[float] = []
    oracle_by_method: dict[str, list[OracleScores]] = defaultdict(list)
    for record in oracle_records:
        real.append(record.real_test_agreement)
        oracle_by_method[record.method].append(record)
    for method, results in oracle_by_method.items():
        for t0, pooled in pool_oracle_scores(results).items():
            columns[(method, t0)]["oracle"] = pooled
    mean = lambda values, scale=1.0, digits=2: fmt(scale * float(np.mean(values)), digits) if values else "–"
    rows = []
    if real:
        rows.append(["real test images", "–", "–", "–", "–", mean(real, 100, 1), "–", "0"])
    for (method, t0), v in sorted(columns.items(), key=lambda item: (item[0][0], float(item[0][1]) if item[0][1] != "none" else 9)):
        oracle = v.get("oracle")
        scored = [str(oracle["n"]), fmt(100 * oracle["agreement"], 1), fmt(100 * oracle["source_agreement"], 1), fmt(oracle["mean_abs_difference"], 3)] if oracle else ["–"] * 4
        rows.append([html.escape(method), html.escape(t0), scored[0], mean(v["fid"]), mean(v["kid"], 1, 4), *scored[1:]])
    headers = ["method", "t0", "images", "FID", "KID", "oracle agreement (%)", "on their sources, unedited (%)", "pixel distance"]
    return table(headers, rows)


def build_report(config: dict, out_dir: str | Path) -> dict:
    """Read every result the config asks for and write summary.csv, summary_by_method.csv, index.html.
    The only reader of `config`: the rest gets the stage's ReportSettings."""
    settings = ReportSettings.from_config(config)
    out_dir = Path(out_dir)
    results = settings.results
    recorded = read_results(settings)
    metrics, fids = recorded.metrics, recorded.fid
    rows = summary_rows(metrics, settings.sweep_settings)
    agg = aggregate(rows, "accuracy")
    agg_mca = aggregate(rows, "mean_class_accuracy")
    methods = list(settings.train_runs)
    ks = sorted(set(settings.examples_per_class))
    baseline = "baseline" if "baseline" in methods else None
    dataset = settings.dataset
    manifest_rows, manifest_meta = read_manifest(layout.manifest(results))
    classes = manifest_meta["classes"]

    quality = synthetic_quality(fids, settings.synthetic_runs)
    reference = real_guidance_reference(settings.train_methods)
    swept_keys = sorted({key for keys in settings.sweeps.values() for key in keys})

    write_csv(out_dir / "summary.csv", rows, SUMMARY_COLUMNS + swept_keys)
    per_class_rows = per_class_accuracy_rows(metrics)
    write_csv(out_dir / PER_CLASS_ACCURACY_FILE, per_class_rows, ["method", "examples_per_class", "class", "accuracy", "n_trials"])
    write_csv(out_dir / PER_CLASS_FID_FILE, per_class_fid_rows(fids), ["method", "examples_per_class", "class", "fid", "kid", "n_trials"])
    zeroshot = read_json(layout.zeroshot(results)) if settings.zeroshot_model else None
    run_record = {
        "dataset": dataset, "examples_per_class": ks, "trial_seeds": list(settings.trial_seeds), "model_id": settings.model_id,
        "backbone": settings.backbone, "train_runs": methods, "generate_runs": list(settings.generate_runs),
        "baseline": baseline, "reference": reference, "sweeps": settings.sweep_runs,
        "zeroshot": {key: zeroshot[key] for key in ("model", "pretrained", "accuracy", "mean_class_accuracy", "n_test")} if zeroshot else None,
    }  # fmt: skip
    write_json(out_dir / RUN_FILE, run_record)
    leakage = {row["method"]: row["leakage_prevention"] for row in rows}
    by_method = [
        {"method": m, "examples_per_class": k, "n_trials": a["n"], "accuracy_mean": a["mean"], "accuracy_ci68": a["ci68"],
         "leakage_prevention": leakage.get(m),
         "mean_class_accuracy_mean": agg_mca.get((m, k), {}).get("mean"),
         "synthetic_method": quality.get((m, k), {}).get("synthetic_method"),
         "fid_mean": quality.get((m, k), {}).get("fid"), "kid_mean": quality.get((m, k), {}).get("kid")}
        for (m, k), a in sorted(agg.items())
    ]
    write_csv(out_dir / "summary_by_method.csv", by_method, list(by_method[0]) if by_method else ["method"])

    sections = [f"<h1>DA-Fusion results: {html.escape(dataset)}</h1>"]
    sections.append(
        f'<p class="muted">{len(metrics)} training runs · methods: {html.escape(", ".join(methods))} · '
        f"examples per class: {', '.join(map(str, ks))} · trial seeds: {', '.join(map(str, settings.trial_seeds))} · "
        f"model: {html.escape(settings.model_id)} · backbone: {html.escape(settings.backbone)}</p>"
    )
    banner = model_banner(settings)
    if banner:
        sections.append(f'<p class="note">{banner}</p>')
    sections.append("<h2>Test accuracy (%)</h2>")
    sections.append(
        '<p class="muted">Mean over trial seeds ± half-width of the 68% confidence interval (Student t); '
        "in brackets, the difference to <i>baseline</i>. The model of each run was selected on the validation split; "
        "the number is on the held-out test split.</p>"
    )
    if zeroshot is None:
        sections.append(accuracy_table(agg, methods, ks, baseline))
    else:
        # The same number at every k: it saw no training image.
        label = zeroshot_label(zeroshot)
        with_reference = {**agg, **{(label, k): {"mean": zeroshot["accuracy"], "ci68": math.nan, "n": 1} for k in ks}}
        sections.append(accuracy_table(with_reference, methods + [label], ks, baseline))
        sections.append(
            f'<p class="muted">{html.escape(label)}: no training image; each class the mean text embedding of the prompts '
            f"{html.escape(', '.join(repr(t) for t in zeroshot['templates']))}, scored once on the same test images "
            f"(mean per-class accuracy {100 * zeroshot['mean_class_accuracy']:.1f}%).</p>"
        )
        if zeroshot["pretrained"] is None:
            sections.append('<p class="note">The zero-shot CLIP has random weights (zeroshot.pretrained: null): its row is chance, for tests only.</p>')
    modes = ", ".join(f"{html.escape(m)}: {html.escape(leakage.get(m) or 'not recorded')}" for m in methods if m in leakage)
    sections.append(f'<p class="muted">Leakage prevention (DA-Fusion section 6.1; data-centric: no class name in the prompt, '
                    f"model-centric: class names erased from the model): {modes}.</p>")
    if quality:
        sections.append("<h2>Accuracy beside the quality of the synthetic images</h2>")
        sections.append(
            '<p class="muted">FID and KID (lower is closer to the real training images) of the synthetic set each method '
            "trained on, averaged over the same trial seeds as the accuracy. Sample sizes and the real-vs-real floor are "
            "in the FID section below.</p>"
        )
        sections.append(quality_table(agg, quality, methods, ks, baseline))
    if any(row["paper_accuracy"] is not None for row in rows):
        sections.append("<h2>Paper-compatible protocol: best accuracy over checkpoints on val + test (%)</h2>")
        sections.append(
            '<p class="note">Not a held-out number. This is the published protocol (train.paper_protocol): every checkpoint '
            "is scored on the val and test images together (the official validation images) and the best score is reported, "
            "so it is optimistic by construction. It is here to compare with published figures; the test accuracy above "
            "is the honest number (selected on val, measured once on test).</p>"
        )
        sections.append(accuracy_table(aggregate(rows, "paper_accuracy"), methods, ks, baseline))
    if len(ks) > 1:
        sections.append("<h2>Test accuracy averaged over k</h2>")
        sections.append(
            '<p class="muted">Per trial seed, the mean of test accuracy over k = '
            f"{', '.join(map(str, ks))}; mean ± 68% interval over trial seeds (DA-Fusion Figs. 8 and 9, bottom rows). "
            "The gain is paired: the same subsets and initial weights as the baseline.</p>"
        )
        sections.append(averaged_over_k_table(rows, methods, ks, baseline))
    sections += sweep_sections(rows, settings.sweep_runs, ks, baseline, reference)
    sections.append("<h2>Mean per-class accuracy (%)</h2>")
    sections.append(accuracy_table(agg_mca, methods, ks, baseline))
    sections.append(f'<img alt="accuracy vs examples per class" src="{accuracy_plot(agg, methods, ks, dataset)}">')

    sections.append("<h2>Per-class test accuracy (%)</h2>")
    sections.append('<p class="muted">Mean over trial seeds, one table per number of examples per class.</p>')
    per_class: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in metrics:
        for name, acc in m.per_class_accuracy.items():
            if acc is not None:  # None: the class has no test image
                per_class[(m.examples_per_class, m.method)][name].append(acc)
    for k in ks:
        table_rows = [
            [html.escape(m)] + [fmt(100 * float(np.mean(per_class[(k, m)][c])), 1) if per_class[(k, m)][c] else "–" for c in classes]
            for m in methods if (k, m) in per_class
        ]  # fmt: skip
        if table_rows:
            sections.append(f"<h3>k={k}</h3>")
            sections.append(table(["method"] + classes, table_rows))

    sections.append("<h2>Synthetic image quality: FID and KID against real training images</h2>")
    fid_rows, small = [], False
    for record in fids:
        small |= min(record.n_real, record.n_synthetic) < FID_RELIABLE_N
        fid_rows.append([
            html.escape(record.method), html.escape(layout.subset_name(record.examples_per_class, record.trial_seed)), fmt(record.fid, 2),
            fmt(record.kid, 4) + (f" ± {fmt(record.kid_std, 4)}" if record.kid_std is not None else ""),
            fmt(record.n_real), fmt(record.n_synthetic), fmt(record.floor_fid, 2),
        ])
    if fid_rows:
        sections.append(table(["method", "subset", "FID", "KID", "n real", "n synthetic", "real-vs-real floor"], fid_rows))
        sections.append(f'<p class="muted">Features: {html.escape(str(fids[0].feature_extractor))}; resize {html.escape(str(fids[0].resize))}.</p>')
    if small:
        sections.append(
            f'<p class="note">Fewer than {FID_RELIABLE_N} images on at least one side: the feature covariance is rank-deficient and '
            "FID is biased upwards; compare KID (unbiased for small sets) and the real-vs-real floor instead.</p>"
        )
    for k in ks:
        class_fid = per_class_quality(fids, k)
        if class_fid:
            sections.append(f"<h3>Per class at k={k}: FID / KID, mean over trial seeds</h3>")
            sections.append(
                table(["method"] + classes, [[html.escape(m)] + [
                    f"{fmt(class_fid[m][c]['fid'], 1)} / {fmt(class_fid[m][c]['kid'], 3)}" if c in class_fid[m] else "–" for c in classes
                ] for m in class_fid])  # fmt: skip
            )

    if fids:
        sections.append("<h2>What SDEdit strength t0 does</h2>")
        sections.append(
            '<p class="muted">Per t0, averaged over the subsets: FID and KID of the images made at that strength against '
            "all real training images; with the oracle (an independent classifier of the demo domain, never the classifier "
            "under test), the share of images it assigns to the source image's class, and the mean absolute pixel "
            "difference to the source (0-1 scale). The first row is the oracle on the real test images.</p>"
        )
        sections.append(strength_table(fids, recorded.oracle))

    if needing("tokens", settings.generate_methods):
        loss_files = {layout.subset_name(k, s): Path(layout.tokens(results, k, s)) / layout.LOSS_FILE for k, s in settings.subsets}
        sections.append("<h2>Textual inversion: did the tokens learn?</h2>")
        sections.append(
            '<p class="muted">Training loss of the learned class tokens (moving average over a tenth of the run). '
            "A curve that does not fall means the token learned little about its class.</p>"
        )
        sections.append(f'<img alt="textual inversion loss" src="{inversion_loss_plot(loss_files)}">')
        # The first trial's smallest and largest k: enough to see whether tokens learned, without
        # embedding every subset's grid.
        first_seed = settings.trial_seeds[0]
        shown = sorted({(ks[0], first_seed), (ks[-1], first_seed)})
        sections.append(
            '<p class="muted">Text-to-image samples of each learned token ("a photo of a &lt;token&gt;", a few '
            "solver steps); each column starts from the same noise in every row, so rows differ only by their token. "
            "Rows that look alike, or like no object of the class, point to tokens that learned little.</p>"
        )
        for k, seed in shown:
            uri = token_samples_grid(Path(layout.token_samples(results, k, seed)))
            sections.append(f"<h3>Token samples, {html.escape(layout.subset_name(k, seed))}</h3>")
            sections.append(f'<img alt="samples of the learned tokens, {html.escape(layout.subset_name(k, seed))}" src="{uri}">')

    if needing("mvc", settings.generate_methods):
        grids = [Path(layout.mix_samples(results, k, seed)) for k, seed in settings.subsets]
        legends = [read_json(Path(layout.grid_legend(grid))) for grid in grids]
        sections.append("<h2>MVC: what mixing the caption embeddings does</h2>")
        sections.append(
            '<p class="muted">The mvc model\'s samples of a training image from one start noise and conditioning image: '
            "under the image's own caption embedding (unmixed), then with n fine swaps only (columns of one row from another "
            "caption of the class) and n coarse swaps only (whole row blocks). Distance: mean absolute pixel difference to "
            f"the unmixed sample (0-1 scale), over {legends[0]['draws']} seeded mixes per image and setting, averaged over "
            f"the {len(legends)} subsets. The study's claim: coarse mixing changes an image more than fine mixing.</p>"
        )
        sections.append(mix_distance_table(legends))
        sections.append(f"<h3>Mix samples, {html.escape(layout.subset_name(*settings.subsets[0]))}</h3>")
        sections.append(f'<img alt="unmixed, fine-mixed and coarse-mixed mvc samples" src="{mix_samples_grid(grids[0])}">')

    by_id = {row["image_id"]: row for row in manifest_rows}
    k0, s0 = settings.subsets[0]
    for method in settings.generate_methods:
        shard_rows = read_shards(layout.shards(results, method, k0, s0, settings.num_shards))
        uri = image_grid(by_id, shard_rows, settings.grid_images)
        if uri:
            sections.append(f"<h2>Real vs synthetic: {html.escape(method)} ({layout.subset_name(k0, s0)})</h2>")
            sections.append('<p class="muted">Each row: a real training image, then its synthetic versions by increasing SDEdit strength t0.</p>')
            sections.append(f'<img alt="real and synthetic images, {html.escape(method)}" src="{uri}">')

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>DA-Fusion report: {html.escape(dataset)}</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>"
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(page)
    log.info("report: %d runs, %d methods, %d FID values -> %s", len(metrics), len(methods), len(fids), out_dir / "index.html")
    return {"runs": len(metrics), "methods": methods, "fid_values": len(fids)}
