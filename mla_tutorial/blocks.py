"""Block bookkeeping for a paged KV cache: a free list and one block table per sequence.

A paged cache (vLLM's PagedAttention, Kwon et al. 2023) stores every sequence's cached tokens in
fixed-size blocks of ``block_size`` tokens (64 by default, FlashMLA's block) taken from one
shared pool. A sequence's *block table* lists its blocks in order: entry ``j`` holds its tokens
``[j·block_size, (j+1)·block_size)``. Blocks need not be contiguous or in order, so memory is
handed out a block at a time as sequences grow and returned the moment one finishes, with at most
one partly filled block per sequence.

:class:`BlockManager` does only the bookkeeping (which block belongs to whom); the tensors that
hold the cached values live in :mod:`mla_tutorial.paged`. A scheduler asks before it acts
(:meth:`BlockManager.can_allocate`, :meth:`BlockManager.can_append`,
:meth:`BlockManager.can_ever_hold`), so running out of blocks is a decision, not an exception;
acting without room raises :class:`OutOfBlocks` and changes nothing.

Defined in chapter 12; the serving engine's scheduler builds on it.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable, Sequence

import torch

__all__ = ["DEFAULT_BLOCK_SIZE", "OutOfBlocks", "BlockManager", "blocks_that_fit"]

#: FlashMLA's block size (tokens per block).
DEFAULT_BLOCK_SIZE = 64


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _tokens(owner: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: a number of tokens must be a non-negative int, got {value!r}")
    return value


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than an allocation or append needs.

    Attributes:
        needed: blocks the operation needed.
        free: blocks that were free.
        total: blocks in the pool.
    """

    def __init__(self, message: str, needed: int, free: int, total: int):
        super().__init__(message)
        self.needed, self.free, self.total = needed, free, total


class BlockManager:
    """Hands out blocks of ``block_size`` tokens from a pool of ``num_blocks``, one table per sequence.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block (64, FlashMLA's, by default).
        seed: ``None`` hands out blocks in order 0, 1, 2, ...; an int shuffles the free list with
            that seed first, so tables are visibly non-contiguous (tests and the chapter's drawing
            use it; a real pool ends up shuffled anyway once sequences finish at different times).

    Sequences are named by any hashable id. Lengths count tokens whose slots are reserved: after
    ``append(seq, T)`` the sequence's last ``T`` slots are where this step's new tokens go, and
    ``seq_lens`` includes them (the layout the paged attention functions expect).
    """

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, seed: int | None = None):
        self.num_blocks = _positive_int("BlockManager", "num_blocks", num_blocks)
        self.block_size = _positive_int("BlockManager", "block_size", block_size)
        if num_blocks >= 2**31:
            raise ValueError(f"BlockManager: num_blocks must be below 2**31 (block tables are int32), got {num_blocks}")
        # The free list is every block in order, then blocks as they are returned. Blocks never
        # handed out are counted, not listed, so a large pool costs nothing until it is used.
        self._order: list[int] | None = None
        if seed is not None:
            self._order = list(range(num_blocks))
            random.Random(seed).shuffle(self._order)
        self._fresh = 0                     # blocks [0, _fresh) of the order have been handed out once
        self._free: deque[int] = deque()    # blocks returned by free(), oldest first
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    def __repr__(self) -> str:
        return (f"BlockManager({self.num_free}/{self.num_blocks} blocks free, block_size={self.block_size}, "
                f"{len(self._tables)} sequences)")

    # --- questions a scheduler asks (never raise for lack of room) -------------------------------
    @property
    def num_free(self) -> int:
        """Blocks not held by any sequence."""
        return self.num_blocks - self._fresh + len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` tokens occupy: ceil(num_tokens / block_size)."""
        return -(-_tokens("BlockManager.blocks_for", num_tokens) // self.block_size)

    def can_ever_hold(self, num_tokens: int) -> bool:
        """Whether one sequence of ``num_tokens`` tokens fits in the pool even when it is empty."""
        return self.blocks_for(num_tokens) <= self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` tokens fits in the free blocks now."""
        return self.blocks_for(num_tokens) <= self.num_free

    def blocks_to_append(self, seq_id: Hashable, num_tokens: int = 1) -> int:
        """New blocks that appending ``num_tokens`` to ``seq_id`` takes (0 while its last block has room)."""
        length = self.seq_len(seq_id)
        return self.blocks_for(length + _tokens("BlockManager", num_tokens)) - len(self._tables[seq_id])

    def can_append(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
        """Whether ``seq_id`` can grow by ``num_tokens`` with the free blocks now."""
        return self.blocks_to_append(seq_id, num_tokens) <= self.num_free

    # --- acting ----------------------------------------------------------------------------------
    def allocate(self, seq_id: Hashable, num_tokens: int) -> torch.Tensor:
        """Start sequence ``seq_id`` with ``num_tokens`` tokens (its prompt); return their pool slots
        (see :meth:`slots`). Raises :class:`OutOfBlocks`, changing nothing, when they do not fit."""
        if seq_id in self._tables:
            raise ValueError(f"BlockManager.allocate: sequence {seq_id!r} already holds blocks; "
                             f"use append() to grow it or free() it first")
        _tokens("BlockManager.allocate", num_tokens)
        self._tables[seq_id], self._lens[seq_id] = [], 0
        try:
            return self.append(seq_id, num_tokens)
        except OutOfBlocks:
            del self._tables[seq_id], self._lens[seq_id]
            raise

    def append(self, seq_id: Hashable, num_tokens: int = 1) -> torch.Tensor:
        """Reserve slots for ``num_tokens`` more tokens of ``seq_id`` (taking new blocks as needed);
        return their pool slots. Raises :class:`OutOfBlocks`, changing nothing, without room."""
        needed = self.blocks_to_append(seq_id, num_tokens)
        if needed > self.num_free:
            length = self._lens[seq_id] + num_tokens
            if not self.can_ever_hold(length):
                hint = (f"a sequence of {length} tokens needs {self.blocks_for(length)} blocks and the pool has "
                        f"{self.num_blocks} in all: it can never fit; make the pool larger or the request shorter")
            else:
                hint = ("ask can_allocate()/can_append() first, free or preempt other sequences, "
                        "or make the pool larger (num_blocks)")
            raise OutOfBlocks(f"out of KV-cache blocks: sequence {seq_id!r} needs {needed} more block(s) of "
                              f"{self.block_size} tokens, {self.num_free} of {self.num_blocks} are free; {hint}",
                              needed, self.num_free, self.num_blocks)
        self._tables[seq_id].extend(self._take() for _ in range(needed))
        start = self._lens[seq_id]
        self._lens[seq_id] = start + num_tokens
        return self.slots(seq_id, start, start + num_tokens)

    def _take(self) -> int:
        if self._fresh < self.num_blocks:
            self._fresh += 1
            return self._fresh - 1 if self._order is None else self._order[self._fresh - 1]
        return self._free.popleft()

    def free(self, seq_id: Hashable) -> None:
        """Return every block of ``seq_id`` to the pool and forget the sequence."""
        self._check(seq_id)
        self._free.extend(self._tables.pop(seq_id))
        del self._lens[seq_id]

    # --- reading the tables ----------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def _check(self, seq_id: Hashable) -> None:
        if seq_id not in self._tables:
            raise KeyError(f"BlockManager: no sequence {seq_id!r} (allocate it first); it has {list(self._tables)[:8]}")

    def seq_len(self, seq_id: Hashable) -> int:
        """Tokens reserved for ``seq_id``."""
        self._check(seq_id)
        return self._lens[seq_id]

    def table(self, seq_id: Hashable) -> list[int]:
        """The blocks of ``seq_id``, in token order (a copy)."""
        self._check(seq_id)
        return list(self._tables[seq_id])

    def slots(self, seq_id: Hashable, start: int, stop: int) -> torch.Tensor:
        """Pool slots (int64 ``block · block_size + offset``) of the tokens at positions
        ``[start, stop)`` of ``seq_id``: where their rows live in the pool seen as
        ``(num_blocks · block_size, ...)``."""
        if not 0 <= start <= stop <= self.seq_len(seq_id):
            raise ValueError(f"BlockManager.slots: positions [{start}, {stop}) are outside sequence {seq_id!r}'s "
                             f"{self._lens[seq_id]} tokens")
        table, size = self._tables[seq_id], self.block_size   # plain ints: a decode step asks for one slot
        return torch.tensor([table[p // size] * size + p % size for p in range(start, stop)], dtype=torch.int64)

    def last_slots(self, seq_ids: Sequence[Hashable], num_tokens: int) -> torch.Tensor:
        """(B, num_tokens) slots of each sequence's last ``num_tokens`` tokens (this step's new ones)."""
        return torch.stack([self.slots(s, self.seq_len(s) - num_tokens, self.seq_len(s)) for s in seq_ids]) \
            if seq_ids else torch.zeros(0, num_tokens, dtype=torch.int64)

    def last_positions(self, seq_ids: Sequence[Hashable], num_tokens: int) -> torch.Tensor:
        """(B, num_tokens) int64 positions of each sequence's last ``num_tokens`` tokens."""
        lens = torch.tensor([self.seq_len(s) for s in seq_ids], dtype=torch.int64)
        return lens[:, None] - num_tokens + torch.arange(num_tokens)

    def seq_lens(self, seq_ids: Sequence[Hashable], device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 (B,): tokens of each sequence, this step's new ones included."""
        return torch.tensor([self.seq_len(s) for s in seq_ids], dtype=torch.int32, device=device)

    def block_tables(self, seq_ids: Sequence[Hashable], width: int | None = None, fill: int = 0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 (B, width) block tables; entries past a sequence's last block are ``fill`` (never
        read by the paged attention functions). ``width`` defaults to the longest table (at least 1)."""
        tables = [self.table(s) for s in seq_ids]
        longest = max((len(t) for t in tables), default=0)
        width = max(longest, 1) if width is None else width
        if width < longest:
            raise ValueError(f"BlockManager.block_tables: width {width} is less than the longest table ({longest})")
        rows = [t + [fill] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32, device=device).view(len(rows), width)


def blocks_that_fit(budget_bytes: float, bytes_per_token: float, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """How many blocks of ``block_size`` tokens a memory budget holds, at ``bytes_per_token``
    (all layers): how a serving engine sizes its pool from the memory left after the weights."""
    if not budget_bytes >= 0 or not bytes_per_token > 0:
        raise ValueError(f"blocks_that_fit: need budget_bytes >= 0 and bytes_per_token > 0, got "
                         f"{budget_bytes!r} and {bytes_per_token!r}")
    return int(budget_bytes // (bytes_per_token * _positive_int("blocks_that_fit", "block_size", block_size)))
