import base64
import csv
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from conftest import RecordingConfig, undeclared_reads

from pipeline import layout
from pipeline.config import validate_config
from pipeline.io import encode_png, write_parquet
from pipeline.manifest import SHARD_SCHEMA, manifest_table
from pipeline.report import aggregate, build_report, confidence_interval_68
from pipeline.settings.report import ReportSettings


def test_confidence_interval_matches_student_t():
    mean, half = confidence_interval_68([0.5, 0.7])
    # sd = 0.1414, sem = 0.1, t quantile 0.84 at 1 dof = tan(0.34 pi) = 1.8190
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(0.18190, rel=1e-3)
    assert math.isnan(confidence_interval_68([0.4])[1])


def test_aggregate_groups_by_method_and_k():
    rows = [
        {"method": "a", "examples_per_class": 1, "accuracy": 0.2},
        {"method": "a", "examples_per_class": 1, "accuracy": 0.4},
        {"method": "a", "examples_per_class": 4, "accuracy": 0.9},
    ]
    agg = aggregate(rows)
    assert agg[("a", 1)]["mean"] == pytest.approx(0.3) and agg[("a", 1)]["n"] == 2
    assert agg[("a", 4)]["n"] == 1


@pytest.fixture
def fake_results(tmp_path):
    """A results folder as a finished run leaves it, with made-up numbers."""
    results = tmp_path / "results"
    config = validate_config(
        {
            "results": str(results),
            "dataset": {"examples_per_class": [1, 2], "trial_seeds": [0, 1]},
            "generate": {"methods": ["dafusion"], "num_shards": 1},
            "train": {"methods": ["baseline", "dafusion"]},
            "model": {"build_tiny": True},
        }
    )
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, name in enumerate(["cat", "dog"]):
        Image.new("RGB", (16, 16), (200 * i, 50, 50)).save(images / f"{name}.png")
        rows.append({"image_id": f"img-{name}", "path": f"{name}.png", "split": "train", "label": i, "class_name": name,
                     "mask_path": None, "width": 16, "height": 16})
    meta = {"dataset_root": str(images), "mask_root": str(images), "classes": ["cat", "dog"], "dataset": "demo"}
    write_parquet(layout.manifest(str(results)), manifest_table(rows), meta)
    for m in config["train"]["methods"]:
        for k, s in layout.subsets_in(config):
            acc = 0.5 + 0.1 * (m == "dafusion") + 0.05 * s
            value = {"dataset": "demo", "method": m, "examples_per_class": k, "trial_seed": s, "split": "test",
                     "accuracy": acc, "mean_class_accuracy": acc - 0.01, "per_class_accuracy": {"cat": acc, "dog": acc},
                     "leakage_prevention": "data-centric" if m == "dafusion" else "none"}
            path = tmp_path / layout.metrics(str(results), m, k, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
    for k, s in layout.subsets_in(config):
        tokens = tmp_path / layout.tokens(str(results), k, s)
        tokens.mkdir(parents=True)
        (tokens / "loss.csv").write_text("step,class,loss\n" + "".join(f"{i},all,{1 - i / 100}\n" for i in range(1, 41)))
        grid = Path(layout.token_samples(str(results), k, s))
        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2 * 16, 2 * 16), (0, 200, 0)).save(grid)  # 2 classes x 2 samples of 16 px
        grid.with_suffix(".json").write_text(json.dumps({
            "tile_size": 16, "column_seeds": [1, 2],
            "rows": [{"class_name": "cat", "token": "<cat>", "prompt": "a photo of a <cat>"},
                     {"class_name": "dog", "token": "<dog>", "prompt": "a photo of a <dog>"}]}))
        path = tmp_path / layout.fid(str(results), "dafusion", k, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        per_class = {"cat": {"fid": 10.0 + k * s, "kid": 0.01}, "dog": {"fid": 20.0, "kid": 0.02}}
        path.write_text(json.dumps({"fid": 12.5 + k * s, "kid": 0.01, "kid_std": 0.002, "n_real": 2, "n_synthetic": 4, "per_class": per_class}))
        synthetic = [
            {"synthetic_id": f"s-{n}-{j}", "image_id": f"img-{n}", "label": i, "class_name": n, "method": "dafusion",
             "strength": 0.25 * (j + 1), "seed": j, "prompt": "p", "guidance_scale": 7.5, "num_inference_steps": 5,
             "model": "m", "image": encode_png(Image.new("RGB", (16, 16), (0, 0, 255))), "width": 16, "height": 16, "nsfw": None}
            for i, n in enumerate(["cat", "dog"]) for j in range(2)
        ]
        write_parquet(layout.shard(str(results), "dafusion", k, s, 0, 1), pa.Table.from_pylist(synthetic, schema=SHARD_SCHEMA))
    return config


def test_report_tables_and_page(fake_results, tmp_path):
    out = tmp_path / "report"
    build_report(fake_results, out)
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2  # methods x k x seeds
    assert {"dataset", "method", "examples_per_class", "trial_seed", "split", "accuracy", "mean_class_accuracy"} <= set(rows[0])
    with open(out / "summary_by_method.csv") as handle:
        by_method = {(r["method"], r["examples_per_class"]): r for r in csv.DictReader(handle)}
    assert float(by_method[("dafusion", "1")]["accuracy_mean"]) == pytest.approx(0.625)
    assert by_method[("dafusion", "1")]["n_trials"] == "2"
    # FID beside accuracy: the mean over the trial seeds of the method's synthetic source; none for real-only
    assert by_method[("dafusion", "2")]["synthetic_method"] == "dafusion"
    assert float(by_method[("dafusion", "2")]["fid_mean"]) == pytest.approx(12.5 + 0.5 * 2)
    assert by_method[("baseline", "1")]["fid_mean"] == ""
    page = (out / "index.html").read_text()
    assert "(+10.0)" in page  # dafusion vs baseline at each k
    beside = page.split("Accuracy beside the quality")[1].split("<h2>")[0]
    assert "<td><b>dafusion</b></td><td>2</td><td>62.5 ± 4.5</td><td>+10.0</td><td>dafusion</td><td>13.50</td><td>0.0100</td>" in beside
    assert "<td><b>baseline</b></td><td>1</td><td>52.5 ± 4.5</td><td>–</td><td>real only</td><td>–</td><td>–</td>" in beside
    # accuracy curve, inversion loss, token samples at the smallest and largest k of the first trial, one real/synthetic grid
    assert page.count("data:image/png;base64,") == 5
    assert "Token samples, k1_seed0" in page and "Token samples, k2_seed0" in page and "k2_seed1" not in page.split("Token samples")[-1][:40]
    assert "did the tokens learn?" in page
    assert "randomly initialised" in page  # the tiny-model warning
    assert "Fewer than 2048" in page
    # The study's Table 1: per-class FID / KID of each synthetic set at the largest k, mean over trial seeds
    assert "<h3>Per class at k=2: FID / KID" in page and "<td>dafusion</td><td>11.0 / 0.010</td><td>20.0 / 0.020</td>" in page
    assert "baseline: none, dafusion: data-centric" in page
    per_class_accuracy = page.split("<h2>Per-class test accuracy (%)</h2>")[1].split("<h2>")[0]
    assert "<h3>k=1</h3>" in per_class_accuracy and "<h3>k=2</h3>" in per_class_accuracy  # every k, not only the largest
    assert "<td>dafusion</td><td>62.5</td><td>62.5</td>" in per_class_accuracy.split("<h3>k=2</h3>")[1]
    assert [r["leakage_prevention"] for r in rows if r["method"] == "dafusion"] == ["data-centric"] * 4


def test_report_writes_what_a_comparison_reads(fake_results, tmp_path):
    out = tmp_path / "report"
    build_report(fake_results, out)
    run = json.loads((out / "run.json").read_text())
    assert (run["dataset"], run["examples_per_class"], run["trial_seeds"], run["baseline"], run["sweeps"]) == ("demo", [1, 2], [0, 1], "baseline", {})
    assert run["train_runs"] == ["baseline", "dafusion"]
    with open(out / "per_class_accuracy.csv") as handle:
        accuracy = {(r["method"], r["examples_per_class"], r["class"]): r for r in csv.DictReader(handle)}
    assert float(accuracy[("dafusion", "2", "cat")]["accuracy"]) == pytest.approx(0.625) and accuracy[("dafusion", "2", "cat")]["n_trials"] == "2"
    with open(out / "per_class_fid.csv") as handle:
        fid = {(r["method"], r["examples_per_class"], r["class"]): r for r in csv.DictReader(handle)}
    assert float(fid[("dafusion", "2", "cat")]["fid"]) == pytest.approx(11.0) and fid[("dafusion", "1", "dog")]["n_trials"] == "2"
    page = (out / "index.html").read_text()
    averaged = page.split("<h2>Test accuracy averaged over k</h2>")[1].split("<h2>")[0]
    assert "<td><b>dafusion</b></td><td>62.5 ± 4.5" in averaged and "+10.0" in averaged
    assert "Paper-compatible" not in page  # no run measured the papers' protocol


def test_the_paper_protocol_has_its_own_labelled_table(fake_results, tmp_path):
    for path in Path(fake_results["results"]).glob("train/*/*.json"):
        value = json.loads(path.read_text())
        path.write_text(json.dumps({**value, "paper_protocol": True, "paper_accuracy": value["accuracy"] + 0.2}))
    build_report(fake_results, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    paper = page.split("Paper-compatible protocol")[1].split("<h2>")[0]
    assert "Not a held-out number" in paper and "<td><b>dafusion</b></td><td>82.5 ± 4.5" in paper
    with open(tmp_path / "report" / "summary.csv") as handle:
        assert {round(float(r["paper_accuracy"]) - float(r["accuracy"]), 6) for r in csv.DictReader(handle)} == {0.2}


def test_the_zero_shot_clip_row_stands_beside_the_trained_classifiers(fake_results, tmp_path):
    config = validate_config({**fake_results, "zeroshot": {"model": "ViT-L-14", "pretrained": "openai"}})
    record = {"model": "ViT-L-14", "pretrained": "openai", "templates": ["a photo of a {}."], "split": "test",
              "accuracy": 0.9, "mean_class_accuracy": 0.85, "per_class_accuracy": {"cat": 0.9, "dog": 0.8}, "n_test": 10}
    path = Path(layout.zeroshot(config["results"]))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    assert layout.expected_outputs(config, ["dafusion"], ["baseline"])["zeroshot"] == [str(path)]
    build_report(config, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    accuracy = page.split("<h2>Test accuracy (%)</h2>")[1].split("<h2>")[0]
    assert accuracy.count("<td><b>zero-shot CLIP ViT-L-14 (openai)</b></td><td>90.0 <span") == 1
    assert "(+37.5)" in accuracy and "mean per-class accuracy 85.0%" in accuracy  # beside the baseline's 52.5
    assert json.loads((tmp_path / "report" / "run.json").read_text())["zeroshot"]["accuracy"] == 0.9


def test_token_samples_grid_labels_each_class_row(fake_results, tmp_path):
    from pipeline.report import token_samples_grid

    uri = token_samples_grid(Path(layout.token_samples(fake_results["results"], 1, 0)), thumb=20)
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    assert image.size == (150 + 2 * 20, 2 * 20)  # label column + 2 samples, 2 class rows
    assert image.getpixel((150 + 5, 5)) == (0, 200, 0)  # the samples, shrunk
    label_area = [image.getpixel((x, y)) for x in range(150) for y in range(40)]
    assert any(pixel != (255, 255, 255) for pixel in label_area)  # the class names are written


@pytest.mark.parametrize("classes, named", [(3, ["all", "c0", "c1", "c2"]), (15, ["all"])])
def test_inversion_loss_legend_names_classes_until_it_would_not_read(tmp_path, monkeypatch, classes, named):
    import pipeline.report as report

    path = tmp_path / "loss.csv"
    rows = [f"{step},all,1.0" for step in range(1, 21)] + [f"{step},c{c},1.0" for c in range(classes) for step in range(1, 21)]
    path.write_text("step,class,loss\n" + "\n".join(rows) + "\n")
    figures = []
    monkeypatch.setattr(report, "png_data_uri", lambda figure: figures.append(figure) or "data:")
    report.inversion_loss_plot({"k1_seed0": path})
    legend = figures[0].axes[-1].get_legend()
    assert sorted(text.get_text() for text in legend.get_texts()) == named


def test_strength_table_pools_oracle_scores_over_images_not_subsets(tmp_path):
    """A k = 1 subset with one image at t0 = 0.25 must not weigh as much as a k = 4 one with nine."""
    from pipeline.records import OracleScores
    from pipeline.report import strength_table

    records = []
    for k, n, agreement in ((1, 1, 0.0), (4, 9, 1.0)):
        scores = {"n": n, "agreement": agreement, "source_agreement": 1.0, "mean_abs_difference": 0.1 * (1 - agreement)}
        records.append(OracleScores("dafusion", k, 0, 0.8, {"0.25": scores}))
    html_table = strength_table([], records)
    row = next(line for line in html_table.split("<tr>") if "dafusion" in line)
    cells = [cell.split("</td>")[0] for cell in row.split("<td>")[1:]]
    assert cells[:3] == ["dafusion", "0.25", "10"]
    assert cells[5:] == ["90.0", "100.0", "0.010"], cells


def test_the_stage_reads_only_config_keys_its_settings_declare(fake_results, tmp_path):
    reads: set[str] = set()
    build_report(RecordingConfig(fake_results, reads), tmp_path / "report")
    assert undeclared_reads(reads, ReportSettings) == set()
