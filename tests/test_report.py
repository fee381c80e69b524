import csv
import json
import math

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import layout
from pipeline.config import validate_config
from pipeline.io import encode_png, write_parquet
from pipeline.manifest import SHARD_SCHEMA, manifest_table
from pipeline.report import aggregate, build_report, confidence_interval_68


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
                     "accuracy": acc, "mean_class_accuracy": acc - 0.01, "per_class_accuracy": {"cat": acc, "dog": acc}}
            path = tmp_path / layout.metrics(str(results), m, k, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
    for k, s in layout.subsets_in(config):
        tokens = tmp_path / layout.tokens(str(results), k, s)
        tokens.mkdir(parents=True)
        (tokens / "loss.csv").write_text("step,class,loss\n" + "".join(f"{i},all,{1 - i / 100}\n" for i in range(1, 41)))
        path = tmp_path / layout.fid(str(results), "dafusion", k, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fid": 12.5, "kid": 0.01, "kid_std": 0.002, "n_real": 2, "n_synthetic": 4}))
        synthetic = [
            {"synthetic_id": f"s-{n}-{j}", "image_id": f"img-{n}", "label": i, "class_name": n, "method": "dafusion",
             "strength": 0.25 * (j + 1), "seed": j, "prompt": "p", "guidance_scale": 7.5, "num_inference_steps": 5,
             "model": "m", "image": encode_png(Image.new("RGB", (16, 16), (0, 0, 255))), "width": 16, "height": 16, "nsfw": None}
            for i, n in enumerate(["cat", "dog"]) for j in range(2)
        ]
        write_parquet(layout.shard(str(results), "dafusion", k, s, 0, 1), pa.Table.from_pylist(synthetic, schema=SHARD_SCHEMA))
    return config


def test_token_methods_match_the_generate_stage():
    from pipeline.generate import METHODS

    assert {name for name, method in METHODS.items() if method.needs_tokens} == layout.TOKEN_METHODS


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
    page = (out / "index.html").read_text()
    assert "(+10.0)" in page  # dafusion vs baseline at each k
    assert page.count("data:image/png;base64,") == 3  # accuracy curve, inversion loss, one grid
    assert "did the tokens learn?" in page
    assert "randomly initialised" in page  # the tiny-model warning
    assert "Fewer than 2048" in page
