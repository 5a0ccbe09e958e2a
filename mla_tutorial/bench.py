"""Decode benchmark: MHA, GQA, MQA and MLA's three cache modes (and ``transformers``' MLA) side by side.

    python -m mla_tutorial.bench                          # defaults: V3 head dims, hidden 2048, one layer
    python -m mla_tutorial.bench --contexts 1024,16384 --modes mha,absorbed,hf --rounds 3
    mla-bench --device cuda --dtype bfloat16 --hidden-size 7168 --contexts 4096,32768 --batch-sizes 1,16

For every mode, context length and batch size it fills a KV cache directly (random values of the
right shapes, written with :meth:`KVCache.update`, so a 16,384-token context takes a moment to set
up instead of a long prefill), then times single decode steps after ``--warmup`` steps that are
not timed. It goes over all cases ``--rounds`` times and reports each case's median over all
rounds, so that load from other processes spreads over every case alike.

It also measures this machine's memory bandwidth (a matrix-vector product over a large matrix:
it reads every byte once, as a decode step does) and matmul peak (a large square matrix
product), and reports each step's fraction of the roofline bound
``max(bytes / bandwidth, FLOPs / peak)``, where bytes are the weights plus the cache the step
must read and FLOPs are counted from the shapes (:mod:`mla_tutorial.roofline`). A fraction above
1 means the measured bandwidth or peak understates what the step got (measured while the
machine was busy, or a kernel faster than the reference ones). Prefill is timed too: the
absorbed-mode layer (which computes long prompts the expanded way) against the expanded
computation.

Modes: ``mha``, ``gqa``, ``mqa`` (:class:`MultiHeadAttention` with the MLA layer's ``n_h`` query
heads and ``d_v``-wide heads), ``expanded``, ``latent``, ``absorbed``
(:class:`MultiHeadLatentAttention`), and ``hf``: ``transformers``' ``DeepseekV3Attention`` on the
same weights as the MLA layer, with its ``DynamicCache`` (skipped when ``transformers`` is not
installed). HF caches the latent but re-expands every cached token at every step, like ``latent``.

The results (JSON) hold the device name, torch version, date, dtype, config and every timing;
:func:`load_results` reads the runs recorded in ``mla_tutorial/results/``, :func:`plot_results`
draws latency against context. Chapter 08 uses all of these.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import bench_plan as plan
from .accounting import bytes_per_element
from .attention import MultiHeadAttention
from .bench_plan import BenchmarkRefused
from .checks import check_int
from .config import AttentionConfig, MLAConfig
from .device import as_device, describe_device, pick_device, pick_dtype, synchronize
from .mla import MultiHeadLatentAttention
from .roofline import attention_flops_per_cached_token

__all__ = [
    "BENCH_MODES", "DecodeVariant", "bench_config", "make_variants", "time_decode", "time_prefill",
    "measure_bandwidth", "measure_peak_flops", "run_benchmark", "summarize", "save_results",
    "load_results", "results_dir", "plot_results", "format_results", "main", "BenchmarkRefused",
]

BENCH_MODES = ("mha", "gqa", "mqa", "expanded", "latent", "absorbed", "hf")
SCHEMA_VERSION = 1
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# --- configuration ------------------------------------------------------------------------------
def bench_config(hidden_size: int = 2048, num_attention_heads: int = 128, q_lora_rank: int | None = 1536,
                 kv_lora_rank: int = 512, qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128) -> MLAConfig:
    """DeepSeek-V3's attention (YaRN included) with the given sizes, one layer. The defaults keep
    every V3 head dimension, so per-token cache sizes and per-cached-token FLOPs are V3's, and
    shrink only the hidden size (7168 in V3), which sets the weight sizes."""
    return MLAConfig.deepseek_v3().replace(
        hidden_size=hidden_size, num_attention_heads=num_attention_heads, q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=v_head_dim, num_hidden_layers=1, name="bench")


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    return dtype


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _repeat_times(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):  # not timed: first calls allocate, pick kernels, fill caches
        fn()
    return [_timed(fn, device) for _ in range(repeats)]


# --- this machine's roofline -----------------------------------------------------------------------
def _budgeted_times(fn: Callable[[], Any], device: torch.device, repeats: int, max_seconds: float) -> list[float]:
    """One untimed call, then up to ``repeats`` timed ones while they fit in ``max_seconds``."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    times = [_timed(fn, device)]
    while len(times) < repeats and time.perf_counter() - start + min(times) <= max_seconds:
        times.append(_timed(fn, device))
    return times


def measure_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int | None = None,
                      repeats: int = 10, max_seconds: float = 3.0) -> float:
    """Bytes per second read by a matrix-vector product over an ``nbytes`` matrix (256 MB on a CPU,
    2 GB on a GPU: far larger than any cache), the access pattern of a decode step. The fastest
    of ``repeats`` after one untimed call: what the machine can do, not what it did while busy.
    Repeats stop after ``max_seconds`` (a slow dtype on a CPU would otherwise take minutes)."""
    device, dtype = as_device(device, "measure_bandwidth"), _check_dtype(dtype)
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 256 * 2**20
    check_int("measure_bandwidth", "nbytes", nbytes, minimum=1)
    check_int("measure_bandwidth", "repeats", repeats, minimum=1)
    elem = bytes_per_element(dtype)
    cols = 4096
    rows = max(1, nbytes // (elem * cols))
    with torch.inference_mode():
        A = torch.ones(rows, cols, dtype=dtype, device=device)
        x = torch.ones(cols, dtype=dtype, device=device)
        times = _budgeted_times(lambda: torch.mv(A, x), device, repeats, max_seconds)
        del A
    return rows * cols * elem / min(times)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10,
                       max_seconds: float = 3.0) -> float:
    """FLOP per second of an ``n`` x ``n`` matrix product (2048 on a CPU, 8192 on a GPU):
    ``2 n^3`` FLOPs. The fastest of ``repeats`` after one untimed call.

    The matrix grows from 256 to ``n`` by doubling while a product fits the ``max_seconds``
    budget, and repeats stop when it is spent: a dtype without fast kernels on this machine (fp16
    or bf16 on many CPUs) is measured in seconds at a smaller size instead of in minutes."""
    device, dtype = as_device(device, "measure_peak_flops"), _check_dtype(dtype)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    check_int("measure_peak_flops", "n", n, minimum=1)
    check_int("measure_peak_flops", "repeats", repeats, minimum=1)
    deadline = time.perf_counter() + max_seconds
    size, best = min(256, n), 0.0
    with torch.inference_mode():
        while True:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            left = deadline - time.perf_counter()
            times = _budgeted_times(lambda: torch.mm(a, b), device, repeats if size == n else 2, max(left, 0.0))
            best = max(best, 2 * size**3 / min(times))
            nxt = min(2 * size, n)
            # the next size costs 8x per product; measure it only if two of them fit what is left
            if size == n or 2 * 2 * nxt**3 / best > deadline - time.perf_counter():
                return best
            size = nxt


# --- the variants under test --------------------------------------------------------------------
def _fill(write: Callable[..., Any], shapes: dict[str, tuple[int, int, int, int]], context: int,
          dtype: torch.dtype, device: torch.device, gen: torch.Generator, chunk: int = 1024) -> None:
    """Append ``context`` tokens to a cache through ``write(**{name: (B, H, t, D)})``: a random block
    of up to ``chunk`` tokens, written again and again (the values do not change a step's time)."""
    t = min(chunk, context)
    block = {name: torch.randn(B, H, t, D, generator=gen).to(device, dtype)
             for name, (B, H, _, D) in shapes.items()}
    done = 0
    while done < context:
        n = min(t, context - done)
        write(**{name: b[:, :, :n] for name, b in block.items()})
        done += n


@dataclasses.dataclass
class DecodeVariant:
    """One attention implementation under test: a module and how to fill, step and count its cache.

    Attributes:
        mode: one of :data:`BENCH_MODES`.
        module: the layer (``MultiHeadAttention``, ``MultiHeadLatentAttention`` or HF's
            ``DeepseekV3Attention``).
        config: an :class:`AttentionConfig` or :class:`MLAConfig` for the FLOP count.
        cache_shapes: ``{name: (heads, dim)}`` cached per token.
        flop_mode: the MLA mode whose FLOPs the variant does (``"latent"`` for ``hf``).
    """

    mode: str
    module: nn.Module
    config: AttentionConfig | MLAConfig
    cache_shapes: dict[str, tuple[int, int]]
    flop_mode: str | None
    dtype: torch.dtype
    device: torch.device
    hidden_size: int
    rotary: Any = None  # hf only: transformers' rotary embedding
    _state: Any = dataclasses.field(default=None, repr=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the module's weights: every one is read once per decode step."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    @property
    def matrix_params(self) -> int:
        """Parameters in weight matrices: 2 FLOPs each per token (norm weights excluded)."""
        return sum(p.numel() for p in self.module.parameters() if p.dim() >= 2)

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies in this variant's cache (one layer)."""
        elem = bytes_per_element(self.dtype)
        return sum(h * d for h, d in self.cache_shapes.values()) * elem

    def flops(self, batch: int, context: int) -> float:
        """FLOPs of one decode step over ``context`` cached tokens (plus the new one)."""
        attn = attention_flops_per_cached_token(self.config, self.flop_mode)
        return batch * (2 * self.matrix_params + (context + 1) * attn)

    def bytes(self, batch: int, context: int) -> float:
        """Bytes one decode step must read: the weights and the whole cache."""
        return self.weight_bytes + batch * (context + 1) * self.cache_bytes_per_token

    def prepare(self, batch: int, context: int, seed: int = 0) -> None:
        """Make a cache of ``batch`` sequences holding ``context`` tokens each, and a new token."""
        self.release()
        gen = torch.Generator().manual_seed(seed)
        shapes = {n: (batch, h, context, d) for n, (h, d) in self.cache_shapes.items()}
        x = torch.randn(batch, 1, self.hidden_size, generator=gen).to(self.device, self.dtype)
        if self.mode == "hf":
            from transformers import DynamicCache
            cache = DynamicCache(config=self.module.config)
            d_c = self.config.kv_lora_rank

            def write(latent: torch.Tensor) -> None:
                cache.update(latent[..., :d_c], latent[..., d_c:], 0)
            _fill(write, shapes, context, self.dtype, self.device, gen)
            positions = torch.full((batch, 1), context, device=self.device)
            rotary = self.rotary(x, positions)
            self._state = (x, cache, rotary, context)
        else:
            if self.mode in ("mha", "gqa", "mqa"):
                cache = self.module.new_cache(batch, context + 1)
            else:
                cache = self.module.new_cache(batch, context + 1, mode=self.mode)
            _fill(cache.update, shapes, context, self.dtype, self.device, gen)
            self._state = (x, cache)

    def step(self) -> torch.Tensor:
        """One decode step with the prepared cache; the cache is then rolled back to ``context``."""
        if self._state is None:
            raise RuntimeError("call prepare(batch, context) first")
        if self.mode == "hf":
            x, cache, rotary, context = self._state
            out = self.module(x, rotary, None, cache)[0]  # the cache is "past_key_values" in transformers 4.x
            cache.crop(-1)  # forget the token just written
            return out
        x, cache = self._state
        out = self.module(x, cache)
        cache.length -= 1  # forget the token just written: every step sees the same context
        return out

    @property
    def cache(self) -> Any:
        """The prepared cache: a :class:`~mla_tutorial.KVCache`, or transformers' ``DynamicCache``."""
        return None if self._state is None else self._state[1]

    def release(self) -> None:
        """Drop the cache (free its memory)."""
        self._state = None


def _hf_attention(config: MLAConfig, device: torch.device, dtype: torch.dtype):
    """transformers' DeepseekV3Attention for ``config`` (SDPA attention, as ``from_pretrained``
    uses by default) and its rotary embedding. Raises ImportError without transformers."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod

    # rope_theta and rope_scaling, as in the published config.json files: transformers 4.x reads
    # them directly and 5.x converts them to its rope_parameters
    hf_config = DeepseekV3Config(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, num_hidden_layers=1,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        rope_interleave=config.rope_interleave)
    hf_config._attn_implementation = "sdpa"
    module = mod.DeepseekV3Attention(hf_config, layer_idx=0).to(device, dtype).eval()
    rotary = mod.DeepseekV3RotaryEmbedding(hf_config).to(device)
    return module, rotary


def make_variants(config: MLAConfig, modes: Iterable[str] = BENCH_MODES, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, gqa_heads: int = 8, seed: int = 0) -> dict[str, DecodeVariant]:
    """The variants to compare, built on ``device`` in ``dtype``.

    The MLA modes share one :class:`MultiHeadLatentAttention`; ``hf`` is transformers'
    ``DeepseekV3Attention`` with the same weights (copied with :func:`~mla_tutorial.load_hf_attention`;
    skipped when transformers is missing). ``mha``/``gqa``/``mqa`` use ``n_h`` query heads of width
    ``d_v`` with ``n_h``, ``gqa_heads`` and 1 key/value heads.
    """
    device, dtype = as_device(device, "make_variants"), _check_dtype(dtype)
    _, _, modes = plan.check_run_args(
        contexts=[1], batch_sizes=[1], modes=list(modes) if not isinstance(modes, str) else modes,
        bench_modes=BENCH_MODES, config=config, gqa_heads=gqa_heads, repeats=1, rounds=1, warmup=0,
        prefill_tokens=0, prefill_repeats=1, seed=seed, dtype=dtype, machine=None, max_memory_bytes=None,
        max_minutes=None)
    torch.manual_seed(seed)
    c = config
    n_h, d = c.num_attention_heads, c.v_head_dim
    variants: dict[str, DecodeVariant] = {}
    mla = hf_module = None
    if "hf" in modes:
        try:
            import transformers
        except ImportError:  # recorded as skipped
            modes = [m for m in modes if m != "hf"]
        else:
            from .hf import check_transformers_version
            try:
                check_transformers_version("the benchmark's hf mode", transformers.__version__)
            except ImportError as err:
                raise plan.RefusedValue(f"{err}; or leave hf out of {plan.arg_name('modes')}") from None
            hf_module, rotary = _hf_attention(c, device, dtype)
    if any(m in ("expanded", "latent", "absorbed", "hf") for m in modes):
        mla = MultiHeadLatentAttention(c).to(device, dtype).eval()
        if hf_module is not None:  # same weights in both implementations
            from .hf import load_hf_attention
            load_hf_attention(mla, hf_module)
    for mode in modes:
        if mode in ("mha", "gqa", "mqa"):
            kv = {"mha": n_h, "gqa": gqa_heads, "mqa": 1}[mode]
            att = AttentionConfig(f"{mode}", c.hidden_size, n_h, kv, d, 1, c.rope_theta)
            module = MultiHeadAttention.from_config(att).to(device, dtype).eval()
            variants[mode] = DecodeVariant(mode, module, att, {"k": (kv, d), "v": (kv, d)}, None, dtype, device,
                                           c.hidden_size)
        elif mode == "hf":
            variants[mode] = DecodeVariant(mode, hf_module, c, {"latent": (1, c.latent_cache_dim)}, "latent",
                                           dtype, device, c.hidden_size, rotary)
        else:
            variants[mode] = DecodeVariant(mode, mla, c, mla._cache_shapes(mode), mode, dtype, device,
                                           c.hidden_size)
    return variants


def time_decode(variant: DecodeVariant, batch: int, context: int, repeats: int = 5, warmup: int = 1,
                seed: int = 0) -> list[float]:
    """Seconds of each of ``repeats`` decode steps (after ``warmup`` untimed ones) of ``batch``
    sequences over ``context`` cached tokens."""
    if not isinstance(variant, DecodeVariant):
        raise TypeError(f"time_decode needs a DecodeVariant (from make_variants), got {type(variant).__name__}")
    for name, value, minimum in (("batch", batch, 1), ("context", context, 1), ("repeats", repeats, 1),
                                 ("warmup", warmup, 0), ("seed", seed, 0)):
        check_int("time_decode", name, value, minimum)
    with torch.inference_mode():
        variant.prepare(batch, context, seed)
        try:
            return _repeat_times(variant.step, variant.device, repeats, warmup)
        finally:
            variant.release()


def time_prefill(layer: MultiHeadLatentAttention, tokens: int, mode: str, repeats: int = 3, warmup: int = 1,
                 seed: int = 0) -> list[float]:
    """Seconds to prefill a ``tokens``-long prompt into an empty cache of ``mode``, batch 1.
    The untimed warm-up runs a shorter prompt (at most 1,024 tokens) through the same kernels."""
    if not isinstance(layer, MultiHeadLatentAttention):
        raise TypeError(f"time_prefill needs a MultiHeadLatentAttention, got {type(layer).__name__}")
    layer._check_mode(mode)
    for name, value, minimum in (("tokens", tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0),
                                 ("seed", seed, 0)):
        check_int("time_prefill", name, value, minimum)
    w = layer.W_O.weight
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, layer.config.hidden_size, generator=gen).to(w.device, w.dtype)

    def run(n: int) -> None:
        cache = layer.new_cache(1, n, mode=mode)
        layer(x[:, :n], cache)

    with torch.inference_mode():
        for _ in range(warmup):
            run(min(tokens, 1024))
        return [_timed(lambda: run(tokens), w.device) for _ in range(repeats)]


# --- the whole run -------------------------------------------------------------------------------
def _estimate_peak_bytes(variant: DecodeVariant, batch: int, context: int) -> float:
    """Rough peak memory of a step: the cache, plus the per-head K and V that latent/hf re-expand."""
    elem = bytes_per_element(variant.dtype)
    total = batch * (context + 1) * variant.cache_bytes_per_token
    if variant.mode in ("latent", "hf"):
        c = variant.config
        total += 3 * batch * (context + 1) * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * elem
    return total


def _memory_limit(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    try:  # the CPU: a share of the physical memory
        import os
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8e9


def _config_dict(config: MLAConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d.pop("name", None)
    return d


def run_benchmark(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  contexts: Sequence[int] = (1024, 4096, 16384), batch_sizes: Sequence[int] = (1,),
                  modes: Sequence[str] = BENCH_MODES, config: MLAConfig | None = None, gqa_heads: int = 8,
                  repeats: int = 3, rounds: int = 2, warmup: int = 1, prefill_tokens: int = 4096,
                  prefill_repeats: int = 2, seed: int = 0, progress: bool = True,
                  machine: dict[str, float] | None = None, max_memory_bytes: float | None = None,
                  max_minutes: float | None = 60) -> dict[str, Any]:
    """Run the benchmark and return its results as a JSON-ready dict (see the module docstring).

    Every case is timed in each of ``rounds`` rounds (``warmup`` untimed and ``repeats`` timed
    steps per round, on a freshly filled cache), and its median is taken over all rounds: spreading
    each case's samples over the whole run makes a burst of load from other processes hit every
    case alike. The machine's bandwidth and peak are measured at the start of each round; the
    best of them is used. ``machine`` may give ``{"bandwidth_bytes_per_s": ...,
    "peak_flops_per_s": ...}`` to skip measuring them. ``prefill_tokens=0`` skips prefill.
    Cases whose estimated memory exceeds ``max_memory_bytes`` (default: 80% of free GPU memory,
    half of a CPU's RAM) are recorded as skipped.

    Before any work, every argument is checked, and the weights and the prefill are checked
    against that memory; after the first measurement of the machine, a run whose roofline lower
    bound exceeds ``max_minutes`` (``None``: no limit) is refused. These raise
    :class:`~mla_tutorial.bench_plan.BenchmarkRefused` (also a ``TypeError``, ``ValueError`` or
    ``MemoryError``) saying what to change.
    """
    from tqdm.auto import tqdm

    config = bench_config() if config is None else config
    contexts, batch_sizes, modes = plan.check_run_args(
        contexts=contexts, batch_sizes=batch_sizes, modes=modes, bench_modes=BENCH_MODES, config=config,
        gqa_heads=gqa_heads, repeats=repeats, rounds=rounds, warmup=warmup, prefill_tokens=prefill_tokens,
        prefill_repeats=prefill_repeats, seed=seed, dtype=dtype, machine=machine,
        max_memory_bytes=max_memory_bytes, max_minutes=max_minutes)
    load_start = _load_average()
    device = pick_device(None if device is None else str(device))
    dtype = dtype or pick_dtype(device)
    limit = max_memory_bytes if max_memory_bytes is not None else _memory_limit(device)
    weight_bytes = plan.check_weights_fit(config, modes, gqa_heads, dtype, limit)
    plan.check_prefill_fits(config, prefill_tokens, dtype, limit - weight_bytes)
    variants = make_variants(config, modes, device, dtype, gqa_heads, seed)
    skipped_modes = [m for m in modes if m not in variants]
    mla = next((v.module for v in variants.values() if isinstance(v.module, MultiHeadLatentAttention)), None)
    prefill_modes = ("absorbed", "expanded") if prefill_tokens and mla is not None else ()

    jobs = [(m, L, B) for L in contexts for B in batch_sizes for m in variants]
    too_big = {job: _estimate_peak_bytes(variants[job[0]], job[2], job[1]) for job in jobs}
    too_big = {job: b for job, b in too_big.items() if b > limit - weight_bytes}
    plan.check_some_case_fits(too_big, jobs)
    times: dict[Any, list[float]] = {job: [] for job in jobs}
    prefill_times: dict[str, list[float]] = {mode: [] for mode in prefill_modes}
    measurements: list[dict[str, float]] = []
    bar = tqdm(total=rounds * (len(jobs) + len(prefill_modes)), desc="benchmark", disable=not progress,
               unit="case")
    for r in range(rounds):
        if machine is None:
            bar.set_postfix_str(f"round {r + 1}: measuring the machine")
            measurements.append({"bandwidth_bytes_per_s": measure_bandwidth(device, dtype),
                                 "peak_flops_per_s": measure_peak_flops(device, dtype)})
        if r == 0:  # refuse a run that cannot finish in time before its first step
            seconds = plan.estimate_seconds(variants, jobs, too_big, rounds, repeats, warmup,
                                            machine or measurements[0], prefill_tokens, prefill_repeats,
                                            mla if prefill_modes else None)
            try:
                plan.check_time(seconds, max_minutes, device, dtype, machine or measurements[0])
            except BenchmarkRefused:
                bar.close()
                raise
        for job in jobs:
            mode, context, batch = job
            bar.set_postfix_str(f"round {r + 1}: {mode} L={context} B={batch}")
            if job not in too_big:
                times[job] += time_decode(variants[mode], batch, context, repeats, warmup, seed)
            bar.update()
        for mode in prefill_modes:
            bar.set_postfix_str(f"round {r + 1}: prefill {prefill_tokens} tokens, {mode}")
            prefill_times[mode] += time_prefill(mla, prefill_tokens, mode, prefill_repeats, warmup, seed)
            bar.update()
    bar.close()
    if machine is None:
        machine = {key: max(m[key] for m in measurements) for key in measurements[0]}
    bw, peak = machine["bandwidth_bytes_per_s"], machine["peak_flops_per_s"]

    decode: list[dict[str, Any]] = []
    for job in jobs:
        mode, context, batch = job
        v = variants[mode]
        row: dict[str, Any] = {"mode": mode, "context": context, "batch": batch,
                               "cache_bytes_per_token": v.cache_bytes_per_token,
                               "weight_bytes": v.weight_bytes, "bytes": v.bytes(batch, context),
                               "flops": v.flops(batch, context)}
        memory_s, compute_s = row["bytes"] / bw, row["flops"] / peak
        row.update(memory_bound_s=memory_s, compute_bound_s=compute_s, bound_s=max(memory_s, compute_s),
                   bound="memory" if memory_s >= compute_s else "compute")
        if job in too_big:
            row.update(skipped=f"needs about {too_big[job] / 1e9:.1f} GB")
        else:
            median = statistics.median(times[job])
            row.update(times_s=times[job], median_s=median, tokens_per_s=batch / median,
                       fraction_of_bound=row["bound_s"] / median)
        decode.append(row)

    prefill = [{"mode": mode, "tokens": prefill_tokens, "times_s": t, "median_s": statistics.median(t),
                "absorbed_path": mode == "absorbed" and mla.uses_absorbed_path(prefill_tokens, prefill_tokens)}
               for mode, t in prefill_times.items()]
    result = {
        "schema": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": describe_device(device),
                   "threads": torch.get_num_threads(), "platform": platform.platform(),
                   "processor": platform.processor() or platform.machine()},
        "torch": torch.__version__, "python": platform.python_version(),
        "transformers": _transformers_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "config": _config_dict(config), "gqa_heads": gqa_heads,
        "contexts": list(contexts), "batch_sizes": list(batch_sizes), "modes": list(modes),
        "prefill_tokens": prefill_tokens, "repeats": repeats, "rounds": rounds, "warmup": warmup,
        "prefill_repeats": prefill_repeats, "seed": seed,
        # other processes competing for the CPU make timings noisy: 1-minute load average, before and after
        "load_average": {"start": load_start, "end": _load_average()},
        "machine": dict(machine), "machine_measurements": measurements, "modes_skipped": skipped_modes,
        "decode": decode, "prefill": prefill,
    }
    result["summary"] = summarize(result)
    return result


def _load_average() -> float | None:
    try:
        import os
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _row(result: dict[str, Any], mode: str, context: int, batch: int) -> dict[str, Any] | None:
    for r in result["decode"]:
        if (r["mode"], r["context"], r["batch"]) == (mode, context, batch) and "median_s" in r:
            return r
    return None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios at the longest context timed, smallest batch: absorbed MLA's speed-up over
    ``hf``, ``mha`` and the others, its fraction of the roofline bound, and prefill
    absorbed-mode / expanded time (at most 1 means absorbed mode is no slower)."""
    timed = [r for r in result["decode"] if "median_s" in r and r["mode"] == "absorbed"]
    out: dict[str, Any] = {}
    if timed:
        batch = min(r["batch"] for r in timed)
        context = max(r["context"] for r in timed if r["batch"] == batch)
        ref = _row(result, "absorbed", context, batch)
        out.update(context=context, batch=batch, absorbed_median_s=ref["median_s"],
                   absorbed_fraction_of_bound=ref["fraction_of_bound"])
        for mode in BENCH_MODES:
            other = _row(result, mode, context, batch)
            if other is not None and mode != "absorbed":
                out[f"absorbed_speedup_vs_{mode}"] = other["median_s"] / ref["median_s"]
    times = {p["mode"]: p["median_s"] for p in result.get("prefill", [])}
    if {"absorbed", "expanded"} <= set(times):
        out["prefill_tokens"] = result["prefill"][0]["tokens"]
        out["prefill_absorbed_over_expanded"] = times["absorbed"] / times["expanded"]
    return out


# --- recorded results ----------------------------------------------------------------------------
def results_dir() -> pathlib.Path:
    """The folder of results recorded with the package: ``mla_tutorial/results/``."""
    return pathlib.Path(__file__).resolve().parent / "results"


def save_results(result: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def load_results(paths: Iterable[str | pathlib.Path] | None = None, device_type: str | None = None) -> list[dict[str, Any]]:
    """Results read from JSON files (default: every ``*.json`` in :func:`results_dir`), oldest
    first, each with a ``"path"`` key added; ``device_type`` (``"cpu"``, ``"cuda"``) filters."""
    files = sorted(results_dir().glob("*.json")) if paths is None else [pathlib.Path(p) for p in paths]
    out = []
    for f in files:
        data = json.loads(pathlib.Path(f).read_text())
        if device_type is None or data.get("device", {}).get("type") == device_type:
            out.append({**data, "path": str(f)})
    return sorted(out, key=lambda r: r.get("date", ""))


_STYLE = {"mha": ("MHA", "C0", "o"), "gqa": ("GQA", "C1", "s"), "mqa": ("MQA", "C2", "^"),
          "expanded": ("MLA expanded", "C4", "v"), "latent": ("MLA latent", "C5", "D"),
          "absorbed": ("MLA absorbed", "C3", "*"), "hf": ("transformers DeepseekV3Attention", "C7", "x")}


def plot_results(result: dict[str, Any], path: str | pathlib.Path | None = None, ax=None, batch: int | None = None,
                 title: str | None = None):
    """Median decode-step latency (ms, log scale) against context for each mode, at ``batch``
    (default: the smallest timed). Saves to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["decode"] if "median_s" in r]
    if batch is None:
        batch = min((r["batch"] for r in rows), default=1)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=80)
    else:
        fig = ax.figure
    for mode in BENCH_MODES:
        pts = sorted((r["context"], r["median_s"] * 1e3) for r in rows if r["mode"] == mode and r["batch"] == batch)
        if pts:
            label, color, marker = _STYLE[mode]
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low > 10:  # a decade or more: label the powers of ten only, minor labels would crowd
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("context (cached tokens)")
    ax.set_ylabel("decode step latency (ms)")
    dev = result["device"]["name"]
    ax.set_title(title or f"{dev}, {result['dtype']}, batch {batch}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


# --- command line --------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise argparse.ArgumentTypeError(f"no modes given; choose some of {','.join(BENCH_MODES)}, "
                                         f"comma-separated (e.g. mha,absorbed)")
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown modes {bad}; choose from {','.join(BENCH_MODES)}")
    return modes


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _minutes(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes (0 is not one), got {text!r}")
    return None if value == float("inf") else value


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mla_tutorial.bench",
                                description="Time decode steps of MHA/GQA/MQA and MLA (expanded, latent, absorbed, "
                                            "transformers) against this machine's roofline.")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available, or $MLA_DEVICE)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="default: bfloat16 on recent GPUs, float16 on older ones, float32 on a CPU")
    p.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384], help="cached tokens, e.g. 1024,16384")
    p.add_argument("--batch-sizes", type=_ints, default=[1], help="sequences per step, e.g. 1,8")
    p.add_argument("--modes", type=_modes, default=list(BENCH_MODES), help=f"subset of {','.join(BENCH_MODES)}")
    p.add_argument("--hidden-size", type=_POSITIVE, default=2048, help="d_model (7168 in DeepSeek-V3)")
    p.add_argument("--heads", type=_POSITIVE, default=128, help="n_h, query heads")
    p.add_argument("--q-lora-rank", type=_NON_NEGATIVE, default=1536, help="d_c_q (0: no query compression)")
    p.add_argument("--kv-lora-rank", type=_POSITIVE, default=512, help="d_c, the cached latent width")
    p.add_argument("--qk-nope-head-dim", type=_POSITIVE, default=128, help="d_h")
    p.add_argument("--qk-rope-head-dim", type=_POSITIVE, default=64, help="d_h_R")
    p.add_argument("--v-head-dim", type=_POSITIVE, default=128, help="d_v (also the head width of mha/gqa/mqa)")
    p.add_argument("--gqa-heads", type=_POSITIVE, default=8, help="key/value heads of the gqa mode")
    p.add_argument("--repeats", type=_POSITIVE, default=3, help="timed decode steps per case and round")
    p.add_argument("--rounds", type=_POSITIVE, default=2,
                   help="rounds over all cases (the median over all rounds is reported)")
    p.add_argument("--warmup", type=_NON_NEGATIVE, default=1, help="untimed steps before each case's timed ones")
    p.add_argument("--prefill-tokens", type=_NON_NEGATIVE, default=4096,
                   help="prompt length for the prefill timing (0: skip)")
    p.add_argument("--prefill-repeats", type=_POSITIVE, default=2, help="timed prefills per round")
    p.add_argument("--seed", type=_NON_NEGATIVE, default=0)
    p.add_argument("--max-minutes", type=_minutes, default=60.0,
                   help="refuse a run whose roofline lower bound is longer (default 60; inf: no limit)")
    p.add_argument("--out", default=None, help="JSON path (default: mla-bench-<device>-<date>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--note", default=None, help="free text stored with the results (e.g. what else the machine ran)")
    return p


def format_results(result: dict[str, Any]) -> str:
    """A plain-text table of a run: each case's median, roofline bound and fraction of it; prefill; summary."""
    lines = [f"{'mode':>9} {'context':>8} {'batch':>5} {'median ms':>10} {'bound ms':>9} {'of bound':>8}  bound"]
    for r in result["decode"]:
        if "median_s" not in r:
            lines.append(f"{r['mode']:>9} {r['context']:>8} {r['batch']:>5}  skipped: {r.get('skipped')}")
            continue
        lines.append(f"{r['mode']:>9} {r['context']:>8} {r['batch']:>5} {r['median_s'] * 1e3:>10.2f} "
                     f"{r['bound_s'] * 1e3:>9.2f} {r['fraction_of_bound']:>8.2f}  {r['bound']}")
    for p in result["prefill"]:
        lines.append(f"prefill {p['tokens']} tokens, {p['mode']}-mode layer: {p['median_s'] * 1e3:.1f} ms")
    for k, v in result["summary"].items():
        if k == "targets":  # recorded by runs made before the summary stopped computing them
            continue
        lines.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return "\n".join(lines)


_CONFIG_FLAGS = {"hidden_size": "--hidden-size", "num_attention_heads": "--heads", "q_lora_rank": "--q-lora-rank",
                 "kv_lora_rank": "--kv-lora-rank", "qk_nope_head_dim": "--qk-nope-head-dim",
                 "qk_rope_head_dim": "--qk-rope-head-dim", "v_head_dim": "--v-head-dim"}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``python -m mla_tutorial.bench --help``). Bad flags, and runs that would
    not fit in memory or time, exit with status 2 and a message naming the flag to change, before
    anything is timed; the output paths are checked before the run too."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(f"--device: {err}")
    dtype = _DTYPES[args.dtype] if args.dtype else pick_dtype(device)
    try:
        config = bench_config(args.hidden_size, args.heads, args.q_lora_rank or None, args.kv_lora_rank,
                              args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim)
    except (TypeError, ValueError) as err:
        message = str(err)
        for field, flag in _CONFIG_FLAGS.items():
            message = message.replace(f"MLAConfig.{field}", flag)
        parser.error(message)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    with plan.cli_names():
        try:
            out = plan.check_writable(args.out or f"mla-bench-{device.type}-{stamp}.json", "out")
            plot = None if args.no_plot else plan.check_writable(args.plot or out.with_suffix(".png"), "plot")
            result = run_benchmark(device=device, dtype=dtype, contexts=args.contexts, batch_sizes=args.batch_sizes,
                                   modes=args.modes, config=config, gqa_heads=args.gqa_heads, repeats=args.repeats,
                                   rounds=args.rounds, warmup=args.warmup, prefill_tokens=args.prefill_tokens,
                                   prefill_repeats=args.prefill_repeats, seed=args.seed, progress=not args.quiet,
                                   max_minutes=args.max_minutes)
        except BenchmarkRefused as err:
            parser.error(str(err))
    result["command"] = " ".join(["python -m mla_tutorial.bench", *(argv if argv is not None else sys.argv[1:])])
    if args.note:
        result["note"] = args.note
    save_results(result, out)
    print(format_results(result))
    print(f"results: {out}")
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        plot_results(result, plot)
        print(f"plot: {plot}")


if __name__ == "__main__":
    main()
