"""BAM at the bottlenecks of a ResNet: after layer1, layer2 and layer3, before each
down-sampling stage. Each BAM is appended to its stage as ``layer<i>.bam``, so every key
of the original network is unchanged and its pretrained weights still load (strict=False
reports only the new BAM keys as missing)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules import BAM

STAGES = ("layer1", "layer2", "layer3")


def _stage_channels(stage: nn.Module, name: str) -> int:
    """Output channels of a ResNet stage: its last block's last main conv (conv3 in a
    bottleneck, conv2 in a basic block), whatever the norm layers (BatchNorm2d, torchvision's
    FrozenBatchNorm2d in detection backbones, GroupNorm) and attention modules (timm's SE or
    CBAM convs come after it)."""
    blocks = list(stage.children())
    last = blocks[-1] if blocks else None
    for attr in ("conv3", "conv2"):
        conv = getattr(last, attr, None)
        if isinstance(conv, nn.Conv2d):
            return conv.out_channels
    raise ValueError(f"model.{name} does not look like a ResNet stage (its last block has no conv3 or conv2 Conv2d)")


def insert_bam(model: nn.Module, **bam_kwargs: Any) -> nn.Module:
    """Adds a ``bam_fused.BAM`` after layer1, layer2 and layer3 of a torchvision or timm
    ResNet, in place, and returns the model. ``bam_kwargs`` go to ``BAM``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name in STAGES:
        stage = getattr(model, name, None)
        if not isinstance(stage, nn.Sequential):
            raise ValueError(
                f"model must be a torchvision or timm ResNet with nn.Sequential stages layer1..layer3; "
                f"model.{name} is {type(stage).__name__}"
            )
        if "bam" in stage._modules:
            raise ValueError(f"model.{name} already has a BAM; insert_bam was applied twice")
    # Build every BAM before touching the model: a bad argument leaves it unchanged.
    bams = {name: BAM(_stage_channels(getattr(model, name), name), **bam_kwargs) for name in STAGES}
    for name in STAGES:
        stage = getattr(model, name)
        ref = next(stage.parameters())
        stage.add_module("bam", bams[name].to(device=ref.device, dtype=ref.dtype).train(model.training))
    return model


def _resnet(arch: str, num_classes: int, bam_kwargs: dict) -> nn.Module:
    import torchvision

    return insert_bam(getattr(torchvision.models, arch)(weights=None, num_classes=num_classes), **bam_kwargs)


def resnet18_bam(num_classes: int = 1000, **bam_kwargs: Any) -> nn.Module:
    return _resnet("resnet18", num_classes, bam_kwargs)


def resnet34_bam(num_classes: int = 1000, **bam_kwargs: Any) -> nn.Module:
    return _resnet("resnet34", num_classes, bam_kwargs)


def resnet50_bam(num_classes: int = 1000, **bam_kwargs: Any) -> nn.Module:
    return _resnet("resnet50", num_classes, bam_kwargs)


def resnet101_bam(num_classes: int = 1000, **bam_kwargs: Any) -> nn.Module:
    return _resnet("resnet101", num_classes, bam_kwargs)
