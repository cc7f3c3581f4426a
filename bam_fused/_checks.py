"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument,
what it got and what was expected: a kernel library must never answer bad input silently.
"""

from __future__ import annotations

import torch

COMBINES = ("sum", "product")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_combine(combine: object) -> str:
    return check_choice("combine", combine, COMBINES)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_reduction(gate_channels: int, reduction_ratio: int) -> int:
    """Returns the hidden width C // r, which must be at least one channel."""
    check_positive_int("gate_channels", gate_channels)
    check_positive_int("reduction_ratio", reduction_ratio)
    hidden = gate_channels // reduction_ratio
    if hidden < 1:
        raise ValueError(
            f"gate_channels // reduction_ratio must be >= 1, got {gate_channels} // "
            f"{reduction_ratio} = 0; use reduction_ratio <= {gate_channels}"
        )
    return hidden


def check_float_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse, mkldnn, jagged: no kernel (nor the reference) takes them
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {str(t.layout).replace('torch.', '')}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_feature_map(x: object, channels: int | None = None, name: str = "x", *, pixels: bool = False) -> torch.Tensor:
    """x must be a floating (N, C, H, W) tensor, with C == channels when given, and with at least
    one pixel when ``pixels`` (BAM's channel branch averages over them)."""
    x = check_float_tensor(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1) for this BAM, got shape {tuple(x.shape)}")
    if pixels and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ValueError(
            f"{name} must have H, W >= 1 (BAM's channel branch averages over the pixels), got shape {tuple(x.shape)}"
        )
    return x


def normalize_attention(x: torch.Tensor, channel_att: object, spatial_att: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the attention terms against x and returns them as (N, C) and (N, H*W) views."""
    n, c, h, w = x.shape
    channel_att = check_float_tensor("channel_att", channel_att)
    spatial_att = check_float_tensor("spatial_att", spatial_att)
    if tuple(channel_att.shape) not in ((n, c), (n, c, 1, 1)):
        raise ValueError(
            f"channel_att must have shape (N, C) = {(n, c)} or (N, C, 1, 1) = {(n, c, 1, 1)} "
            f"to match x of shape {tuple(x.shape)}, got {tuple(channel_att.shape)}"
        )
    if tuple(spatial_att.shape) not in ((n, h, w), (n, 1, h, w)):
        raise ValueError(
            f"spatial_att must have shape (N, H, W) = {(n, h, w)} or (N, 1, H, W) = {(n, 1, h, w)} "
            f"to match x of shape {tuple(x.shape)}, got {tuple(spatial_att.shape)}"
        )
    for name, t in (("channel_att", channel_att), ("spatial_att", spatial_att)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")
    return channel_att.reshape(n, c), spatial_att.reshape(n, h * w)
