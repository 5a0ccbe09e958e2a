"""Training data made in code or shipped with the package: nothing is downloaded.

* :class:`MQAR`: multi-query associative recall (Arora et al. 2023, "Zoology"). A sequence lists
  ``num_pairs`` key-value pairs, then asks for every key again, in a shuffled order, among filler
  tokens; the model must answer each query with its value. The answer is known by construction,
  so accuracy measures what the model's cache can hold and find.
* :class:`TextCorpus`: the book's own prose (its Markdown pages and the Markdown cells of its
  notebooks), as bytes, with a held-out split. The text is a frozen snapshot shipped with the
  package (``mla_tutorial/corpus/book_prose.txt``, built by ``scripts/build_corpus.py``).

Both give batches with :meth:`batch(split, batch_size, generator)`: ``(inputs, targets)``, two
(B, T) int64 tensors, where ``targets[b, t]`` is the token to predict after ``inputs[b, :t + 1]``
and -100 marks positions that are not scored.

Defined in chapter 09.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass

import torch

__all__ = ["MQAR", "TextCorpus", "CORPUS_PATH", "IGNORE_INDEX", "encode", "decode"]

IGNORE_INDEX = -100
SPLITS = ("train", "val")
CORPUS_PATH = pathlib.Path(__file__).resolve().parent / "corpus" / "book_prose.txt"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


# --- multi-query associative recall ------------------------------------------------------------
@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall: ``num_pairs`` key-value pairs in sequences of ``seq_len`` tokens.

    Vocabulary: keys ``0 .. num_keys - 1``, values ``num_keys .. num_keys + num_values - 1``, then
    ``num_filler`` filler tokens. A sequence is

        k_1 v_1 k_2 v_2 ... k_N v_N | f f k_3 v_3 f k_1 v_1 f f ... k_2 v_2 f

    the N pairs (distinct keys, distinct values), then a query section in which every key appears
    once more, followed by its value, at random pair-aligned slots among filler tokens. The model
    is scored only at the queried keys, where the target is the key's value: it must find the key
    earlier in its context (its cache, when decoding) and read the token after it.

    ``num_pairs`` and ``seq_len`` may be tuples: each batch then draws a length, and each
    sequence a number of pairs that fits it (``4 N <= seq_len``), training on several difficulties
    at once as Zoology does. :meth:`batch` takes both explicitly for evaluation.

    ``easy_steps``: a curriculum. Training batches before this step hold only the smallest number
    of pairs, in the shortest sequences. Small models trained on the full mixture from the start can sit for a long time at
    "answer with some value from the context" (1/N accuracy); on two pairs they find the recall
    circuit within a few hundred steps, and it then carries over to more pairs.
    """

    num_pairs: int | tuple[int, ...] = 8
    seq_len: int | tuple[int, ...] = 64
    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 8
    easy_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.easy_steps, bool) or not isinstance(self.easy_steps, int) or self.easy_steps < 0:
            raise ValueError(f"MQAR.easy_steps must be a non-negative int, got {self.easy_steps!r}")
        for name in ("num_keys", "num_values", "num_filler"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MQAR.{name} must be a positive int, got {v!r}")
        for name, values in (("num_pairs", self.pair_counts), ("seq_len", self.seq_lens)):
            if not values or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in values):
                raise ValueError(f"MQAR.{name} must be a positive int or a tuple of them, got "
                                 f"{getattr(self, name)!r}")
        n = max(self.pair_counts)
        if n > min(self.num_keys, self.num_values):
            raise ValueError(f"MQAR: {n} pairs need at least {n} distinct keys and values; "
                             f"num_keys={self.num_keys}, num_values={self.num_values}")
        for L in self.seq_lens:
            if 4 * min(self.pair_counts) > L:
                raise ValueError(f"MQAR: seq_len {L} is too short for {min(self.pair_counts)} pairs "
                                 f"(2 tokens per pair, then 2 per query: at least {4 * min(self.pair_counts)})")
        if 4 * n > self.max_seq_len:
            raise ValueError(f"MQAR: {n} pairs need seq_len >= {4 * n} (2 tokens per pair, then 2 per query); "
                             f"the longest is {self.max_seq_len}")

    @property
    def pair_counts(self) -> tuple[int, ...]:
        return tuple(self.num_pairs) if isinstance(self.num_pairs, (tuple, list)) else (self.num_pairs,)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(self.seq_len) if isinstance(self.seq_len, (tuple, list)) else (self.seq_len,)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_filler

    @staticmethod
    def chance_accuracy(num_pairs: int) -> float:
        """Accuracy of guessing one of the values seen in the context: 1 / num_pairs."""
        return 1 / num_pairs

    def batch(self, split: str, batch_size: int, generator: torch.Generator | None = None,
              step: int | None = None, num_pairs: int | None = None,
              seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each (B, L). Every split is drawn from the same distribution
        (fresh random sequences); pass differently seeded generators for training and evaluation.

        ``step``: the training step, for the curriculum (``easy_steps``); ``seq_len`` fixes this
        batch's length L (default: drawn from the configured lengths); ``num_pairs`` fixes every
        sequence's number of pairs (default: drawn for each sequence from the configured counts
        that fit L, so one batch mixes easy and hard sequences)."""
        _check_split(split)
        _check_batch_size(batch_size)
        g = generator
        if split == "train" and step is not None and step < self.easy_steps and num_pairs is None:
            num_pairs, seq_len = min(self.pair_counts), min(self.seq_lens)
        if seq_len is None:
            lens = self.seq_lens if num_pairs is None else [L for L in self.seq_lens if 4 * num_pairs <= L]
            L = lens[int(torch.randint(len(lens), (1,), generator=g))] if len(lens) > 1 else (lens or [0])[0]
        else:
            L = seq_len
        if num_pairs is not None:
            MQAR(num_pairs, L, self.num_keys, self.num_values, self.num_filler)  # validates this batch's sizes
            return self._sequences(batch_size, num_pairs, L, g)
        fits = [n for n in self.pair_counts if 4 * n <= L]
        # P(N) proportional to 1/N: each count contributes about as many scored queries as the others
        weights = torch.tensor([1 / n for n in fits])
        counts = torch.bincount(torch.multinomial(weights, batch_size, replacement=True, generator=g),
                                minlength=len(fits))
        parts = [self._sequences(int(k), n, L, g) for n, k in zip(fits, counts.tolist()) if k]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _sequences(self, B: int, N: int, L: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """B sequences of length L with N pairs each."""
        keys = torch.rand(B, self.num_keys, generator=g).argsort(-1)[:, :N]                      # (B, N) distinct
        values = self.num_keys + torch.rand(B, self.num_values, generator=g).argsort(-1)[:, :N]  # (B, N) distinct
        first_filler = self.num_keys + self.num_values
        seq = torch.randint(first_filler, self.vocab_size, (B, L), generator=g)                  # filler everywhere
        seq[:, 0:2 * N:2], seq[:, 1:2 * N:2] = keys, values                                       # the pairs
        # the query section: (L - 2N) // 2 pair-aligned slots; N of them, in order, hold the queries
        slots = (L - 2 * N) // 2
        chosen = torch.rand(B, slots, generator=g).argsort(-1)[:, :N].sort(-1).values             # (B, N)
        order = torch.rand(B, N, generator=g).argsort(-1)                                        # which pair is asked when
        q_pos = 2 * N + 2 * chosen                                                               # (B, N) key positions
        seq.scatter_(1, q_pos, keys.gather(1, order))
        seq.scatter_(1, q_pos + 1, values.gather(1, order))
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        targets.scatter_(1, q_pos, values.gather(1, order))
        return seq, targets


# --- the book's prose, as bytes ---------------------------------------------------------------------
def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text``: token ids in 0..255."""
    return list(text.encode("utf-8"))


def decode(tokens: list[int] | torch.Tensor) -> str:
    """Text from byte tokens; bytes that do not form valid UTF-8 become U+FFFD."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    return bytes(tokens).decode("utf-8", errors="replace")


class TextCorpus:
    """Byte-level language modelling on the book's prose.

    The text is cut into blocks of ``block_bytes`` (2,048) bytes; every ``val_every``-th block (the
    10th, 20th, ...) is held out for validation, so both splits cover every chapter. A training
    batch takes ``seq_len + 1`` consecutive bytes at random offsets within the training blocks;
    evaluation batches are drawn the same way from the held-out blocks (with an evaluation
    generator), or, with :meth:`val_windows`, cover the held-out text in order.

    Args:
        seq_len: tokens per sequence (targets are the next bytes).
        path: the corpus file (default: the snapshot shipped with the package).
    """

    vocab_size = 256

    def __init__(self, seq_len: int = 128, path: str | pathlib.Path | None = None, block_bytes: int = 2048,
                 val_every: int = 10):
        for name, v in (("seq_len", seq_len), ("block_bytes", block_bytes), ("val_every", val_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TextCorpus.{name} must be a positive int, got {v!r}")
        if val_every < 2:
            raise ValueError("TextCorpus.val_every must be at least 2 (1 would hold out everything)")
        if seq_len + 1 > block_bytes:
            raise ValueError(f"TextCorpus: seq_len + 1 ({seq_len + 1}) must fit in a block of {block_bytes} bytes")
        self.path = pathlib.Path(path) if path is not None else CORPUS_PATH
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file {self.path} not found; build it with scripts/build_corpus.py")
        raw = self.path.read_bytes()
        self.seq_len, self.block_bytes, self.val_every = seq_len, block_bytes, val_every
        self.sha256 = hashlib.sha256(raw).hexdigest()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        n_blocks = len(data) // block_bytes
        if n_blocks < val_every:
            raise ValueError(f"corpus {self.path} has {len(data)} bytes: too short for {val_every} blocks of "
                             f"{block_bytes} bytes")
        blocks = data[: n_blocks * block_bytes].view(n_blocks, block_bytes)
        is_val = (torch.arange(n_blocks) % val_every) == val_every - 1
        self.splits = {"train": blocks[~is_val], "val": blocks[is_val]}                  # (n, block_bytes) each

    @property
    def max_seq_len(self) -> int:
        return self.seq_len

    def __repr__(self) -> str:
        return (f"TextCorpus({self.path.name}: {self.num_bytes('train'):,} training bytes, "
                f"{self.num_bytes('val'):,} held out, seq_len {self.seq_len})")

    def num_bytes(self, split: str) -> int:
        _check_split(split)
        return self.splits[split].numel()

    def text(self, split: str) -> str:
        """The split's text (blocks joined in order)."""
        _check_split(split)
        return decode(self.splits[split].flatten())

    def batch(self, split: str, batch_size: int, generator: torch.Generator | None = None,
              step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of shape (B, seq_len): windows at random offsets within random blocks.
        (``step`` is accepted for the :class:`~mla_tutorial.train.Task` interface and ignored.)"""
        _check_split(split)
        _check_batch_size(batch_size)
        blocks = self.splits[split]
        b = torch.randint(len(blocks), (batch_size,), generator=generator)
        o = torch.randint(self.block_bytes - self.seq_len, (batch_size,), generator=generator)
        idx = o[:, None] + torch.arange(self.seq_len + 1)                              # (B, seq_len + 1)
        window = blocks[b[:, None], idx]
        return window[:, :-1], window[:, 1:]

    def val_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held-out block cut into non-overlapping windows: a fixed validation set."""
        blocks = self.splits["val"]
        n = (self.block_bytes - 1) // self.seq_len
        starts = torch.arange(n) * self.seq_len
        idx = starts[:, None] + torch.arange(self.seq_len + 1)                         # (n, seq_len + 1)
        window = blocks[:, idx].flatten(0, 1)                                          # (blocks * n, seq_len + 1)
        return window[:, :-1], window[:, 1:]

    def manifest(self) -> dict:
        """The snapshot's description written by ``scripts/build_corpus.py`` (sources, date, hash)."""
        path = self.path.with_suffix(".json")
        return json.loads(path.read_text()) if path.is_file() else {}
