"""Size a chapter's GPU run from the device: its memory and a time budget.

On a CPU every chapter runs at small sizes; on a GPU it runs at DeepSeek's sizes, as large as the
device allows within the book's time budget per notebook: at most **3 minutes on a T4-class GPU**
and **1 minute on an H100-class one**. This module is the one place those sizes are decided.

* :func:`gpu_budget` describes a GPU as a :class:`GPUBudget`: its memory (from the device's
  properties), its datasheet peak FLOP/s and bandwidth (looked up by name in :data:`DATASHEETS`;
  an unknown GPU is planned as the slowest one the book targets, a T4) and the notebook's time
  budget (:func:`time_budget_s`).
* :meth:`GPUBudget.seconds` estimates the time of some work with the roofline of chapter 08,
  ``max(bytes / bandwidth, FLOPs / peak)``, divided by an efficiency (the share of the datasheet
  figures eager PyTorch reaches; ASSUMPTION: 0.25) plus a fixed overhead per step (kernel launches
  and Python; ASSUMPTION: 2 ms). It is a planning estimate, not a prediction: the GPU run script
  (``scripts/gpu_run.py``) records the real wall time of every notebook so it can be checked.
* :func:`bench_plan` (chapter 08), :func:`layer_run_plan` (chapter 07), :func:`decode_sweep_plan`
  (chapter 04), :func:`absorption_plan` (chapter 05) and :func:`quant_error_plan` (chapter 12) pick
  the largest sizes whose estimate fits half the budget (the other half is left for what is not
  sized: imports, building layers, the chapters' CPU work, plotting) and whose memory fits half the
  device's.

Every function takes the device's properties as an argument, so the sizes a T4 or an H100 would
get can be computed (and tested) on any machine, with fake properties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .accounting import bytes_per_element
from .checks import check_int, check_real
from .config import MLAConfig
from .mla import MultiHeadLatentAttention

__all__ = ["DATASHEETS", "GPUBudget", "gpu_budget", "time_budget_s", "largest_fitting", "bench_plan",
           "BenchPlan", "layer_run_plan", "LayerRunPlan", "SweepPlan", "decode_sweep_plan", "chunk_sweep_plan",
           "absorption_plan", "quant_error_plan", "QuantErrorPlan"]

#: Datasheet figures per GPU, matched in order against the device's name (case-insensitive):
#: (name fragment, dense fp16/bf16 tensor-core FLOP/s, memory bandwidth in bytes/s, source). These
#: are ASSUMPTIONS used for planning only, from NVIDIA's product datasheets.
DATASHEETS: tuple[tuple[str, float, float, str], ...] = (
    ("H200", 989e12, 4.8e12, "NVIDIA H200 datasheet: 989 TFLOPS dense BF16, 4.8 TB/s"),
    ("H100 PCIe", 756e12, 2.0e12, "NVIDIA H100 PCIe datasheet: 756 TFLOPS dense BF16, 2.0 TB/s"),
    ("H100", 989e12, 3.35e12, "NVIDIA H100 SXM datasheet: 989 TFLOPS dense BF16, 3.35 TB/s"),
    ("H800", 989e12, 3.35e12, "NVIDIA H100 SXM datasheet (the H800 shares its tensor cores and HBM3)"),
    ("A100", 312e12, 1.555e12, "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 1.555 TB/s (40 GB)"),
    ("L4", 121e12, 0.3e12, "NVIDIA L4 datasheet: 121 TFLOPS dense FP16, 300 GB/s"),
    ("V100", 125e12, 0.9e12, "NVIDIA V100 SXM2 datasheet: 125 TFLOPS FP16 tensor, 900 GB/s"),
    ("T4", 65e12, 0.32e12, "NVIDIA T4 datasheet: 65 TFLOPS FP16 tensor, 320 GB/s"),
)
_FALLBACK = DATASHEETS[-1]  # an unknown GPU is planned as the slowest the book targets: a T4


def time_budget_s(peak_flops_per_s: float) -> float:
    """The book's time budget for one notebook on a GPU with this peak: 180 s for a T4-class GPU
    (under 200 TFLOP/s), 60 s for an H100-class one (500 TFLOP/s and more), 120 s in between."""
    if peak_flops_per_s >= 500e12:
        return 60.0
    if peak_flops_per_s >= 200e12:
        return 120.0
    return 180.0


@dataclass(frozen=True)
class GPUBudget:
    """What a chapter may spend on one GPU.

    Attributes:
        name: the device's name.
        memory_bytes: the device's total memory.
        peak_flops_per_s, bandwidth_bytes_per_s: datasheet figures (see :data:`DATASHEETS`).
        seconds: the notebook's time budget (:func:`time_budget_s`).
        efficiency: the share of the datasheet figures a step reaches (ASSUMPTION: 0.25).
        step_overhead_s: fixed time per step: kernel launches and Python (ASSUMPTION: 2 ms).
        plan_fraction: the share of the time budget and of memory the sized work may take (0.5).
        source: where the datasheet figures come from.
    """

    name: str
    memory_bytes: float
    peak_flops_per_s: float
    bandwidth_bytes_per_s: float
    seconds: float
    efficiency: float = 0.25
    step_overhead_s: float = 2e-3
    plan_fraction: float = 0.5
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("memory_bytes", "peak_flops_per_s", "bandwidth_bytes_per_s", "seconds"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPUBudget.{field} must be a positive number, got {value!r}")
        for field in ("efficiency", "plan_fraction"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"GPUBudget.{field} must be in (0, 1], got {getattr(self, field)!r}")

    @property
    def plan_seconds(self) -> float:
        """Seconds the sized work of a notebook may take: ``plan_fraction * seconds``."""
        return self.plan_fraction * self.seconds

    @property
    def plan_memory_bytes(self) -> float:
        """Bytes the sized work may hold at once: ``plan_fraction * memory_bytes``."""
        return self.plan_fraction * self.memory_bytes

    def seconds_for(self, flops: float, nbytes: float, steps: int = 1) -> float:
        """Estimated time of ``steps`` steps, each doing ``flops`` FLOPs over ``nbytes`` bytes read."""
        bound = max(nbytes / self.bandwidth_bytes_per_s, flops / self.peak_flops_per_s)
        return steps * (bound / self.efficiency + self.step_overhead_s)

    def replace(self, **changes: Any) -> "GPUBudget":
        return dataclasses.replace(self, **changes)


def _datasheet(name: str) -> tuple[str, float, float, str]:
    lowered = name.lower()
    for entry in DATASHEETS:
        if entry[0].lower() in lowered:
            return entry
    fragment, peak, bandwidth, source = _FALLBACK
    return fragment, peak, bandwidth, f"unknown GPU {name!r}: planned with a T4's figures ({source})"


def gpu_budget(device: torch.device | str | None = None, *, props: Any = None) -> GPUBudget:
    """The budget of a CUDA device, from ``torch.cuda.get_device_properties(device)``, or from
    ``props``: any object with ``name`` and ``total_memory`` (bytes), e.g. fake properties in a test.

    Raises ``ValueError`` for a device that is not a CUDA GPU (the chapters use their CPU sizes there).
    """
    if props is None:
        device = torch.device("cuda" if device is None else device)
        if device.type != "cuda":
            raise ValueError(f"gpu_budget sizes CUDA GPUs; got device {str(device)!r} "
                             "(on a CPU or mps the chapters use their small sizes)")
        if not torch.cuda.is_available():
            raise ValueError("gpu_budget: this machine has no CUDA GPU; pass props= to size a GPU you do not have")
        props = torch.cuda.get_device_properties(device)
    name, memory = getattr(props, "name", None), getattr(props, "total_memory", None)
    if not isinstance(name, str) or isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
        raise ValueError(f"props must have a str name and a positive total_memory (bytes), got "
                         f"name={name!r}, total_memory={memory!r}")
    _, peak, bandwidth, source = _datasheet(name)
    return GPUBudget(name, float(memory), peak, bandwidth, time_budget_s(peak), source=source)


def largest_fitting(candidates: Sequence[int], seconds: Callable[[int], float], budget_s: float,
                    memory: Callable[[int], float] | None = None, memory_bytes: float | None = None,
                    what: str = "size") -> int:
    """The largest of ``candidates`` whose ``seconds(c)`` fits ``budget_s`` (and ``memory(c)`` fits
    ``memory_bytes``). Raises ``ValueError`` naming the estimates when even the smallest does not fit."""
    if not candidates:
        raise ValueError(f"no candidate {what}s given")
    fits = [c for c in sorted(candidates) if seconds(c) <= budget_s
            and (memory is None or memory_bytes is None or memory(c) <= memory_bytes)]
    if not fits:
        c = min(candidates)
        need = f"{seconds(c):.1f} s" + (f" and {memory(c) / 1e9:.1f} GB" if memory else "")
        have = f"{budget_s:.1f} s" + (f" and {memory_bytes / 1e9:.1f} GB" if memory_bytes else "")
        raise ValueError(f"even the smallest {what} ({c}) needs about {need}; the budget is {have}")
    return fits[-1]


# --- chapter 08: the decode benchmark ------------------------------------------------------------
@dataclass(frozen=True)
class BenchPlan:
    """Sizes for :func:`mla_tutorial.bench.run_benchmark` on a GPU, with the estimate behind them."""

    contexts: tuple[int, ...]
    estimated_s: float


def _meta_variants(config: MLAConfig, modes: Sequence[str], dtype: torch.dtype, gqa_heads: int = 8) -> dict:
    """The benchmark's variants built on the meta device (no memory, no initialisation): their
    weights, caches and FLOP counts are the real ones. ``hf`` does the work of ``latent`` (it
    re-expands every cached token at every step), so it is planned as ``latent``."""
    from .bench import make_variants

    with torch.device("meta"):
        built = make_variants(config, sorted({"latent" if m == "hf" else m for m in modes}), "meta", dtype,
                              gqa_heads)
    return {m: built["latent" if m == "hf" else m] for m in modes}


def bench_plan(budget: GPUBudget, config: MLAConfig, modes: Sequence[str], *, dtype: torch.dtype = torch.bfloat16,
               contexts: Sequence[int] = (1024, 4096, 16384, 65536), batch_sizes: Sequence[int] = (1,),
               repeats: int = 5, rounds: int = 2, warmup: int = 1, prefill_tokens: int = 4096,
               prefill_repeats: int = 2, gqa_heads: int = 8) -> BenchPlan:
    """The longest run of ``contexts`` (shortest first) whose benchmark fits ``budget.plan_seconds``:
    every mode, context and batch size timed ``rounds * (warmup + repeats)`` times, the machine's
    bandwidth and peak measured every round, and the prefill timings."""
    variants = _meta_variants(config, modes, dtype, gqa_heads)
    elem = bytes_per_element(dtype)

    def per_context(L: int) -> float:
        return sum(budget.seconds_for(v.flops(B, L), v.bytes(B, L), rounds * (warmup + repeats))
                   for v in variants.values() for B in batch_sizes)

    # every round measures the machine: 11 products of 8192 x 8192 matrices, 11 reads of 2 GB
    n, nbytes = 8192, 2 * 2**30
    fixed = rounds * (budget.seconds_for(2 * n**3, 3 * n * n * elem, 11)
                      + budget.seconds_for(2 * nbytes / elem, nbytes, 11))
    if prefill_tokens and any(m in ("expanded", "latent", "absorbed", "hf") for m in modes):
        # the absorbed-mode and the expanded layer each prefill the prompt (the expanded computation)
        mla = _meta_variants(config, ["expanded"], dtype)["expanded"]
        T, c = prefill_tokens, config
        flops = 2 * mla.matrix_params * T + T * T * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)  # causal
        fixed += rounds * 2 * budget.seconds_for(flops, mla.weight_bytes + T * mla.cache_bytes_per_token,
                                                 prefill_repeats + warmup)
    chosen, total = [], fixed
    for L in sorted(contexts):
        cost = per_context(L)
        if total + cost > budget.plan_seconds:
            break
        chosen.append(L)
        total += cost
    if not chosen:
        raise ValueError(f"bench_plan: the shortest context ({min(contexts)}) needs about {total + per_context(min(contexts)):.0f} s "
                         f"on {budget.name}; the budget is {budget.plan_seconds:.0f} s")
    return BenchPlan(tuple(chosen), total)


# --- chapter 07: a V3-sized layer, prefill then decode --------------------------------------------
@dataclass(frozen=True)
class LayerRunPlan:
    """Sizes for chapter 07's run of six caches: the prompt and the tokens decoded after it."""

    prompt_len: int
    new_tokens: int
    estimated_s: float
    estimated_bytes: float


def layer_run_plan(budget: GPUBudget, config: MLAConfig, *, dtype: torch.dtype = torch.bfloat16,
                   prompts: Sequence[int] = (1024, 2048, 4096, 8192, 16384), new_tokens: int = 64,
                   kv_heads: Sequence[int] | None = None) -> LayerRunPlan:
    """The longest prompt for which chapter 07's run fits the budget: one MLA layer in its three
    cache modes and ``MultiHeadAttention`` with ``kv_heads`` key/value heads (default: MHA, GQA-8,
    MQA), each prefilling the prompt and decoding ``new_tokens`` tokens, every cache kept."""
    kv_heads = tuple(kv_heads or (config.num_attention_heads, 8, 1))
    mla = _meta_variants(config, ["expanded", "latent", "absorbed"], dtype)
    mha = [_meta_variants(config, ["gqa"], dtype, gqa_heads=kv)["gqa"] for kv in kv_heads]
    variants = list(mla.values()) + mha
    elem = bytes_per_element(dtype)
    c = config

    def seconds(T: int) -> float:
        total = 0.0
        for v in variants:
            prefill = 2 * v.matrix_params * T + T * T * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
            total += budget.seconds_for(prefill, v.weight_bytes + T * v.cache_bytes_per_token)
            total += budget.seconds_for(v.flops(1, T + new_tokens), v.bytes(1, T + new_tokens), new_tokens)
        return total

    def memory(T: int) -> float:
        weights = mla["absorbed"].weight_bytes + sum(v.weight_bytes for v in mha)
        caches = sum(v.cache_bytes_per_token for v in variants) * (T + new_tokens)
        qkv = 4 * T * c.num_attention_heads * (2 * c.qk_head_dim + c.v_head_dim) * elem  # prefill q, k, v
        # where the fused attention kernel cannot run (older GPUs, unequal key and value widths)
        # PyTorch falls back to a path that holds the whole (heads, T, T) score matrix
        scores = c.num_attention_heads * T * T * elem
        return weights + caches + qkv + scores

    T = largest_fitting(prompts, seconds, budget.plan_seconds, memory, budget.plan_memory_bytes, "prompt")
    return LayerRunPlan(T, new_tokens, seconds(T), memory(T))


# --- chapters 04 and 05: one MLA layer timed against context, and chapter 05's query chunks -------
@dataclass(frozen=True)
class SweepPlan:
    """Sizes a chapter times one after another on a GPU (contexts or chunk lengths, shortest first),
    each timed ``repeats`` times after a warm-up, with the estimate behind them: ``estimated_s`` for
    the whole sweep, ``estimated_bytes`` at its largest size."""

    sizes: tuple[int, ...]
    repeats: int
    estimated_s: float
    estimated_bytes: float


# --- chapter 12: the quantized latent cache's error by position --------------------------------
@dataclass(frozen=True)
class QuantErrorPlan:
    """Sizes for :func:`mla_tutorial.quant_bench.measure_quant_error` on a GPU."""

    max_context: int
    num_probes: int
    estimated_s: float
    estimated_bytes: float


def _sweep(sizes: Sequence[int], repeats: int, cost: Callable[[int], float], memory: Callable[[int], float],
           seconds: float, memory_bytes: float, what: str) -> SweepPlan:
    """The longest run of ``sizes`` (shortest first) whose summed ``cost`` fits ``seconds`` and whose
    largest size's ``memory`` fits ``memory_bytes``."""
    ordered = sorted(sizes)

    def total(size: int) -> float:
        return sum(cost(s) for s in ordered if s <= size)

    top = largest_fitting(ordered, total, seconds, memory, memory_bytes, what)
    return SweepPlan(tuple(s for s in ordered if s <= top), repeats, total(top), memory(top))


def _check_sweep_args(owner: str, budget: GPUBudget, sizes: Any, name: str, repeats: Any, seconds: Any) -> float:
    if not isinstance(budget, GPUBudget):
        raise TypeError(f"{owner}: budget must be a GPUBudget (sizing.gpu_budget(device)), got {type(budget).__name__}")
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"{owner}: {name} must be a non-empty sequence of positive ints, got {sizes!r}")
    for size in sizes:
        check_int(owner, name, size, minimum=1)
    check_int(owner, "repeats", repeats, minimum=1)
    if seconds is None:
        return budget.plan_seconds
    return check_real(owner, "seconds", seconds, above=0, hint="the share of budget.plan_seconds this sweep may take")


def _expanded_bytes_per_token(config: MLAConfig, dtype: torch.dtype) -> float:
    """Per-head keys (content and RoPE parts) and values of one token, as expanding a latent makes them."""
    c = config
    return c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_element(dtype)


def _expand_flops_per_token(config: MLAConfig) -> int:
    """FLOPs of expanding one cached latent into every head's key and value: ``2 n_h d_c (d_h + d_v)``."""
    c = config
    return 2 * c.num_attention_heads * c.kv_lora_rank * (c.qk_nope_head_dim + c.v_head_dim)


DECODE_SWEEP_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def decode_sweep_plan(budget: GPUBudget, config: MLAConfig, modes: Sequence[str] = ("expanded", "latent"), *,
                      dtype: torch.dtype = torch.bfloat16, contexts: Sequence[int] = DECODE_SWEEP_CONTEXTS,
                      repeats: int = 10, seconds: float | None = None, layers: int = 1) -> SweepPlan:
    """The longest run of ``contexts`` for which :func:`mla_tutorial.timing.decode_step_times` of one
    MLA layer in ``modes`` (chapter 04: expanded and latent), context after context, fits ``seconds``
    (default ``budget.plan_seconds``) and half the device's memory.

    Time: every mode's step, timed ``repeats`` times after a warm-up round, from its FLOPs and the
    bytes it reads (weights and cache), plus filling the expanded cache by expanding the latents once.
    Memory at a context: ``layers`` copies of the weights (chapter 05 holds two layers), every mode's
    cache and the random latents they are filled from, and, where the keys and values are expanded
    (each latent step, and filling the expanded cache), three per-head copies of them: the content
    keys and the values, the keys with their RoPE part, and an fp32 copy of the keys where a GPU
    cannot take 16-bit products to fp32 directly.
    """
    seconds = _check_sweep_args("decode_sweep_plan", budget, contexts, "contexts", repeats, seconds)
    check_int("decode_sweep_plan", "layers", layers, minimum=1)
    if isinstance(modes, str) or not modes:
        raise ValueError(f"decode_sweep_plan: modes must be a non-empty sequence of MLA modes, got {modes!r}")
    modes = [MultiHeadLatentAttention._check_mode(m) for m in modes]
    variants = _meta_variants(config, modes, dtype)
    weights = next(iter(variants.values())).weight_bytes
    expanded = _expanded_bytes_per_token(config, dtype)
    expands = "expanded" in modes or "latent" in modes

    def cost(L: int) -> float:
        total = sum(budget.seconds_for(v.flops(1, L), v.bytes(1, L), repeats + 1) for v in variants.values())
        if "expanded" in modes:
            total += budget.seconds_for(L * _expand_flops_per_token(config), L * expanded)
        return total

    def memory(L: int) -> float:
        caches = sum(v.cache_bytes_per_token for v in variants.values()) * (L + 1)
        latents = L * config.latent_cache_dim * bytes_per_element(dtype)
        return layers * weights + caches + latents + (3 * (L + 1) * expanded if expands else 0)

    return _sweep(contexts, repeats, cost, memory, seconds, budget.plan_memory_bytes, "context")


ABSORPTION_CHUNKS = (1, 4, 16, 64, 128, 256, 512, 1024)


def chunk_sweep_plan(budget: GPUBudget, config: MLAConfig, *, dtype: torch.dtype = torch.bfloat16,
                     prefix: int = 4096, chunks: Sequence[int] = ABSORPTION_CHUNKS, repeats: int = 10,
                     seconds: float | None = None) -> SweepPlan:
    """The longest run of ``chunks`` for which chapter 05's chunk measurement fits ``seconds``
    (default ``budget.plan_seconds``) and half the device's memory: ``T`` new queries after
    ``prefix`` cached tokens, computed absorbed and expanded by two layers, ``repeats`` times each
    after a warm-up.

    FLOPs per head for ``T`` queries over ``S = prefix + T`` keys are those of
    :meth:`~mla_tutorial.MultiHeadLatentAttention.uses_absorbed_path`, plus the projections of the
    ``T`` tokens; both paths read the weights and the latent cache and write and read their fp32
    scores, and the expanded one writes and reads the keys and values it expands. Memory: two layers'
    weights, their caches, the fp32 scores with their softmax and its cast (up to ``12 + b`` bytes per
    score, ``b`` the dtype's, counting the product before it is scaled), and the expanded path's keys
    and values (three per-head copies, as in :func:`decode_sweep_plan`).
    """
    seconds = _check_sweep_args("chunk_sweep_plan", budget, chunks, "chunks", repeats, seconds)
    check_int("chunk_sweep_plan", "prefix", prefix, minimum=0)
    c = config
    mla = _meta_variants(config, ["absorbed"], dtype)["absorbed"]
    n_h, d_c, d_R = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    d_h, d_v = c.qk_nope_head_dim, c.v_head_dim
    elem = bytes_per_element(dtype)
    expanded = _expanded_bytes_per_token(config, dtype)

    def cost(T: int) -> float:
        S = prefix + T
        projections = 2 * mla.matrix_params * T
        absorbed = n_h * (2 * T * d_c * (d_h + d_v) + 2 * T * S * (d_c + d_R) + 2 * T * S * d_c)
        expand = n_h * (2 * S * d_c * (d_h + d_v) + 2 * T * S * (d_h + d_R + d_v))
        read = mla.weight_bytes + S * mla.cache_bytes_per_token + 16 * n_h * T * S  # fp32 scores, softmax
        return (budget.seconds_for(projections + absorbed, read, repeats + 1)
                + budget.seconds_for(projections + expand, read + 2 * S * expanded, repeats + 1))

    def memory(T: int) -> float:
        S = prefix + T
        return (2 * mla.weight_bytes + 3 * S * mla.cache_bytes_per_token + n_h * T * S * (12 + elem)
                + 3 * S * expanded)

    return _sweep(chunks, repeats, cost, memory, seconds, budget.plan_memory_bytes, "chunk")


def absorption_plan(budget: GPUBudget, config: MLAConfig, *, dtype: torch.dtype = torch.bfloat16,
                    prefix: int = 4096, repeats: int = 10) -> tuple[SweepPlan, SweepPlan]:
    """Chapter 05's two GPU measurements, each given half of ``budget.plan_seconds``: the chunks of
    new queries after ``prefix`` cached tokens (:func:`chunk_sweep_plan`), then one decoding step
    against context in the three cache modes, with both layers still held (:func:`decode_sweep_plan`)."""
    if not isinstance(budget, GPUBudget):
        raise TypeError(f"absorption_plan: budget must be a GPUBudget (sizing.gpu_budget(device)), "
                        f"got {type(budget).__name__}")
    half = budget.plan_seconds / 2
    chunks = chunk_sweep_plan(budget, config, dtype=dtype, prefix=prefix, repeats=repeats, seconds=half)
    contexts = decode_sweep_plan(budget, config, ("expanded", "latent", "absorbed"), dtype=dtype,
                                 repeats=repeats, seconds=half, layers=2)
    return chunks, contexts


def quant_error_plan(budget: GPUBudget, config: MLAConfig, *, contexts: Sequence[int] = (8192, 16384, 32768, 65536,
                     131072), num_probes: int = 16, formats: int = 5, regimes: int = 3) -> QuantErrorPlan:
    """The longest sequence for which chapter 12's error measurement fits the budget. Per regime it
    projects every token to its latent and then, for each format and the fp32 reference, reads the
    cache up to every probe: each probe gathers and dequantizes its rows and scores them in fp32.
    ASSUMPTION: fp32 matmuls run at 1/16 of the datasheet's dense bf16 peak (no tensor cores)."""
    c = config
    width, d_c, n_h = c.latent_cache_dim, c.kv_lora_rank, c.num_attention_heads
    fp32 = budget.replace(peak_flops_per_s=budget.peak_flops_per_s / 16)

    def seconds(L: int) -> float:
        from .quant_bench import probe_positions

        keys = sum(p + 1 for p in probe_positions(L, num_probes))          # rows read per format
        project = fp32.seconds_for(2 * L * c.hidden_size * width, 4 * L * c.hidden_size, -(-L // 2048))
        read = fp32.seconds_for(keys * n_h * 2 * (2 * d_c + width), 6 * 4 * keys * width, num_probes)
        spread = fp32.seconds_for(keys * n_h * 2 * width, 4 * keys * width, num_probes)
        return regimes * (project + (formats + 1) * read + spread)

    def memory(L: int) -> float:  # fp32 latents and two pools, the probes' gathered rows, the fp32 layer
        from .mla import MultiHeadLatentAttention

        return 3 * 4 * L * width + 256e6 + 4 * MultiHeadLatentAttention.parameter_count(c)

    L = largest_fitting(contexts, seconds, budget.plan_seconds, memory, budget.plan_memory_bytes, "context")
    return QuantErrorPlan(L, num_probes, seconds(L), memory(L))
