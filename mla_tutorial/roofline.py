"""A roofline model of decode throughput: why a smaller KV cache means more tokens per second.

One decode step of a batch of ``B`` sequences, each with ``L`` cached tokens, must

* read every weight the batch touches (shared by the whole batch),
* read every sequence's KV cache (``B · L`` tokens, not shared),
* and do ``2 · active_params`` FLOPs per token in the weights (attention projections and
  feed-forward experts), plus the attention FLOPs over the ``L`` cached tokens.

The roofline model (Williams et al., 2009) says the step takes at least

    t_step = max(bytes / bandwidth, FLOPs / peak)

and the node generates ``B / t_step`` tokens per second. The batch is limited by memory: what is
left after the weights, divided by one sequence's cache. A model with a smaller cache fits a
larger batch, so each read of the weights is shared by more tokens. That capacity effect is what
a smaller cache buys, and the mechanism behind DeepSeek-V2's "5.76x maximum generation throughput"
over DeepSeek 67B (DeepSeek-V2 paper, section 3.2.3). Once the batch is that large, a step can
become compute-bound (DeepSeek-V2's does, in this model), and then the FLOP rate the kernels
achieve sets the throughput as much as the cache does.

Everything the model assumes is a named parameter of a dataclass with its source in a docstring:
:class:`Accelerator` (memory, bandwidth, peak), :class:`Node` (how many, how much memory is
usable), :class:`DecodeModel` (parameters stored and activated, cache bytes per token, attention
FLOPs per cached token). Hardware figures are datasheet values used as assumptions, not
measurements. Nothing here models communication between GPUs, kernel efficiency, prefill, or
scheduling: it is an upper bound on throughput, useful for ratios between models on the same
hardware.

Per-layer functions (:func:`attention_flops_per_cached_token`,
:func:`attention_bytes_per_cached_token`, :func:`arithmetic_intensity`) give the roofline of
the attention part of one decode step: MHA does 1 FLOP per byte of cache it reads, absorbed MLA
about 242 (DeepSeek-V3 dims, bf16).

Defined for chapter 08; used by :mod:`mla_tutorial.bench`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .accounting import bytes_per_element, kv_cache_elements
from .config import ATTENTION_PRESETS, AttentionConfig, MLAConfig

__all__ = [
    "Accelerator", "Node", "DecodeModel", "StepEstimate", "H800", "H100_SXM", "H200",
    "attention_flops_per_cached_token", "attention_bytes_per_cached_token", "arithmetic_intensity",
    "max_batch", "decode_step", "max_throughput", "throughput_ratio", "cache_reduction", "deepseek_67b",
    "deepseek_v2", "deepseek_v3", "paper_node", "PAPER_CONTEXT", "PAPER_SPEEDUP", "PAPER_CACHE_REDUCTION",
]

Config = AttentionConfig | MLAConfig

#: DeepSeek-V2 paper, section 3.2.3: maximum generation throughput 5.76x that of DeepSeek 67B.
PAPER_SPEEDUP = 5.76
#: DeepSeek-V2 paper, section 3.2.3: KV cache reduced by 93.3% against DeepSeek 67B.
PAPER_CACHE_REDUCTION = 0.933
#: Tokens cached per sequence in the model's default comparison. ASSUMPTION: the paper does not
#: state the lengths behind its throughput figure. It measured with "the prompt and generation
#: length distribution from the actually deployed DeepSeek 67B service" (section 3.2.3), and
#: DeepSeek 67B's context window is 4K tokens (the paper's Table 3), so 4,096 is the longest
#: sequence that distribution can hold (and DeepSeek-V2's pre-training length). Chapter 08 sweeps
#: this parameter, since the ratio depends on it.
PAPER_CONTEXT = 4096


# --- per layer: the attention part of one decode step -------------------------------------------
def attention_flops_per_cached_token(config: Config, mode: str | None = None) -> int:
    """FLOPs one query token spends per cached token, per layer, in a decode step.

    * MHA / GQA / MQA: ``2 n_h d_h`` for the scores ``q·k`` plus ``2 n_h d_h`` for ``p·v``:
      ``4 n_h d_h`` (65,536 with V3's heads). Sharing K/V heads (GQA/MQA) saves bytes, not FLOPs.
    * MLA absorbed (default): every head scores against the 576-wide latent and sums the
      512-wide ``c_KV``: ``2 n_h (d_c + d_h_R) + 2 n_h d_c`` (278,528 for V3).
    * MLA expanded (per-head K and V cached): ``2 n_h (d_h + d_h_R) + 2 n_h d_v`` (81,920).
    * MLA latent (K and V re-expanded from the cache at every step): the expanded FLOPs plus
      ``2 d_c n_h (d_h + d_v)`` to expand each cached token again (33.6 million for V3).
    """
    if isinstance(config, AttentionConfig):
        if mode not in (None, "mha"):
            raise ValueError(f"mode {mode!r} applies to MLA configs only")
        return 4 * config.num_attention_heads * config.head_dim
    if not isinstance(config, MLAConfig):
        raise TypeError(f"expected an MLAConfig or AttentionConfig, got {type(config).__name__}")
    n_h, d_c, d_R = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    d_h, d_v = config.qk_nope_head_dim, config.v_head_dim
    expanded = 2 * n_h * (d_h + d_R) + 2 * n_h * d_v
    if mode in (None, "absorbed"):
        return 2 * n_h * (d_c + d_R) + 2 * n_h * d_c
    if mode == "expanded":
        return expanded
    if mode == "latent":
        return expanded + 2 * d_c * n_h * (d_h + d_v)
    raise ValueError(f"unknown MLA mode {mode!r}; choose 'absorbed', 'latent' or 'expanded'")


def attention_bytes_per_cached_token(config: Config, mode: str | None = None,
                                     dtype: torch.dtype | float = torch.bfloat16) -> float:
    """Bytes of cache one decode step reads per cached token, per layer (each byte read once):
    the cache's own size, ``kv_cache_elements(config, mode) * bytes_per_element(dtype)``.
    65,536 B for MHA with V3's heads, 1,152 B for MLA, in bf16."""
    return kv_cache_elements(config, mode) * bytes_per_element(dtype)


def arithmetic_intensity(config: Config, mode: str | None = None,
                         dtype: torch.dtype | float = torch.bfloat16) -> float:
    """FLOPs per byte of cache read in the attention of a decode step: 1.0 for MHA in bf16
    (memory-bound on any hardware), about 242 for absorbed MLA with V3's dims (near the ridge
    point of an H100-class GPU, where bandwidth and compute limits meet)."""
    return attention_flops_per_cached_token(config, mode) / attention_bytes_per_cached_token(config, mode, dtype)


# --- hardware ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accelerator:
    """One accelerator as the roofline sees it. All values are ASSUMPTIONS taken from datasheets.

    Attributes:
        name: a label.
        memory_bytes: memory per device (bytes, decimal: 80e9 is "80 GB").
        bandwidth_bytes_per_s: peak memory bandwidth (bytes per second).
        peak_flops_per_s: dense matmul peak in the precision the matmuls run in (FLOP per second).
        source: where the figures come from.
    """

    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    peak_flops_per_s: float
    source: str = ""

    @property
    def ridge_flops_per_byte(self) -> float:
        """The arithmetic intensity above which a kernel is compute-bound: peak / bandwidth."""
        return self.peak_flops_per_s / self.bandwidth_bytes_per_s


#: NVIDIA H800 SXM (the GPU of the DeepSeek-V2 paper's throughput test). ASSUMPTION: the H800 is
#: an export variant of the H100 SXM with the same HBM3 memory and tensor cores and a slower
#: NVLink, so we use the H100 SXM datasheet: 80 GB, 3.35 TB/s, 989 TFLOPS dense BF16 (1,979 in
#: FP8). We take the BF16 figure: FP8 weights are stored in FP8 but attention runs in BF16.
H800 = Accelerator("H800 SXM", memory_bytes=80e9, bandwidth_bytes_per_s=3.35e12, peak_flops_per_s=989e12,
                   source="NVIDIA H100 SXM datasheet (the H800 shares its memory and tensor cores): "
                          "80 GB HBM3, 3.35 TB/s, 989 TFLOPS dense BF16")
#: NVIDIA H100 SXM, datasheet values (assumption): 80 GB, 3.35 TB/s, 989 TFLOPS dense BF16.
H100_SXM = dataclasses.replace(H800, name="H100 SXM", source="NVIDIA H100 SXM datasheet")
#: NVIDIA H200 SXM, datasheet values (assumption): 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS dense BF16.
H200 = Accelerator("H200 SXM", memory_bytes=141e9, bandwidth_bytes_per_s=4.8e12, peak_flops_per_s=989e12,
                   source="NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS dense BF16")


@dataclass(frozen=True)
class Node:
    """``count`` accelerators serving one model together, treated as one pool of memory,
    bandwidth and compute (perfect parallelism: communication is not modelled).

    Attributes:
        accelerator: the device.
        count: how many (8 in the DeepSeek-V2 paper's "one node of 8 H800 GPUs").
        usable_memory_fraction: the part of memory weights and cache may use. ASSUMPTION: 0.9;
            the rest holds activations, the runtime and fragmentation.
    """

    accelerator: Accelerator = H800
    count: int = 8
    usable_memory_fraction: float = 0.9

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count > 0):
            raise ValueError(f"Node.count must be a positive int, got {self.count!r}")
        if not 0 < self.usable_memory_fraction <= 1:
            raise ValueError(f"Node.usable_memory_fraction must be in (0, 1], got {self.usable_memory_fraction}")

    @property
    def usable_memory_bytes(self) -> float:
        return self.count * self.accelerator.memory_bytes * self.usable_memory_fraction

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.count * self.accelerator.bandwidth_bytes_per_s

    @property
    def peak_flops_per_s(self) -> float:
        return self.count * self.accelerator.peak_flops_per_s


def paper_node() -> Node:
    """The DeepSeek-V2 paper's test bed: one node of 8 H800 GPUs (section 3.2.3)."""
    return Node(H800, count=8)


# --- models ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeModel:
    """A whole model as the roofline sees it.

    Attributes:
        name: a label.
        total_params: parameters stored (all experts of a mixture-of-experts model).
        active_params: parameters each token passes through (2 FLOPs each per token).
        num_layers: attention layers.
        cache_elements_per_token_per_layer: values cached per token per layer
            (:func:`~mla_tutorial.accounting.kv_cache_elements`).
        attention_flops_per_cached_token_per_layer: see :func:`attention_flops_per_cached_token`.
        weight_bytes_per_param: 1.0 for FP8 weights, 2.0 for BF16.
        cache_bytes_per_element: 2.0 for a BF16 cache, 0.75 for a ~6-bit quantized one.
        source: where the parameter counts come from.

    Weights read per step: ``min(total_params, batch * active_params)`` parameters, i.e. a
    mixture of experts reads at most the experts its batch routes to (all of them at the large
    batches this model is about); a dense model reads all its weights.
    """

    name: str
    total_params: float
    active_params: float
    num_layers: int
    cache_elements_per_token_per_layer: int
    attention_flops_per_cached_token_per_layer: float
    weight_bytes_per_param: float = 1.0
    cache_bytes_per_element: float = 2.0
    source: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.active_params <= self.total_params:
            raise ValueError(f"{self.name}: need 0 < active_params <= total_params, got "
                             f"{self.active_params:g} and {self.total_params:g}")

    @classmethod
    def from_config(cls, config: Config, total_params: float, active_params: float, *,
                    mode: str | None = None, weight_bytes_per_param: float = 1.0,
                    cache_bytes_per_element: float = 2.0, name: str | None = None,
                    source: str = "") -> "DecodeModel":
        """Cache size and attention FLOPs from a config (and an MLA ``mode``: absorbed by default)."""
        return cls(name or config.name, total_params, active_params, config.num_hidden_layers,
                   kv_cache_elements(config, mode), attention_flops_per_cached_token(config, mode),
                   weight_bytes_per_param, cache_bytes_per_element, source)

    def replace(self, **changes) -> "DecodeModel":
        return dataclasses.replace(self, **changes)

    @property
    def weight_bytes(self) -> float:
        """Bytes of all stored weights."""
        return self.total_params * self.weight_bytes_per_param

    @property
    def cache_elements_per_token(self) -> int:
        return self.cache_elements_per_token_per_layer * self.num_layers

    @property
    def cache_bytes_per_token(self) -> float:
        """KV-cache bytes per token over all layers (389,120 for DeepSeek 67B in BF16)."""
        return self.cache_elements_per_token * self.cache_bytes_per_element

    def weight_bytes_read(self, batch: int) -> float:
        return min(self.total_params, batch * self.active_params) * self.weight_bytes_per_param

    @property
    def weight_flops_per_token(self) -> float:
        """2 FLOPs per active parameter: the matmuls of the weights (42 GFLOP for DeepSeek-V2)."""
        return 2 * self.active_params

    def attention_flops_per_token(self, context: int) -> float:
        """Attention FLOPs of one new token over ``context`` cached tokens, all layers."""
        return context * self.num_layers * self.attention_flops_per_cached_token_per_layer

    def flops_per_token(self, context: int) -> float:
        """2 FLOPs per active parameter plus attention over ``context`` cached tokens."""
        return self.weight_flops_per_token + self.attention_flops_per_token(context)


def deepseek_67b(weight_bytes_per_param: float = 1.0, cache_bytes_per_element: float = 2.0) -> DecodeModel:
    """DeepSeek 67B: dense, 67B parameters, 95 layers, GQA with 64 query and 8 key/value heads of 128.

    Source: DeepSeek LLM paper (arXiv 2401.02954), Table 2; the shapes are
    ``ATTENTION_PRESETS["DeepSeek-67B"]``. Defaults: FP8 weights (ASSUMPTION: the paper states FP8
    for DeepSeek-V2 only; we give the baseline the same serving stack) and a BF16 cache (the
    paper's 93.3% compares against 67B's cache in BF16: 2*8*128*95 values x 2 B = 389 KB/token).
    """
    return DecodeModel.from_config(ATTENTION_PRESETS["DeepSeek-67B"], 67e9, 67e9,
                                   weight_bytes_per_param=weight_bytes_per_param,
                                   cache_bytes_per_element=cache_bytes_per_element, name="DeepSeek 67B",
                                   source="DeepSeek LLM (arXiv 2401.02954): 67B dense, 95 layers, GQA-8")


def deepseek_v2(attention: str = "mla", weight_bytes_per_param: float = 1.0,
                cache_bytes_per_element: float = 0.75, kv_heads: int = 8) -> DecodeModel:
    """DeepSeek-V2: 236B parameters of which 21B are activated per token, 60 layers.

    Source: DeepSeek-V2 paper (arXiv 2405.04434), abstract and section 3.2.3 (FP8 weights, KV cache
    quantized to 6 bits on average: ``cache_bytes_per_element=0.75``).
    ``attention="mla"`` (absorbed decode), or a what-if with everything else kept (experts, layers,
    weight and cache precision), to isolate MLA's part:

    * ``"gqa"``: GQA with ``kv_heads`` (default 8) key/value heads of width 128 for its 128 query
      heads, the attention of DeepSeek 67B (2,048 cached values per token and layer);
    * ``"mha"``: all 128 heads cache their own K and V (32,768 values per token and layer).
    """
    return _with_attention(MLAConfig.deepseek_v2(), attention, kv_heads, 236e9, 21e9, weight_bytes_per_param,
                           cache_bytes_per_element,
                           "DeepSeek-V2 (arXiv 2405.04434): 236B total, 21B activated, 60 layers")


def deepseek_v3(attention: str = "mla", weight_bytes_per_param: float = 1.0,
                cache_bytes_per_element: float = 2.0, kv_heads: int = 8) -> DecodeModel:
    """DeepSeek-V3: 671B parameters of which 37B are activated per token, 61 layers.

    Source: DeepSeek-V3 technical report (arXiv 2412.19437): 671B total, 37B activated, trained and
    served with FP8 weights. Cache in BF16 by default (ASSUMPTION: as FlashMLA's BF16 kernels).
    ``attention="mha"`` is the what-if V3 with 128 heads of 128 cached K and V (57x the cache),
    ``"gqa"`` the what-if with ``kv_heads`` key/value heads (see :func:`deepseek_v2`).
    """
    return _with_attention(MLAConfig.deepseek_v3(), attention, kv_heads, 671e9, 37e9, weight_bytes_per_param,
                           cache_bytes_per_element,
                           "DeepSeek-V3 (arXiv 2412.19437): 671B total, 37B activated, 61 layers")


_ATTENTION_KINDS = ("mla", "gqa", "mha")


def _with_attention(config: MLAConfig, attention: str, kv_heads: int, total_params: float, active_params: float,
                    weight_bytes_per_param: float, cache_bytes_per_element: float, source: str) -> DecodeModel:
    """The model with MLA (absorbed decode), or a what-if with a GQA or MHA cache of the same heads."""
    if attention not in _ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {_ATTENTION_KINDS}, got {attention!r}")
    if attention == "mla":
        kind, name = config, config.name
    else:
        kv = config.num_attention_heads if attention == "mha" else kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or config.num_attention_heads % kv:
            raise ValueError(f"kv_heads must be a positive int dividing the {config.num_attention_heads} heads, "
                             f"got {kv_heads!r}")
        kind = AttentionConfig.from_mla(config, kv)
        name = f"{config.name} with {kind.kind}"
    return DecodeModel.from_config(kind, total_params, active_params, weight_bytes_per_param=weight_bytes_per_param,
                                   cache_bytes_per_element=cache_bytes_per_element, name=name, source=source)


# --- the roofline ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepEstimate:
    """One decode step of ``batch`` sequences with ``context`` cached tokens each."""

    model: str
    batch: int
    context: int
    weight_bytes: float      # weights read
    cache_bytes: float       # KV cache read
    flops: float
    memory_time_s: float     # bytes / bandwidth
    compute_time_s: float    # FLOPs / peak

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes

    @property
    def step_time_s(self) -> float:
        """The roofline bound: max(bytes / bandwidth, FLOPs / peak)."""
        return max(self.memory_time_s, self.compute_time_s)

    @property
    def bound(self) -> str:
        """"memory" or "compute": which limit sets the step time."""
        return "memory" if self.memory_time_s >= self.compute_time_s else "compute"

    @property
    def tokens_per_s(self) -> float:
        """Tokens generated per second: one per sequence per step."""
        return self.batch / self.step_time_s if self.batch else 0.0


def max_batch(model: DecodeModel, node: Node, context: int) -> int:
    """The largest batch whose cache fits: (usable memory - weights) // (context x cache per token).
    0 when the weights alone do not fit."""
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive int, got {context!r}")
    room = node.usable_memory_bytes - model.weight_bytes
    if room <= 0:
        return 0
    return int(room // (context * model.cache_bytes_per_token))


def decode_step(model: DecodeModel, node: Node, batch: int, context: int) -> StepEstimate:
    """The roofline estimate of one decode step (see the module docstring)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    weights = model.weight_bytes_read(batch) if batch else 0.0
    cache = batch * context * model.cache_bytes_per_token
    flops = batch * model.flops_per_token(context)
    return StepEstimate(model.name, batch, context, weights, cache, flops,
                        (weights + cache) / node.bandwidth_bytes_per_s, flops / node.peak_flops_per_s)


def max_throughput(model: DecodeModel, node: Node, context: int) -> StepEstimate:
    """The decode step at the largest batch that fits: the model's maximum generation throughput."""
    return decode_step(model, node, max_batch(model, node, context), context)


def throughput_ratio(model: DecodeModel, baseline: DecodeModel, node: Node, context: int) -> float:
    """Maximum throughput of ``model`` over that of ``baseline``, on the same node and context."""
    base = max_throughput(baseline, node, context).tokens_per_s
    if base == 0:
        raise ValueError(f"{baseline.name}'s weights do not fit in {node.count} x {node.accelerator.name}: "
                         "no throughput to compare with; give the node more devices")
    return max_throughput(model, node, context).tokens_per_s / base


def cache_reduction(baseline: DecodeModel, model: DecodeModel) -> float:
    """1 - cache per token of ``model`` / of ``baseline``: 0.933 for DeepSeek-V2 vs 67B (paper)."""
    return 1 - model.cache_bytes_per_token / baseline.cache_bytes_per_token

