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


# --- chapters 04 and 05: the decode sweep and the chunks of queries --------------------------------
def _dtype(name):
    return torch.float16 if name == "T4" else torch.bfloat16


GPUS = {"T4": T4, "H100": H100, "H200": H200}


def test_decode_sweep_plan_fits_and_grows_with_the_device():
    plans = {name: sizing.decode_sweep_plan(sizing.gpu_budget(props=p), V3, dtype=_dtype(name))
             for name, p in GPUS.items()}
    # a T4's 16 GB stop the sweep before 32,768 tokens (the latent mode's re-expanded keys and values
    # alone would take 8 GB); an H100 runs it all
    assert plans["T4"].sizes == sizing.DECODE_SWEEP_CONTEXTS[:-1]
    assert plans["H100"].sizes == plans["H200"].sizes == sizing.DECODE_SWEEP_CONTEXTS
    for name, plan in plans.items():
        budget = sizing.gpu_budget(props=GPUS[name])
        assert plan.repeats == 10 and plan.estimated_s <= budget.plan_seconds
        assert plan.estimated_bytes <= budget.plan_memory_bytes
    t4 = sizing.gpu_budget(props=T4)
    longest = sizing.decode_sweep_plan(t4.replace(memory_bytes=1e15), V3, dtype=torch.float16)
    assert longest.sizes == sizing.DECODE_SWEEP_CONTEXTS and longest.estimated_bytes > t4.plan_memory_bytes


def test_decode_sweep_memory_counts_the_caches_and_the_expansion():
    from mla_tutorial import kv_cache_bytes

    roomy = sizing.gpu_budget(props=H100).replace(memory_bytes=1e15, seconds=1e6)
    L = 8192
    one = sizing.decode_sweep_plan(roomy, V3, dtype=torch.bfloat16, contexts=[L])
    two = sizing.decode_sweep_plan(roomy, V3, dtype=torch.bfloat16, contexts=[L], layers=2)

    def cache(mode=None):
        return kv_cache_bytes(V3, L + 1, dtype=torch.bfloat16, mode=mode, num_layers=1)

    caches, expanded_kv = cache("expanded") + cache(), 3 * cache("expanded")
    weights = two.estimated_bytes - one.estimated_bytes                      # one layer's weights
    assert 300e6 < weights < 450e6                                          # V3's attention: 187M parameters in bf16
    assert one.estimated_bytes >= weights + caches + expanded_kv
    # absorbed alone re-expands nothing: its memory is the weights and the small latent cache
    absorbed = sizing.decode_sweep_plan(roomy, V3, ("absorbed",), dtype=torch.bfloat16, contexts=[L])
    assert absorbed.estimated_bytes < weights + 2 * cache() + 1e6


def test_a_smaller_time_budget_drops_the_longest_contexts_first():
    t4 = sizing.gpu_budget(props=T4).replace(memory_bytes=1e15)
    full = sizing.decode_sweep_plan(t4, V3, dtype=torch.float16)
    lengths = []
    for seconds in (0.2, 0.3, 0.5, 1.0, 2.0, 4.0):
        plan = sizing.decode_sweep_plan(t4, V3, dtype=torch.float16, seconds=seconds)
        assert plan.sizes == full.sizes[:len(plan.sizes)] and plan.estimated_s <= seconds
        lengths.append(len(plan.sizes))
    assert lengths == sorted(lengths) and len(set(lengths)) > 2, lengths
    with pytest.raises(ValueError, match="even the smallest context"):
        sizing.decode_sweep_plan(t4, V3, dtype=torch.float16, seconds=0.01)


def test_chunk_sweep_plan_and_chapter_05s_two_halves():
    for name, props in GPUS.items():
        budget = sizing.gpu_budget(props=props)
        chunks, contexts = sizing.absorption_plan(budget, V3, dtype=_dtype(name))
        assert chunks.estimated_s <= budget.plan_seconds / 2 and contexts.estimated_s <= budget.plan_seconds / 2
        assert max(chunks.estimated_bytes, contexts.estimated_bytes) <= budget.plan_memory_bytes
        assert chunks.sizes == sizing.ABSORPTION_CHUNKS[:len(chunks.sizes)]
        assert contexts.sizes == sizing.DECODE_SWEEP_CONTEXTS[:len(contexts.sizes)]
    t4_chunks, t4_contexts = sizing.absorption_plan(sizing.gpu_budget(props=T4), V3, dtype=torch.float16)
    h100_chunks, h100_contexts = sizing.absorption_plan(sizing.gpu_budget(props=H100), V3)
    # 1,024 queries over 5,120 keys and 128 heads: 0.67 G scores, 9 GB in fp32 with their softmax
    assert t4_chunks.sizes[-1] == 512 and h100_chunks.sizes[-1] == 1024
    assert t4_contexts.sizes[-1] == 16384 and h100_contexts.sizes[-1] == 32768
    # more cached tokens before the chunk cost more
    roomy = sizing.gpu_budget(props=H100).replace(memory_bytes=1e15, seconds=1e6)
    short, long = (sizing.chunk_sweep_plan(roomy, V3, prefix=p) for p in (256, 16384))
    assert long.estimated_s > short.estimated_s and long.estimated_bytes > short.estimated_bytes


@pytest.mark.parametrize("call, error, match", [
    (lambda b: sizing.decode_sweep_plan(b, V3, ("hf",)), ValueError, "unknown MLA mode"),
    (lambda b: sizing.decode_sweep_plan(b, V3, "latent"), ValueError, "sequence of MLA modes"),
    (lambda b: sizing.decode_sweep_plan(b, V3, contexts=[]), ValueError, "non-empty sequence"),
    (lambda b: sizing.decode_sweep_plan(b, V3, contexts=[512, 1024.0]), TypeError, "contexts must be an int"),
    (lambda b: sizing.decode_sweep_plan(b, V3, repeats=0), ValueError, "repeats must be a positive"),
    (lambda b: sizing.decode_sweep_plan(b, V3, layers=0), ValueError, "layers must be a positive"),
    (lambda b: sizing.decode_sweep_plan(b, V3, seconds=-1.0), ValueError, "seconds must be > 0"),
    (lambda b: sizing.decode_sweep_plan("Tesla T4", V3), TypeError, "must be a GPUBudget"),
    (lambda b: sizing.chunk_sweep_plan(b, V3, prefix=-1), ValueError, "prefix must be an integer >= 0"),
    (lambda b: sizing.chunk_sweep_plan(b, V3, chunks=[0]), ValueError, "chunks must be a positive"),
    (lambda b: sizing.absorption_plan(None, V3), TypeError, "must be a GPUBudget"),
])
def test_bad_sweep_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call(sizing.gpu_budget(props=T4))


def test_chapters_04_and_05_size_their_gpu_branches_with_the_planners():
    """The chapters' GPU sizes come from these planners (the sizes tested above), not fixed lists."""
    import json
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for name, planner in (("04_latent_compression", "sizing.decode_sweep_plan("),
                          ("05_weight_absorption", "sizing.absorption_plan(")):
        cells = json.loads((root / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert planner in code and "sizing.gpu_budget(device)" in code, name
        assert "32768]" not in code, f"{name} still sweeps a fixed list of GPU contexts"
