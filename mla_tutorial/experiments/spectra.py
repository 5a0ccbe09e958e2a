"""Experiment c: are a trained model's keys and values low-rank? (chapter 10; chapter 04 argues it)

For each layer of a trained MHA model and of the same model at its initialisation, the singular
values of

* the stacked projection ``[W_K; W_V]`` (2 n_h d_h rows, d_model columns): what any token's keys
  and values can be;
* the keys and values of real tokens, ``[k_t; v_t]`` for 4,096 tokens, before RoPE: what they are;
* the same as the cache holds them, keys rotated by RoPE.

MLA bets that a latent of d_c numbers per token carries what the layer needs. If trained keys
and values concentrate in far fewer than their 2 n_h d_h (or d_model) directions, and random ones
do not, the bet stands on trained weights; :func:`energy_in_top` says how much a latent as wide
as the matched MLA's (d_c = 4 d_h) would keep.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import torch

from ..data import TextCorpus
from ..model import TransformerLM
from .common import RunSpec, Setting, base_config, checkpoint_name, checkpoint_path, finish, metadata, run_one

__all__ = ["NAME", "kv_weight_matrices", "kv_activations", "dims_for_energy", "energy_in_top", "spectra_of",
           "run", "plot_spectra"]

NAME = "spectra"
SOURCES = ("weights", "activations", "cached")


def kv_weight_matrices(model: TransformerLM) -> list[torch.Tensor]:
    """Per layer, ``[W_K; W_V]``: (2 n_kv d_h, d_model)."""
    if model.config.attention == "mla":
        raise ValueError("spectra of [W_K; W_V] need an MHA/GQA/MQA model; MLA has W_DKV, W_UK, W_UV instead")
    return [torch.cat([a.W_K.weight, a.W_V.weight]).detach().double() for a in model.attention_modules]


@torch.no_grad()
def kv_activations(model: TransformerLM, tokens: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per layer, the keys and values of every token of ``tokens`` (B, T), one row per token:
    ``"activations"``: ``[W_K h; W_V h]`` before RoPE; ``"cached"``: the cache's rows (keys
    rotated by RoPE). Each (B * T, 2 n_kv d_h), in fp64."""
    inputs: list[torch.Tensor] = []
    hooks = [a.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append(args[0]), with_kwargs=True)
             for a in model.attention_modules]
    caches = model.new_caches(tokens.shape[0], tokens.shape[1])
    try:
        model.eval()
        model(tokens, caches)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, list[torch.Tensor]] = {"activations": [], "cached": []}
    for attn, h, cache in zip(model.attention_modules, inputs, caches):
        kv = torch.cat([attn.W_K(h), attn.W_V(h)], dim=-1)                              # (B, T, 2 n_kv d_h)
        out["activations"].append(kv.flatten(0, 1).double())
        k, v = cache.get("k"), cache.get("v")                                           # (B, n_kv, T, d_h)
        rows = torch.cat([k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], dim=-1)
        out["cached"].append(rows.flatten(0, 1).double())
    return out


def dims_for_energy(s: torch.Tensor, fraction: float) -> int:
    """The fewest directions whose squared singular values hold ``fraction`` of the total."""
    e = s.double().pow(2).cumsum(0) / s.double().pow(2).sum()
    return int((e < fraction).sum()) + 1


def energy_in_top(s: torch.Tensor, k: int) -> float:
    """Fraction of the squared singular values in the top ``k``: 1 - (relative error)^2 of the best
    rank-k approximation (Eckart-Young)."""
    s2 = s.double().pow(2)
    return float(s2[:k].sum() / s2.sum())


def spectra_of(model: TransformerLM, tokens: torch.Tensor, top: int) -> dict[str, Any]:
    """``{source: [per layer: {"sigma": σ_j / σ_1 list, "dims_90", "dims_99", "energy_top"}]}``."""
    mats = {"weights": kv_weight_matrices(model), **kv_activations(model, tokens)}
    out: dict[str, Any] = {}
    for source, per_layer in mats.items():
        out[source] = []
        for m in per_layer:
            s = torch.linalg.svdvals(m)
            out[source].append({"sigma": [float(f"{v:.5g}") for v in (s / s[0]).tolist()],
                                "dims_90": dims_for_energy(s, 0.90), "dims_99": dims_for_energy(s, 0.99),
                                "energy_top": energy_in_top(s, top), "shape": list(m.shape)})
    return out


def _tokens(task: str, setting: Setting, model: TransformerLM, n_tokens: int = 4096) -> torch.Tensor:
    if task == "text":
        x, _ = TextCorpus(seq_len=setting.text_seq_len).val_windows()
        return x[: max(1, n_tokens // x.shape[1])]
    L, N = setting.mqar_eval_len, max(setting.mqar_eval_pairs)
    g = torch.Generator().manual_seed(777)
    x, _ = setting.mqar.batch("val", max(1, n_tokens // L), g, num_pairs=N, seq_len=L)
    return x


def run(setting: Setting, workers: int = 1, device: str | None = None, progress: bool = True,
        out_dir: str | pathlib.Path | None = None, tasks: tuple[str, ...] = ("text", "mqar")) -> dict[str, Any]:
    """Spectra of the recorded MHA checkpoints of experiment a (trained here if missing), against the
    same models at their initialisation."""
    start = time.perf_counter()
    meta = metadata(device, workers)
    result: dict[str, Any] = {"experiment": NAME, **meta, "setting": setting.to_dict(), "tasks": {}}
    trained_rows = []
    for task in tasks:
        cfg = base_config(task, setting, attention="mha")
        path = checkpoint_path(checkpoint_name(task, cfg), out_dir)
        source = "recorded checkpoint of matched_cache"
        if not path.is_file():
            trained_rows.append(run_one(RunSpec("MHA", task, cfg, setting.seeds[0], checkpoint=str(path)), setting,
                                        device, progress))
            source = "trained by this experiment"
        trained = TransformerLM.from_checkpoint(path)
        if trained.config != cfg:
            raise ValueError(f"{path} holds {trained.config.label} of another size than this setting's MHA; "
                             f"remove it or use another out_dir")
        seed = setting.seeds[0]
        torch.manual_seed(seed)          # exactly the initialisation train() gave the model
        init = TransformerLM(cfg)
        tokens = _tokens(task, setting, trained)
        d_c = 4 * cfg.d_h
        result["tasks"][task] = {
            "checkpoint": path.name, "checkpoint_source": source, "config": cfg.to_dict(), "seed": seed,
            "tokens": list(tokens.shape), "top": d_c,
            "trained": spectra_of(trained, tokens, d_c), "init": spectra_of(init, tokens, d_c)}
    result["summary"] = {task: {state: {src: [{"dims_90": l["dims_90"], "dims_99": l["dims_99"],
                                               "energy_top": l["energy_top"]} for l in t[state][src]]
                                        for src in SOURCES} for state in ("trained", "init")}
                         for task, t in result["tasks"].items()}
    return finish(result, start, trained_rows)


_TITLES = {"weights": r"weights $[W^K; W^V]$", "activations": "keys and values of tokens",
           "cached": "as cached (keys after RoPE)"}


def plot_spectra(result: dict[str, Any], task: str = "text", axes=None):
    """Three panels (weights, token keys/values, as cached): σ_j / σ_1 of each layer, trained (solid)
    and at initialisation (dashed), with the matched MLA's d_c marked."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=80, sharey=True)
    t = result["tasks"][task]
    for ax, src in zip(axes, SOURCES):
        for layer, (tr, ini) in enumerate(zip(t["trained"][src], t["init"][src])):
            color = f"C{layer}"
            ax.semilogy(range(1, len(tr["sigma"]) + 1), tr["sigma"], color=color, label=f"layer {layer + 1}, trained")
            ax.semilogy(range(1, len(ini["sigma"]) + 1), ini["sigma"], color=color, ls="--",
                        label=f"layer {layer + 1}, at initialisation")
        ax.axvline(t["top"], color="gray", ls=":", label=f"d_c = {t['top']} (matched MLA)")
        d_model = t["config"]["d_model"]
        if src == "weights" or d_model < len(t["trained"][src][0]["sigma"]):
            ax.axvline(d_model, color="k", ls="-.", lw=0.8, label=f"d_model = {d_model}")
        ax.set_title(_TITLES[src], fontsize=10)
        ax.set_xlabel("index j of the singular value")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(r"$\sigma_j / \sigma_1$")
    axes[0].set_ylim(1e-4, 1.5)
    axes[-1].legend(fontsize=7)
    return axes
