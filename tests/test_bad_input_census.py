"""A census of bad input: every public entry point of the package and the benchmark CLI, given
what a careless user gives it, must fail at once with an error of the right type that says what
to change, raised by the package itself (not a raw torch or Python operator error), never a hang.

Each row is (entry point, call, expected exception type, regex of the message). The regexes ask for
the words that tell the user what to do, not just any text. Rows run with an alarm so that a hang
fails instead of blocking the suite; the whole census takes a few seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable
from unittest import mock

import pytest
import torch

import mla_tutorial
from mla_tutorial import (AttentionConfig, KVCache, MLAConfig, MultiHeadAttention, MultiHeadLatentAttention, RMSNorm,
                          RotaryEmbedding, apply_rope, arithmetic_intensity, attention, attention_bytes_per_cached_token,
                          attention_flops_per_cached_token, bench, bytes_per_element, describe_device, kv_cache_bytes,
                          kv_cache_elements, load_hf_attention, mla_config_from_hf, pick_device, pick_dtype,
                          rope_inv_freq, synchronize, yarn_get_mscale, yarn_inv_freq)
from mla_tutorial.device import check_memory

from test_hf import _hf_state_dict

ROW_SECONDS = 2.0   # a refusal is immediate: anything slower is doing the work it should refuse
TINY = MLAConfig.tiny()
YARN = dict(TINY.rope_scaling)
TINY_BENCH = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8)
CLI = ["--device", "cpu", "--hidden-size", "64", "--heads", "4", "--q-lora-rank", "32", "--kv-lora-rank", "16",
       "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "4", "--v-head-dim", "8", "--gqa-heads", "2",
       "--contexts", "8", "--repeats", "1", "--rounds", "1", "--prefill-tokens", "8", "--quiet", "--no-plot"]
SLOW_MACHINE = {"bandwidth_bytes_per_s": 1e9, "peak_flops_per_s": 6e8}   # fp16 matmuls on a CPU without fp16 units
FAST_MACHINE = {"bandwidth_bytes_per_s": 1e10, "peak_flops_per_s": 1e11}


@dataclasses.dataclass
class Row:
    entry: str                       # the public name the row exercises
    call: Callable[[], Any]
    error: type[BaseException]
    match: str                       # regex the message must contain (case-sensitive)
    origin: str = "mla_tutorial"     # the package whose code must raise it (argparse for the CLI's exits)
    needs: str | None = None         # an optional package the row needs (imported before the clock starts)


ROWS: dict[str, Row] = {}


def row(name: str, entry: str, call: Callable[[], Any], error: type[BaseException], match: str, **kw: Any) -> None:
    assert name not in ROWS, name
    ROWS[name] = Row(entry, call, error, match, **kw)


# --- helpers the rows call -------------------------------------------------------------------------
def mla(config: MLAConfig = TINY, **kw: Any) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    return MultiHeadLatentAttention(config, **kw).eval()


def mha(**kw: Any) -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(64, 4, **kw).eval()


def x(*shape: int, **kw: Any) -> torch.Tensor:
    return torch.randn(*shape, **kw) if shape else torch.randn(1, 3, 64, **kw)


def one_cache_two_layers(make: Callable[[], torch.nn.Module]) -> None:
    a, b = make(), make()
    cache = a.new_cache(1, 8)
    with torch.no_grad():
        a(x(1, 2, 64), cache=cache)
        b(x(1, 2, 64), cache=cache)


def overflow(layer: torch.nn.Module) -> None:
    cache = layer.new_cache(1, 4)
    with torch.no_grad():
        layer(x(1, 3, 64), cache=cache)
        layer(x(1, 2, 64), cache=cache)


def assign(field: str, value: Any) -> None:
    setattr(MLAConfig.tiny(), field, value)


def edited_in_place() -> None:
    config = MLAConfig.tiny()
    config.rope_scaling["factor"] = 0.5   # a dict edited in place bypasses assignment checks ...
    MultiHeadLatentAttention(config)      # ... but the layer checks its config again


def yarn(**changes: Any) -> dict:
    out = dict(YARN, **changes)
    return {k: v for k, v in out.items() if v is not None}


def hf_dict(**changes: Any) -> dict:
    base = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, num_hidden_layers=2, max_position_embeddings=256)
    return {k: v for k, v in dict(base, **changes).items() if v is not None}


SD = _hf_state_dict(TINY)
PREFIX = "model.layers.0.self_attn."


def fp8(sd: dict, scales: bool, scale_shape: tuple[int, int] | None = None) -> dict:
    out = {}
    for k, v in sd.items():
        if v.dim() == 2:
            out[k] = v.to(torch.float8_e4m3fn)
            if scales:
                rows, cols = v.shape
                out[k + "_scale_inv"] = torch.ones(scale_shape or (-(-rows // 128), -(-cols // 128)))
        else:
            out[k] = v
    return out


def old_transformers(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        # sys.modules, not a name bound earlier: a first import of a model may put a new transformers there
        with mock.patch.object(sys.modules["transformers"], "__version__", "5.14.1"):
            return fn()
    return call


def hf_v3_config():
    import transformers
    return transformers.DeepseekV3Config(**hf_dict(q_lora_rank=16, num_key_value_heads=4))


def hf_v3_attention():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
    return DeepseekV3Attention(hf_v3_config(), layer_idx=0)


def with_machine(measured: dict[str, float], fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` as if this machine measured ``measured`` (a CPU whose fp16 matmuls are slow)."""
    def call() -> Any:
        with mock.patch.object(bench, "measure_bandwidth", lambda *a, **k: measured["bandwidth_bytes_per_s"]), \
             mock.patch.object(bench, "measure_peak_flops", lambda *a, **k: measured["peak_flops_per_s"]):
            return fn()
    return call


def run(**kw: Any) -> Callable[[], Any]:
    args = dict(device="cpu", dtype=torch.float32, contexts=[8], modes=["mha", "absorbed"],
                config=bench.bench_config(**TINY_BENCH), gqa_heads=2, repeats=1, rounds=1, warmup=0,
                prefill_tokens=0, progress=False, machine=FAST_MACHINE)
    args.update(kw)
    return lambda: bench.run_benchmark(**args)


def cli(*argv: str) -> Callable[[], Any]:
    return lambda: bench.main([*CLI, *argv])


# --- MLAConfig: every field, at construction and on assignment ------------------------------------------
for field, value, error, match in [
    ("hidden_size", "64", TypeError, r"hidden_size must be an int, got str.*write hidden_size=64"),
    ("hidden_size", 64.0, TypeError, r"hidden_size must be an int, got float"),
    ("hidden_size", True, TypeError, r"hidden_size must be an int, got bool"),
    ("hidden_size", 0, ValueError, r"hidden_size must be a positive integer, got 0"),
    ("num_attention_heads", -2, ValueError, r"num_attention_heads must be a positive integer"),
    ("kv_lora_rank", 0, ValueError, r"kv_lora_rank must be a positive integer"),
    ("q_lora_rank", 0, ValueError, r"q_lora_rank must be a positive integer"),
    ("v_head_dim", 2.5, TypeError, r"v_head_dim must be an int"),
    ("qk_rope_head_dim", 5, ValueError, r"qk_rope_head_dim must be even"),
    ("num_hidden_layers", 0, ValueError, r"num_hidden_layers must be a positive integer"),
    ("max_position_embeddings", "4k", TypeError, r"max_position_embeddings must be an int"),
    ("rope_theta", float("inf"), ValueError, r"rope_theta must be a finite number, got inf"),
    ("rope_theta", float("nan"), ValueError, r"rope_theta must be a finite number"),
    ("rope_theta", 0, ValueError, r"rope_theta must be > 1, got 0.*DeepSeek uses 10000"),
    ("rope_theta", -10000.0, ValueError, r"rope_theta must be > 1"),
    ("rope_theta", "10000", TypeError, r"rope_theta must be a number, got str.*write rope_theta=10000.0"),
    ("rms_norm_eps", -1e-6, ValueError, r"rms_norm_eps must be > 0"),
    ("rms_norm_eps", 0.0, ValueError, r"rms_norm_eps must be > 0"),
    ("rms_norm_eps", "1e-6", TypeError, r"rms_norm_eps must be a number, got str.*write rms_norm_eps=1e-06"),
    ("rope_interleave", "no", TypeError, r"rope_interleave must be True or False, got str"),
    ("rope_interleave", 1, TypeError, r"rope_interleave must be True or False, got int"),
    ("name", 3, TypeError, r"name must be a str"),
    ("rope_scaling", "yarn", TypeError, r"must be None or a dict such as \{'rope_type': 'yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2}, ValueError, r"supports only YaRN"),
    ("rope_scaling", {"factor": 2, "original_max_position_embeddings": 8}, ValueError, r"supports only YaRN.*missing"),
    ("rope_scaling", {"type": "yarn", "rope_type": "linear", "factor": 2, "original_max_position_embeddings": 8},
     ValueError, r"only YaRN"),
    ("rope_scaling", yarn(original_max_position_embeddings=None), ValueError, r"needs 'original_max_position_embeddings'"),
    ("rope_scaling", yarn(factor=None), ValueError, r"needs 'factor'"),
    ("rope_scaling", yarn(fudge=1), ValueError, r"unknown keys \['fudge'\]; valid keys"),
    ("rope_scaling", yarn(factor=float("inf")), ValueError, r"\['factor'\] must be a finite number"),
    ("rope_scaling", yarn(factor="4"), TypeError, r"\['factor'\] must be a number, got str.*write 4.0"),
    ("rope_scaling", yarn(factor=0.5), ValueError, r"\['factor'\] must be >= 1"),
    ("rope_scaling", yarn(original_max_position_embeddings=0), ValueError,
     r"\['original_max_position_embeddings'\] must be a positive integer, got 0"),
    ("rope_scaling", yarn(original_max_position_embeddings=-4), ValueError, r"original_max_position_embeddings"),
    ("rope_scaling", yarn(original_max_position_embeddings="128"), TypeError,
     r"\['original_max_position_embeddings'\] must be an int, got str.*write 128"),
    ("rope_scaling", yarn(beta_fast=1, beta_slow=32), ValueError, r"beta_fast \(1\) must be >= beta_slow \(32\).*swap"),
    ("rope_scaling", yarn(beta_fast=0), ValueError, r"\['beta_fast'\] must be > 0"),
    ("rope_scaling", yarn(beta_slow=-1), ValueError, r"\['beta_slow'\] must be > 0"),
    ("rope_scaling", yarn(mscale_all_dim=-1), ValueError, r"\['mscale_all_dim'\] must be >= 0.*0 turns it off"),
    ("rope_scaling", yarn(mscale=float("nan")), ValueError, r"\['mscale'\] must be a finite number"),
    ("rope_scaling", yarn(attention_factor=0), ValueError, r"\['attention_factor'\] must be > 0"),
    ("rope_scaling", yarn(truncate="yes"), TypeError, r"\['truncate'\] must be True or False"),
]:
    tag = f"{field}={value!r}"
    if isinstance(value, dict) and set(YARN) - set(value) <= {"factor", "original_max_position_embeddings"}:
        # a variant of tiny's YaRN dict: name it by what differs
        diff = {k: value.get(k, "<missing>") for k in sorted(set(value) | set(YARN)) if value.get(k) != YARN.get(k)}
        tag = f"YaRN {diff}"
    match = (r"MLAConfig\.rope_scaling.*" if field == "rope_scaling" else r"MLAConfig\.") + match
    row(f"MLAConfig({tag})", "MLAConfig", lambda f=field, v=value: MLAConfig.tiny().replace(**{f: v}), error, match)
    row(f"MLAConfig.{tag} (assigned)", "MLAConfig", lambda f=field, v=value: assign(f, v), error, match)
row("MLA layer re-checks a config edited in place", "MultiHeadLatentAttention", edited_in_place, ValueError,
    r"rope_scaling\['factor'\] must be >= 1")

# --- AttentionConfig (frozen) -----------------------------------------------------------------------------
for args, error, match in [
    (("bad", 32, 4, 3, 8, 1), ValueError, r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
    (("bad", "32", 4, 4, 8, 1), TypeError, r"hidden_size must be an int, got str"),
    (("bad", 32, 4, 0, 8, 1), ValueError, r"num_key_value_heads must be a positive integer"),
    (("bad", 32, 4, 4, 8, 1, 0.0), ValueError, r"rope_theta must be > 1"),
    (("bad", 32, 4, 4, 8, 1, "1e4"), TypeError, r"rope_theta must be a number, got str"),
    ((7, 32, 4, 4, 8, 1), TypeError, r"name must be a str"),
]:
    row(f"AttentionConfig{args}", "AttentionConfig", lambda a=args: AttentionConfig(*a), error, match)
row("AttentionConfig assigned", "AttentionConfig",
    lambda: setattr(AttentionConfig("x", 32, 4, 4, 8, 1), "num_key_value_heads", 3),
    dataclasses.FrozenInstanceError, r"cannot assign to field 'num_key_value_heads'")
row("AttentionConfig.from_mla kv heads", "AttentionConfig", lambda: AttentionConfig.from_mla(TINY, 3), ValueError,
    r"must be divisible by num_key_value_heads \(3\)")

# --- RoPE -----------------------------------------------------------------------------------------------
COS, SIN = RotaryEmbedding(4)(torch.arange(3))
for name, call, error, match in [
    ("rope_inv_freq odd", lambda: rope_inv_freq(5), ValueError, r"positive even number"),
    ("rope_inv_freq str", lambda: rope_inv_freq("8"), TypeError, r"dim must be an int.*write dim=8"),
    ("rope_inv_freq theta 0", lambda: rope_inv_freq(8, 0.0), ValueError, r"rope_theta must be > 1"),
    ("rope_inv_freq theta inf", lambda: rope_inv_freq(8, float("inf")), ValueError, r"rope_theta must be a finite"),
    ("yarn_inv_freq incomplete", lambda: yarn_inv_freq(8, 1e4, {"type": "yarn", "factor": 4}), ValueError,
     r"needs 'original_max_position_embeddings'"),
    ("yarn_inv_freq not a dict", lambda: yarn_inv_freq(8, 1e4, None), TypeError, r"must be None or a dict"),
    ("RotaryEmbedding incomplete YaRN", lambda: RotaryEmbedding(8, 1e4, {"type": "yarn", "factor": 4}), ValueError,
     r"RotaryEmbedding\.rope_scaling \(YaRN\) needs 'original_max_position_embeddings'"),
    ("RotaryEmbedding YaRN original 0", lambda: RotaryEmbedding(8, 1e4, yarn(original_max_position_embeddings=0)),
     ValueError, r"original_max_position_embeddings'\] must be a positive integer"),
    ("RotaryEmbedding theta 0", lambda: RotaryEmbedding(8, 0.0), ValueError, r"RotaryEmbedding\.rope_theta must be > 1"),
    ("RotaryEmbedding theta str", lambda: RotaryEmbedding(8, "1e4"), TypeError, r"rope_theta must be a number"),
    ("RotaryEmbedding dim 0", lambda: RotaryEmbedding(0), ValueError, r"dim must be a positive integer"),
    ("RotaryEmbedding positions list", lambda: RotaryEmbedding(4)([0, 1]), TypeError, r"1-D tensor of positions"),
    ("RotaryEmbedding positions 2-D", lambda: RotaryEmbedding(4)(torch.zeros(2, 2)), TypeError, r"torch.arange\(T\)"),
    ("apply_rope int tensor", lambda: apply_rope(torch.ones(1, 3, 4, dtype=torch.long), COS, SIN), TypeError,
     r"floating-point tensor, got torch.int64 \(a rotation of integers would be truncated\).*x.float\(\)"),
    ("apply_rope int cos", lambda: apply_rope(x(1, 3, 4), COS.long(), SIN), TypeError, r"cos must be a floating-point"),
    ("apply_rope not a tensor", lambda: apply_rope([[1.0] * 4], COS, SIN), TypeError, r"x must be a torch.Tensor"),
    ("apply_rope width", lambda: apply_rope(x(1, 3, 6), COS, SIN), ValueError, r"must be twice the number of angles"),
    ("apply_rope positions", lambda: apply_rope(x(1, 5, 4), COS, SIN), ValueError,
     r"x has 5 positions .* cos/sin have 3.*same positions"),
    ("apply_rope cos/sin shapes", lambda: apply_rope(x(1, 3, 4), COS, SIN[:1]), ValueError, r"must have the same shape"),
    ("apply_rope interleaved str", lambda: apply_rope(x(1, 3, 4), COS, SIN, "yes"), TypeError,
     r"interleaved must be True or False"),
    ("apply_rope 1-D", lambda: apply_rope(x(4), COS, SIN), ValueError, r"must be \(\.\.\., T, d\)"),
]:
    entry = name.split()[0]
    row(name, entry, call, error, match)

# --- attention() ----------------------------------------------------------------------------------------
Q, K, V = x(1, 4, 1, 4), x(1, 2, 3, 4), x(1, 2, 3, 4)
for name, changes, error, match in [
    ("more queries than keys", dict(q=x(1, 4, 5, 4)), ValueError, r"5 queries but only 3 keys.*pass the cached keys"),
    ("q/k width", dict(k=x(1, 2, 3, 5)), ValueError, r"same last dim"),
    ("k/v tokens", dict(v=x(1, 2, 4, 4)), ValueError, r"same heads and tokens"),
    ("heads", dict(q=x(1, 3, 1, 4)), ValueError, r"3 query heads must be a multiple of the 2 key/value heads"),
    ("batch", dict(q=x(2, 4, 1, 4)), ValueError, r"batch sizes differ"),
    ("3-D", dict(q=x(4, 1, 4)), ValueError, r"must be 4-D \(batch, heads, tokens, dim\)"),
    ("not a tensor", dict(q=[[0.0]]), TypeError, r"q must be a torch.Tensor"),
    ("mixed dtypes", dict(v=V.double()), TypeError, r"must share dtype and device"),
    ("integer q", dict(q=torch.ones(1, 4, 1, 4, dtype=torch.long)), TypeError, r"floating-point tensor"),
    ("empty", dict(q=x(1, 4, 0, 4)), ValueError, r"empty input"),
    ("scale 0", dict(scale=0.0), ValueError, r"scale must be a positive finite number"),
    ("scale nan", dict(scale=float("nan")), ValueError, r"positive finite"),
    ("scale inf", dict(scale=float("inf")), ValueError, r"positive finite"),
    ("scale str", dict(scale="0.5"), ValueError, r"positive finite number, got '0.5'"),
    ("scale bool", dict(scale=True), ValueError, r"positive finite"),
    ("causal str", dict(causal="yes"), TypeError, r"causal must be True or False"),
    ("key_mask float", dict(key_mask=torch.ones(1, 3)), TypeError, r"key_mask must be a bool tensor"),
    ("key_mask shape", dict(key_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError,
     r"key_mask must be \(batch, keys\) = \(1, 3\)"),
    ("key_mask device", dict(key_mask=torch.ones(1, 3, dtype=torch.bool, device="meta")), ValueError,
     r"key_mask is on meta"),
]:
    args = dict(q=Q, k=K, v=V, scale=0.5)
    args.update(changes)
    row(f"attention {name}", "attention", lambda a=args: attention(**a), error, match)
row("attention scores past memory", "attention",  # expanded views: the inputs take no memory, the scores would
    lambda: attention(*(torch.zeros(1, 1, 1, 1).expand(1, 1, n, 1) for n in (2**20, 2**21, 2**21)), 1.0),
    MemoryError, r"attention scores of 1,048,576 queries over 2,097,152 keys .* needs 17.6 TB, but cpu has .* free; "
    r"process the queries in shorter chunks")

# --- layers: construction -------------------------------------------------------------------------------
for name, call, error, match in [
    ("MHA hidden str", lambda: MultiHeadAttention("64", 4), TypeError, r"hidden_size must be an int, got str"),
    ("MHA heads 0", lambda: MultiHeadAttention(32, 0), ValueError, r"num_heads must be a positive integer"),
    ("MHA kv heads", lambda: MultiHeadAttention(32, 4, 3), ValueError, r"divisible by num_kv_heads.*divide 4"),
    ("MHA not divisible", lambda: MultiHeadAttention(30, 4), ValueError, r"not divisible by num_heads.*pass head_dim"),
    ("MHA odd head_dim with RoPE", lambda: MultiHeadAttention(32, 4, head_dim=7, rope_theta=1e4), ValueError,
     r"even head_dim"),
    ("MHA rope_theta 0", lambda: MultiHeadAttention(32, 4, rope_theta=0.0), ValueError,
     r"MultiHeadAttention\.rope_theta must be > 1"),
    ("MHA bias str", lambda: MultiHeadAttention(32, 4, bias="no"), TypeError, r"bias must be True or False"),
    ("MHA from_config", lambda: MultiHeadAttention.from_config("Llama-3-8B"), TypeError,
     r"from_config needs an AttentionConfig \(e.g. ATTENTION_PRESETS\['Llama-3-8B'\]\), got str"),
    ("MHA too big", lambda: MultiHeadAttention(10**7, 128, head_dim=128), MemoryError,
     r"MultiHeadAttention\(10000000, 128 heads of 128\) with 655,360,000,000 weights in torch.float32 needs 2.6 TB, "
     r"but cpu has .* free; use a smaller hidden_size"),
    ("MLA not a config", lambda: MultiHeadLatentAttention({"hidden_size": 64}), TypeError, r"needs an MLAConfig"),
    ("MLA mode", lambda: MultiHeadLatentAttention(TINY, mode="fast"), ValueError,
     r"unknown MLA mode 'fast'; choose one of \('expanded', 'latent', 'absorbed'\)"),
    ("MLA mode list", lambda: MultiHeadLatentAttention(TINY, mode=["absorbed"]), ValueError, r"unknown MLA mode"),
    ("MLA absorb_prefill str", lambda: MultiHeadLatentAttention(TINY, absorb_prefill="no"), TypeError,
     r"absorb_prefill must be True, False or None, got str"),
    ("MLA absorb_prefill assigned", lambda: setattr(mla(), "absorb_prefill", 0), TypeError,
     r"absorb_prefill must be True, False or None, got int"),
    ("MLA too big", lambda: MultiHeadLatentAttention(MLAConfig.deepseek_v3().replace(hidden_size=10**7)), MemoryError,
     r"MultiHeadLatentAttention\(DeepSeek-V3\) with 185,014,528,000 weights in torch.float32 needs 740.1 GB, but "
     r"cpu has .* free; use a smaller config"),
    ("RMSNorm dim 0", lambda: RMSNorm(0), ValueError, r"RMSNorm\.dim must be a positive integer"),
    ("RMSNorm eps negative", lambda: RMSNorm(4, -1e-6), ValueError, r"RMSNorm\.eps must be > 0"),
    ("RMSNorm eps str", lambda: RMSNorm(4, "1e-6"), TypeError, r"RMSNorm\.eps must be a number"),
    ("RMSNorm input width", lambda: RMSNorm(4)(x(2, 5)), ValueError,
     r"RMSNorm\(4\) expects a floating-point tensor \(\.\.\., 4\)"),
]:
    entry = {"MHA": "MultiHeadAttention", "MLA": "MultiHeadLatentAttention"}.get(name.split()[0], name.split()[0])
    row(name, entry, call, error, match)

# --- layers: forward, and their caches --------------------------------------------------------------------
for kind, make in (("MHA", mha), ("MLA", mla)):
    entry = {"MHA": "MultiHeadAttention", "MLA": "MultiHeadLatentAttention"}[kind]
    for name, call, error, match in [
        ("2-D input", lambda m=make: m()(x(5, 64)), ValueError,
         r"shape \(batch, tokens, 64\), got \(5, 64\).*x.unsqueeze\(0\)"),
        ("width", lambda m=make: m()(x(1, 5, 63)), ValueError, r"width 64 \(hidden_size\), got 63"),
        ("integer input", lambda m=make: m()(torch.ones(1, 3, 64, dtype=torch.long)), TypeError,
         r"floating-point hidden states.*token ids need an embedding first"),
        ("float64 input", lambda m=make: m()(x(1, 3, 64, dtype=torch.float64)), TypeError,
         r"input has dtype torch.float64 but the weights are torch.float32; cast one of them"),
        ("input on another device", lambda m=make: m()(x(1, 3, 64, device="meta")), ValueError,
         r"input is on meta but the weights are on cpu; move one of them"),
        ("zero tokens", lambda m=make: m()(x(1, 0, 64)), ValueError, r"zero tokens"),
        ("batch of zero", lambda m=make: m()(x(0, 3, 64)), ValueError, r"batch of zero sequences"),
        ("not a tensor", lambda m=make: m()([[0.0] * 64]), TypeError, r"expects a torch.Tensor, got list"),
        ("key_mask shape", lambda m=make: m()(x(), key_mask=torch.ones(1, 2, dtype=torch.bool)), ValueError,
         r"key_mask must be \(batch, keys\) = \(1, 3\)"),
        ("cache overflow", lambda m=make: overflow(m()), ValueError,
         r"overflow: it holds 3 of 4 tokens and 2 more were given; make the cache with a larger max_len"),
        ("cache batch", lambda m=make: m()(x(2, 1, 64), cache=m().new_cache(1, 5)), ValueError,
         r"batch size 2 but the cache was made for 1"),
        ("cache dtype", lambda m=make: m()(x(), cache=m().new_cache(1, 5, dtype=torch.float64)), TypeError,
         r"cache holds torch.float64; cast one of them"),
        ("cache device", lambda m=make: m()(x(), cache=m().new_cache(1, 5, device="meta")), ValueError,
         r"the cache is on meta"),
        ("one cache, two layers", lambda m=make: one_cache_two_layers(m), ValueError,
         r"written by another layer.*each layer needs its own cache.*cache.reset\(\)"),
        ("new_cache max_len 0", lambda m=make: m().new_cache(1, 0), ValueError, r"max_len must be a positive integer"),
        ("new_cache batch str", lambda m=make: m().new_cache("1", 4), TypeError, r"batch_size must be an int"),
        ("new_cache huge max_len", lambda m=make: m().new_cache(1, 10**12), MemoryError,
         r"a KV cache of 1 x 1,000,000,000,000 tokens \(.* per token\) needs .*TB, but cpu has .* free; "
         r"make it with a smaller max_len"),
        ("new_cache int dtype", lambda m=make: m().new_cache(1, 4, dtype=torch.int8), TypeError,
         r"dtype must be a floating torch.dtype"),
        ("new_cache unknown device", lambda m=make: m().new_cache(1, 4, device="gpu"), ValueError,
         r"unknown device 'gpu'; use one of"),
        ("new_cache missing GPU", lambda m=make: m().new_cache(1, 4, device="cuda:99"), ValueError,
         r"'cuda:99'.*(not available|CUDA device)"),
    ]:
        row(f"{kind} {name}", entry, call, error, match)
row("MLA cache of MHA", "MultiHeadLatentAttention", lambda: mla()(x(), cache=mha().new_cache(1, 5)), ValueError,
    r"not by an MLA layer; use MultiHeadLatentAttention.new_cache\(\)")
row("MHA cache of GQA", "MultiHeadAttention", lambda: mha()(x(), cache=mha(num_kv_heads=2).new_cache(1, 5)),
    ValueError, r"not made by this module; use module.new_cache\(\)")
row("MLA mode vs cache", "MultiHeadLatentAttention", lambda: mla()(x(), cache=mla().new_cache(1, 5), mode="expanded"),
    ValueError, r"mode 'expanded' cannot use a cache made for mode 'absorbed'")
row("MLA cache of another config", "MultiHeadLatentAttention",
    lambda: mla(TINY.replace(kv_lora_rank=8))(x(), cache=mla().new_cache(1, 5)), ValueError,
    r"this layer needs .*make it with this layer's new_cache\(\)")
row("MLA forward mode", "MultiHeadLatentAttention", lambda: mla()(x(), mode="fast"), ValueError, r"unknown MLA mode")
row("MLA new_cache mode", "MultiHeadLatentAttention", lambda: mla().new_cache(1, 4, mode="paged"), ValueError,
    r"unknown MLA mode 'paged'")
row("MLA re-expanding a cache past memory", "MultiHeadLatentAttention",  # an expanded view: no memory yet
    lambda: mla().expand(torch.zeros(1, 1, 1, TINY.latent_cache_dim).expand(1, 1, 2**36, -1)), MemoryError,
    r"per-head keys and values re-expanded from 68,719,476,736 cached tokens .* needs .*TB.*use mode='absorbed'")

# --- KVCache used directly ------------------------------------------------------------------------------
for name, call, error, match in [
    ("batch 0", lambda: KVCache(0, 4, {"k": (1, 2)}), ValueError, r"batch_size must be a positive integer"),
    ("max_len str", lambda: KVCache(1, "4", {"k": (1, 2)}), TypeError, r"max_len must be an int.*write max_len=4"),
    ("no buffers", lambda: KVCache(1, 4, {}), ValueError, r"give at least one buffer, e\.g\."),
    ("buffers list", lambda: KVCache(1, 4, [(1, 2)]), ValueError, r"give at least one buffer"),
    ("buffer shape", lambda: KVCache(1, 4, {"k": (1, 2, 3)}), ValueError, r"needs a \(heads, dim\) pair"),
    ("buffer zero", lambda: KVCache(1, 4, {"k": (0, 2)}), ValueError, r"positive ints"),
    ("int dtype", lambda: KVCache(1, 4, {"k": (1, 2)}, dtype=torch.int32), TypeError, r"floating torch.dtype"),
    ("device", lambda: KVCache(1, 4, {"k": (1, 2)}, device="tpu"), ValueError, r"unknown device 'tpu'"),
    ("mode", lambda: KVCache(1, 4, {"k": (1, 2)}, mode=3), TypeError, r"mode must be a str"),
    ("huge", lambda: KVCache(64, 10**9, {"latent": (1, 576)}), MemoryError,
     r"KV cache of 64 x 1,000,000,000 tokens \(2.3 kB per token\) needs 147.5 TB"),
    ("update names", lambda: KVCache(1, 4, {"k": (1, 2)}).update(v=x(1, 1, 1, 2)), ValueError,
     r"needs exactly the buffers \['k'\]"),
    ("update not a tensor", lambda: KVCache(1, 4, {"k": (1, 2)}).update(k=[1.0, 2.0]), TypeError,
     r"'k' must be a torch.Tensor"),
    ("update 3-D", lambda: KVCache(1, 4, {"k": (1, 2)}).update(k=x(1, 1, 2)), ValueError, r"must be 4-D"),
    ("update shape", lambda: KVCache(1, 4, {"k": (1, 2)}).update(k=x(1, 1, 1, 3)), ValueError,
     r"must be \(B=1, H=1, t=1, D=2\), got \(1, 1, 1, 3\)"),
    ("update overflow", lambda: KVCache(1, 4, {"k": (1, 2)}).update(k=x(1, 1, 5, 2)), ValueError, r"overflow"),
    ("get", lambda: KVCache(1, 4, {"k": (1, 2)}).get("v"), KeyError, r"has no buffer 'v'; it has \['k'\]"),
]:
    row(f"KVCache {name}", "KVCache", call, error, match)

# --- accounting and roofline ----------------------------------------------------------------------------
for name, entry, call, error, match in [
    ("kv_cache_elements config", "kv_cache_elements", lambda: kv_cache_elements({"heads": 8}), TypeError,
     r"expected an MLAConfig or AttentionConfig, got dict"),
    ("kv_cache_elements mode", "kv_cache_elements", lambda: kv_cache_elements(TINY, "paged"), ValueError,
     r"unknown MLA mode 'paged'; choose 'latent', 'absorbed' or 'expanded'"),
    ("kv_cache_elements MHA mode", "kv_cache_elements", lambda: kv_cache_elements(AttentionConfig.from_mla(TINY), "latent"),
     ValueError, r"applies to MLA configs only"),
    ("kv_cache_bytes context", "kv_cache_bytes", lambda: kv_cache_bytes(TINY, context=-1), ValueError,
     r"context must be a non-negative int"),
    ("kv_cache_bytes context str", "kv_cache_bytes", lambda: kv_cache_bytes(TINY, context="4k"), ValueError,
     r"context must be a non-negative int, got '4k'"),
    ("kv_cache_bytes layers", "kv_cache_bytes", lambda: kv_cache_bytes(TINY, num_layers=0), ValueError,
     r"num_layers must be a positive int"),
    ("bytes_per_element str", "bytes_per_element", lambda: bytes_per_element("bf16"), TypeError,
     r"dtype must be a torch.dtype or a positive number of bytes"),
    ("bytes_per_element 0", "bytes_per_element", lambda: bytes_per_element(0), TypeError, r"positive number of bytes"),
    ("attention_flops config", "attention_flops_per_cached_token", lambda: attention_flops_per_cached_token(42),
     TypeError, r"expected an MLAConfig or AttentionConfig"),
    ("attention_flops mode", "attention_flops_per_cached_token", lambda: attention_flops_per_cached_token(TINY, "fast"),
     ValueError, r"unknown MLA mode 'fast'"),
    ("attention_bytes dtype", "attention_bytes_per_cached_token",
     lambda: attention_bytes_per_cached_token(TINY, dtype="bf16"), TypeError, r"positive number of bytes"),
    ("arithmetic_intensity mode", "arithmetic_intensity", lambda: arithmetic_intensity(TINY, "fast"), ValueError,
     r"unknown MLA mode"),
    ("yarn_get_mscale str", "yarn_get_mscale", lambda: yarn_get_mscale("40"), TypeError,
     r"yarn_get_mscale.scale must be a number, got str.*write scale=40.0"),
]:
    row(name, entry, call, error, match)

# --- devices and memory ---------------------------------------------------------------------------------
for name, entry, call, error, match in [
    ("pick_device gpu", "pick_device", lambda: pick_device("gpu"), ValueError, r"unknown device 'gpu'.*use one of"),
    ("pick_device tpu", "pick_device", lambda: pick_device("xla"), ValueError, r"unsupported device 'xla'"),
    ("pick_device missing", "pick_device", lambda: pick_device("cuda:99"), ValueError,
     r"'cuda:99'.*(not available on this machine|CUDA device)"),
    ("pick_dtype str", "pick_dtype", lambda: pick_dtype("tpu"), ValueError, r"pick_dtype: unknown device 'tpu'"),
    ("pick_dtype int", "pick_dtype", lambda: pick_dtype(42), TypeError,
     r"pick_dtype needs a torch.device or a device name"),
    ("pick_dtype missing GPU", "pick_dtype", lambda: pick_dtype("cuda:99"), ValueError, r"cuda:99"),
    ("describe_device None", "describe_device", lambda: describe_device(None), TypeError, r"needs a torch.device"),
    ("describe_device str", "describe_device", lambda: describe_device("quantum"), ValueError, r"unknown device"),
    ("synchronize int", "synchronize", lambda: synchronize(3), TypeError, r"synchronize needs a torch.device"),
    ("synchronize missing", "synchronize", lambda: synchronize("cuda:99"), ValueError, r"cuda:99"),
    ("check_memory", "check_memory", lambda: check_memory(2**70, "cpu", "the thing", "make it smaller"), MemoryError,
     r"the thing needs 1180591.6 PB, but cpu has .* free; make it smaller"),
]:
    row(name, entry, call, error, match)


def env_device() -> None:
    with mock.patch.dict(os.environ, {"MLA_DEVICE": "tpu"}):
        pick_device()


row("pick_device MLA_DEVICE", "pick_device", env_device, ValueError, r"'tpu' \(from MLA_DEVICE\)")

# --- transformers interop -------------------------------------------------------------------------------
for name, call, error, match in [
    ("not a config", lambda: mla_config_from_hf(42), TypeError,
     r"needs a transformers config object or a config.json dict"),
    ("missing fields", lambda: mla_config_from_hf({"hidden_size": 64}), ValueError,
     r"lacks the MLA fields \['num_attention_heads', .*is it a DeepSeek-V2/V3 config"),
    ("rope_theta 0", lambda: mla_config_from_hf(hf_dict(rope_theta=0)), ValueError,
     r"mla_config_from_hf: the config's field rope_theta must be > 1, got 0"),
    ("rope_parameters theta 0", lambda: mla_config_from_hf(hf_dict(rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 0})),
     ValueError, r"rope_theta must be > 1, got 0"),
    ("num_hidden_layers 0", lambda: mla_config_from_hf(hf_dict(num_hidden_layers=0)), ValueError,
     r"field num_hidden_layers must be a positive integer, got 0"),
    ("max_position_embeddings 0", lambda: mla_config_from_hf(hf_dict(max_position_embeddings=0)), ValueError,
     r"field max_position_embeddings must be a positive integer"),
    ("hidden_size str", lambda: mla_config_from_hf(hf_dict(hidden_size="64")), TypeError,
     r"field hidden_size must be an int, got str"),
    ("rope_interleave str", lambda: mla_config_from_hf(hf_dict(rope_interleave="true")), TypeError,
     r"field rope_interleave must be True or False"),
    ("rope_scaling str", lambda: mla_config_from_hf(hf_dict(rope_scaling="yarn")), TypeError,
     r"rope_scaling must be a dict \(or null\), got str"),
    ("rope_scaling linear", lambda: mla_config_from_hf(hf_dict(rope_scaling={"type": "linear", "factor": 2.0})),
     ValueError, r"RoPE scaling type 'linear' is not supported; DeepSeek's models use 'yarn'"),
    ("YaRN without original", lambda: mla_config_from_hf(hf_dict(rope_scaling={"type": "yarn", "factor": 4})),
     ValueError, r"needs 'original_max_position_embeddings'"),
    ("YaRN factor from original 0", lambda: mla_config_from_hf(
        hf_dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 0})), ValueError,
     r"without 'factor' needs positive integer max_position_embeddings"),
    ("YaRN beta order", lambda: mla_config_from_hf(hf_dict(rope_scaling=dict(YARN, beta_fast=1, beta_slow=32))),
     ValueError, r"beta_fast \(1\) must be >= beta_slow \(32\)"),
    ("per-layer rope", lambda: mla_config_from_hf(hf_dict(rope_parameters={"full_attention": {"rope_theta": 1e4}})),
     ValueError, r"per-layer-type rope_parameters are not supported"),
    ("partial rotary", lambda: mla_config_from_hf(hf_dict(rope_parameters=dict(YARN, partial_rotary_factor=0.5))),
     ValueError, r"partial_rotary_factor != 1 is not supported"),
    ("attention_bias", lambda: mla_config_from_hf(hf_dict(attention_bias=True)), NotImplementedError,
     r"attention_bias=True is not supported"),
]:
    row(f"mla_config_from_hf {name}", "mla_config_from_hf", call, error, match)

for name, call, error, match in [
    ("not a layer", lambda: load_hf_attention(torch.nn.Linear(2, 2), SD), TypeError,
     r"fills a MultiHeadLatentAttention, got Linear"),
    ("source type", lambda: load_hf_attention(mla(), [1, 2]), TypeError, r"needs an nn.Module or a state dict, got list"),
    ("missing weight", lambda: load_hf_attention(mla(), {k: v for k, v in SD.items() if k != "kv_b_proj.weight"}),
     KeyError, r"weight 'kv_b_proj.weight' is missing"),
    ("wrong shape", lambda: load_hf_attention(mla(), SD | {"o_proj.weight": torch.zeros(3, 3)}), ValueError,
     r"'o_proj.weight' has shape \(3, 3\), but this layer's config \(tiny\) needs \(64, 32\); build the layer "
     r"from the checkpoint's config with mla_config_from_hf"),
    ("bias", lambda: load_hf_attention(mla(), SD | {"o_proj.bias": torch.zeros(64)}), NotImplementedError,
     r"attention_bias=True is not supported: found biases \['o_proj.bias'\]"),
    ("unexpected", lambda: load_hf_attention(mla(), SD | {"rotary_emb.inv_freq": torch.zeros(2)}), KeyError,
     r"unexpected weights \['rotary_emb.inv_freq'\] \(pass strict=False"),
    ("prefix without its dot", lambda: load_hf_attention(mla(), {PREFIX + k: v for k, v in SD.items()},
                                                          prefix=PREFIX[:-1]), KeyError,
     r"prefix 'model.layers.0.self_attn' lacks its trailing dot; pass prefix='model.layers.0.self_attn.'"),
    ("prefix needed", lambda: load_hf_attention(mla(), {PREFIX + k: v for k, v in SD.items()}, strict=False), KeyError,
     r"found 'model.layers.0.self_attn.q_a_proj.weight': pass prefix='model.layers.0.self_attn.'"),
    ("prefix partly given", lambda: load_hf_attention(mla(), {PREFIX + k: v for k, v in SD.items()}, prefix="model.",
                                                       strict=False), KeyError,
     r"pass prefix='model.layers.0.self_attn.'"),
    ("prefix unknown", lambda: load_hf_attention(mla(), SD, prefix="decoder."), KeyError,
     r"no weight name starts with prefix 'decoder.'"),
    ("prefix not a str", lambda: load_hf_attention(mla(), SD, prefix=0), TypeError, r"prefix must be a str"),
    ("q_lora mismatch", lambda: load_hf_attention(mla(TINY.replace(q_lora_rank=None)), SD), KeyError,
     r"the layer's config needs their q_lora_rank"),
    ("float8 without scales", lambda: load_hf_attention(mla(), fp8(SD, scales=False)), ValueError,
     r"is torch.float8_e4m3fn but '.*weight_scale_inv' is not given: float8 weights cast without their block scales "
     r"are wrong; pass the checkpoint's weight_scale_inv"),
    ("float8 scales of the wrong shape", lambda: load_hf_attention(mla(), fp8(SD, scales=True, scale_shape=(2, 2))),
     ValueError, r"weight_scale_inv' has shape \(2, 2\), but a .* weight in 128 x 128 tiles needs \(1, 1\) scales; "
     r"pass fp8_block_size="),
    ("scales without float8", lambda: load_hf_attention(mla(), SD | {"o_proj.weight_scale_inv": torch.ones(1, 1)}),
     ValueError, r"scales \['o_proj.weight_scale_inv'\] belong to weights that are not float8"),
    ("other quantization", lambda: load_hf_attention(mla(), SD | {"o_proj.input_scale": torch.ones(1)}),
     NotImplementedError, r"quantized weights other than DeepSeek's float8.*dequantize the checkpoint"),
    ("int8 weights", lambda: load_hf_attention(mla(), SD | {"o_proj.weight": torch.zeros(64, 32, dtype=torch.int8)}),
     NotImplementedError, r"'o_proj.weight' is torch.int8: integer-quantized weights are not supported"),
    ("values not tensors", lambda: load_hf_attention(mla(), SD | {"o_proj.weight": [[0.0] * 32] * 64}), TypeError,
     r"'o_proj.weight' must be a torch.Tensor, got list"),
    ("block size 0", lambda: load_hf_attention(mla(), SD, fp8_block_size=0), ValueError,
     r"fp8_block_size must be a positive integer"),
    ("strict str", lambda: load_hf_attention(mla(), SD, strict="no"), TypeError, r"strict must be True or False"),
]:
    row(f"load_hf_attention {name}", "load_hf_attention", call, error, match)
row("mla_config_from_hf old transformers", "mla_config_from_hf",
    old_transformers(lambda: mla_config_from_hf(hf_v3_config())),
    ImportError, r"with a DeepseekV3Config \(pass its to_dict\(\).*needs transformers >= 5.15.0, found 5.14.1.*"
    r"pip install 'transformers>=5.15.0'",
    needs="transformers")
row("load_hf_attention old transformers", "load_hf_attention",
    old_transformers(lambda: load_hf_attention(mla(mla_config_from_hf(hf_v3_config().to_dict())), hf_v3_attention())),
    ImportError, r"load_hf_attention with a DeepseekV3Attention \(pass its state_dict\(\) to skip this check\) needs "
    r"transformers >= 5.15.0", needs="transformers")
row("make_variants hf on old transformers", "make_variants",
    old_transformers(lambda: bench.make_variants(bench.bench_config(**TINY_BENCH), ["absorbed", "hf"])),
    ValueError, r"the benchmark's hf mode needs transformers >= 5.15.0, found 5.14.1.*leave hf out of modes",
    needs="transformers")

# --- the benchmark API ----------------------------------------------------------------------------------
BC = bench.bench_config(**TINY_BENCH)
for name, entry, call, error, match in [
    ("bench_config hidden 0", "bench_config", lambda: bench.bench_config(hidden_size=0), ValueError,
     r"hidden_size must be a positive integer"),
    ("bench_config odd rope", "bench_config", lambda: bench.bench_config(**dict(TINY_BENCH, qk_rope_head_dim=5)),
     ValueError, r"qk_rope_head_dim must be even"),
    ("make_variants modes empty", "make_variants", lambda: bench.make_variants(BC, []), ValueError,
     r"modes is empty; choose some of mha,gqa"),
    ("make_variants mode unknown", "make_variants", lambda: bench.make_variants(BC, ["flash"]), ValueError,
     r"unknown modes \['flash'\]; choose from"),
    ("make_variants modes str", "make_variants", lambda: bench.make_variants(BC, "mha"), TypeError,
     r"modes must be a list of modes"),
    ("make_variants gqa heads", "make_variants", lambda: bench.make_variants(BC, ["gqa"], gqa_heads=3), ValueError,
     r"gqa_heads \(3\) must divide the 4 query heads \(num_attention_heads\)"),
    ("make_variants dtype", "make_variants", lambda: bench.make_variants(BC, ["mha"], dtype="fp16"), TypeError,
     r"dtype must be a floating torch.dtype"),
    ("make_variants config", "make_variants", lambda: bench.make_variants({"hidden_size": 64}, ["mha"]), TypeError,
     r"config must be an MLAConfig"),
    ("make_variants device", "make_variants", lambda: bench.make_variants(BC, ["mha"], device="gpu"), ValueError,
     r"unknown device 'gpu'"),
    ("DecodeVariant step unprepared", "DecodeVariant", lambda: bench.make_variants(BC, ["mha"])["mha"].step(),
     RuntimeError, r"call prepare\(batch, context\) first"),
    ("time_decode batch 0", "time_decode", lambda: bench.time_decode(bench.make_variants(BC, ["mha"])["mha"], 0, 8),
     ValueError, r"time_decode.batch must be a positive integer"),
    ("time_decode warmup", "time_decode",
     lambda: bench.time_decode(bench.make_variants(BC, ["mha"])["mha"], 1, 8, warmup=-1), ValueError,
     r"warmup must be an integer >= 0"),
    ("time_decode variant", "time_decode", lambda: bench.time_decode("mha", 1, 8), TypeError, r"needs a DecodeVariant"),
    ("time_prefill tokens", "time_prefill", lambda: bench.time_prefill(mla(), 0, "absorbed"), ValueError,
     r"time_prefill.tokens must be a positive integer"),
    ("time_prefill mode", "time_prefill", lambda: bench.time_prefill(mla(), 4, "fast"), ValueError, r"unknown MLA mode"),
    ("time_prefill layer", "time_prefill", lambda: bench.time_prefill(mha(), 4, "absorbed"), TypeError,
     r"needs a MultiHeadLatentAttention"),
    ("measure_peak_flops dtype", "measure_peak_flops", lambda: bench.measure_peak_flops("cpu", "fp16"), TypeError,
     r"dtype must be a floating torch.dtype"),
    ("measure_peak_flops n", "measure_peak_flops", lambda: bench.measure_peak_flops("cpu", torch.float32, n=0),
     ValueError, r"n must be a positive integer"),
    ("measure_bandwidth device", "measure_bandwidth", lambda: bench.measure_bandwidth("gpu", torch.float32),
     ValueError, r"unknown device 'gpu'"),
    ("measure_bandwidth repeats", "measure_bandwidth",
     lambda: bench.measure_bandwidth("cpu", torch.float32, nbytes=1024, repeats=0), ValueError,
     r"repeats must be a positive integer"),
]:
    row(name, entry, call, error, match)

for name, changes, error, match in [
    ("contexts empty", dict(contexts=[]), ValueError, r"contexts is empty"),
    ("contexts zero", dict(contexts=[0]), ValueError, r"contexts must be a positive integer, got 0"),
    ("contexts str", dict(contexts="1024"), TypeError, r"contexts must be a list of positive ints"),
    ("contexts float", dict(contexts=[1024.0]), TypeError, r"contexts must be an int, got float"),
    ("batch_sizes negative", dict(batch_sizes=[-1]), ValueError, r"batch_sizes must be a positive integer"),
    ("modes empty", dict(modes=[]), ValueError, r"modes is empty; choose some of"),
    ("modes twice", dict(modes=["mha", "mha"]), ValueError, r"names a mode twice"),
    ("repeats 0", dict(repeats=0), ValueError, r"repeats must be a positive integer, got 0"),
    ("rounds str", dict(rounds="2"), TypeError, r"rounds must be an int"),
    ("warmup -1", dict(warmup=-1), ValueError, r"warmup must be an integer >= 0, got -1"),
    ("prefill_tokens -1", dict(prefill_tokens=-1), ValueError, r"prefill_tokens must be an integer >= 0"),
    ("prefill_repeats 0", dict(prefill_repeats=0), ValueError, r"prefill_repeats must be a positive integer"),
    ("seed", dict(seed=None), TypeError, r"seed must be an int"),
    ("gqa_heads", dict(modes=["gqa"], gqa_heads=8), ValueError,
     r"gqa_heads \(8\) must divide the 4 query heads \(num_attention_heads\); choose a divisor of 4"),
    ("config", dict(config="v3"), TypeError, r"config must be an MLAConfig"),
    ("dtype", dict(dtype="fp16"), TypeError, r"dtype must be a floating torch.dtype"),
    ("device", dict(device="gpu"), ValueError, r"unknown device 'gpu'"),
    ("machine", dict(machine={"peak_flops_per_s": 1e9}), ValueError, r"machine must be a dict with positive"),
    ("max_memory_bytes", dict(max_memory_bytes=-1), ValueError, r"max_memory_bytes must be a positive number"),
    ("max_minutes", dict(max_minutes=0), ValueError, r"max_minutes must be a positive number of minutes"),
    ("weights past memory", dict(config=bench.bench_config(hidden_size=10**8)), MemoryError,
     r"the weights of mha, the MLA layer at hidden_size 100000000 need about .*GB .* use a smaller hidden_size"),
    ("prefill past memory", dict(prefill_tokens=10**9), MemoryError,
     r"a prefill of 1,000,000,000 tokens \(prefill_tokens\) needs about .*; use fewer prefill_tokens \(0 skips"),
    ("no case fits", dict(contexts=[10**13]), MemoryError, r"no decode case fits in memory.*shorter contexts"),
    ("too slow for max_minutes", dict(machine=SLOW_MACHINE, contexts=[10**6], repeats=1000, rounds=10,
                                      max_minutes=1), ValueError,
     r"would take at least \d+ minutes on cpu .*more than max_minutes 1; use fewer or shorter contexts"),
    ("fp16 on a slow CPU", dict(machine=None, dtype=torch.float16, contexts=[2**20], modes=["latent"], repeats=1000,
                                rounds=10, max_minutes=5), ValueError,
     r"float16 matmuls on this CPU measured 0.6 GFLOP/s.*use dtype float32"),
]:
    call = run(**changes)
    if name == "fp16 on a slow CPU":
        call = with_machine(SLOW_MACHINE, call)
    row(f"run_benchmark {name}", "run_benchmark", call, error, match)

# --- the command line, in-process ------------------------------------------------------------------------
SLOW_RUN = ["--repeats", "1000", "--rounds", "10"]
for name, argv, match, slow in [
    ("--warmup -1", ["--warmup", "-1"], r"argument --warmup: expected an integer >= 0, got -1", False),
    ("--repeats 0", ["--repeats", "0"], r"argument --repeats: expected a positive integer, got 0", False),
    ("--rounds x", ["--rounds", "x"], r"argument --rounds: expected an integer, got 'x'", False),
    ("--prefill-tokens -3", ["--prefill-tokens", "-3"], r"argument --prefill-tokens: expected an integer >= 0", False),
    ("--contexts 0", ["--contexts", "0"], r"argument --contexts: expected positive integers, got '0'", False),
    ("--contexts a", ["--contexts", "1024,a"], r"argument --contexts: expected comma-separated integers", False),
    ("--batch-sizes ''", ["--batch-sizes", ""], r"argument --batch-sizes: expected positive integers", False),
    ("--modes ''", ["--modes", ""], r"argument --modes: no modes given; choose some of mha,gqa", False),
    ("--modes flash", ["--modes", "mha,flash"], r"argument --modes: unknown modes \['flash'\]", False),
    ("--heads 4 with the default --gqa-heads", ["--gqa-heads", "8"],
     r"--gqa-heads \(8\) must divide the 4 query heads \(--heads\); choose a divisor of 4, or leave 'gqa' out of "
     r"--modes", False),
    ("--hidden-size 0", ["--hidden-size", "0"], r"argument --hidden-size: expected a positive integer", False),
    ("--qk-rope-head-dim 5", ["--qk-rope-head-dim", "5"], r"--qk-rope-head-dim must be even", False),
    ("--hidden-size 100000000", ["--hidden-size", "100000000"],
     r"the weights of .* at --hidden-size 100000000 need about .*; use a smaller --hidden-size or --heads", False),
    ("--prefill-tokens huge", ["--prefill-tokens", "1000000000"], r"use fewer --prefill-tokens", False),
    ("--contexts huge", ["--contexts", "10000000000000", "--modes", "mha,absorbed"],
     r"no decode case fits in memory.*shorter --contexts", False),
    ("--device gpu", ["--device", "gpu"], r"--device: unknown device 'gpu'", False),
    ("--device cuda:99", ["--device", "cuda:99"], r"--device: device 'cuda:99'", False),
    ("--dtype int8", ["--dtype", "int8"], r"argument --dtype: invalid choice: 'int8'", False),
    ("--max-minutes 0", ["--max-minutes", "0"], r"argument --max-minutes: expected a positive number of minutes", False),
    ("--out unwritable", ["--out", "/proc/no/such.json"], r"--out '/proc/no/such.json' cannot be written", False),
    ("--out a folder", ["--out", "/"], r"--out '/' is a folder; give a file name", False),
    ("--max-minutes exceeded", ["--contexts", "1000000", "--modes", "mha,latent", *SLOW_RUN, "--max-minutes", "1"],
     r"would take at least \d+ minutes .*more than --max-minutes 1", True),
    ("--dtype fp16 on a slow CPU", ["--dtype", "fp16", "--contexts", "1048576", "--modes", "latent", *SLOW_RUN,
                                    "--max-minutes", "5"],
     r"float16 matmuls on this CPU measured 0.6 GFLOP/s.*use --dtype float32", True),
]:
    call = cli("--out", os.devnull, *argv)
    row(f"CLI {name}", "main", with_machine(SLOW_MACHINE, call) if slow else call, SystemExit, match, origin="argparse")
row("CLI --plot unwritable", "main", lambda: bench.main([*CLI[:-1], "--out", os.devnull, "--plot", "/proc/no/such.png"]),
    SystemExit, r"--plot '/proc/no/such.png' cannot be written", origin="argparse")


# --- the paged cache and quantized latents (chapter 12) ---------------------------------------------------
def _paged_call(fn: Callable[..., Any], **changes: Any) -> Callable[[], Any]:
    """A call of a paged attention function on a small valid batch, with some arguments replaced."""
    def call():
        m = mla_tutorial.BlockManager(4, 8)
        m.allocate(0, 10)
        args = dict(q_lat=torch.randn(1, 1, 2, 32), q_R=torch.randn(1, 1, 2, 8), kv_pool=torch.zeros(4, 8, 40),
                    block_table=m.block_tables([0]), seq_lens=m.seq_lens([0]), scale=0.1)
        if fn is mla_tutorial.paged_attention:
            args = dict(q=torch.randn(1, 1, 2, 8), k_pool=torch.zeros(4, 8, 1, 8), v_pool=torch.zeros(4, 8, 1, 8),
                        block_table=args["block_table"], seq_lens=args["seq_lens"], scale=0.1)
        return fn(**{**args, **changes})
    return call


def _full_pool_append():
    m = mla_tutorial.BlockManager(3, 8)
    m.allocate("a", 16)
    m.allocate("b", 8)
    m.append("a", 1)


def _allocate_twice():
    m = mla_tutorial.BlockManager(2, 8)
    m.allocate("a", 1)
    m.allocate("a", 1)


for name, entry, call, error, match in [
    ("BlockManager no blocks", "BlockManager", lambda: mla_tutorial.BlockManager(0), ValueError,
     r"num_blocks must be a positive int"),
    ("BlockManager beyond int32 tables", "BlockManager", lambda: mla_tutorial.BlockManager(2**31), ValueError,
     r"below 2\*\*31"),
    ("BlockManager allocate twice", "BlockManager", _allocate_twice, ValueError, r"use append\(\) to grow it"),
    ("OutOfBlocks request longer than the pool", "OutOfBlocks", lambda: mla_tutorial.BlockManager(2, 8).allocate("r", 17),
     mla_tutorial.OutOfBlocks, r"can never fit; make the pool larger or the request shorter"),
    ("OutOfBlocks pool full now", "OutOfBlocks", _full_pool_append, mla_tutorial.OutOfBlocks,
     r"ask can_allocate\(\)/can_append\(\) first"),
    ("PagedKVCache larger than memory", "PagedKVCache",
     lambda: mla_tutorial.PagedKVCache(mla_tutorial.BlockManager(10**9, 64), 8, 128), MemoryError,
     r"give the BlockManager at most [0-9,]+ blocks"),
    ("PagedKVCache zero heads", "PagedKVCache", lambda: mla_tutorial.PagedKVCache(mla_tutorial.BlockManager(4, 8), 0, 8),
     ValueError, r"num_kv_heads must be a positive int"),
    ("PagedLatentCache unknown quantization", "PagedLatentCache",
     lambda: mla_tutorial.PagedLatentCache(mla_tutorial.BlockManager(4, 8), 512, 64, fmt="nf4"), ValueError, r"choose one of"),
    ("PagedLatentCache d_c not a tile multiple", "PagedLatentCache",
     lambda: mla_tutorial.PagedLatentCache(mla_tutorial.BlockManager(4, 8), 96, 64, fmt="fp8"), ValueError,
     r"multiple of the scale tile"),
    ("paged_absorbed_attention uint8 pool, no format", "paged_absorbed_attention",
     _paged_call(mla_tutorial.paged_absorbed_attention, kv_pool=torch.zeros(4, 8, 40, dtype=torch.uint8)), ValueError,
     r"name its format, e.g. kv_format='fp8'"),
    ("paged_absorbed_attention table too short", "paged_absorbed_attention",
     _paged_call(mla_tutorial.paged_absorbed_attention, seq_lens=torch.tensor([17], dtype=torch.int32)), ValueError,
     r"block_table has 2 columns"),
    ("paged_attention float block table", "paged_attention",
     _paged_call(mla_tutorial.paged_attention, block_table=torch.zeros(1, 2)), TypeError, r"must be an int32 tensor"),
    ("latent_format unknown", "latent_format", lambda: mla_tutorial.latent_format("q4_k"), ValueError, r"choose one of"),
]:
    row(name, entry, call, error, match)


# --- the census ---------------------------------------------------------------------------------------
# --- Part IV: the language model, its data and its training ------------------------------------------
from mla_tutorial import LMConfig, MQAR, TextCorpus, TrainConfig, TransformerLM  # noqa: E402

LM = LMConfig(vocab_size=40, d_model=48, n_heads=6, n_layers=2, max_seq_len=32, attention="mla", kv_lora_rank=8,
              qk_rope_head_dim=4)


def lm(config: LMConfig = LM) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(config).eval()


for name, call, error, match in [
    ("attention unknown", lambda: LMConfig(attention="flash"), ValueError, r"unknown attention kind 'flash'"),
    ("gqa groups do not divide", lambda: LMConfig(attention="gqa", n_kv_heads=4), ValueError,
     r"must divide the heads.*choose one of"),
    ("gqa without n_kv_heads", lambda: LMConfig(attention="gqa"), ValueError, r"needs n_kv_heads"),
    ("mqa with n_kv_heads", lambda: LMConfig(attention="mqa", n_kv_heads=2), ValueError, r"use attention='gqa'"),
    ("mla with n_kv_heads", lambda: LMConfig(attention="mla", n_kv_heads=2), ValueError, r"leave n_kv_heads unset"),
    ("odd rope dim", lambda: LMConfig(attention="mla", qk_rope_head_dim=3), ValueError, r"must be even"),
    ("unknown MLA mode", lambda: LMConfig(attention="mla", mla_mode="compressed"), ValueError, r"unknown MLA mode"),
    ("heads do not divide d_model", lambda: LMConfig(d_model=100, n_heads=6), ValueError,
     r"not divisible by n_heads"),
]:
    row(f"LMConfig {name}", "LMConfig", call, error, match)

for name, call, error, match in [
    ("given a dict", lambda: TransformerLM({"attention": "mha"}), TypeError, r"needs an LMConfig"),
    ("input past the context", lambda: lm()(torch.zeros(1, 33, dtype=torch.long)), ValueError,
     r"exceed the model's context"),
    ("float token ids", lambda: lm()(torch.zeros(1, 4)), TypeError, r"int64 tensor"),
    ("token id past the vocabulary", lambda: lm()(torch.full((1, 4), 40)), ValueError, r"lie in \[0, 40\)"),
    ("too few caches", lambda: (lambda m: m(torch.zeros(1, 4, dtype=torch.long), m.new_caches(1, 8)[:1]))(lm()),
     ValueError, r"one per layer"),
    ("caches past the context", lambda: lm().new_caches(1, 64), ValueError, r"exceeds the model's context"),
    ("generate empty prompt", lambda: lm().generate([[]], 3), ValueError, r"prompt 0 is empty"),
    ("generate flat prompt", lambda: lm().generate([1, 2, 3], 3), TypeError, r"wrap a single prompt"),
    ("generate zero new tokens", lambda: lm().generate([[1]], 0), ValueError, r"max_new_tokens must be a positive int"),
    ("generate past the context", lambda: lm().generate([[1] * 30], 5), ValueError, r"ask for at most 2 new tokens"),
    ("generate zero temperature", lambda: lm().generate([[1]], 3, sample=True, temperature=0.0), ValueError,
     r"temperature > 0"),
    ("generate top_k 0", lambda: lm().generate([[1]], 3, top_k=0), ValueError, r"top_k must be a positive int"),
    ("generate stop token outside the vocabulary", lambda: lm().generate([[1]], 3, stop_token=40), ValueError,
     r"stop_token"),
    ("generate a cache mode for GQA", lambda: lm(LMConfig(vocab_size=40, d_model=48, n_heads=6, n_layers=1, max_seq_len=32,
                                                            attention="gqa", n_kv_heads=2)).generate([[1]], 3, mode="absorbed"),
     ValueError, r"cache modes apply to MLA only"),
]:
    row(f"TransformerLM {name}", "TransformerLM", call, error, match)

for name, call, error, match in [
    ("seq_len too short", lambda: MQAR(num_pairs=16, seq_len=32), ValueError, r"too short for 16 pairs"),
    ("too few keys", lambda: MQAR(num_pairs=8, seq_len=64, num_keys=4), ValueError, r"distinct keys"),
    ("unknown split", lambda: MQAR(num_pairs=2, seq_len=16).batch("test", 2), ValueError, r"unknown split"),
]:
    row(f"MQAR {name}", "MQAR", call, error, match)
row("TextCorpus unknown split", "TextCorpus", lambda: TextCorpus(seq_len=16).batch("test", 2), ValueError,
    r"unknown split")
for name, kwargs, match in [
    ("zero steps", dict(steps=0), r"steps"),
    ("zero learning rate", dict(lr=0.0), r"lr"),
    ("min_lr_ratio above 1", dict(min_lr_ratio=2.0), r"min_lr_ratio"),
    ("zero grad_clip", dict(grad_clip=0.0), r"grad_clip"),
    ("negative warmup", dict(warmup_steps=-1), r"warmup_steps"),
]:
    row(f"TrainConfig {name}", "TrainConfig", lambda kwargs=kwargs: TrainConfig(**kwargs), ValueError, match)


# --- the serving engine (chapter 12) ---------------------------------------------------------------------
def _engine(**kw: Any):
    from mla_tutorial.model import LMConfig, TransformerLM
    from mla_tutorial.serve import Engine
    torch.manual_seed(0)
    return Engine(TransformerLM(LMConfig(attention="mla", max_seq_len=64)), **{"num_blocks": 4, "block_size": 4, **kw})


def _submit(prompt: Any, n: int):
    from mla_tutorial.serve import Request
    return lambda: _engine().submit(Request(prompt, n))


for _name, _call, _match in [
    ("Engine empty prompt", _submit([], 4), r"prompt is empty; give at least one token"),
    ("Engine max_new_tokens 0", _submit([1, 2], 0), r"max_new_tokens must be a positive int"),
    ("Engine request past the pool", _submit([1] * 20, 4), r"could never run; shorten it or give the engine more blocks"),
    ("Engine request past the context", _submit([1] * 60, 8), r"ask for at most 4 new tokens"),
    ("Engine unknown quantization", lambda: _engine(kv_format="fp4"), r"unknown latent cache format .*choose one of"),
]:
    row(_name, "Engine", _call, ValueError, _match)


@contextlib.contextmanager
def alarm(seconds: int):
    """Fail a row that hangs instead of blocking the suite (where SIGALRM exists)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hang(signum, frame):
        raise TimeoutError(f"no error within {seconds} s: the call is doing the work it should refuse")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _origin(excinfo: pytest.ExceptionInfo) -> str:
    """The top-level package whose code raised the exception (mla_tutorial, argparse, torch, ...)."""
    return excinfo.traceback[-1].frame.f_globals.get("__name__", "?").split(".")[0]


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_fails_clearly_and_at_once(name, capsys):
    r = ROWS[name]
    if r.needs:
        pytest.importorskip(r.needs)
        if r.needs == "transformers":  # its first import of a model takes seconds, and is not the refusal
            import transformers.models.deepseek_v3.modeling_deepseek_v3  # noqa: F401
    start = time.perf_counter()
    with alarm(10), pytest.raises(r.error) as excinfo:
        r.call()
    elapsed = time.perf_counter() - start
    if r.error is SystemExit:
        err = capsys.readouterr().err
        assert excinfo.value.code == 2, f"exit status {excinfo.value.code}"
        assert "Traceback" not in err
        message = err.strip().splitlines()[-1]
    else:
        message = str(excinfo.value)
        if isinstance(excinfo.value, KeyError) and excinfo.value.args:
            message = str(excinfo.value.args[0])
    assert _origin(excinfo) == r.origin, f"raised by {excinfo.traceback[-1].path}, not {r.origin}: {message}"
    assert re.search(r.match, message), f"message does not say what to change:\n{message}"
    assert elapsed < ROW_SECONDS, f"took {elapsed:.1f} s to refuse"


PRESENTATION = {"summarize", "save_results", "load_results", "results_dir", "plot_results", "format_results"}


def test_census_covers_every_public_entry_point():
    """Every public function and class of the package and of the benchmark has at least one row
    (constants are not entry points; the functions that present a run's results take the dict
    run_benchmark returns)."""
    names = {n for n in mla_tutorial.__all__ if callable(getattr(mla_tutorial, n))}
    names |= {n for n in bench.__all__ if callable(getattr(bench, n)) and not inspect.isclass(getattr(bench, n))
              or n == "DecodeVariant"}
    names -= PRESENTATION | {"BenchmarkRefused"}
    covered = {r.entry for r in ROWS.values()}
    assert names - covered == set(), f"no census row for {sorted(names - covered)}"


def test_the_command_line_refuses_bad_flags_in_a_fresh_process():
    """The installed entry point (not only main()) exits with status 2 and one line that names the flag."""
    done = subprocess.run([sys.executable, "-m", "mla_tutorial.bench", "--warmup", "-1"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("argument --warmup: expected an integer >= 0, got -1")
