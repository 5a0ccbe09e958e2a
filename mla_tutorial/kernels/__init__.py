"""Fused decode kernels in Triton (chapter 13): absorbed MLA over the paged latent cache.

>>> from mla_tutorial.kernels import paged_mla_decode
>>> o_lat, lse = paged_mla_decode(q_lat, q_R, kv_pool, block_table, seq_lens, scale)  # doctest: +SKIP

:func:`paged_mla_decode` takes the arguments of the torch reference
:func:`mla_tutorial.paged.paged_absorbed_attention` and returns what it returns.

Triton is optional (``pip install -e ".[kernels]"``). This package imports without it, and so
does the rest of ``mla_tutorial``; only calling a kernel without Triton raises
:class:`TritonUnavailableError`, which says how to install it. Bad arguments raise a clear error
before anything is launched, with or without Triton (:mod:`~mla_tutorial.kernels.checks`).

**Machines without a GPU.** Triton's interpreter runs kernels on the CPU with NumPy, one program
at a time: slow, but exact enough to test every line of a kernel. Triton chooses between
compiling and interpreting when a kernel is *defined* (decorated with ``@triton.jit``), from the
environment variable ``TRITON_INTERPRET``. So importing this package does one thing to the
environment: when ``TRITON_INTERPRET`` is unset and torch sees no CUDA device, it sets
``TRITON_INTERPRET=1``. Kernels defined afterwards, this package's (defined on the first call)
and a reader's own in a notebook, then run in the interpreter. It never overrides a value you
set: ``TRITON_INTERPRET=0`` keeps Triton's compiler, ``TRITON_INTERPRET=1`` forces the
interpreter on a GPU machine. Import this package before you define kernels of your own.
:func:`triton_mode` tells which mode the package's kernels run in, :func:`kernels_unavailable_reason`
why they cannot run (``None`` when they can).

The interpreter needs Triton 3.2 or newer (3.0 and 3.1 give wrong results), and 3.7 or newer
with NumPy 2.4 or newer (older interpreters convert one-element arrays with ``int()``, which
NumPy 2.4 refuses).
"""

from __future__ import annotations

import importlib
import os
import re

import torch

from ..quant import TILE, LatentFormat
from .checks import DecodeProblem, check_decode_inputs

__all__ = ["paged_mla_decode", "choose_num_splits", "multiprocessors", "triton_available", "triton_mode",
           "kernels_unavailable_reason", "TritonUnavailableError", "DecodeProblem", "check_decode_inputs",
           "INTERPRETER_SET_BY_PACKAGE"]

#: True when importing this package set TRITON_INTERPRET=1 (no CUDA device, variable unset).
INTERPRETER_SET_BY_PACKAGE = False
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    INTERPRETER_SET_BY_PACKAGE = True

_INSTALL_HINT = 'pip install -e ".[kernels]" (or pip install "triton>=3.2")'


class TritonUnavailableError(ImportError):
    """A kernel was called but Triton cannot be imported (or its interpreter cannot run it here)."""


def _triton_import_error() -> str | None:
    """Why ``import triton`` fails here, or None when it works."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as err:  # an ImportError, or a broken install failing at import
        return f"{type(err).__name__}: {err}"
    return None


def triton_available() -> bool:
    """Whether Triton can be imported (the kernels can then run, compiled or interpreted)."""
    return _triton_import_error() is None


def _decode_module():
    reason = _triton_import_error()
    if reason is not None:
        raise TritonUnavailableError(f"the Triton kernels need Triton, which cannot be imported here ({reason}); "
                                     f"install it with {_INSTALL_HINT}")
    from . import decode  # defines (decorates) the kernels: TRITON_INTERPRET is read now
    if decode.INTERPRETED and _stdlib_compiled():
        raise TritonUnavailableError(
            "Triton was imported before TRITON_INTERPRET=1 was set (torch.utils.flop_counter, for one, imports "
            "it), so its standard library (tl.max, tl.sum, ...) was built for a GPU and cannot run in the "
            "interpreter; set TRITON_INTERPRET=1 in the environment before Python starts, or import "
            "mla_tutorial.kernels before anything that imports triton")
    return decode


def _stdlib_compiled() -> bool:
    """Whether ``triton.language``'s own jitted functions were built for the compiler, not the
    interpreter (Triton decorates them when it is first imported, reading TRITON_INTERPRET then)."""
    import triton
    import triton.language as tl

    return isinstance(tl.standard.max, triton.runtime.JITFunction)


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with this Triton and NumPy (None: it can)."""
    import numpy
    import triton

    have, numpy_have = _version(triton.__version__), _version(numpy.__version__)
    if have < (3, 2):
        return f"Triton {triton.__version__}'s interpreter computes these kernels wrongly; it needs Triton >= 3.2"
    if have < (3, 7) and numpy_have >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} (it needs Triton "
                f">= 3.7 with NumPy >= 2.4, or NumPy < 2.4)")
    return None


def kernels_unavailable_reason() -> str | None:
    """Why the kernels cannot run on this machine, or None when they can: Triton cannot be
    imported, or it runs in its interpreter and this Triton/NumPy pair cannot run them."""
    reason = _triton_import_error()
    if reason is not None:
        return f"Triton cannot be imported ({reason}); install it with {_INSTALL_HINT}"
    if _decode_module().INTERPRETED:
        return _interpreter_problem()
    return None


def triton_mode() -> str:
    """``"interpreter"`` (Triton's CPU interpreter), ``"compiled"`` (a GPU), or ``"unavailable"``."""
    if not triton_available():
        return "unavailable"
    return "interpreter" if _decode_module().INTERPRETED else "compiled"


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 1 for the CPU's interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_num_splits(problem: DecodeProblem, block_h: int, sms: int, min_tokens_per_split: int = 256,
                      max_splits: int = 64) -> int:
    """How many pieces to split each sequence's keys into, so that a GPU with ``sms`` streaming
    multiprocessors has work for all of them.

    A decode step has few (sequence, head block) programs: at batch 1 with 128 heads in blocks of
    16 there are 8, for a GPU with 132 SMs. Splitting the keys multiplies the programs; each
    split then costs one merge. Aim for about two programs per SM, but keep every split at least
    ``min_tokens_per_split`` tokens long.
    """
    if problem.max_len == 0 or problem.batch == 0:
        return 1
    programs = problem.batch * -(-problem.rows // block_h)
    want = -(-2 * sms // programs)
    longest = -(-problem.max_len // min_tokens_per_split)
    return max(1, min(want, longest, max_splits))


def _check_positive_int(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"paged_mla_decode: {name} must be a positive int, got {value!r}")


def paged_mla_decode(q_lat: torch.Tensor, q_R: torch.Tensor, kv_pool: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, kv_format: str | LatentFormat | None = None,
                     tile: int = TILE, *, num_splits: int | None = None, block_h: int = 16, block_n: int = 32,
                     num_warps: int | None = None, num_stages: int | None = None,
                     check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention of T new queries per sequence over the paged latent cache, fused.

    Shapes (the layout of ``mla_tutorial.paged``): ``q_lat`` (B, T, n_h, d_c) = W_UKᵀ q_C,
    ``q_R`` (B, T, n_h, d_h_R) with RoPE applied, in bf16, fp16 or fp32; ``kv_pool``
    (num_blocks, block_size, d_c + d_h_R) rows [c_KV, k_R] in the queries' dtype, or
    torch.uint8 (num_blocks, block_size, 656) with ``kv_format="fp8"``, FlashMLA's layout with a
    scale per ``tile`` values (:mod:`mla_tutorial.quant`); ``block_table`` int32
    (B, max_blocks_per_seq); ``seq_lens`` int32 (B,), cached tokens per sequence including
    the T new ones. Query t of sequence b is at position seq_lens[b] - T + t and sees keys
    at positions up to its own.

    Returns ``o_lat`` (B, T, n_h, d_c) in the queries' dtype (fp32 accumulation) and ``lse``
    (B, T, n_h) fp32, the natural log-sum-exp of the scaled scores. A query that sees no key
    (a sequence of length 0) gets zeros and ``lse = -inf``.

    Tuning: ``block_h`` (query-head rows per tile; at least 16), ``block_n`` (keys per tile; at
    least 16), ``num_splits`` (default :func:`choose_num_splits`), ``num_warps`` and
    ``num_stages`` (passed to Triton). ``check_values=False`` skips reading ``seq_lens`` and
    the block table on the host (see :func:`check_decode_inputs`).
    """
    problem = check_decode_inputs(q_lat, q_R, kv_pool, block_table, seq_lens, scale, kv_format, tile, check_values)
    for name, value in (("block_h", block_h), ("block_n", block_n)):
        _check_positive_int(name, value, allow_none=False)
        if value < 16 or value & (value - 1):
            raise ValueError(f"paged_mla_decode: {name} must be a power of two of at least 16 (a tile dim of "
                             f"tl.dot), got {value}")
    for name, value in (("num_splits", num_splits), ("num_warps", num_warps), ("num_stages", num_stages)):
        _check_positive_int(name, value)
    decode = _decode_module()
    device = q_lat.device
    why = _interpreter_problem() if decode.INTERPRETED else None
    if why:
        raise TritonUnavailableError(f"paged_mla_decode: {why}; pip install -U triton")
    if decode.INTERPRETED and device.type != "cpu":
        raise ValueError(f"paged_mla_decode: Triton's interpreter is on (TRITON_INTERPRET=1) but the tensors are on "
                         f"{device}; move them to the CPU, or unset TRITON_INTERPRET to compile for the GPU")
    if not decode.INTERPRETED and device.type != "cuda":
        raise ValueError(f"paged_mla_decode: compiled Triton kernels need CUDA tensors, got {device}; on a machine "
                         f"without a GPU import mla_tutorial.kernels with TRITON_INTERPRET unset (or =1)")
    if problem.fp8 and not decode.INTERPRETED and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"paged_mla_decode: the FP8 kernel converts float8 e4m3 in hardware, which needs a GPU of "
                         f"compute capability 8.9 or newer (Ada, Hopper); {torch.cuda.get_device_name(device)} is "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Dequantize the pool "
                         f"(mla_tutorial.quant.unpack_fp8) and call the kernel on bf16/fp16 rows instead")
    if num_splits is None:
        num_splits = choose_num_splits(problem, block_h, multiprocessors(device))
    return decode.launch_decode(q_lat, q_R, kv_pool, block_table, seq_lens, float(scale), problem, num_splits,
                                block_h, block_n, num_warps, num_stages)
