"""Experiment b: more attention heads, more layers, at a fixed budget (chapter 10).

Every model is the MLA of experiment a (d_c = 4 d_h, d_h_R = d_h / 2, d_h = 16), with its SwiGLU
width set so that it has as many parameters as experiment a's MHA model. Three sweeps:

* ``heads``: n_h = 2, 6, 12 query heads. MLA's cache, d_c + d_h_R per token and layer, does not
  depend on the heads at all, so this sweep holds both the parameters and the cache fixed;
  heads cost attention FLOPs and parameters (paid for here by a narrower MLP).
* ``layers_fixed_params``: 1, 2, 4 layers with the same latent per layer: the cache grows with
  the depth (l (d_c + d_h_R) per token), the MLPs shrink to keep the parameters.
* ``layers_fixed_cache``: 1, 2, 4 layers sharing one cache budget, 2 (4 d_h + d_h / 2) values
  per token: d_c = 136, 64, 28 for d_h = 16.

The point n_h = 6 with 2 layers is experiment a's "MLA d_c=64"; its runs (all of experiment a's
seeds) are reused from the recorded result of experiment a when the settings agree, and trained
here otherwise. The other points are trained with the setting's ``sweep_seeds``.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

from .common import (RunSpec, Setting, base_config, count_params, finish, load_result, match_params, metadata,
                     run_all, stats)
from .matched_cache import NAME as MATCHED, mla_like

__all__ = ["NAME", "GROUPS", "sweeps", "specs", "run", "summarize", "plot_sweeps"]

NAME = "heads_layers"
HEADS = (2, 6, 12)
LAYERS = (1, 2, 4)
GROUPS = ("heads", "layers_fixed_params", "layers_fixed_cache")


def _mla(task: str, setting: Setting):
    """Experiment a's matched MLA (d_c = 4 d_h) before its MLP is matched, and MHA's parameter count."""
    mha = base_config(task, setting, attention="mha")
    return mla_like(mha, 4 * mha.d_h), count_params(mha)


def sweeps(task: str, setting: Setting) -> dict[str, list[tuple[int, Any]]]:
    """``{group: [(x, LMConfig), ...]}``, every config with MHA's parameter count."""
    base, target = _mla(task, setting)
    d_R, n_layers = base.qk_rope_head_dim, base.n_layers
    budget = n_layers * (base.kv_lora_rank + d_R)  # cache values per token of the base model
    out: dict[str, list[tuple[int, Any]]] = {g: [] for g in GROUPS}
    for h in HEADS:
        out["heads"].append((h, match_params(base.replace(n_heads=h), target)))
    for L in LAYERS:
        out["layers_fixed_params"].append((L, match_params(base.replace(n_layers=L), target)))
        d_c = budget // L - d_R
        out["layers_fixed_cache"].append((L, match_params(base.replace(n_layers=L, kv_lora_rank=d_c), target)))
    return out


def base_config_matched(task: str, setting: Setting):
    """The point every sweep shares: experiment a's matched MLA (6 heads, 2 layers), parameters matched."""
    base, target = _mla(task, setting)
    return match_params(base, target)


def specs(setting: Setting, reuse: set[tuple[str, str]] = frozenset()) -> list[RunSpec]:
    """Every run of the sweeps; the base model appears once per task and seed (in the ``heads``
    group), and not at all where ``(task, label)`` is in ``reuse``."""
    runs = []
    for task in ("text", "mqar"):
        base = base_config_matched(task, setting)
        seen = False
        for group, points in sweeps(task, setting).items():
            for x, cfg in points:
                if cfg == base:
                    if seen or (task, "base") in reuse:
                        continue
                    seen = True
                for seed in setting.sweep_seeds:
                    runs.append(RunSpec(_label(cfg), task, cfg, seed, group=group, x=x))
    return runs


def _label(cfg) -> str:
    return f"{cfg.n_heads} heads, {cfg.n_layers} layers, d_c={cfg.kv_lora_rank}"


def _reusable_base(setting: Setting, out_dir: str | pathlib.Path | None) -> dict[str, list[dict[str, Any]]]:
    """Experiment a's runs of the base model, if its result in ``out_dir`` used this setting."""
    try:
        a = load_result(MATCHED, None if out_dir is None else pathlib.Path(out_dir) / f"{MATCHED}.json")
    except FileNotFoundError:
        return {}
    if a.get("setting") != setting.to_dict():
        return {}
    out = {}
    for task in ("text", "mqar"):
        base = base_config_matched(task, setting)
        rows = [r for r in a["runs"] if r["task"] == task and r["config"] == base.to_dict()]
        if sorted(r["seed"] for r in rows) == sorted(setting.seeds):
            out[task] = rows
    return out


def run(setting: Setting, workers: int = 1, device: str | None = None, progress: bool = True,
        out_dir: str | pathlib.Path | None = None, reuse_matched: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    meta = metadata(device, workers)
    reused = _reusable_base(setting, out_dir) if reuse_matched else {}
    rows = run_all(specs(setting, {(t, "base") for t in reused}), setting, workers, device, progress, desc=NAME)
    new_cpu = list(rows)
    for task, base_rows in reused.items():
        base = base_config_matched(task, setting)
        for r in base_rows:
            rows.append({**r, "label": _label(base), "group": "heads", "x": base.n_heads,
                         "reused_from": MATCHED})
    # the base model belongs to every sweep: list it in the other two groups as well
    for r in [r for r in rows if r["group"] == "heads"]:
        base = base_config_matched(r["task"], setting)
        if r["config"] == base.to_dict():
            rows.append({**r, "group": "layers_fixed_params", "x": base.n_layers, "duplicate_of": "heads"})
            rows.append({**r, "group": "layers_fixed_cache", "x": base.n_layers, "duplicate_of": "heads"})
    result = {"experiment": NAME, **meta, "setting": setting.to_dict(), "seeds": list(setting.sweep_seeds),
              "reused_from_matched_cache": sorted(reused), "runs": rows}
    result["summary"] = summarize(result)
    return finish(result, start, new_cpu)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """``{task: {group: [{x, params, cache_values_per_token, n_heads, n_layers, d_c, val_loss stats,
    mqar accuracy stats at each pair count}, ...]}}``, sorted by x."""
    out: dict[str, Any] = {}
    for task in ("text", "mqar"):
        out[task] = {}
        for group in GROUPS:
            rows = [r for r in result["runs"] if r["task"] == task and r["group"] == group]
            points = []
            for x in sorted({r["x"] for r in rows}):
                rs = [r for r in rows if r["x"] == x]
                c = rs[0]["config"]
                p = {"x": x, "params": rs[0]["params"], "cache_values_per_token": rs[0]["cache_values_per_token"],
                     "n_heads": c["n_heads"], "n_layers": c["n_layers"], "d_c": c["kv_lora_rank"], "d_ff": c["d_ff"],
                     "val_loss": stats([r["val_loss"] for r in rs])}
                if task == "mqar":
                    p["by_pairs"] = {k: stats([r["mqar"]["by_pairs"][k] for r in rs]) for k in rs[0]["mqar"]["by_pairs"]}
                points.append(p)
            out[task][group] = points
    return out


_TITLES = {"heads": "query heads (params and cache fixed)", "layers_fixed_params": "layers (params fixed)",
           "layers_fixed_cache": "layers (params and cache fixed)"}


def plot_sweeps(result: dict[str, Any], axes: Sequence | None = None, pairs: int | None = None):
    """Two rows of three panels: text validation loss (top) and MQAR accuracy at ``pairs`` pairs
    (bottom; default the most pairs evaluated) against each sweep's variable; bars from the worst
    to the best seed; the cache values per token are written next to each point."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(2, 3, figsize=(11, 6), dpi=80, sharey="row")
    summ = result["summary"]
    pairs = pairs or max(int(k) for k in summ["mqar"]["heads"][0]["by_pairs"])
    for j, group in enumerate(GROUPS):
        for i, task in enumerate(("text", "mqar")):
            ax = axes[i][j]
            pts = summ[task][group]
            xs = [p["x"] for p in pts]
            st = [p["val_loss"] if task == "text" else p["by_pairs"][str(pairs)] for p in pts]
            ax.errorbar(xs, [s["mean"] for s in st], yerr=[[s["mean"] - s["min"] for s in st],
                                                           [s["max"] - s["mean"] for s in st]],
                        marker="o", capsize=3)
            for p, s in zip(pts, st):
                ax.annotate(f"{p['cache_values_per_token']}", (p["x"], s["mean"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color="gray")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.grid(True, alpha=0.3)
            if i == 1:
                ax.set_xlabel(_TITLES[group])
            if j == 0:
                ax.set_ylabel("validation loss (nats per byte)" if task == "text" else f"MQAR accuracy, {pairs} pairs")
    return axes
