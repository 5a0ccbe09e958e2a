"""DeepSeek's Multi-Head Latent Attention (MLA) with decoupled RoPE, in three cache modes.

Names follow the DeepSeek-V2 paper (section 2.1): for a token's hidden state h,

    c_Q  = RMSNorm(W_DQ h)                 query latent (skipped when q_lora_rank is None)
    q_C  = W_UQ c_Q,  q_R = RoPE(W_QR c_Q)  per-head query: content part and RoPE part
    c_KV = RMSNorm(W_DKV h)                 the key/value latent: this is what MLA caches (no norm
                                            when kv_norm=False, as in a converted layer)
    k_R  = RoPE(W_KR h)                     one RoPE key shared by all heads: cached too
    k_C  = W_UK c_KV,  v = W_UV c_KV        per-head keys and values, re-derived from c_KV
    o    = W_O [softmax((q_C·k_C + q_R·k_R) · scale) v]_heads

Cache modes (chapters 04-05):

* ``"expanded"``: cache per-head K (d_h + d_h_R) and V (d_v): DeepSeek's reference "naive" path.
* ``"latent"``: cache c_KV and k_R (576 values per token for V3) and re-expand K and V from the
  whole cache at every step: small cache, but every step pays for the expansion.
* ``"absorbed"``: cache c_KV and k_R; fold W_UK into the query (q_C W_UK lives in latent space)
  and apply W_UV after attention. No per-head K or V is ever made for cached tokens: decode is
  an MQA whose one key/value head is the 576-wide latent. Long query chunks (prefill) take the
  expanded computation when it needs fewer FLOPs, as serving engines do.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import attention, check_input, check_parameter_memory
from .cache import KVCache
from .checks import check_bool, check_positive_int, check_real
from .config import MLAConfig
from .device import CHECK_MEMORY_ABOVE, check_memory
from .rope import RotaryEmbedding, apply_rope

__all__ = ["MultiHeadLatentAttention", "RMSNorm", "MLA_MODES"]

MLA_MODES = ("expanded", "latent", "absorbed")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as DeepSeek and Hugging Face do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        check_positive_int("RMSNorm", "dim", dim)
        check_real("RMSNorm", "eps", eps, above=0, hint="added to the mean square before the square root")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or \
                x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm({self.weight.shape[0]}) expects a floating-point tensor (..., "
                             f"{self.weight.shape[0]}), got "
                             f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MultiHeadLatentAttention(nn.Module):
    """One MLA layer. ``mode`` is the default cache mode; a call or a cache may choose another.

    Args:
        config: the layer's :class:`MLAConfig`.
        mode: ``"expanded"``, ``"latent"`` or ``"absorbed"`` (default).
        absorb_prefill: in absorbed mode, how to treat a call with several new tokens:
            ``None`` picks the path with fewer FLOPs (see :meth:`uses_absorbed_path`),
            ``True`` always uses the absorbed computation, ``False`` always the expanded one.
    """

    def __init__(self, config: MLAConfig, mode: str = "absorbed", absorb_prefill: bool | None = None):
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise TypeError(f"MultiHeadLatentAttention needs an MLAConfig, got {type(config).__name__}")
        config.validate()  # again: its rope_scaling dict may have been edited in place
        self.config = c = config
        self.mode = self._check_mode(mode)
        self.absorb_prefill = absorb_prefill
        n_h, d_c, d_R = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        check_parameter_memory(self.parameter_count(c), f"MultiHeadLatentAttention({c.name})",
                               "use a smaller config (hidden_size, num_attention_heads, kv_lora_rank, ...)")
        if c.q_lora_rank is not None:
            self.W_DQ = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)        # q_a_proj
            self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)                    # q_a_layernorm
        else:
            self.W_DQ = self.q_norm = None
        d_q_in = c.q_lora_rank or c.hidden_size
        self.W_UQ = nn.Linear(d_q_in, n_h * c.qk_nope_head_dim, bias=False)        # q_b_proj, content rows
        self.W_QR = nn.Linear(d_q_in, n_h * d_R, bias=False)                        # q_b_proj, RoPE rows
        self.W_DKV = nn.Linear(c.hidden_size, d_c, bias=False)                      # kv_a_proj_with_mqa[:d_c]
        self.kv_norm = RMSNorm(d_c, c.rms_norm_eps) if c.kv_norm else None          # kv_a_layernorm
        self.W_KR = nn.Linear(c.hidden_size, d_R, bias=False)                       # kv_a_proj_with_mqa[d_c:]
        # Up-projections kept per head, the shape absorption needs: W_UK[h] maps c_KV to head h's key.
        self.W_UK = nn.Parameter(torch.empty(n_h, c.qk_nope_head_dim, d_c))        # kv_b_proj, key rows
        self.W_UV = nn.Parameter(torch.empty(n_h, c.v_head_dim, d_c))               # kv_b_proj, value rows
        self.W_O = nn.Linear(n_h * c.v_head_dim, c.hidden_size, bias=False)         # o_proj
        self.rope = RotaryEmbedding(d_R, c.rope_theta, c.rope_scaling)
        if c.rope_frequencies is not None:  # a converted layer keeps its source's frequency pairs
            self.rope.inv_freq = torch.tensor(c.rope_frequencies, dtype=torch.float32)
        self.scale = c.softmax_scale
        bound = 1 / math.sqrt(d_c)  # the same range nn.Linear(d_c, ...) would use
        nn.init.uniform_(self.W_UK, -bound, bound)
        nn.init.uniform_(self.W_UV, -bound, bound)

    @staticmethod
    def parameter_count(config: MLAConfig) -> int:
        """Weights of the layer (projections and norms), from the config alone."""
        c = config
        n_h, d_q = c.num_attention_heads, c.q_lora_rank or c.hidden_size
        return (c.hidden_size * (c.q_lora_rank or 0) + (c.q_lora_rank or 0)     # W_DQ, q_norm
                + d_q * n_h * c.qk_head_dim                                      # W_UQ, W_QR
                + c.hidden_size * c.latent_cache_dim + c.kv_lora_rank * c.kv_norm  # W_DKV, W_KR, kv_norm
                + n_h * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank      # W_UK, W_UV
                + n_h * c.v_head_dim * c.hidden_size)                             # W_O

    @property
    def absorb_prefill(self) -> bool | None:
        """None: absorbed mode picks the cheaper path for several new tokens; True/False: always
        absorbed / always expanded (see :meth:`uses_absorbed_path`)."""
        return self._absorb_prefill

    @absorb_prefill.setter
    def absorb_prefill(self, value: bool | None) -> None:
        self._absorb_prefill = check_bool("MultiHeadLatentAttention", "absorb_prefill", value, allow_none=True)

    @staticmethod
    def _check_mode(mode: str) -> str:
        if not isinstance(mode, str) or mode not in MLA_MODES:
            raise ValueError(f"unknown MLA mode {mode!r}; choose one of {MLA_MODES}")
        return mode

    def extra_repr(self) -> str:
        c = self.config
        return (f"{c.name}: n_h={c.num_attention_heads}, d_c={c.kv_lora_rank}, d_h_R={c.qk_rope_head_dim}, "
                f"mode={self.mode!r}")

    # --- caches ------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, mode: str | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        """An empty cache. Expanded mode: per-head K and V. Latent/absorbed: one buffer
        ``latent`` of width d_c + d_h_R holding [c_KV, k_R] (576 values per token for V3)."""
        mode = self._check_mode(mode or self.mode)
        weight = self.W_O.weight
        return KVCache(batch_size, max_len, self._cache_shapes(mode), dtype or weight.dtype,
                       device or weight.device, mode=mode)

    def _cache_shapes(self, mode: str) -> dict[str, tuple[int, int]]:
        c = self.config
        if mode == "expanded":
            return {"k": (c.num_attention_heads, c.qk_head_dim), "v": (c.num_attention_heads, c.v_head_dim)}
        return {"latent": (1, c.latent_cache_dim)}

    def _resolve_mode(self, mode: str | None, cache: KVCache | None) -> str:
        if cache is None:
            return self._check_mode(mode or self.mode)
        if cache.mode not in MLA_MODES:
            raise ValueError(f"this cache was made for mode {cache.mode!r}, not by an MLA layer; "
                             f"use MultiHeadLatentAttention.new_cache()")
        mode = self._check_mode(mode or cache.mode)
        if (mode == "expanded") != (cache.mode == "expanded"):
            raise ValueError(f"mode {mode!r} cannot use a cache made for mode {cache.mode!r}: the expanded "
                             f"cache holds per-head K/V, the latent and absorbed modes share a latent cache")
        if cache.shapes != self._cache_shapes(cache.mode):
            raise ValueError(f"this cache holds {cache.shapes} per token, this layer needs "
                             f"{self._cache_shapes(cache.mode)}; make it with this layer's new_cache()")
        return mode

    # --- the computation -----------------------------------------------------------------------
    def uses_absorbed_path(self, num_new: int, num_total: int) -> bool:
        """Whether absorbed mode computes ``num_new`` queries over ``num_total`` keys absorbed.

        FLOPs per head, for T new queries over S keys (d_c latent, d_h content, d_v value dims):
        absorbed pays T·S·2(2·d_c + d_h_R) for scores and values plus T·2·d_c(d_h + d_v) to move
        queries and outputs in and out of latent space; expanded pays S·2·d_c(d_h + d_v) to expand
        every cached token plus T·S·2(d_h + d_h_R + d_v). Decode (T = 1) is always absorbed.
        """
        if num_new == 1 or self.absorb_prefill:
            return True
        if self.absorb_prefill is False:
            return False
        c = self.config
        d_c, d_h, d_v = c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim
        extra_per_pair = 2 * d_c - d_h - d_v  # absorbed minus expanded, per (query, key) pair / 2
        return num_new * num_total * extra_per_pair < (num_total - num_new) * d_c * (d_h + d_v)

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head K and V from cached latents (B, 1, S, d_c + d_h_R):
        K = [W_UK c_KV, k_R] (B, n_h, S, d_h + d_h_R) and V = W_UV c_KV (B, n_h, S, d_v)."""
        c = self.config
        d_c = c.kv_lora_rank
        c_KV, k_R = latent[:, 0, :, :d_c], latent[:, :, :, d_c:]                      # (B, S, d_c), (B, 1, S, d_h_R)
        B, S = latent.shape[0], latent.shape[2]
        nbytes = B * c.num_attention_heads * S * (2 * c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) \
            * latent.element_size()
        if nbytes >= CHECK_MEMORY_ABOVE:
            check_memory(nbytes, latent.device, f"per-head keys and values re-expanded from {S:,} cached tokens "
                         f"(batch {B}, {c.num_attention_heads} heads)",
                         "use mode='absorbed', which never expands the cache, or a shorter context")
        k_C = torch.einsum("bsc,hdc->bhsd", c_KV, self.W_UK)                          # (B, n_h, S, d_h)
        v = torch.einsum("bsc,hvc->bhsv", c_KV, self.W_UV)                            # (B, n_h, S, d_v)
        k = torch.cat([k_C, k_R.expand(-1, k_C.shape[1], -1, -1)], dim=-1)           # (B, n_h, S, d_h + d_h_R)
        return k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mode: str | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache, the T tokens follow the cached ones.

        ``mode`` defaults to the cache's mode, else the layer's. ``key_mask`` (B, S) bool, S =
        cached + new tokens, marks the real tokens of each sequence (False: padding, never
        attended to); see :func:`~mla_tutorial.attention.attention`."""
        c = self.config
        check_input(self, x, c.hidden_size)
        mode = self._resolve_mode(mode, cache)
        start = 0
        if cache is not None:
            cache.check_input(x)
            cache.bind(self)
            start = cache.length
        T, d_c = x.shape[1], c.kv_lora_rank
        q_C, q_R, latent = self.project(x, torch.arange(start, start + T, device=x.device))

        if mode == "expanded":
            k, v = self.expand(latent)                                                # new tokens only
            if cache is not None:
                k, v = cache.update(k=k, v=v).values()                                # (B, n_h, S, ...)
            out = attention(torch.cat([q_C, q_R], dim=-1), k, v, self.scale, key_mask=key_mask)
        else:
            if cache is not None:
                latent = cache.update(latent=latent)["latent"]                        # (B, 1, S, d_c + d_h_R)
            if mode == "latent" or not self.uses_absorbed_path(T, latent.shape[2]):
                k, v = self.expand(latent)                                            # every cached token
                out = attention(torch.cat([q_C, q_R], dim=-1), k, v, self.scale, key_mask=key_mask)
            else:
                # Absorption: q_C·(W_UK c) = (W_UKᵀ q_C)·c, so score queries in latent space ...
                q_lat = self.absorb_query(q_C)                                        # (B, n_h, T, d_c)
                # ... as an MQA whose single key is [c_KV, k_R] and single value is c_KV ...
                o_lat = attention(torch.cat([q_lat, q_R], dim=-1), latent, latent[..., :d_c], self.scale,
                                  key_mask=key_mask)
                # ... and move the weighted latents to each head's value space afterwards.
                return self.absorbed_output(o_lat)
        return self.output(out)                                                       # out: (B, n_h, T, d_v)

    # --- the pieces of a step, for callers that keep their own cache (the paged cache, chapter 12) ---
    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) at integer ``positions`` -> q_C (B, n_h, T, d_h), q_R (B, n_h, T, d_h_R)
        and the latent row [c_KV, k_R] (B, 1, T, d_c + d_h_R) that MLA caches (RoPE applied).

        ``positions`` is (T,), shared by the batch, or (B, T): one position per sequence and token,
        as a batch of sequences of different lengths needs."""
        c = self.config
        check_input(self, x, c.hidden_size)
        B, T, _ = x.shape
        n_h = c.num_attention_heads
        cos, sin = self.rope.tables(positions, B, T, x.device)                        # (T, ...) or (B, 1, T, d_h_R / 2)

        # Queries: content part q_C and decoupled RoPE part q_R, per head.
        c_Q = self.q_norm(self.W_DQ(x)) if self.W_DQ is not None else x              # (B, T, d_c_q)
        q_C = self.W_UQ(c_Q).view(B, T, n_h, -1).transpose(1, 2)                      # (B, n_h, T, d_h)
        q_R = self.W_QR(c_Q).view(B, T, n_h, -1).transpose(1, 2)                      # (B, n_h, T, d_h_R)
        q_R = apply_rope(q_R, cos, sin, c.rope_interleave)
        return q_C, q_R, self._latent(x, cos, sin)

    def project_latent(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Only the latent rows (B, 1, T, d_c + d_h_R) of :meth:`project`: what a prompt's tokens
        leave in the cache, without their queries."""
        check_input(self, x, self.config.hidden_size)
        return self._latent(x, *self.rope.tables(positions, x.shape[0], x.shape[1], x.device))

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Keys and values: everything about a token that MLA keeps is [c_KV, k_R].
        c_KV = self.W_DKV(x)                                                          # (B, T, d_c)
        if self.kv_norm is not None:
            c_KV = self.kv_norm(c_KV)
        k_R = apply_rope(self.W_KR(x).unsqueeze(1), cos, sin, self.config.rope_interleave)  # (B, 1, T, d_h_R)
        return torch.cat([c_KV.unsqueeze(1), k_R], dim=-1)                            # (B, 1, T, d_c + d_h_R)

    def absorb_query(self, q_C: torch.Tensor) -> torch.Tensor:
        """q_C (B, n_h, T, d_h) -> q_lat = W_UKᵀ q_C (B, n_h, T, d_c): the content query in latent space."""
        return torch.einsum("bhtd,hdc->bhtc", q_C, self.W_UK)

    def absorbed_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention-weighted latents o_lat (B, n_h, T, d_c) -> the layer's output (B, T, d_model):
        W_UV per head, then W_O."""
        return self.output(torch.einsum("bhtc,hvc->bhtv", o_lat, self.W_UV))

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head values (B, n_h, T, d_v) -> the layer's output (B, T, d_model) through W_O."""
        B, n_h, T, d_v = out.shape
        return self.W_O(out.transpose(1, 2).reshape(B, T, n_h * d_v))

