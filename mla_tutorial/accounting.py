"""KV-cache accounting: elements and bytes per token, per layer and for a whole model.

Formulas (DeepSeek-V2 paper, Table 1), per token per layer:
    MHA / GQA / MQA:        2 · n_kv · d_h             (K and V for every key/value head)
    MLA (latent, absorbed): d_c + d_h_R                 (c_KV and the shared RoPE key k_R)
    MLA (expanded):         n_h · (d_h + d_h_R + d_v)   (per-head K and V, the reference naive path)

Defined in chapter 02; used in 03, 06, 07 and 08.
"""

from __future__ import annotations

import torch

from .config import AttentionConfig, MLAConfig

__all__ = ["kv_cache_elements", "kv_cache_bytes", "bytes_per_element"]

Config = AttentionConfig | MLAConfig


def bytes_per_element(dtype: torch.dtype | float) -> float:
    """Bytes per cached value: a torch dtype's size, or a number of bytes (0.75 for a 6-bit cache)."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, bool) or not isinstance(dtype, (int, float)) or not dtype > 0:
        raise TypeError(f"dtype must be a torch.dtype or a positive number of bytes per element, got {dtype!r}")
    return dtype


def kv_cache_elements(config: Config, mode: str | None = None) -> int:
    """Values cached per token per layer. ``mode`` applies to MLA: "latent"/"absorbed" (default)
    or "expanded"; standard attention has a single layout and takes no mode."""
    if isinstance(config, AttentionConfig):
        if mode not in (None, "mha"):
            raise ValueError(f"mode {mode!r} applies to MLA configs only; {config.name} is {config.kind}")
        return 2 * config.num_key_value_heads * config.head_dim
    if isinstance(config, MLAConfig):
        if mode in (None, "latent", "absorbed"):
            return config.kv_lora_rank + config.qk_rope_head_dim
        if mode == "expanded":
            return config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        raise ValueError(f"unknown MLA mode {mode!r}; choose 'latent', 'absorbed' or 'expanded'")
    raise TypeError(f"expected an MLAConfig or AttentionConfig, got {type(config).__name__}")


def kv_cache_bytes(config: Config, context: int = 1, batch_size: int = 1,
                   dtype: torch.dtype | float = torch.bfloat16, mode: str | None = None,
                   num_layers: int | None = None) -> float:
    """Bytes of the KV cache for ``batch_size`` sequences of ``context`` tokens over ``num_layers``
    layers (default: all of the model's). ``context=1`` gives bytes per token; ``num_layers=1``
    bytes per token per layer. Example: DeepSeek-V3 in bf16 -> 70,272 B per token."""
    for name, value in (("context", context), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    layers = config.num_hidden_layers if num_layers is None else num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    total = kv_cache_elements(config, mode) * context * batch_size * layers * bytes_per_element(dtype)
    return int(total) if float(total).is_integer() else total
