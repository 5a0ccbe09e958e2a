"""Scaled dot-product attention and standard multi-head attention (MHA, GQA, MQA).

Defined from scratch in chapter 01 (attention), 02 (the KV cache) and 03 (MQA/GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import AttentionConfig
from .rope import RotaryEmbedding, apply_rope

__all__ = ["attention", "MultiHeadAttention", "check_input"]

# Prefill score matrices at least this large (B * heads * T * S entries: 256 MB in fp32) take the
# CPU's fused attention kernel even when key and value widths differ (see `attention`); smaller
# ones keep PyTorch's default choice, so small examples give bit-identical results either way.
_CPU_PAD_MIN_SCORES = 2**26


def check_input(module: nn.Module, x: torch.Tensor, width: int) -> None:
    """Raise a clear error unless ``x`` is (batch, tokens, width) with the module's dtype and device."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} expects input of shape (batch, tokens, {width}), got {tuple(x.shape)} "
                         f"({x.dim()}-D); add a batch dimension with x.unsqueeze(0) if needed")
    if x.shape[-1] != width:
        raise ValueError(f"{name} expects input width {width} (hidden_size), got {x.shape[-1]}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} got an input with zero tokens")
    weight = next(module.parameters())
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device} but the weights are on {weight.device}; "
                         f"move one of them, e.g. module.to({str(x.device)!r})")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: input has dtype {x.dtype} but the weights are {weight.dtype}; "
                        f"cast one of them, e.g. module.to({x.dtype})")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, with grouped key/value heads and a causal mask.

    Shapes: q (B, Hq, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv) with Hq a multiple of Hkv;
    returns (B, Hq, T, Dv). The T queries are the last T of the S positions (a decode step
    has T = 1 and sees every cached key). The softmax runs in fp32 whatever the input dtype.
    """
    B, Hq, T, Dk = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if T > 1 and T == S and q.device.type != "mps":
        # Plain prefill: PyTorch's fused kernel never materialises the (T, S) score matrix.
        Dv = v.shape[-1]
        if q.device.type == "cpu" and Dv != Dk and B * Hq * T * S >= _CPU_PAD_MIN_SCORES:
            # On a CPU the fused kernel needs equal key and value widths (MLA's are 192 and 128);
            # otherwise PyTorch falls back to a path that stores the whole score matrix (8.6 GB
            # for 128 heads and 4,096 tokens in fp32). Zero columns added to V change nothing.
            D = max(Dk, Dv)
            q, k, v = (t if t.shape[-1] == D else F.pad(t, (0, D - t.shape[-1])) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=Hq != Hkv)
            return out[..., :Dv]
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=Hq != Hkv)
    g = Hq // Hkv
    # The g query heads that share a key/value head become g*T rows of one matmul, so shared
    # keys and values are read once and never copied (this is why MQA/GQA decode is cheap).
    qg = q.reshape(B, Hkv, g * T, Dk)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, g*T, S)
    if causal and T > 1:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
        scores = scores.view(B, Hkv, g, T, S).masked_fill(~allowed, float("-inf")).view(B, Hkv, g * T, S)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(B, Hq, T, v.shape[-1])  # (B, Hq, T, Dv)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` key/value heads: MHA, GQA or MQA in one module.

    Args:
        hidden_size: d_model.
        num_heads: query heads n_h.
        num_kv_heads: key/value heads (default ``num_heads``: MHA; 1: MQA; between: GQA).
        head_dim: per-head width d_h (default ``hidden_size // num_heads``).
        rope_theta: apply half-split RoPE with this base to queries and keys (``None``: no RoPE).
        bias: add biases to the projections (GPT-2 style).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_theta: float | None = None, bias: bool = False):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MultiHeadAttention: {name} must be a positive int, got {value!r}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"MultiHeadAttention: hidden_size ({hidden_size}) is not divisible by "
                                 f"num_heads ({num_heads}); pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"MultiHeadAttention: head_dim must be a positive int, got {head_dim!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"MultiHeadAttention: num_heads ({num_heads}) must be divisible by num_kv_heads "
                             f"({num_kv_heads}); valid choices divide {num_heads}")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"MultiHeadAttention: RoPE needs an even head_dim, got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.W_Q = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.W_K = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.W_V = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.W_O = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.rope = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None

    @classmethod
    def from_config(cls, config: AttentionConfig, hidden_size: int | None = None) -> "MultiHeadAttention":
        """Build from an :class:`AttentionConfig`; ``hidden_size`` may be shrunk for CPU runs
        (heads and head_dim, which fix the cache, stay as configured)."""
        return cls(hidden_size or config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.head_dim, config.rope_theta)

    def extra_repr(self) -> str:
        return f"n_h={self.num_heads}, n_kv={self.num_kv_heads}, d_h={self.head_dim}, rope={self.rope is not None}"

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty cache for this module: K and V, ``num_kv_heads`` x ``head_dim`` each, per token."""
        weight = self.W_Q.weight
        shape = (self.num_kv_heads, self.head_dim)
        return KVCache(batch_size, max_len, {"k": shape, "v": shape}, dtype or weight.dtype,
                       device or weight.device, mode="mha")

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache, the T tokens follow the cached ones."""
        check_input(self, x, self.hidden_size)
        start = 0
        if cache is not None:
            shape = (self.num_kv_heads, self.head_dim)
            if cache.mode != "mha" or cache.shapes != {"k": shape, "v": shape}:
                raise ValueError(f"this cache ({cache!r}) was not made by this module; use module.new_cache()")
            cache.check_input(x)
            start = cache.length
        B, T, _ = x.shape
        q = self.W_Q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, n_h, T, d_h)
        k = self.W_K(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, d_h)
        v = self.W_V(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, d_h)
        if self.rope is not None:
            cos, sin = self.rope(torch.arange(start, start + T, device=x.device))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k=k, v=v).values()                                    # (B, n_kv, S, d_h)
        out = attention(q, k, v, self.scale)                                          # (B, n_h, T, d_h)
        return self.W_O(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
