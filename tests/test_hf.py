"""Agreement with Hugging Face ``transformers``: a third-party implementation of DeepSeek's MLA.

HF's ``DeepseekV3Attention`` / ``DeepseekV2Attention`` (eager attention, fp32) are built from small
configs in code (nothing is downloaded), given random weights large enough that a wrong layout
shows, and copied into ``MultiHeadLatentAttention`` with ``load_hf_attention``. The package must
then give the same outputs in prefill and in token-by-token decode, in all three cache modes.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from mla_tutorial import MLA_MODES, MLAConfig, MultiHeadLatentAttention, load_hf_attention, mla_config_from_hf

TOL = dict(atol=1e-5, rtol=1e-5)
# (mode, absorb_prefill): absorbed mode with absorb_prefill=True also runs prefill chunks absorbed.
MODES = [(m, None) for m in MLA_MODES] + [("absorbed", True)]
SMALL = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=12, num_hidden_layers=1, max_position_embeddings=128)


def yarn(mscale: float = 1.0, mscale_all_dim: float = 1.0) -> dict:
    # original context 32 and factor 4: with qk_rope_head_dim 8, three of the four pairs are interpolated
    return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


V3_CASES = {
    "q_lora+yarn+interleave": dict(q_lora_rank=24, rope=yarn(), rope_interleave=True),
    "q_lora+yarn(attention_factor)+half": dict(q_lora_rank=24, rope=yarn(1.0, 0.5), rope_interleave=False),
    "no_q_lora+plain+half": dict(q_lora_rank=None, rope=None, rope_interleave=False),
    "no_q_lora+yarn(0.707)+interleave": dict(q_lora_rank=None, rope=yarn(0.707, 0.707), rope_interleave=True),
    "q_lora+plain+interleave": dict(q_lora_rank=24, rope=None, rope_interleave=True),
}
V2_CASES = {
    "v2:no_q_lora+yarn": dict(q_lora_rank=None, rope=yarn(0.707, 0.707)),
    "v2:q_lora+plain": dict(q_lora_rank=24, rope=None),
}


@pytest.fixture(scope="module")
def hf():
    from mla_tutorial.hf import TRANSFORMERS_MIN
    return pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN,
                               reason=f"the agreement tests need transformers >= {TRANSFORMERS_MIN}")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    # std 0.2 (not HF's 0.02) so that scores are O(1) and a wrong row layout changes outputs visibly
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1 if "layernorm" in name else noise)


class HFAttention:
    """An HF DeepSeek attention module with its rotary embedding and a causal mask."""

    def __init__(self, hf, kind: str, case: dict, seed: int = 0):
        rope = {"rope_theta": 10000.0, **(case["rope"] or {"rope_type": "default"})}
        if kind == "v3":
            from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod
            self.config = hf.DeepseekV3Config(**SMALL, q_lora_rank=case["q_lora_rank"], rope_parameters=rope,
                                              rope_interleave=case["rope_interleave"], num_key_value_heads=4)
            self.module = mod.DeepseekV3Attention(self.config, layer_idx=0).eval()
            self.rotary = mod.DeepseekV3RotaryEmbedding(self.config)
        else:
            from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mod
            self.config = hf.DeepseekV2Config(**SMALL, q_lora_rank=case["q_lora_rank"], rope_parameters=rope,
                                              num_key_value_heads=4)
            self.module = mod.DeepseekV2Attention(self.config, layer_idx=0).eval()
            self.rotary = mod.DeepseekV2RotaryEmbedding(self.config)
        self.kind = kind
        self.config._attn_implementation = "eager"
        _randomize(self.module, seed)

    def __call__(self, x: torch.Tensor, start: int = 0, cache=None) -> torch.Tensor:
        """x (B, T, d_model) at positions start..start+T-1, after `start` cached tokens."""
        B, T, _ = x.shape
        positions = torch.arange(start, start + T)[None].expand(B, -1)
        mask = torch.full((T, start + T), float("-inf")).triu(start + 1)[None, None]  # (1, 1, T, S) additive
        with torch.no_grad():  # the cache is passed by position: transformers renamed it (past_key_values, cache)
            if self.kind == "v3":
                return self.module(x, self.rotary(x, positions), mask, cache)[0]
            return self.module(x, mask, cache, self.rotary(x, positions))[0]

    def package_layer(self, mode: str = "absorbed", absorb_prefill: bool | None = None) -> MultiHeadLatentAttention:
        layer = MultiHeadLatentAttention(mla_config_from_hf(self.config), mode=mode, absorb_prefill=absorb_prefill)
        return load_hf_attention(layer, self.module).eval()


def _decode_package(layer: MultiHeadLatentAttention, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then decode the rest one token at a time through the layer's cache."""
    cache = layer.new_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        outs = [layer(x[:, :prefill], cache=cache)]
        outs += [layer(x[:, t : t + 1], cache=cache) for t in range(prefill, x.shape[1])]
    return torch.cat(outs, dim=1)


CASES = [("v3", name, case) for name, case in V3_CASES.items()] + \
        [("v2", name, case) for name, case in V2_CASES.items()]


@pytest.mark.parametrize("kind,name,case", CASES, ids=[c[1] for c in CASES])
def test_agrees_with_transformers(hf, kind, name, case):
    torch.manual_seed(1)
    ref = HFAttention(hf, kind, case)
    B, T, prefill = 2, 12, 5
    x = torch.randn(B, T, SMALL["hidden_size"])

    full = ref(x)                                                   # prefill of all T tokens, (B, T, d_model)
    cache = hf.DynamicCache(config=ref.config)
    decoded = torch.cat([ref(x[:, :prefill], 0, cache)] +
                        [ref(x[:, t : t + 1], t, cache) for t in range(prefill, T)], dim=1)
    torch.testing.assert_close(decoded, full, **TOL)                # HF agrees with itself
    assert full.abs().max() > 0.1, "outputs too small for the comparison to mean anything"

    for mode, absorb_prefill in MODES:
        layer = ref.package_layer(mode, absorb_prefill)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), full, **TOL, msg=lambda m: f"prefill, mode={mode}: {m}")
        torch.testing.assert_close(_decode_package(layer, x, prefill), decoded, **TOL,
                                   msg=lambda m: f"decode, mode={mode}, absorb_prefill={absorb_prefill}: {m}")


def test_wrong_rope_convention_or_missing_mscale_disagrees(hf):
    """The comparison can fail: half-split RoPE on interleaved weights, or the softmax scale without
    YaRN's mscale, changes the outputs (except at position 0 for the RoPE mix-up, where nothing rotates)."""
    torch.manual_seed(2)
    ref = HFAttention(hf, "v3", V3_CASES["q_lora+yarn+interleave"])
    x = torch.randn(1, 12, SMALL["hidden_size"])
    full = ref(x)
    good = ref.package_layer()
    torch.testing.assert_close(good(x).detach(), full, **TOL)

    wrong_rope = MultiHeadLatentAttention(good.config.replace(rope_interleave=False))
    load_hf_attention(wrong_rope, ref.module)
    with torch.no_grad():
        y = wrong_rope(x)
    torch.testing.assert_close(y[:, :1], full[:, :1], **TOL)         # position 0: no rotation at all
    assert (y[:, 1:] - full[:, 1:]).abs().max() > 1e-2

    no_mscale = ref.package_layer()
    no_mscale.scale = good.config.qk_head_dim ** -0.5                # drop the mscale² factor
    with torch.no_grad():
        y = no_mscale(x)
    torch.testing.assert_close(y[:, :1], full[:, :1], **TOL)         # position 0 attends only to itself
    assert (y - full)[:, 1:].abs().max() > 1e-2


def test_config_from_hf_objects_and_dicts(hf):
    v3 = hf.DeepseekV3Config()  # the library's defaults are DeepSeek-V3's shapes
    cfg = mla_config_from_hf(v3)
    assert (cfg.num_attention_heads, cfg.q_lora_rank, cfg.latent_cache_dim, cfg.qk_head_dim) == (128, 1536, 576, 192)
    assert cfg.rope_scaling is None and cfg.rope_interleave is True

    published_v3 = {  # the fields of deepseek-ai/DeepSeek-V3's config.json that MLA uses
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "num_hidden_layers": 61, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rms_norm_eps": 1e-06, "attention_bias": False,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }
    cfg = mla_config_from_hf(published_v3)
    assert cfg == MLAConfig.deepseek_v3()
    assert round(cfg.softmax_scale, 4) == 0.1352
    # the same through a transformers config object (rope_parameters, rope_type)
    cfg_obj = mla_config_from_hf(hf.DeepseekV3Config(**copy.deepcopy(published_v3)))  # HF edits dicts
    assert cfg_obj.rope_scaling["factor"] == 40 and cfg_obj.softmax_scale == pytest.approx(cfg.softmax_scale)

    lite = dict(published_v3, model_type="deepseek_v2", hidden_size=2048, num_attention_heads=16,
                q_lora_rank=None, num_hidden_layers=27,
                rope_scaling=dict(published_v3["rope_scaling"], mscale=0.707, mscale_all_dim=0.707))
    assert mla_config_from_hf(lite) == MLAConfig.deepseek_v2_lite()


def test_config_from_dict_without_transformers():
    """The package imports and reads config dicts with transformers unavailable."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import mla_tutorial\n"
            "cfg = mla_tutorial.mla_config_from_hf({'hidden_size': 64, 'num_attention_heads': 4, 'q_lora_rank': None,"
            " 'kv_lora_rank': 16, 'qk_nope_head_dim': 8, 'qk_rope_head_dim': 4, 'v_head_dim': 8,"
            " 'rope_parameters': {'rope_type': 'default', 'rope_theta': 500.0}, 'rope_interleave': False})\n"
            "assert cfg.rope_theta == 500.0 and cfg.rope_scaling is None and not cfg.rope_interleave\n"
            "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_rope_variants():
    base = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=512)
    # newer field wins; keys HF adds (rope_theta) are not passed on as YaRN fields
    cfg = mla_config_from_hf(dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4,
                                                         "original_max_position_embeddings": 128}))
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling == {"rope_type": "yarn", "factor": 4,
                                                               "original_max_position_embeddings": 128}
    # a YaRN factor left out is the ratio of the contexts, as in transformers
    cfg = mla_config_from_hf(dict(base, rope_scaling={"type": "yarn", "original_max_position_embeddings": 128}))
    assert cfg.rope_scaling["factor"] == 4
    with pytest.raises(ValueError, match="not supported"):
        mla_config_from_hf(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        mla_config_from_hf(dict(base, attention_bias=True))
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_config_from_hf({"hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(TypeError):
        mla_config_from_hf(42)


def _hf_state_dict(config: MLAConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with HF's names and shapes, built without transformers."""
    g = torch.Generator().manual_seed(seed)
    n_h, d, d_c = config.num_attention_heads, config.hidden_size, config.kv_lora_rank
    qk, d_v, d_R = config.qk_head_dim, config.v_head_dim, config.qk_rope_head_dim
    shapes = {"kv_a_proj_with_mqa.weight": (d_c + d_R, d), "kv_a_layernorm.weight": (d_c,),
              "kv_b_proj.weight": (n_h * (config.qk_nope_head_dim + d_v), d_c), "o_proj.weight": (d, n_h * d_v)}
    if config.q_lora_rank is None:
        shapes["q_proj.weight"] = (n_h * qk, d)
    else:
        shapes.update({"q_a_proj.weight": (config.q_lora_rank, d), "q_a_layernorm.weight": (config.q_lora_rank,),
                       "q_b_proj.weight": (n_h * qk, config.q_lora_rank)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_load_layout_prefix_and_errors():
    config = MLAConfig.tiny()
    sd = _hf_state_dict(config)
    layer = load_hf_attention(MultiHeadLatentAttention(config), sd)
    n_h, d_h, d_c = config.num_attention_heads, config.qk_nope_head_dim, config.kv_lora_rank
    kv_b = sd["kv_b_proj.weight"].view(n_h, d_h + config.v_head_dim, d_c)
    # head 1's key rows come right after head 0's value rows
    torch.testing.assert_close(layer.W_UK[1], sd["kv_b_proj.weight"][d_h + config.v_head_dim:][:d_h], rtol=0, atol=0)
    torch.testing.assert_close(layer.W_UV, kv_b[:, d_h:], rtol=0, atol=0)
    torch.testing.assert_close(layer.W_KR.weight, sd["kv_a_proj_with_mqa.weight"][d_c:], rtol=0, atol=0)
    q_b = sd["q_b_proj.weight"].view(n_h, config.qk_head_dim, -1)
    torch.testing.assert_close(layer.W_QR.weight.view(n_h, config.qk_rope_head_dim, -1), q_b[:, d_h:], rtol=0, atol=0)

    prefix = "model.layers.0.self_attn."
    checkpoint = {prefix + k: v for k, v in sd.items()} | {"model.layers.0.mlp.gate.weight": torch.zeros(1)}
    other = load_hf_attention(MultiHeadLatentAttention(config), checkpoint, prefix=prefix)
    torch.testing.assert_close(other.state_dict(), layer.state_dict(), rtol=0, atol=0)
    with pytest.raises(KeyError, match="pass prefix='model.layers.0.self_attn.'"):
        load_hf_attention(MultiHeadLatentAttention(config), checkpoint, strict=False)

    missing = {k: v for k, v in sd.items() if k != "kv_b_proj.weight"}
    with pytest.raises(KeyError, match="kv_b_proj.weight"):
        load_hf_attention(MultiHeadLatentAttention(config), missing)
    with pytest.raises(ValueError, match="shape"):
        load_hf_attention(MultiHeadLatentAttention(config), sd | {"o_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(NotImplementedError, match="attention_bias"):
        load_hf_attention(MultiHeadLatentAttention(config), sd | {"o_proj.bias": torch.zeros(config.hidden_size)})
    with pytest.raises(KeyError, match="unexpected"):
        load_hf_attention(MultiHeadLatentAttention(config), sd | {"rotary_emb.inv_freq": torch.zeros(2)})
    with pytest.raises(KeyError, match="q_lora_rank=None"):
        load_hf_attention(MultiHeadLatentAttention(config), _hf_state_dict(config.replace(q_lora_rank=None)))
    with pytest.raises(KeyError, match="q_lora_rank"):
        load_hf_attention(MultiHeadLatentAttention(config.replace(q_lora_rank=None)), sd)


def _quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's checkpoint format: float8_e4m3fn values and one fp32 scale per block x block tile
    (weight_scale_inv, multiplied in to dequantize)."""
    rows, cols = w.shape
    tiles = (-(-rows // block), -(-cols // block))
    scale = torch.empty(tiles)
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / 448.0                   # float8_e4m3fn's largest value
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def test_float8_weights_are_dequantized_with_their_block_scales():
    # 200 rows and 160 columns: tiles of 128 with ragged edges, and scales that differ per tile
    config = MLAConfig.tiny().replace(hidden_size=160, num_attention_heads=4, qk_nope_head_dim=32, v_head_dim=18)
    sd = {k: v * (1 + torch.arange(v.shape[0])[:, None] / 40) if v.dim() == 2 else v
          for k, v in _hf_state_dict(config).items()}
    quantized = dict(sd)
    for key in [k for k, v in sd.items() if v.dim() == 2]:
        quantized[key], quantized[key + "_scale_inv"] = _quantize_fp8(sd[key])
    layer = load_hf_attention(MultiHeadLatentAttention(config), quantized)
    reference = load_hf_attention(MultiHeadLatentAttention(config), sd)
    for name, p in layer.state_dict().items():
        ref = reference.state_dict()[name]
        assert (p - ref).abs().max() <= 0.07 * ref.abs().max(), f"{name}: not within float8 rounding"
    # the scales matter: casting the float8 values alone is off by the scale of every tile
    cast_only = quantized["kv_b_proj.weight"].float()
    assert (cast_only - sd["kv_b_proj.weight"]).abs().max() > 10 * sd["kv_b_proj.weight"].abs().max()


def test_the_transformers_floor_is_the_one_pyproject_declares(monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    from mla_tutorial.hf import TRANSFORMERS_MIN, check_transformers_version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    for group in ("hf", "dev"):
        pins = [r for r in project["optional-dependencies"][group] if r.startswith("transformers")]
        assert pins == [f"transformers>={TRANSFORMERS_MIN.removesuffix('.0')}"], (group, pins)
    check_transformers_version("x", TRANSFORMERS_MIN)
    with pytest.raises(ImportError, match=f"x needs transformers >= {TRANSFORMERS_MIN}, found 5.14.1"):
        check_transformers_version("x", "5.14.1")
    with pytest.raises(ImportError, match="found 4.57.6"):
        check_transformers_version("x", "4.57.6")
    check_transformers_version("x", "5.24.0.dev0")
    # config dicts and state dicts need no transformers at all, so no version is checked for them
    hf = sys.modules.get("transformers")
    if hf is not None:
        monkeypatch.setattr(hf, "__version__", "4.57.6")
    cfg = mla_config_from_hf({"hidden_size": 64, "num_attention_heads": 4, "q_lora_rank": None, "kv_lora_rank": 16,
                              "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8})
    load_hf_attention(MultiHeadLatentAttention(cfg), _hf_state_dict(cfg))
