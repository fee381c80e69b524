import subprocess
import sys

import pytest

STAGES = ["download", "build-model", "build-demo", "prepare", "fewshot", "invert", "merge-tokens", "token-samples", "generate",
          "export", "fid-features", "fid", "train", "report"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(stage):
    proc = run(stage, "--help")
    assert proc.returncode == 0
    assert "--config" in proc.stdout


def test_bad_config_is_one_line_not_a_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: -3\n")
    proc = run("report", "--config", str(config), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "train.steps" in proc.stderr
