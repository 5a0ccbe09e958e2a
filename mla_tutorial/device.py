"""Pick the device and dtype a chapter runs on: cuda, then mps, then cpu; and how much memory it has.

Set the environment variable ``MLA_DEVICE`` (``cuda``, ``cuda:1``, ``mps`` or ``cpu``) to force one.
:func:`check_memory` refuses an allocation the device cannot hold before it is attempted, with
the bytes it needs and what to change.
"""

from __future__ import annotations

import os

import torch

__all__ = ["pick_device", "pick_dtype", "describe_device", "synchronize", "as_device", "available_memory",
           "check_memory", "format_bytes"]

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


def as_device(device: torch.device | str, caller: str) -> torch.device:
    """A torch.device from a device or its name; a clear error for anything else or a missing device."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{caller}: unknown device {device!r}; use one of {_KINDS}, e.g. 'cuda:0'") from err
    if not isinstance(device, torch.device):
        raise TypeError(f"{caller} needs a torch.device or a device name such as 'cpu', got "
                        f"{type(device).__name__} ({device!r})")
    if device.type in ("cuda", "mps") and not _available(device.type):
        raise ValueError(f"{caller}: device {str(device)!r} is not available on this machine; "
                         f"available: {[k for k in _KINDS if _available(k)]}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{caller}: device {str(device)!r}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return device


def pick_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs with fast bf16 (Ampere and newer, Apple silicon), fp16 on older GPUs such as
    Colab's T4, fp32 on the CPU (where fp32 matmuls are the fast ones)."""
    device = as_device(device, "pick_dtype")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "mps":
        return torch.bfloat16
    return torch.float32


def describe_device(device: torch.device | str) -> str:
    """A human-readable name: the GPU's name, or the CPU with its thread count."""
    device = as_device(device, "describe_device")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    return f"CPU ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (GPUs run asynchronously); a no-op on the CPU.
    Call it on both sides of a timed region, or a GPU timing measures only the launch."""
    device = as_device(device, "synchronize")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --- memory ------------------------------------------------------------------------------------
#: Allocations below this size are never checked (reading the free memory costs a system call).
CHECK_MEMORY_ABOVE = 64 * 2**20


def format_bytes(n: float) -> str:
    """``1.2 GB``-style text (powers of 1000), for messages."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def _linux_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in fields:
        return None
    return fields["MemAvailable"] + fields.get("SwapFree", 0)


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that could still be allocated on ``device``, or None where that cannot be known.

    CUDA: free memory as the driver reports it. CPU: ``MemAvailable`` plus free swap on Linux
    (``/proc/meminfo``), else the physical memory (``os.sysconf``). MPS: the recommended working
    set less what is allocated. ``meta`` tensors take no memory (None: never refused)."""
    device = as_device(device, "available_memory")
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        if device.type == "cpu":
            linux = _linux_available_bytes()
            if linux is not None:
                return linux
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def check_memory(nbytes: float, device: torch.device | str, what: str, advice: str) -> None:
    """Raise ``MemoryError`` before allocating ``nbytes`` for ``what`` on ``device`` when the device
    does not have them, with the bytes needed and ``advice`` (what to change). Small requests are
    not checked."""
    if nbytes < CHECK_MEMORY_ABOVE:
        return
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs {format_bytes(nbytes)}, but {device} has {format_bytes(free)} free; "
                          f"{advice}")
