"""What a benchmark run will need, checked before it starts: its arguments, memory and time.

:func:`~mla_tutorial.bench.run_benchmark` and the command line (``python -m mla_tutorial.bench``)
call these before building a layer or timing a step, so that a run they cannot do fails in
seconds with what to change instead of after minutes of work (or an out-of-memory kill):

* :func:`check_run_args`: types and ranges of every argument, and the GQA heads against the heads;
* :func:`check_weights_fit` and :func:`check_prefill_fits`: the weights and the prefill against
  the memory the device has, computed from the shapes;
* :func:`estimate_seconds` and :func:`check_time`: a lower bound of the run's time from the
  roofline of the measured machine, refused when it exceeds ``max_minutes``.

Errors are :class:`BenchmarkRefused`, also a ``TypeError``, ``ValueError`` or ``MemoryError`` as
fits. Under the command line (:func:`cli_names`) they name the flags (``--gqa-heads``) instead of
the arguments (``gqa_heads``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .config import MLAConfig
from .device import format_bytes

__all__ = ["BenchmarkRefused", "RefusedType", "RefusedValue", "RefusedMemory", "check_run_args", "check_weights_fit",
           "check_prefill_fits", "check_some_case_fits", "estimate_seconds",
           "check_time", "check_writable", "weight_parameters", "cli_names", "arg_name"]


class BenchmarkRefused(Exception):
    """A benchmark refused before it started: an argument it cannot use, or a run that would not
    fit in memory or in time. Each one is also a ``TypeError``, ``ValueError`` or ``MemoryError``."""


class RefusedType(BenchmarkRefused, TypeError):
    """An argument of the wrong type."""


class RefusedValue(BenchmarkRefused, ValueError):
    """An argument out of range, or a run that would take longer than allowed."""


class RefusedMemory(BenchmarkRefused, MemoryError):
    """A run whose weights, prefill or every decode case would not fit in memory."""


# --- argument names: the API's or the command line's --------------------------------------------
_CLI = contextvars.ContextVar("mla_bench_cli", default=False)
_FLAGS = {"num_attention_heads": "--heads", "max_minutes": "--max-minutes"}


@contextlib.contextmanager
def cli_names() -> Iterator[None]:
    """Within this block, refusals name command-line flags (``--gqa-heads``)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def arg_name(name: str) -> str:
    """``name`` as the caller wrote it: the argument, or under :func:`cli_names` its flag."""
    return _FLAGS.get(name, "--" + name.replace("_", "-")) if _CLI.get() else name


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RefusedType(f"{arg_name(name)} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise RefusedValue(f"{arg_name(name)} must be {what}, got {value}")
    return value


def _ints(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RefusedType(f"{arg_name(name)} must be a list of positive ints, e.g. [1024, 4096], "
                           f"got {type(values).__name__} ({values!r})")
    if not values:
        raise RefusedValue(f"{arg_name(name)} is empty; give at least one positive int, e.g. [1024]")
    return [_int(name, v, 1) for v in values]


def check_run_args(*, contexts: Any, batch_sizes: Any, modes: Any, bench_modes: Sequence[str], config: Any,
                   gqa_heads: Any, repeats: Any, rounds: Any, warmup: Any, prefill_tokens: Any,
                   prefill_repeats: Any, seed: Any, dtype: Any, machine: Any, max_memory_bytes: Any,
                   max_minutes: Any) -> tuple[list[int], list[int], list[str]]:
    """Check every argument of a run; return (contexts, batch sizes, modes) as lists."""
    contexts, batch_sizes = _ints("contexts", contexts), _ints("batch_sizes", batch_sizes)
    if isinstance(modes, str) or not isinstance(modes, Sequence):
        raise RefusedType(f"{arg_name('modes')} must be a list of modes from {list(bench_modes)}, got {modes!r}")
    modes = list(modes)
    if not modes:
        raise RefusedValue(f"{arg_name('modes')} is empty; choose some of {','.join(bench_modes)}")
    unknown = [m for m in modes if m not in bench_modes]
    if unknown:
        raise RefusedValue(f"{arg_name('modes')}: unknown modes {unknown}; choose from {','.join(bench_modes)}")
    if len(set(modes)) != len(modes):
        raise RefusedValue(f"{arg_name('modes')} names a mode twice: {modes}")
    if not isinstance(config, MLAConfig):
        raise RefusedType(f"config must be an MLAConfig (e.g. bench_config()), got {type(config).__name__}")
    config.validate()
    for name, value, minimum in (("repeats", repeats, 1), ("rounds", rounds, 1), ("warmup", warmup, 0),
                                 ("prefill_tokens", prefill_tokens, 0), ("prefill_repeats", prefill_repeats, 1),
                                 ("seed", seed, 0), ("gqa_heads", gqa_heads, 1)):
        _int(name, value, minimum)
    if "gqa" in modes and config.num_attention_heads % gqa_heads:
        raise RefusedValue(f"{arg_name('gqa_heads')} ({gqa_heads}) must divide the {config.num_attention_heads} "
                            f"query heads ({arg_name('num_attention_heads')}); choose a divisor of "
                            f"{config.num_attention_heads}, or leave 'gqa' out of {arg_name('modes')}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise RefusedType(f"{arg_name('dtype')} must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    if machine is not None:
        keys = ("bandwidth_bytes_per_s", "peak_flops_per_s")
        if not isinstance(machine, dict) or not all(_positive_number(machine.get(k)) for k in keys):
            raise RefusedValue(f"machine must be a dict with positive {keys[0]!r} and {keys[1]!r}, got {machine!r}")
    if max_memory_bytes is not None and not _positive_number(max_memory_bytes):
        raise RefusedValue(f"max_memory_bytes must be a positive number of bytes, got {max_memory_bytes!r}")
    if max_minutes is not None and not _positive_number(max_minutes):
        raise RefusedValue(f"{arg_name('max_minutes')} must be a positive number of minutes, got {max_minutes!r}")
    return contexts, batch_sizes, modes


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --- memory ---------------------------------------------------------------------------------------
def weight_parameters(config: MLAConfig, modes: Sequence[str], gqa_heads: int) -> dict[str, int]:
    """Parameters of each module a run builds, from the shapes: ``mha``/``gqa``/``mqa`` each, one
    MLA layer shared by the three MLA modes (``"mla"``), and transformers' copy of it (``hf``)."""
    from .mla import MultiHeadLatentAttention

    c, out = config, {}
    kv_heads = {"mha": c.num_attention_heads, "gqa": gqa_heads, "mqa": 1}
    for mode in modes:
        if mode in kv_heads:
            out[mode] = 2 * c.hidden_size * (c.num_attention_heads + kv_heads[mode]) * c.v_head_dim
    if any(m in ("expanded", "latent", "absorbed", "hf") for m in modes):
        out["mla"] = MultiHeadLatentAttention.parameter_count(c)
    if "hf" in modes:
        out["hf"] = MultiHeadLatentAttention.parameter_count(c)
    return out


def check_weights_fit(config: MLAConfig, modes: Sequence[str], gqa_heads: int, dtype: torch.dtype,
                      limit: float) -> int:
    """Refuse a run whose weights (all modules, in ``dtype``; each built in fp32 first) exceed
    ``limit`` bytes; return the bytes of all weights in ``dtype``."""
    params = weight_parameters(config, modes, gqa_heads)
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(params.values()) * elem
    need = total + max(params.values(), default=0) * 4  # the largest module, built in fp32, then cast
    if need > limit:
        names = [{"mla": "the MLA layer", "hf": "its transformers copy"}.get(m, m) for m in params]
        raise RefusedMemory(
            f"the weights of {', '.join(names)} at {arg_name('hidden_size')} {config.hidden_size} need "
            f"about {format_bytes(need)} ({sum(params.values()):,} parameters in {str(dtype).replace('torch.', '')}, "
            f"each module built in float32 first), more than the {format_bytes(limit)} this run may use; "
            f"use a smaller {arg_name('hidden_size')} or {arg_name('num_attention_heads')}, or fewer "
            f"{arg_name('modes')}")
    return total


def check_prefill_fits(config: MLAConfig, tokens: int, dtype: torch.dtype, limit: float) -> None:
    """Refuse a prefill of ``tokens`` whose per-head queries, keys and values (expanded mode,
    the larger one) exceed ``limit`` bytes."""
    if not tokens:
        return
    c = config
    elem = torch.empty((), dtype=dtype).element_size()
    # queries, expanded keys and values of the new tokens, and the expanded cache they are written to
    need = 2 * tokens * c.num_attention_heads * (2 * c.qk_head_dim + c.v_head_dim) * elem
    if need > limit:
        raise RefusedMemory(f"a prefill of {tokens:,} tokens ({arg_name('prefill_tokens')}) needs about "
                             f"{format_bytes(need)} of per-head keys and values, more than the {format_bytes(limit)} "
                             f"this run may use; use fewer {arg_name('prefill_tokens')} (0 skips prefill)")


def check_some_case_fits(too_big: dict[Any, float], jobs: Sequence[Any]) -> None:
    """Refuse a run in which every decode case was found too big for memory (all would be skipped)."""
    if jobs and len(too_big) == len(jobs):
        smallest = min(too_big.values())
        raise RefusedMemory(f"no decode case fits in memory: the smallest needs about {format_bytes(smallest)} of "
                             f"cache; use shorter {arg_name('contexts')} or smaller {arg_name('batch_sizes')}")


# --- time -----------------------------------------------------------------------------------------
def estimate_seconds(variants: dict[str, Any], jobs: Sequence[tuple[str, int, int]], too_big: Any, rounds: int,
                     repeats: int, warmup: int, machine: dict[str, float], prefill_tokens: int = 0,
                     prefill_repeats: int = 0, prefill_layer: Any = None) -> float:
    """A lower bound of a run's time: every step at its roofline bound ``max(bytes / bandwidth,
    FLOPs / peak)`` on the measured ``machine``, plus writing each cache once per round and the
    prefills' matmul FLOPs. Real steps are slower (a fraction of the bound), never faster."""
    bw, peak = machine["bandwidth_bytes_per_s"], machine["peak_flops_per_s"]
    total = 0.0
    for mode, context, batch in jobs:
        if (mode, context, batch) in too_big:
            continue
        v = variants[mode]
        step = max(v.bytes(batch, context) / bw, v.flops(batch, context) / peak)
        fill = batch * context * v.cache_bytes_per_token / bw
        total += rounds * ((warmup + repeats) * step + fill)
    if prefill_tokens and prefill_layer is not None:
        c = prefill_layer.config
        params = type(prefill_layer).parameter_count(c)
        for tokens, count in ((prefill_tokens, prefill_repeats), (min(prefill_tokens, 1024), warmup)):
            flops = 2 * params * tokens + tokens * tokens * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
            total += rounds * 2 * count * flops / peak  # two modes: absorbed and expanded
    return total


def check_time(seconds: float, max_minutes: float | None, device: torch.device, dtype: torch.dtype,
               machine: dict[str, float]) -> None:
    """Refuse a run whose lower-bound time exceeds ``max_minutes``, saying what would shorten it."""
    if max_minutes is None or seconds <= 60 * max_minutes:
        return
    advice = [f"fewer or shorter {arg_name('contexts')}", f"fewer {arg_name('rounds')} or {arg_name('repeats')}",
              f"fewer {arg_name('modes')} (latent and hf re-expand the whole cache at every step)"]
    slow_dtype = ""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        slow_dtype = (f"; {str(dtype).replace('torch.', '')} matmuls on this CPU measured "
                      f"{machine['peak_flops_per_s'] / 1e9:.3g} GFLOP/s, and a CPU usually runs float32 fastest")
        advice.insert(0, f"{arg_name('dtype')} float32")
    raise RefusedValue(f"this run would take at least {seconds / 60:.0f} minutes on {device} (the roofline bound "
                        f"of every step on this machine's measured bandwidth and peak){slow_dtype}, more than "
                        f"{arg_name('max_minutes')} {max_minutes:g}; use {', or '.join(advice)}, or raise "
                        f"{arg_name('max_minutes')}")


# --- output files ---------------------------------------------------------------------------------
def check_writable(path: str | os.PathLike, name: str) -> pathlib.Path:
    """Refuse an output path that cannot be written, before a run whose results would be lost.
    Creates missing parent folders (as saving would); leaves no file behind."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise RefusedValue(f"{arg_name(name)} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'run.json')!r}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as err:
        raise RefusedValue(f"{arg_name(name)} {str(path)!r} cannot be written ({err.strerror or err}); "
                            f"choose a path in a folder you can write to") from None
    if not existed:
        path.unlink()
    return path
