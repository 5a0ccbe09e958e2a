"""The continuous-batching engine: the same tokens as generating alone, no lost blocks or requests,
preemption by recomputation, clear errors for bad requests, the trace and the pool sizing."""

from __future__ import annotations

import pytest
import torch

from mla_tutorial import serve_bench as sb
from mla_tutorial.model import LMConfig, TransformerLM
from mla_tutorial.serve import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"mha": {}, "gqa": {"n_kv_heads": 2}, "mqa": {}, "mla": {}}


def model(kind: str, **kw) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig(attention=kind, max_seq_len=64, **{**KINDS[kind], **kw})).eval()


def trace(n: int = 10, seed: int = 1, spread: float = 0.0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(1, 20, (1,), generator=g))
        out.append(Request(torch.randint(0, 256, (p,), generator=g).tolist(), int(torch.randint(1, 14, (1,), generator=g)),
                           arrival=spread * i))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_equals_generate_alone_with_preemption_and_no_leaks(kind):
    m = model(kind)
    reqs = trace(10)
    engine = Engine(m, num_blocks=8, block_size=4, seed=0)       # 32 tokens: far fewer than the trace holds
    report = engine.run(reqs)
    assert report.preemptions > 0, "the small pool should force preemptions"
    assert len(report.served) == len(reqs) and not report.rejected
    for r, q in zip(report.results, reqs):
        assert r.tokens == m.generate([q.prompt], q.max_new_tokens)[0], r.request_id
        assert len(r.token_times) == q.max_new_tokens and r.ttft is not None and r.ttft >= 0
    assert report.blocks_free_at_end == engine.manager.num_blocks and not engine.manager.sequences
    assert engine.idle and report.max_running >= 2


def test_batch_holds_sequences_of_different_lengths_and_respects_max_running():
    m = model("mla")
    reqs = trace(12, seed=4)
    big = Engine(m, num_blocks=64, block_size=8).run(reqs)
    assert big.preemptions == 0 and big.max_running == len(reqs)
    capped = Engine(m, num_blocks=64, block_size=8, max_running=3).run(reqs)
    assert capped.max_running == 3
    assert [r.tokens for r in big.results] == [r.tokens for r in capped.results]
    assert big.steps < capped.steps


def test_arrivals_over_time_and_report_summary():
    m = model("gqa")
    reqs = trace(6, spread=10.0)                                  # each arrives after the last has finished
    report = Engine(m, num_blocks=16, block_size=4).run(reqs)
    s = report.summary()
    assert s["served"] == 6 and s["max_running"] == 1 and s["generated_tokens"] == sum(q.max_new_tokens for q in reqs)
    assert report.wall_s >= 50.0 > report.busy_s                  # the clock jumps over the idle gaps
    assert all(r.token_times[0] >= q.arrival for r, q in zip(report.results, reqs))
    for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "tokens_per_s"):
        assert s[key] is not None and s[key] >= 0, key
    assert s["ttft_p99_s"] >= s["ttft_p50_s"]


def test_sampling_is_reproducible_and_independent_of_the_batch():
    m = model("mla")
    reqs = [Request(q.prompt, q.max_new_tokens, sample=True, temperature=0.8, top_k=20, seed=i)
            for i, q in enumerate(trace(5, seed=2))]
    batched = Engine(m, num_blocks=32, block_size=4).run(reqs)
    alone = [Engine(m, num_blocks=32, block_size=4).run([q]).results[0].tokens for q in reqs]
    assert [r.tokens for r in batched.results] == alone
    greedy = Engine(m, num_blocks=32, block_size=4).run(trace(5, seed=2))
    assert [r.tokens for r in greedy.results] != alone, "sampling at temperature 0.8 should differ from greedy"


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int6"])
def test_quantized_latent_pools_serve_without_leaks(fmt):
    m = model("mla", kv_lora_rank=64, qk_rope_head_dim=8)
    engine = Engine(m, num_blocks=10, block_size=4, kv_format=fmt, tile=32)
    report = engine.run(trace(8))
    assert len(report.served) == 8 and report.blocks_free_at_end == 10
    assert engine.cache.format.name == fmt and engine.cache.format.quantized


def test_fp32_latent_pool_is_the_default_and_equals_naming_it():
    m = model("mla")
    a = Engine(m, num_blocks=16, block_size=4).run(trace(6))
    b = Engine(m, num_blocks=16, block_size=4, kv_format="fp32").run(trace(6))
    assert [r.tokens for r in a.results] == [r.tokens for r in b.results]


# --- bad input ---------------------------------------------------------------------------------
BAD = [
    (Request([], 4), ValueError, "prompt is empty"),
    (Request([1, 2], 0), ValueError, "max_new_tokens must be a positive int"),
    (Request([1, 2], -3), ValueError, "max_new_tokens must be a positive int"),
    (Request([1] * 30, 8), ValueError, "could never run; shorten it or give the engine more blocks"),
    (Request([1] * 60, 8), ValueError, "exceed the model's context"),
    (Request([1, 999], 2), ValueError, r"token ids must be ints in \[0, 256\)"),
    (Request("hello", 2), TypeError, "encode text first"),
    (Request([1, 2], 2, sample=True, temperature=0.0), ValueError, "temperature > 0"),
    (Request([1, 2], 2, arrival=float("nan")), ValueError, "arrival must be a finite time"),
]


@pytest.mark.parametrize("request_, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_raise_at_submission_and_change_nothing(request_, error, match):
    engine = Engine(model("mla"), num_blocks=8, block_size=4)    # 32 tokens at most
    with pytest.raises(error, match=match):
        engine.submit(request_)
    assert engine.idle and engine.manager.num_free == 8


def test_a_request_id_in_use_is_refused():
    engine = Engine(model("mla"), num_blocks=8, block_size=4)
    engine.submit(Request([1, 2], 3, request_id="a"))
    with pytest.raises(ValueError, match="already waiting or running"):
        engine.submit(Request([3], 3, request_id="a"))
    assert len(engine.waiting) == 1


def test_bad_requests_are_reported_rejected_and_the_rest_are_served():
    m = model("mha")
    good = trace(5)
    mixed = [good[0], BAD[0][0], good[1], BAD[1][0], good[2], BAD[3][0], good[3], good[4]]
    report = Engine(m, num_blocks=8, block_size=4).run(mixed)
    assert len(report.results) == len(mixed)
    assert [r.rejected is not None for r in report.results] == [False, True, False, True, False, True, False, False]
    assert "prompt is empty" in report.results[1].rejected and "could never run" in report.results[5].rejected
    for r, q in zip([x for x in report.results if x.rejected is None], good):
        assert r.tokens == m.generate([q.prompt], q.max_new_tokens)[0]
    assert report.blocks_free_at_end == 8


@pytest.mark.parametrize("kw, error, match", [
    (dict(kv_format="fp4"), ValueError, "unknown latent cache format"),
    (dict(kv_format="fp8", tile=48), ValueError, "multiple"),
    (dict(num_blocks=0), ValueError, "num_blocks must be a positive int"),
    (dict(max_running=0), ValueError, "max_running must be a positive int"),
])
def test_bad_engine_settings(kw, error, match):
    args = {"num_blocks": 8, "block_size": 4, **kw}
    with pytest.raises(error, match=match):
        Engine(model("mla"), **args)


def test_quantized_formats_need_an_mla_model():
    with pytest.raises(ValueError, match="store MLA's latent"):
        Engine(model("gqa"), 8, 4, kv_format="int8")
    with pytest.raises(TypeError, match="serves a TransformerLM"):
        Engine(torch.nn.Linear(2, 2), 8, 4)


# --- the trace, the pools, the bench pieces ------------------------------------------------------
def test_trace_is_seeded_and_in_range():
    a = sb.make_trace(20, seed=3, rate=5.0, prompt_lens=(4, 9), output_lens=(2, 5))
    b = sb.make_trace(20, seed=3, rate=5.0, prompt_lens=(4, 9), output_lens=(2, 5))
    assert a == b and a != sb.make_trace(20, seed=4, rate=5.0, prompt_lens=(4, 9), output_lens=(2, 5))
    assert all(4 <= len(r.prompt) <= 9 and 2 <= r.max_new_tokens <= 5 for r in a)
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and arrivals[-1] > 0
    assert all(r.arrival == 0 for r in sb.make_trace(5, text=False))
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        sb.make_trace(5, prompt_lens=(0, 3))


def test_one_pool_of_bytes_holds_tokens_in_inverse_proportion_to_the_cache():
    models = sb.v3_models(n_layers=1, d_model=32, max_seq_len=64)
    bpt = {k: sb.pool_bytes_per_token(m) for k, m in models.items()}
    assert bpt == {"MHA": 2 * 128 * 128 * 4, "GQA-8": 2 * 8 * 128 * 4, "MQA": 2 * 128 * 4, "MLA": 576 * 4}
    budget = bpt["MHA"] * 64
    blocks = {k: sb.pool_blocks(m, budget, 16) for k, m in models.items()}
    assert blocks["MHA"] == 4 and blocks["MLA"] == 4 * 32768 // 576
    mla = sb.part4_models()["MLA"]
    assert sb.pool_bytes_per_token(mla, "fp8", tile=32) == 2 * (64 + 4 * 2 + 16)


def test_quant_agreement_structure_and_the_float_pool_agrees_with_itself():
    m = model("mla")
    reqs = trace(4)
    out = sb.quant_agreement(m, reqs, formats=("fp32", "fp8"), block_size=4)
    assert out["formats"]["fp32"]["token_agreement"] == 1.0 and out["formats"]["fp32"]["requests_identical"] == 4
    assert 0 <= out["formats"]["fp8"]["token_agreement"] <= 1
    with pytest.raises(ValueError, match="need an MLA model"):
        sb.quant_agreement(model("mha"), reqs)


def test_cli_refuses_an_unknown_suite():
    with pytest.raises(SystemExit, match="unknown suites"):
        sb.main(["--suites", "nope", "--no-progress"])


def test_step_log_counts_every_token_and_the_replayed_roofline_is_positive():
    m = model("gqa")
    engine = Engine(m, num_blocks=8, block_size=4)
    report = engine.run(trace(8))
    assert len(engine.log) == report.steps
    assert sum(b + len(p) for b, _, p in engine.log) == report.generated_tokens   # one token per decode or prefill
    assert sum(len(p) for _, _, p in engine.log) == len(report.served) + report.preemptions
    node = sb.measure_node(repeats=1)
    t = sb.replay_time(m, node, engine.log, sb.pool_bytes_per_token(m))
    assert t > 0 and sb.replay_time(m, node, engine.log[:1], sb.pool_bytes_per_token(m)) < t


# --- the engine's overhead benchmark (timings are printed and recorded, never asserted) -----------
def test_overhead_benchmark_times_the_same_batch_both_ways():
    from mla_tutorial.serve_overhead import engine_overhead, format_overhead

    r = engine_overhead(model("mla"), batch=3, context=5, steps=2, block_size=4)
    assert r["model_step_s"] > 0 and r["engine_step_s"] > 0
    assert r["overhead"] == pytest.approx(1 - r["model_step_s"] / r["engine_step_s"])
    assert "MLA" in format_overhead({"suites": {"tiny": {"MLA": r}}})


@pytest.mark.parametrize("kw, error, match", [
    (dict(batch=0), ValueError, r"engine_overhead.batch must be a positive integer, got 0"),
    (dict(context=200), ValueError, r"exceed the model's context"),
    (dict(steps=1.5), TypeError, r"engine_overhead.steps must be an int, got float"),
])
def test_overhead_benchmark_refuses_bad_settings(kw, error, match):
    from mla_tutorial.serve_overhead import engine_overhead

    with pytest.raises(error, match=match):
        engine_overhead(model("mla"), **kw)


def test_overhead_run_refuses_an_unknown_suite():
    from mla_tutorial.serve_overhead import run_overhead

    with pytest.raises(ValueError, match=r"unknown suites \['v4'\]"):
        run_overhead(["v4"])
