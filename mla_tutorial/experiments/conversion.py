"""Experiment e: the trained MHA and GQA models of experiment a converted to MLA (chapter 11).

For each task (the book's prose, MQAR), starting from the first-seed checkpoints of experiment a:

* GQA-2 -> MLA, exact (:func:`~mla_tutorial.convert.gqa_to_mla`): the same cache, the same outputs.
* MHA -> MLA, approximate (:func:`~mla_tutorial.convert.mha_to_mla`): r RoPE pairs per head
  (1, 2 or 4 of 8) chosen by their contribution to the scores, the rest of the keys factored with
  the values by a whitened SVD, at the per-layer caches of experiment a's MLA models (d_c + 8 for
  d_c = 16 ... 128), so each conversion sits beside a model trained as MLA at the same bytes, and
  at full rank; at r = 2 also at the caches of the mean-pooled GQA models, with the plain SVD and
  with the simpler pair rules (highest, lowest frequencies).
* MHA -> GQA by mean-pooling key/value heads (3, 2, 1 groups): the old way to shrink a cache.

Each converted model is measured (validation loss; MQAR accuracy over the pair-count grid) before
and after a short fine-tune whose tokens are at most 1% of the pretraining tokens (the MQAR
bound uses the shortest sequences, so the real fraction is smaller).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Any

import torch

from ..attention import MultiHeadAttention
from ..config import ATTENTION_PRESETS
from ..convert import convert_model, gqa_to_mla, max_kv_lora_rank, mha_to_mla
from ..model import TransformerLM
from ..train import TrainConfig, train
from .common import (RunSpec, Setting, checkpoint_name, checkpoint_path, finish, load_result, make_task, metadata,
                     mqar_grid, run_one, text_val_loss)
from .matched_cache import variants

__all__ = ["NAME", "RESULTS_DIR", "FINETUNE_FRACTION", "plan", "pretraining_tokens", "finetune_config", "run",
           "load", "plot_vs_cache", "metric_of", "measured", "llama_layer"]

NAME = "convert"
#: Where the recorded run lives (the CLI writes ``<RESULTS_DIR>/convert.json``).
RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "results" / "convert"
FINETUNE_FRACTION = 0.01
ROPE_PAIRS = (1, 2, 4)
COMPARE_PAIRS = 2
#: Fine-tune peak learning rate, as a fraction of the pretraining peak (0.3 did better than 0.1 on
#: one conversion, MHA -> MLA r=2 d_c=48 on the text task; nothing else was tried).
LR_FRACTION = 0.3


def pretraining_tokens(task: str, setting: Setting) -> int:
    """Tokens the source models were trained on; for MQAR a lower bound (every batch at its
    shortest length), so a fine-tune sized from it is at most the stated fraction."""
    tc = setting.train_config(task, 0)
    length = setting.text_seq_len if task == "text" else min(setting.mqar.seq_lens)
    return tc.steps * tc.batch_size * length


def finetune_config(task: str, setting: Setting, fraction: float = FINETUNE_FRACTION,
                    batch_size: int = 8) -> tuple[TrainConfig, int]:
    """The fine-tune of every converted model: ``batch_size`` sequences per step, as many steps as
    ``fraction`` of the pretraining tokens allows (at least one), ``LR_FRACTION`` of the pretraining
    peak learning rate. Returns the config and its tokens (an upper bound for MQAR: longest sequences)."""
    length = setting.text_seq_len if task == "text" else setting.mqar.max_seq_len
    steps = max(1, int(fraction * pretraining_tokens(task, setting)) // (batch_size * length))
    base = setting.train_config(task, 0)
    tc = base.replace(steps=steps, batch_size=batch_size, lr=base.lr * LR_FRACTION, warmup_steps=min(2, steps - 1),
                      min_lr_ratio=0.1, weight_decay=0.0, eval_every=steps, eval_batches=1, eval_batch_size=8,
                      data_seed=base.data_seed + 7)
    return tc, steps * batch_size * length


def plan(mha, mla_caches: list[int], gqa_caches: list[int] = ()) -> list[dict[str, Any]]:
    """The MHA -> MLA conversions: for each r, the latents that fill each per-layer cache of a
    from-scratch MLA model (when the factorisation can give them) and the full-rank latent; at
    r = 2 also those that fill each of ``gqa_caches``; then the comparisons at r = 2 (the plain
    factorisation at the first latents, the other pair rules at the middle one)."""
    attn = TransformerLM(mha.replace(n_layers=1)).blocks[0].attn
    half, n_kv = mha.d_h // 2, mha.kv_heads
    out = []
    for r in sorted({min(r, half) for r in ROPE_PAIRS}):
        largest = max_kv_lora_rank(attn, r)
        ranks = sorted({cache - 2 * n_kv * r for cache in mla_caches if 1 <= cache - 2 * n_kv * r < largest}
                       | {largest})                                  # full rank: only the dropped rotations differ
        out += [dict(kv_lora_rank=d_c, rope_pairs=r, rule="contribution", whiten=True) for d_c in ranks]
    r = min(COMPARE_PAIRS, half)
    comparisons = [{**spec, "whiten": False} for spec in out if spec["rope_pairs"] == r]
    matched = [s for s in out if s["rope_pairs"] == r and s["whiten"]]
    if matched:
        mid = matched[len(matched) // 2]
        comparisons += [{**mid, "rule": rule} for rule in ("high", "low")]
    # at r = 2 also the caches of the mean-pooled GQA models, for a comparison at equal bytes
    have = {s["kv_lora_rank"] for s in matched}
    out += [dict(kv_lora_rank=cache - 2 * n_kv * r, rope_pairs=r, rule="contribution", whiten=True)
            for cache in gqa_caches if 1 <= cache - 2 * n_kv * r <= max_kv_lora_rank(attn, r)
            and cache - 2 * n_kv * r not in have]
    return out + comparisons


def _label(spec: dict[str, Any]) -> str:
    if spec["method"] == "gqa_to_mla":
        return "GQA-2 -> MLA (exact)"
    if spec["method"] == "mean_pool":
        return f"MHA -> GQA-{spec['num_kv_heads']} (mean-pooled)"
    extra = "" if spec["whiten"] else ", plain SVD"
    return f"MHA -> MLA r={spec['rope_pairs']} d_c={spec['kv_lora_rank']} ({spec['rule']}{extra})"


def _measure(model: TransformerLM, task: str, setting: Setting) -> dict[str, Any]:
    if task == "text":
        return {"val_loss": text_val_loss(model, make_task("text", setting), windows=setting.text_val_windows)}
    grid = mqar_grid(model, setting)
    return {"accuracy": statistics.fmean(grid["by_pairs"].values()), **grid}


def metric_of(task: str) -> str:
    """The number each task is judged by: validation loss (text), mean MQAR accuracy (mqar)."""
    return "val_loss" if task == "text" else "accuracy"


def _source(task: str, label: str, setting: Setting, out_dir, device, progress) -> tuple[TransformerLM, list, str]:
    cfg = dict(variants(task, setting))[label]
    path = checkpoint_path(checkpoint_name(task, cfg), out_dir)
    trained = []
    if not path.is_file():
        trained.append(run_one(RunSpec(label, task, cfg, setting.seeds[0], checkpoint=str(path)), setting, device,
                               progress))
    model = TransformerLM.from_checkpoint(path)
    if model.config != cfg:
        raise ValueError(f"{path} holds a model of another size than this setting's {label}")
    return model.to(device).eval(), trained, path.name


def _from_scratch(setting: Setting, out_dir) -> dict[str, Any]:
    """Experiment a's models at every cache (mean over seeds), for the plots."""
    try:
        a = load_result("matched_cache", None if out_dir is None else pathlib.Path(out_dir) / "matched_cache.json")
    except FileNotFoundError:
        return {}
    if a.get("setting") != setting.to_dict():
        return {}
    out: dict[str, Any] = {}
    for task, summary in a["summary"].items():
        out[task] = {}
        for label, v in summary["variants"].items():
            row = {"cache_values_per_token": v["cache_values_per_token"]}
            if task == "text":
                row["val_loss"] = v["val_loss"]["mean"]
            else:
                row["accuracy"] = statistics.fmean(p["mean"] for p in v["by_pairs"].values())
            out[task][label] = row
    return out


def run(setting: Setting, workers: int = 1, device: str | None = None, progress: bool = True,
        out_dir: str | pathlib.Path | None = None, fraction: float = FINETUNE_FRACTION,
        llama: bool | None = None) -> dict[str, Any]:
    """Every conversion of both tasks, measured before and after its fine-tune; then (``llama``,
    default: not in the tiny setting) a Llama-3-8B-shaped layer converted, timed and sized."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    llama = setting.name != "tiny" if llama is None else llama
    meta = metadata(device, workers)
    scratch = _from_scratch(setting, out_dir)
    result: dict[str, Any] = {"experiment": NAME, **meta, "setting": setting.to_dict(), "tasks": {},
                              "from_scratch": scratch, "finetune_fraction_max": fraction}
    trained_rows: list[dict[str, Any]] = []
    for task in ("text", "mqar"):
        mha, t1, mha_file = _source(task, "MHA", setting, out_dir, device, progress)
        gqa, t2, gqa_file = _source(task, "GQA-2", setting, out_dir, device, progress)
        trained_rows += t1 + t2
        tc, ft_tokens = finetune_config(task, setting, fraction)
        data = make_task(task, setting)
        if task == "mqar":
            data = dataclasses.replace(data, easy_steps=0)  # the curriculum is for training from scratch
        calib_x, _ = make_task(task, setting).batch("train", 16, torch.Generator().manual_seed(4321))
        calib_x = calib_x.to(mha.embed.weight.device)
        mla_caches = sorted({row["cache_values_per_token"] // setting.model.n_layers
                             for label, row in scratch.get(task, {}).items() if label.startswith("MLA")}) or \
            sorted({cfg.cache_elements_per_token() // cfg.n_layers for label, cfg in variants(task, setting)
                    if label.startswith("MLA")})
        specs = [dict(method="gqa_to_mla")]
        pools = [g for g in range(mha.config.n_heads - 1, 0, -1) if mha.config.n_heads % g == 0]
        gqa_caches = [2 * g * mha.config.d_h for g in pools]
        specs += [dict(method="mha_to_mla", **s) for s in plan(mha.config, mla_caches, gqa_caches)]
        specs += [dict(method="mean_pool", num_kv_heads=g) for g in pools]
        rows = []
        for spec in tqdm(specs, desc=f"{NAME} {task}", disable=not progress):
            wall, cpu = time.perf_counter(), time.process_time()
            source = gqa if spec["method"] == "gqa_to_mla" else mha
            kwargs = {k: v for k, v in spec.items() if k != "method"}
            converted = convert_model(source, spec["method"], calibration=calib_x, **kwargs)
            convert_s = time.perf_counter() - wall
            before = _measure(converted.eval(), task, setting)
            tuned_wall = time.perf_counter()
            history = train(converted, data, tc, device=device, progress=False, init=False)
            after = _measure(converted.eval(), task, setting)
            rows.append({"label": _label(spec), **spec, "source": "GQA-2" if spec["method"] == "gqa_to_mla" else "MHA",
                         "cache_values_per_token": converted.config.cache_elements_per_token(),
                         "cache_bytes_per_token_bf16": converted.cache_bytes_per_token(torch.bfloat16),
                         "params": converted.num_parameters(), "before": before, "after": after,
                         "finetune_history": history, "convert_s": convert_s,
                         "finetune_s": time.perf_counter() - tuned_wall,
                         "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
        sources = {}
        for label, model, file in (("MHA", mha, mha_file), ("GQA-2", gqa, gqa_file)):
            sources[label] = {"checkpoint": file, "cache_values_per_token": model.config.cache_elements_per_token(),
                              "metrics": _measure(model, task, setting)}
        result["tasks"][task] = {"pretraining_tokens": pretraining_tokens(task, setting),
                                 "finetune": {"config": tc.to_dict(), "tokens_at_most": ft_tokens,
                                              "fraction_at_most": ft_tokens / pretraining_tokens(task, setting)},
                                 "calibration_sequences": int(calib_x.shape[0]), "sources": sources, "runs": rows}
    if llama:
        result["llama_layer"] = llama_layer()
    return finish(result, start, trained_rows + [r for t in result["tasks"].values() for r in t["runs"]])


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def measured(fn, *args, **kwargs) -> tuple[Any, float, int | None]:
    """``fn(*args, **kwargs)``, its wall time (s) and the growth of this process's resident memory
    at its peak over the start (bytes, sampled every 2 ms; ``None`` where /proc is missing)."""
    import threading

    base = _rss()
    peak = [base or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss() or 0)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - t
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss() or 0)
    return out, seconds, None if base is None else peak[0] - base


def llama_layer(kv_lora_rank: int = 512, rope_pairs: int = 8, tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """One attention layer of Llama-3-8B's shape (random weights): converted exactly and by the
    partial-RoPE SVD (plain: random weights have no activations worth whitening for), with each
    conversion's time, memory and cache per token, and its outputs checked on ``tokens`` tokens."""
    cfg = ATTENTION_PRESETS["Llama-3-8B"]
    torch.manual_seed(seed)
    attn = MultiHeadAttention.from_config(cfg)
    x = torch.randn(1, tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = attn(x)
    out: dict[str, Any] = {"model": cfg.name, "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads,
                           "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                           "rope_theta": cfg.rope_theta, "tokens_checked": tokens,
                           "source_weights_bytes_fp32": 4 * sum(p.numel() for p in attn.parameters()),
                           "gqa_cache_values_per_token_layer": 2 * cfg.num_key_value_heads * cfg.head_dim}
    for name, fn, args in (("exact", gqa_to_mla, ()), ("approximate", mha_to_mla, (kv_lora_rank, rope_pairs, "high"))):
        layer, seconds, memory = measured(fn, attn, *args)
        with torch.no_grad():
            got = layer(x, mode="absorbed")
        c = layer.config
        out[name] = {"seconds": seconds, "peak_memory_growth_bytes": memory,
                     "weights_bytes_fp32": 4 * sum(p.numel() for p in layer.parameters()),
                     "kv_lora_rank": c.kv_lora_rank, "qk_rope_head_dim": c.qk_rope_head_dim,
                     "cache_values_per_token_layer": c.latent_cache_dim,
                     "max_abs_error": (got - ref).abs().max().item(),
                     "relative_error": ((got - ref).norm() / ref.norm()).item()}
        if name == "approximate":
            out[name]["rope_pairs"], out[name]["rule"] = rope_pairs, "high"
        del layer
    return out


def load(path: str | pathlib.Path | None = None) -> dict[str, Any]:
    """The recorded run (``mla_tutorial/results/convert/convert.json``, or ``path``)."""
    return load_result(NAME, path if path is not None else RESULTS_DIR / f"{NAME}.json")


def plot_vs_cache(result: dict[str, Any], task: str, ax=None):
    """The task's metric against cache bytes per token (bf16): each conversion before (hollow) and
    after (filled) its fine-tune, the mean-pooled GQA models, the sources and the MLA models
    trained from scratch."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.2))
    t = result["tasks"][task]
    metric = metric_of(task)
    groups = [("MHA -> MLA r=1", "tab:blue"), ("MHA -> MLA r=2", "tab:orange"), ("MHA -> MLA r=4", "tab:green"),
              ("MHA -> GQA", "tab:purple"), ("GQA-2 -> MLA", "tab:red")]
    for prefix, color in groups:
        rows = sorted((r for r in t["runs"] if r["label"].startswith(prefix)
                       and (r.get("whiten", True) and r.get("rule", "contribution") == "contribution")),
                      key=lambda r: r["cache_values_per_token"])
        if not rows:
            continue
        x = [2 * r["cache_values_per_token"] for r in rows]
        ax.plot(x, [r["before"][metric] for r in rows], "o--", mfc="none", color=color, alpha=0.7)
        ax.plot(x, [r["after"][metric] for r in rows], "o-", color=color, label=f"{prefix} (after fine-tune)")
    scratch = result.get("from_scratch", {}).get(task, {})
    mla = sorted((v for k, v in scratch.items() if k.startswith("MLA")), key=lambda v: v["cache_values_per_token"])
    if mla:
        ax.plot([2 * v["cache_values_per_token"] for v in mla], [v[metric] for v in mla], "s:", color="black",
                label="MLA trained from scratch (3 seeds)")
    for label, src in t["sources"].items():
        ax.plot([2 * src["cache_values_per_token"]], [src["metrics"][metric]], "*", ms=12, color="gray")
        ax.annotate(f"trained {label}", (2 * src["cache_values_per_token"], src["metrics"][metric]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache per token, bytes (bf16, both layers)")
    ax.set_ylabel("validation loss (nats per byte)" if metric == "val_loss" else "MQAR accuracy (mean over 2-16 pairs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return ax
