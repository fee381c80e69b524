"""generate: deterministic, shard-, batch-size- and resume-invariant shards; SDEdit and txt2img equal stock diffusers,
inpainting keeps the source exactly outside the re-generated region; bounded safety re-draws; batch size search; export."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import RecordingConfig, undeclared_reads

from pipeline import PipelineError, sdedit
from pipeline.config import validate_config
from pipeline.generate import CPU_AUTO_BATCH_SIZE, generate_shard, largest_fitting_batch, resolve_batch_size
from pipeline.generate_plan import plan_batches, plan_items, resample_seed, shard_items
from pipeline.export import export_images
from pipeline.io import read_metadata, write_parquet
from pipeline.manifest import SHARD_SCHEMA, manifest_table, read_manifest, read_shards
from pipeline.rng import derive_seed
from pipeline.settings.generate import GenerateSettings
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


def test_shards_open_as_images_and_class_labels_in_datasets(one_shard, tmp_path):
    import datasets
    import pandas as pd

    in_file_order = read_shards([one_shard])
    loaded = datasets.load_dataset("parquet", data_files=str(one_shard), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.features["label"] == datasets.ClassLabel(names=CLASSES)
    assert len(loaded) == len(in_file_order)
    for example, row in zip(loaded, in_file_order):
        assert np.array_equal(np.asarray(example["image"].convert("RGB"), dtype=np.int16), pixels(row))
        assert loaded.features["label"].int2str(example["label"]) == row["class_name"]
        assert example["synthetic_id"] == row["synthetic_id"] and example["strength"] == row["strength"]
    # pandas and pyarrow read the same PNG bytes, in the struct `datasets` stores images as.
    assert [image["bytes"] for image in pd.read_parquet(one_shard)["image"]] == [row["image"] for row in in_file_order]
    assert pq.read_table(one_shard).column("image").combine_chunks().field("bytes").to_pylist() == [row["image"] for row in in_file_order]


def test_shard_count_does_not_change_images(rows, model_dir, subset, tokens_dir, tmp_path):
    three = run(make_config(model_dir), subset, tokens_dir, tmp_path, num_shards=3)
    assert [row["synthetic_id"] for row in three] == [row["synthetic_id"] for row in rows]
    assert [row["image"] for row in three] == [row["image"] for row in rows]


def stock_img2img(pipe, subset: Path, row: dict) -> Image.Image:
    """What diffusers' own img2img makes of a row's source with the row's settings and seed."""
    with sdedit.batch_invariant_kernels(torch.device("cpu")):
        return pipe(
            image=Image.open(subset.parent / f"{row['image_id']}.png").convert("RGB"),
            prompt=row["prompt"],
            strength=row["strength"],
            num_inference_steps=row["num_inference_steps"],
            guidance_scale=row["guidance_scale"],
            generator=torch.Generator().manual_seed(row["seed"]),
        ).images[0]


def test_batch_size_one_gives_the_same_shard_and_stock_img2img(rows, model_dir, subset, tokens_dir, tmp_path):
    """On CPU the batch size changes nothing, pixels included. At batch size 1 a row's seed and
    settings give diffusers' own img2img output exactly."""
    items = plan_items(GenerateSettings.from_config(make_config(model_dir), "dafusion"), read_manifest(subset)[0])
    assert max(len(batch) for batch in plan_batches(items, 4)) > 1  # the fixture's shard really batches
    config = make_config(model_dir, batch_size=1)
    single = run(config, subset, tokens_dir, tmp_path)
    assert single == rows

    pipe = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, scheduler=config["generate"]["scheduler"])
    add_tokens_to_pipeline(pipe, tokens_dir, CLASSES)
    row = next(r for r in single if r["strength"] >= 0.5 and r["width"] == r["height"] == 64)
    np.testing.assert_array_equal(pixels(row), np.asarray(stock_img2img(pipe, subset, row), dtype=np.int16))


@pytest.mark.parametrize("scheduler", ["dpm-solver++", "ddim"])
def test_other_schedulers_match_stock_img2img_at_every_strength(scheduler, model_dir, subset, tokens_dir, tmp_path):
    """generate.scheduler swaps in DPM-Solver++ (multistep: it keeps the model outputs of earlier
    steps) or DDIM. Starting part-way down the schedule must pick the step index img2img picks, for
    every drawn strength, and the batch must still change nothing."""
    config = make_config(model_dir, scheduler=scheduler, num_inference_steps=8)
    batched = run(config, subset, tokens_dir, tmp_path / "batched")
    single = run(make_config(model_dir, scheduler=scheduler, num_inference_steps=8, batch_size=1), subset, tokens_dir,
                 tmp_path / "single")  # fmt: skip
    assert [row["image"] for row in batched] == [row["image"] for row in single]

    pipe = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, scheduler=config["generate"]["scheduler"])
    expected_class = {"dpm-solver++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}[scheduler]
    assert type(pipe.scheduler).__name__ == expected_class
    add_tokens_to_pipeline(pipe, tokens_dir, CLASSES)
    square = {row["strength"]: row for row in batched if row["width"] == row["height"] == 64}
    assert len(square) >= 3, f"the fixture should draw most strengths on square sources, got {sorted(square)}"
    for strength, row in sorted(square.items()):
        difference = np.abs(pixels(row) - np.asarray(stock_img2img(pipe, subset, row), dtype=np.int16)).max()
        assert difference == 0, f"{scheduler} at strength {strength}: {difference} levels from stock img2img"


def test_sixteen_unet_rows_give_the_bytes_of_one(model_dir, subset, tokens_dir, tmp_path):
    """At 16 rows (8 images with guidance) PyTorch would move CPU convolutions to NNPACK, which sums in
    another order than at fewer rows: the batch-invariant context must keep the bytes all the same."""
    batched = make_config(model_dir, strength=0.5, batch_size=8)  # one strength: all 8 copies in one batch
    assert [len(b) for b in plan_batches(plan_items(GenerateSettings.from_config(batched, "dafusion"), read_manifest(subset)[0]), 8)] == [8]
    eight = run(batched, subset, tokens_dir, tmp_path / "eight")
    one = run(make_config(model_dir, strength=0.5, batch_size=1), subset, tokens_dir, tmp_path / "one")
    assert [row["image"] for row in eight] == [row["image"] for row in one]


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
    # Real Guidance without the class name (data-centric leakage prevention): its own t0, no name.
    unnamed = run(config, subset, None, tmp_path / "rg-no-name", method="real-guidance-no-name")
    assert {(row["prompt"], row["strength"]) for row in unnamed} == {("a photo", 0.5)}
    # A descriptive template (DA-Fusion's Fig. 5) replaces the default; a template without "{}" is refused.
    described = run(make_config(model_dir, num_per_image=1, real_guidance_templates=["a photo of a {}, a kind of pet"]),
                    subset, None, tmp_path / "rg-described", method="real-guidance")  # fmt: skip
    assert {row["prompt"] for row in described} == {f"a photo of a {c}, a kind of pet" for c in CLASSES}
    with pytest.raises(PipelineError, match=r"generate.real_guidance_templates\[0\] 'a pet' has no '\{\}'"):
        run(make_config(model_dir, real_guidance_templates=["a pet"]), subset, None, tmp_path / "bad", method="real-guidance")


def test_the_fixed_t0_ablation_is_dafusion_at_one_half_for_every_copy(model_dir, subset):
    """DA-Fusion's Fig. 10 by its own name: whatever generate.num_intensities says."""
    rows = read_manifest(subset)[0]
    fixed = GenerateSettings.from_config(make_config(model_dir, num_intensities=4), "dafusion-fixed-t0")
    drawn = GenerateSettings.from_config(make_config(model_dir, num_intensities=4), "dafusion")
    assert fixed.strength == 0.5 and fixed.num_intensities is None
    assert {item.strength for item in plan_items(fixed, rows)} == {0.5}
    assert {item.strength for item in plan_items(drawn, rows)} > {0.5}
    assert {item.template for item in plan_items(fixed, rows)} == {"a photo of a {}"}


def crash_on_second_batch(config, subset, tokens_dir, out: Path, monkeypatch) -> int:
    """Run generate_shard on `out` until its second batch fails, leaving the first batch flushed
    (flush_every 1) in `<out>.partial/`; return that batch's size."""
    batches = plan_batches(plan_items(GenerateSettings.from_config(config, "dafusion"), read_manifest(subset)[0]), config["generate"]["batch_size"])
    assert len(batches) >= 2
    real_sdedit = sdedit.sdedit
    calls = []

    def fail_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated preemption")
        return real_sdedit(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sdedit, "sdedit", fail_second_call)
        with pytest.raises(RuntimeError, match="simulated preemption"):
            generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert not out.exists()
    assert len(list(out.parent.glob(f"{out.name}.partial/part-*.parquet"))) == 1
    return len(batches[0])


def test_resume_after_crash_gives_the_same_shard(one_shard, model_dir, subset, tokens_dir, tmp_path, monkeypatch):
    config = make_config(model_dir)
    out = tmp_path / "shard-0-of-1.parquet"
    flushed = crash_on_second_batch(config, subset, tokens_dir, out, monkeypatch)
    summary = generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert (summary["resumed"], summary["generated"]) == (flushed, len(SOURCES) * 2 - flushed)
    assert not (tmp_path / "shard-0-of-1.parquet.partial").exists()
    assert read_shards([out]) == read_shards([one_shard])
    assert read_metadata(out) == read_metadata(one_shard)


def test_resume_keeps_flushed_images_at_another_batch_size_and_flush_interval(rows, model_dir, subset, tokens_dir, tmp_path, monkeypatch):
    """Lowering the batch size after an out-of-memory error must not throw away what was flushed."""
    out = tmp_path / "shard-0-of-1.parquet"
    flushed = crash_on_second_batch(make_config(model_dir), subset, tokens_dir, out, monkeypatch)
    summary = generate_shard(make_config(model_dir, batch_size=1, flush_every=3), subset, tokens_dir, "dafusion", 0, 1, out)
    assert (summary["resumed"], summary["generated"]) == (flushed, len(SOURCES) * 2 - flushed)
    assert sorted(read_shards([out]), key=lambda row: row["synthetic_id"]) == rows


def test_a_second_writer_of_the_same_shard_stops_at_once(one_shard, model_dir, subset, tokens_dir, tmp_path, monkeypatch):
    """Two generate runs with one --out: the second fails naming the first's pid and host, and the
    first, undisturbed, writes the whole shard."""
    config = make_config(model_dir)
    out = tmp_path / "shard-0-of-1.parquet"
    real_sdedit = sdedit.sdedit
    second_writer = []

    def start_a_second_writer_once(*args, **kwargs):
        if not second_writer:
            with pytest.raises(PipelineError) as error:
                generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
            second_writer.append(str(error.value))
        return real_sdedit(*args, **kwargs)

    monkeypatch.setattr(sdedit, "sdedit", start_a_second_writer_once)
    summary = generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert second_writer == [
        f"{out}.lock is held by pid {os.getpid()} on host {socket.gethostname()}: another process is writing "
        f"{out}. Expected one writer per output: wait for that process to end (or stop it), then rerun."
    ]
    assert (summary["resumed"], summary["generated"]) == (0, len(SOURCES) * 2)
    assert out.read_bytes() == one_shard.read_bytes()


def test_merge_refuses_flushed_parts_that_do_not_make_up_the_shard(model_dir, subset, tokens_dir, tmp_path, monkeypatch):
    """A part gone (deleted by another process), or a part duplicated, stops the merge; nothing is written."""
    from pipeline import generate

    config = make_config(model_dir)
    out = tmp_path / "shard-0-of-1.parquet"
    partial = tmp_path / "shard-0-of-1.parquet.partial"
    crash_on_second_batch(config, subset, tokens_dir, out, monkeypatch)
    real_generate_items = generate._generate_items

    def then_lose_the_first_part(*args):
        made = real_generate_items(*args)
        (partial / "part-00000.parquet").unlink()
        return made

    with monkeypatch.context() as patch:
        patch.setattr(generate, "_generate_items", then_lose_the_first_part)
        with pytest.raises(PipelineError, match=r"^\S+\.partial: the flushed parts do not make up \S+shard-0-of-1\.parquet\. .* [1-9]\d* missing \['dafusion-img-.*Nothing was written"):
            generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert not out.exists()

    # The rerun makes the lost images again, but a part is there twice.
    shutil.copy(partial / "part-00001.parquet", partial / "part-00099.parquet")
    with pytest.raises(PipelineError, match=r"0 missing \[\], 0 unplanned \[\], [1-9]\d* duplicated \['dafusion-img-"):
        generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert not out.exists()


def test_an_encoding_error_in_the_background_stops_the_job(model_dir, subset, tokens_dir, tmp_path, monkeypatch):
    """Rows are encoded and written on a background thread: its errors must still reach the caller."""
    from pipeline import generate

    real_encode = generate.encode_png
    encoded = []

    def fail_on_fifth_image(image):
        encoded.append(1)
        if len(encoded) == 5:
            raise OSError("disk full")
        return real_encode(image)

    monkeypatch.setattr(generate, "encode_png", fail_on_fifth_image)
    out = tmp_path / "shard-0-of-1.parquet"
    with pytest.raises(OSError, match="disk full"):
        generate_shard(make_config(model_dir), subset, tokens_dir, "dafusion", 0, 1, out)
    assert not out.exists()
    # The parts (one batch each: flush_every 1) encoded before the failing image were written, and
    # no part after it: a rerun resumes after them.
    items = plan_items(GenerateSettings.from_config(make_config(model_dir), "dafusion"), read_manifest(subset)[0])
    sizes = [len(batch) for batch in plan_batches(items, 4)]
    complete = sum(1 for i in range(len(sizes)) if sum(sizes[: i + 1]) < 5)
    assert 0 < complete < len(sizes)
    parts = sorted(tmp_path.glob("shard-0-of-1.parquet.partial/part-*.parquet"))
    assert [part.name for part in parts] == [f"part-{i:05d}.parquet" for i in range(complete)]


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
    with pytest.raises(PipelineError, match="bad.png.*on_bad_image: skip"):
        generate_shard(make_config(model_dir), bad_subset, None, "real-guidance", 0, 1, tmp_path / "c.parquet")
    assert not (tmp_path / "c.parquet").exists()


def subset_with_bad_sources(subset: Path, root: Path, bad_rows: list[dict]) -> Path:
    """`subset`'s images copied under `root`, plus `bad_rows` (paths relative to `root`)."""
    rows, _ = read_manifest(subset)
    for row in rows:
        shutil.copy(Path(row["path"]), root / Path(row["path"]).name)
        if row["mask_path"] is not None:
            shutil.copy(Path(row["mask_path"]), root / Path(row["mask_path"]).name)
    good = [{**row, "path": Path(row["path"]).name,
             "mask_path": row["mask_path"] and Path(row["mask_path"]).name} for row in rows]  # fmt: skip
    path = root / "subset.parquet"
    write_parquet(path, manifest_table(good + bad_rows), {"dataset_root": str(root), "mask_root": None, "classes": CLASSES})
    return path


def test_skipped_sources_are_listed_and_change_no_other_image(rows, model_dir, subset, tokens_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    bad = {"image_id": "img-bad", "path": "bad.png", "split": "train", "label": 1, "class_name": "dog house",
           "mask_path": None, "width": 8, "height": 8}  # fmt: skip
    with_bad = subset_with_bad_sources(subset, tmp_path, [bad])
    config = make_config(model_dir, on_bad_image="skip")
    shards = [tmp_path / f"shard-{i}-of-2.parquet" for i in range(2)]
    summaries = [generate_shard(config, with_bad, tokens_dir, "dafusion", i, 2, path) for i, path in enumerate(shards)]

    got = sorted(read_shards(shards), key=lambda row: row["synthetic_id"])
    assert [row["synthetic_id"] for row in got] == [row["synthetic_id"] for row in rows]
    assert [row["image"] for row in got] == [row["image"] for row in rows]
    # Both copies of img-bad fall in some shard; that shard names the file and why.
    reasons = {image_id: reason for path in shards for image_id, reason in read_metadata(path)["skipped"].items()}
    assert list(reasons) == ["img-bad"] and "bad.png" in reasons["img-bad"] and "not an image" in reasons["img-bad"]
    assert sum(s["skipped_images"] for s in summaries) == 2
    assert sum(s["images"] for s in summaries) == len(rows)


def test_inpainting_skips_an_image_without_mask(model_dir, masked_subset, tokens_dir, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    no_mask = {"image_id": "red", "path": "red.png", "split": "train", "label": 0, "class_name": "cat",
               "mask_path": None, "width": 16, "height": 16}  # fmt: skip
    with_bad = subset_with_bad_sources(masked_subset, tmp_path, [no_mask])
    out = tmp_path / "fg.parquet"
    summary = generate_shard(make_config(model_dir, num_per_image=1, on_bad_image="skip"), with_bad, tokens_dir,
                             "inpaint-fg", 0, 1, out)  # fmt: skip
    assert sorted(row["image_id"] for row in read_shards([out])) == sorted(s[0] for s in SOURCES)
    assert list(read_metadata(out)["skipped"]) == ["red"] and "mask_path null" in read_metadata(out)["skipped"]["red"]
    assert summary["skipped_sources"] == 1 and summary["images"] == len(SOURCES)


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
    # One strength group of 8 images: two batches of 4 give the batch-size-1 bytes.
    rebatched = run(make_config(model_dir, txt2img_templates=templates, batch_size=1), subset, None,
                    tmp_path / "batch-1", method="txt2img")  # fmt: skip
    assert rebatched == rows

    from diffusers import StableDiffusionPipeline

    single = run(make_config(model_dir, txt2img_templates=templates, num_per_image=1, batch_size=1), subset, None,
                 tmp_path / "single", method="txt2img")  # fmt: skip
    pipe = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, scheduler=config["generate"]["scheduler"])
    stock = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    row = single[0]
    with sdedit.batch_invariant_kernels(torch.device("cpu")):
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
    pipe = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, scheduler=config["generate"]["scheduler"])
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


# --- work split and batch size -------------------------------------------------------------------


def test_shards_split_each_strength_evenly_whatever_the_batch_size(model_dir, subset):
    config = make_config(model_dir, num_per_image=5)
    items = plan_items(GenerateSettings.from_config(config, "dafusion"), read_manifest(subset)[0])
    shards = [shard_items(items, i, 3) for i in range(3)]
    assert sorted(i.synthetic_id for shard in shards for i in shard) == sorted(i.synthetic_id for i in items)
    for strength in {item.strength for item in items}:
        counts = [sum(item.strength == strength for item in shard) for shard in shards]
        assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(
    ("largest", "limit", "expected"), [(37, 64, 37), (1, 64, 1), (100, 64, 64), (64, 64, 64), (5, 7, 5)]
)
def test_largest_fitting_batch_halves_then_bisects(largest, limit, expected):
    probes = []

    def fits(batch_size):
        probes.append(batch_size)
        return batch_size <= largest

    assert largest_fitting_batch(fits, limit) == expected
    assert len(probes) <= 2 * limit.bit_length()
    assert all(1 <= b <= limit for b in probes)


def test_nothing_fits_is_an_error():
    with pytest.raises(PipelineError, match="not even one image fits"):
        largest_fitting_batch(lambda batch_size: False, 64)


def test_auto_batch_size_on_cpu_is_fixed(model_dir):
    cpu = torch.device("cpu")
    assert resolve_batch_size(GenerateSettings.from_config(make_config(model_dir, batch_size="auto"), "dafusion"), None, cpu) == CPU_AUTO_BATCH_SIZE
    assert resolve_batch_size(GenerateSettings.from_config(make_config(model_dir, batch_size=3), "dafusion"), None, cpu) == 3


# --- safety checker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model plus a tiny random safety checker and its feature extractor, as SD 1.x ships them.

    Its concept thresholds are diffusers' initial 1.0, above any cosine similarity: it flags nothing.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    out = tmp_path_factory.mktemp("checked") / "tiny-sd"
    shutil.copytree(model_dir, out)
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(
            CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=16)
        )
    checker.save_pretrained(out / "safety_checker")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(out / "feature_extractor")
    return out


def test_clean_verdicts_change_no_image(rows, checked_model_dir, subset, tokens_dir, tmp_path):
    checked = run(make_config(checked_model_dir, safety_checker=True), subset, tokens_dir, tmp_path)
    assert [row["image"] for row in checked] == [row["image"] for row in rows]
    assert [row["seed"] for row in checked] == [row["seed"] for row in rows]
    assert {row["nsfw"] for row in checked} == {False}
    assert read_metadata(tmp_path / "shard-0-of-1.parquet")["resamples"] == {}


def test_missing_safety_checker_is_named(model_dir, subset, tokens_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"model.id '.*tiny-sd' has no loadable 'safety_checker' folder"):
        generate_shard(make_config(model_dir, safety_checker=True), subset, tokens_dir, "dafusion", 0, 1, tmp_path / "a.pq")
    assert not (tmp_path / "a.pq").exists()


@pytest.fixture(scope="module")
def resampled(checked_model_dir, subset, tokens_dir, tmp_path_factory):
    """One batch of 4 (fixed strength) under a scripted checker: per call, the verdicts on the images
    it is shown. Copy 0 is clean at re-draw 1, copy 1 still flagged after the last (3rd) re-draw,
    copy 2 clean at once, copy 3 clean at re-draw 2."""
    script = iter([[True, True, False, True], [False, True, True], [True, False], [True]])

    def scripted_forward(self, clip_input, images):
        verdicts = next(script)
        assert clip_input.shape[0] == len(images) == len(verdicts)
        return images, verdicts

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = make_config(checked_model_dir, safety_checker=True, max_resamples=3, strength=0.5, num_per_image=1)
    out = tmp_path_factory.mktemp("resampled") / "shard.parquet"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionSafetyChecker, "forward", scripted_forward)
        summary = generate_shard(config, subset, tokens_dir, "dafusion", 0, 1, out)
    assert next(script, None) is None
    return config, out, summary


def test_flagged_images_are_redrawn_a_bounded_number_of_times(resampled, subset, tokens_dir):
    config, out, summary = resampled
    rows = read_shards([out])
    assert [row["image_id"] for row in rows] == ["img-0", "img-1", "img-2", "img-3"]
    resamples = {"dafusion-img-0-0": 1, "dafusion-img-1-0": 3, "dafusion-img-3-0": 2}
    assert read_metadata(out)["resamples"] == resamples
    assert (summary["resampled"], summary["nsfw"]) == (3, 1)
    items = plan_items(GenerateSettings.from_config(config, "dafusion"), read_manifest(subset)[0])
    for item, row in zip(items, rows):
        attempts = resamples.get(item.synthetic_id, 0)
        assert row["seed"] == (resample_seed(GenerateSettings.from_config(config, "dafusion"), item, attempts) if attempts else item.seed)
        assert row["nsfw"] is (item.synthetic_id == "dafusion-img-1-0")
    black = rows[1]
    assert (black["width"], black["height"]) == (48, 40) and not pixels(black).any()

    # A re-drawn image is what its recorded seed makes.
    pipe = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, scheduler=config["generate"]["scheduler"])
    add_tokens_to_pipeline(pipe, tokens_dir, CLASSES)
    row = rows[3]  # img-3: 64x64, so no resize back
    with sdedit.batch_invariant_kernels(torch.device("cpu")):
        reference = pipe(
            image=Image.open(subset.parent / "img-3.png").convert("RGB"), prompt=row["prompt"], strength=0.5,
            num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(row["seed"]),
        ).images[0]  # fmt: skip
    np.testing.assert_array_equal(pixels(row), np.asarray(reference, dtype=np.int16))


# --- export --------------------------------------------------------------------------------------


def test_export_writes_class_folders_and_skips_identical_files(resampled, tmp_path):
    _, shard, _ = resampled
    rows = {row["synthetic_id"]: row for row in read_shards([shard])}
    out = tmp_path / "export" / "dafusion" / "k1_seed0"
    summary = export_images([shard], out)
    assert (summary["images"], summary["written"], summary["left_out_nsfw"]) == (3, 3, 1)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["cat/dafusion-img-0-0.png", "cat/dafusion-img-3-0.png", "dog house/dafusion-img-2-0.png"]
    for name in files:
        assert (out / name).read_bytes() == rows[Path(name).stem]["image"]
    with open(out / "images.csv", newline="") as f:
        index = list(csv.DictReader(f))
    expected = [(name, rows[Path(name).stem]) for name in sorted(files, key=lambda name: Path(name).stem)]
    assert [(entry["file"], entry["label"], entry["seed"]) for entry in index] == [
        (name, str(row["label"]), str(row["seed"])) for name, row in expected
    ]

    # Again: nothing rewritten (mtimes kept); a changed file is repaired and a stale one removed.
    mtimes = {name: (out / name).stat().st_mtime_ns for name in files}
    (out / "cat" / "dafusion-img-0-0.png").write_bytes(b"edited")
    (out / "cat" / "dafusion-img-9-0.png").write_bytes(b"stale")
    summary = export_images([shard], out)
    assert (summary["written"], summary["unchanged"], summary["removed"]) == (1, 2, 1)
    assert (out / "cat" / "dafusion-img-3-0.png").stat().st_mtime_ns == mtimes["cat/dafusion-img-3-0.png"]
    assert (out / "cat" / "dafusion-img-0-0.png").read_bytes() == rows["dafusion-img-0-0"]["image"]
    assert not (out / "cat" / "dafusion-img-9-0.png").exists()


def test_export_command_line(resampled, tmp_path):
    from pipeline.__main__ import main

    _, shard, _ = resampled
    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")
    common = ["export", "--config", str(config), "--synthetic", str(shard)]
    assert main([*common, "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3
    assert main([*common, str(shard), "--out", str(tmp_path / "dup")]) == 2  # the same ids twice


@pytest.mark.parametrize("option", ["channels_last", pytest.param("compile", marks=pytest.mark.slow)])
def test_gpu_speed_options_leave_the_images_as_they_were(option, rows, model_dir, subset, tokens_dir, tmp_path):
    """`generate.channels_last` and `generate.compile` change kernels, not the images: the same
    shard within float rounding (a level or two of 255), every row present with its settings."""
    config = make_config(model_dir, **{option: True})
    pipe = sdedit.load_img2img(config["model"]["id"], torch.device("cpu"), torch.float32, **{option: True})
    if option == "channels_last":
        conv = pipe.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    else:
        assert hasattr(pipe.unet, "_compiled_call_impl") and pipe.unet._compiled_call_impl is not None
    optioned = run(config, subset, tokens_dir, tmp_path)
    assert [row["synthetic_id"] for row in optioned] == [row["synthetic_id"] for row in rows]
    assert [(row["strength"], row["seed"]) for row in optioned] == [(row["strength"], row["seed"]) for row in rows]
    largest = max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(optioned, rows))
    assert largest <= 2, f"{option} moved a pixel by {largest} levels"


@pytest.mark.parametrize("method", ["dafusion", "txt2img"])
def test_the_stage_reads_only_config_keys_its_settings_declare(method, model_dir, subset, tokens_dir, tmp_path):
    """Every config value the generate stage reads is a field of GenerateSettings, and so part of the
    rule's params and the resume key (or declared as changing only how the job runs)."""
    reads: set[str] = set()
    config = RecordingConfig(make_config(model_dir, num_per_image=1), reads)
    generate_shard(config, subset, tokens_dir if method == "dafusion" else None, method, 0, 1, tmp_path / "a.parquet")
    assert undeclared_reads(reads, GenerateSettings) == set()
