"""generate: deterministic, shard- and resume-invariant shards; SDEdit and txt2img equal stock diffusers,
inpainting keeps the source exactly outside the re-generated region."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import PipelineError, sdedit
from pipeline.config import validate_config
from pipeline.generate import generate_shard, plan_batches, plan_items
from pipeline.io import read_metadata, write_parquet
from pipeline.manifest import SHARD_SCHEMA, manifest_table, read_manifest, read_shards
from pipeline.rng import derive_seed
from pipeline.tiny_sd import build_tiny_sd
from pipeline.tokens import add_tokens_to_pipeline, token_for_class, write_token_files

CLASSES = ["cat", "dog house"]
# (image_id, class index, size): sizes differ so outputs must be resized back per image.
SOURCES = [("img-3", 0, (64, 64)), ("img-1", 1, (48, 40)), ("img-0", 0, (64, 48)), ("img-2", 1, (64, 64))]
# Object box (left, top, right, bottom) of the masked subset, within every source size.
BOX = (12, 10, 30, 26)
DILATION = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=64, seed=0)


def write_subset(root: Path, with_masks: bool) -> Path:
    """SOURCES as random-noise PNGs; with masks, each labels the object BOX with the value 1."""
    rows = []
    for image_id, label, (width, height) in SOURCES:
        pixels = np.random.default_rng(len(rows)).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{image_id}.png")
        if with_masks:
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 1
            Image.fromarray(mask).save(root / f"{image_id}-mask.png")
        rows.append(
            {
                "image_id": image_id,
                "path": f"{image_id}.png",
                "split": "train",
                "label": label,
                "class_name": CLASSES[label],
                "mask_path": f"{image_id}-mask.png" if with_masks else None,
                "width": width,
                "height": height,
            }
        )
    path = root / "subset.parquet"
    write_parquet(path, manifest_table(rows), {"dataset_root": str(root), "mask_root": None, "classes": CLASSES})
    return path


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return write_subset(tmp_path_factory.mktemp("data"), with_masks=False)


@pytest.fixture(scope="module")
def masked_subset(tmp_path_factory) -> Path:
    return write_subset(tmp_path_factory.mktemp("masked"), with_masks=True)


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> Path:
    """Two-vector tokens with random embeddings of the tiny text encoder's width (64)."""
    out = tmp_path_factory.mktemp("tokens")
    generator = torch.Generator().manual_seed(0)
    class_tokens = {name: token_for_class(name) for name in CLASSES}
    vectors = {token: torch.randn(2, 64, generator=generator) for token in class_tokens.values()}
    write_token_files(out, class_tokens, vectors, {"num_vectors": 2, "model": "tiny"})
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(model_dir: Path, **overrides) -> dict:
    generate = {"num_per_image": 2, "num_intensities": 4, "num_inference_steps": 4, "batch_size": 4, "flush_every": 1}
    generate.update(overrides)
    config = {"seed": 0, "device": "cpu", "model": {"id": str(model_dir), "resolution": 64}, "generate": generate}
    return validate_config(config)


def run(config, subset, tokens_dir, out_dir: Path, method="dafusion", num_shards=1) -> list[dict]:
    paths = [out_dir / f"shard-{i}-of-{num_shards}.parquet" for i in range(num_shards)]
    for i, path in enumerate(paths):
        generate_shard(config, subset, tokens_dir, method, i, num_shards, path)
    return sorted(read_shards(paths), key=lambda row: row["synthetic_id"])


@pytest.fixture(scope="module")
def one_shard(model_dir, subset, tokens_dir, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("one")
    run(make_config(model_dir), subset, tokens_dir, out_dir)
    return out_dir / "shard-0-of-1.parquet"


@pytest.fixture(scope="module")
def rows(one_shard) -> list[dict]:
    return sorted(read_shards([one_shard]), key=lambda row: row["synthetic_id"])


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.int16)


def test_rows_follow_the_method(rows, one_shard):
    assert len(rows) == len(SOURCES) * 2
    assert [row["synthetic_id"] for row in read_shards([one_shard])] == [
        f"dafusion-{i}-{j}" for i in sorted(s[0] for s in SOURCES) for j in (0, 1)
    ]
    sizes = {image_id: size for image_id, _, size in SOURCES}
    for row in rows:
        assert row["strength"] in {0.25, 0.5, 0.75, 1.0}
        assert row["prompt"] == f"a photo of a {token_for_class(row['class_name'])}"
        assert CLASSES[row["label"]] == row["class_name"]
        assert (row["width"], row["height"]) == sizes[row["image_id"]] == Image.open(io.BytesIO(row["image"])).size
        assert (row["num_inference_steps"], row["guidance_scale"], row["nsfw"]) == (4, 7.5, None)
    assert len({row["seed"] for row in rows}) == len(rows)
    by_id = {row["synthetic_id"]: row for row in rows}
    assert not np.array_equal(pixels(by_id["dafusion-img-0-0"]), pixels(by_id["dafusion-img-0-1"]))


def test_shard_metadata(one_shard, tokens_dir):
    meta = read_metadata(one_shard)
    assert meta["method"] == "dafusion" and (meta["shard"], meta["num_shards"]) == (0, 1)
    assert len(meta["config_hash"]) == 16 and (meta["device"], meta["dtype"]) == ("cpu", "float32")
    assert meta["tokens_sha256"] == hashlib.sha256((tokens_dir / "learned_embeds.safetensors").read_bytes()).hexdigest()
    assert not one_shard.with_name(one_shard.name + ".partial").exists()


def test_shard_count_does_not_change_images(rows, model_dir, subset, tokens_dir, tmp_path):
    three = run(make_config(model_dir), subset, tokens_dir, tmp_path, num_shards=3)
    assert [row["synthetic_id"] for row in three] == [row["synthetic_id"] for row in rows]
    assert [row["image"] for row in three] == [row["image"] for row in rows]


def test_batch_size_one_keeps_draws_and_matches_stock_img2img(rows, model_dir, subset, tokens_dir, tmp_path):
    """Seeds, strengths and prompts do not depend on the batch size; pixels only up to float summation
    order. At batch size 1 a row's seed and settings give diffusers' own img2img output exactly."""
    config = make_config(model_dir, batch_size=1)
    single = run(config, subset, tokens_dir, tmp_path)
    keys = ("synthetic_id", "seed", "strength", "prompt")
    assert [tuple(r[k] for k in keys) for r in single] == [tuple(r[k] for k in keys) for r in rows]
    for a, b in zip(single, rows):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2

    pipe = sdedit.load_img2img(config["model"], config["generate"], torch.device("cpu"), torch.float32)
    add_tokens_to_pipeline(pipe, tokens_dir, CLASSES)
    row = next(r for r in single if r["strength"] >= 0.5 and r["width"] == r["height"] == 64)
    reference = pipe(
        image=Image.open(subset.parent / f"{row['image_id']}.png").convert("RGB"),
        prompt=row["prompt"],
        strength=row["strength"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        generator=torch.Generator().manual_seed(row["seed"]),
    ).images[0]
    np.testing.assert_array_equal(pixels(row), np.asarray(reference, dtype=np.int16))


def test_real_guidance_and_class_agnostic_strengths_and_prompts(model_dir, subset, tmp_path):
    # A fixed generate.strength applies to class-agnostic; real-guidance keeps its own t0 = 0.5.
    # Guidance scale 1 also covers the unguided path (no unconditional half).
    config = make_config(model_dir, strength=0.75, num_per_image=1, guidance_scale=1.0)
    real = run(config, subset, None, tmp_path / "rg", method="real-guidance")
    assert {row["strength"] for row in real} == {0.5}
    assert {(row["class_name"], row["prompt"]) for row in real} == {(c, f"a photo of a {c}") for c in CLASSES}
    agnostic = run(config, subset, None, tmp_path / "ca", method="class-agnostic")
    assert {(row["prompt"], row["strength"]) for row in agnostic} == {("a photo", 0.75)}
    assert {row["seed"] for row in real}.isdisjoint(row["seed"] for row in agnostic)


def test_resume_after_crash_gives_the_same_shard(one_shard, model_dir, subset, tokens_dir, tmp_path, monkeypatch):
    config = make_config(model_dir)
    batches = plan_batches(plan_items(config, "dafusion", read_manifest(subset)[0]), config["generate"]["batch_size"])
    assert len(batches) >= 2
    out = tmp_path / "shard-0-of-1.parquet"
    real_sdedit = sdedit.sdedit
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated preemption")
        return real_sdedit(*args, **kwargs)

    monkeypatch.setattr(sdedit, "sdedit", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert not out.exists()
    assert len(list(tmp_path.glob("shard-0-of-1.parquet.partial/part-*.parquet"))) == 1

    monkeypatch.setattr(sdedit, "sdedit", real_sdedit)
    summary = generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert (summary["resumed"], summary["generated"]) == (len(batches[0]), len(SOURCES) * 2 - len(batches[0]))
    assert not (tmp_path / "shard-0-of-1.parquet.partial").exists()
    assert read_shards([out]) == read_shards([one_shard])
    assert read_metadata(out) == read_metadata(one_shard)


def test_stale_partial_from_another_run_is_discarded(model_dir, subset, tokens_dir, tmp_path):
    out = tmp_path / "shard.parquet"
    stale = tmp_path / "shard.parquet.partial"
    stale.mkdir()
    (stale / "run.json").write_text('{"config_hash": "old"}')
    write_parquet(stale / "part-00000.parquet", SHARD_SCHEMA.empty_table())
    summary = generate_shard(make_config(model_dir, num_per_image=1), subset, tokens_dir, "dafusion", 0, 1, out)
    assert (summary["resumed"], summary["generated"], summary["images"]) == (0, len(SOURCES), len(SOURCES))


def test_errors(model_dir, subset, tokens_dir, tmp_path):
    config = make_config(model_dir)
    with pytest.raises(PipelineError, match="unknown generation method 'txt2vid'"):
        generate_shard(config, subset, tokens_dir, "txt2vid", 0, 1, tmp_path / "a.parquet")
    with pytest.raises(PipelineError, match="tokens folder"):
        generate_shard(config, subset, None, "dafusion", 0, 1, tmp_path / "a.parquet")
    with pytest.raises(PipelineError, match="shard 2 of 2"):
        generate_shard(config, subset, tokens_dir, "dafusion", 2, 2, tmp_path / "a.parquet")
    with pytest.raises(PipelineError, match="runs no denoising step"):
        generate_shard(make_config(model_dir, num_inference_steps=2), subset, tokens_dir, "dafusion", 0, 1, tmp_path / "a.parquet")

    cat_only = tmp_path / "tokens"
    cat_only.mkdir()
    write_token_files(cat_only, {"cat": "<cat>"}, {"<cat>": torch.zeros(1, 64)}, {"num_vectors": 1})
    with pytest.raises(PipelineError, match="dog house"):
        generate_shard(config, subset, cat_only, "dafusion", 0, 1, tmp_path / "b.parquet")
    assert not (tmp_path / "b.parquet").exists()


def test_undecodable_source_is_named(model_dir, subset, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png at all")
    row = {"image_id": "bad", "path": "bad.png", "split": "train", "label": 0, "class_name": "cat",
           "mask_path": None, "width": 8, "height": 8}  # fmt: skip
    bad_subset = broken / "subset.parquet"
    write_parquet(bad_subset, manifest_table([row]), {"dataset_root": str(broken), "mask_root": None, "classes": CLASSES})
    with pytest.raises(PipelineError, match="bad.png"):
        generate_shard(make_config(model_dir), bad_subset, None, "real-guidance", 0, 1, tmp_path / "c.parquet")
    assert not (tmp_path / "c.parquet").exists()


def test_txt2img_rows_shards_and_stock_text_to_image(model_dir, subset, tmp_path):
    templates = ["a photo of a {}", "a drawing of a {}"]
    config = make_config(model_dir, txt2img_templates=templates)
    rows = run(config, subset, None, tmp_path / "one", method="txt2img")
    assert [row["synthetic_id"] for row in rows] == sorted(f"txt2img-{s[0]}-{j}" for s in SOURCES for j in (0, 1))
    label_of = {image_id: label for image_id, label, _ in SOURCES}
    for row in rows:
        assert row["strength"] is None and (row["width"], row["height"]) == (64, 64)
        assert row["label"] == label_of[row["image_id"]]
        assert row["prompt"] in {t.format(row["class_name"]) for t in templates}
        assert row["seed"] == derive_seed(0, "generate", "txt2img", row["image_id"], int(row["synthetic_id"][-1]))
    assert {row["prompt"].split()[1] for row in rows} == {"photo", "drawing"}
    three = run(config, subset, None, tmp_path / "three", method="txt2img", num_shards=3)
    assert [row["image"] for row in three] == [row["image"] for row in rows]

    from diffusers import StableDiffusionPipeline

    single = run(make_config(model_dir, txt2img_templates=templates, num_per_image=1, batch_size=1), subset, None,
                 tmp_path / "single", method="txt2img")  # fmt: skip
    pipe = sdedit.load_img2img(config["model"], config["generate"], torch.device("cpu"), torch.float32)
    stock = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    row = single[0]
    reference = stock(
        row["prompt"],
        height=64,
        width=64,
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        generator=torch.Generator().manual_seed(row["seed"]),
    ).images[0]
    np.testing.assert_array_equal(pixels(row), np.asarray(reference, dtype=np.int16))


def grown_box(width: int, height: int) -> np.ndarray:
    """BOX grown by DILATION pixels (Euclidean), as a boolean [H, W] map."""
    x, y = np.arange(width)[None, :], np.arange(height)[:, None]
    dx = np.maximum(np.maximum(BOX[0] - x, x - (BOX[2] - 1)), 0)
    dy = np.maximum(np.maximum(BOX[1] - y, y - (BOX[3] - 1)), 0)
    return dx**2 + dy**2 <= DILATION**2


def test_inpainting_keeps_the_source_outside_the_region(model_dir, masked_subset, tokens_dir, tmp_path):
    config = make_config(model_dir, num_per_image=1, mask_dilation=DILATION)
    fg = run(config, masked_subset, tokens_dir, tmp_path / "fg", method="inpaint-fg")
    bg = run(config, masked_subset, tokens_dir, tmp_path / "bg", method="inpaint-bg")
    assert len(fg) == len(bg) == len(SOURCES)
    for row in fg + bg:
        assert row["prompt"] == f"a photo of a {token_for_class(row['class_name'])}"
        assert row["strength"] in {0.25, 0.5, 0.75, 1.0}
    for fg_row, bg_row in zip(fg, bg):
        source = np.asarray(Image.open(masked_subset.parent / f"{fg_row['image_id']}.png"), dtype=np.int16)
        object_region = grown_box(fg_row["width"], fg_row["height"])
        # fg re-generates exactly what bg keeps, and the other way round.
        for row, regenerated in ((fg_row, object_region), (bg_row, ~object_region)):
            image = pixels(row)
            assert image.shape == source.shape
            np.testing.assert_array_equal(image[~regenerated], source[~regenerated])
            assert np.abs(image[regenerated] - source[regenerated]).mean() > 5

    three = run(config, masked_subset, tokens_dir, tmp_path / "three", method="inpaint-fg", num_shards=3)
    assert [row["image"] for row in three] == [row["image"] for row in fg]


def test_inpainting_needs_masks(model_dir, subset, tokens_dir, tmp_path):
    with pytest.raises(PipelineError, match="inpaint-bg.*background.*image 'img-0' and 3 more"):
        generate_shard(make_config(model_dir), subset, tokens_dir, "inpaint-bg", 0, 1, tmp_path / "a.parquet")
    assert not (tmp_path / "a.parquet").exists()

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "blank.png")
    row = {"image_id": "red", "path": "red.png", "split": "train", "label": 0, "class_name": "cat",
           "mask_path": "blank.png", "width": 8, "height": 8}  # fmt: skip
    blank_subset = tmp_path / "subset.parquet"
    write_parquet(blank_subset, manifest_table([row]), {"dataset_root": str(tmp_path), "mask_root": None, "classes": CLASSES})
    with pytest.raises(PipelineError, match="blank.png of image 'red' marks no object pixel"):
        generate_shard(make_config(model_dir), blank_subset, tokens_dir, "inpaint-fg", 0, 1, tmp_path / "b.parquet")
    assert not (tmp_path / "b.parquet").exists()


def test_blended_latents_follow_the_keep_mask(model_dir, subset):
    """Inside sdedit: kept latents end as the source's, re-generated ones as plain SDEdit's."""
    config = make_config(model_dir)
    pipe = sdedit.load_img2img(config["model"], config["generate"], torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        dist = sdedit.encode_source(pipe, Image.open(subset.parent / "img-3.png").convert("RGB"), 64)
        clean, noise = sdedit.start_latents(pipe, dist, torch.Generator().manual_seed(0))
        prompt = sdedit.encode_prompt(pipe, "a photo of a cat")
        negative = sdedit.encode_negative_prompt(pipe)

        def edit(keep):
            images = sdedit.sdedit(pipe, clean, noise, prompt, negative, 0.75, 4, 7.5, keep=keep)
            return np.asarray(images[0], dtype=np.int16)

        plain = edit(None)
        np.testing.assert_array_equal(edit(torch.zeros_like(clean[:, :1])), plain)
        source = np.asarray(sdedit.decode(pipe, clean)[0], dtype=np.int16)
        np.testing.assert_array_equal(edit(torch.ones_like(clean[:, :1])), source)
        assert np.abs(plain - source).mean() > 5
