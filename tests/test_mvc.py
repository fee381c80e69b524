"""MVC on the tiny model: captions, mixing, the image-conditioned fine-tune and the mvc methods."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CountedCalls, RecordingConfig, undeclared_reads
from pipeline import PipelineError, adapters, captions, layout, methods, mixing, mvc, sdedit
from pipeline.captions import read_captions
from pipeline.checkpoint import verify_checkpoint, weight_hashes
from pipeline.config import validate_config
from pipeline.generate import generate_shard
from pipeline.io import read_metadata
from pipeline.manifest import read_shards
from pipeline.settings.caption import CaptionSettings
from pipeline.settings.mvc import MVCSettings
from pipeline.tiny_sd import build_tiny_sd
from test_generate import write_subset

RESOLUTION = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd", resolution=RESOLUTION, seed=0)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    return write_subset(tmp_path_factory.mktemp("data"), with_masks=True)


def make_config(model: Path, **sections) -> dict:
    mvc_settings = {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 0, **sections.pop("mvc", {})}
    generate = {"num_per_image": 2, "num_inference_steps": 3, "batch_size": 2, "flush_every": 1, **sections.pop("generate", {})}
    return validate_config({"model": {"id": str(model), "resolution": RESOLUTION}, "device": "cpu", "mvc": mvc_settings,
                            "generate": generate, **sections})  # fmt: skip


@pytest.fixture(scope="module")
def caption_file(tiny_model, subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captions") / "k2_seed0.parquet"
    captions.caption_subset(make_config(tiny_model), subset, out)
    return out


@pytest.fixture(scope="module")
def model(tiny_model, subset, caption_file, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("mvc") / "k2_seed0"
    mvc.train_mvc(make_config(tiny_model), subset, caption_file, out)
    return out


# captions ----------------------------------------------------------------------------------------


def test_annotation_captions_describe_each_image_after_the_prefix(caption_file, subset):
    by_id = read_captions(caption_file)
    assert sorted(by_id) == ["img-0", "img-1", "img-2", "img-3"]
    for class_name, caption in by_id.values():
        assert caption.startswith(f"This is an image of {class_name}, a ") and " object " in caption
    assert read_metadata(caption_file)["captioner"] == "annotations"


def test_describe_names_colour_size_place_and_background():
    image = np.full((30, 30, 3), 20, dtype=np.uint8)
    mask = np.zeros((30, 30), dtype=bool)
    mask[:16, :16] = True
    image[mask] = (220, 30, 30)
    assert captions.describe(image, mask) == "a large red object at the top left on a dark background"
    image[:] = 240
    mask[:] = False
    mask[14:17, 24:27] = True
    image[mask] = (120, 120, 120)
    assert captions.describe(image, mask) == "a small grey object on the right on a light background"


def test_csv_captions_and_their_errors(tiny_model, subset, tmp_path):
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("image_id,caption\nimg-0,a cat on a sofa\nimg-1,\"This is an image of dog house, red\"\nimg-2,x\nimg-3,y\nother,z\n")
    out = tmp_path / "c.parquet"
    captions.caption_subset(make_config(tiny_model, caption={"captioner": "csv", "csv": str(csv_file)}), subset, out)
    by_id = read_captions(out)
    assert by_id["img-0"] == ("cat", "This is an image of cat, a cat on a sofa")
    assert by_id["img-1"] == ("dog house", "This is an image of dog house, red"), "an existing prefix is kept, not doubled"
    csv_file.write_text("image_id,caption\nimg-3,a cat\n")
    with pytest.raises(PipelineError, match=r"captions\.csv: no caption for training image 'img-1' \(class 'dog house'\)"):
        captions.caption_subset(make_config(tiny_model, caption={"captioner": "csv", "csv": str(csv_file)}), subset, tmp_path / "d.parquet")
    assert not (tmp_path / "d.parquet").exists()


def build_tiny_blip2(folder: Path) -> Path:
    """A randomly initialised BLIP-2 (ViT, Q-Former, OPT) with a word-level tokenizer, saved as
    transformers saves Salesforce/blip2-opt-2.7b, so the captioner's real loading code runs offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig, PreTrainedTokenizerFast)

    words = ["<pad>", "</s>", "<unk>", "<image>"] + [f"w{i}" for i in range(60)]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32, vocab_size=64).to_dict(),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
                              max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1).to_dict(),
        num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # logit 0 for the special tokens: a random model then draws words, not the end at once
        model.get_output_embeddings().weight[:4] = 0
    model.save_pretrained(folder)
    Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4).save_pretrained(folder)
    return folder


def test_blip2_captions_through_the_real_loading_code(tiny_model, subset, tmp_path):
    blip2 = build_tiny_blip2(tmp_path / "blip2")
    out = tmp_path / "c.parquet"
    captions.caption_subset(make_config(tiny_model, caption={"captioner": "blip2", "blip2_model": str(blip2), "max_new_tokens": 4}), subset, out)
    for class_name, caption in read_captions(out).values():
        prefix = f"This is an image of {class_name}, "
        assert caption.startswith(prefix) and 3 <= len(caption.removeprefix(prefix).split()) <= 4
    with pytest.raises(PipelineError, match=r"caption\.blip2_model: cannot load BLIP-2 from '.*missing'"):
        captions.caption_subset(make_config(tiny_model, caption={"captioner": "blip2", "blip2_model": str(tmp_path / "missing")}), subset, tmp_path / "d.parquet")


def test_annotation_captions_need_masks(tiny_model, tmp_path):
    unmasked = write_subset(tmp_path, with_masks=False)
    with pytest.raises(PipelineError, match=r"captioner annotations: image 'img-3' has no mask"):
        captions.caption_subset(make_config(tiny_model), unmasked, tmp_path / "c.parquet")


def test_the_caption_stage_reads_only_its_settings(tiny_model, subset, tmp_path):
    reads: set = set()
    captions.caption_subset(RecordingConfig(make_config(tiny_model), reads), subset, tmp_path / "c.parquet")
    assert undeclared_reads(reads, CaptionSettings) == set()


# mixing ------------------------------------------------------------------------------------------


def test_mixing_swaps_rows_and_columns_from_other_captions_of_the_class():
    embeddings = torch.stack([torch.full((77, 8), float(i)) for i in range(3)])
    mix = mixing.draw_mix(torch.Generator().manual_seed(0), 1, 3, 77, 8, coarse_swaps=2, fine_swaps=3)
    assert len(mix.coarse) == 2 and len(mix.fine) == 3
    assert all(other != 1 and 1 <= r < s <= 77 for other, r, s in mix.coarse)
    assert all(other != 1 and 1 <= w < 77 and 0 <= u < v <= 8 for other, w, u, v in mix.fine)
    mixed = mixing.apply_mix(embeddings, 1, mix)
    expected = embeddings[1].clone()
    for other, r, s in mix.coarse:
        expected[r:s] = other
    for other, w, u, v in mix.fine:
        expected[w, u:v] = other
    assert torch.equal(mixed, expected) and torch.equal(mixed[0], embeddings[1, 0]), "row 0 is never swapped"
    assert not torch.equal(mixed, embeddings[1])
    again = mixing.draw_mix(torch.Generator().manual_seed(0), 1, 3, 77, 8, coarse_swaps=2, fine_swaps=3)
    assert again == mix, "seeded by the caller's generator alone"
    lonely = mixing.draw_mix(torch.Generator().manual_seed(0), 0, 1, 77, 8, 2, 2)
    assert torch.equal(mixing.apply_mix(embeddings[:1], 0, lonely), embeddings[0]), "one caption: nothing to mix"


# the fine-tune -----------------------------------------------------------------------------------


def test_widening_starts_as_the_base_model_whatever_the_conditioning(tiny_model):
    pipe = sdedit.load_img2img(str(tiny_model), torch.device("cpu"), torch.float32)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        base = pipe.unet(latents, 10, hidden).sample
        mvc.widen_input(pipe.unet, 4)
        assert pipe.unet.config.in_channels == 8 and adapters.is_image_conditioned(pipe.unet, pipe.vae)
        widened = pipe.unet(torch.cat([latents, torch.randn(1, 4, 8, 8)], dim=1), 10, hidden).sample
    assert torch.equal(base, widened)


@pytest.fixture
def model_copy(model, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(model, tmp_path / "model"))


def test_the_model_is_a_checkpoint_instruct_pix2pix_loads(model, model_copy):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    verify_checkpoint(model)
    info = json.loads((model / layout.MVC_INFO_FILE).read_text())
    assert info["sha256"] == weight_hashes(model) and info["settings"]["conditioning"] == "same-class"
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.in_channels == 8
    assert (model / layout.LOSS_FILE).read_text().splitlines()[0] == "step,loss"
    (model_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"broken")
    with pytest.raises(PipelineError, match=r"diffusion_pytorch_model\.safetensors: sha256 .* does not match"):
        adapters.check_mvc_model(model_copy)


def test_fine_tune_is_seeded_and_resumes_to_the_same_weights(tiny_model, subset, caption_file, tmp_path, monkeypatch, one_thread):
    from safetensors.torch import load_file

    config = make_config(tiny_model, mvc={"checkpoint_every": 1})
    uninterrupted = tmp_path / "uninterrupted"
    mvc.train_mvc(config, subset, caption_file, uninterrupted)
    step = CountedCalls(mvc._step_loss, kill_at=3)
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(mvc, "_step_loss", step)
    with pytest.raises(KeyboardInterrupt):
        mvc.train_mvc(config, subset, caption_file, resumed)
    assert not resumed.exists()
    step.resume()
    mvc.train_mvc(config, subset, caption_file, resumed)
    assert step.calls == 1, "only the lost step is redone"
    name = "unet/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(resumed / name), load_file(uninterrupted / name)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (resumed / layout.LOSS_FILE).read_text() == (uninterrupted / layout.LOSS_FILE).read_text()


def test_the_fine_tune_starts_from_the_erased_unet(tiny_model, subset, caption_file, tmp_path, one_thread):
    """With erase.enabled the mvc model is fine-tuned from the erased UNet, so its images are generated
    with the class names erased like every other method's."""
    from safetensors.torch import load_file

    from pipeline import erase
    from test_generate import CLASSES

    classes = tmp_path / layout.CLASSES_FILE
    classes.write_text(json.dumps(CLASSES))
    erase.erase_classes(make_config(tiny_model, erase={"steps": 2, "ddim_steps": 2, "learning_rate": 1e-2}), classes, tmp_path / "erase")
    erased = load_file(tmp_path / "erase" / layout.ERASED_WEIGHTS_FILE)
    # A step of Adam moves each weight by about the learning rate: at 1e-12 the model is its start.
    mvc.train_mvc(make_config(tiny_model, mvc={"steps": 1, "learning_rate": 1e-12}), subset, caption_file, tmp_path / "m", erased_dir=tmp_path / "erase")
    unet = load_file(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(unet[name], value, atol=1e-6) for name, value in erased.items())
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.allclose(base[name], value, atol=1e-6) for name, value in erased.items())
    assert json.loads((tmp_path / "m" / layout.MVC_INFO_FILE).read_text())["erased"] == str(tmp_path / "erase")


def test_the_stage_reads_only_its_settings(tiny_model, subset, caption_file, tmp_path, one_thread):
    reads: set = set()
    mvc.train_mvc(RecordingConfig(make_config(tiny_model, mvc={"steps": 1}), reads), subset, caption_file, tmp_path / "m")
    assert undeclared_reads(reads, MVCSettings) == set()


# generation --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mvc_shard(tiny_model, subset, caption_file, model, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shard-0-of-1.parquet"
    generate_shard(make_config(tiny_model), subset, None, "mvc", 0, 1, out, adapter_dir=model, captions_path=caption_file)
    return out


def test_mvc_rows_record_their_caption_and_what_was_mixed(mvc_shard, caption_file, model):
    rows = read_shards([mvc_shard])
    meta = read_metadata(mvc_shard)
    by_id = read_captions(caption_file)
    assert len(rows) == 8 and {row["method"] for row in rows} == {"mvc"}
    assert all(row["prompt"] == by_id[row["image_id"]][1] and row["strength"] is None for row in rows)
    assert meta["adapter_sha256"] == weight_hashes(model) and meta["captions_sha256"]
    records = meta["conditioning"]
    assert sorted(records) == sorted(row["synthetic_id"] for row in rows)
    for row in rows:
        record = records[row["synthetic_id"]]
        assert record["caption_of"] == record["conditioning_image"] == row["image_id"]
        same_class = {i for i, (c, _) in by_id.items() if c == row["class_name"]} - {row["image_id"]}
        assert len(record["coarse"]) == 1 and len(record["fine"]) == 1
        assert {swap[0] for swap in record["coarse"] + record["fine"]} <= same_class


def test_mvc_rows_are_the_images_of_stock_instruct_pix2pix(mvc_shard, model, caption_file, subset):
    """With image guidance 1, InstructPix2Pix's three branches reduce to MVC's two (up to rounding)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from pipeline.manifest import read_manifest
    from pipeline.rng import torch_generator

    row = read_shards([mvc_shard])[0]
    record = read_metadata(mvc_shard)["conditioning"][row["synthetic_id"]]
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    by_id = read_captions(caption_file)
    ids = [i for i, (c, _) in by_id.items() if c == row["class_name"]]
    encoder = sdedit.load_img2img(str(model), torch.device("cpu"), torch.float32)  # the same text encoder
    with torch.no_grad():
        embeddings = torch.cat([sdedit.encode_prompt(encoder, by_id[i][1]) for i in ids])
        mix = mixing.draw_mix(torch_generator(row["seed"], "mix"), ids.index(row["image_id"]), len(ids), 77, embeddings.shape[2], 1, 1)
        assert [[ids[o], r, s] for o, r, s in mix.coarse] == record["coarse"]
        mixed = mixing.apply_mix(embeddings, ids.index(row["image_id"]), mix).unsqueeze(0)
        source = next(r for r in read_manifest(subset)[0] if r["image_id"] == row["image_id"])
        image = Image.open(source["path"]).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
        stock = pipe(prompt_embeds=mixed, negative_prompt_embeds=sdedit.encode_negative_prompt(encoder), image=image,
                     num_inference_steps=3, guidance_scale=7.5, image_guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(row["seed"]), output_type="np").images[0]  # fmt: skip
    ours = np.asarray(Image.open(__import__("io").BytesIO(row["image"])), dtype=np.float32) / 255
    assert np.abs(ours - stock).max() <= 2 / 255


def test_mvc_pretrained_mixes_on_the_base_model(tiny_model, subset, caption_file, tmp_path, one_thread):
    out = tmp_path / "shard-0-of-1.parquet"
    generate_shard(make_config(tiny_model), subset, None, "mvc-pretrained", 0, 1, out, captions_path=caption_file)
    records = read_metadata(out)["conditioning"]
    assert len(records) == 8 and all(record["conditioning_image"] is None for record in records.values())


def test_generation_refuses_missing_or_unwanted_captions(tiny_model, subset, caption_file, model, tmp_path):
    with pytest.raises(PipelineError, match=r"method 'mvc' mixes the subset's captions\. Expected a caption file"):
        generate_shard(make_config(tiny_model), subset, None, "mvc", 0, 1, tmp_path / "a.parquet", adapter_dir=model)
    with pytest.raises(PipelineError, match=r"method 'txt2img' does not use captions"):
        generate_shard(make_config(tiny_model), subset, None, "txt2img", 0, 1, tmp_path / "b.parquet", captions_path=caption_file)
    with pytest.raises(PipelineError, match=r"no mvc\.json\. Expected a folder the mvc stage wrote"):
        generate_shard(make_config(tiny_model), subset, None, "mvc", 0, 1, tmp_path / "c.parquet", adapter_dir=tiny_model, captions_path=caption_file)


def test_mvc_names_its_leakage_mode_and_needs():
    assert methods.get("mvc").needs == {"mvc", "captions"}
    assert methods.get("mvc-pretrained").needs == {"captions"}
    assert methods.leakage_prevention("mvc", erased=False) == "none", "its captions name the class"
    assert methods.leakage_prevention("mvc", erased=True) == "model-centric"


# The mix_samples stage: the report's look at what mixing does -------------------------------------


def test_mix_samples_draw_each_setting_from_the_unmixed_samples_noise(tiny_model, model, subset, caption_file, tmp_path, one_thread):
    from pipeline.mix_samples import render_mix_samples

    config = make_config(tiny_model, mvc={"samples": {"per_class": 1, "swaps": [1, 3], "draws": 2}})
    grid = tmp_path / "k2_seed0.png"
    legend = render_mix_samples(config, model, subset, caption_file, grid)
    assert legend == json.loads(Path(layout.grid_legend(grid)).read_text())
    assert legend["columns"] == ["conditioning image", "unmixed", "fine Q=1", "fine Q=3", "coarse P=1", "coarse P=3"]
    assert [row["image_id"] for row in legend["rows"]] == ["img-0", "img-1"]  # the first image of each class
    with Image.open(grid) as image:
        assert image.size == (6 * RESOLUTION, 2 * RESOLUTION)
        tiles = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    unmixed, coarse = tiles[:RESOLUTION, RESOLUTION : 2 * RESOLUTION], tiles[:RESOLUTION, 4 * RESOLUTION : 5 * RESOLUTION]
    # The recorded distance is the first draw's together with the second, so at least half of the first's.
    first_draw = float(np.abs(coarse - unmixed).mean())
    assert 0 < first_draw <= 2 * legend["rows"][0]["distances"]["coarse-1"] + 1e-6
    for kind in ("fine", "coarse"):
        for n in ("1", "3"):
            assert legend["mean_pixel_distance"][kind][n] > 0
    # Seeded: a second run writes the same grid.
    again = tmp_path / "again.png"
    render_mix_samples(config, model, subset, caption_file, again)
    assert again.read_bytes() == grid.read_bytes()
    # The report's panel: the labelled grid and fine against coarse per n.
    from pipeline.report import mix_distance_table, mix_samples_grid

    assert mix_samples_grid(grid).startswith("data:image/png;base64,")
    table = mix_distance_table([legend, legend])
    coarse, fine = legend["mean_pixel_distance"]["coarse"]["3"], legend["mean_pixel_distance"]["fine"]["3"]
    assert f"<tr><td>3</td><td>{fine:.3f}</td><td>{coarse:.3f}</td><td>{coarse / fine:.2f}</td></tr>" in table


def test_mix_samples_change_nothing_when_every_caption_of_a_class_is_the_same(tiny_model, model, subset, tmp_path, one_thread):
    from pipeline.io import write_parquet
    from pipeline.mix_samples import render_mix_samples

    import pyarrow as pa

    same = {"image_id": ["img-0", "img-1", "img-2", "img-3"], "class_name": ["cat", "dog house", "dog house", "cat"]}
    same["caption"] = [f"This is an image of {name}" for name in same["class_name"]]
    path = tmp_path / "same.parquet"
    write_parquet(path, pa.table(same, schema=captions.CAPTION_SCHEMA))
    legend = render_mix_samples(make_config(tiny_model, mvc={"samples": {"swaps": [2], "draws": 1}}), model, subset, path, tmp_path / "g.png")
    assert legend["mean_pixel_distance"] == {"fine": {"2": 0.0}, "coarse": {"2": 0.0}}


def test_mix_samples_refuse_a_model_that_is_not_image_conditioned(tiny_model, subset, caption_file, tmp_path):
    from pipeline.mix_samples import render_mix_samples

    with pytest.raises(PipelineError, match=r"no mvc\.json\. Expected a folder the mvc stage wrote"):
        render_mix_samples(make_config(tiny_model), tiny_model, subset, caption_file, tmp_path / "g.png")


def test_the_mix_samples_stage_reads_only_its_settings(tiny_model, model, subset, caption_file, tmp_path, one_thread):
    from pipeline.mix_samples import render_mix_samples
    from pipeline.settings.mix_samples import MixSampleSettings

    reads: set = set()
    render_mix_samples(RecordingConfig(make_config(tiny_model, mvc={"samples": {"swaps": [1], "draws": 1}}), reads), model, subset, caption_file, tmp_path / "g.png")
    assert undeclared_reads(reads, MixSampleSettings) == set()
