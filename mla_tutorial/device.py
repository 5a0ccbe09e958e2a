"""Pick the device and dtype a chapter runs on: cuda, then mps, then cpu.

Set the environment variable ``MLA_DEVICE`` (``cuda``, ``cuda:1``, ``mps`` or ``cpu``) to force one.
"""

from __future__ import annotations

import os

import torch

__all__ = ["pick_device", "pick_dtype", "describe_device", "synchronize"]

_KINDS = ("cuda", "mps", "cpu")


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return True


def pick_device(name: str | None = None) -> torch.device:
    """``name``, else ``$MLA_DEVICE``, else the first available of cuda, mps, cpu.

    An unknown name, or a device this machine lacks, raises ``ValueError`` naming the choices.
    """
    source = "argument"
    if name is None and os.environ.get("MLA_DEVICE"):
        name, source = os.environ["MLA_DEVICE"].strip(), "MLA_DEVICE"
    if name is None:
        return torch.device(next(kind for kind in _KINDS if _available(kind)))
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r} (from {source}); use one of {_KINDS}, e.g. 'cuda:0'") from err
    if device.type not in _KINDS:
        raise ValueError(f"unsupported device {name!r} (from {source}); use one of {_KINDS}")
    if not _available(device.type):
        have = [k for k in _KINDS if _available(k)]
        raise ValueError(f"device {name!r} (from {source}) is not available on this machine; available: {have}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs with fast bf16 (Ampere and newer, Apple silicon), fp16 on older GPUs such as
    Colab's T4, fp32 on the CPU (where fp32 matmuls are the fast ones)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "mps":
        return torch.bfloat16
    return torch.float32


def describe_device(device: torch.device) -> str:
    """A human-readable name: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    return f"CPU ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPUs run asynchronously); a no-op on the CPU.
    Call it on both sides of a timed region, or a GPU timing measures only the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
