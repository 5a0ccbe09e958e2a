"""The fused absorbed-MLA decode kernel over the paged latent cache, in Triton.

Absorbed decode is an MQA whose single key is the latent row [c_KV, k_R] (576 wide for
DeepSeek-V3) and whose single value is c_KV (512 wide), shared by every head. The kernel
therefore puts the heads (times the T new queries) on the rows of one tile and reads each
latent row once for all of them: the same c_KV tile is the key for the scores and the value for
the output.

    grid = (batch, row blocks of BLOCK_H (query, head) rows, num_splits)
    program (b, m, s):  keys [s·chunk, (s+1)·chunk) of sequence b, through its block table
        S   = (q_lat · c_KVᵀ + q_R · k_Rᵀ) · scale        (BLOCK_H, BLOCK_N), fp32
        online softmax over the key tiles: running max m, sum l, acc += P · c_KV (fp32)
        -> acc / l and lse = m + log l for this split
    merge (when num_splits > 1): o = Σ_s e^{lse_s - lse} o_s with lse = log Σ_s e^{lse_s}

The FP8 variant reads FlashMLA's 656-byte rows (:mod:`mla_tutorial.quant`: c_KV as float8 e4m3
with one fp32 scale per 128 values, k_R as bf16) and dequantizes each tile in registers before
the same two matmuls.
Built step by step in chapter 13; this module needs Triton and is imported by
:mod:`mla_tutorial.kernels` on the first call.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import DecodeProblem

__all__ = ["launch_decode", "INTERPRETED"]


@triton.jit
def _decode_split_kernel(
    Q_LAT, Q_R,                      # (B, T, H, D_C), (B, T, H, D_R)
    KV, KV_ROPE, KV_SCALE,           # pool views: c_KV (or its fp8 bytes), k_R, the fp32 scales (fp8 only)
    BLOCK_TABLE, SEQ_LENS,           # (B, max_blocks) int32, (B,) int32
    O, LSE,                          # (B, T, H, D_C), (B, T, H); split: fp32 partials (B, T, H, S, D_C), (B, T, H, S)
    scale_log2,                      # softmax scale · log2(e): the kernel works in base 2 (exp2)
    stride_qb, stride_qt, stride_qh, stride_rb, stride_rt, stride_rh,
    stride_kb, stride_kt, stride_pb, stride_pt, stride_sb, stride_st,
    stride_tb,
    stride_ob, stride_ot, stride_oh, stride_os, stride_lb, stride_lt, stride_lh, stride_ls,
    T, H, D_C, D_R, ROPE_OFF, SCALE_OFF, num_splits,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)

    # Rows of the tile: (query t, head h) pairs, row = t·H + h. Query t sits at position
    # seq_len - T + t and sees the keys at positions <= its own (causal within the T new tokens).
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < T * H
    t = rows // H
    h = rows % H
    q_pos = seq_len - T + t
    cols_c = tl.arange(0, BLOCK_C)
    cols_r = tl.arange(0, BLOCK_R)
    c_ok = cols_c < D_C
    r_ok = cols_r < D_R

    q_c = tl.load(Q_LAT + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + cols_c[None, :],
                  mask=row_ok[:, None] & c_ok[None, :], other=0.0)                      # (BLOCK_H, BLOCK_C)
    q_r = tl.load(Q_R + b * stride_rb + t[:, None] * stride_rt + h[:, None] * stride_rh + cols_r[None, :],
                  mask=row_ok[:, None] & r_ok[None, :], other=0.0)                      # (BLOCK_H, BLOCK_R)
    elem = Q_LAT.dtype.element_ty
    if UPCAST:
        # Only in Triton's interpreter, for bf16: it stores bf16 as raw 16-bit integers and its
        # tl.dot would multiply the bit patterns. A product of two bf16 values is exact in fp32,
        # so matmuls of fp32 copies give what a GPU's bf16 matmul computes (up to the order of
        # the fp32 additions).
        q_c = q_c.to(tl.float32)
        q_r = q_r.to(tl.float32)

    # This program's keys: the split's share of the sequence, whole tiles of BLOCK_N.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)     # running max of the scores (base 2)
    l = tl.zeros((BLOCK_H,), tl.float32)                   # running sum of exp2(score - m)
    acc = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)         # running sum of p · c_KV
    for n in range(start, end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        key_ok = pos < end
        # Paging: token pos lives in pool block block_table[b, pos // PAGE], row pos % PAGE.
        block = tl.load(BLOCK_TABLE + b * stride_tb + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
        tok = pos % PAGE
        kv_mask = key_ok[:, None] & c_ok[None, :]
        c = tl.load(KV + (block * stride_kb + tok * stride_kt)[:, None] + cols_c[None, :],
                    mask=kv_mask, other=0)                                              # (BLOCK_N, BLOCK_C)
        k_r = tl.load(KV_ROPE + (block * stride_pb + tok * stride_pt + ROPE_OFF)[:, None] + cols_r[None, :],
                      mask=key_ok[:, None] & r_ok[None, :], other=0.0)                  # (BLOCK_N, BLOCK_R)
        if IS_FP8:
            # Dequantize in registers: fp8 e4m3 bytes -> fp32, times the scale of each 128-value tile.
            sc = tl.load(KV_SCALE + (block * stride_sb + tok * stride_st + SCALE_OFF)[:, None]
                         + (cols_c // FP8_TILE)[None, :], mask=kv_mask, other=0.0)
            c = (c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc).to(elem)
            k_r = k_r.to(elem)
        if UPCAST:
            c = c.to(tl.float32)
            k_r = k_r.to(tl.float32)

        # The same c tile is the key of the scores and the value of the output.
        s = tl.dot(q_c, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(q_r, tl.trans(k_r), s, input_precision=DOT_PRECISION) * scale_log2   # (BLOCK_H, BLOCK_N) fp32
        visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows that have seen no key yet
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)
        p = p.to(elem)          # the matmul takes the probabilities in the input dtype, as FlashAttention does
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, c, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new

    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + split * stride_os + cols_c[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
    tl.store(LSE + b * stride_lb + t * stride_lt + h * stride_lh + split * stride_ls, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    O_PART, LSE_PART, O, LSE,        # (B, T, H, S, D_C) fp32, (B, T, H, S) fp32 -> (B, T, H, D_C), (B, T, H)
    stride_pb, stride_pt, stride_ph, stride_ps, stride_qb, stride_qt, stride_qh, stride_qs,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
    T, H, D_C, num_splits,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (sequence, block of rows): o = Σ_s w_s o_s / Σ_s w_s, w_s = e^{lse_s - max_s lse_s}.
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < T * H
    t = rows // H
    h = rows % H
    splits = tl.arange(0, BLOCK_S)
    lse_rows = LSE_PART + b * stride_qb + t * stride_qt + h * stride_qh                 # (BLOCK_H,) pointers
    lse_all = tl.load(lse_rows[:, None] + splits[None, :] * stride_qs,
                      mask=row_ok[:, None] & (splits < num_splits)[None, :], other=float("-inf"))
    top = tl.max(lse_all, 1)
    top = tl.where(top == float("-inf"), 0.0, top)           # no split of this row saw a key
    total = tl.sum(tl.exp(lse_all - top[:, None]), 1)
    cols = tl.arange(0, BLOCK_C)
    mask = row_ok[:, None] & (cols < D_C)[None, :]
    o_rows = O_PART + b * stride_pb + t * stride_pt + h * stride_ph
    acc = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(lse_rows + s * stride_qs, mask=row_ok, other=float("-inf")) - top)
        acc += w[:, None] * tl.load(o_rows[:, None] + s * stride_ps + cols[None, :], mask=mask, other=0.0)
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + cols[None, :],
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + b * stride_lb + t * stride_lt + h * stride_lh,
             tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf")), mask=row_ok)


#: Whether these kernels were defined in Triton's interpreter (TRITON_INTERPRET=1 when this module
#: was imported) rather than compiled for a GPU.
INTERPRETED = not isinstance(_decode_split_kernel, triton.runtime.JITFunction)


def _pow2(n: int, least: int = 16) -> int:
    # tl.arange needs powers of two and tl.dot dims of at least 16: pad with masks beyond n.
    return max(least, triton.next_power_of_2(n))


def launch_decode(q_lat: torch.Tensor, q_R: torch.Tensor, kv_pool: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, problem: DecodeProblem, num_splits: int,
                  block_h: int, block_n: int, num_warps: int | None, num_stages: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the split kernel (and the merge when ``num_splits > 1``) on checked inputs."""
    p = problem
    q_lat, q_R = q_lat.contiguous(), q_R.contiguous()
    o = torch.empty(p.batch, p.queries, p.heads, p.d_c, dtype=q_lat.dtype, device=q_lat.device)
    lse = torch.empty(p.batch, p.queries, p.heads, dtype=torch.float32, device=q_lat.device)
    if p.batch == 0:
        return o, lse
    if p.fp8:
        # One pool, three views of its bytes: fp8 c_KV, fp32 scales, bf16 k_R.
        kv, kv_scale, kv_rope = kv_pool, kv_pool.view(torch.float32), kv_pool.view(torch.bfloat16)
        rope_off, scale_off = (p.d_c + 4 * (p.d_c // p.tile)) // 2, p.d_c // 4
    else:
        kv, kv_scale, kv_rope = kv_pool, kv_pool, kv_pool
        rope_off, scale_off = p.d_c, 0
    if num_splits == 1:
        o_part, lse_part, s_o, s_l = o, lse, 0, 0
    else:
        o_part = torch.empty(p.batch, p.queries, p.heads, num_splits, p.d_c, dtype=torch.float32, device=o.device)
        lse_part = torch.empty(p.batch, p.queries, p.heads, num_splits, dtype=torch.float32, device=o.device)
        s_o, s_l = o_part.stride(3), lse_part.stride(3)
    opts = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    block_c, block_r = _pow2(p.d_c), _pow2(p.d_h_R)
    grid = (p.batch, triton.cdiv(p.rows, block_h), num_splits)
    _decode_split_kernel[grid](
        q_lat, q_R, kv, kv_rope, kv_scale, block_table, seq_lens, o_part, lse_part,
        scale * math.log2(math.e),
        *q_lat.stride()[:3], *q_R.stride()[:3],
        *kv.stride()[:2], *kv_rope.stride()[:2], *kv_scale.stride()[:2],
        block_table.stride(0),
        *o_part.stride()[:3], s_o, *lse_part.stride()[:3], s_l,
        p.queries, p.heads, p.d_c, p.d_h_R, rope_off, scale_off, num_splits,
        PAGE=p.block_size, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_C=block_c, BLOCK_R=block_r, IS_FP8=p.fp8, FP8_TILE=p.tile,
        # fp32 inputs: exact fp32 products (a GPU's default for fp32 is tf32); "tf32" is the default, and
        # has no effect on bf16/fp16 operands
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETED and q_lat.dtype == torch.bfloat16,
        **opts,
    )
    if num_splits > 1:
        merge_rows = 16   # the merge only streams fp32 partials: a small tile keeps its registers few
        _merge_splits_kernel[(p.batch, triton.cdiv(p.rows, merge_rows))](
            o_part, lse_part, o, lse,
            *o_part.stride()[:4], *lse_part.stride(), *o.stride()[:3], *lse.stride(),
            p.queries, p.heads, p.d_c, num_splits,
            BLOCK_H=merge_rows, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_C=block_c,
        )
    return o, lse
