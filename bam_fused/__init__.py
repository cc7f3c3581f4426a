"""bam_fused: fused kernels for the Bottleneck Attention Module (BAM, BMVC 2018).

Public API: BAM, convert, info, ops.bam_gate, ops.bam_branches, models.*, reference.*.
"""

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .convert import convert  # noqa: E402
from .info import info  # noqa: E402
from .modules import BAM  # noqa: E402

__all__ = ["BAM", "convert", "info", "ops", "reference", "__version__"]
