"""What the serving engine costs on top of the model: one decode step of a batch, timed twice.

* **engine**: :meth:`mla_tutorial.serve.Engine.step` with ``batch`` sequences running, each with
  ``context`` cached tokens: scheduling (admission, room for the new tokens, block tables), the
  gathers of the paged cache, the model's computation, token emission and bookkeeping;
* **model**: the same model decoding the same tokens with contiguous per-layer caches
  (:meth:`mla_tutorial.TransformerLM.forward` with :class:`~mla_tutorial.KVCache`, MLA in its
  absorbed mode): the computation alone.

The overhead is ``1 - model / engine``: the share of an engine step that is not the model's work.
Every sequence has the same length here so that the contiguous caches can hold the batch; the
engine does not know that and schedules them as it would any others. A benchmark: it prints and
records, it asserts nothing about speed.

``python -m mla_tutorial.serve_overhead`` writes ``mla_tutorial/results/serve/overhead/cpu-<date>.json``.
Defined in chapter 12.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .bench import _load_average, save_results
from .checks import check_positive_int
from .device import describe_device
from .model import TransformerLM
from .serve import Engine, Request
from .serve_bench import part4_models, serve_results_dir, v3_models

__all__ = ["engine_overhead", "run_overhead", "format_overhead", "load_overhead_results", "main"]


@torch.no_grad()
def engine_overhead(model: TransformerLM, batch: int = 32, context: int = 64, steps: int = 16,
                    block_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Median seconds of one decode step of ``batch`` sequences with ``context`` cached tokens, in
    the engine and with contiguous caches, over ``steps`` steps each (after one warm-up step)."""
    if not isinstance(model, TransformerLM):
        raise TypeError(f"engine_overhead measures a TransformerLM, got {type(model).__name__}")
    for name, value in (("batch", batch), ("context", context), ("steps", steps), ("block_size", block_size)):
        check_positive_int("engine_overhead", name, value)
    c = model.config
    total = context + steps + 3            # the prompt, and the tokens of the warm-up, timed and last steps
    if total > c.max_seq_len:
        raise ValueError(f"engine_overhead: context {context} + steps {steps} + 3 = {total} exceed the model's "
                         f"context (max_seq_len={c.max_seq_len}); lower context or steps")
    model = model.eval()
    device = model.embed.weight.device
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, c.vocab_size, (batch, context), generator=g)            # (B, context)

    # the model alone: contiguous caches, one prefill, then single-token steps
    caches = model.new_caches(batch, total, mode="absorbed" if c.attention == "mla" else None)
    logits = model(prompts.to(device), caches)
    model_s = []
    for i in range(steps + 1):
        nxt = logits[:, -1].argmax(-1, keepdim=True)                                    # (B, 1)
        t = time.perf_counter()
        logits = model(nxt, caches)
        if i:                                                                           # step 0 warms up
            model_s.append(time.perf_counter() - t)

    # the engine: every request admitted and prefilled in step 0, then decode steps of the whole batch
    blocks = batch * -(-total // block_size)
    engine = Engine(model, blocks, block_size, seed=seed)
    for b in range(batch):
        engine.submit(Request(prompts[b].tolist(), steps + 3))
    engine.step()                                                                       # admission + prefills
    engine_s = []
    for i in range(steps + 1):
        t = time.perf_counter()
        engine.step()
        if i:
            engine_s.append(time.perf_counter() - t)
    assert len(engine.running) == batch, "every sequence decodes in every timed step"

    model_med, engine_med = statistics.median(model_s), statistics.median(engine_s)
    return {"attention": c.label, "batch": batch, "context": context, "steps": steps, "block_size": block_size,
            "model_step_s": model_med, "engine_step_s": engine_med, "overhead": 1 - model_med / engine_med}


def run_overhead(suites: Sequence[str] = ("part4", "v3"), batch: int = 32, context: int = 64, steps: int = 16,
                 repeats: int = 3, threads: int = 1) -> dict[str, Any]:
    """:func:`engine_overhead` for each model of each suite (``part4``: Part IV's trained models;
    ``v3``: the V3-dims models of :func:`mla_tutorial.serve_bench.v3_models`), best of ``repeats``
    (the run with the smallest engine step), on ``threads`` CPU threads."""
    makers = {"part4": part4_models, "v3": v3_models}
    unknown = sorted(set(suites) - set(makers))
    if unknown or not suites:
        raise ValueError(f"run_overhead: unknown suites {unknown or list(suites)}; choose from {sorted(makers)}")
    check_positive_int("run_overhead", "repeats", repeats)
    check_positive_int("run_overhead", "threads", threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0, load0 = time.perf_counter(), _load_average()
    try:
        rows = {}
        for suite in suites:
            rows[suite] = {label: min((engine_overhead(m, batch, context, steps) for _ in range(repeats)),
                                      key=lambda r: r["engine_step_s"]) for label, m in makers[suite]().items()}
    finally:
        torch.set_num_threads(old)
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "device": {"type": "cpu", "name": describe_device("cpu")},
            "threads": threads, "repeats": repeats, "suites": rows, "wall_s": time.perf_counter() - t0,
            "load_average": {"start": load0, "end": _load_average()}}


def format_overhead(result: dict[str, Any]) -> str:
    """A table of a recorded run: per suite and model, the two step times and the overhead."""
    lines = [f"{'suite':<6} {'model':<11} {'batch':>5} {'context':>7} {'engine ms':>9} {'model ms':>8} {'overhead':>8}"]
    for suite, rows in result["suites"].items():
        for label, r in rows.items():
            lines.append(f"{suite:<6} {label:<11} {r['batch']:>5} {r['context']:>7} {r['engine_step_s'] * 1e3:>9.2f} "
                         f"{r['model_step_s'] * 1e3:>8.2f} {r['overhead']:>8.0%}")
    return "\n".join(lines)


def load_overhead_results() -> list[dict[str, Any]]:
    """Recorded runs, oldest first."""
    return [json.loads(p.read_text()) for p in sorted((serve_results_dir() / "overhead").glob("*.json"))]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m mla_tutorial.serve_overhead",
                                description="Time one decode step in the serving engine and with contiguous caches.")
    p.add_argument("--suites", default="part4,v3", help="comma-separated, from part4,v3")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="results JSON (default: results/serve/overhead/cpu-<date>.json)")
    p.add_argument("--note", default="", help="recorded with the results, e.g. what else ran on the machine")
    args = p.parse_args(argv)
    try:
        suites = [x.strip() for x in args.suites.split(",") if x.strip()]
        result = run_overhead(suites, args.batch, args.context, args.steps, args.repeats)
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    result["note"] = args.note
    result["command"] = "python -m mla_tutorial.serve_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or serve_results_dir() / "overhead" / f"cpu-{_dt.date.today():%Y%m%d}.json"
    save_results(result, out)
    print(format_overhead(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
