"""The roofline throughput model (mla_tutorial.roofline): per-layer FLOPs and bytes, cache sizes,
batch limits and the DeepSeek-V2 vs DeepSeek 67B comparison. Pure arithmetic: exact assertions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mla_tutorial import AttentionConfig, MLAConfig
from mla_tutorial import roofline as rf

V3 = MLAConfig.deepseek_v3()
V3_MHA = AttentionConfig.from_mla(V3)


def test_per_layer_flops_and_bytes_per_cached_token():
    # MHA with V3's heads: 4 n_h d_h FLOPs over 2 n_h d_h values of 2 bytes -> 1 FLOP/byte
    assert rf.attention_flops_per_cached_token(V3_MHA) == 65_536
    assert rf.attention_bytes_per_cached_token(V3_MHA) == 65_536
    assert rf.arithmetic_intensity(V3_MHA) == 1.0
    # absorbed MLA: 2 n_h (576 + 512) FLOPs over 576 values of 2 bytes -> ~242 FLOP/byte
    assert rf.attention_flops_per_cached_token(V3) == rf.attention_flops_per_cached_token(V3, "absorbed") == 278_528
    assert rf.attention_bytes_per_cached_token(V3) == 1_152
    assert round(rf.arithmetic_intensity(V3), 1) == 241.8
    # expanded MLA reads per-head K (192) and V (128); latent re-expands every cached token
    assert rf.attention_flops_per_cached_token(V3, "expanded") == 2 * 128 * (192 + 128) == 81_920
    assert rf.attention_flops_per_cached_token(V3, "latent") == 81_920 + 2 * 512 * 128 * 256
    assert rf.attention_bytes_per_cached_token(V3, "expanded", torch.float32) == 40_960 * 4
    # sharing K/V heads saves bytes, not FLOPs
    gqa = AttentionConfig.from_mla(V3, num_key_value_heads=8)
    assert rf.attention_flops_per_cached_token(gqa) == 65_536
    assert rf.arithmetic_intensity(gqa) == 16.0
    with pytest.raises(ValueError):
        rf.attention_flops_per_cached_token(V3, "bogus")
    with pytest.raises(ValueError):
        rf.attention_flops_per_cached_token(V3_MHA, "absorbed")


def test_paper_cache_sizes_and_reduction():
    old, new = rf.deepseek_67b(), rf.deepseek_v2()
    assert old.cache_elements_per_token == 2 * 8 * 128 * 95 == 194_560
    assert old.cache_bytes_per_token == 389_120                     # "389 KB" in BF16
    assert new.cache_elements_per_token == 576 * 60
    assert new.cache_bytes_per_token == 25_920                      # 6-bit cache: 0.75 B per value
    assert round(rf.cache_reduction(old, new), 3) == rf.PAPER_CACHE_REDUCTION == 0.933
    assert round(rf.cache_reduction(old, rf.deepseek_v2(cache_bytes_per_element=2.0)), 3) == 0.822
    assert (new.total_params, new.active_params) == (236e9, 21e9)
    assert rf.deepseek_v3().cache_bytes_per_token == 70_272
    assert rf.deepseek_v3("mha").cache_bytes_per_token == 3_997_696


def test_max_batch_is_the_largest_that_fits():
    node, model, L = rf.paper_node(), rf.deepseek_67b(), 4096
    b = rf.max_batch(model, node, L)
    room = node.usable_memory_bytes - model.weight_bytes
    assert b * L * model.cache_bytes_per_token <= room < (b + 1) * L * model.cache_bytes_per_token
    assert rf.max_batch(model, node, 2 * L) <= b // 2 + 1
    # DeepSeek-V3's 671 GB of FP8 weights do not fit in 90% of one 8 x 80 GB node
    assert rf.max_batch(rf.deepseek_v3(), node, L) == 0
    assert rf.max_throughput(rf.deepseek_v3(), node, L).tokens_per_s == 0.0
    with pytest.raises(ValueError):
        rf.max_batch(model, node, 0)


def test_decode_step_is_the_roofline_bound():
    node = rf.paper_node()
    step = rf.decode_step(rf.deepseek_67b(), node, 10, 1000)
    assert step.weight_bytes == 67e9                               # dense: every weight, once per step
    assert step.cache_bytes == 10 * 1000 * 389_120
    assert step.flops == 10 * (2 * 67e9 + 1000 * 95 * 4 * 64 * 128)
    assert step.step_time_s == max(step.bytes / node.bandwidth_bytes_per_s, step.flops / node.peak_flops_per_s)
    assert step.bound == "memory" and step.tokens_per_s == pytest.approx(10 / step.step_time_s)
    # a mixture of experts reads only what its batch can touch
    v2 = rf.deepseek_v2()
    assert rf.decode_step(v2, node, 1, 1000).weight_bytes == 21e9
    assert rf.decode_step(v2, node, 1000, 1000).weight_bytes == 236e9


def test_v2_vs_67b_lands_near_the_paper_and_mla_is_most_of_it():
    node, L = rf.paper_node(), rf.PAPER_CONTEXT
    old = rf.max_throughput(rf.deepseek_67b(), node, L)
    new = rf.max_throughput(rf.deepseek_v2(), node, L)
    no_mla = rf.max_throughput(rf.deepseek_v2("mha"), node, L)
    ratio = new.tokens_per_s / old.tokens_per_s
    assert ratio == pytest.approx(4.82, abs=0.01)                  # the model's figure (paper: 5.76)
    assert rf.PAPER_SPEEDUP / 1.5 < ratio < rf.PAPER_SPEEDUP * 1.5
    assert old.bound == "memory" and new.bound == "compute"
    assert new.batch / old.batch > 9                               # the capacity effect
    assert new.tokens_per_s / no_mla.tokens_per_s > 20             # V2 with MHA's cache would be slower than 67B
    assert no_mla.tokens_per_s < old.tokens_per_s


def test_v3_over_an_mha_v3():
    node = rf.Node(rf.H800, count=16)
    mla = rf.max_throughput(rf.deepseek_v3(), node, 4096)
    mha = rf.max_throughput(rf.deepseek_v3("mha"), node, 4096)
    assert mla.batch // mha.batch >= 50 and mla.tokens_per_s / mha.tokens_per_s > 50


def test_parameters_are_validated_and_replaceable():
    with pytest.raises(ValueError):
        rf.Node(count=0)
    with pytest.raises(ValueError):
        rf.Node(usable_memory_fraction=1.5)
    with pytest.raises(ValueError):
        rf.deepseek_67b().replace(active_params=1e12)
    with pytest.raises(ValueError):
        rf.deepseek_v2("mqa")
    assert rf.H800.ridge_flops_per_byte == pytest.approx(989e12 / 3.35e12)
    bf16 = rf.deepseek_67b(weight_bytes_per_param=2.0)
    assert bf16.weight_bytes == 134e9
    with pytest.raises(dataclasses.FrozenInstanceError):
        rf.H800.memory_bytes = 1


def test_v2_with_gqa8_isolates_mla_against_the_baselines_own_attention():
    node = rf.paper_node()
    gqa = rf.deepseek_v2("gqa")
    # 67B's attention (8 key/value heads of width 128) in V2's 60 layers, V2's 6-bit cache
    assert gqa.cache_elements_per_token_per_layer == 2 * 8 * 128 == 2_048
    assert gqa.cache_bytes_per_token == 2_048 * 60 * 0.75
    assert gqa.attention_flops_per_cached_token_per_layer == 4 * 128 * 128   # 128 query heads
    assert (gqa.total_params, gqa.active_params, gqa.weight_bytes_per_param) == (236e9, 21e9, 1.0)
    assert gqa.name == "DeepSeek-V2 with GQA-8" and rf.deepseek_v2("mha").name == "DeepSeek-V2 with MHA"
    ratios = {c: (rf.throughput_ratio(rf.deepseek_v2(), gqa, node, c), rf.throughput_ratio(gqa, rf.deepseek_67b(), node, c))
              for c in (2048, 4096, 8192)}
    # the two factors multiply to the whole V2 / 67B ratio
    for c, (mla_part, rest) in ratios.items():
        assert mla_part * rest == pytest.approx(rf.throughput_ratio(rf.deepseek_v2(), rf.deepseek_67b(), node, c))
    assert [round(m, 2) for m, _ in ratios.values()] == [1.24, 1.71, 2.11]
    assert [round(r, 2) for _, r in ratios.values()] == [2.82, 2.82, 2.82]
    # at short contexts GQA-8 would serve V2 faster: absorbed MLA does ~4x its attention FLOPs
    assert rf.throughput_ratio(rf.deepseek_v2(), gqa, node, 1024) < 1
    # against MHA, MLA's factor is large (V2 with MHA is slower than 67B)
    assert rf.throughput_ratio(rf.deepseek_v2(), rf.deepseek_v2("mha"), node, 4096) == pytest.approx(27.4, abs=0.05)
    # 67B with BF16 weights: less room for its cache, so the ratio rises
    assert round(rf.throughput_ratio(rf.deepseek_v2(), rf.deepseek_67b(weight_bytes_per_param=2.0), node, 4096), 2) == 5.55
    with pytest.raises(ValueError, match="kv_heads"):
        rf.deepseek_v2("gqa", kv_heads=7)
    with pytest.raises(ValueError, match="attention must be one of"):
        rf.deepseek_v3("mqa")
    assert rf.deepseek_v3("gqa", kv_heads=1).cache_elements_per_token_per_layer == 256


def test_v2_decode_is_compute_bound_at_4k_and_the_kernel_rate_matters():
    node, L = rf.paper_node(), rf.PAPER_CONTEXT
    v2, old = rf.deepseek_v2(), rf.deepseek_67b()
    assert v2.weight_flops_per_token == 42e9
    assert v2.attention_flops_per_token(L) == L * 60 * 278_528          # 68.5 GFLOP: more than the weights'
    assert v2.flops_per_token(L) == v2.weight_flops_per_token + v2.attention_flops_per_token(L)
    assert rf.max_throughput(v2, node, L).bound == "compute"
    slow = rf.Node(dataclasses.replace(rf.H800, peak_flops_per_s=0.6 * rf.H800.peak_flops_per_s))
    assert rf.max_throughput(old, slow, L).tokens_per_s == rf.max_throughput(old, node, L).tokens_per_s
    assert rf.max_throughput(v2, slow, L).tokens_per_s == pytest.approx(0.6 * rf.max_throughput(v2, node, L).tokens_per_s)


def test_throughput_ratio_needs_a_baseline_that_fits():
    with pytest.raises(ValueError, match="do not fit"):
        rf.throughput_ratio(rf.deepseek_v2(), rf.deepseek_v3(), rf.paper_node(), 4096)
