"""GPU sizes from the device (mla_tutorial.sizing), checked with fake device properties: no GPU needed.

The budgets are the book's (3 minutes per notebook on a T4, 1 on an H100); the sizes must respect
the device's memory and grow, never shrink, with a larger or faster device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mla_tutorial import MLAConfig, bench, sizing

T4 = SimpleNamespace(name="Tesla T4", total_memory=15_843_721_216)          # what torch reports on Colab
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_029_158_912)
H200 = SimpleNamespace(name="NVIDIA H200", total_memory=150_096_625_664)
V3 = MLAConfig.deepseek_v3()
BENCH_CONFIG = bench.bench_config(hidden_size=7168)


def test_budgets_from_fake_device_properties():
    t4, h100, h200 = (sizing.gpu_budget(props=p) for p in (T4, H100, H200))
    assert (t4.seconds, h100.seconds, h200.seconds) == (180.0, 60.0, 60.0)       # the book's budgets
    assert (t4.peak_flops_per_s, t4.bandwidth_bytes_per_s) == (65e12, 0.32e12)
    assert (h100.peak_flops_per_s, h200.bandwidth_bytes_per_s) == (989e12, 4.8e12)
    assert t4.memory_bytes == T4.total_memory and "T4 datasheet" in t4.source
    assert sizing.gpu_budget(props=SimpleNamespace(name="NVIDIA H100 PCIe", total_memory=80e9)).peak_flops_per_s == 756e12
    unknown = sizing.gpu_budget(props=SimpleNamespace(name="Mystery GPU 9000", total_memory=24e9))
    assert (unknown.peak_flops_per_s, unknown.seconds) == (65e12, 180.0) and "unknown GPU" in unknown.source
    assert sizing.time_budget_s(312e12) == 120.0                                   # A100 class, in between


def test_seconds_for_is_the_roofline_over_the_efficiency():
    b = sizing.gpu_budget(props=H100)
    flops, nbytes = 1e12, 1e9
    assert b.seconds_for(flops, nbytes) == pytest.approx(max(nbytes / 3.35e12, flops / 989e12) / 0.25 + 2e-3)
    assert b.seconds_for(flops, nbytes, steps=10) == pytest.approx(10 * b.seconds_for(flops, nbytes))
    assert b.plan_seconds == 30.0 and b.plan_memory_bytes == H100.total_memory / 2


def test_layer_run_plan_fits_memory_and_time_and_grows_with_the_device():
    plans = {name: sizing.layer_run_plan(sizing.gpu_budget(props=p), V3,
                                         dtype=torch.float16 if name == "T4" else torch.bfloat16)
             for name, p in (("T4", T4), ("H100", H100), ("H200", H200))}
    assert (plans["T4"].prompt_len, plans["H100"].prompt_len) == (2048, 8192)
    assert plans["T4"].prompt_len <= plans["H100"].prompt_len <= plans["H200"].prompt_len
    for name, p in (("T4", T4), ("H100", H100), ("H200", H200)):
        budget = sizing.gpu_budget(props=p)
        plan = plans[name]
        assert plan.estimated_bytes <= budget.plan_memory_bytes and plan.estimated_s <= budget.plan_seconds
        # the next prompt up would not have fit (else the plan is not the largest)
        bigger = sizing.layer_run_plan(budget.replace(memory_bytes=1e15, seconds=1e6), V3, prompts=(2 * plan.prompt_len,))
        assert bigger.estimated_bytes > budget.plan_memory_bytes or bigger.estimated_s > budget.plan_seconds \
            or plan.prompt_len == 16384


def test_bench_plan_cuts_contexts_to_the_time_budget():
    t4 = sizing.gpu_budget(props=T4)
    full = sizing.bench_plan(t4, BENCH_CONFIG, bench.BENCH_MODES, dtype=torch.float16)
    assert full.contexts == (1024, 4096, 16384, 65536) and full.estimated_s <= t4.plan_seconds
    # a smaller budget drops the longest contexts first: every plan is a prefix of the full one, and
    # a growing budget never takes a context away
    lengths = []
    for seconds in range(8, 60, 2):
        budget = t4.replace(seconds=float(seconds))
        try:
            plan = sizing.bench_plan(budget, BENCH_CONFIG, bench.BENCH_MODES, dtype=torch.float16)
        except ValueError:
            lengths.append(0)
            continue
        assert plan.contexts == full.contexts[:len(plan.contexts)] and plan.estimated_s <= budget.plan_seconds
        lengths.append(len(plan.contexts))
    assert lengths == sorted(lengths) and {0, 1, 2, 3, 4} <= set(lengths), lengths
    with pytest.raises(ValueError, match="shortest context"):
        sizing.bench_plan(t4.replace(seconds=0.01), BENCH_CONFIG, bench.BENCH_MODES)


def test_the_latent_step_it_plans_for():
    """One latent-mode step at 65,536 cached tokens with V3's heads: 2.2 TFLOP (it re-expands every token)."""
    v = sizing._meta_variants(BENCH_CONFIG, ["latent", "hf"], torch.bfloat16)
    assert v["hf"] is v["latent"]
    assert round(v["latent"].flops(1, 65536) / 1e12, 1) == 2.2
    assert next(v["latent"].module.parameters()).device.type == "meta"          # planning allocates nothing


@pytest.mark.parametrize("props, match", [
    (SimpleNamespace(name="x", total_memory=0), "positive total_memory"),
    (SimpleNamespace(name=None, total_memory=1e9), "str name"),
    (SimpleNamespace(total_memory=1e9), "str name"),
])
def test_bad_properties_are_refused(props, match):
    with pytest.raises(ValueError, match=match):
        sizing.gpu_budget(props=props)


def test_cpu_devices_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="CUDA GPUs"):
        sizing.gpu_budget("cpu")
    with pytest.raises(ValueError, match="efficiency"):
        sizing.gpu_budget(props=H100).replace(efficiency=0)
    with pytest.raises(ValueError, match="even the smallest prompt"):
        sizing.layer_run_plan(sizing.gpu_budget(props=SimpleNamespace(name="Tesla T4", total_memory=1e9)), V3)
