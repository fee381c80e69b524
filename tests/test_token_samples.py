"""Token sample grids: one row per class, columns sharing their start noise, legend beside the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RecordingConfig, undeclared_reads

from pipeline import PipelineError
from pipeline.config import validate_config
from pipeline.layout import grid_legend
from pipeline.settings.token_samples import TokenSampleSettings
from pipeline.tiny_sd import build_tiny_sd
from pipeline.token_samples import column_seeds, render_token_samples
from pipeline.tokens import token_for_class, write_token_files

CLASSES = ["zero", "traffic light", "two"]
TILE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=TILE, seed=0)


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> Path:
    """Two-vector tokens with random embeddings of the tiny text encoder's width (64), far apart per class."""
    out = tmp_path_factory.mktemp("tokens")
    generator = torch.Generator().manual_seed(0)
    class_tokens = {name: token_for_class(name) for name in CLASSES}
    vectors = {token: 3 * torch.randn(2, 64, generator=generator) for token in class_tokens.values()}
    write_token_files(out, class_tokens, vectors, {"num_vectors": 2, "model": "tiny"})
    return out


def make_config(model_dir: Path, **samples) -> dict:
    samples = {"per_class": 2, "steps": 3, **samples}
    return validate_config({"seed": 0, "device": "cpu", "model": {"id": str(model_dir), "resolution": TILE}, "invert": {"samples": samples}})


@pytest.fixture(scope="module")
def rendered(model_dir, tokens_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("samples") / "k1_seed0.png"
    legend = render_token_samples(make_config(model_dir), tokens_dir, out)
    return out, legend


def tiles(grid: Path) -> np.ndarray:
    """The grid as [rows, columns, TILE, TILE, 3] int16 pixels."""
    pixels = np.asarray(Image.open(grid).convert("RGB"), dtype=np.int16)
    rows, columns = pixels.shape[0] // TILE, pixels.shape[1] // TILE
    return pixels.reshape(rows, TILE, columns, TILE, 3).transpose(0, 2, 1, 3, 4)


def test_grid_has_one_row_per_class_and_rows_differ(rendered):
    grid, _ = rendered
    assert Image.open(grid).size == (2 * TILE, len(CLASSES) * TILE)
    cells = tiles(grid)
    # Within a column every row starts from the same noise: rows differ only through their token.
    for i in range(len(CLASSES)):
        for j in range(i + 1, len(CLASSES)):
            assert np.abs(cells[i] - cells[j]).mean() > 1.0, (CLASSES[i], CLASSES[j])
    # Within a row the columns start from different noise.
    assert all(np.abs(cells[i, 0] - cells[i, 1]).mean() > 1.0 for i in range(len(CLASSES)))


def test_legend_names_each_row_and_column(rendered, model_dir, tokens_dir):
    grid, legend = rendered
    assert json.loads(Path(grid_legend(grid)).read_text()) == legend
    assert legend["image"] == grid.name and legend["tile_size"] == TILE
    assert [row["class_name"] for row in legend["rows"]] == CLASSES
    assert legend["rows"][1] == {"class_name": "traffic light", "token": "<traffic-light>", "prompt": "a photo of a <traffic-light>"}
    assert legend["column_seeds"] == column_seeds(0, 2) and len(set(legend["column_seeds"])) == 2
    assert legend["steps"] == 3 and legend["model"] == str(model_dir) and legend["tokens_dir"] == str(tokens_dir)


def test_rendering_is_reproducible_and_seeded(rendered, model_dir, tokens_dir, tmp_path):
    grid, _ = rendered
    again = tmp_path / "again.png"
    render_token_samples(make_config(model_dir), tokens_dir, again)
    assert np.array_equal(tiles(again), tiles(grid))

    other_seed = tmp_path / "other.png"
    config = make_config(model_dir)
    config["seed"] = 1
    render_token_samples(config, tokens_dir, other_seed)
    assert np.abs(tiles(other_seed) - tiles(grid)).mean() > 1.0


def test_bad_inputs(model_dir, tokens_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"\.png"):
        render_token_samples(make_config(model_dir), tokens_dir, tmp_path / "grid.jpg")
    with pytest.raises(PipelineError, match="tokens.json"):
        render_token_samples(make_config(model_dir), tmp_path / "no-tokens", tmp_path / "grid.png")
    assert not list(tmp_path.glob("grid*"))


def test_the_stage_reads_only_config_keys_its_settings_declare(model_dir, tokens_dir, tmp_path):
    reads: set[str] = set()
    render_token_samples(RecordingConfig(make_config(model_dir, per_class=1, steps=1), reads), tokens_dir, tmp_path / "s.png")
    assert undeclared_reads(reads, TokenSampleSettings) == set()
