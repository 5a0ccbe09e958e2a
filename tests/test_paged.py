"""The paged cache (mla_tutorial.blocks, mla_tutorial.paged): block bookkeeping, attention through
block tables against a brute-force reference and against the contiguous KVCache path."""

import math

import pytest
import torch

from mla_tutorial import MLAConfig, MultiHeadAttention, MultiHeadLatentAttention
from mla_tutorial.paged import (BlockManager, OutOfBlocks, PagedKVCache, PagedLatentCache, blocks_that_fit,
                                gather_rows, paged_absorbed_attention, paged_absorbed_attention_fp8, paged_attention)
from mla_tutorial.quant import LATENT_FORMATS

LENGTHS = [0, 1, 63, 64, 65]  # around a 64-token block boundary


# --- block bookkeeping ---------------------------------------------------------------------------
def test_allocate_append_free_account_for_every_block():
    m = BlockManager(10, block_size=4, seed=0)
    assert m.blocks_for(0) == 0 and m.blocks_for(4) == 1 and m.blocks_for(5) == 2
    slots = m.allocate("a", 5)                                # 2 blocks
    assert m.num_free == 8 and m.seq_len("a") == 5 and len(m.table("a")) == 2
    table = m.table("a")
    assert slots.tolist() == [table[0] * 4 + i for i in range(4)] + [table[1] * 4]
    assert m.append("a", 3).tolist() == [table[1] * 4 + i for i in (1, 2, 3)] and m.num_free == 8  # same block
    assert m.blocks_to_append("a", 1) == 1 and m.append("a").tolist() == [m.table("a")[2] * 4]
    m.allocate("b", 0)
    assert m.table("b") == [] and m.can_append("b", 28) and not m.can_append("b", 29)
    m.free("a")
    m.free("b")
    assert m.num_free == 10 and m.sequences == [], "every block comes back"


def test_running_out_is_a_question_first_and_a_clear_error_that_changes_nothing():
    m = BlockManager(4, block_size=8)
    m.allocate(0, 20)                                          # 3 blocks
    assert m.can_allocate(8) and not m.can_allocate(9)
    assert not m.can_append(0, 13) and m.can_append(0, 12)
    assert m.can_ever_hold(32) and not m.can_ever_hold(33)
    with pytest.raises(OutOfBlocks, match="1 of 4 are free") as err:
        m.allocate(1, 9)
    assert (err.value.needed, err.value.free, err.value.total) == (2, 1, 4)
    assert 1 not in m and m.num_free == 1, "a failed allocation leaves no trace"
    with pytest.raises(OutOfBlocks, match="can never fit"):
        m.append(0, 100)
    assert m.seq_len(0) == 20 and m.num_free == 1
    with pytest.raises(ValueError, match="already holds blocks"):
        m.allocate(0, 1)
    with pytest.raises(KeyError, match="no sequence"):
        m.append("missing")
    with pytest.raises(ValueError, match="positive int"):
        BlockManager(0)
    with pytest.raises(ValueError, match="non-negative int"):
        m.append(0, -1)


def test_block_tables_seq_lens_and_positions():
    m = BlockManager(8, block_size=4, seed=3)
    m.allocate("x", 6)
    m.allocate("y", 1)
    bt = m.block_tables(["x", "y"], fill=7)
    assert bt.dtype == torch.int32 and bt.tolist() == [m.table("x"), m.table("y") + [7]]
    assert m.seq_lens(["x", "y"]).tolist() == [6, 1]
    assert m.last_positions(["x", "y"], 1).tolist() == [[5], [0]]
    assert blocks_that_fit(1152 * 64 * 10 + 5, 1152, 64) == 10


# --- attention through block tables ----------------------------------------------------------------
def reference(q, keys, values, lens, scale):
    """fp64, one query at a time over the keys it may see: q (B, T, H, D), keys[b] (L_b, Hkv, D)."""
    B, T, H, _ = q.shape
    out = torch.zeros(B, T, H, values[0].shape[-1], dtype=torch.float64)
    lse = torch.full((B, T, H), -math.inf, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = lens[b] - T + t
            if p < 0:
                continue
            for h in range(H):
                g = h * keys[b].shape[1] // H
                s = keys[b][: p + 1, g].double() @ q[b, t, h].double() * scale
                out[b, t, h] = torch.softmax(s, 0) @ values[b][: p + 1, g].double()
                lse[b, t, h] = torch.logsumexp(s, 0)
    return out, lse


def paged_pools(rows, lens, block_size, num_blocks, seed):
    """Write each sequence's rows (L_b, *row) into NaN-filled pools through shuffled tables; the
    table entries past a sequence's last block are random (in range), as the layout allows."""
    m = BlockManager(num_blocks, block_size, seed=seed)
    pools = [torch.full((num_blocks, block_size, *r[0].shape[1:]), float("nan")) for r in rows]
    for b, L in enumerate(lens):
        slots = m.allocate(b, L)
        for pool, r in zip(pools, rows):
            pool.view(-1, *r[b].shape[1:])[slots] = r[b]
    bt = m.block_tables(range(len(lens)), width=m.blocks_for(max(lens)) + 2)
    garbage = torch.randint(0, num_blocks, bt.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    used = torch.arange(bt.shape[1]) * block_size < torch.tensor(lens)[:, None]
    return pools, torch.where(used, bt, garbage), m.seq_lens(range(len(lens)))


@pytest.mark.parametrize("T", [1, 3])
def test_paged_absorbed_attention_matches_the_reference(T):
    torch.manual_seed(0)
    d_c, d_R, H = 32, 8, 4
    rows = [torch.randn(L, d_c + d_R) for L in LENGTHS]
    (pool,), bt, sl = paged_pools([rows], LENGTHS, 64, 12, seed=1)
    q_lat, q_R = torch.randn(5, T, H, d_c), torch.randn(5, T, H, d_R)
    o, lse = paged_absorbed_attention(q_lat, q_R, pool, bt, sl, 0.2)
    want, want_lse = reference(torch.cat([q_lat, q_R], -1), [r[:, None] for r in rows],
                               [r[:, None, :d_c] for r in rows], LENGTHS, 0.2)
    assert o.shape == (5, T, H, d_c) and lse.shape == (5, T, H) and lse.dtype == torch.float32
    assert torch.isfinite(o).all(), "NaN in rows no sequence owns must not leak"
    torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    assert o[0].eq(0).all() and lse[0].eq(-math.inf).all(), "length 0: zeros and -inf"


def test_paged_attention_gqa_matches_the_reference():
    torch.manual_seed(1)
    H, Hkv, D, T = 6, 2, 8, 2
    ks = [torch.randn(L, Hkv, D) for L in LENGTHS]
    vs = [torch.randn(L, Hkv, D) for L in LENGTHS]
    (k_pool, v_pool), bt, sl = paged_pools([ks, vs], LENGTHS, 64, 12, seed=2)
    q = torch.randn(5, T, H, D)
    out, lse = paged_attention(q, k_pool, v_pool, bt, sl, 0.3, return_lse=True)
    want, want_lse = reference(q, ks, vs, LENGTHS, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_gather_rows_right_aligns_each_sequence():
    m = BlockManager(6, 2, seed=5)
    pool = torch.arange(12.0).view(6, 2, 1)
    m.allocate("a", 3)
    m.allocate("b", 1)
    rows, mask = gather_rows(pool, m.block_tables(["a", "b"]), m.seq_lens(["a", "b"]))
    slots_a, slots_b = m.slots("a", 0, 3), m.slots("b", 0, 1)
    assert rows[0, :, 0].tolist() == slots_a.float().tolist()
    assert rows[1, 2, 0] == slots_b.float()[0] and mask.tolist() == [[True] * 3, [False, False, True]]


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int6"])
def test_quantized_pools_read_as_their_dequantized_values(fmt):
    torch.manual_seed(2)
    d_c, d_R, H, T = 32, 8, 2, 1
    m = BlockManager(12, 64, seed=4)
    cache = PagedLatentCache(m, d_c, d_R, fmt=fmt, tile=16)
    plain = PagedLatentCache(m, d_c, d_R, fmt="fp32")
    for b, L in enumerate(LENGTHS):
        rows = torch.randn(L, d_c + d_R)
        slots = m.allocate(b, L)
        cache.write(0, slots, rows)
        plain.write(0, slots, LATENT_FORMATS[fmt].unpack(LATENT_FORMATS[fmt].pack(rows, d_c, 16), d_c, 16))
    assert cache.pool(0).dtype == torch.uint8 and cache.bytes_per_token == LATENT_FORMATS[fmt].row_bytes(d_c, d_R, 16)
    q_lat, q_R = torch.randn(5, T, H, d_c), torch.randn(5, T, H, d_R)
    o, lse = cache.attend(0, q_lat, q_R, range(5), 0.2)
    o_ref, lse_ref = plain.attend(0, q_lat, q_R, range(5), 0.2)
    torch.testing.assert_close(o, o_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse_ref, atol=1e-6, rtol=1e-6)
    if fmt == "fp8":
        o8, _ = paged_absorbed_attention_fp8(q_lat, q_R, cache.pool(0), m.block_tables(range(5)),
                                             m.seq_lens(range(5)), 0.2, tile=16)
        assert torch.equal(o8, o)


# --- equal to the contiguous cache -----------------------------------------------------------------
def contiguous_step(layer, prefix, new):
    """The layer's output for `new` after caching `prefix`, with the contiguous KVCache (batch 1)."""
    cache = layer.new_cache(1, prefix.shape[1] + new.shape[1])
    if prefix.shape[1]:
        layer(prefix, cache=cache)
    return layer(new, cache=cache)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_paged_kv_equals_the_contiguous_cache(kv_heads):
    torch.manual_seed(3)
    layer = MultiHeadAttention(32, 4, kv_heads, rope_theta=10000.0).eval()
    T = 2
    m = BlockManager(12, 64, seed=6)
    cache = PagedKVCache(m, kv_heads, 8, num_layers=2)
    xs = [torch.randn(1, L, 32) for L in LENGTHS]
    new = torch.randn(len(LENGTHS), T, 32)
    with torch.no_grad():
        for b, x in enumerate(xs):                               # prefill, one sequence at a time
            slots = m.allocate(b, x.shape[1])
            if x.shape[1]:
                _, k, v = layer.project(x, torch.arange(x.shape[1]))
                cache.write(1, slots[None], k.transpose(1, 2), v.transpose(1, 2))
        seqs = list(range(len(LENGTHS)))
        for b in seqs:                                           # one batched step of T tokens each
            m.append(b, T)
        q, k, v = layer.project(new, m.last_positions(seqs, T))
        cache.write(1, m.last_slots(seqs, T), k.transpose(1, 2), v.transpose(1, 2))
        out = layer.output(cache.attend(1, q.transpose(1, 2), seqs, layer.scale).transpose(1, 2))
        want = torch.cat([contiguous_step(layer, x, new[b:b + 1]) for b, x in enumerate(xs)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 2])
def test_paged_latents_equal_the_contiguous_absorbed_cache(T):
    torch.manual_seed(4)
    layer = MultiHeadLatentAttention(MLAConfig.tiny(), mode="absorbed").eval()
    c = layer.config
    m = BlockManager(12, 64, seed=7)
    cache = PagedLatentCache(m, c.kv_lora_rank, c.qk_rope_head_dim, fmt="fp32")
    xs = [torch.randn(1, L, c.hidden_size) for L in LENGTHS]
    new = torch.randn(len(LENGTHS), T, c.hidden_size)
    seqs = list(range(len(LENGTHS)))
    with torch.no_grad():
        for b, x in enumerate(xs):
            slots = m.allocate(b, x.shape[1])
            if x.shape[1]:
                _, _, latent = layer.project(x, torch.arange(x.shape[1]))
                cache.write(0, slots[None], latent[:, 0])
        for b in seqs:
            m.append(b, T)
        q_C, q_R, latent = layer.project(new, m.last_positions(seqs, T))
        cache.write(0, m.last_slots(seqs, T), latent[:, 0])
        o_lat, _ = cache.attend(0, layer.absorb_query(q_C).transpose(1, 2), q_R.transpose(1, 2), seqs, layer.scale)
        out = layer.absorbed_output(o_lat.transpose(1, 2))
        want = torch.cat([contiguous_step(layer, x, new[b:b + 1]) for b, x in enumerate(xs)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for b in seqs:
        m.free(b)
    assert m.num_free == m.num_blocks


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly():
    m = BlockManager(4, 8)
    m.allocate(0, 10)
    pool = torch.zeros(4, 8, 40)
    bt, sl = m.block_tables([0]), m.seq_lens([0])
    q_lat, q_R = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="name its format"):
        paged_absorbed_attention(q_lat, q_R, torch.zeros(4, 8, 40, dtype=torch.uint8), bt, sl, 0.1)
    with pytest.raises(ValueError, match="unknown latent cache format"):
        paged_absorbed_attention(q_lat, q_R, pool, bt, sl, 0.1, kv_format="nf4")
    with pytest.raises(ValueError, match="rows of"):
        paged_absorbed_attention(q_lat, q_R, pool[..., :39], bt, sl, 0.1)
    with pytest.raises(ValueError, match="block_table has 2 columns"):
        paged_absorbed_attention(q_lat, q_R, pool, bt, torch.tensor([17], dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        paged_absorbed_attention(q_lat, q_R, pool, torch.tensor([[0, 9]], dtype=torch.int32), sl, 0.1)
    with pytest.raises(TypeError, match="int32"):
        paged_absorbed_attention(q_lat, q_R, pool, bt.float(), sl, 0.1)
    with pytest.raises(ValueError, match="share"):
        paged_absorbed_attention(q_lat, q_R[:, :, :1], pool, bt, sl, 0.1)
    with pytest.raises(ValueError, match="scale"):
        paged_absorbed_attention(q_lat, q_R, pool, bt, sl, -1.0)
    with pytest.raises(ValueError, match="T = 0"):
        paged_absorbed_attention(q_lat[:, :0], q_R[:, :0], pool, bt, sl, 0.1)
    with pytest.raises(MemoryError, match="free; give the BlockManager at most [0-9,]+ blocks"):
        PagedLatentCache(BlockManager(10**9, 64), 512, 64)
    with pytest.raises(ValueError, match="device"):
        PagedLatentCache(m, 32, 8, device="tpu")
    with pytest.raises(ValueError, match="multiple of the scale tile"):
        PagedLatentCache(m, 32, 8, fmt="fp8")
    with pytest.raises(ValueError, match="unknown latent cache format"):
        PagedLatentCache(m, 32, 8, fmt="q6_k")
    layer, x = MultiHeadLatentAttention(MLAConfig.tiny()), torch.randn(2, 3, 64)
    with pytest.raises(TypeError, match="integer tensor"):
        layer.project(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, T\) = \(2, 3\)"):
        layer.project_latent(x, torch.arange(4))
    with pytest.raises(ValueError, match="input width 32"):
        MultiHeadAttention(32, 4).project(x, torch.arange(3))
    cache = PagedLatentCache(m, 32, 8)
    with pytest.raises(ValueError, match="must end in"):
        cache.write(0, m.slots(0, 0, 2), torch.zeros(2, 39))
    with pytest.raises(ValueError, match="layer must be"):
        cache.write(1, m.slots(0, 0, 2), torch.zeros(2, 40))


def test_rope_takes_one_position_per_sequence_and_token():
    from mla_tutorial import RotaryEmbedding

    rope = RotaryEmbedding(8)
    positions = torch.tensor([[0, 1, 2], [63, 64, 65]])
    cos, sin = rope(positions)
    assert cos.shape == (2, 3, 4)
    for b in range(2):
        torch.testing.assert_close(cos[b], rope(positions[b])[0], atol=0, rtol=0)
        torch.testing.assert_close(sin[b], rope(positions[b])[1], atol=0, rtol=0)
    for bad in (positions.float(), positions[None], positions.bool()):
        with pytest.raises(TypeError, match="integer positions"):
            rope(bad)
