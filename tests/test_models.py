import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import bam_fused
from bam_fused.models import insert_bam, resnet18_bam, resnet34_bam, resnet50_bam, resnet101_bam


@pytest.mark.parametrize(
    "builder,count",
    [(resnet18_bam, 11_712_503), (resnet34_bam, 21_820_663), (resnet50_bam, 25_915_099), (resnet101_bam, 44_907_227)],
)
def test_parameter_counts_match_the_paper_layout(builder, count):
    model = builder()
    assert sum(p.numel() for p in model.parameters()) == count
    bams = [m for m in model.modules() if isinstance(m, bam_fused.BAM)]
    assert len(bams) == 3


def test_bams_sit_after_layer1_2_3_and_keep_resnet_keys():
    model = resnet50_bam(num_classes=10, backend="reference")
    assert [m.gate_channels for m in (model.layer1.bam, model.layer2.bam, model.layer3.bam)] == [256, 512, 1024]
    assert not hasattr(model.layer4, "bam")
    plain = torchvision.models.resnet50(num_classes=10)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".bam." in k for k in missing)


def test_forward_backward_small_model():
    model = resnet18_bam(num_classes=7, combine="product")
    out = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.layer2.bam.spatial_att.gate_s.gate_s_conv_final.weight.grad is not None
    assert model.layer2.bam.combine == "product"


def test_insert_bam_changes_output_of_torchvision_model():
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    assert insert_bam(model, reduction_ratio=8) is model
    assert model.layer1.bam.reduction_ratio == 8 and not model.layer1.bam.training
    assert not torch.allclose(model(x), before)


def test_insert_bam_on_timm_resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet26", pretrained=False, num_classes=4)
    insert_bam(model)
    assert [model.layer1.bam.gate_channels, model.layer3.bam.gate_channels] == [256, 1024]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("norm", ["frozen batchnorm", "groupnorm"])
def test_insert_bam_whatever_the_norm_layers(norm):
    """Detection backbones use torchvision's FrozenBatchNorm2d; before 2026-11-26 insert_bam read
    the channels off the last nn.BatchNorm2d and refused such models."""
    layer = FrozenBatchNorm2d if norm == "frozen batchnorm" else (lambda c: torch.nn.GroupNorm(8, c))
    model = insert_bam(torchvision.models.resnet50(num_classes=4, norm_layer=layer)).eval()
    assert [getattr(model, f"layer{i}").bam.gate_channels for i in (1, 2, 3)] == [256, 512, 1024]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_insert_bam_into_a_detection_backbone():
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    insert_bam(backbone.body)
    assert backbone.body.layer2.bam.gate_channels == 128
    with torch.no_grad():
        features = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features.values()][:2] == [(1, 256, 16, 16), (1, 256, 8, 8)]


def test_insert_bam_on_timm_resnet_with_cbam_blocks():
    """The stage's channels come from conv3, not from the attention convs after it (CBAM's spatial
    conv has one output channel)."""
    timm = pytest.importorskip("timm")
    cbam = {"attn_layer": "cbam"}
    model = insert_bam(timm.create_model("resnet26", pretrained=False, num_classes=4, block_args=cbam))
    assert [getattr(model, f"layer{i}").bam.gate_channels for i in (1, 2, 3)] == [256, 512, 1024]


def test_insert_bam_errors():
    with pytest.raises(ValueError, match="model.layer1 is NoneType"):
        insert_bam(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        insert_bam("resnet50")
    model = resnet18_bam()
    with pytest.raises(ValueError, match="already has a BAM"):
        insert_bam(model)
    model = torchvision.models.resnet18()
    model.layer2[-1] = torch.nn.Identity()
    with pytest.raises(ValueError, match="model.layer2 does not look like a ResNet stage .*no conv3 or conv2"):
        insert_bam(model)
