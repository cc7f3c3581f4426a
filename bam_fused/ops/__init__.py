"""One public function per op; each is a registered torch.library op."""

from .branches import bam_branches
from .gate import bam_gate

__all__ = ["bam_branches", "bam_gate"]
