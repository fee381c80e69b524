"""The benchmark scripts, at the smallest settings on CPU: they are what a session with a lent GPU
runs in its few minutes (benchmarks/gpu/run_on_device.sh), so they must not break unseen here.
Each runs as a user runs it, in a subprocess with a bounded wait."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str, timeout_s: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    try:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} {' '.join(args)} did not finish within {timeout_s} s; stderr so far:\n{exc.stderr}")


def table_rows(stdout: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown table rows whose first cell starts with `first_cell`."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in stdout.splitlines() if line.startswith("|")]
    return [row for row in rows if row[0].startswith(first_cell)]


def test_bench_generate_gives_the_references_bytes_and_judges_the_target():
    done = run_benchmark("bench_generate.py", "--images", "2", "--per-image", "2", "--steps", "4",
                         "--batch-size", "2", "4", "--resolution", "32", "--target", "0.01")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ours = table_rows(done.stdout, "ours: generate_shard")
    assert [row[1] for row in ours] == ["2", "4"]
    assert all(row[2] == "4" and row[-1] == "0" for row in ours), f"ours must equal the reference byte for byte: {ours}"
    assert float(table_rows(done.stdout, "reference: 1 img2img")[0][4]) > 0
    assert [row[1] for row in table_rows(done.stdout, "ours at batch size")] == ["4", "8"]
    assert re.search(r"target 0.01 images/s: met: best [0-9.]+ images/s", done.stdout), done.stdout


def test_bench_generate_refuses_settings_that_run_no_step_before_building_a_model():
    done = run_benchmark("bench_generate.py", "--steps", "2", "--model", "random-sd1", timeout_s=60)
    assert done.returncode == 2
    assert "num_inference_steps=2 at strength 0.25 runs no denoising step" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_invert_times_both_loops():
    done = run_benchmark("bench_invert.py", "--device", "cpu", "--steps", "2", "--batch-size", "1", "--resolution", "32",
                         "--repeats", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = table_rows(done.stdout, "tiny random SD")
    straightforward, ours, speed_up = float(row[5]), float(row[6]), float(row[7].removesuffix("x"))
    # the printed rates are rounded to 0.01, so their ratio may differ from the printed one in the last digit
    assert straightforward > 0 and ours > 0 and speed_up == pytest.approx(ours / straightforward, abs=0.01)


def test_bench_fid_measures_the_host_side_per_thread_count():
    done = run_benchmark("bench_fid.py", "--sizes", "64", "--batch-sizes", "2", "--images", "2", "--host-images", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    host = table_rows(done.stdout, "64x64 PNG")
    assert host and all(float(row[-1]) > 0 for row in host)
    assert [row[0] for row in table_rows(done.stdout, "3000")] == ["3000"]


def test_bench_generate_memory_says_it_needs_a_gpu():
    done = run_benchmark("bench_generate_memory.py", timeout_s=60)
    assert "no CUDA device visible" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_the_device_pretraining_plans_its_unet_steps_from_the_calibration(tmp_path):
    """pretrain_demo_on_device.sh gives the UNet what its budget has left after the VAE phase."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("plan_pretraining", REPO / "benchmarks" / "gpu" / "plan_pretraining.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    # 400 s left, 90 reserved, 5000 VAE steps of 0.01 s: 260 s at 0.02 s a step is 13,000 steps
    assert plan.affordable_steps(400, 90, 0.02, 0.01, 5000, 1000, 60000) == 13000
    assert plan.affordable_steps(400, 90, 0.02, 0.01, 5000, 1000, 8000) == 8000  # capped
    assert plan.affordable_steps(100, 90, 0.02, 0.01, 5000, 1000, 60000) == 1000  # never fewer than one round

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "demo_model.json").write_text(json.dumps({"settings": {"unet_steps": 300, "vae_steps": 200}, "train_seconds": {"unet": 6.0, "vae": 2.0}}))
    done = run_benchmark("gpu/plan_pretraining.py", "--calibration", str(calibration), "--config", "config/demo-model-gpu.yaml",
                         "--set", "demo_model.vae.steps=1000", "--left", "400", "--reserve", "90", timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0.0200", "0.0100", "15000"]  # (400 - 90 - 10) / 0.02


def test_the_text_to_image_check_scores_every_class_of_a_demo_model(tmp_path, one_thread):
    """demo_text_check.py is what pretrain_demo_on_device.sh reads a new model with: one row per class."""
    from pipeline import demo_model as dm
    from pipeline.demo import CLASS_NAMES, NAMED_CLASSES

    tiny = dm.PretrainSettings(
        seed=0, resolution=32, corpus_images=24, max_objects=2, named_classes=NAMED_CLASSES, caption_dropout=0.25,
        vae_steps=2, vae_batch_size=2, vae_learning_rate=1e-3, vae_crop=16, kl_weight=1e-9,
        unet_steps=3, unet_batch_size=2, unet_learning_rate=1e-3, warmup_steps=1, cpu_threads=1, checkpoint_every=1,
    )
    model = dm.pretrain_demo_model(tiny, tmp_path / "model")
    done = run_benchmark("gpu/demo_text_check.py", "--model", str(model), "--samples", "1")
    assert done.returncode == 0, done.stderr
    rows = {row[0]: row[1:] for row in table_rows(done.stdout, "") if row[0] in CLASS_NAMES}
    assert list(rows) == list(CLASS_NAMES)
    assert all(re.fullmatch(r"(0|100)%", cell) for cells in rows.values() for cell in cells[1:])  # one sample: all or nothing
    assert [cells[0] for cells in rows.values()] == ["yes"] * 5 + ["no"] * 5
