"""The comparison of runs: paired gains of a sweep, accuracy averaged over k, the normalised score,
and `python -m pipeline compare` over report folders."""

import csv
import json

import pytest

from pipeline import PipelineError
from pipeline.__main__ import main
from pipeline.compare import compare_runs, mean_over_k, normalised_scores, sweep_gains, accuracy_by_trial
from pipeline.report_html import confidence_interval_68


def row(method, k, seed, accuracy):
    return {"method": method, "examples_per_class": k, "trial_seed": seed, "accuracy": accuracy}


def test_a_gain_is_paired_per_trial_seed_and_averaged_over_k():
    rows = [row("baseline", k, s, 0.5 + 0.1 * s + 0.01 * k) for k in (1, 4) for s in (0, 1, 2)]
    rows += [row("dafusion", k, s, 0.5 + 0.1 * s + 0.01 * k + 0.02 * (s + 1)) for k in (1, 4) for s in (0, 1, 2)]
    by_trial = accuracy_by_trial(rows)
    gain = mean_over_k(by_trial, "dafusion", [1, 4], "baseline")
    # per seed the gain is 0.02, 0.04, 0.06: the seed-to-seed spread of 0.1 cancels in the pairing
    assert gain["n"] == 3 and gain["mean"] == pytest.approx(0.04)
    assert gain["ci68"] == pytest.approx(confidence_interval_68([0.02, 0.04, 0.06])[1])
    accuracy = mean_over_k(by_trial, "baseline", [1, 4])
    assert accuracy["mean"] == pytest.approx(0.625)


def test_a_trial_seed_missing_a_k_is_left_out_not_averaged_over_fewer():
    rows = [row("a", 1, 0, 0.2), row("a", 4, 0, 0.4), row("a", 1, 1, 0.9)]
    entry = mean_over_k(accuracy_by_trial(rows), "a", [1, 4])
    assert entry["n"] == 1 and entry["mean"] == pytest.approx(0.3)
    assert mean_over_k(accuracy_by_trial(rows), "a", [8]) is None


def test_a_sweep_compares_each_variant_with_the_baseline_and_the_reference_of_that_variant():
    variants = [
        {"overrides": {"train.synthetic_probability": p}, "runs": {
            "baseline": "baseline",
            "dafusion": f"dafusion@train.synthetic_probability={p}",
            "real-guidance": f"real-guidance@train.synthetic_probability={p}",
        }}
        for p in (0.3, 0.7)
    ]  # fmt: skip
    rows = [row("baseline", 1, s, 0.5) for s in (0, 1)]
    for p, (da, rg) in {0.3: (0.60, 0.55), 0.7: (0.52, 0.58)}.items():
        rows += [row(f"dafusion@train.synthetic_probability={p}", 1, s, da) for s in (0, 1)]
        rows += [row(f"real-guidance@train.synthetic_probability={p}", 1, s, rg) for s in (0, 1)]
    gains = {(g["variant"], g["method"]): g for g in sweep_gains(rows, variants, [1], "baseline", "real-guidance")}
    assert set(gains) == {(v, m) for v in ("synthetic_probability=0.3", "synthetic_probability=0.7") for m in ("dafusion", "real-guidance")}
    assert gains[("synthetic_probability=0.3", "dafusion")]["over_baseline"]["mean"] == pytest.approx(0.10)
    assert gains[("synthetic_probability=0.3", "dafusion")]["over_reference"]["mean"] == pytest.approx(0.05)
    assert gains[("synthetic_probability=0.7", "dafusion")]["over_reference"]["mean"] == pytest.approx(-0.06)
    assert gains[("synthetic_probability=0.7", "real-guidance")]["over_reference"] is None  # not against itself


def test_the_normalised_score_ranks_within_each_dataset_then_averages():
    scores = normalised_scores({"coco": {"a": 0.3, "b": 0.5, "c": 0.4}, "voc": {"a": 0.9, "b": 0.7, "c": 0.8, "only-voc": 1.0}})
    assert set(scores) == {"a", "b", "c"}  # only-voc is not measured on coco
    assert scores["a"]["per_dataset"] == {"coco": 0.0, "voc": 1.0} and scores["c"]["mean"] == pytest.approx(0.5)
    assert normalised_scores({"x": {"a": 0.5, "b": 0.5}})["a"]["mean"] == 0.0  # a tie scores 0, not NaN


def write_report(folder, dataset, accuracies, sweeps=None):
    """A report folder as pipeline.report leaves it, with made-up accuracies {method: acc}."""
    folder.mkdir(parents=True)
    with open(folder / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "examples_per_class", "trial_seed", "accuracy"])
        writer.writeheader()
        for method, accuracy in accuracies.items():
            for k in (1, 4):
                for seed in (0, 1):
                    writer.writerow({"method": method, "examples_per_class": k, "trial_seed": seed, "accuracy": accuracy + 0.01 * seed})
    (folder / "per_class_fid.csv").write_text("method,examples_per_class,class,fid,kid,n_trials\ndafusion,1,cat,55.5,0.01,2\n")
    (folder / "run.json").write_text(json.dumps({
        "dataset": dataset, "examples_per_class": [1, 4], "trial_seeds": [0, 1], "train_runs": list(accuracies),
        "baseline": "baseline", "reference": None, "sweeps": sweeps or {}, "model_id": "m", "backbone": "b",
        "zeroshot": {"model": "ViT-L-14", "pretrained": "openai", "accuracy": 0.77, "mean_class_accuracy": 0.7, "n_test": 9} if dataset == "coco" else None,
    }))  # fmt: skip
    return folder


def test_compare_refuses_runs_of_different_datasets_unless_asked_for_the_normalised_score(tmp_path):
    coco = write_report(tmp_path / "coco" / "report", "coco", {"baseline": 0.3, "dafusion": 0.4})
    voc = write_report(tmp_path / "voc" / "report", "voc", {"baseline": 0.6, "dafusion": 0.5})
    with pytest.raises(PipelineError, match=r"different datasets \(.*coco is 'coco', .*voc is 'voc'\).*--across-datasets"):
        compare_runs([tmp_path / "coco", tmp_path / "voc"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    result = compare_runs([tmp_path / "coco", voc], tmp_path / "out", across_datasets=True)
    assert result["normalised"]["dafusion"]["per_dataset"] == {str(tmp_path / "coco"): 1.0, str(voc): 0.0}
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Normalised score across datasets" in page and "55.5" in page  # the per-class FID table
    assert "<td><b>zero-shot CLIP</b></td><td>77.0 " in page
    with open(tmp_path / "out" / "scores.csv") as handle:
        scores = list(csv.DictReader(handle))
    assert {(r["dataset"], r["method"], r["normalised_score"]) for r in scores} >= {("coco", "dafusion", "1.0"), ("voc", "baseline", "1.0")}
    assert coco.is_dir()


def test_compare_draws_each_runs_sweeps(tmp_path):
    sweeps = {"alpha": [{"overrides": {"train.synthetic_probability": p}, "runs": {"baseline": "baseline", "dafusion": f"dafusion@train.synthetic_probability={p}"}} for p in (0.3, 0.7)]}
    write_report(tmp_path / "a" / "report", "demo", {"baseline": 0.3, "dafusion@train.synthetic_probability=0.3": 0.35, "dafusion@train.synthetic_probability=0.7": 0.45}, sweeps)
    compare_runs([tmp_path / "a"], tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Sweep alpha: train.synthetic_probability" in page and "+15.0" in page and "data:image/png;base64," in page


def test_the_command_line_names_a_folder_without_a_report(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "missing: no summary.csv or run.json" in capsys.readouterr().err
