"""attention(): key masks (padding), causality that holds even for NaN inputs, fp32 scores in fp16."""

import copy

import pytest
import torch

from mla_tutorial import MLA_MODES, MLAConfig, MultiHeadAttention, MultiHeadLatentAttention, attention


def reference(q, k, v, scale, key_mask):
    """One query at a time over exactly the keys it may see (causal and key_mask), in fp64."""
    B, Hq, T, _ = q.shape
    S, group = k.shape[2], Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                keys = [j for j in range(S - T + i + 1) if key_mask[b, j]]
                if keys:
                    kk, vv = k[b, h // group, keys].double(), v[b, h // group, keys].double()
                    out[b, h, i] = torch.softmax(kk @ q[b, h, i].double() * scale, dim=0) @ vv
    return out


@pytest.mark.parametrize("T,S,hq,hkv", [(1, 9, 4, 2), (4, 9, 4, 4), (6, 6, 6, 1)])
def test_key_mask_equals_attending_only_to_the_real_tokens(T, S, hq, hkv):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, hq, T, 8), torch.randn(3, hkv, S, 8), torch.randn(3, hkv, S, 5)
    key_mask = torch.ones(3, S, dtype=torch.bool)
    key_mask[0, :2] = False          # left padding
    key_mask[2, 1] = key_mask[2, S - 1] = False
    out = attention(q, k, v, 0.3, key_mask=key_mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3, key_mask), atol=1e-5, rtol=1e-5)


def test_a_query_that_may_see_no_key_gets_zeros():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    key_mask = torch.tensor([[False, False, True], [True, True, True]])
    out = attention(q, k, v, 0.5, key_mask=key_mask)
    assert torch.equal(out[0, :, :2], torch.zeros(2, 2, 4)), "padding queries see nothing: zero output"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_hidden_keys_do_not_leak_but_visible_ones_do(where):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    clean = attention(q, k, v, 0.5)
    bad = {"k": k.clone(), "v": v.clone()}
    bad[where][0, 0, 3, 1] = float("nan")
    bad[where][0, 1, 4, 0] = float("inf")
    out = attention(q, bad["k"], bad["v"], 0.5)
    torch.testing.assert_close(out[:, :, :3], clean[:, :, :3], atol=0, rtol=0)  # tokens 0-2 never see 3 or 4
    torch.testing.assert_close(out[:, 1, 3], clean[:, 1, 3], atol=0, rtol=0)    # head 1's bad key is at 4
    assert out[:, 0, 3:].isnan().all() and out[:, 1, 4].isnan().all(), (
        "a query that may see a non-finite key or value must not hide it")
    key_mask = torch.tensor([[True, True, True, False, False]])
    padded = attention(q[:, :, :3], bad["k"], bad["v"], 0.5, causal=False, key_mask=key_mask)
    torch.testing.assert_close(padded, attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], 0.5, causal=False))


def _layers():
    torch.manual_seed(0)
    mla_cfg = MLAConfig.tiny()
    yield "MHA", MultiHeadAttention(64, num_heads=4, num_kv_heads=4, rope_theta=10000.0).eval(), {}
    yield "GQA", MultiHeadAttention(64, num_heads=4, num_kv_heads=2, rope_theta=10000.0).eval(), {}
    for mode in MLA_MODES:
        yield f"MLA {mode}", MultiHeadLatentAttention(mla_cfg, mode=mode).eval(), {}


@pytest.mark.parametrize("name,layer,_", list(_layers()), ids=[n for n, _, _ in _layers()])
def test_a_nan_token_does_not_reach_earlier_tokens(name, layer, _):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 64)
    poisoned = x.clone()
    poisoned[:, 3] = float("nan")
    with torch.no_grad():
        clean, out = layer(x), layer(poisoned)
        torch.testing.assert_close(out[:, :3], clean[:, :3], atol=0, rtol=0)
        assert out[:, 3:].isnan().all()
        # the same through a cache: prefill 2 tokens, then a chunk of 4 with the NaN inside it
        cache = layer.new_cache(2, 6)
        layer(poisoned[:, :2], cache=cache)
        chunk = layer(poisoned[:, 2:], cache=cache)
        torch.testing.assert_close(chunk[:, :1], clean[:, 2:3], atol=1e-5, rtol=1e-5)
        assert chunk[:, 1:].isnan().all()


@pytest.mark.parametrize("name,layer,_", list(_layers()), ids=[n for n, _, _ in _layers()])
def test_padded_batch_equals_each_sequence_alone(name, layer, _):
    """Left padding plus a key mask: each sequence's outputs match running it alone."""
    torch.manual_seed(2)
    lengths = [7, 4]
    xs = [torch.randn(1, n, 64) for n in lengths]
    S = max(lengths)
    batch = torch.zeros(2, S, 64)
    key_mask = torch.zeros(2, S, dtype=torch.bool)
    for b, (n, x) in enumerate(zip(lengths, xs)):
        batch[b, S - n:] = x[0]
        key_mask[b, S - n:] = True
    with torch.no_grad():
        out = layer(batch, key_mask=key_mask)
        cache = layer.new_cache(2, S + 1)
        layer(batch, cache=cache, key_mask=key_mask)
        nxt = torch.randn(2, 1, 64)
        step = layer(nxt, cache=cache, key_mask=torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], 1))
        for b, (n, x) in enumerate(zip(lengths, xs)):
            torch.testing.assert_close(out[b:b + 1, S - n:], layer(x), atol=1e-5, rtol=1e-5)
            alone = layer(torch.cat([x, nxt[b:b + 1]], dim=1))[:, -1:]
            torch.testing.assert_close(step[b:b + 1], alone, atol=1e-5, rtol=1e-5)


def test_fp16_scores_do_not_overflow_in_decode_and_chunked_prefill():
    """Logits past fp16's 65,504: scores are formed in fp32 on every path, so fp16 stays finite."""
    torch.manual_seed(0)
    ref = MultiHeadAttention(32, num_heads=4, num_kv_heads=2, rope_theta=10000.0).eval()
    half = MultiHeadAttention(32, num_heads=4, num_kv_heads=2, rope_theta=10000.0).eval()
    half.load_state_dict(ref.state_dict())
    half.half()
    x = torch.randn(1, 12, 32) * 300
    q = ref.W_Q(x).view(1, 12, 4, 8)
    assert (q @ q.transpose(-1, -2)).abs().max() > 65_504, "the test needs logits beyond fp16's range"
    with torch.no_grad():
        expected = half.float()(x.half().float())   # the same fp16-rounded weights, all in fp32
        half.half()
        for prompt in (1, 5):  # decode after a one-token prompt; a 5-token prompt, then a 7-token chunk
            cache = half.new_cache(1, 12)
            outs = [half(x[:, :prompt].half(), cache=cache)]
            outs.append(half(x[:, prompt:].half(), cache=cache) if prompt == 5 else
                        torch.cat([half(x[:, t:t + 1].half(), cache=cache) for t in range(prompt, 12)], 1))
            out = torch.cat(outs, dim=1).float()
            assert torch.isfinite(out).all(), f"fp16 with a {prompt}-token prompt overflowed"
            # Logits this large make the softmax nearly one-hot, so fp16's rounding of q and k can flip
            # a near-tie; most outputs still agree with fp32.
            close = torch.isclose(out, expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
            assert close.float().mean() > 0.9, f"fp16 with a {prompt}-token prompt: {close.float().mean():.0%} close"


@pytest.mark.parametrize("mode", MLA_MODES)
def test_fp16_mla_stays_finite_with_large_inputs(mode):
    torch.manual_seed(0)
    cfg = MLAConfig.tiny().replace(q_lora_rank=None, rope_scaling=None)
    layer = MultiHeadLatentAttention(cfg, mode=mode).eval().half()
    x = (torch.randn(1, 10, 64) * 1e3).half()
    with torch.no_grad():
        cache = layer.new_cache(1, 10)
        outs = [layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
    assert all(torch.isfinite(o).all() for o in outs), f"fp16 {mode} decode overflowed"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 2, 3, 4), v=torch.randn(1, 2, 3, 4)), ValueError, "T <= S"),
    (dict(k=torch.randn(1, 2, 3, 5)), ValueError, "same last dim"),
    (dict(v=torch.randn(1, 2, 4, 4)), ValueError, "same heads and tokens"),
    (dict(q=torch.randn(1, 3, 1, 4)), ValueError, "multiple of"),
    (dict(q=torch.randn(2, 4, 1, 4)), ValueError, "batch sizes differ"),
    (dict(q=torch.randn(4, 1, 4)), ValueError, "4-D"),
    (dict(v=torch.randn(1, 2, 3, 4).double()), TypeError, "share dtype"),
    (dict(q=torch.ones(1, 4, 1, 4, dtype=torch.long)), TypeError, "floating-point"),
    (dict(scale=0.0), ValueError, "positive finite"),
    (dict(scale=float("nan")), ValueError, "positive finite"),
    (dict(causal="yes"), TypeError, "True or False"),
    (dict(key_mask=torch.ones(1, 3)), TypeError, "bool tensor"),
    (dict(key_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, r"\(1, 3\)"),
])
def test_bad_attention_calls_raise_clearly(kwargs, error, match):
    args = dict(q=torch.randn(1, 4, 1, 4), k=torch.randn(1, 2, 3, 4), v=torch.randn(1, 2, 3, 4), scale=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        attention(**args)


def test_fp64_stays_fp64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64) for _ in range(3))
    for kwargs in ({}, {"key_mask": torch.ones(1, 3, dtype=torch.bool)}):
        out = attention(q[:, :, 1:], k, v, 0.5, **kwargs)
        ref = torch.softmax((q[:, :, 1:] @ k.transpose(-1, -2)) * 0.5 + torch.tensor(
            [[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]], dtype=torch.float64), dim=-1) @ v
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-14, rtol=1e-14)


# --- fp16 with large inputs, and NaN causality, on every layer and path ----------------------------------
# The reported case: hidden 256, 8 heads, d_c 64, d_h_R 16, inputs x1e4 (unscaled logits pass fp16's 65,504).
BIG = MLAConfig(hidden_size=256, num_attention_heads=8, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16, num_hidden_layers=1, max_position_embeddings=4096)


def _every_layer(hidden: int = 256):
    torch.manual_seed(0)
    for name, kv in (("MHA", 8), ("GQA", 2), ("MQA", 1)):
        yield name, MultiHeadAttention(hidden, num_heads=8, num_kv_heads=kv, rope_theta=10000.0).eval()
    for mode in MLA_MODES:
        yield f"MLA {mode}", MultiHeadLatentAttention(BIG.replace(hidden_size=hidden), mode=mode).eval()
    yield "MLA absorbed, chunks absorbed", MultiHeadLatentAttention(BIG.replace(hidden_size=hidden),
                                                                    absorb_prefill=True).eval()


def _run(layer, x, path):
    """Outputs for all of x through one path: a full prefill, a prefill then chunks, or token by token."""
    T = x.shape[1]
    if path == "full prefill":
        return layer(x)
    cache = layer.new_cache(x.shape[0], T)
    if path == "chunked prefill":
        return torch.cat([layer(x[:, :T // 2], cache=cache), layer(x[:, T // 2:3 * T // 4], cache=cache),
                          layer(x[:, 3 * T // 4:], cache=cache)], dim=1)
    return torch.cat([layer(x[:, :2], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(2, T)], 1)


LAYERS = list(_every_layer())
PATHS = ("full prefill", "chunked prefill", "decode")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,layer", LAYERS, ids=[n for n, _ in LAYERS])
def test_fp16_with_large_inputs_stays_finite_and_close_to_fp32(name, layer, path):
    torch.manual_seed(3)
    x = torch.randn(1, 12, 256) * 1e4
    half = copy.deepcopy(layer).half()
    ref = copy.deepcopy(half).float()                      # the same fp16-rounded weights, computed in fp32
    with torch.no_grad():
        q = (ref.W_Q(x) if hasattr(ref, "W_Q") else ref.W_QR(x)).view(1, 12, 8, -1)
        assert (q @ q.transpose(-1, -2)).abs().max() > 65_504, "the test needs logits beyond fp16's range"
        out = _run(half, x.half(), path).float()
        expected = _run(ref, x.half().float(), path)
    assert torch.isfinite(out).all(), f"{name}, {path}: fp16 overflowed"
    # logits this large make the softmax nearly one-hot: fp16's rounding of q and k may flip a near-tie,
    # so most outputs, not all, agree with fp32
    close = torch.isclose(out, expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
    assert close.float().mean() > 0.9, f"{name}, {path}: only {close.float().mean():.0%} close to fp32"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,layer", list(_every_layer(64)), ids=[n for n, _ in _every_layer(64)])
def test_a_nan_token_reaches_no_earlier_token_and_no_other_sequence(name, layer, path):
    torch.manual_seed(4)
    x = torch.randn(2, 8, 64)
    poisoned = x.clone()
    poisoned[0, 5] = float("nan")                      # token 5 of sequence 0
    with torch.no_grad():
        clean, out = _run(layer, x, path), _run(layer, poisoned, path)
    torch.testing.assert_close(out[0, :5], clean[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], clean[1], atol=1e-5, rtol=1e-5)
    assert out[0, 5:].isnan().all(), f"{name}, {path}: tokens that see the NaN must not hide it"


@pytest.mark.parametrize("name,layer", list(_every_layer(64)), ids=[n for n, _ in _every_layer(64)])
def test_nan_in_padding_never_reaches_real_tokens(name, layer):
    torch.manual_seed(5)
    x = torch.randn(2, 6, 64)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[1, :2] = False                            # sequence 1 is left-padded by two tokens
    padded = x.clone()
    padded[1, :2] = float("nan")
    with torch.no_grad():
        out = layer(padded, key_mask=key_mask)
        alone = layer(x[1:, 2:])
    torch.testing.assert_close(out[1, 2:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], layer(x[:1])[0], atol=1e-5, rtol=1e-5)
