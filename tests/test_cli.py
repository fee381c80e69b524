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


def error_line(proc) -> str:
    """The one line a failed stage prints; fails the test on a traceback or more lines."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_missing_tokens_folder_is_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    proc = run("generate", "--config", str(config), "--subset", str(tmp_path / "s.parquet"), "--tokens",
               str(tmp_path / "nowhere"), "--method", "dafusion", "--out", str(tmp_path / "shard.parquet"))
    line = error_line(proc)
    assert str(tmp_path / "nowhere") in line and "Expected the output folder of `invert`" in line


@pytest.mark.parametrize("content", [b"", b"PAR1\x00\x00"], ids=["zero bytes", "cut off"])
def test_unreadable_manifest_is_one_line(tmp_path, content):
    config, manifest = tmp_path / "c.yaml", tmp_path / "manifest.parquet"
    config.write_text("{}\n")
    manifest.write_bytes(content)
    proc = run("fewshot", "--config", str(config), "--manifest", str(manifest), "--examples-per-class", "1",
               "--trial-seed", "0", "--out", str(tmp_path / "subset.parquet"))
    assert error_line(proc).startswith(f"error: {manifest} is not a readable Parquet file")
