"""Latency measurements for the chapters: the fastest of a few runs, and one MLA decoding step.

Used by chapter 04 (the price of re-expanding the latent cache) and chapter 05 (absorbed against
expanded computation, and decode latency in the three cache modes). A timing is a benchmark,
not a test: these functions measure and return seconds; what a chapter concludes from them it
prints and plots, and the test suite checks only how they measure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .device import synchronize
from .mla import MultiHeadLatentAttention

__all__ = ["best_times", "decode_step_times", "plain_ticks"]


def _check_repeats(repeats: Any) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int (timed runs of each function), got {repeats!r}")


def best_times(fns: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device | str = "cpu",
               setups: Mapping[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """The fastest of ``repeats`` timed runs of each function, in seconds: ``{name: seconds}``.

    The functions take turns (one run of each per round), so that all of them see the same load
    on a busy machine; the first round is an untimed warm-up (allocations, kernel choice, caches).
    ``setups[name]()``, when given, runs untimed before every run of ``fns[name]`` (to rewind a
    cache, say). The clock is read after :func:`~mla_tutorial.synchronize`, so a GPU's queued
    work is inside the timed region.
    """
    if not isinstance(fns, Mapping) or not fns:
        raise ValueError("best_times needs a non-empty {name: function} mapping of the functions to time")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"best_times: fns[{name!r}] is {type(fn).__name__}, not a function of no arguments")
    _check_repeats(repeats)
    setups = dict(setups or {})
    unknown = set(setups) - set(fns)
    if unknown:
        raise ValueError(f"best_times: setups {sorted(unknown)} have no function of the same name in fns")
    for name, setup in setups.items():
        if not callable(setup):
            raise TypeError(f"best_times: setups[{name!r}] is {type(setup).__name__}, not a function")
    device = torch.device(device)
    best = {name: math.inf for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if name in setups:
                setups[name]()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.inference_mode()
def decode_step_times(layer: MultiHeadLatentAttention, modes: Iterable[str], context: int, repeats: int,
                      seed: int = 0) -> dict[str, float]:
    """Seconds of one decoding step of one sequence after ``context`` cached tokens, per cache mode.

    The cache holds random latents ``[c_KV, k_R]`` (a step's cost does not depend on their values;
    expanded mode caches their expansion, so every mode sees the same keys and values). It is
    rewound between runs, so every timed step sees exactly ``context`` cached tokens. Runs on the
    layer's device and dtype; returns :func:`best_times` of the modes.
    """
    if not isinstance(layer, MultiHeadLatentAttention):
        raise TypeError(f"decode_step_times needs a MultiHeadLatentAttention layer, got {type(layer).__name__}")
    modes = list(modes)
    if not modes:
        raise ValueError("decode_step_times: give at least one mode, e.g. ('expanded', 'latent', 'absorbed')")
    for mode in modes:
        layer._check_mode(mode)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"decode_step_times: context must be a positive int (cached tokens), got {context!r}")
    _check_repeats(repeats)
    weight = layer.W_O.weight
    device, dtype = weight.device, weight.dtype
    gen = torch.Generator().manual_seed(seed)
    cfg = layer.config
    latent = torch.randn(1, 1, context, cfg.latent_cache_dim, generator=gen).to(device, dtype)  # [c_KV, k_R]
    x = torch.randn(1, 1, cfg.hidden_size, generator=gen).to(device, dtype)                     # the new token
    steps, rewinds = {}, {}
    for mode in modes:
        cache = layer.new_cache(1, context + 1, mode=mode)
        if mode == "expanded":
            k, v = layer.expand(latent)
            cache.update(k=k, v=v)
            del k, v  # the cache holds its own copy: free the expansion before timing
        else:
            cache.update(latent=latent)
        steps[mode] = lambda cache=cache: layer(x, cache)                 # appends the new token ...
        rewinds[mode] = lambda cache=cache: setattr(cache, "length", context)  # ... which is forgotten
    return best_times(steps, repeats, device, setups=rewinds)


def plain_ticks(ax) -> None:
    """Tick labels such as 0.5, 2 and 1000 on a matplotlib axes' logarithmic axes (not 5x10^-1)."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
