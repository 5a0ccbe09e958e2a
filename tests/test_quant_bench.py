"""The quantized-cache measurement (a small run), bytes fed to the throughput model, and TP caches."""

import json

import pytest
import torch

from mla_tutorial import AttentionConfig, MLAConfig
from mla_tutorial import roofline as rf
from mla_tutorial.bench import bench_config
from mla_tutorial.parallel import parallel_cache
from mla_tutorial.quant_bench import (format_rows, load_quant_results, main, measure_quant_error,
                                      probe_positions, quant_results_dir)

SMALL = bench_config(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=128,
                     qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def test_probe_positions_spread_to_the_last_token():
    p = probe_positions(4096, 9)
    assert p[0] == 16 and p[-1] == 4095 and p == sorted(set(p)) and len(p) == 9
    with pytest.raises(ValueError, match="max_context"):
        probe_positions(8, 4)


def test_a_small_run_records_every_format_and_regime(tmp_path):
    result = measure_quant_error(config=SMALL, max_context=200, num_probes=4, progress=False)
    assert set(result["regimes"]) == {"plain", "sharp", "outliers"} and len(result["probes"]) == 4
    for key in ("date", "device", "torch", "wall_s", "config", "summary"):
        assert key in result, key
    assert result["formats"]["fp8"]["row_bytes"] == 128 + 4 + 32 and result["formats"]["int6"]["row_bytes"] == 108 + 4
    for regime, data in result["regimes"].items():
        errs = data["errors"]
        assert errs["bf16"]["vs_bf16"] == [0.0] * 4
        for fmt in ("bf16", "fp8", "int8", "int6"):
            assert all(0 <= e < 0.5 for e in errs[fmt]["vs_fp32"]), (regime, fmt)
        mean = {f: sum(errs[f]["vs_fp32"]) / 4 for f in errs}
        assert mean["bf16"] < mean["int8"] < mean["int6"], (regime, mean)   # 16, then 8, then 6 bits a value
        assert mean["int8"] < mean["fp8"] or regime == "outliers", (regime, mean)
    plain, sharp = result["regimes"]["plain"]["effective_keys"], result["regimes"]["sharp"]["effective_keys"]
    assert all(s < p for s, p in zip(sharp, plain)), "scaled queries attend to fewer keys"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(result))
    assert load_quant_results([path])[0]["probes"] == result["probes"]


def test_cli_writes_results_json(tmp_path, capsys):
    out = tmp_path / "q.json"
    main(["--max-context", "64", "--probes", "2", "--hidden-size", "64", "--regimes", "plain", "--formats", "fp8",
          "--no-progress", "--out", str(out)])
    run = json.loads(out.read_text())
    assert run["command"].startswith("python -m mla_tutorial.quant_bench") and run["max_context"] == 64
    assert set(run["regimes"]["plain"]["errors"]) == {"bf16", "fp8"} and "wrote" in capsys.readouterr().out


def test_cli_refuses_bad_arguments_before_working():
    with pytest.raises(SystemExit, match="unknown latent cache format"):
        main(["--formats", "fp8,nf4", "--no-progress"])
    with pytest.raises(SystemExit, match="unknown regimes"):
        main(["--regimes", "noisy", "--no-progress"])
    with pytest.raises(SystemExit, match="block_size"):
        main(["--block-size", "0", "--no-progress"])
    with pytest.raises(SystemExit, match="unknown device"):
        main(["--device", "tpu", "--no-progress"])


def test_recorded_runs_are_complete():
    runs = load_quant_results()
    if not runs:
        pytest.skip(f"no runs recorded in {quant_results_dir()}")
    for run in runs:
        assert run["kind"] == "quantized latent cache error" and run["wall_s"] > 0
        assert run["formats"]["fp8"]["row_bytes"] == 656 and run["formats"]["int6"]["row_bytes"] == 442
        assert set(run["regimes"]) and all(len(e["vs_bf16"]) == len(run["probes"])
                                           for d in run["regimes"].values() for e in d["errors"].values())
        for d in run["regimes"].values():
            assert len(d["effective_keys"]) == len(d["max_attention_weight"]) == len(d["latent_abs_max_seen"])


def test_bytes_fed_to_the_throughput_model():
    rows = {r["format"]: r for r in format_rows()}
    assert rows["fp8"]["bytes_per_token_per_layer"] == 656 and rows["int6"]["bytes_per_token_per_layer"] == 442
    assert round(rows["bf16"]["cache_reduction_vs_67b"], 3) == 0.822
    assert round(rows["paper: 6 bits"]["cache_reduction_vs_67b"], 3) == rf.PAPER_CACHE_REDUCTION
    assert round(rows["fp8"]["cache_reduction_vs_67b"], 3) == 0.899 and round(rows["int6"]["cache_reduction_vs_67b"], 3) == 0.932
    order = [rows[f]["max_batch"] for f in ("bf16", "fp8", "int6", "paper: 6 bits")]
    assert order == sorted(order) and len(set(order)) == 4, "fewer bytes, larger batch"
    speed = [rows[f]["speedup_vs_67b"] for f in ("bf16", "fp8", "int6")]
    assert speed == sorted(speed)


def test_tensor_parallel_caches_at_tp8():
    v3 = MLAConfig.deepseek_v3()
    mha, gqa8 = AttentionConfig.from_mla(v3), AttentionConfig.from_mla(v3, num_key_value_heads=8)
    assert parallel_cache(mha, 8).per_gpu_bytes == 8192 and parallel_cache(mha, 8).copies == 1
    assert parallel_cache(gqa8, 8).per_gpu_bytes == 512 and parallel_cache(gqa8, 8).heads_per_gpu == 1
    tp = parallel_cache(v3, 8)
    assert tp.per_gpu_bytes == 1152 and tp.node_bytes == 9216 and tp.copies == 8, "every rank holds the whole latent"
    dp = parallel_cache(v3, 8, data_parallel_attention=True)
    assert dp.node_bytes == 1152 and dp.copies == 1
    assert parallel_cache(AttentionConfig.from_mla(v3, 4), 8).copies == 2, "fewer kv heads than GPUs: copies"
    with pytest.raises(ValueError, match="tp must be"):
        parallel_cache(v3, 0)
    with pytest.raises(ValueError, match="applies to MLA"):
        parallel_cache(mha, 8, data_parallel_attention=True)
    assert parallel_cache(v3, 8, dtype=torch.float32).per_gpu_bytes == 2304


def test_gpu_sizes_fit_the_budget_and_grow_with_the_device():
    from types import SimpleNamespace

    from mla_tutorial import sizing

    config = bench_config(hidden_size=7168)
    plans = {}
    for name, gb in (("Tesla T4", 16), ("NVIDIA H100 80GB HBM3", 80)):
        budget = sizing.gpu_budget(props=SimpleNamespace(name=name, total_memory=gb * 1e9))
        plan = sizing.quant_error_plan(budget, config)
        assert plan.estimated_s <= budget.plan_seconds and plan.estimated_bytes <= budget.plan_memory_bytes
        plans[name] = plan.max_context
    assert plans["Tesla T4"] <= plans["NVIDIA H100 80GB HBM3"]
    tiny = sizing.gpu_budget(props=SimpleNamespace(name="Tesla T4", total_memory=1e8))
    with pytest.raises(ValueError, match="even the smallest context"):
        sizing.quant_error_plan(tiny, config)
