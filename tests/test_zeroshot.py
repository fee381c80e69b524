"""Zero-shot CLIP: each class's prompts averaged, the nearest class per test image, scored like a
trained classifier; loaded with open_clip from an architecture name or a model config file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import PipelineError, zeroshot
from pipeline.config import validate_config
from pipeline.io import write_parquet
from pipeline.manifest import manifest_table
from pipeline.zeroshot import zero_shot_accuracy

CLASSES = ["red", "green", "blue"]
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture
def manifest(tmp_path):
    """Two test images per class, each a flat image of its class's colour (and one train image)."""
    rows = []
    for label, name in enumerate(CLASSES):
        for i, split in enumerate(["train", "test", "test"]):
            colour = [0, 0, 0]
            colour[label] = 255
            path = tmp_path / f"{name}-{i}.png"
            Image.new("RGB", (32, 32), tuple(colour)).save(path)
            rows.append(dict(image_id=f"{name}-{i}", path=path.name, split=split, label=label, class_name=name, mask_path=None, width=32, height=32))
    path = tmp_path / "manifest.parquet"
    write_parquet(path, manifest_table(rows), {"dataset_root": str(tmp_path), "mask_root": None, "classes": CLASSES})
    return path


class ColourCLIP(torch.nn.Module):
    """A CLIP whose image embedding is the image's mean colour and whose text embedding is the
    colour its prompt names, shifted by the template: so only the mean over templates is exact."""

    def __init__(self, image_class_of=lambda c: c):
        super().__init__()
        self.image_class_of = image_class_of

    def encode_text(self, tokens):
        return tokens.float()

    def encode_image(self, images):
        return torch.nn.functional.one_hot(torch.tensor([self.image_class_of(int(i.argmax())) for i in images]), 3).float()


def tokenizer(prompts):
    # "a photo of a red" -> [1, 0, 0] + a template-dependent offset that cancels in the mean of two
    offsets = {"a photo of a": 0.6, "a drawing of a": -0.6}
    out = []
    for prompt in prompts:
        template, name = prompt.rsplit(" ", 1)
        vector = np.eye(3)[CLASSES.index(name)]
        vector[(CLASSES.index(name) + 1) % 3] += offsets[template]
        out.append(vector)
    return torch.tensor(np.array(out))


def preprocess(image):
    return torch.from_numpy(np.array(image, dtype=np.float32).mean(axis=(0, 1)))


@pytest.mark.parametrize("confuse, expected", [(False, [1.0, 1.0, 1.0]), (True, [1.0, 0.0, 1.0])], ids=["exact", "green seen as red"])
def test_each_image_gets_the_class_of_the_nearest_mean_prompt_embedding(manifest, tmp_path, monkeypatch, confuse, expected):
    model = ColourCLIP((lambda c: 0 if c == 1 else c) if confuse else (lambda c: c))
    monkeypatch.setattr(zeroshot, "load_clip", lambda name, pretrained, device: (model, preprocess, tokenizer))
    config = validate_config({"device": "cpu", "zeroshot": {"model": "ViT-B-32", "templates": ["a photo of a {}", "a drawing of a {}"]}})
    result = zero_shot_accuracy(config, manifest, tmp_path / "zeroshot.json")
    assert json.loads((tmp_path / "zeroshot.json").read_text()) == result
    assert [result["per_class_accuracy"][c] for c in CLASSES] == expected and result["n_test"] == 6
    assert result["accuracy"] == pytest.approx(np.mean(expected))
    # The template offsets cancel only in the mean of the normalised prompt embeddings.
    text = zeroshot.class_embeddings(model, tokenizer, CLASSES, ["a photo of a {}", "a drawing of a {}"], torch.device("cpu"))
    assert torch.allclose(text, torch.eye(3), atol=1e-6)


def test_a_tiny_open_clip_from_a_model_config_and_a_weights_file(manifest, tmp_path):
    import open_clip

    model_file = tmp_path / "tiny-clip.json"
    model_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(model_file)
    torch.manual_seed(0)
    weights = tmp_path / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip", pretrained=None).state_dict(), weights)
    config = validate_config({"device": "cpu", "zeroshot": {"model": str(model_file), "pretrained": str(weights), "batch_size": 4}})
    first = zero_shot_accuracy(config, manifest, tmp_path / "a.json")
    second = zero_shot_accuracy(config, manifest, tmp_path / "b.json")
    assert (first["model"], first["pretrained"], first["n_test"]) == (str(model_file), str(weights), 6)
    assert first["accuracy"] == second["accuracy"] and first["per_class_accuracy"] == second["per_class_accuracy"]
    assert sorted(first["per_class_accuracy"]) == sorted(CLASSES)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"model": "ViT-Nope"}, r"zeroshot\.model: 'ViT-Nope' is not an open_clip architecture"),
        ({"model": "/nonexistent/clip.json"}, r"zeroshot\.model: /nonexistent/clip\.json does not exist"),
        ({"model": None}, r"zeroshot\.model is null"),
    ],
)
def test_a_bad_model_is_named(manifest, tmp_path, section, message):
    with pytest.raises(PipelineError, match=message):
        zero_shot_accuracy(validate_config({"device": "cpu", "zeroshot": section}), manifest, tmp_path / "z.json")
    assert not (tmp_path / "z.json").exists()
