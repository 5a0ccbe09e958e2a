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
weights as plain tensors. Objects made by ``transformers`` need version :data:`TRANSFORMERS_MIN` or
newer, the oldest the package agrees with: before 5.15, ``DeepseekV2Attention`` leaves YaRN's mscale
out of its softmax scale and ``DynamicCache`` holds per-head keys and values, not MLA's latent.
Defined for chapter 06; tested against ``transformers`` in
``tests/test_hf.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checks import check_bool, check_positive_int
from .config import MLAConfig
from .mla import MultiHeadLatentAttention

__all__ = ["mla_config_from_hf", "load_hf_attention", "check_transformers_version", "TRANSFORMERS_MIN"]

#: The oldest transformers whose DeepSeek-V2/V3 attention the package agrees with, in prefill and in
#: cached decode (tests/test_hf.py, and the benchmark's ``hf`` mode); pyproject.toml declares it too.
TRANSFORMERS_MIN = "5.15.0"


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(p or 0) for p in match.groups()) if match else (0,)


def check_transformers_version(what: str, version: str | None = None) -> None:
    """Raise ``ImportError`` naming the version needed unless transformers (installed, or
    ``version``) is at least :data:`TRANSFORMERS_MIN`. ``what`` says what needs it."""
    if version is None:
        import transformers  # raises ImportError when it is missing

        version = transformers.__version__
    if _release(version) < _release(TRANSFORMERS_MIN):
        raise ImportError(f"{what} needs transformers >= {TRANSFORMERS_MIN}, found {version}: older versions' "
                          f"DeepseekV2Attention leaves YaRN's mscale out of the softmax scale and their DynamicCache "
                          f"holds per-head keys and values, not MLA's latent. Upgrade with "
                          f"pip install 'transformers>={TRANSFORMERS_MIN}' (or: pip install 'mla_tutorial[hf]')")


def _check_transformers_object(obj: Any, what: str, plain: str) -> None:
    """Objects made by transformers (configs, modules) need TRANSFORMERS_MIN; dicts need nothing."""
    if type(obj).__module__.split(".")[0] == "transformers":
        check_transformers_version(f"{what} with a {type(obj).__name__} (pass its {plain} to skip this check)")

# YaRN fields MLAConfig understands (see config._YARN_KEYS); other keys HF adds (rope_theta, ...) are dropped.
_YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor", "truncate")

# The attention norms of DeepSeek's reference code and of HF's DeepseekV2/V3Attention are built
# without passing config.rms_norm_eps, so they always use the default 1e-6.
_ATTENTION_NORM_EPS = 1e-6


def _as_dict(hf_config: Any) -> dict[str, Any]:
    _check_transformers_object(hf_config, "mla_config_from_hf", "to_dict()")
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


def _rope_scaling(d: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """(rope_theta, YaRN dict or None) from either the newer ``rope_parameters`` field
    (transformers >= 5) or the older ``rope_theta`` + ``rope_scaling`` fields."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"mla_config_from_hf: {key} must be a dict (or null), got {type(value).__name__} "
                            f"({value!r})")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported: DeepSeek MLA uses one RoPE "
                         f"for every layer, got keys {sorted(params)}")
    # A theta that is given is passed on as it is (MLAConfig checks it); only a missing one takes
    # the default of DeepSeek's configs and transformers, 10000.
    theta = (params or {}).get("rope_theta")
    if theta is None:
        theta = d.get("rope_theta")
    if theta is None:
        theta = 10000.0

    source = None
    for candidate in (params, scaling):
        if candidate and candidate.get("rope_type", candidate.get("type", "default")) != "default":
            source = candidate
            break
    if source is None:
        return theta, None
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
        original, extended = yarn["original_max_position_embeddings"], d.get("max_position_embeddings")
        if not (isinstance(original, int) and original > 0 and isinstance(extended, int) and extended > 0):
            raise ValueError(f"YaRN rope scaling without 'factor' needs positive integer "
                             f"max_position_embeddings ({extended!r}) and original_max_position_embeddings "
                             f"({original!r}) to compute it")
        yarn["factor"] = extended / original
    return theta, yarn


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
        interleave = d.get("rope_interleave", True)  # HF's default, and DeepSeek-V3's checkpoints
    if name is None:
        name = d.get("_name_or_path") or d.get("name_or_path") or d.get("model_type") or "from_hf"
    # A field that is present is passed on as it is, so MLAConfig refuses a 0 or a string; only a
    # missing (or null) field takes a default: one layer, transformers' 4096 positions.
    defaults = {"num_hidden_layers": 1, "max_position_embeddings": 4096}
    fields = {k: (d[k] if d.get(k) is not None else defaults[k]) for k in defaults}
    try:
        return MLAConfig(
            hidden_size=d["hidden_size"], num_attention_heads=d["num_attention_heads"],
            q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], rope_theta=theta, rope_scaling=yarn, rope_interleave=interleave,
            rms_norm_eps=_ATTENTION_NORM_EPS, name=str(name), **fields,
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"mla_config_from_hf: the config's field {str(err).removeprefix('MLAConfig.')}") from None


def _state_dict(source: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        _check_transformers_object(source, "load_hf_attention", "state_dict()")
        config = getattr(source, "config", None)
        if getattr(config, "attention_bias", False):
            raise NotImplementedError("attention_bias=True is not supported: MultiHeadLatentAttention's "
                                      "projections have no biases")
        sd = source.state_dict()
    elif isinstance(source, Mapping):
        sd = dict(source)
    else:
        raise TypeError(f"load_hf_attention needs an nn.Module or a state dict, got {type(source).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"load_hf_attention: prefix must be a str, got {type(prefix).__name__}")
    if not prefix:
        return sd
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not picked:
        raise KeyError(f"no weight name starts with prefix {prefix!r}; names look like {sorted(sd)[:4]}")
    if not prefix.endswith(".") and all(k.startswith(".") for k in picked):
        raise KeyError(f"load_hf_attention: prefix {prefix!r} lacks its trailing dot; pass prefix={prefix + '.'!r}")
    return picked


def _dequantize_fp8(sd: dict[str, torch.Tensor], prefix: str, block: int) -> dict[str, torch.Tensor]:
    """Float8 weights times their block scales (DeepSeek-V3's checkpoint format: ``W.weight``
    float8_e4m3fn with ``W.weight_scale_inv`` (ceil(rows/block), ceil(cols/block)) fp32, one scale
    per block x block tile), in fp32. A float8 weight without its scales is refused: cast alone,
    it is off by the scale of every tile."""
    out = dict(sd)
    for key, w in sd.items():
        if not (isinstance(w, torch.Tensor) and w.is_floating_point() and w.element_size() == 1):
            continue
        scale_key = key + "_scale_inv"
        if scale_key not in sd:
            raise ValueError(f"load_hf_attention: {prefix + key!r} is {w.dtype} but {prefix + scale_key!r} is not "
                             f"given: float8 weights cast without their block scales are wrong; pass the "
                             f"checkpoint's weight_scale_inv tensors with the weights (they are multiplied in), "
                             f"or dequantize the checkpoint first")
        scale = sd[scale_key]
        rows, cols = w.shape[0], w.shape[-1]
        tiles = (-(-rows // block), -(-cols // block))
        if w.dim() != 2 or tuple(scale.shape) != tiles:
            raise ValueError(f"load_hf_attention: {prefix + scale_key!r} has shape {tuple(scale.shape)}, but a "
                             f"{tuple(w.shape)} weight in {block} x {block} tiles needs {tiles} scales; pass "
                             f"fp8_block_size= the checkpoint's quantization_config weight_block_size")
        full = scale.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
        out[key] = w.float() * full
        del out[scale_key]
    leftover = sorted(k for k in out if k.endswith("_scale_inv"))
    if leftover:
        raise ValueError(f"load_hf_attention: scales {leftover} belong to weights that are not float8")
    return out


def load_hf_attention(mla: MultiHeadLatentAttention, source: Any, prefix: str = "",
                      strict: bool = True, fp8_block_size: int = 128) -> MultiHeadLatentAttention:
    """Copy a Hugging Face DeepSeek attention's weights into ``mla`` (in place; returns ``mla``).

    Args:
        mla: the layer to fill; its config must match the weights (use :func:`mla_config_from_hf`).
        source: a ``DeepseekV3Attention`` / ``DeepseekV2Attention`` module, or a state dict with
            the names ``q_a_proj.weight``, ``q_a_layernorm.weight``, ``q_b_proj.weight`` (or
            ``q_proj.weight`` when ``q_lora_rank`` is None), ``kv_a_proj_with_mqa.weight``,
            ``kv_a_layernorm.weight``, ``kv_b_proj.weight``, ``o_proj.weight``.
        prefix: prepended to those names, e.g. ``"model.layers.0.self_attn."`` for a checkpoint.
        strict: raise on names under ``prefix`` that are not among those above.
        fp8_block_size: the tile of float8 checkpoints' block scales (DeepSeek-V3: 128).

    Weights are converted to ``mla``'s dtype and device. Float8 weights (DeepSeek-V3's checkpoints)
    are multiplied by their ``weight_scale_inv`` block scales first, which must be given with them.
    Raises ``KeyError`` for a missing weight, ``ValueError`` for a weight of the wrong shape or
    float8 weights without scales, ``NotImplementedError`` for biases and other quantizations.
    """
    if not isinstance(mla, MultiHeadLatentAttention):
        raise TypeError(f"load_hf_attention fills a MultiHeadLatentAttention, got {type(mla).__name__}")
    check_positive_int("load_hf_attention", "fp8_block_size", fp8_block_size)
    check_bool("load_hf_attention", "strict", strict)
    sd = _state_dict(source, prefix)
    c = mla.config
    n_h, d_model, d_c = c.num_attention_heads, c.hidden_size, c.kv_lora_rank
    d_h, d_R, d_v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim

    biases = sorted(k for k in sd if k.endswith(".bias"))
    if biases:
        raise NotImplementedError(f"attention_bias=True is not supported: found biases {biases}; "
                                  "MultiHeadLatentAttention's projections have no biases")
    sd = _dequantize_fp8(sd, prefix, fp8_block_size)
    scales = sorted(k for k in sd if "scale" in k)
    if scales:
        raise NotImplementedError(f"quantized weights other than DeepSeek's float8 with block scales are not "
                                  f"supported (found {scales[:3]}); dequantize the checkpoint to bf16/fp32 first")
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"load_hf_attention: {prefix + key!r} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise NotImplementedError(f"load_hf_attention: {prefix + key!r} is {value.dtype}: integer-quantized "
                                      f"weights are not supported; dequantize the checkpoint to bf16/fp32 first")

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
                    hint = f" (found {prefix + near[0]!r}: pass prefix={prefix + near[0][: -len(key)]!r})"
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
