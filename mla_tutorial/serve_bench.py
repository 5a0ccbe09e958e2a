"""Measuring the serving engine: a seeded request trace, one memory pool, four attention kinds.

Every model serves the same trace from a pool of the same number of bytes, so the number of
blocks each gets is set by its cache bytes per token (:func:`pool_blocks`). Recorded per model:
generated tokens per second, the most sequences running at once, time to first token and
inter-token latency (p50, p99), preemptions, and the roofline prediction of chapter 08
(:mod:`mla_tutorial.roofline`) for the same batch and context on this machine, whose matmul peak
and memory bandwidth are measured first (:func:`measure_node`).

Two suites: ``part4``, the trained models of Part IV (MHA, GQA-2, MLA with d_c = 64; MQA has no
checkpoint and is initialised from a seed: a throughput does not depend on the weights), and
``v3``, models of a few layers whose attention has DeepSeek-V3's dimensions (128 heads of 128,
d_c = 512, d_h_R = 64) with a small hidden size, seeded random weights. Also the greedy-token
agreement of the quantized latent caches with the unquantized one (:func:`quant_agreement`).

``python -m mla_tutorial.serve`` (or ``python -m mla_tutorial.serve_bench``) runs everything
and writes ``mla_tutorial/results/serve/<device>-<date>.json``. Defined in chapter 12.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import roofline as rf
from .bench import _load_average, save_results
from .blocks import blocks_that_fit
from .config import AttentionConfig, MLAConfig
from .device import describe_device
from .model import LMConfig, TransformerLM
from .quant import latent_format
from .serve import Engine, Request

__all__ = ["make_trace", "pool_bytes_per_token", "pool_blocks", "part4_models", "v3_models", "measure_node",
           "predict", "replay_time", "serve_suite", "ratios", "quant_agreement", "serve_results_dir", "load_serve_results", "main"]

CHECKPOINTS = pathlib.Path(__file__).parent / "results" / "lm" / "checkpoints"


# --- the trace -----------------------------------------------------------------------------------
def make_trace(num_requests: int = 48, seed: int = 0, rate: float | None = None,
               prompt_lens: tuple[int, int] = (8, 48), output_lens: tuple[int, int] = (16, 48),
               text: bool = True) -> list[Request]:
    """A seeded trace of greedy requests: Poisson arrivals at ``rate`` requests per second
    (``None``: all at time 0), prompt and output lengths uniform in the closed ranges given.
    ``text``: prompts are windows of the book's held-out prose (bytes, what the Part IV text
    models read); otherwise uniform random bytes."""
    for name, (lo, hi) in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"make_trace: {name} must be (lo, hi) ints with 1 <= lo <= hi, got {(lo, hi)!r}")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests <= 0:
        raise ValueError(f"make_trace: num_requests must be a positive int, got {num_requests!r}")
    if rate is not None and not rate > 0:
        raise ValueError(f"make_trace: rate must be > 0 requests per second (or None: all at once), got {rate!r}")
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (num_requests,), generator=g).tolist()
    N = torch.randint(output_lens[0], output_lens[1] + 1, (num_requests,), generator=g).tolist()
    gaps = (torch.zeros(num_requests) if rate is None
            else torch.empty(num_requests).exponential_(rate, generator=g))
    arrivals = torch.cumsum(gaps, 0).tolist()
    if text:
        from .data import TextCorpus
        source = TextCorpus().splits["val"].flatten()
        starts = torch.randint(0, len(source) - max(P), (num_requests,), generator=g).tolist()
        prompts = [source[s:s + p].tolist() for s, p in zip(starts, P)]
    else:
        prompts = [torch.randint(0, 256, (p,), generator=g).tolist() for p in P]
    return [Request(pr, n, arrival=a, request_id=i) for i, (pr, n, a) in enumerate(zip(prompts, N, arrivals))]


# --- pools of one size -----------------------------------------------------------------------------
def pool_bytes_per_token(model: TransformerLM, kv_format: str | None = None, tile: int = 128) -> int:
    """Bytes one token takes in the engine's pools, all layers (MLA: in ``kv_format``)."""
    c = model.config
    if c.attention == "mla":
        fmt = latent_format(kv_format if kv_format is not None else model.embed.weight.dtype)
        return c.n_layers * fmt.row_bytes(c.kv_lora_rank, c.qk_rope_head_dim, tile)
    return int(model.cache_bytes_per_token(model.embed.weight.dtype))


def pool_blocks(model: TransformerLM, budget_bytes: float, block_size: int, kv_format: str | None = None,
                tile: int = 128) -> int:
    """Blocks a pool of ``budget_bytes`` holds for ``model`` (at least 1)."""
    return max(1, blocks_that_fit(budget_bytes, pool_bytes_per_token(model, kv_format, tile), block_size))


# --- the models ------------------------------------------------------------------------------------
def part4_models() -> dict[str, TransformerLM]:
    """Part IV's trained text models (MHA, GQA-2, MLA d_c = 64) and an MQA of the same size from seed 0."""
    models = {}
    for label, name in (("MHA", "text-mha"), ("GQA-2", "text-gqa2"), ("MLA", "text-mla-dc64")):
        models[label] = TransformerLM.from_checkpoint(CHECKPOINTS / f"{name}.pt").eval()
    torch.manual_seed(0)
    models["MQA"] = TransformerLM(models["MHA"].config.replace(attention="mqa")).eval()
    return {k: models[k] for k in ("MHA", "GQA-2", "MQA", "MLA")}


def v3_models(n_layers: int = 2, d_model: int = 256, seed: int = 0, max_seq_len: int = 256) -> dict[str, TransformerLM]:
    """Models whose attention layers have DeepSeek-V3's dimensions (128 heads; MHA/GQA-8/MQA with heads
    of 128; MLA with d_c = 512, d_h_R = 64, d_h = d_v = 128, no query compression), with a small hidden
    size and MLP so they run on a CPU. Seeded random weights."""
    base = dict(d_model=d_model, n_layers=n_layers, n_heads=128, d_ff=2 * d_model, max_seq_len=max_seq_len)
    configs = {"MHA": LMConfig(attention="mha", head_dim=128, **base),
               "GQA-8": LMConfig(attention="gqa", n_kv_heads=8, head_dim=128, **base),
               "MQA": LMConfig(attention="mqa", head_dim=128, **base),
               "MLA": LMConfig(attention="mla", kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                               v_head_dim=128, **base)}
    out = {}
    for label, cfg in configs.items():
        torch.manual_seed(seed)
        out[label] = TransformerLM(cfg).eval()
    return out


# --- the roofline of this machine ------------------------------------------------------------------
def measure_node(repeats: int = 5) -> rf.Node:
    """This CPU as a roofline node: fp32 matmul peak (a 1024^3 product) and copy bandwidth
    (64 MiB copied), best of ``repeats``; memory: unlimited here (the pool is sized explicitly)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.empty(16 * 2**20), torch.empty(16 * 2**20)
    mm, cp = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        mm.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        cp.append(time.perf_counter() - t)
    flops, bw = 2 * 1024**3 / min(mm), 2 * src.numel() * 4 / min(cp)
    cpu = rf.Accelerator("this CPU", memory_bytes=1e15, bandwidth_bytes_per_s=bw, peak_flops_per_s=flops,
                         source="measured: fp32 1024^3 matmul, 64 MiB copy (read + write)")
    return rf.Node(cpu, count=1, usable_memory_fraction=1.0)


def _decode_model(model: TransformerLM, bytes_per_token: float) -> rf.DecodeModel:
    c = model.config
    acfg: AttentionConfig | MLAConfig = c.attention_config()
    params = model.num_parameters()
    layer_elems = c.cache_elements_per_token() // c.n_layers
    return rf.DecodeModel(c.label, params, params, c.n_layers, layer_elems,
                          rf.attention_flops_per_cached_token(acfg), weight_bytes_per_param=4.0,
                          cache_bytes_per_element=bytes_per_token / (layer_elems * c.n_layers),
                          source="the served model (fp32 weights)")


def predict(model: TransformerLM, node: rf.Node, batch: int, context: int, bytes_per_token: float) -> dict[str, Any]:
    """Chapter 08's roofline for one decode step of ``batch`` sequences of ``context`` tokens."""
    est = rf.decode_step(_decode_model(model, bytes_per_token), node, max(batch, 1), max(context, 1))
    return {"batch": batch, "context": context, "step_s": est.step_time_s, "tokens_per_s": est.tokens_per_s,
            "bound": est.bound, "weight_bytes": est.weight_bytes, "cache_bytes": est.cache_bytes, "flops": est.flops}


def replay_time(model: TransformerLM, node: rf.Node, log: Sequence[tuple[int, int, list[int]]],
                bytes_per_token: float) -> float:
    """The roofline's time for the steps a run actually took (:attr:`Engine.log`): each decode step
    of ``b`` sequences holding ``n`` cached tokens as :func:`~mla_tutorial.roofline.decode_step` at
    their mean length, each prefill of ``L`` tokens as ``max(bytes / bandwidth, FLOPs / peak)`` with
    the weights and ``L`` tokens' cache written, ``2 L`` FLOPs per parameter and the expanded
    attention's FLOPs over the ``L (L + 1) / 2`` causal (query, key) pairs."""
    dm = _decode_model(model, bytes_per_token)
    c = model.config
    acfg = c.attention_config()
    pair_flops = rf.attention_flops_per_cached_token(acfg, "expanded" if c.attention == "mla" else None) * c.n_layers
    total = 0.0
    for batch, cached, prefills in log:
        if batch:
            total += rf.decode_step(dm, node, batch, max(1, round(cached / batch))).step_time_s
        for L in prefills:
            nbytes = dm.weight_bytes + L * bytes_per_token
            flops = 2 * dm.active_params * L + pair_flops * L * (L + 1) / 2
            total += max(nbytes / node.bandwidth_bytes_per_s, flops / node.peak_flops_per_s)
    return total


# --- the measurements ------------------------------------------------------------------------------
def serve_suite(models: dict[str, TransformerLM], trace: Sequence[Request], budget_bytes: float, block_size: int,
                node: rf.Node | None = None, progress: bool = True, check_outputs: int = 0,
                repeats: int = 1) -> dict[str, Any]:
    """Serve ``trace`` with each model from a pool of ``budget_bytes``; a dict per model, from the
    fastest of ``repeats`` runs (the models take turns, so a burst of other work on a shared
    machine hits one run of each rather than all runs of one).

    ``check_outputs``: for that many requests (the first), compare the engine's tokens with
    ``model.generate`` alone (greedy) and record whether they agree."""
    out: dict[str, Any] = {}
    runs: dict[str, list[tuple[Engine, Any]]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            engine = Engine(model, pool_blocks(model, budget_bytes, block_size), block_size)
            runs[label].append((engine, engine.run(trace, progress=progress)))
    for label, model in models.items():
        bpt = pool_bytes_per_token(model)
        blocks = pool_blocks(model, budget_bytes, block_size)
        engine, report = min(runs[label], key=lambda er: er[1].busy_s)
        s = report.summary()
        s["tokens_per_s_runs"] = [r.generated_tokens / r.wall_s for _, r in runs[label]]
        s.update(bytes_per_token=bpt, pool_tokens=blocks * block_size, cache_values_per_token=
                 model.config.cache_elements_per_token(), parameters=model.num_parameters())
        if node is not None:
            served = report.served
            context = round(sum(r.prompt_len + len(r.tokens) / 2 for r in served) / max(len(served), 1))
            s["roofline"] = predict(model, node, report.max_running, context, bpt)
            replay = replay_time(model, node, engine.log, bpt)
            s["roofline_replay"] = {"busy_s": replay, "tokens_per_s": report.generated_tokens / replay}
        if check_outputs:
            s["equal_to_generate"] = all(
                r.tokens == model.generate([q.prompt], q.max_new_tokens)[0]
                for r, q in zip(report.results[:check_outputs], trace[:check_outputs]))
        out[label] = s
    return out


def ratios(models: dict[str, Any], to: str = "MLA") -> dict[str, dict[str, float]]:
    """``to``'s throughput over each other model's: measured, and as the roofline predicts it for the
    batches and contexts the run had; also the ratio of the most sequences each ran at once."""
    ref = models[to]
    out = {}
    for label, s in models.items():
        if label == to:
            continue
        out[label] = {"measured": ref["tokens_per_s"] / s["tokens_per_s"],
                      "concurrency": ref["max_running"] / s["max_running"],
                      "cache_bytes": s["bytes_per_token"] / ref["bytes_per_token"]}
        if "roofline" in ref and "roofline" in s:
            out[label]["roofline"] = ref["roofline"]["tokens_per_s"] / s["roofline"]["tokens_per_s"]
            out[label]["roofline_replay"] = (ref["roofline_replay"]["tokens_per_s"]
                                             / s["roofline_replay"]["tokens_per_s"])
    return out


def quant_agreement(model: TransformerLM, trace: Sequence[Request], formats: Sequence[str] = ("fp8", "int8", "int6"),
                    num_blocks: int | None = None, block_size: int = 16, tile: int = 32) -> dict[str, Any]:
    """Greedy tokens of the engine with each quantized latent pool against the unquantized (float) pool.

    Per format: the fraction of generated tokens equal to the reference's at the same place, the
    requests whose whole output is equal, and the mean number of tokens before the first difference
    (after a difference the two texts continue from different tokens, so later agreement is chance)."""
    if model.config.attention != "mla":
        raise ValueError(f"quant_agreement: quantized latent caches need an MLA model, got {model.config.label}")
    total = max(len(r.prompt) + r.max_new_tokens for r in trace)
    num_blocks = num_blocks or len(trace) * -(-total // block_size)
    ref = Engine(model, num_blocks, block_size).run(trace)
    out: dict[str, Any] = {"tile": tile, "requests": len(trace), "tokens": ref.generated_tokens, "formats": {}}
    for fmt in formats:
        rep = Engine(model, num_blocks, block_size, kv_format=fmt, tile=tile).run(trace)
        same = first = whole = 0
        for a, b in zip(ref.results, rep.results):
            eq = [x == y for x, y in zip(a.tokens, b.tokens)]
            same += sum(eq)
            first += next((i for i, e in enumerate(eq) if not e), len(eq))
            whole += all(eq)
        n = len(trace)
        out["formats"][fmt] = {"bytes_per_token_per_layer": latent_format(fmt).row_bytes(
            model.config.kv_lora_rank, model.config.qk_rope_head_dim, tile),
            "token_agreement": same / ref.generated_tokens, "requests_identical": whole,
            "mean_tokens_before_first_difference": first / n}
    return out


# --- results ------------------------------------------------------------------------------------
def serve_results_dir() -> pathlib.Path:
    return pathlib.Path(__file__).parent / "results" / "serve"


def load_serve_results(paths: Sequence[str | pathlib.Path] | None = None) -> list[dict[str, Any]]:
    """Recorded runs, oldest first."""
    paths = sorted(serve_results_dir().glob("*.json")) if paths is None else [pathlib.Path(p) for p in paths]
    return [json.loads(p.read_text()) for p in paths]


SUITES = {
    # Part IV models: MHA 1,536 B/token (fp32) -> 2 sequences of ~64 tokens in this pool; MLA 576.
    "part4": dict(budget_bytes=1536 * 256, block_size=16, trace=dict(num_requests=48, prompt_lens=(8, 48),
                                                                      output_lens=(16, 48))),
    # V3 attention dims: MHA 262,144 B/token (2 layers, fp32), MLA 4,608.
    "v3": dict(budget_bytes=262144 * 2 * 96, block_size=16, trace=dict(num_requests=40, prompt_lens=(8, 32),
                                                                        output_lens=(8, 24), text=False)),
}


def run_bench(suites: Sequence[str] = ("part4", "v3"), seed: int = 0, progress: bool = True, note: str = "",
              quant: bool = True, repeats: int = 2) -> dict[str, Any]:
    """Everything the recorded run measures (see the module docstring)."""
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {sorted(SUITES)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # one thread: steadier timings on a shared machine; restored at the end
    try:
        return _run_bench(suites, seed, progress, note, quant, repeats)
    finally:
        torch.set_num_threads(threads)


def _run_bench(suites: Sequence[str], seed: int, progress: bool, note: str, quant: bool,
               repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    load0 = _load_average()
    node = measure_node()
    result: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(), "device": {"type": "cpu", "name": describe_device("cpu")},
        "threads": torch.get_num_threads(), "seed": seed, "repeats": repeats, "note": note,
        "node": {"peak_flops_per_s": node.accelerator.peak_flops_per_s,
                 "bandwidth_bytes_per_s": node.accelerator.bandwidth_bytes_per_s, "source": node.accelerator.source},
        "suites": {}}
    for name in suites:
        cfg = SUITES[name]
        models = part4_models() if name == "part4" else v3_models()
        trace = make_trace(seed=seed, **cfg["trace"])
        result["suites"][name] = {
            "config": {"budget_bytes": cfg["budget_bytes"], "block_size": cfg["block_size"], **cfg["trace"],
                       "models": {k: m.config.to_dict() for k, m in models.items()}},
            "models": serve_suite(models, trace, cfg["budget_bytes"], cfg["block_size"], node, progress,
                                  check_outputs=8 if name == "part4" else 0, repeats=repeats)}
        result["suites"][name]["mla_over"] = ratios(result["suites"][name]["models"])
    if quant:
        mla = part4_models()["MLA"]
        result["quant_agreement"] = quant_agreement(mla, make_trace(num_requests=24, seed=seed + 1,
                                                                    prompt_lens=(16, 48), output_lens=(48, 64)))
    result["wall_s"] = time.perf_counter() - t0
    result["load_average"] = {"start": load0, "end": _load_average()}
    return result


def format_suite(models: dict[str, Any]) -> str:
    """A table of one suite's measurements."""
    roof = all("roofline" in s for s in models.values())
    lines = [f"{'model':<6} {'B/token':>8} {'pool tok':>8} {'tok/s':>7} {'max run':>7} {'preempt':>7} "
             f"{'TTFT p50':>8} {'p99':>6} {'ITL p50':>8} {'p99':>6}" + ("  roofline tok/s" if roof else "")]
    for label, s in models.items():
        line = (f"{label:<6} {s['bytes_per_token']:>8,} {s['pool_tokens']:>8,} {s['tokens_per_s']:>7.1f} "
                f"{s['max_running']:>7} {s['preemptions']:>7} {s['ttft_p50_s']:>8.3f} {s['ttft_p99_s']:>6.2f} "
                f"{s['itl_p50_s'] * 1e3:>6.1f}ms {s['itl_p99_s'] * 1e3:>4.0f}ms")
        if roof:
            line += (f"  {s['roofline']['tokens_per_s']:,.0f} ({s['roofline']['bound']}), replayed "
                     f"{s['roofline_replay']['tokens_per_s']:,.0f}")
        lines.append(line)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mla_tutorial.serve",
                                description="Serve one seeded request trace with MHA, GQA, MQA and MLA models from "
                                            "pools of the same bytes; record throughput, concurrency and latency.")
    p.add_argument("--suites", default="part4,v3", help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quant", action="store_true", help="skip the quantized-cache agreement")
    p.add_argument("--repeats", type=int, default=2, help="runs per model; the fastest is kept (default 2)")
    p.add_argument("--out", default=None, help="results JSON (default: mla_tutorial/results/serve/cpu-<date>.json)")
    p.add_argument("--note", default="", help="recorded with the results, e.g. what else ran on the machine")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    try:
        result = run_bench(suites, args.seed, not args.no_progress, args.note, not args.no_quant, args.repeats)
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    result["command"] = "python -m mla_tutorial.serve " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or serve_results_dir() / f"cpu-{_dt.date.today():%Y%m%d}.json"
    save_results(result, out)
    for name, suite in result["suites"].items():
        print(f"{name}:\n{format_suite(suite['models'])}")
    if "quant_agreement" in result:
        print("greedy-token agreement with the float latent pool:",
              {f: round(v["token_agreement"], 3) for f, v in result["quant_agreement"]["formats"].items()})
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
