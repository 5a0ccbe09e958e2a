"""Property-based tests: over random small MLA configs, the three cache modes compute the same function.

Hypothesis draws the config (heads, latent width, head dims, query compression, YaRN, RoPE layout),
the batch, the prompt length and the number of decode steps; every mode must match full expanded
recomputation in prefill and in token-by-token decode.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mla_tutorial import MLA_MODES, MLAConfig, MultiHeadAttention, MultiHeadLatentAttention

FAST = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mla_configs(draw):
    yarn = draw(st.booleans())
    return MLAConfig(
        hidden_size=draw(st.integers(4, 24)),
        num_attention_heads=draw(st.integers(1, 4)),
        q_lora_rank=draw(st.one_of(st.none(), st.integers(1, 12))),
        kv_lora_rank=draw(st.integers(1, 12)),
        qk_nope_head_dim=draw(st.integers(1, 8)),
        qk_rope_head_dim=2 * draw(st.integers(1, 4)),
        v_head_dim=draw(st.integers(1, 8)),
        num_hidden_layers=1,
        max_position_embeddings=64,
        rope_theta=draw(st.sampled_from([100.0, 10000.0])),
        rope_interleave=draw(st.booleans()),
        rope_scaling={"type": "yarn", "factor": draw(st.sampled_from([2, 4, 40])),
                      "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": draw(st.sampled_from([0, 0.707, 1.0]))} if yarn else None,
    )


@FAST
@given(config=mla_configs(), batch=st.integers(1, 2), prompt=st.integers(1, 5), steps=st.integers(0, 4),
       absorb_prefill=st.sampled_from([None, True]), seed=st.integers(0, 2**16))
def test_mla_modes_agree_in_prefill_and_decode(config, batch, prompt, steps, absorb_prefill, seed):
    torch.manual_seed(seed)
    module = MultiHeadLatentAttention(config, absorb_prefill=absorb_prefill).eval()
    x = torch.randn(batch, prompt + steps, config.hidden_size)
    with torch.no_grad():
        reference = module(x, mode="expanded")
        for mode in MLA_MODES:
            torch.testing.assert_close(module(x, mode=mode), reference)
            cache = module.new_cache(batch, prompt + steps, mode=mode)
            outs = [module(x[:, :prompt], cache=cache)]
            outs += [module(x[:, t : t + 1], cache=cache) for t in range(prompt, prompt + steps)]
            torch.testing.assert_close(torch.cat(outs, dim=1), reference)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(kv_heads=st.sampled_from([1, 2, 3, 6]), head_dim=st.sampled_from([2, 4, 6]), prompt=st.integers(1, 4),
       steps=st.integers(0, 4), rope=st.booleans(), seed=st.integers(0, 2**16))
def test_standard_attention_cached_decode_equals_recomputation(kv_heads, head_dim, prompt, steps, rope, seed):
    torch.manual_seed(seed)
    module = MultiHeadAttention(12, num_heads=6, num_kv_heads=kv_heads, head_dim=head_dim,
                                rope_theta=10000.0 if rope else None).eval()
    x = torch.randn(2, prompt + steps, 12)
    with torch.no_grad():
        cache = module.new_cache(2, prompt + steps)
        outs = [module(x[:, :prompt], cache=cache)]
        outs += [module(x[:, t : t + 1], cache=cache) for t in range(prompt, prompt + steps)]
        torch.testing.assert_close(torch.cat(outs, dim=1), module(x))
