"""Converting MHA/GQA to MLA (mla_tutorial.convert): GQA -> MLA is exact on random and trained layers in
every cache mode; the SVD conversion is exact at full rank and its error falls as d_c grows; the pair
rules pick what they say; converted models save and load; bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch

from mla_tutorial.attention import MultiHeadAttention
from mla_tutorial.config import MLAConfig
from mla_tutorial.convert import (attention_inputs, convert_model, gqa_to_mla, max_kv_lora_rank, mean_pool_kv,
                                  mha_to_mla, pair_scores, select_rope_pairs)
from mla_tutorial.experiments.common import checkpoint_path
from mla_tutorial.mla import MLA_MODES
from mla_tutorial.model import LMConfig, TransformerLM
from mla_tutorial.train import save_checkpoint


def layer(n_h=6, n_kv=2, d_h=8, d_model=48, seed=0, **kw) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(d_model, n_h, n_kv, d_h, rope_theta=kw.pop("rope_theta", 10000.0), **kw)


def x_of(d_model=48, B=2, T=24, seed=1) -> torch.Tensor:
    return torch.randn(B, T, d_model, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n_h,n_kv,d_h,theta", [(6, 2, 8, 1e4), (4, 4, 6, 1e4), (8, 1, 4, 5e5), (32 // 4, 2, 16, 5e5)])
def test_gqa_to_mla_is_exact_in_every_mode(n_h, n_kv, d_h, theta):
    attn = layer(n_h, n_kv, d_h, rope_theta=theta)
    x = x_of()
    ref = attn(x)
    mla = gqa_to_mla(attn)
    c = mla.config
    assert c.latent_cache_dim == 2 * n_kv * d_h, "the same cache as the GQA layer"
    assert not c.kv_norm and mla.kv_norm is None
    for mode in MLA_MODES:
        torch.testing.assert_close(mla(x, mode=mode), ref)
    # decode through the latent cache, absorbed: prefill 10 tokens, then one at a time
    cache = mla.new_cache(2, 24, mode="absorbed")
    steps = [mla(x[:, :10], cache=cache)] + [mla(x[:, t:t + 1], cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), ref)


def test_gqa_to_mla_is_exact_on_the_trained_gqa_model():
    path = checkpoint_path("text-gqa2")
    model = TransformerLM.from_checkpoint(path).eval()
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    converted = convert_model(model, "gqa_to_mla").eval()
    assert converted.config.attention == "mla" and not converted.config.kv_norm
    assert converted.cache_bytes_per_token(torch.bfloat16) == model.cache_bytes_per_token(torch.bfloat16)
    with torch.no_grad():
        ref = model(idx)
        for block, b0 in zip(converted.blocks, model.blocks):
            h = b0.attn_norm(model.embed(idx))
            torch.testing.assert_close(block.attn(h, mode="absorbed"), b0.attn(h))
        torch.testing.assert_close(converted(idx), ref, rtol=1e-5, atol=1e-4)


def test_converted_model_saves_loads_and_generates(tmp_path):
    torch.manual_seed(0)
    src = TransformerLM(LMConfig(vocab_size=40, d_model=32, n_heads=4, n_layers=2, max_seq_len=32)).eval()
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    conv = convert_model(src, "mha_to_mla", kv_lora_rank=20, rope_pairs=1, calibration=idx, whiten=True)
    freqs = conv.config.rope_frequencies
    assert len(freqs) == 2 and len(freqs[0]) == 4  # one pair per head, 4 heads
    path = tmp_path / "converted.pt"
    save_checkpoint(path, conv)
    back = TransformerLM.from_checkpoint(path).eval()
    assert back.config == conv.config
    torch.testing.assert_close(back(idx), conv.eval()(idx))
    caches = {mode: back.generate([[1, 2, 3]], 6, mode=mode) for mode in MLA_MODES}
    assert caches["expanded"] == caches["latent"] == caches["absorbed"]


@pytest.mark.parametrize("whiten", [False, True])
def test_svd_at_full_rank_is_exact_when_every_pair_stays_rope(whiten):
    attn = layer()
    x = x_of()
    inputs = x_of(T=200, seed=3).reshape(-1, 48)
    full = max_kv_lora_rank(attn, 4)
    assert full == 2 * 8  # [W_K,nope; W_V] is W_V alone
    torch.testing.assert_close(mha_to_mla(attn, full, 4, "high", inputs, whiten)(x), attn(x), rtol=1e-4, atol=1e-5)


def test_error_falls_as_the_latent_grows():
    attn = layer(6, 6, 8)  # MHA
    x = x_of()
    ref = attn(x)
    inputs = x_of(T=300, seed=3).reshape(-1, 48)
    full = max_kv_lora_rank(attn, 2)
    assert full == 48  # min(6 * (16 - 4), d_model)
    for whiten in (False, True):
        errs = [rel(mha_to_mla(attn, d_c, 2, "contribution", inputs, whiten)(x), ref) for d_c in (4, 12, 24, 36, full)]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # at full rank only the dropped rotations differ: the source with RoPE on the kept pairs alone
    # (computed directly) equals the full-rank conversion
    pairs = select_rope_pairs(attn, 2, "contribution", inputs)
    keep = attn.rope.inv_freq.expand(6, -1).clone()
    mask = torch.zeros(6, 4, dtype=torch.bool).scatter_(1, pairs, True)
    mixed_ref = _partial_rope_reference(attn, x, mask, keep)
    torch.testing.assert_close(mha_to_mla(attn, full, 2, "contribution", inputs, False)(x), mixed_ref,
                               rtol=1e-4, atol=1e-5)


def _partial_rope_reference(attn: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor,
                            freqs: torch.Tensor) -> torch.Tensor:
    """The source layer with RoPE only on the pairs ``mask`` (n_kv, d_h/2) marks, computed directly."""
    from mla_tutorial.attention import attention
    from mla_tutorial.rope import apply_rope
    B, T, _ = x.shape
    n_h, n_kv, d_h = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.W_Q(x).view(B, T, n_h, d_h).transpose(1, 2)
    k = attn.W_K(x).view(B, T, n_kv, d_h).transpose(1, 2)
    v = attn.W_V(x).view(B, T, n_kv, d_h).transpose(1, 2)
    angles = torch.arange(T, dtype=torch.float32)[None, :, None] * (freqs * mask)[:, None, :]  # (n_kv, T, d_h/2)
    cos, sin = angles.cos(), angles.sin()
    group = n_h // n_kv
    q = apply_rope(q, cos.repeat_interleave(group, 0), sin.repeat_interleave(group, 0))
    k = apply_rope(k, cos, sin)
    return attn.output(attention(q, k, v, attn.scale))


def test_pair_rules():
    attn = layer(6, 6, 8)
    assert select_rope_pairs(attn, 2, "high").tolist() == [[0, 1]] * 6
    assert select_rope_pairs(attn, 2, "low").tolist() == [[2, 3]] * 6
    # make pair 3 of head 0 dominate both queries and keys: the contribution rule must keep it
    with torch.no_grad():
        for w in (attn.W_Q.weight, attn.W_K.weight):
            w[[3, 7]] *= 50
    inputs = x_of(T=100, seed=5).reshape(-1, 48)
    scores = pair_scores(attn, inputs)
    assert scores.shape == (6, 4) and scores[0].argmax() == 3
    assert 3 in select_rope_pairs(attn, 1, "contribution", inputs)[0].tolist()


def test_mean_pool_kv():
    attn = layer(6, 6, 8)
    x = x_of()
    same = mean_pool_kv(attn, 6)
    torch.testing.assert_close(same(x), attn(x))
    pooled = mean_pool_kv(attn, 2)
    assert pooled.num_kv_heads == 2
    torch.testing.assert_close(pooled.W_K.weight[:8], attn.W_K.weight[:24].view(3, 8, 48).mean(0))


def test_attention_inputs_are_what_each_layer_reads():
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(vocab_size=40, d_model=32, n_heads=4, n_layers=2, max_seq_len=32)).eval()
    idx = torch.randint(0, 40, (2, 8))
    xs = attention_inputs(model, idx)
    assert len(xs) == 2 and xs[0].shape == (16, 32)
    torch.testing.assert_close(xs[0], model.blocks[0].attn_norm(model.embed(idx)).reshape(-1, 32))


# --- bad input --------------------------------------------------------------------------------------
def test_bad_input():
    attn = layer(6, 6, 8)
    inputs = x_of(T=50).reshape(-1, 48)
    with pytest.raises(ValueError, match=r"kv_lora_rank must be an int from 1 to 48.*rank is at most 48; got 49"):
        mha_to_mla(attn, 49, 2, "high")
    with pytest.raises(ValueError, match=r"kv_lora_rank must be an int from 1"):
        mha_to_mla(attn, 0, 2, "high")
    with pytest.raises(ValueError, match=r"rope_pairs must be an int from 1 to 4: a head of width 8 has 4 RoPE "
                                         r"pairs, got 5"):
        mha_to_mla(attn, 8, 5, "high")
    with pytest.raises(ValueError, match=r"rope_pairs must be an int from 1 to 4"):
        select_rope_pairs(attn, 0, "high")
    with pytest.raises(ValueError, match=r"has biases.*bias=False"):
        gqa_to_mla(layer(bias=True))
    with pytest.raises(ValueError, match=r"has biases"):
        mha_to_mla(layer(bias=True), 8, 1, "high")
    with pytest.raises(ValueError, match=r"num_kv_heads must divide the layer's 6 key/value heads; "
                                         r"choose one of \[1, 2, 3, 6\]"):
        mean_pool_kv(attn, 4)
    with pytest.raises(ValueError, match=r"unknown rule 'middle'"):
        select_rope_pairs(attn, 1, "middle")
    with pytest.raises(ValueError, match=r"rule='contribution' ranks pairs on real activations; pass inputs"):
        mha_to_mla(attn, 8, 1)
    with pytest.raises(ValueError, match=r"whiten=True needs inputs"):
        mha_to_mla(attn, 8, 1, "high", whiten=True)
    with pytest.raises(ValueError, match=r"inputs must be the layer's floating-point inputs \(\.\.\., 48\), got"):
        mha_to_mla(attn, 8, 1, "contribution", inputs[:, :40])
    with pytest.raises(ValueError, match=r"has no RoPE"):
        gqa_to_mla(MultiHeadAttention(48, 6, 2, 8))
    with pytest.raises(TypeError, match=r"converts the package's MultiHeadAttention"):
        gqa_to_mla(gqa_to_mla(attn))
    model = TransformerLM(LMConfig(vocab_size=40, d_model=32, n_heads=4, n_layers=2, max_seq_len=32))
    with pytest.raises(ValueError, match=r"unknown method 'svd'"):
        convert_model(model, "svd")
    with pytest.raises(ValueError, match=r"needs kv_lora_rank and rope_pairs"):
        convert_model(model, "mha_to_mla", rule="high")
    with pytest.raises(ValueError, match=r"need calibration token ids"):
        convert_model(model, "mha_to_mla", kv_lora_rank=8, rope_pairs=1)
    with pytest.raises(ValueError, match=r"already MLA"):
        convert_model(TransformerLM(LMConfig(vocab_size=40, attention="mla", max_seq_len=32)), "gqa_to_mla")


def test_bad_conversion_fields_of_the_configs():
    with pytest.raises(ValueError, match=r"rope_frequencies has 3 frequencies; qk_rope_head_dim = 4 rotates 2 pairs"):
        MLAConfig.tiny().replace(rope_scaling=None, rope_frequencies=(1.0, 0.5, 0.1))
    with pytest.raises(ValueError, match=r"rope_frequencies\[1\] must be >= 0"):
        MLAConfig.tiny().replace(rope_scaling=None, rope_frequencies=(1.0, -0.5))
    with pytest.raises(ValueError, match=r"rope_frequencies or rope_scaling \(YaRN\), not both"):
        MLAConfig.tiny().replace(rope_frequencies=(1.0, 0.5))
    with pytest.raises(TypeError, match=r"kv_norm must be True or False"):
        MLAConfig.tiny().replace(kv_norm="no")
    with pytest.raises(ValueError, match=r"kv_norm and rope_frequencies apply to attention='mla' only"):
        LMConfig(kv_norm=False)
    with pytest.raises(ValueError, match=r"one sequence of qk_rope_head_dim / 2 frequencies per layer \(2 layers\)"):
        LMConfig(attention="mla", rope_frequencies=((1.0,) * 4,))
    with pytest.raises(ValueError, match=r"LMConfig\[layer 1\]\.rope_frequencies has 3 frequencies"):
        LMConfig(attention="mla", rope_frequencies=((1.0,) * 4, (1.0,) * 3))
    # the defaults stay out of to_dict(), so the recorded configs still compare equal
    assert "kv_norm" not in LMConfig().to_dict() and "rope_frequencies" not in LMConfig().to_dict()
    cfg = LMConfig(attention="mla", kv_norm=False, rope_frequencies=[[1.0, 0.5, 0.25, 0.125]] * 2)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg and isinstance(cfg.rope_frequencies[0], tuple)


def test_conversion_experiment_plan():
    from mla_tutorial.experiments import SETTINGS
    from mla_tutorial.experiments.common import base_config
    from mla_tutorial.experiments.conversion import finetune_config, plan, pretraining_tokens
    full = SETTINGS["full"]
    for task in ("text", "mqar"):
        tc, tokens = finetune_config(task, full)
        assert tc.steps == 10 and tokens <= 0.01 * pretraining_tokens(task, full), (task, tokens)
    specs = plan(base_config("text", full), [24, 40, 72, 136], [96, 64, 32])
    main = [(s["rope_pairs"], s["kv_lora_rank"]) for s in specs if s["whiten"] and s["rule"] == "contribution"]
    assert main == [(1, 12), (1, 28), (1, 60), (1, 96), (2, 16), (2, 48), (2, 96), (4, 24), (4, 88), (4, 96),
                    (2, 72), (2, 40), (2, 8)]
    for r, d_c in main:  # each fills a from-scratch MLA or mean-pooled GQA model's cache, or is the full rank
        assert d_c + 12 * r in (24, 40, 72, 136, 32, 64, 96) or d_c == 96
    assert {s["rule"] for s in specs if s["kv_lora_rank"] == 48} == {"contribution", "high", "low"}
    assert sum(not s["whiten"] for s in specs) == 3


def test_recorded_settings_still_compare_equal():
    # the conversion-only config fields stay out of a setting's dict at their defaults, so the
    # recorded runs of chapters 09-10 are still recognised as this setting's (and reused)
    from mla_tutorial.experiments import SETTINGS, load_result
    for name in ("matched_cache", "heads_layers"):
        assert load_result(name)["setting"] == SETTINGS["full"].to_dict(), name
