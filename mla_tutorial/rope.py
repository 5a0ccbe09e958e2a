"""Rotary position embeddings (RoPE) and YaRN context extension.

RoPE rotates pairs of dimensions of a query or key by an angle proportional to the token's
position, so the dot product of a rotated query and key depends only on their distance.
Two pair layouts exist in the wild, and mixing them up is a classic bug:

* half-split (GPT-NeoX / Llama / HF ``rotate_half``): pair ``i`` is ``(x[i], x[i + d/2])``;
* interleaved (RoFormer, DeepSeek's checkpoints, HF ``rope_interleave=True``): pair ``i`` is
  ``(x[2i], x[2i + 1])``.

Defined in chapter 06; used by :mod:`mla_tutorial.attention` and :mod:`mla_tutorial.mla`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .checks import check_bool, check_positive_int
from .config import check_rope_theta, check_yarn, yarn_get_mscale

__all__ = ["rope_inv_freq", "yarn_inv_freq", "apply_rope", "RotaryEmbedding"]


def rope_inv_freq(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angular frequency of each of the ``dim // 2`` pairs: ``theta ** (-2i / dim)``, in fp32."""
    _check_dim(dim)
    check_rope_theta("rope_inv_freq", theta)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_inv_freq(dim: int, theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and the cos/sin magnitude factor (Peng et al., 2023).

    High-frequency pairs (many rotations within the original context) keep their frequency
    (extrapolation); low-frequency pairs are divided by ``factor`` (interpolation); a linear
    ramp between ``beta_fast`` and ``beta_slow`` rotations blends the two. Matches the formula in
    DeepSeek's reference code and in Hugging Face ``transformers``.
    """
    rope_scaling = check_yarn("yarn_inv_freq", rope_scaling)
    base = rope_inv_freq(dim, theta)
    factor = float(rope_scaling["factor"])
    original = rope_scaling["original_max_position_embeddings"]
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the pair index whose wavelength fits `num_rotations` times into the original context
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate fully
    inv_freq = base / factor * (1 - keep) + base * keep

    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


def _check_dim(dim: int) -> None:
    check_positive_int("RoPE", "dim", dim)
    if dim % 2:
        raise ValueError(f"RoPE dimension must be a positive even number (it rotates pairs), got {dim}")


def _check_rope_args(x: Any, cos: Any, sin: Any, interleaved: Any) -> None:
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"apply_rope: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"apply_rope: {name} must be a floating-point tensor, got {t.dtype} (a rotation of "
                            f"integers would be truncated); convert it first, e.g. {name}.float()")
    check_bool("apply_rope", "interleaved", interleaved)
    if x.dim() < 2:
        raise ValueError(f"apply_rope: x must be (..., T, d), got shape {tuple(x.shape)}")
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"apply_rope: last dim of x ({x.shape[-1]}) must be twice the number of "
                         f"angles ({cos.shape[-1]})")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.dim() >= 2 and cos.shape[-2] not in (1, x.shape[-2]):
        raise ValueError(f"apply_rope: x has {x.shape[-2]} positions (shape {tuple(x.shape)}) but cos/sin have "
                         f"{cos.shape[-2]} (shape {tuple(cos.shape)}); compute them for the same positions")
    if cos.device != x.device:
        raise ValueError(f"apply_rope: x is on {x.device} but cos/sin are on {cos.device}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the last dimension of ``x`` (..., T, d) by per-position angles.

    ``cos`` and ``sin`` are (T, d/2), one angle per pair, broadcast over leading dims.
    The result is returned in the half-split layout in both conventions: for ``interleaved``
    input the pairs are gathered first, which changes no dot product (queries and keys are
    permuted alike) and is what Hugging Face's ``apply_rotary_pos_emb_interleave`` returns.
    Computed in fp32 (or fp64 for fp64 input), returned in ``x``'s dtype.
    """
    _check_rope_args(x, cos, sin, interleaved)
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = cos.to(compute), sin.to(compute)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, with optional YaRN scaling.

    >>> rope = RotaryEmbedding(64)
    >>> cos, sin = rope(torch.arange(10))   # each (10, 32)
    """

    def __init__(self, dim: int, theta: float = 10000.0, rope_scaling: dict[str, Any] | None = None):
        super().__init__()
        _check_dim(dim)
        check_rope_theta("RotaryEmbedding", theta)
        if rope_scaling is not None:
            rope_scaling = check_yarn("RotaryEmbedding", rope_scaling)
        if rope_scaling is None:
            inv_freq, self.attention_factor = rope_inv_freq(dim, theta), 1.0
        else:
            inv_freq, self.attention_factor = yarn_inv_freq(dim, theta, rope_scaling)
        self.dim = dim
        # A plain attribute, not a buffer, so `model.to(torch.bfloat16)` cannot round it: a bf16
        # frequency table puts angles whole turns off at long context. It follows the positions' device.
        self.inv_freq = inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer positions (T,) -> cos, sin of shape (T, dim/2), fp32; (B, T), one position per
        sequence and token -> (B, T, dim/2)."""
        if not isinstance(positions, torch.Tensor) or positions.dim() not in (1, 2) \
                or positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            got = (f"{positions.dtype} of shape {tuple(positions.shape)}" if isinstance(positions, torch.Tensor)
                   else type(positions).__name__)
            raise TypeError(f"RotaryEmbedding expects integer positions: a 1-D tensor of positions, e.g. "
                            f"torch.arange(T), or (B, T) with one per sequence and token; got {got}")
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def tables(self, positions: torch.Tensor, batch: int, tokens: int,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a (batch, heads, tokens, dim) tensor on ``device``: (T,) positions shared by
        the batch give (T, dim/2) each; (B, T) positions, one per sequence and token, give
        (B, 1, T, dim/2)."""
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got "
                            f"{getattr(positions, 'dtype', type(positions).__name__)}")
        if tuple(positions.shape) not in ((tokens,), (batch, tokens)):
            raise ValueError(f"positions must be (T,) = ({tokens},) or (B, T) = ({batch}, {tokens}), "
                             f"got {tuple(positions.shape)}")
        if device is not None and positions.device != device:
            raise ValueError(f"positions are on {positions.device} but the input is on {device}; "
                             f"make them with device=x.device")
        cos, sin = self(positions)                                                    # (T or B, T, dim/2)
        return (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])
