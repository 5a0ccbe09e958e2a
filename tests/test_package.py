"""Unit tests of the mla_tutorial package: equivalences, cache figures, RoPE, and bad input."""

import copy
import math
import pickle

import pytest
import torch

from mla_tutorial import (ATTENTION_PRESETS, MLA_MODES, AttentionConfig, KVCache, MLAConfig, MultiHeadAttention,
                          MultiHeadLatentAttention, RotaryEmbedding, apply_rope, attention, kv_cache_bytes,
                          kv_cache_elements, pick_device, pick_dtype)
from mla_tutorial.device import available_memory, check_memory

CONFIGS = {
    "tiny": MLAConfig.tiny(),
    "no-q-lora": MLAConfig.tiny().replace(q_lora_rank=None),
    "no-yarn-half-split": MLAConfig.tiny().replace(rope_scaling=None, rope_interleave=False),
    "v3-heads-narrow": MLAConfig.deepseek_v3().replace(hidden_size=64, q_lora_rank=32, num_attention_heads=8),
}


def make_mla(config, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(config, **kwargs).eval()


def decode_all(module, x, prompt_len, **cache_kwargs):
    """Prefill `prompt_len` tokens, then feed the rest one token at a time; return all outputs."""
    cache = module.new_cache(x.shape[0], x.shape[1], **cache_kwargs)
    outs = [module(x[:, :prompt_len], cache=cache)] if prompt_len else []
    outs += [module(x[:, t : t + 1], cache=cache) for t in range(prompt_len, x.shape[1])]
    return torch.cat(outs, dim=1), cache


# --- the headline cache figures -------------------------------------------------------------------
def test_deepseek_v3_cache_is_57x_smaller_than_mha():
    v3 = MLAConfig.deepseek_v3()
    mha = AttentionConfig.from_mla(v3)
    assert kv_cache_elements(mha) == 2 * 128 * 128 == 32_768
    assert kv_cache_elements(v3) == 512 + 64 == 576
    assert round(kv_cache_elements(mha) / kv_cache_elements(v3), 2) == 56.89
    assert kv_cache_bytes(mha) == 3_997_696 and kv_cache_bytes(v3) == 70_272  # 61 layers, bf16, one token
    assert kv_cache_bytes(v3, num_layers=1, dtype=torch.float32) == 576 * 4
    assert kv_cache_bytes(v3, context=1000, batch_size=3) == 70_272 * 3000


def test_caveat_ratios():
    v3 = MLAConfig.deepseek_v3()
    assert kv_cache_elements(v3, mode="expanded") == 128 * (192 + 128) == 40_960
    assert round(kv_cache_elements(v3, mode="expanded") / 576, 1) == 71.1
    lite, kimi = MLAConfig.deepseek_v2_lite(), MLAConfig.kimi_k2()
    assert round(kv_cache_elements(AttentionConfig.from_mla(lite)) / kv_cache_elements(lite), 1) == 7.1
    assert round(kv_cache_elements(AttentionConfig.from_mla(kimi)) / kv_cache_elements(kimi), 1) == 28.4
    # DeepSeek 67B (GQA-8, 95 layers): the 389 KB/token baseline of the DeepSeek-V2 paper
    assert kv_cache_bytes(ATTENTION_PRESETS["DeepSeek-67B"]) == 389_120
    # the Insights paper's Table 1 comparisons
    assert kv_cache_bytes(ATTENTION_PRESETS["Qwen2.5-72B"]) == 327_680
    assert kv_cache_bytes(ATTENTION_PRESETS["Llama-3.1-405B"]) == 516_096


def test_softmax_scale_includes_yarn_mscale():
    assert round(MLAConfig.deepseek_v3().softmax_scale, 4) == 0.1352
    expected = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert MLAConfig.deepseek_v3().softmax_scale == pytest.approx(expected, rel=1e-12)
    assert MLAConfig.deepseek_v3().replace(rope_scaling=None).softmax_scale == pytest.approx(192 ** -0.5)


def test_presets_match_published_configs():
    v3, v2, lite = MLAConfig.deepseek_v3(), MLAConfig.deepseek_v2(), MLAConfig.deepseek_v2_lite()
    assert (v3.hidden_size, v3.num_hidden_layers, v3.num_attention_heads, v3.q_lora_rank) == (7168, 61, 128, 1536)
    assert (v2.hidden_size, v2.num_hidden_layers) == (5120, 60)
    assert (lite.hidden_size, lite.num_hidden_layers, lite.num_attention_heads, lite.q_lora_rank) == (2048, 27, 16, None)
    assert v3.rope_scaling["factor"] == 40 and v3.rope_scaling["original_max_position_embeddings"] == 4096
    assert {c.kind for c in ATTENTION_PRESETS.values()} == {"MHA", "GQA-8"}
    assert AttentionConfig.from_mla(v3, num_key_value_heads=1).kind == "MQA"


# --- MLA: the three modes agree ----------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_modes_agree_in_prefill(name):
    module = make_mla(CONFIGS[name])
    x = torch.randn(2, 9, module.config.hidden_size)
    with torch.no_grad():
        ref = module(x, mode="expanded")
        for mode in ("latent", "absorbed"):
            torch.testing.assert_close(module(x, mode=mode), ref)
        module.absorb_prefill = True  # the absorbed computation itself, not the expanded shortcut
        torch.testing.assert_close(module(x, mode="absorbed"), ref)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", MLA_MODES)
def test_cached_decode_equals_full_recomputation(name, mode):
    module = make_mla(CONFIGS[name])
    x = torch.randn(2, 11, module.config.hidden_size)
    with torch.no_grad():
        full = module(x, mode="expanded")
        for prompt_len in (0, 1, 5):
            decoded, cache = decode_all(module, x, prompt_len, mode=mode)
            torch.testing.assert_close(decoded, full)
            assert len(cache) == 11


def test_absorbed_decode_never_expands_the_cache(monkeypatch):
    module = make_mla(CONFIGS["tiny"])
    x = torch.randn(1, 6, module.config.hidden_size)
    cache = module.new_cache(1, 6, mode="absorbed")
    with torch.no_grad():
        module(x[:, :3], cache=cache)  # prefill may expand
        monkeypatch.setattr(module, "expand", lambda *a: pytest.fail("absorbed decode expanded K/V"))
        for t in range(3, 6):
            module(x[:, t : t + 1], cache=cache)


def test_absorbed_path_choice_follows_flops():
    module = make_mla(MLAConfig.deepseek_v3().replace(hidden_size=64, q_lora_rank=32))
    # V3 dims: absorbed wins for fewer than 512*256/(1024-256) = 170.7 new queries over a long cache
    assert module.uses_absorbed_path(1, 1)
    assert module.uses_absorbed_path(100, 100_000)
    assert not module.uses_absorbed_path(200, 100_000)
    assert not module.uses_absorbed_path(4096, 4096)  # prefill: expanded is cheaper
    module.absorb_prefill = True
    assert module.uses_absorbed_path(4096, 4096)


def test_low_precision_modes_stay_close_to_fp64():
    module = make_mla(CONFIGS["v3-heads-narrow"])
    x = torch.randn(1, 8, module.config.hidden_size)
    with torch.no_grad():
        ref = module.double()(x.double(), mode="expanded")
        scale = ref.abs().max().item()
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            low = module.to(dtype)
            for mode in MLA_MODES:
                decoded, _ = decode_all(low, x.to(dtype), 4, mode=mode)
                err = (decoded.double() - ref).abs().max().item()
                assert err <= tol * scale, f"{dtype} {mode}: max error {err:.3g} vs output scale {scale:.3g}"


def test_state_dict_round_trip():
    a, b = make_mla(CONFIGS["tiny"], seed=0), make_mla(CONFIGS["tiny"], seed=1)
    x = torch.randn(1, 4, a.config.hidden_size)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))
    assert {"W_UK", "W_UV", "W_DKV.weight", "W_KR.weight", "W_O.weight"} <= set(a.state_dict())


# --- standard attention --------------------------------------------------------------------------
def naive_attention(q, k, v, scale):
    """Loop-by-loop reference: query i (absolute position S - T + i) sees keys 0 .. S - T + i."""
    B, Hq, T, _ = q.shape
    S, group = k.shape[2], Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                visible = S - T + i + 1
                w = torch.softmax((k[b, h // group, :visible] @ q[b, h, i]) * scale, dim=0)
                out[b, h, i] = w @ v[b, h // group, :visible]
    return out


@pytest.mark.parametrize("T,S,hq,hkv", [(1, 7, 4, 4), (3, 7, 4, 2), (5, 5, 6, 1), (5, 5, 4, 4)])
def test_attention_matches_naive_reference(T, S, hq, hkv):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, hq, T, 8), torch.randn(2, hkv, S, 8), torch.randn(2, hkv, S, 5)
    torch.testing.assert_close(attention(q, k, v, 0.3), naive_attention(q, k, v, 0.3))


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = MultiHeadAttention(32, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
    mha = MultiHeadAttention(32, num_heads=4, head_dim=8, rope_theta=10000.0)
    with torch.no_grad():
        mha.W_Q.weight.copy_(gqa.W_Q.weight)
        mha.W_O.weight.copy_(gqa.W_O.weight)
        for name in ("W_K", "W_V"):  # each KV head serves 2 query heads: repeat its rows
            w = getattr(gqa, name).weight.view(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(gqa(x), mha(x))
    # and GQA with num_kv_heads == num_heads *is* MHA
    same = MultiHeadAttention(32, num_heads=4, num_kv_heads=4, head_dim=8, rope_theta=10000.0)
    same.load_state_dict(mha.state_dict())
    torch.testing.assert_close(same(x), mha(x))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_mha_cached_decode_equals_recomputation_and_cache_bytes(kv_heads):
    torch.manual_seed(0)
    module = MultiHeadAttention(32, num_heads=4, num_kv_heads=kv_heads, rope_theta=10000.0).eval()
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        decoded, cache = decode_all(module, x, 4)
        torch.testing.assert_close(decoded, module(x))
    assert cache.bytes_per_token == 2 * kv_heads * 8 * 4
    assert cache.nbytes == 3 * 10 * cache.bytes_per_token
    assert cache.allocated_nbytes == cache.nbytes  # max_len == 10 tokens, all used


def test_mla_cache_bytes_from_real_tensors():
    module = make_mla(MLAConfig.deepseek_v3().replace(hidden_size=64, q_lora_rank=32))
    latent, expanded = module.new_cache(2, 16), module.new_cache(2, 16, mode="expanded")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        module(x, cache=latent)
        module(x, cache=expanded)
    assert latent.elements_per_token == 576 and latent.bytes_per_token == 576 * 4
    assert expanded.elements_per_token == 40_960
    assert latent.nbytes == 2 * 5 * 576 * 4 and latent.allocated_nbytes == 2 * 16 * 576 * 4
    assert latent.get("latent").shape == (2, 1, 5, 576)


# --- RoPE ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", [None, MLAConfig.tiny().rope_scaling])
def test_rope_scores_depend_only_on_relative_position(interleaved, scaling):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 10000.0, scaling)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos, sin = rope(torch.arange(60))

    def score(m, n):
        qm = apply_rope(q[None], cos[m : m + 1].double(), sin[m : m + 1].double(), interleaved)
        kn = apply_rope(k[None], cos[n : n + 1].double(), sin[n : n + 1].double(), interleaved)
        return (qm @ kn.T).item()

    for m, n in [(5, 2), (40, 37), (59, 56)]:
        # angles are computed in fp32 (as in DeepSeek's and HF's code): equal to fp32 precision
        assert score(m, n) == pytest.approx(score(3, 0), rel=1e-5)
    assert score(9, 2) != pytest.approx(score(3, 0), rel=1e-3)
    # rotation preserves length
    rotated = apply_rope(q[None], cos[7:8].double(), sin[7:8].double(), interleaved)
    assert rotated.norm().item() == pytest.approx(q.norm().item() * rope.attention_factor, rel=1e-6)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    module = make_mla(MLAConfig.tiny()).to(torch.bfloat16)
    assert module.rope.inv_freq.dtype == torch.float32
    cos, _ = module.rope(torch.arange(300, 301))
    torch.testing.assert_close(cos, make_mla(MLAConfig.tiny()).rope(torch.arange(300, 301))[0])


def test_interleaved_rope_is_half_split_rope_of_the_deinterleaved_vector():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    cos, sin = RotaryEmbedding(8)(torch.arange(5))
    deinterleaved = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin, interleaved=True), apply_rope(deinterleaved, cos, sin))


# --- bad input gets a clear error ---------------------------------------------------------------------
@pytest.mark.parametrize("changes,error,match", [
    ({"kv_lora_rank": 0}, ValueError, "kv_lora_rank must be a positive integer"),
    ({"num_attention_heads": -2}, ValueError, "num_attention_heads"),
    ({"qk_rope_head_dim": 5}, ValueError, "must be even"),
    ({"q_lora_rank": 0}, ValueError, "q_lora_rank"),
    ({"v_head_dim": 2.5}, TypeError, "v_head_dim must be an int"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, ValueError, "only YaRN"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, ValueError, "original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8, "fudge": 1}},
     ValueError, "unknown keys"),
])
def test_bad_config_raises(changes, error, match):
    with pytest.raises(error, match=match):
        MLAConfig.tiny().replace(**changes)


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden_size": 32, "num_heads": 4, "num_kv_heads": 3}, "divisible by num_kv_heads"),
    ({"hidden_size": 30, "num_heads": 4}, "not divisible by num_heads"),
    ({"hidden_size": 32, "num_heads": 0}, "num_heads must be a positive int"),
    ({"hidden_size": 32, "num_heads": 4, "head_dim": 7, "rope_theta": 1e4}, "even head_dim"),
])
def test_bad_attention_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)
    with pytest.raises(ValueError, match="divisible"):
        AttentionConfig("bad", 32, 4, 3, 8, 1)


@pytest.mark.parametrize("module", [make_mla(MLAConfig.tiny()), MultiHeadAttention(64, 4)])
def test_bad_input_raises(module):
    with pytest.raises(ValueError, match=r"shape \(batch, tokens, 64\)"):
        module(torch.randn(5, 64))
    with pytest.raises(ValueError, match="width 64"):
        module(torch.randn(1, 5, 63))
    with pytest.raises(TypeError, match="dtype"):
        module(torch.randn(1, 5, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but the weights are on cpu"):
        module(torch.randn(1, 5, 64, device="meta"))


def test_cache_misuse_raises():
    module = make_mla(MLAConfig.tiny())
    x = torch.randn(1, 4, 64)
    cache = module.new_cache(1, 5)
    module(x, cache=cache)
    with pytest.raises(ValueError, match="overflow.*holds 4 of 5.*2 more"):
        module(x[:, :2], cache=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        module(torch.randn(2, 1, 64), cache=module.new_cache(1, 5))
    with pytest.raises(TypeError, match="cache holds torch.float64"):
        module(x, cache=module.new_cache(1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache is on meta"):
        module(x, cache=module.new_cache(1, 5, device="meta"))
    with pytest.raises(ValueError, match="cannot use a cache made for mode 'absorbed'"):
        module(x, cache=module.new_cache(1, 5), mode="expanded")
    with pytest.raises(ValueError, match="unknown MLA mode 'fast'"):
        module(x, mode="fast")
    with pytest.raises(ValueError, match="not by an MLA layer"):
        module(x, cache=MultiHeadAttention(64, 4).new_cache(1, 5))
    other = make_mla(MLAConfig.tiny().replace(kv_lora_rank=8))
    with pytest.raises(ValueError, match="this layer needs"):
        other(x, cache=module.new_cache(1, 5))
    with pytest.raises(ValueError, match="not made by this module"):
        MultiHeadAttention(64, 4)(x, cache=MultiHeadAttention(64, 4, 2).new_cache(1, 5))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KVCache(1, 0, {"k": (1, 2)})
    with pytest.raises(ValueError, match="needs exactly the buffers"):
        KVCache(1, 4, {"k": (1, 2)}).update(v=torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"must be \(B=1, H=1, t=1, D=2\)"):
        KVCache(1, 4, {"k": (1, 2)}).update(k=torch.zeros(1, 1, 1, 3))


def test_pick_device(monkeypatch):
    monkeypatch.delenv("MLA_DEVICE", raising=False)
    assert pick_device().type in ("cuda", "mps", "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("MLA_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.setenv("MLA_DEVICE", "tpu")
    with pytest.raises(ValueError, match="'tpu' \\(from MLA_DEVICE\\)"):
        pick_device()
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available on this machine"):
            pick_device("cuda")


# --- checks that hold after construction -------------------------------------------------------------
def test_assigning_a_config_field_is_checked_and_a_bad_value_leaves_the_config_unchanged():
    config = MLAConfig.tiny()
    config.rope_theta = 50_000.0                     # a valid value is taken
    assert config.rope_theta == 50_000.0
    with pytest.raises(ValueError, match="rope_theta must be > 1"):
        config.rope_theta = 0
    assert config.rope_theta == 50_000.0 and config == MLAConfig.tiny().replace(rope_theta=50_000.0)
    with pytest.raises(TypeError, match=r"rope_scaling\['factor'\] must be a number"):
        config.rope_scaling = dict(config.rope_scaling, factor="4")
    assert config.rope_scaling == MLAConfig.tiny().rope_scaling
    config.rope_scaling["beta_fast"] = 0.5           # edited in place: validate() finds it
    with pytest.raises(ValueError, match=r"beta_fast \(0.5\) must be >= beta_slow \(1\)"):
        config.validate()


def test_a_cache_belongs_to_the_layer_that_writes_it_until_reset():
    first, second = make_mla(CONFIGS["tiny"], seed=0), make_mla(CONFIGS["tiny"], seed=1)
    x = torch.randn(1, 3, 64)
    cache = first.new_cache(1, 6)
    with torch.no_grad():
        first(x, cache=cache)
        with pytest.raises(ValueError, match="written by another layer"):
            second(x, cache=cache)
        assert len(cache) == 3, "a refused call must not write to the cache"
        first(x, cache=cache, mode="latent")         # the same layer in another latent mode: the same cache
        cache.reset()
        torch.testing.assert_close(second(x, cache=cache), second(x))
    copied = copy.deepcopy(cache)                    # copies and pickles forget the owner
    assert copied.length == 3 and pickle.loads(pickle.dumps(cache)).length == 3
    with torch.no_grad():
        first(torch.randn(1, 1, 64), cache=pickle.loads(pickle.dumps(cache)))


def test_memory_refusals_name_the_bytes_and_let_what_fits_through():
    assert available_memory("cpu") is None or available_memory("cpu") > 2**20
    assert available_memory("meta") is None
    check_memory(2**70, "meta", "anything", "")      # meta tensors take no memory: never refused
    check_memory(1000, "cpu", "a small thing", "")   # below the threshold: not even looked up
    free = available_memory("cpu")
    if free is not None:
        with pytest.raises(MemoryError, match=r"needs .* but cpu has .* free; shrink it"):
            check_memory(2 * free + 2**30, "cpu", "twice the free memory", "shrink it")
    cache = KVCache(2, 1000, {"latent": (1, 576)})  # 4.6 MB: allocated as before
    assert cache.allocated_nbytes == 2 * 1000 * 576 * 4
