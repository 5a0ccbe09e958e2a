"""Experiment a: quality at matched cache bytes (chapter 10).

MHA, GQA with 3 and 2 key/value groups, MQA, and MLA with a latent of d_c = 16, 32, 64, 128,
all with 6 query heads of width d_h = 16 in two layers of width 96. Per token and layer they cache

    MHA 2·6·16 = 192,  GQA-3 96,  GQA-2 64,  MQA 32 values;   MLA d_c + d_h_R = d_c + 8.

MLA with d_c = 4 d_h = 64 and d_h_R = d_h / 2 = 8 caches 72 = 4.5 d_h values: what GQA with 2.25
groups would cache (DeepSeek-V2, Table 1). 2.25 groups is not a whole number of heads, so GQA-2
(64) and GQA-3 (96) bracket it; 6 query heads make both divide. Every variant's SwiGLU width is
chosen so that its parameter count matches MHA's (:func:`~.common.match_params`). Each variant is
trained on the text task and on MQAR with every seed of the setting.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

from .common import (RunSpec, Setting, base_config, checkpoint_name, checkpoint_path, count_params, finish,
                     match_params, metadata, run_all, stats)

__all__ = ["NAME", "variants", "specs", "run", "summarize", "plot_mqar", "plot_loss_vs_cache", "sizes_table", "style",
           "matched_mla_label", "checkpointed"]

NAME = "matched_cache"
LATENT_MULTIPLES = (1, 2, 4, 8)  # d_c / d_h; 4 is DeepSeek's ratio (512 / 128)


def matched_mla_label(setting: Setting) -> str:
    """The MLA variant whose cache equals GQA with 2.25 groups: d_c = 4 d_h (``"MLA d_c=64"``)."""
    return f"MLA d_c={4 * setting.model.replace(attention='mha').d_h}"


def checkpointed(setting: Setting) -> tuple[str, ...]:
    """Variants whose first-seed models are saved with the run (for chapters 09-11)."""
    return ("MHA", "GQA-2", matched_mla_label(setting))


def mla_like(mha, d_c: int):
    """The MLA counterpart of an MHA config: the same heads, d_h = d_v = the MHA head width,
    d_h_R = d_h / 2 (DeepSeek's ratio, 64 / 128), latent width ``d_c``."""
    d_h = mha.d_h
    return mha.replace(attention="mla", kv_lora_rank=d_c, qk_nope_head_dim=d_h, v_head_dim=d_h,
                       qk_rope_head_dim=max(2, d_h // 2), head_dim=None)


def variants(task: str, setting: Setting) -> list[tuple[str, Any]]:
    """``[(label, LMConfig), ...]``, parameters matched to the MHA model's."""
    mha = base_config(task, setting, attention="mha")
    d_h, n_h = mha.d_h, mha.n_heads
    target = count_params(mha)
    out = [("MHA", mha)]
    for g in sorted((g for g in range(2, n_h) if n_h % g == 0), reverse=True):
        out.append((f"GQA-{g}", match_params(mha.replace(attention="gqa", n_kv_heads=g), target)))
    out.append(("MQA", match_params(mha.replace(attention="mqa"), target)))
    for m in LATENT_MULTIPLES:
        cfg = mla_like(mha, m * d_h)
        out.append((cfg.label, match_params(cfg, target)))
    return out


def specs(setting: Setting, out_dir: str | pathlib.Path | None = None, checkpoints: bool = True) -> list[RunSpec]:
    runs = []
    for task in ("text", "mqar"):
        for label, cfg in variants(task, setting):
            for seed in setting.seeds:
                ckpt = None
                if checkpoints and seed == setting.seeds[0] and label in checkpointed(setting):
                    ckpt = str(checkpoint_path(checkpoint_name(task, cfg), out_dir))
                runs.append(RunSpec(label, task, cfg, seed, group="variant",
                                    x=cfg.cache_elements_per_token(), checkpoint=ckpt))
    return runs


def run(setting: Setting, workers: int = 1, device: str | None = None, progress: bool = True,
        out_dir: str | pathlib.Path | None = None, checkpoints: bool = True) -> dict[str, Any]:
    """Train every variant on both tasks with every seed; returns the results (JSON-ready)."""
    start = time.perf_counter()
    meta = metadata(device, workers)
    all_specs = specs(setting, out_dir, checkpoints)
    rows = run_all(all_specs, setting, workers, device, progress, desc=NAME)
    result = {"experiment": NAME, **meta, "setting": setting.to_dict(), "seeds": list(setting.seeds),
              "variants": {task: [{"label": lab, "config": cfg.to_dict(), "params": count_params(cfg),
                                   "cache_values_per_token": cfg.cache_elements_per_token()}
                                  for lab, cfg in variants(task, setting)] for task in ("text", "mqar")},
              "runs": rows}
    result["summary"] = summarize(result)
    return finish(result, start, rows)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per task and variant: parameters, cache values per token, and mean / min / max / std over
    seeds of the text validation loss or of the MQAR accuracy at each grid point."""
    out: dict[str, Any] = {}
    for task in ("text", "mqar"):
        rows = [r for r in result["runs"] if r["task"] == task]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        per: dict[str, Any] = {}
        for lab in labels:
            rs = [r for r in rows if r["label"] == lab]
            entry: dict[str, Any] = {"params": rs[0]["params"], "cache_values_per_token": rs[0]["cache_values_per_token"],
                                     "val_loss": stats([r["val_loss"] for r in rs])}
            if task == "mqar":
                for axis in ("by_pairs", "by_len"):
                    entry[axis] = {k: stats([r["mqar"][axis][k] for r in rs]) for k in rs[0]["mqar"][axis]}
            per[lab] = entry
        params = [e["params"] for e in per.values()]
        out[task] = {"variants": per, "params_spread": (max(params) - min(params)) / per["MHA"]["params"]}
    return out


# --- figures ---------------------------------------------------------------------------------------
def style(label: str, labels: Sequence[str] = ()) -> dict[str, Any]:
    """One look per variant in every figure: MHA black circles, GQA blue squares (darker with more
    groups), MQA purple triangles, MLA stars from light to dark orange as d_c grows (among ``labels``)."""
    import matplotlib.pyplot as plt

    kind = label.split()[0].split("-")[0]
    if kind == "MHA":
        return {"color": "black", "marker": "o"}
    if kind == "GQA":
        groups = sorted({int(lab.split("-")[1]) for lab in labels if lab.startswith("GQA-")} | {int(label.split("-")[1])})
        shade = 0.45 + 0.45 * groups.index(int(label.split("-")[1])) / max(1, len(groups) - 1)
        return {"color": plt.cm.Blues(shade), "marker": "s"}
    if kind == "MQA":
        return {"color": "tab:purple", "marker": "^"}
    widths = sorted({int(lab.split("=")[1]) for lab in labels if lab.startswith("MLA")} | {int(label.split("=")[1])})
    shade = 0.35 + 0.6 * widths.index(int(label.split("=")[1])) / max(1, len(widths) - 1)
    return {"color": plt.cm.Oranges(shade), "marker": "*", "ms": 9}


def _legend_outside(ax, **kwargs) -> None:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, **kwargs)


def plot_mqar(result: dict[str, Any], ax=None, axis: str = "by_pairs", labels: Sequence[str] | None = None):
    """MQAR accuracy (mean over seeds, bars from the worst to the best seed) against the number of
    pairs (``axis="by_pairs"``) or the sequence length (``"by_len"``), one line per variant."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    per = result["summary"]["mqar"]["variants"]
    for i, (lab, e) in enumerate(per.items()):
        if labels is not None and lab not in labels:
            continue
        xs = [int(k) for k in e[axis]]
        mean = [e[axis][k]["mean"] for k in e[axis]]
        lo = [e[axis][k]["mean"] - e[axis][k]["min"] for k in e[axis]]
        hi = [e[axis][k]["max"] - e[axis][k]["mean"] for k in e[axis]]
        shift = 1 + 0.012 * (i - len(per) / 2)  # spread the bars of overlapping points apart
        ax.errorbar([x * shift for x in xs], mean, yerr=[lo, hi], capsize=2, lw=1.2,
                    label=f"{lab} ({e['cache_values_per_token']})", **{"ms": 6, **style(lab, list(per))})
    setting = result["setting"]
    if axis == "by_pairs":
        xs = [int(k) for k in next(iter(per.values()))[axis]]
        ax.plot(xs, [1 / n for n in xs], "k:", lw=1, label="chance (1 / pairs)")
        ax.set_xlabel(f"key-value pairs (sequences of {setting['mqar_eval_len']} tokens)")
    else:
        n = setting["mqar_eval_lens_pairs"]
        ax.axhline(1 / n, color="k", ls=":", lw=1, label=f"chance (1/{n})")
        train_max = max(setting["mqar"]["seq_len"]) if isinstance(setting["mqar"]["seq_len"], list) \
            else setting["mqar"]["seq_len"]
        ax.axvline(train_max, color="gray", ls="--", lw=1, label="longest training length")
        ax.set_xlabel(f"sequence length (tokens, {n} pairs)")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import ScalarFormatter
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_ylabel("MQAR accuracy (fraction of queries)")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax, title="variant (cache values\nper token)", title_fontsize=7)
    return ax


def plot_loss_vs_cache(result: dict[str, Any], ax=None, task: str = "text", metric: str = "val_loss",
                       pairs: int | None = None, legend: bool = True):
    """Text held-out loss (or MQAR accuracy at ``pairs`` pairs) against cache values per token,
    mean over seeds with worst-to-best bars; the MLA d_c sweep is joined by a line."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    per = result["summary"][task]["variants"]
    mla_pts = []
    for lab, e in per.items():
        st = e[metric] if pairs is None else e["by_pairs"][str(pairs)]
        x = e["cache_values_per_token"]
        ax.errorbar([x], [st["mean"]], yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], capsize=3,
                    ls="none", label=lab, **{"ms": 7, **style(lab, list(per))})
        if lab.startswith("MLA"):
            mla_pts.append((x, st["mean"]))
    if mla_pts:
        ax.plot(*zip(*sorted(mla_pts)), color=plt.cm.Oranges(0.6), lw=0.8, zorder=0)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("cache per token (values, all layers)")
    ax.set_ylabel("held-out loss (nats per byte)" if pairs is None else f"MQAR accuracy, {pairs} pairs")
    ax.grid(True, alpha=0.3)
    if legend:
        _legend_outside(ax)
    return ax


def sizes_table(result: dict[str, Any], task: str = "text") -> str:
    """A plain-text table of the variants: parameters, difference from MHA, cache per token."""
    rows = result["variants"][task]
    ref = rows[0]["params"]
    lines = [f"{'variant':<12} {'params':>9} {'vs MHA':>7} {'d_ff':>5} {'cache values/token':>19} {'bf16 bytes':>10}"]
    for r in rows:
        lines.append(f"{r['label']:<12} {r['params']:>9,} {100 * (r['params'] / ref - 1):>+6.2f}% "
                     f"{r['config']['d_ff']:>5} {r['cache_values_per_token']:>19} "
                     f"{2 * r['cache_values_per_token']:>10}")
    return "\n".join(lines)
