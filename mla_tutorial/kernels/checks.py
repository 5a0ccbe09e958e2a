"""Checks of a paged decode call's inputs, made with torch before any kernel is launched.

A Triton kernel reads raw pointers: a wrong shape, dtype or block-table entry does not raise an
error there, it reads the wrong memory. So every argument of :func:`~mla_tutorial.kernels.paged_mla_decode`
is checked here first, and each error says what to change. Nothing in this module needs Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant import TILE, LatentFormat, fp8_row_bytes, latent_format

__all__ = ["DecodeProblem", "check_decode_inputs", "QUERY_DTYPES"]

#: Query (and bf16/fp16/fp32 pool) dtypes the kernels take; the pool may also be FP8 bytes.
QUERY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class DecodeProblem:
    """The sizes of one checked decode call."""

    batch: int
    queries: int          # T, new query tokens per sequence
    heads: int            # n_h
    d_c: int
    d_h_R: int
    block_size: int       # tokens per pool block
    num_blocks: int       # blocks in the pool
    max_blocks: int       # block-table entries per sequence
    max_len: int          # the longest sequence in the batch (cached tokens, new ones included)
    fp8: bool             # the pool holds FlashMLA's FP8 layout
    tile: int = TILE      # FP8 only: values of c_KV per scale

    @property
    def rows(self) -> int:
        """Rows of the kernel's tiles per sequence: every (query, head) pair."""
        return self.queries * self.heads


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"paged_mla_decode: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_decode_inputs(q_lat: torch.Tensor, q_R: torch.Tensor, kv_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                        kv_format: str | LatentFormat | None = None, tile: int = TILE,
                        check_values: bool = True) -> DecodeProblem:
    """Raise a clear error unless the arguments describe a valid paged decode step; return its sizes.

    The arguments are those of :func:`mla_tutorial.paged.paged_absorbed_attention`. The kernel
    reads float pools in the queries' dtype and ``kv_format="fp8"`` pools (torch.uint8, FlashMLA's
    layout); int8 and int6 pools are for the torch reference only.

    ``check_values`` also reads ``seq_lens`` and the block-table entries in use (one small copy
    from the device): lengths in range, at least T tokens per non-empty sequence, and used entries
    that name a block of the pool. A serving loop that builds its tables itself may skip it.
    """
    for name, t in (("q_lat", q_lat), ("q_R", q_R), ("kv_pool", kv_pool), ("block_table", block_table),
                    ("seq_lens", seq_lens)):
        _tensor(name, t)
    if q_lat.dim() != 4 or q_R.dim() != 4:
        raise ValueError(f"paged_mla_decode: q_lat and q_R must be (batch, T, n_h, d_c) and (batch, T, n_h, d_h_R), "
                         f"got {tuple(q_lat.shape)} and {tuple(q_R.shape)}")
    if q_lat.shape[:3] != q_R.shape[:3]:
        raise ValueError(f"paged_mla_decode: q_lat {tuple(q_lat.shape)} and q_R {tuple(q_R.shape)} must agree in "
                         f"(batch, T, n_h)")
    B, T, H, d_c = q_lat.shape
    d_R = q_R.shape[-1]
    if min(T, H, d_c, d_R) == 0:
        raise ValueError(f"paged_mla_decode: empty query (T={T}, n_h={H}, d_c={d_c}, d_h_R={d_R})")
    if q_lat.dtype not in QUERY_DTYPES or q_R.dtype != q_lat.dtype:
        raise TypeError(f"paged_mla_decode: q_lat and q_R must share one of {[str(d) for d in QUERY_DTYPES]}, "
                        f"got {q_lat.dtype} and {q_R.dtype}")
    devices = {t.device for t in (q_lat, q_R, kv_pool, block_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"paged_mla_decode: every tensor must be on one device, got {sorted(map(str, devices))}")

    if kv_pool.dim() != 3:
        raise ValueError(f"paged_mla_decode: kv_pool must be (num_blocks, block_size, width), got {tuple(kv_pool.shape)}")
    num_blocks, block_size, width = kv_pool.shape
    if kv_pool.stride(-1) != 1:
        raise ValueError("paged_mla_decode: kv_pool's rows must be contiguous (stride 1 along the last dim); "
                         "the kernel will not copy a whole pool")
    if kv_format is None and kv_pool.dtype == torch.uint8:
        raise ValueError("paged_mla_decode: a torch.uint8 pool holds quantized rows; name its format, "
                         "kv_format='fp8' (FlashMLA's layout, the one the kernel reads)")
    fmt = latent_format(kv_pool.dtype if kv_format is None else kv_format)   # unknown names: a clear error
    fp8 = fmt.name == "fp8"
    if fmt.quantized and not fp8:
        raise ValueError(f"paged_mla_decode: the kernel reads float pools and kv_format='fp8'; a {fmt.name!r} pool "
                         f"is read by the torch reference, mla_tutorial.paged.paged_absorbed_attention")
    if fp8:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0 or d_c % tile:
            raise ValueError(f"paged_mla_decode: the FP8 layout needs a scale tile (values per scale) that divides "
                             f"d_c = {d_c} (FlashMLA's is 128), got tile={tile!r}")
        want = fp8_row_bytes(d_c, d_R, tile)
        if kv_pool.dtype != torch.uint8 or width != want:
            raise ValueError(f"paged_mla_decode: an FP8 pool for d_c={d_c}, d_h_R={d_R} is torch.uint8 with {want} "
                             f"bytes per token ({d_c} fp8 + {4 * (d_c // tile)} scale bytes + {2 * d_R} bf16 k_R "
                             f"bytes), got {width} {kv_pool.dtype}")
        if d_c % 4 or any(s % 4 for s in kv_pool.stride()[:2]) or kv_pool.storage_offset() % 4:
            raise ValueError(f"paged_mla_decode: the kernel reads an FP8 pool's scales as float32, so d_c ({d_c}) "
                             f"and each row's bytes ({width}) must be multiples of 4 and the pool 4-byte aligned")
    else:
        if kv_pool.dtype != fmt.pool_dtype or kv_pool.dtype != q_lat.dtype:
            raise TypeError(f"paged_mla_decode: kv_pool is {kv_pool.dtype} but the queries are {q_lat.dtype}"
                            f"{'' if kv_format is None else f' and kv_format is {fmt.name!r}'}; use one dtype, "
                            f"or a torch.uint8 pool with kv_format='fp8'")
        if width != d_c + d_R:
            raise ValueError(f"paged_mla_decode: kv_pool rows are [c_KV, k_R], {d_c} + {d_R} = {d_c + d_R} wide, "
                             f"got {width}")
    if min(num_blocks, block_size) == 0:
        raise ValueError(f"paged_mla_decode: kv_pool {tuple(kv_pool.shape)} has no blocks or no tokens per block")

    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TypeError(f"paged_mla_decode: block_table and seq_lens must be torch.int32, got {block_table.dtype} "
                        f"and {seq_lens.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"paged_mla_decode: block_table must be (batch, max_blocks_per_seq) = ({B}, ...), got "
                         f"{tuple(block_table.shape)}")
    if seq_lens.shape != (B,):
        raise ValueError(f"paged_mla_decode: seq_lens must be ({B},), got {tuple(seq_lens.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"paged_mla_decode: scale must be a positive finite number, got {scale!r}")
    max_blocks = block_table.shape[1]

    max_len = 0
    if check_values and B:
        lens = seq_lens.cpu()
        capacity = max_blocks * block_size
        bad = lens[(lens < 0) | (lens > capacity)]
        if bad.numel():
            raise ValueError(f"paged_mla_decode: seq_lens must lie in [0, {capacity}] (max_blocks_per_seq "
                             f"{max_blocks} x block_size {block_size}), got {bad.tolist()[:4]}")
        short = lens[(lens > 0) & (lens < T)]
        if short.numel():
            raise ValueError(f"paged_mla_decode: seq_lens counts the {T} new tokens too, so a non-empty sequence has "
                             f"at least T = {T} tokens; got lengths {short.tolist()[:4]}")
        used = torch.arange(max_blocks)[None, :] < (lens[:, None] + block_size - 1) // block_size
        entries = block_table.cpu()[used]
        out_of_range = entries[(entries < 0) | (entries >= num_blocks)]
        if out_of_range.numel():
            raise ValueError(f"paged_mla_decode: block_table entries in use must name a pool block in "
                             f"[0, {num_blocks}), got {out_of_range.tolist()[:4]}")
        max_len = int(lens.max())
    elif B:
        max_len = max_blocks * block_size
    return DecodeProblem(B, T, H, d_c, d_R, block_size, num_blocks, max_blocks, max_len, fp8, tile)
