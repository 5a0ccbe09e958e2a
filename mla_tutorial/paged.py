"""The paged KV cache: pools of fixed-size blocks, and attention that reads through block tables.

A pool holds every sequence's cached rows in blocks of ``block_size`` tokens; a
:class:`~mla_tutorial.blocks.BlockManager` says which block belongs to which sequence. One pool
per layer (all layers share the manager's tables):

* standard attention (MHA / GQA / MQA), :class:`PagedKVCache`: ``k`` and ``v`` pools of shape
  ``(num_blocks, block_size, n_kv, d_h)``;
* MLA, :class:`PagedLatentCache`: one pool ``(num_blocks, block_size, row_width)`` whose rows are
  ``[c_KV (d_c), k_R (d_h_R)]`` (576 values for DeepSeek-V3, ``k_R`` already rotated), stored in a
  :mod:`~mla_tutorial.quant` format: bf16/fp16/fp32 values, or bytes (``torch.uint8``) for the
  quantized ones (FlashMLA's 656-byte FP8 row, int8, int6), dequantized when read.

A step of a batch of sequences of different lengths: reserve slots for the ``T`` new tokens
(``manager.append``), compute the new tokens' keys/values or latents at their own positions
(``layer.project(x, manager.last_positions(seqs, T))``), write them (:meth:`write` at
``manager.last_slots(seqs, T)``), then attend with :func:`paged_attention` or, for MLA's absorbed
decode, :func:`paged_absorbed_attention` over ``manager.block_tables(seqs)`` and
``manager.seq_lens(seqs)``. ``seq_lens`` counts the new tokens: query ``t`` of sequence ``b`` sits
at position ``seq_lens[b] - T + t`` and sees the keys at positions up to its own.

These functions are the PyTorch reference (the oracle of the Triton decode kernel): they gather
each sequence's rows through its table into a padded batch (:func:`gather_rows`) and call the
package's :func:`~mla_tutorial.attention.attention`, in fp32. Rows a sequence does not own never
reach its output, even when they hold NaN.

Defined in chapter 12.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from .attention import _allowed, _scores_fp32, attention
from .device import as_device, available_memory, check_memory
from .blocks import DEFAULT_BLOCK_SIZE, BlockManager, OutOfBlocks, blocks_that_fit
from .quant import TILE, LatentFormat, latent_format

__all__ = [
    "DEFAULT_BLOCK_SIZE", "BlockManager", "OutOfBlocks", "blocks_that_fit", "PagedKVCache", "PagedLatentCache",
    "gather_rows", "paged_attention", "paged_absorbed_attention", "paged_absorbed_attention_fp8",
]


# --- the pools -----------------------------------------------------------------------------------
class _PagedPools:
    """Per-layer pool tensors sized by a :class:`BlockManager` (shared code of the two caches)."""

    def __init__(self, manager: BlockManager, num_layers: int, rows: dict[str, tuple[int, ...]],
                 pool_dtype: torch.dtype, device: torch.device | str | None, fill: float = 0.0):
        owner = type(self).__name__
        if not isinstance(manager, BlockManager):
            raise TypeError(f"{owner} needs a BlockManager, got {type(manager).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"{owner}: num_layers must be a positive int, got {num_layers!r}")
        self.manager, self.num_layers = manager, num_layers
        device = as_device(device or "cpu", owner)
        elem = torch.empty((), dtype=pool_dtype).element_size()
        self.bytes_per_token = num_layers * elem * sum(math.prod(r) for r in rows.values())
        have = available_memory(device)
        fits = "fewer" if have is None else f"at most {blocks_that_fit(have, self.bytes_per_token, manager.block_size):,}"
        check_memory(self.bytes_per_token * manager.capacity_tokens, device,
                     f"{owner}: {manager.num_blocks:,} blocks of {manager.block_size} tokens x "
                     f"{self.bytes_per_token:,} bytes per token", f"give the BlockManager {fits} blocks (blocks_that_fit)")
        shape = (manager.num_blocks, manager.block_size)
        self.pools: list[dict[str, torch.Tensor]] = [
            {name: torch.full(shape + row, fill, dtype=pool_dtype, device=device) for name, row in rows.items()}
            for _ in range(num_layers)]

    @property
    def device(self) -> torch.device:
        return next(iter(self.pools[0].values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of all pools (every block, used or free, every layer)."""
        return sum(p.numel() * p.element_size() for layer in self.pools for p in layer.values())

    def _write(self, layer: int, slots: torch.Tensor, name: str, rows: torch.Tensor) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"{type(self).__name__}: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        pool = self.pools[layer][name]
        row = pool.shape[2:]
        if not isinstance(slots, torch.Tensor) or slots.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"slots must be an int tensor from BlockManager.slots()/last_slots(), got "
                            f"{getattr(slots, 'dtype', type(slots).__name__)}")
        if tuple(rows.shape) != tuple(slots.shape) + tuple(row):
            raise ValueError(f"{type(self).__name__}.write: {name} must be (*slots.shape, {', '.join(map(str, row))}) "
                             f"= {tuple(slots.shape) + tuple(row)}, got {tuple(rows.shape)}")
        flat = slots.reshape(-1).to(device=pool.device, dtype=torch.int64)
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < pool.shape[0] * pool.shape[1]):
            raise ValueError(f"slots must lie in [0, {pool.shape[0] * pool.shape[1]}): num_blocks x block_size")
        pool.view(-1, *row).index_copy_(0, flat, rows.reshape(-1, *row).to(device=pool.device, dtype=pool.dtype))


class PagedKVCache(_PagedPools):
    """Paged K and V for standard attention: pools ``k`` and ``v`` of shape
    ``(num_blocks, block_size, num_kv_heads, head_dim)`` per layer.

    Args:
        manager: the block tables.
        num_kv_heads, head_dim: what one token holds per layer (n_kv x d_h for K and again for V).
        num_layers: layers (one pool pair each).
        dtype, device: of the pools.
    """

    def __init__(self, manager: BlockManager, num_kv_heads: int, head_dim: int, num_layers: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"PagedKVCache: dtype must be a floating torch.dtype, got {dtype!r}")
        row = (num_kv_heads, head_dim)
        super().__init__(manager, num_layers, {"k": row, "v": row}, dtype, device)
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype

    def __repr__(self) -> str:
        return (f"PagedKVCache({self.num_layers} layers, k/v {tuple(self.pools[0]['k'].shape)}, {self.dtype}, "
                f"{self.bytes_per_token:,} B/token)")

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows ``k`` and ``v`` (*slots.shape, n_kv, d_h) at ``slots`` of ``layer``'s pools.
        From a layer's ``project`` output (B, n_kv, T, d_h), pass ``k.transpose(1, 2)``."""
        self._write(layer, slots, "k", k)
        self._write(layer, slots, "v", v)

    def attend(self, layer: int, q: torch.Tensor, seq_ids: Sequence[Hashable], scale: float,
               return_lse: bool = False):
        """:func:`paged_attention` of ``q`` (B, T, n_h, d_h) over the sequences' cached tokens."""
        m = self.manager
        pools = self.pools[layer]
        return paged_attention(q, pools["k"], pools["v"], m.block_tables(seq_ids, device=q.device),
                               m.seq_lens(seq_ids, device=q.device), scale, return_lse=return_lse)


class PagedLatentCache(_PagedPools):
    """MLA's paged latent cache: one pool ``(num_blocks, block_size, row_width)`` per layer,
    each row one token's ``[c_KV, k_R]`` in the format ``fmt`` (see :mod:`mla_tutorial.quant`).

    Args:
        manager: the block tables.
        d_c, d_h_R: latent and RoPE-key widths (512 and 64 for DeepSeek-V3).
        num_layers: layers (one pool each).
        fmt: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a quantized format: ``"fp8"`` (FlashMLA's 656-byte
            row), ``"int8"``, ``"int6"``.
        tile: values per quantization scale (128, FlashMLA's); d_c must be a multiple.
        device: of the pools.

    Unused rows are filled with NaN in float formats: they must never reach an output.
    """

    def __init__(self, manager: BlockManager, d_c: int, d_h_R: int, num_layers: int = 1,
                 fmt: str | torch.dtype = "bf16", tile: int = TILE, device: torch.device | str | None = None):
        self.format: LatentFormat = latent_format(fmt)
        width = self.format.row_width(d_c, d_h_R, tile)  # validates d_c, d_h_R and tile
        fill = 0 if self.format.quantized else float("nan")
        super().__init__(manager, num_layers, {"latent": (width,)}, self.format.pool_dtype, device, fill)
        self.d_c, self.d_h_R, self.tile = d_c, d_h_R, tile

    def __repr__(self) -> str:
        return (f"PagedLatentCache({self.num_layers} layers, {self.format.name}, pool "
                f"{tuple(self.pools[0]['latent'].shape)}, {self.bytes_per_token:,} B/token)")

    def pool(self, layer: int) -> torch.Tensor:
        """``layer``'s pool tensor (the ``kv_pool`` of :func:`paged_absorbed_attention`)."""
        return self.pools[layer]["latent"]

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """Store rows ``latent`` (*slots.shape, d_c + d_h_R), quantized to the pool's format, at ``slots``.
        From a layer's ``project`` output (B, 1, T, d_c + d_h_R), pass ``latent[:, 0]``."""
        width = self.d_c + self.d_h_R
        if not isinstance(latent, torch.Tensor) or latent.shape[-1:] != (width,):
            raise ValueError(f"PagedLatentCache.write: latent rows must end in d_c + d_h_R = {width} values, got "
                             f"{tuple(getattr(latent, 'shape', ()))}")
        self._write(layer, slots, "latent", self.format.pack(latent, self.d_c, self.tile))

    def attend(self, layer: int, q_lat: torch.Tensor, q_R: torch.Tensor, seq_ids: Sequence[Hashable],
               scale: float, return_lse: bool = True):
        """:func:`paged_absorbed_attention` over the sequences' cached latents -> (o_lat, lse)."""
        m = self.manager
        return paged_absorbed_attention(q_lat, q_R, self.pool(layer), m.block_tables(seq_ids, device=q_lat.device),
                                        m.seq_lens(seq_ids, device=q_lat.device), scale, kv_format=self.format,
                                        tile=self.tile, return_lse=return_lse)


# --- reading through block tables ----------------------------------------------------------------
def _check_tables(pool: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, batch: int) -> None:
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64) \
            or block_table.dim() != 2:
        raise TypeError(f"block_table must be an int32 tensor (batch, max_blocks_per_seq), got "
                        f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                        f"{tuple(getattr(block_table, 'shape', ()))}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in (torch.int32, torch.int64) \
            or seq_lens.dim() != 1:
        raise TypeError(f"seq_lens must be an int32 tensor (batch,), got "
                        f"{getattr(seq_lens, 'dtype', type(seq_lens).__name__)} {tuple(getattr(seq_lens, 'shape', ()))}")
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"batch sizes differ: queries {batch}, block_table {block_table.shape[0]}, "
                         f"seq_lens {seq_lens.shape[0]}")
    if not (pool.device == block_table.device == seq_lens.device):
        raise ValueError(f"the pool ({pool.device}), block_table ({block_table.device}) and seq_lens "
                         f"({seq_lens.device}) must be on one device")
    if batch == 0:
        return
    num_blocks, block_size = pool.shape[0], pool.shape[1]
    if int(seq_lens.min()) < 0:
        raise ValueError(f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    longest = int(seq_lens.max())
    if longest > block_table.shape[1] * block_size:
        raise ValueError(f"a sequence of {longest} tokens needs {-(-longest // block_size)} blocks of {block_size}, "
                         f"but block_table has {block_table.shape[1]} columns")
    used = torch.arange(block_table.shape[1], device=block_table.device) * block_size < seq_lens[:, None].long()
    entries = block_table[used]
    if entries.numel() and not (0 <= int(entries.min()) and int(entries.max()) < num_blocks):
        raise ValueError(f"block_table entries of used blocks must lie in [0, {num_blocks}) (the pool's blocks), "
                         f"got values from {int(entries.min())} to {int(entries.max())}")


def gather_rows(pool: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's cached rows, read through its block table into a padded batch.

    ``pool`` (num_blocks, block_size, *row); returns ``rows`` (B, S, *row) and ``key_mask``
    (B, S) bool with S = ``length`` (default: the longest sequence). Sequence ``b``'s tokens fill
    the *last* ``seq_lens[b]`` places, so every sequence's newest tokens are the last of S (the
    alignment :func:`~mla_tutorial.attention.attention` assumes for its causal mask); the places
    before them are padding (``key_mask`` False) read from block 0 whatever it holds. Only the
    blocks a sequence owns are read: table entries past them may hold anything.
    """
    batch = block_table.shape[0]
    _check_tables(pool, block_table, seq_lens, batch)
    block_size = pool.shape[1]
    S = int(seq_lens.max()) if batch else 0
    S = S if length is None else length
    if S < (int(seq_lens.max()) if batch else 0):
        raise ValueError(f"gather_rows: length {S} is shorter than the longest sequence ({int(seq_lens.max())})")
    lens = seq_lens.long()[:, None]                                                  # (B, 1)
    pos = torch.arange(S, device=pool.device)[None, :] - (S - lens)                  # (B, S) token positions
    key_mask = pos >= 0
    pos = pos.clamp(min=0)
    blocks = block_table.long().gather(1, (pos // block_size).clamp(max=block_table.shape[1] - 1))
    slots = torch.where(key_mask, blocks * block_size + pos % block_size, 0)        # (B, S)
    rows = pool.reshape(-1, *pool.shape[2:])[slots.reshape(-1)]
    return rows.view(batch, S, *pool.shape[2:]), key_mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
            return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of q (B, Hq, T, D) over right-aligned keys (B, Hkv, S, D) with key_mask (B, S),
    in fp32; also the natural-log sum of exp of the scaled scores (B, T, Hq), -inf for a query
    that may see no key."""
    B, Hq, T, _ = q.shape
    if B == 0:
        return q.new_zeros(0, T, Hq, v.shape[-1]), q.new_zeros(0, T, Hq, dtype=torch.float32)
    q, k, v = q.float(), k.float(), v.float()
    out = attention(q, k, v, scale, causal=True, key_mask=key_mask).transpose(1, 2)  # (B, T, Hq, Dv)
    if not return_lse:
        return out, None
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scores = _scores_fp32(q.reshape(B, Hkv, g * T, -1), k).view(B, Hkv, g, T, S) * scale
    allowed = _allowed(B, T, S, True, key_mask, q.device)                            # (B, 1, T, S)
    lse = scores.masked_fill(~allowed[:, :, None], float("-inf")).logsumexp(-1)      # (B, Hkv, g, T)
    return out, lse.view(B, Hq, T).transpose(1, 2)


def _check_queries(who: str, scale: float, **qs: torch.Tensor) -> None:
    for name, t in qs.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
            raise TypeError(f"{who}: {name} must be a floating-point tensor (batch, T, heads, dim), got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.shape[1] == 0:
            raise ValueError(f"{who}: {name} has no query tokens (T = 0); a step has T >= 1")
    first = next(iter(qs.values()))
    for name, t in qs.items():
        if t.shape[:3] != first.shape[:3] or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{who}: {', '.join(qs)} must share (batch, T, heads), dtype and device; got "
                             + ", ".join(f"{n} {tuple(x.shape)} {x.dtype}" for n, x in qs.items()))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{who}: scale must be a positive finite number, got {scale!r}")


def _gather_for(who: str, q: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_rows` padded to at least the T query tokens (a sequence may hold fewer)."""
    if q.device != pool.device:
        raise ValueError(f"{who}: the queries are on {q.device}, the pool on {pool.device}")
    return gather_rows(pool, block_table, seq_lens, max(int(seq_lens.max()) if seq_lens.numel() else 0, q.shape[1]))


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, return_lse: bool = False):
    """Attention of T new query tokens per sequence over paged K and V (MHA / GQA / MQA).

    Shapes: ``q`` (B, T, n_h, d_h); ``k_pool``, ``v_pool`` (num_blocks, block_size, n_kv, d_h) with
    n_h a multiple of n_kv; ``block_table`` int32 (B, max_blocks); ``seq_lens`` int32 (B,), new
    tokens included. Returns the output (B, T, n_h, d_v) in q's dtype, and with ``return_lse``
    also the fp32 LSE (B, T, n_h). Computed in fp32; a query that may see no key gets zeros."""
    _check_queries("paged_attention", scale, q=q)
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or not pool.is_floating_point():
            raise TypeError(f"paged_attention: {name} must be a float tensor (num_blocks, block_size, n_kv, d_h), "
                            f"got {getattr(pool, 'dtype', type(pool).__name__)} {tuple(getattr(pool, 'shape', ()))}")
    if k_pool.shape[:3] != v_pool.shape[:3] or q.shape[-1] != k_pool.shape[-1]:
        raise ValueError(f"paged_attention: k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} must share "
                         f"(blocks, block_size, n_kv), and q's width {q.shape[-1]} must be k's")
    k, mask = _gather_for("paged_attention", q, k_pool, block_table, seq_lens)          # (B, S, n_kv, d_h)
    v, _ = gather_rows(v_pool, block_table, seq_lens, k.shape[1])
    out, lse = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, return_lse)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def paged_absorbed_attention(q_lat: torch.Tensor, q_R: torch.Tensor, kv_pool: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                             kv_format: str | LatentFormat | None = None, tile: int = TILE,
                             return_lse: bool = True):
    """MLA's absorbed decode over a paged latent pool -> ``(o_lat, lse)``.

    Shapes: ``q_lat`` (B, T, n_h, d_c) = W_UKᵀ q_C per head; ``q_R`` (B, T, n_h, d_h_R), RoPE
    applied; ``kv_pool`` (num_blocks, block_size, row_width) of rows [c_KV, k_R];
    ``block_table`` int32 (B, max_blocks); ``seq_lens`` int32 (B,), the T new tokens included.
    Query t of sequence b, at position ``seq_lens[b] - T + t``, scores key position s as
    ``scale · (q_lat·c_KV[s] + q_R·k_R[s])`` in fp32 for s up to its own position.

    Returns ``o_lat`` (B, T, n_h, d_c): the softmax-weighted sum of c_KV, fp32-accumulated and
    returned in q_lat's dtype (apply W_UV and W_O next), and ``lse`` (B, T, n_h) fp32: the natural
    log-sum-exp of the scaled scores. A query that may see no key gets zeros and ``-inf``.

    ``kv_format``: the pool's :mod:`~mla_tutorial.quant` format; ``None`` means a float pool read
    as it is; a ``torch.uint8`` pool needs its format named (``"fp8"``, ``"int8"``, ``"int6"``),
    and its rows are dequantized on read. ``return_lse=False`` skips the LSE (returned as None).
    """
    _check_queries("paged_absorbed_attention", scale, q_lat=q_lat, q_R=q_R)
    if not isinstance(kv_pool, torch.Tensor) or kv_pool.dim() != 3:
        raise TypeError(f"paged_absorbed_attention: kv_pool must be a tensor (num_blocks, block_size, row_width), "
                        f"got {tuple(getattr(kv_pool, 'shape', ())) or type(kv_pool).__name__}")
    if kv_format is None and not kv_pool.is_floating_point():
        raise ValueError(f"paged_absorbed_attention: a {kv_pool.dtype} pool holds quantized rows; name its format, "
                         f"e.g. kv_format='fp8' (FlashMLA's 656-byte row), 'int8' or 'int6'")
    fmt = latent_format(kv_pool.dtype if kv_format is None else kv_format)
    d_c, d_R = q_lat.shape[-1], q_R.shape[-1]
    width = fmt.row_width(d_c, d_R, tile)
    if kv_pool.dtype != fmt.pool_dtype or kv_pool.shape[-1] != width:
        raise ValueError(f"paged_absorbed_attention: a {fmt.name} pool for d_c = {d_c}, d_h_R = {d_R} has rows of "
                         f"{width} {fmt.pool_dtype}, got {kv_pool.shape[-1]} {kv_pool.dtype}")
    rows, mask = _gather_for("paged_absorbed_attention", q_lat, kv_pool, block_table, seq_lens)  # (B, S, width)
    latent = fmt.unpack(rows, d_c, tile, torch.float32)[:, None]                       # (B, 1, S, d_c + d_h_R)
    q = torch.cat([q_lat, q_R], dim=-1).transpose(1, 2)                                # (B, n_h, T, d_c + d_h_R)
    # MQA with one key/value head: the key is the whole row, the value its first d_c values (c_KV)
    o_lat, lse = _attend(q, latent, latent[..., :d_c], mask, scale, return_lse)
    return o_lat.to(q_lat.dtype), lse


def paged_absorbed_attention_fp8(q_lat: torch.Tensor, q_R: torch.Tensor, kv_pool_fp8: torch.Tensor,
                                 block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                 tile: int = TILE, return_lse: bool = True):
    """:func:`paged_absorbed_attention` over a uint8 pool in FlashMLA's FP8 layout
    (``(num_blocks, block_size, 656)`` for V3's dims), dequantized on read."""
    return paged_absorbed_attention(q_lat, q_R, kv_pool_fp8, block_table, seq_lens, scale, "fp8", tile, return_lse)
