"""Scaled dot-product attention and standard multi-head attention (MHA, GQA, MQA).

Defined from scratch in chapter 01 (attention), 02 (the KV cache) and 03 (MQA/GQA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .checks import check_bool, check_positive_int
from .config import AttentionConfig, check_rope_theta
from .device import CHECK_MEMORY_ABOVE, check_memory
from .rope import RotaryEmbedding, apply_rope

__all__ = ["attention", "MultiHeadAttention", "check_input", "check_parameter_memory"]

# Prefill score matrices at least this large (B * heads * T * S entries: 256 MB in fp32) take the
# CPU's fused attention kernel even when key and value widths differ (see `attention`); smaller
# ones keep PyTorch's default choice, so small examples give bit-identical results either way.
_CPU_PAD_MIN_SCORES = 2**26


def check_input(module: nn.Module, x: torch.Tensor, width: int) -> None:
    """Raise a clear error unless ``x`` is (batch, tokens, width) with the module's dtype and device."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects floating-point hidden states (batch, tokens, {width}), got {x.dtype}; "
                        f"token ids need an embedding first (nn.Embedding), other numbers x.float()")
    if x.dim() != 3:
        raise ValueError(f"{name} expects input of shape (batch, tokens, {width}), got {tuple(x.shape)} "
                         f"({x.dim()}-D); add a batch dimension with x.unsqueeze(0) if needed")
    if x.shape[-1] != width:
        raise ValueError(f"{name} expects input width {width} (hidden_size), got {x.shape[-1]}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} got an input with zero tokens")
    if x.shape[0] == 0:
        raise ValueError(f"{name} got a batch of zero sequences (input shape {tuple(x.shape)})")
    weight = next(module.parameters())
    if x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device} but the weights are on {weight.device}; "
                         f"move one of them, e.g. module.to({str(x.device)!r})")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: input has dtype {x.dtype} but the weights are {weight.dtype}; "
                        f"cast one of them, e.g. module.to({x.dtype})")


def check_parameter_memory(num_params: int, what: str, advice: str) -> None:
    """Refuse to build a module whose ``num_params`` weights (in the default dtype, on the default
    device: see ``torch.set_default_device``) the device cannot hold."""
    probe = torch.empty(0)
    check_memory(num_params * probe.element_size(), probe.device,
                 f"{what} with {num_params:,} weights in {probe.dtype}", advice)


def _check_attention_args(q, k, v, scale, causal, key_mask) -> None:
    """Clear errors for the shapes, dtypes and devices `attention` needs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, tokens, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"attention: q, k and v must share dtype and device, got "
                        f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")
    (B, Hq, T, Dk), (Bk, Hkv, S, Dk2), (Bv, Hv, Sv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"attention: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hkv != Hv or S != Sv:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same heads and tokens")
    if Dk != Dk2:
        raise ValueError(f"attention: q and k must have the same last dim (the score is q·k), got {Dk} and {Dk2}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: the {Hq} query heads must be a multiple of the {Hkv} key/value heads")
    if min(B, T, S) == 0:
        raise ValueError(f"attention: empty input (batch {B}, {T} queries, {S} keys)")
    if T > S:
        raise ValueError(f"attention: {T} queries but only {S} keys; the T queries are the last T of the "
                         f"S positions, so T <= S (pass the cached keys too)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attention: scale must be a positive finite number, got {scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be True or False, got {causal!r}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_mask must be a bool tensor (True = a key may be seen), "
                            f"got {getattr(key_mask, 'dtype', type(key_mask).__name__)}")
        if tuple(key_mask.shape) != (B, S):
            raise ValueError(f"attention: key_mask must be (batch, keys) = ({B}, {S}), got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"attention: key_mask is on {key_mask.device}, q on {q.device}")


def _scores_fp32(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q kᵀ accumulated and returned in fp32 or wider (B, H, M, S): fp16 logits overflow past 65,504.

    On a GPU the product is taken in the input dtype with an fp32 output (no fp32 copy of the
    cache is made) where this PyTorch supports it; elsewhere both sides are upcast."""
    if q.dtype in (torch.float32, torch.float64):
        return torch.matmul(q, k.transpose(-1, -2))
    if q.device.type == "cuda":
        try:
            B, H, M, D = q.shape
            out = torch.bmm(q.reshape(B * H, M, D), k.reshape(B * H, -1, D).transpose(-1, -2), out_dtype=torch.float32)
            return out.view(B, H, M, -1)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, with grouped key/value heads, a causal mask and an optional key mask.

    Shapes: q (B, Hq, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv) with Hq a multiple of Hkv;
    returns (B, Hq, T, Dv). The T queries are the last T of the S positions (a decode step
    has T = 1 and sees every cached key). ``key_mask`` (B, S) bool marks the keys each sequence
    may see (False: padding); a query that may see no key at all gets a zero output. Scores and
    softmax are in fp32 whatever the input dtype. A key a query may not see never reaches its
    output, even when that key or value is NaN or infinite.
    """
    _check_attention_args(q, k, v, scale, causal, key_mask)
    B, Hq, T, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = _attention(q, k, v, scale, causal, key_mask)
    if (key_mask is not None or (causal and T > 1)) and not torch.isfinite(out).all():
        # 0 · NaN is NaN: a non-finite key or value would reach the outputs of queries that may not
        # see it through the zero in their softmax row. Checked on the (small) output, so the common
        # case costs nothing; then zero such entries, and mark as NaN the outputs of the queries
        # that may see one.
        bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))               # (B, Hkv, S)
        if bad.any():
            k, v = k.masked_fill(bad[..., None], 0), v.masked_fill(bad[..., None], 0)
            out = _attention(q, k, v, scale, causal, key_mask)
            allowed = _allowed(B, T, S, causal, key_mask, q.device)                   # (B or 1, 1, T, S)
            sees_bad = (allowed & bad[:, :, None, :]).any(-1)                         # (B, Hkv, T)
            g = Hq // Hkv
            return out.view(B, Hkv, g, T, Dv).masked_fill(sees_bad[:, :, None, :, None], float("nan")).view_as(out)
    return out


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
               key_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`attention` on checked inputs, without the guard against non-finite hidden keys."""
    B, Hq, T, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    masked = key_mask is not None or (causal and T > 1)
    if key_mask is None and T > 1 and T == S and q.device.type != "mps":
        # Plain prefill: PyTorch's fused kernel never materialises the (T, S) score matrix.
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
    if B * Hq * T * S * 8 >= CHECK_MEMORY_ABOVE:  # fp32 scores and their softmax
        check_memory(B * Hq * T * S * 8, q.device, f"attention scores of {T:,} queries over {S:,} keys "
                     f"(batch {B}, {Hq} heads, fp32, with the softmax)",
                     "process the queries in shorter chunks through a cache, or use a smaller batch")
    # The g query heads that share a key/value head become g*T rows of one matmul, so shared
    # keys and values are read once and never copied (this is why MQA/GQA decode is cheap).
    qg = q.reshape(B, Hkv, g * T, Dk)
    scores = _scores_fp32(qg, k) * scale                                              # (B, Hkv, g*T, S)
    if masked:
        allowed = _allowed(B, T, S, causal, key_mask, q.device)                       # (B or 1, 1, T, S)
        scores = scores.view(B, Hkv, g, T, S).masked_fill(~allowed[:, :, None], float("-inf")).view(B, Hkv, g * T, S)
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        # A query that may see no key has a row of -inf and a NaN softmax: give it a zero output.
        no_key = ~allowed.any(-1)                                                     # (B, 1, T)
        probs = probs.view(B, Hkv, g, T, S).masked_fill(no_key[:, :, None, :, None], 0.0).view(B, Hkv, g * T, S)
    return torch.matmul(probs.to(v.dtype), v).view(B, Hq, T, Dv)                      # (B, Hq, T, Dv)


def _allowed(B: int, T: int, S: int, causal: bool, key_mask: torch.Tensor | None,
             device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, S) bool: which of the S keys each of the T queries may see."""
    allowed = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal and T > 1:
        allowed = allowed.tril(S - T)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return allowed


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
            check_positive_int("MultiHeadAttention", name, value)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"MultiHeadAttention: hidden_size ({hidden_size}) is not divisible by "
                                 f"num_heads ({num_heads}); pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        check_positive_int("MultiHeadAttention", "head_dim", head_dim)
        if rope_theta is not None:
            check_rope_theta("MultiHeadAttention", rope_theta)
        check_bool("MultiHeadAttention", "bias", bias)
        if num_heads % num_kv_heads:
            raise ValueError(f"MultiHeadAttention: num_heads ({num_heads}) must be divisible by num_kv_heads "
                             f"({num_kv_heads}); valid choices divide {num_heads}")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"MultiHeadAttention: RoPE needs an even head_dim, got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        params = 2 * hidden_size * (num_heads + num_kv_heads) * head_dim  # W_Q, W_O; W_K, W_V
        check_parameter_memory(params, f"MultiHeadAttention({hidden_size}, {num_heads} heads of {head_dim})",
                               "use a smaller hidden_size, fewer heads or a smaller head_dim")
        self.W_Q = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.W_K = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.W_V = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.W_O = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.rope = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None

    @classmethod
    def from_config(cls, config: AttentionConfig, hidden_size: int | None = None) -> "MultiHeadAttention":
        """Build from an :class:`AttentionConfig`; ``hidden_size`` may be shrunk for CPU runs
        (heads and head_dim, which fix the cache, stay as configured)."""
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"MultiHeadAttention.from_config needs an AttentionConfig (e.g. "
                            f"ATTENTION_PRESETS['Llama-3-8B']), got {type(config).__name__}")
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache, the T tokens follow the cached ones.

        ``key_mask`` (B, S) bool, S = cached + new tokens, marks the real tokens of each sequence
        (False: padding, never attended to); see :func:`attention`."""
        check_input(self, x, self.hidden_size)
        start = 0
        if cache is not None:
            shape = (self.num_kv_heads, self.head_dim)
            if cache.mode != "mha" or cache.shapes != {"k": shape, "v": shape}:
                raise ValueError(f"this cache ({cache!r}) was not made by this module; use module.new_cache()")
            cache.check_input(x)
            cache.bind(self)
            start = cache.length
        T = x.shape[1]
        q, k, v = self.project(x, torch.arange(start, start + T, device=x.device))
        if cache is not None:
            k, v = cache.update(k=k, v=v).values()                                    # (B, n_kv, S, d_h)
        out = attention(q, k, v, self.scale, key_mask=key_mask)                       # (B, n_h, T, d_h)
        return self.output(out)

    # --- the pieces of a step, for callers that keep their own cache (the paged cache, chapter 12) ---
    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) at integer ``positions`` ((T,) shared by the batch, or (B, T) one per
        sequence and token) -> q (B, n_h, T, d_h), k and v (B, n_kv, T, d_h), RoPE applied."""
        check_input(self, x, self.hidden_size)
        B, T, _ = x.shape
        q = self.W_Q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, n_h, T, d_h)
        k = self.W_K(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, d_h)
        v = self.W_V(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, d_h)
        if self.rope is not None:
            cos, sin = self.rope.tables(positions, B, T, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head attention outputs (B, n_h, T, d_h) -> the layer's output (B, T, d_model) through W_O."""
        B, _, T, _ = out.shape
        return self.W_O(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
