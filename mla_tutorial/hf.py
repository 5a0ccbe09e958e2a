"""Interoperability with Hugging Face ``transformers``: configs and attention weights.

Two functions let the book check its MLA layer against a real third-party implementation,
``DeepseekV3Attention`` / ``DeepseekV2Attention``, and load real DeepSeek checkpoints:

* :func:`mla_config_from_hf`: a ``DeepseekV3Config`` / ``DeepseekV2Config`` object, or the dict of a
  ``config.json``, to an :class:`~mla_tutorial.config.MLAConfig`;
* :func:`load_hf_attention`: copy the weights of one HF attention module (or its state dict,
  e.g. read from a ``safetensors`` shard) into a :class:`~mla_tutorial.mla.MultiHeadLatentAttention`.

How HF's fused projections map onto the DeepSeek-V2 paper's matrices (rows are outputs):

=======================  ===============================================================
HF weight                package parameters
=======================  ===============================================================
``q_a_proj``             ``W_DQ`` (d_c_q, d_model)
``q_a_layernorm``        ``q_norm``
``q_b_proj``/``q_proj``  per head, rows ``[d_h content | d_h_R RoPE]``: ``W_UQ`` and ``W_QR``
``kv_a_proj_with_mqa``   rows ``[d_c | d_h_R]``: ``W_DKV`` (c_KV) and ``W_KR`` (k_R)
``kv_a_layernorm``       ``kv_norm``
``kv_b_proj``            per head, rows ``[d_h key | d_v value]``: ``W_UK`` (n_h, d_h, d_c), ``W_UV``
``o_proj``               ``W_O``
=======================  ===============================================================

``transformers`` is not needed to use this module: configs are read by attribute or key, and
weights as plain tensors. Defined for chapter 06; tested against ``transformers`` in
``tests/test_hf.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import MLAConfig
from .mla import MultiHeadLatentAttention

__all__ = ["mla_config_from_hf", "load_hf_attention"]

# YaRN fields MLAConfig understands (see config._YARN_KEYS); other keys HF adds (rope_theta, ...) are dropped.
_YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor", "truncate")

# The attention norms of DeepSeek's reference code and of HF's DeepseekV2/V3Attention are built
# without passing config.rms_norm_eps, so they always use the default 1e-6.
_ATTENTION_NORM_EPS = 1e-6


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        d = dict(hf_config.to_dict())
        # attributes set after construction (or aliases such as rope_scaling) may be missing from to_dict()
        for key in ("rope_parameters", "rope_scaling", "rope_theta", "rope_interleave", "model_type",
                    "attention_bias", "q_lora_rank"):
            if key not in d and hasattr(hf_config, key):
                d[key] = getattr(hf_config, key)
        return d
    raise TypeError(f"mla_config_from_hf needs a transformers config object or a config.json dict, "
                    f"got {type(hf_config).__name__}")


def _rope_scaling(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, YaRN dict or None) from either the newer ``rope_parameters`` field
    (transformers >= 5) or the older ``rope_theta`` + ``rope_scaling`` fields."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and not isinstance(params, Mapping):
        raise TypeError(f"rope_parameters must be a dict, got {type(params).__name__}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported: DeepSeek MLA uses one RoPE "
                         f"for every layer, got keys {sorted(params)}")
    theta = (params or {}).get("rope_theta", d.get("rope_theta")) or 10000.0

    source = None
    for candidate in (params, scaling):
        if candidate and candidate.get("rope_type", candidate.get("type", "default")) != "default":
            source = candidate
            break
    if source is None:
        return float(theta), None
    kind = source.get("rope_type", source.get("type"))
    if kind != "yarn":
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; DeepSeek's models use 'yarn' "
                         "(or no scaling)")
    if source.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported: MLA rotates all of qk_rope_head_dim")
    yarn = {"rope_type" if "rope_type" in source else "type": "yarn"}
    yarn.update({k: source[k] for k in _YARN_FIELDS if source.get(k) is not None})
    if "original_max_position_embeddings" not in yarn:
        raise ValueError("YaRN rope scaling needs 'original_max_position_embeddings'")
    if "factor" not in yarn:  # as transformers does: the ratio of the extended to the original context
        yarn["factor"] = d["max_position_embeddings"] / yarn["original_max_position_embeddings"]
    return float(theta), yarn


def mla_config_from_hf(hf_config: Any, name: str | None = None) -> MLAConfig:
    """An :class:`MLAConfig` from a Hugging Face DeepSeek-V2/V3 config or ``config.json`` dict.

    Handles ``q_lora_rank: null`` (DeepSeek-V2-Lite), YaRN given either as ``rope_scaling`` (the
    published ``config.json`` files) or as ``rope_parameters`` (transformers 5), and
    ``rope_interleave`` (``DeepseekV3Config``; DeepSeek-V2's attention always rotates interleaved
    pairs). Biased projections (``attention_bias: true``) are not supported.

    >>> cfg = mla_config_from_hf({"hidden_size": 2048, "num_attention_heads": 16, "q_lora_rank": None,
    ...     "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    ...     "num_hidden_layers": 27, "max_position_embeddings": 163840, "rope_theta": 10000,
    ...     "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    ...                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}})
    >>> cfg.latent_cache_dim, round(cfg.softmax_scale, 4)
    (576, 0.1147)
    """
    d = _as_dict(hf_config)
    if d.get("attention_bias"):
        raise NotImplementedError("attention_bias=True is not supported: MultiHeadLatentAttention's "
                                  "projections have no biases (no DeepSeek checkpoint uses them)")
    required = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"this config lacks the MLA fields {missing}; is it a DeepSeek-V2/V3 config?")
    theta, yarn = _rope_scaling(d)
    if d.get("model_type") == "deepseek_v2":
        interleave = True  # DeepseekV2Attention rotates (x[2i], x[2i+1]) pairs, as complex numbers
    else:
        interleave = bool(d.get("rope_interleave", True))  # HF's default, and DeepSeek-V3's checkpoints
    if name is None:
        name = d.get("_name_or_path") or d.get("name_or_path") or d.get("model_type") or "from_hf"
    return MLAConfig(
        hidden_size=d["hidden_size"], num_attention_heads=d["num_attention_heads"],
        q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"], num_hidden_layers=d.get("num_hidden_layers") or 1,
        rope_theta=theta, max_position_embeddings=d.get("max_position_embeddings") or 4096,
        rope_scaling=yarn, rope_interleave=interleave, rms_norm_eps=_ATTENTION_NORM_EPS, name=str(name),
    )


def _state_dict(source: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if getattr(config, "attention_bias", False):
            raise NotImplementedError("attention_bias=True is not supported: MultiHeadLatentAttention's "
                                      "projections have no biases")
        sd = source.state_dict()
    elif isinstance(source, Mapping):
        sd = dict(source)
    else:
        raise TypeError(f"load_hf_attention needs an nn.Module or a state dict, got {type(source).__name__}")
    if not prefix:
        return sd
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not picked:
        raise KeyError(f"no weight name starts with prefix {prefix!r}; names look like {sorted(sd)[:4]}")
    return picked


def load_hf_attention(mla: MultiHeadLatentAttention, source: Any, prefix: str = "",
                      strict: bool = True) -> MultiHeadLatentAttention:
    """Copy a Hugging Face DeepSeek attention's weights into ``mla`` (in place; returns ``mla``).

    Args:
        mla: the layer to fill; its config must match the weights (use :func:`mla_config_from_hf`).
        source: a ``DeepseekV3Attention`` / ``DeepseekV2Attention`` module, or a state dict with
            the names ``q_a_proj.weight``, ``q_a_layernorm.weight``, ``q_b_proj.weight`` (or
            ``q_proj.weight`` when ``q_lora_rank`` is None), ``kv_a_proj_with_mqa.weight``,
            ``kv_a_layernorm.weight``, ``kv_b_proj.weight``, ``o_proj.weight``.
        prefix: prepended to those names, e.g. ``"model.layers.0.self_attn."`` for a checkpoint.
        strict: raise on names under ``prefix`` that are not among those above.

    Weights are converted to ``mla``'s dtype and device. Raises ``KeyError`` for a missing weight,
    ``ValueError`` for a weight of the wrong shape, ``NotImplementedError`` for biases.
    """
    if not isinstance(mla, MultiHeadLatentAttention):
        raise TypeError(f"load_hf_attention fills a MultiHeadLatentAttention, got {type(mla).__name__}")
    sd = _state_dict(source, prefix)
    c = mla.config
    n_h, d_model, d_c = c.num_attention_heads, c.hidden_size, c.kv_lora_rank
    d_h, d_R, d_v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim

    biases = sorted(k for k in sd if k.endswith(".bias"))
    if biases:
        raise NotImplementedError(f"attention_bias=True is not supported: found biases {biases}; "
                                  "MultiHeadLatentAttention's projections have no biases")
    scales = sorted(k for k in sd if "scale" in k)
    if scales:
        raise NotImplementedError(f"quantized weights are not supported (found {scales[:3]}); "
                                  "dequantize the checkpoint to bf16/fp32 first")

    expected: dict[str, tuple[int, ...]] = {}
    if c.q_lora_rank is not None:
        expected["q_a_proj.weight"] = (c.q_lora_rank, d_model)
        expected["q_a_layernorm.weight"] = (c.q_lora_rank,)
        expected["q_b_proj.weight"] = (n_h * (d_h + d_R), c.q_lora_rank)
    else:
        expected["q_proj.weight"] = (n_h * (d_h + d_R), d_model)
    expected["kv_a_proj_with_mqa.weight"] = (d_c + d_R, d_model)
    expected["kv_a_layernorm.weight"] = (d_c,)
    expected["kv_b_proj.weight"] = (n_h * (d_h + d_v), d_c)
    expected["o_proj.weight"] = (d_model, n_h * d_v)

    for key, shape in expected.items():
        if key not in sd:
            hint = ""
            if key == "q_proj.weight" and "q_b_proj.weight" in sd:
                hint = " (these weights compress queries: the layer's config needs their q_lora_rank)"
            elif key.startswith("q_") and "q_proj.weight" in sd:
                hint = " (these weights project queries directly: the layer's config needs q_lora_rank=None)"
            else:
                near = [k for k in sd if k.endswith(key)]
                if near:
                    hint = f" (found {near[0]!r}: pass prefix={near[0][: -len(key)]!r})"
            raise KeyError(f"load_hf_attention: weight {prefix + key!r} is missing{hint}")
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"load_hf_attention: {prefix + key!r} has shape {tuple(sd[key].shape)}, but this "
                             f"layer's config ({c.name}) needs {shape}; build the layer from the checkpoint's "
                             f"config with mla_config_from_hf")
    if strict:
        unexpected = sorted(set(sd) - set(expected))
        if unexpected:
            raise KeyError(f"load_hf_attention: unexpected weights {unexpected} (pass strict=False to ignore "
                           f"them, or a narrower prefix)")

    with torch.no_grad():
        if c.q_lora_rank is not None:
            mla.W_DQ.weight.copy_(sd["q_a_proj.weight"])
            mla.q_norm.weight.copy_(sd["q_a_layernorm.weight"])
            w_q = sd["q_b_proj.weight"]
        else:
            w_q = sd["q_proj.weight"]
        w_q = w_q.reshape(n_h, d_h + d_R, -1)                        # per head: [content | RoPE] rows
        mla.W_UQ.weight.copy_(w_q[:, :d_h].reshape(n_h * d_h, -1))
        mla.W_QR.weight.copy_(w_q[:, d_h:].reshape(n_h * d_R, -1))
        w_kv_a = sd["kv_a_proj_with_mqa.weight"]                     # rows: [c_KV (d_c) | k_R (d_h_R)]
        mla.W_DKV.weight.copy_(w_kv_a[:d_c])
        mla.W_KR.weight.copy_(w_kv_a[d_c:])
        mla.kv_norm.weight.copy_(sd["kv_a_layernorm.weight"])
        w_kv_b = sd["kv_b_proj.weight"].reshape(n_h, d_h + d_v, d_c)  # per head: [key | value] rows
        mla.W_UK.copy_(w_kv_b[:, :d_h])                               # (n_h, d_h, d_c)
        mla.W_UV.copy_(w_kv_b[:, d_h:])                               # (n_h, d_v, d_c)
        mla.W_O.weight.copy_(sd["o_proj.weight"])
    return mla
