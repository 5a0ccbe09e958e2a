"""A preallocated key-value cache shared by standard attention and MLA.

One :class:`KVCache` holds named buffers of shape ``(batch, heads, max_len, dim)``. Standard
attention stores ``k`` and ``v`` with ``n_kv`` heads; MLA's expanded mode stores per-head ``k``
and ``v``; MLA's latent and absorbed modes store one single-"head" buffer ``latent`` of width
``d_c + d_h_R`` (576 for DeepSeek-V3): ``c_KV`` and ``k_R`` side by side, so the absorbed
decode reads keys and values from the same memory.

Defined in chapter 02; sized in chapters 03, 04, 06 and 07.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from .checks import check_positive_int
from .device import as_device, check_memory, format_bytes

__all__ = ["KVCache"]


class KVCache:
    """Preallocated, append-only cache for ``batch_size`` sequences of up to ``max_len`` tokens.

    Args:
        batch_size: sequences decoded side by side.
        max_len: tokens each sequence may hold; appending past it raises ``ValueError``.
        buffers: ``{name: (heads, dim)}`` for each cached tensor.
        dtype, device: of every buffer.
        mode: a label saying which module and mode wrote it (checked by the modules).
    """

    def __init__(self, batch_size: int, max_len: int, buffers: dict[str, tuple[int, int]],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", mode: str = "mha"):
        check_positive_int("KVCache", "batch_size", batch_size)
        check_positive_int("KVCache", "max_len", max_len)
        if not isinstance(buffers, Mapping) or not buffers:
            raise ValueError("KVCache: give at least one buffer, e.g. {'k': (heads, dim), 'v': (heads, dim)}, "
                             f"got {buffers!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"KVCache: dtype must be a floating torch.dtype, got {dtype!r}")
        if not isinstance(mode, str):
            raise TypeError(f"KVCache: mode must be a str label, got {type(mode).__name__}")
        device = as_device(device, "KVCache")
        for name, shape in buffers.items():
            if not isinstance(shape, (tuple, list)) or len(shape) != 2 or \
                    any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
                raise ValueError(f"KVCache: buffer {name!r} needs a (heads, dim) pair of positive ints, "
                                 f"got {shape!r}")
        per_token = sum(h * d for h, d in buffers.values()) * torch.empty((), dtype=dtype).element_size()
        check_memory(batch_size * max_len * per_token, device,
                     f"a KV cache of {batch_size} x {max_len:,} tokens ({format_bytes(per_token)} per token)",
                     "make it with a smaller max_len (the longest context you will decode) or batch_size")
        self.batch_size, self.max_len, self.mode = batch_size, max_len, mode
        self.length = 0  # tokens cached so far (the position of the next token)
        self._owner: weakref.ref | None = None  # the layer that writes it (see `bind`)
        self._buffers: dict[str, torch.Tensor] = {}
        for name, (heads, dim) in buffers.items():
            # (B, H, max_len, D): each head's cached rows are contiguous, so a decode step reads
            # them with plain strided matmuls and no copy
            self._buffers[name] = torch.zeros(batch_size, heads, max_len, dim, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._buffers.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._buffers)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (heads, dim)}`` of each buffer: what one token occupies."""
        return {name: (b.shape[1], b.shape[3]) for name, b in self._buffers.items()}

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(b.shape)}" for n, b in self._buffers.items())
        return (f"KVCache(mode={self.mode!r}, length={self.length}/{self.max_len}, {shapes}, "
                f"dtype={self.dtype}, {self.bytes_per_token} B/token)")

    # --- reading and writing ---------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The cached part of a buffer: a view of shape (B, H, length, D)."""
        if name not in self._buffers:
            raise KeyError(f"KVCache has no buffer {name!r}; it has {list(self._buffers)}")
        return self._buffers[name][:, :, : self.length]

    def bind(self, module: nn.Module) -> None:
        """Record ``module`` as the layer that writes this cache (called by the layers' forward).

        A cache holds one layer's keys and values, and its length is the position of the next
        token: a second layer writing to it would read the first one's tokens and put its own at
        the wrong positions. Raises ``ValueError`` if another layer already wrote to it."""
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            self._owner = weakref.ref(module)
        elif owner is not module:
            raise ValueError(f"this cache holds {self.length} tokens written by another layer "
                             f"({type(owner).__name__} at {id(owner):#x}); each layer needs its own cache: make "
                             f"one per layer with layer.new_cache(), or call cache.reset() before reusing it")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_owner"] = None  # a weak reference cannot be pickled; the copy is bound again on first use
        return state

    def check_input(self, x: torch.Tensor, what: str = "input") -> None:
        """Raise if ``x`` (B, T, ...) cannot be used with this cache (batch, device, dtype, room)."""
        if x.device != self.device:
            raise ValueError(f"{what} is on {x.device} but the cache is on {self.device}; "
                             f"move one of them (e.g. x.to({str(self.device)!r}))")
        if x.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {x.dtype} but the cache holds {self.dtype}; "
                            f"cast one of them (e.g. x.to({self.dtype}))")
        if x.shape[0] != self.batch_size:
            raise ValueError(f"{what} has batch size {x.shape[0]} but the cache was made for "
                             f"{self.batch_size}")
        if self.length + x.shape[1] > self.max_len:
            raise ValueError(f"KV cache overflow: it holds {self.length} of {self.max_len} tokens and "
                             f"{x.shape[1]} more were given; make the cache with a larger max_len")

    def update(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Append ``t`` tokens to every buffer (each given as (B, H, t, D)); return the views of
        all cached tokens, new ones included, as ``{name: (B, H, length, D)}``."""
        if set(new) != set(self._buffers):
            raise ValueError(f"KVCache.update needs exactly the buffers {sorted(self._buffers)}, "
                             f"got {sorted(new)}")
        for name, value in new.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"KVCache.update: {name!r} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 4:
                raise ValueError(f"KVCache.update: {name!r} must be 4-D (batch, heads, tokens, dim), "
                                 f"got shape {tuple(value.shape)}")
        t = next(iter(new.values())).shape[2]
        for name, value in new.items():
            buf = self._buffers[name]
            if value.dim() != 4 or value.shape[:2] != buf.shape[:2] or value.shape[3] != buf.shape[3] \
                    or value.shape[2] != t:
                raise ValueError(f"KVCache.update: {name!r} must be (B={buf.shape[0]}, H={buf.shape[1]}, "
                                 f"t={t}, D={buf.shape[3]}), got {tuple(value.shape)}")
            self.check_input(value.transpose(1, 2), what=f"cache entry {name!r}")
        for name, value in new.items():
            self._buffers[name][:, :, self.length : self.length + t] = value
        self.length += t
        return {name: self.get(name) for name in self._buffers}

    def reset(self) -> None:
        """Forget every cached token (the memory stays allocated); any layer may then use it."""
        self.length = 0
        self._owner = None

    # --- accounting (from the real tensors) -------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies across all buffers (per layer)."""
        return sum(b.shape[1] * b.shape[3] * b.element_size() for b in self._buffers.values())

    @property
    def elements_per_token(self) -> int:
        """Elements one token of one sequence occupies across all buffers (per layer)."""
        return sum(b.shape[1] * b.shape[3] for b in self._buffers.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tokens: the filled part of every buffer, for the whole batch."""
        return sum(v.numel() * v.element_size() for v in (self.get(n) for n in self._buffers))

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated for the buffers (all ``max_len`` positions)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
