"""ResNets with BAM after layer1, layer2 and layer3, as in the paper."""

from .resnet import insert_bam, resnet18_bam, resnet34_bam, resnet50_bam, resnet101_bam

__all__ = ["insert_bam", "resnet18_bam", "resnet34_bam", "resnet50_bam", "resnet101_bam"]
