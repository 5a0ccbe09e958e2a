"""The interactive figures (book/_static/interactive-figures.js) compute what the package computes.

In headless Chromium, offline (the fixtures of tests/test_browser.py), the explorer page's three
figures are driven like a reader would: pick a preset, type into a field, move a slider. After
each change the numbers the page shows (the text, and the unrounded value in `data-value`) are
compared with the package's own functions for the same settings: `kv_cache_elements`,
`kv_cache_bytes`, `roofline.max_batch` / `decode_step` / `max_throughput`,
`arithmetic_intensity`, `yarn_inv_freq`, `MLAConfig.softmax_scale`, and
`MultiHeadLatentAttention.uses_absorbed_path`, whose FLOP counts are measured with
`torch.utils.flop_counter`. Skipped, like the browser test, without Chromium and chromedriver.
"""

from __future__ import annotations

import inspect
import math
import time

import pytest
import torch
from test_browser import built_book, driver, server  # noqa: F401  (shared session fixtures)
from torch.utils.flop_counter import FlopCounterMode

from mla_tutorial import (ATTENTION_PRESETS, AttentionConfig, MLAConfig, MultiHeadLatentAttention,
                          arithmetic_intensity, kv_cache_bytes, kv_cache_elements, yarn_inv_freq)
from mla_tutorial import roofline as rf

REL = 1e-12  # same formulas in float64 on both sides

SET_AND_READ = """
const [kind, values] = arguments;  // values: [[control, value], ...], applied in order
const root = document.querySelector('.interactive-figure[data-figure="' + kind + '"]');
for (const [name, value] of values) {
  const slider = name.startsWith("slider:");
  const input = root.querySelector(slider ? '[data-slider="' + name.slice(7) + '"]' : '[data-control="' + name + '"]');
  if (!input) throw new Error("no control " + name);
  input.value = String(value);
  input.dispatchEvent(new Event(input.tagName === "SELECT" ? "change" : "input", {bubbles: true}));
}
const out = {controls: {}, invFreq: root.dataset.invFreq ? JSON.parse(root.dataset.invFreq) : null,
             presets: [...root.querySelectorAll('[data-control="preset"] option')].map(o => o.value)};
root.querySelectorAll("[data-output]").forEach(e => { out[e.dataset.output] = {value: e.dataset.value, text: e.textContent}; });
root.querySelectorAll("[data-control]").forEach(e => { out.controls[e.dataset.control] = e.value; });
return out;
"""


def sig(x: float, digits: int = 3) -> str:
    """The page's number format (fmtSig): `digits` significant digits, thousands separators."""
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:,.{decimals}f}"


@pytest.fixture(scope="module")
def page(server, driver):
    driver.get(f"{server}/book/explorer.html")
    deadline = time.monotonic() + 20
    while driver.execute_script("return document.querySelectorAll('.interactive-figure[data-ready]').length") < 3:
        assert time.monotonic() < deadline, "the explorer's figures were not drawn"
        time.sleep(0.1)

    def set_and_read(kind: str, **values) -> dict:
        # a list, not a dict: the order of the changes matters, and a dict reaches the page sorted
        return driver.execute_script(SET_AND_READ, kind, [[k.replace("__", ":"), v] for k, v in values.items()])
    yield set_and_read
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors on the explorer page: {errors}"


def close(shown: dict, expected: float, rel: float = REL) -> bool:
    return shown["value"] != "" and math.isclose(float(shown["value"]), expected, rel_tol=rel, abs_tol=1e-300)


# --- the cache and throughput explorer -----------------------------------------------------------
H800, H200 = rf.H800, rf.H200
EXPLORER_CASES = {
    # DeepSeek-V2 as the paper serves it: 6-bit cache, FP8 weights, one node of 8 H800s
    "v2-paper": (dict(preset="DeepSeek-V2", mode="absorbed", accelerator="H800 SXM", count=8, usable=90, context=4096, batch=64),
                 MLAConfig.deepseek_v2(), None, rf.deepseek_v2(), rf.paper_node()),
    "67b-long": (dict(preset="DeepSeek-67B", accelerator="H800 SXM", count=8, usable=90, context=32768, batch=8),
                 ATTENTION_PRESETS["DeepSeek-67B"], None, rf.deepseek_67b(), rf.paper_node()),
    "v3-16-gpus": (dict(preset="DeepSeek-V3", mode="absorbed", accelerator="H800 SXM", count=16, usable=90, context=16384, batch=100),
                   MLAConfig.deepseek_v3(), None, rf.deepseek_v3(), rf.Node(H800, 16)),
    # every field edited: an expanded cache in fp8, BF16 weights, 4 H200s at 80% memory
    "custom-expanded": (
        dict(preset="DeepSeek-V3", mode="expanded", n_h=64, d_c=256, d_h_R=32, d_v=96, layers=30,
             accelerator="H200 SXM", count=4, usable=80, context=2048, batch=3, dtype="1",
             total_b=100, active_b=10, weight_bytes="2"),
        MLAConfig.deepseek_v3().replace(num_attention_heads=64, kv_lora_rank=256, qk_rope_head_dim=32,
                                        v_head_dim=96, num_hidden_layers=30), "expanded",
        rf.DecodeModel.from_config(MLAConfig.deepseek_v3().replace(
            num_attention_heads=64, kv_lora_rank=256, qk_rope_head_dim=32, v_head_dim=96, num_hidden_layers=30),
            100e9, 10e9, mode="expanded", weight_bytes_per_param=2, cache_bytes_per_element=1),
        rf.Node(H200, 4, 0.8)),
    # a preset the roofline has no parameters for, once they are typed in
    "llama-typed-params": (
        dict(preset="Llama-3-8B", accelerator="H200 SXM", count=1, usable=90, context=8192, batch=16, dtype="2",
             total_b=8, active_b=8, weight_bytes="2"),
        ATTENTION_PRESETS["Llama-3-8B"], None,
        rf.DecodeModel.from_config(ATTENTION_PRESETS["Llama-3-8B"], 8e9, 8e9, weight_bytes_per_param=2,
                                   cache_bytes_per_element=2),
        rf.Node(H200, 1)),
}


@pytest.mark.parametrize("case", EXPLORER_CASES)
def test_cache_explorer_matches_the_package(page, case):
    values, config, mode, model, node = EXPLORER_CASES[case]
    shown = page("cache-explorer", **values)
    context, batch = values["context"], values["batch"]
    bpe = model.cache_bytes_per_element
    step = rf.decode_step(model, node, batch, context)
    best = rf.max_throughput(model, node, context)
    mha = AttentionConfig.from_mla(config) if isinstance(config, MLAConfig) else \
        AttentionConfig(config.name, config.hidden_size, config.num_attention_heads, config.num_attention_heads,
                        config.head_dim, config.num_hidden_layers)
    expected = {
        "cache_elements": kv_cache_elements(config, mode),
        "cache_bytes_per_token": kv_cache_bytes(config, dtype=bpe, mode=mode),
        "vs_mha": kv_cache_elements(mha) / kv_cache_elements(config, mode),
        "cache_total": kv_cache_bytes(config, context, batch, dtype=bpe, mode=mode),
        "weights": model.weight_bytes,
        "room": node.usable_memory_bytes - model.weight_bytes,
        "max_batch": rf.max_batch(model, node, context),
        "step": step.step_time_s,
        "tokens_per_s": step.tokens_per_s,
        "max_tokens_per_s": best.tokens_per_s,
        "intensity": arithmetic_intensity(config, mode, bpe),
    }
    assert model.cache_bytes_per_token == expected["cache_bytes_per_token"]
    problems = [f"{name}: page shows {shown[name]['value']!r} ({shown[name]['text']!r}), package {value!r}"
                for name, value in expected.items() if not close(shown[name], value)]
    # the text a reader sees
    texts = {"cache_elements": f"{expected['cache_elements']:,} values",
             "cache_bytes_per_token": f"{expected['cache_bytes_per_token']:,.0f} B",
             "vs_mha": f"{sig(expected['vs_mha'])}x",
             "max_batch": f"{expected['max_batch']:,} sequence",
             "step": f"{sig(step.step_time_s * 1e3)} ms, {step.bound}-bound",
             "tokens_per_s": f"{step.tokens_per_s:,.0f} tokens/s",
             "max_tokens_per_s": f"{best.tokens_per_s:,.0f} tokens/s ({best.bound}-bound)",
             "intensity": sig(expected["intensity"])}
    problems += [f"{name}: page shows {shown[name]['text']!r}, expected it to contain {text!r}"
                 for name, text in texts.items() if text not in shown[name]["text"]]
    assert not problems, f"{case}:\n  " + "\n  ".join(problems)


def test_cache_explorer_asks_for_parameters_it_does_not_have(page):
    shown = page("cache-explorer", preset="Qwen2.5-72B", context=4096, batch=1)
    config = ATTENTION_PRESETS["Qwen2.5-72B"]
    assert shown["controls"]["total_b"] == "" and shown["controls"]["attention"] == "standard"
    assert close(shown["cache_bytes_per_token"], kv_cache_bytes(config, dtype=2)), shown["cache_bytes_per_token"]
    assert shown["max_batch"]["value"] == "" and shown["max_batch"]["text"] == "—", shown["max_batch"]
    # an invalid field is named instead of a silently wrong number
    shown = page("cache-explorer", n_kv=7)
    assert shown["cache_elements"]["text"] == "—", shown["cache_elements"]
    shown = page("cache-explorer", preset="DeepSeek-V3", mode="absorbed")
    assert close(shown["cache_elements"], kv_cache_elements(MLAConfig.deepseek_v3()))


def test_every_package_preset_is_offered(page):
    mla_presets = [method() for _, method in inspect.getmembers(MLAConfig, inspect.ismethod)
                   if not inspect.signature(method).parameters]
    assert {"DeepSeek-V3", "DeepSeek-V2", "tiny"} <= {c.name for c in mla_presets}, mla_presets
    wanted = {c.name for c in mla_presets} | set(ATTENTION_PRESETS)
    offered = set(page("cache-explorer")["presets"])
    assert wanted <= offered, f"presets missing from the explorer: {sorted(wanted - offered)}"
    with_yarn = {c.name for c in mla_presets if c.rope_scaling}
    offered = set(page("yarn-ramp")["presets"])
    assert with_yarn <= offered, f"presets missing from the YaRN figure: {sorted(with_yarn - offered)}"


# --- YaRN's frequency ramp -----------------------------------------------------------------------
def _yarn_expected(config: MLAConfig) -> dict:
    inv_freq, attention_factor = yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
    base = 1.0 / (config.rope_theta ** (torch.arange(0, config.qk_rope_head_dim, 2, dtype=torch.float64)
                                        / config.qk_rope_head_dim))
    factor = config.rope_scaling["factor"]
    kept = int(torch.isclose(inv_freq.double(), base, rtol=1e-6).sum())
    interpolated = int(torch.isclose(inv_freq.double(), base / factor, rtol=1e-6).sum()) if factor > 1 else 0
    return {"inv_freq": inv_freq, "attention_factor": attention_factor, "softmax_scale": config.softmax_scale,
            "kept": kept, "interpolated": interpolated}


def _check_yarn(shown: dict, config: MLAConfig) -> list[str]:
    want = _yarn_expected(config)
    problems = []
    page_inv = torch.tensor(shown["invFreq"], dtype=torch.float64)
    if page_inv.shape != want["inv_freq"].shape or not torch.allclose(page_inv, want["inv_freq"].double(), rtol=2e-6):
        problems.append(f"frequencies: page {page_inv.tolist()[:6]}..., package {want['inv_freq'].tolist()[:6]}...")
    for name in ("attention_factor", "softmax_scale"):
        if not close(shown[name], want[name]):
            problems.append(f"{name}: page {shown[name]}, package {want[name]!r}")
    if sig(want["softmax_scale"], 4) not in shown["softmax_scale"]["text"]:
        problems.append(f"softmax scale text {shown['softmax_scale']['text']!r}")
    for name in ("kept", "interpolated"):
        if shown[name]["value"] != str(want[name]):
            problems.append(f"{name}: page {shown[name]}, package {want[name]}")
    return problems


@pytest.mark.parametrize("preset", [c.name for c in (MLAConfig.deepseek_v3(), MLAConfig.deepseek_v2(),
                                                     MLAConfig.kimi_k2(), MLAConfig.tiny())])
def test_yarn_ramp_matches_the_package(page, preset):
    config = next(c for c in (MLAConfig.deepseek_v3(), MLAConfig.deepseek_v2(), MLAConfig.kimi_k2(), MLAConfig.tiny())
                  if c.name == preset)
    problems = _check_yarn(page("yarn-ramp", preset=preset), config)
    assert not problems, f"{preset}:\n  " + "\n  ".join(problems)


def test_yarn_ramp_follows_its_sliders(page):
    v3 = MLAConfig.deepseek_v3()
    # the scale-factor slider itself, as a reader drags it
    shown = page("yarn-ramp", preset="DeepSeek-V3", slider__factor=8)
    assert shown["controls"]["factor"] == "8" and shown["controls"]["preset"] == "custom", shown["controls"]
    problems = _check_yarn(shown, v3.replace(rope_scaling={**v3.rope_scaling, "factor": 8}))
    # fields typed in: a wider RoPE key, another base, a longer original context, other betas
    shown = page("yarn-ramp", d_h_R=32, theta=50000, original=8192, beta_fast=16, beta_slow=2, mscale_all_dim=0.707)
    custom = v3.replace(qk_rope_head_dim=32, rope_theta=50000.0, rope_scaling={
        **v3.rope_scaling, "factor": 8, "original_max_position_embeddings": 8192, "beta_fast": 16, "beta_slow": 2,
        "mscale_all_dim": 0.707})
    problems += _check_yarn(shown, custom)
    assert not problems, "\n  ".join(problems)


# --- absorb or expand ------------------------------------------------------------------------------
def _narrow(config: MLAConfig) -> MultiHeadLatentAttention:
    """A layer with the config's attention dims and a small model width (the switch depends on
    d_c, d_h, d_v only), so that asking the package's switch is cheap."""
    return MultiHeadLatentAttention(config.replace(hidden_size=64, q_lora_rank=None))


def _crossover(layer: MultiHeadLatentAttention, S: int) -> int:
    return max(T for T in range(1, S + 1) if layer.uses_absorbed_path(T, S))


@pytest.mark.parametrize("preset,S,T", [("DeepSeek-V3", 4096, 16), ("DeepSeek-V3", 4096, 512),
                                        ("DeepSeek-V2-Lite", 65536, 1), ("Kimi-K2", 1024, 100)])
def test_absorb_crossover_matches_the_package_switch(page, preset, S, T):
    config = next(c for c in (MLAConfig.deepseek_v3(), MLAConfig.deepseek_v2_lite(), MLAConfig.kimi_k2())
                  if c.name == preset)
    shown = page("absorb-crossover", preset=preset, S=S, T=T)
    layer = _narrow(config)
    choice = "absorbed" if layer.uses_absorbed_path(T, S) else "expanded"
    assert shown["choice"]["value"] == choice, (preset, S, T, shown["choice"], choice)
    assert shown["crossover"]["value"] == str(_crossover(layer, S)), (shown["crossover"], _crossover(layer, S))


def test_absorb_crossover_flops_match_a_flop_counter(page):
    """The FLOPs the figure shows, against the package's layer measured with a FLOP counter."""
    config = MLAConfig.tiny().replace(kv_lora_rank=64, qk_nope_head_dim=16, v_head_dim=16)
    S = 256
    shown_by_T = {}
    page("absorb-crossover", preset="custom", n_h=config.num_attention_heads, d_c=64, d_h=16, d_v=16,
         d_h_R=config.qk_rope_head_dim, S=S)
    for T in (4, 32):
        shown_by_T[T] = page("absorb-crossover", T=T)
    torch.manual_seed(0)
    measured = {}
    for absorb in (True, False):
        layer = MultiHeadLatentAttention(config, absorb_prefill=absorb).eval()
        for T in shown_by_T:
            cache = layer.new_cache(1, S)
            with torch.no_grad():
                layer(torch.randn(1, S - T, config.hidden_size), cache=cache)
                with FlopCounterMode(display=False) as counter:
                    layer(torch.randn(1, T, config.hidden_size), cache=cache)
            measured[absorb, T] = counter.get_total_flops()
    switch = MultiHeadLatentAttention(config)
    for T, shown in shown_by_T.items():
        # the paths share their projections; what differs is what the figure counts
        assert float(shown["difference"]["value"]) == measured[True, T] - measured[False, T], (T, shown, measured)
        assert shown["choice"]["value"] == ("absorbed" if switch.uses_absorbed_path(T, S) else "expanded")
    assert shown_by_T[4]["choice"]["value"] == "absorbed" and shown_by_T[32]["choice"]["value"] == "expanded"


# --- the figures embedded in the chapters ------------------------------------------------------------
def _open_figure_page(server, driver, rel: str, kind: str):
    driver.get(f"{server}/{rel}.html")
    deadline = time.monotonic() + 20
    ready = f"return document.querySelectorAll('.interactive-figure[data-figure=\"{kind}\"][data-ready]').length"
    while driver.execute_script(ready) < 1:
        assert time.monotonic() < deadline, f"the {kind} figure on {rel} was not drawn"
        time.sleep(0.1)
    return lambda **values: driver.execute_script(SET_AND_READ, kind, [[k.replace("__", ":"), v]
                                                                       for k, v in values.items()])


def test_chapter_05_absorb_crossover_moves(server, driver):
    set_and_read = _open_figure_page(server, driver, "notebooks/05_weight_absorption", "absorb-crossover")
    layer = _narrow(MLAConfig.deepseek_v3())
    for S, T in ((4096, 16), (4096, 512)):
        shown = set_and_read(preset="DeepSeek-V3", S=S, T=T)
        assert shown["choice"]["value"] == ("absorbed" if layer.uses_absorbed_path(T, S) else "expanded"), shown
        assert shown["crossover"]["value"] == str(_crossover(layer, S)), shown["crossover"]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors on chapter 05: {errors}"


def test_chapter_06_yarn_ramp_moves(server, driver):
    set_and_read = _open_figure_page(server, driver, "notebooks/06_decoupled_rope", "yarn-ramp")
    v3 = MLAConfig.deepseek_v3()
    problems = _check_yarn(set_and_read(preset="DeepSeek-V3"), v3)
    shown = set_and_read(slider__factor=8)
    assert shown["controls"]["factor"] == "8", shown["controls"]
    problems += _check_yarn(shown, v3.replace(rope_scaling={**v3.rope_scaling, "factor": 8}))
    assert not problems, "\n  ".join(problems)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors on chapter 06: {errors}"
