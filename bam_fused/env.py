"""Every environment variable the package reads, in one place (README: "Environment variables").

| variable                    | default | effect                                                        |
|-----------------------------|---------|---------------------------------------------------------------|
| BAM_FUSED_DISABLE_EXT       | 0       | 1: never load or build the C++/CUDA extension                 |
| BAM_FUSED_JIT               | 1       | 0: do not JIT-build the extension when the prebuilt one fails |
| BAM_FUSED_VERBOSE_BUILD     | 0       | 1: show the compiler's output during a JIT build              |
| BAM_FUSED_DISABLE_TRITON    | 0       | 1: act as if Triton were missing                              |
| BAM_FUSED_CUDA_SPATIAL      | auto    | CUDA dilated convs: kernel (ours, fp32), library (cuDNN), or  |
|                             |         | auto (ours up to 16 reduced channels); read by the extension  |
| BAM_FUSED_CUDA_OVERLAP      | auto    | CUDA eval path: the channel MLP on a side stream beside the   |
|                             |         | dilated convs: on, off, or auto (only under CUDA graph        |
|                             |         | capture); read by the extension and ops/attention_cuda.py     |
| BAM_FUSED_CUDA_EVAL         | auto    | CUDA eval attention maps: kernel (extension op, CUDA cores),  |
|                             |         | triton-pass (Triton pass over x + op's convs and MLP), triton |
|                             |         | (Triton pass, convs, MLP; tensor cores, 3xTF32, Cr <= 64), or |
|                             |         | auto (GPU time of each on the first call per shape, fastest)  |
| BAM_FUSED_CPU_ISA           | auto    | CPU pass over x, its backward, our dilated convs, the fp32    |
|                             |         | gate forward's reciprocal (avx512: rcp14 + a Newton step),    |
|                             |         | the bf16 gate's rounding, forward and backward (avx512_bf16:  |
|                             |         | one instruction, the same bits):                              |
|                             |         | avx512_bf16 (avx512 + bf16 branches for bf16 x), avx512,      |
|                             |         | avx2, generic, or auto (the widest the CPU has); read by the  |
|                             |         | extension                                                     |
| BAM_FUSED_CPU_SPATIAL       | auto    | CPU dilated convs + final 1x1 conv: kernel (ours), library    |
|                             |         | (oneDNN), or auto (ours at 16 and 32 reduced channels, in     |
|                             |         | eval at 64 under avx2, below 16 on maps of N*H*W*Cr <= 25088  |
|                             |         | and above 32 under avx512 on N*H*W*Cr <= 50176); in bf16 for  |
|                             |         | bf16 x on avx512_bf16; also the fp32 training convs           |
|                             |         | (spatial_train: 16 and 32 only); read by the extension        |
| BAM_FUSED_CPU_WINOGRAD      | auto    | our fp32 CPU dilated convs: on (Winograd's F(2x2, 3x3)), off  |
|                             |         | (direct), or auto (Winograd from 16 reduced channels where H  |
|                             |         | and W >= 2 * dilation, and above 16 channels on N*H*W >= 784; |
|                             |         | every instruction set); read by the extension                 |
| BAM_FUSED_CPU_PACK_CACHE    | auto    | CPU eval ops' packed weights: auto (kept from call to call,   |
|                             |         | reused while the weights' bytes are unchanged) or off; read   |
|                             |         | by the extension                                              |
| BAM_FUSED_CPU_STREAM_STORES | auto    | CPU gate forward output: on (non-temporal stores), off, or    |
|                             |         | auto (on from half the last-level cache up); read by the      |
|                             |         | extension                                                     |
| BAM_FUSED_CPU_GROUPS        | auto    | CPU eval (bam_eval): how it walks the batch, each sample or   |
|                             |         | group through the whole BAM so the gate finds its x in the    |
|                             |         | cache: threads (whole samples one a thread, as many as the    |
|                             |         | thread count divides; the rest as groups), groups (about 4    |
|                             |         | MiB of x a group over all threads), images (one sample a      |
|                             |         | group), off (the whole batch), auto (threads where the        |
|                             |         | threads' samples fit the last-level cache, else groups);      |
|                             |         | same bits either way; read by the extension                   |
| BAM_FUSED_CPU_PREFETCH      | auto    | CPU eval (bam_eval): prefetch each next group's x while this  |
|                             |         | group's dilated convs compute (on), or not (off), or auto (on |
|                             |         | but for NCHW x under avx512); same bits either way; read by   |
|                             |         | the extension                                                 |
| TRITON_INTERPRET            | 0       | 1: run the Triton kernels on the CPU (tests; slow)            |
| THP_MEM_ALLOC_ENABLE        | unset   | PyTorch's: 1 puts new CPU tensors of 2 MiB and more in huge   |
|                             |         | pages (README: "CPU note"); bam_fused.info() reports it       |

Build-time only (setup.py): BAM_FUSED_SKIP_EXT, BAM_FUSED_FORCE_CUDA, TORCH_CUDA_ARCH_LIST,
CUDA_HOME, MAX_JOBS.
"""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def flag(name: str, default: bool = False) -> bool:
    """Reads a boolean variable; anything but a clear yes/no is an error that names it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name} must be 0 or 1, got {raw!r}")


def choice(name: str, choices: tuple[str, ...]) -> str:
    """Reads a variable that takes one of `choices` (case and surrounding spaces ignored; unset or
    empty: the first); anything else is an error that names it and the choices, as the
    extension's env_choice (csrc/env_choice.h) does for the variables it reads."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"environment variable {name} must be one of {choices}, got {value!r}")
    return value
