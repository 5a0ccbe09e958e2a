"""The decode benchmark (mla_tutorial.bench): it runs end to end at tiny sizes, writes valid JSON
with the fields chapter 08 reads, times only the steps after the warm-up, counts bytes and FLOPs
from the shapes, and benchmarks transformers' DeepseekV3Attention on the same weights.
Timings are never asserted: this is a benchmark, not a timed test."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mla_tutorial import bench
from mla_tutorial.roofline import attention_flops_per_cached_token

TINY = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8)
MACHINE = {"bandwidth_bytes_per_s": 1e10, "peak_flops_per_s": 1e11}
TOP_FIELDS = {"schema", "date", "device", "torch", "python", "dtype", "config", "machine", "decode", "prefill",
              "summary", "repeats", "warmup"}
ROW_FIELDS = {"mode", "context", "batch", "bytes", "flops", "bound_s", "bound", "cache_bytes_per_token",
              "weight_bytes", "times_s", "median_s", "tokens_per_s", "fraction_of_bound"}


def test_cli_runs_end_to_end_and_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["--device", "cpu", "--dtype", "float32", "--contexts", "8,24", "--batch-sizes", "1,2",
            "--modes", "mha,gqa,mqa,expanded,latent,absorbed", "--hidden-size", "64", "--heads", "4",
            "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "4",
            "--v-head-dim", "8", "--gqa-heads", "2", "--repeats", "1", "--rounds", "2", "--warmup", "1",
            "--prefill-tokens", "16", "--prefill-repeats", "1", "--out", str(out), "--plot", str(png), "--quiet"]
    start = time.perf_counter()
    bench.main(args)
    assert time.perf_counter() - start < 60
    result = json.loads(out.read_text())
    assert TOP_FIELDS <= set(result)
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    assert result["torch"] == torch.__version__ and result["dtype"] == "float32"
    assert result["config"]["num_attention_heads"] == 4 and result["config"]["kv_lora_rank"] == 16
    assert len(result["decode"]) == 6 * 2 * 2
    for row in result["decode"]:
        assert ROW_FIELDS <= set(row), row
        assert len(row["times_s"]) == 2 and row["median_s"] > 0     # 1 step in each of 2 rounds
        assert row["bound_s"] == max(row["memory_bound_s"], row["compute_bound_s"])
    assert {p["mode"] for p in result["prefill"]} == {"absorbed", "expanded"}
    assert all(len(p["times_s"]) == 2 for p in result["prefill"])
    assert len(result["machine_measurements"]) == 2 and result["rounds"] == 2
    assert result["machine"]["peak_flops_per_s"] == max(m["peak_flops_per_s"] for m in result["machine_measurements"])
    assert result["command"].startswith("python -m mla_tutorial.bench --device cpu")
    assert result["summary"]["context"] == 24 and "absorbed_speedup_vs_mha" in result["summary"]
    assert png.stat().st_size > 1000


def test_bad_arguments_are_refused(capsys):
    for args in (["--modes", "mha,flash"], ["--contexts", "0"], ["--batch-sizes", "a"]):
        with pytest.raises(SystemExit):
            bench.main(args)
    assert "unknown modes" in capsys.readouterr().err


def test_warmup_steps_are_not_timed():
    calls = []

    def slow_first():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)

    times = bench._repeat_times(slow_first, torch.device("cpu"), repeats=3, warmup=1)
    assert len(calls) == 4 and len(times) == 3
    assert max(times) < 0.3


def test_bytes_and_flops_come_from_the_shapes():
    config = bench.bench_config(**TINY)
    v = bench.make_variants(config, ["mha", "gqa", "absorbed", "expanded"], gqa_heads=2)
    n_h, d, B, L = 4, 8, 3, 10
    mha = v["mha"]
    assert mha.weight_bytes == 4 * 64 * n_h * d * 4                  # W_Q, W_K, W_V, W_O in fp32
    assert mha.cache_bytes_per_token == 2 * n_h * d * 4
    assert v["gqa"].cache_bytes_per_token == 2 * 2 * d * 4
    assert mha.bytes(B, L) == mha.weight_bytes + B * (L + 1) * 2 * n_h * d * 4
    assert mha.flops(B, L) == B * (2 * mha.matrix_params + (L + 1) * 4 * n_h * d)
    absorbed = v["absorbed"]
    assert absorbed.cache_bytes_per_token == (16 + 4) * 4
    assert v["expanded"].cache_bytes_per_token == n_h * (12 + 8) * 4
    assert absorbed.flops(1, L) == 2 * absorbed.matrix_params + (L + 1) * attention_flops_per_cached_token(config)
    # the prepared cache holds exactly `context` tokens, and stays so after each step
    absorbed.prepare(B, L)
    absorbed.step()
    assert absorbed.cache.length == L
    absorbed.release()


def test_hf_decodes_like_the_package_on_the_same_weights():
    from mla_tutorial.hf import TRANSFORMERS_MIN
    pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN)
    config = bench.bench_config(**TINY)
    v = bench.make_variants(config, ["latent", "absorbed", "hf"])
    assert torch.equal(v["hf"].module.o_proj.weight, v["absorbed"].module.W_O.weight)
    outs = {}
    with torch.inference_mode():
        for mode in ("latent", "absorbed", "hf"):
            v[mode].prepare(2, 20, seed=3)
            outs[mode] = v[mode].step()
            outs[mode + "2"] = v[mode].step()  # after rolling back, the same step again
    assert v["hf"].cache.get_seq_length() == 20
    for mode in ("latent", "hf"):
        torch.testing.assert_close(outs[mode], outs["absorbed"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["hf2"], outs["hf"])
    assert outs["absorbed"].abs().max() > 1e-3


def test_run_benchmark_skips_what_does_not_fit_and_summarizes():
    config = bench.bench_config(**TINY)
    result = bench.run_benchmark(device="cpu", dtype=torch.float32, contexts=[16, 10**7], batch_sizes=[1],
                                 modes=["mha", "absorbed"], config=config, repeats=1, rounds=1, warmup=0,
                                 prefill_tokens=0, progress=False, machine=MACHINE, max_memory_bytes=5e6)
    skipped = {(r["mode"], r["context"]) for r in result["decode"] if "skipped" in r}
    assert skipped == {("mha", 10**7), ("absorbed", 10**7)}               # 2.6 GB and 0.8 GB of cache
    assert all("median_s" in r for r in result["decode"] if r["context"] == 16)
    assert result["prefill"] == [] and result["summary"]["context"] == 16
    with pytest.raises(MemoryError, match=r"no decode case fits in memory.*shorter contexts"):
        bench.run_benchmark(device="cpu", dtype=torch.float32, contexts=[10**7], modes=["mha"], config=config,
                            prefill_tokens=0, progress=False, machine=MACHINE, max_memory_bytes=5e6)


def test_machine_measurements_are_positive():
    cpu = torch.device("cpu")
    for value in (bench.measure_bandwidth(cpu, torch.float32, nbytes=4 * 2**20, repeats=2),
                  bench.measure_peak_flops(cpu, torch.float32, n=128, repeats=2)):
        assert 0 < value < float("inf")


def test_recorded_results_load_with_the_fields_the_book_reads():
    recorded = bench.load_results()
    assert recorded, f"no recorded results in {bench.results_dir()}"
    for r in recorded:
        assert TOP_FIELDS <= set(r), r["path"]
        assert r["device"]["type"] in ("cpu", "cuda", "mps")
        assert all("median_s" in row or "skipped" in row for row in r["decode"])
    assert all(r["device"]["type"] == "cpu" for r in bench.load_results(device_type="cpu"))


@pytest.mark.parametrize("heads,dk,dv", [(128, 192, 128), (64, 64, 96)])
def test_long_cpu_prefill_attention_is_the_plain_formula(heads, dk, dv):
    """attention() pads keys/values to equal widths for long CPU prefills (so PyTorch's fused
    kernel runs in O(T) memory, which the 4,096-token prefill benchmark needs): same result."""
    from mla_tutorial.attention import _CPU_PAD_MIN_SCORES, attention

    T = 1024 if heads == 128 else 1100
    assert heads * T * T >= _CPU_PAD_MIN_SCORES                     # the padded path is taken
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, T, dk, generator=gen) for _ in range(2))
    v = torch.randn(1, heads, T, dv, generator=gen)
    scores = (q @ k.transpose(-1, -2)) * dk**-0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, dk**-0.5), expected, atol=1e-5, rtol=1e-5)


def test_the_matmul_peak_is_measured_within_its_time_budget(monkeypatch):
    """A dtype with no fast kernels (fp16 on many CPUs: minutes for 11 products of 2048 x 2048) is
    measured at the sizes that fit the budget, not at 2048."""
    sizes, real_mm = [], torch.mm

    def slow_mm(a, b):                     # 0.1 s for a 256 x 256 product, 8x more per doubling
        sizes.append(a.shape[0])
        time.sleep(0.1 * (a.shape[0] / 256) ** 3)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", slow_mm)
    start = time.perf_counter()
    peak = bench.measure_peak_flops(torch.device("cpu"), torch.float16, max_seconds=1.0)
    assert time.perf_counter() - start < 2.5
    assert max(sizes) == 256 and 0 < peak < 2 * 256**3 / 0.1


def test_a_run_is_refused_before_work_when_its_lower_bound_exceeds_max_minutes(monkeypatch):
    config = bench.bench_config(**TINY)
    slow = {"bandwidth_bytes_per_s": 1e9, "peak_flops_per_s": 6e8}
    monkeypatch.setattr(bench, "time_decode", lambda *a, **k: pytest.fail("a refused run must time nothing"))
    kwargs = dict(device="cpu", dtype=torch.float32, contexts=[10**6], modes=["latent"], config=config, repeats=100,
                  rounds=2, warmup=0, prefill_tokens=0, progress=False, machine=slow)
    with pytest.raises(ValueError, match=r"would take at least \d+ minutes"):
        bench.run_benchmark(**kwargs, max_minutes=1)
    # the estimate counts every step at its roofline bound: twice the steps, twice the time
    v = bench.make_variants(config, ["latent"])
    one = bench.plan.estimate_seconds(v, [("latent", 10**6, 1)], {}, 1, 10, 0, slow)
    assert bench.plan.estimate_seconds(v, [("latent", 10**6, 1)], {}, 2, 10, 0, slow) == pytest.approx(2 * one)
    step = max(v["latent"].bytes(1, 10**6) / 1e9, v["latent"].flops(1, 10**6) / 6e8)
    assert 10 * step < one < 10 * step * 1.1      # plus writing the cache once


def test_output_paths_are_checked_before_the_run_and_left_as_they_were(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_benchmark", lambda **k: pytest.fail("the run started before the paths were checked"))
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "new" / "r.json"), "--plot", "/proc/none/r.png"])
    assert "--plot '/proc/none/r.png' cannot be written" in capsys.readouterr().err
    assert list((tmp_path / "new").iterdir()) == [], "checking a path must not leave a file behind"
    assert bench._parser().parse_args(["--max-minutes", "inf"]).max_minutes is None
