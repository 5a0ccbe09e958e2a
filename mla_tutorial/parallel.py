"""Tensor parallelism and the KV cache, computed: why MLA's attention runs data-parallel.

Tensor parallelism (TP) over ``tp`` GPUs splits attention by heads: each GPU computes ``n_h / tp``
query heads and keeps the keys and values of its share of the key/value heads. That divides
MHA's and GQA's cache by ``tp`` (until there are fewer key/value heads than GPUs: then heads are
copied, one per GPU, as vLLM does). MLA's latent ``[c_KV, k_R]`` belongs to no head: every head
reads all of it, so every TP rank must hold the whole latent of every sequence, and the node
stores each token ``tp`` times. DeepSeek and SGLang therefore run MLA's attention
*data-parallel* (DP): each GPU attends for its own sequences and holds only their latents, while
the rest of the model (experts, projections) stays split.

Per-GPU bytes per cached token per layer, V3 dims, bf16, ``tp = 8``: MHA (128 heads of 128) 8,192;
GQA-8 512; MLA under TP 1,152 on every GPU (9,216 across the node); MLA with data-parallel
attention 1,152 on one GPU only.

Defined in chapter 12.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .accounting import bytes_per_element, kv_cache_elements
from .config import AttentionConfig, MLAConfig

__all__ = ["ParallelCache", "parallel_cache"]


@dataclass(frozen=True)
class ParallelCache:
    """How one cached token is stored across a group of ``gpus`` GPUs (per layer, in bytes).

    Attributes:
        name: the attention and layout, e.g. "GQA-8, TP=8".
        gpus: GPUs in the group.
        token_bytes: one whole copy of the token's cache (all heads, or the whole latent).
        per_gpu_bytes: bytes the token takes on each GPU that holds part or all of it.
        gpus_holding: how many GPUs hold it (all of them under TP, one under data-parallel attention).
        heads_per_gpu: key/value heads each GPU keeps (``None`` for MLA's latent).
    """

    name: str
    gpus: int
    token_bytes: float
    per_gpu_bytes: float
    gpus_holding: int
    heads_per_gpu: int | None

    @property
    def node_bytes(self) -> float:
        """Bytes the token takes across the whole group."""
        return self.per_gpu_bytes * self.gpus_holding

    @property
    def copies(self) -> float:
        """How many times the group stores the token's cache (1: split or held once; tp: replicated)."""
        return self.node_bytes / self.token_bytes


def parallel_cache(config: AttentionConfig | MLAConfig, tp: int, dtype: torch.dtype | float = torch.bfloat16,
                   data_parallel_attention: bool = False) -> ParallelCache:
    """Per-GPU cache of one token, one layer, for ``config`` served with tensor parallelism ``tp``.

    Standard attention (MHA / GQA / MQA) splits its ``n_kv`` key/value heads over the GPUs:
    ``ceil(n_kv / tp)`` each (so each head is copied when ``n_kv < tp``). MLA under TP keeps the
    whole latent (``d_c + d_h_R`` values) on every GPU; with ``data_parallel_attention`` each
    token's latent lives on the one GPU that serves its sequence. ``dtype`` is a torch dtype or
    bytes per value (0.75 for a 6-bit cache)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp <= 0:
        raise ValueError(f"tp must be a positive int (GPUs in the tensor-parallel group), got {tp!r}")
    size = bytes_per_element(dtype)
    token = kv_cache_elements(config) * size
    if isinstance(config, AttentionConfig):
        if data_parallel_attention:
            raise ValueError("data_parallel_attention applies to MLA; standard attention splits its heads under TP")
        heads = -(-config.num_key_value_heads // tp)
        return ParallelCache(f"{config.kind}, TP={tp}", tp, token, 2 * heads * config.head_dim * size, tp, heads)
    if data_parallel_attention:
        return ParallelCache(f"MLA, data-parallel attention over {tp}", tp, token, token, 1, None)
    return ParallelCache(f"MLA, TP={tp}", tp, token, token, tp, None)
