"""Quantized latent caches, measured: each format's attention-output error, by position, at V3's dims.

    python -m mla_tutorial.quant_bench                                  # 65,536 tokens, 16 probes
    python -m mla_tutorial.quant_bench --max-context 8192 --probes 12 --out /tmp/q.json
    mla-quant-bench --device cuda --hidden-size 7168 --max-context 131072

One MLA layer with DeepSeek-V3's head dimensions (:func:`mla_tutorial.bench.bench_config`: 128
heads, d_c = 512, d_h_R = 64, YaRN; hidden size 2048 unless given) and seeded random weights reads
one sequence of ``max_context`` tokens (seeded random hidden states). Its latents are written into
a paged pool in each format (:mod:`mla_tutorial.quant`), and *probe* queries at positions spread
geometrically from 16 to the last token each decode one step with
:func:`~mla_tutorial.paged.paged_absorbed_attention`, seeing the cache up to their own position.
All probes share the sequence's block table, as a prefix cache shares blocks. For every probe and
format the run records the relative L2 error of the layer's output (after W_UV and W_O) against the
same step read from a bf16 pool, and against an fp32 pool (the unquantized reference).

Random weights give latents without the outlier channels trained models have (DeepSeek's
``kv_a_layernorm`` weights differ widely across channels), and attention that spreads over many
keys. So the run repeats everything in a second *regime*, ``outliers``: 8 of the 512 latent
channels scaled by 16 through the layer's RMSNorm weight, the case where one large value sets a
whole tile's scale. It also records how spread out the attention is (the effective number of keys,
``exp(entropy)`` of the attention weights averaged over heads, and the largest weight a head puts
on one key) and the largest latent value each probe can see.

The results (JSON) hold the device, torch version, date, wall time, configuration and every
error; :func:`load_quant_results` reads those recorded in ``mla_tutorial/results/quant/``.
Chapter 12 shows them. Bytes per token and what they do to the throughput model are computed by
:func:`format_rows`.
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
from .bench import _config_dict, _load_average, bench_config, results_dir, save_results
from .blocks import BlockManager
from .config import MLAConfig
from .device import check_memory, describe_device, pick_device
from .mla import MultiHeadLatentAttention
from .paged import PagedLatentCache, paged_absorbed_attention
from .quant import LATENT_FORMATS, TILE, latent_format

__all__ = ["FORMATS", "REGIMES", "probe_positions", "make_layer", "sequence_and_probes", "probe_outputs",
           "relative_errors", "measure_quant_error", "summarize_errors", "format_summary", "format_rows",
           "quant_results_dir", "load_quant_results", "main"]

#: The formats compared (the fp32 reference is always run as well).
FORMATS = ("bf16", "fp8", "fp8_pow2", "int8", "int6")
#: ``plain``: the layer as initialised; ``sharp``: its queries scaled by 6; ``outliers``: 8 latent
#: channels scaled by 16.
REGIMES = ("plain", "sharp", "outliers")
SCHEMA_VERSION = 1
_SHARP_GAIN, _OUTLIER_CHANNELS, _OUTLIER_GAIN = 6.0, 8, 16.0


def probe_positions(max_context: int, num_probes: int) -> list[int]:
    """``num_probes`` distinct positions spread geometrically from 16 to ``max_context - 1``."""
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 32:
        raise ValueError(f"max_context must be an int >= 32, got {max_context!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"num_probes must be an int >= 2, got {num_probes!r}")
    ratio = (max_context - 1) / 16
    raw = {round(16 * ratio ** (i / (num_probes - 1))) for i in range(num_probes)}
    return sorted(min(p, max_context - 1) for p in raw)


def make_layer(config: MLAConfig, regime: str, seed: int, device: torch.device) -> MultiHeadLatentAttention:
    """The measured layer: seeded random weights, changed as ``regime`` says (module docstring)."""
    torch.manual_seed(seed)
    layer = MultiHeadLatentAttention(config, mode="absorbed").to(device).eval()
    with torch.no_grad():
        if regime == "sharp":     # scores x gain: attention on few keys, as trained heads often are
            layer.W_UQ.weight *= _SHARP_GAIN
            layer.W_QR.weight *= _SHARP_GAIN
        if regime == "outliers":  # a few latent channels far larger than the rest
            g = torch.Generator().manual_seed(seed + 1)
            channels = torch.randperm(config.kv_lora_rank, generator=g)[:_OUTLIER_CHANNELS]
            layer.kv_norm.weight[channels.to(device)] *= _OUTLIER_GAIN
    return layer


def _hidden_chunks(config: MLAConfig, length: int, seed: int, device: torch.device, chunk: int = 2048):
    """Seeded random hidden states (1, t, d_model), ``chunk`` tokens at a time, with their start."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, length, chunk):
        t = min(chunk, length - start)
        yield start, torch.randn(1, t, config.hidden_size, generator=g).to(device)


@torch.no_grad()
def sequence_and_probes(layer: MultiHeadLatentAttention, length: int, probes: Sequence[int], seed: int):
    """The sequence's latents (length, d_c + d_h_R) and the probes' q_lat, q_R (P, 1, n_h, ...)."""
    c, device = layer.config, layer.W_O.weight.device
    latents, q_lat, q_R = [], [], []
    probes_t = torch.tensor(probes)
    for start, x in _hidden_chunks(c, length, seed, device):
        positions = torch.arange(start, start + x.shape[1], device=device)
        latents.append(layer.project_latent(x, positions)[0, 0])
        here = probes_t[(probes_t >= start) & (probes_t < start + x.shape[1])]
        if here.numel():
            q_C, qr, _ = layer.project(x[:, here - start], here.to(device))      # (1, n_h, p, ...)
            q_lat.append(layer.absorb_query(q_C)[0].transpose(0, 1)[:, None])   # (p, 1, n_h, d_c)
            q_R.append(qr[0].transpose(0, 1)[:, None])
    return torch.cat(latents), torch.cat(q_lat), torch.cat(q_R)


def _attention_spread(latents: torch.Tensor, q_lat: torch.Tensor, q_R: torch.Tensor, probes: Sequence[int],
                      scale: float) -> tuple[list[float], list[float]]:
    """Per probe (fp32 reference): exp(entropy) of the attention weights averaged over heads (the
    effective number of keys), and the largest weight any head puts on one key."""
    keys, top = [], []
    for i, p in enumerate(probes):
        q = torch.cat([q_lat[i, 0], q_R[i, 0]], -1)                                 # (n_h, d_c + d_h_R)
        logp = torch.log_softmax(q @ latents[: p + 1].T * scale, dim=-1)            # (n_h, p + 1)
        keys.append(float((-(logp.exp() * logp).sum(-1)).exp().mean()))
        top.append(float(logp.max().exp()))
    return keys, top


@torch.no_grad()
def probe_outputs(layer: MultiHeadLatentAttention, latents: torch.Tensor, q_lat: torch.Tensor, q_R: torch.Tensor,
             probes: Sequence[int], fmt: str, block_size: int, tile: int, seed: int, budget_bytes: float) -> torch.Tensor:
    """The layer's output at every probe (P, d_model) with the cache stored in ``fmt``."""
    c, device = layer.config, latents.device
    length = latents.shape[0]
    manager = BlockManager(-(-length // block_size), block_size, seed=seed)
    cache = PagedLatentCache(manager, c.kv_lora_rank, c.qk_rope_head_dim, fmt=fmt, tile=tile, device=device)
    cache.write(0, manager.allocate("sequence", length).to(device), latents)
    table = manager.block_tables(["sequence"], device=device)
    outs, i = [], 0
    while i < len(probes):  # probes in groups whose gathered rows (fp32) fit the budget
        j = i + 1
        while j < len(probes) and (j + 1 - i) * (probes[j] + 1) * latents.shape[1] * 4 * 3 <= budget_bytes:
            j += 1
        lens = torch.tensor([p + 1 for p in probes[i:j]], dtype=torch.int32, device=device)
        o_lat, _ = paged_absorbed_attention(q_lat[i:j], q_R[i:j], cache.pool(0), table.expand(j - i, -1), lens,
                                            layer.scale, kv_format=fmt, tile=tile, return_lse=False)
        outs.append(layer.absorbed_output(o_lat.transpose(1, 2))[:, 0])            # (j - i, d_model)
        i = j
    return torch.cat(outs)


def relative_errors(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """``||a - b|| / ||b||`` for each row of (P, d) outputs."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).tolist()


def measure_quant_error(*, config: MLAConfig | None = None, max_context: int = 65536, num_probes: int = 16,
                        formats: Sequence[str] = FORMATS, regimes: Sequence[str] = REGIMES, block_size: int = 64,
                        tile: int = TILE, seed: int = 0, device: torch.device | str | None = None,
                        progress: bool = True, budget_bytes: float = 256e6, note: str = "") -> dict[str, Any]:
    """Run the measurement (see the module docstring) and return JSON-ready results. ``tile``:
    values per quantization scale (128, FlashMLA's)."""
    from tqdm.auto import tqdm

    started, load_start = time.perf_counter(), _load_average()
    formats = [latent_format(f).name for f in formats]  # a clear error for an unknown format
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown or not regimes:
        raise ValueError(f"unknown regimes {unknown}; choose from {REGIMES}")
    if "bf16" not in formats:
        formats = ["bf16", *formats]
    probes = probe_positions(max_context, num_probes)
    device = pick_device(None if device is None else str(device))
    config = config or bench_config()
    BlockManager(1, block_size)  # clear errors for a bad block size or tile, before any work
    for f in formats:
        latent_format(f).row_bytes(config.kv_lora_rank, config.qk_rope_head_dim, tile)
    check_memory(max_context * config.latent_cache_dim * 4 * 3 + budget_bytes, device,  # latents, two pools, gathers
                 f"the latents of {max_context:,} tokens", "use a smaller max_context (--max-context)")
    result: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": "quantized latent cache error",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": describe_device(device), "threads": torch.get_num_threads(),
                   "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "torch": torch.__version__, "python": platform.python_version(), "note": note,
        "config": _config_dict(config), "max_context": max_context, "probes": probes, "block_size": block_size,
        "seed": seed, "tile": tile, "compute_dtype": "float32",
        "formats": {f: {"row_bytes": latent_format(f).row_bytes(config.kv_lora_rank, config.qk_rope_head_dim, tile),
                        "bits_per_value": latent_format(f).bits_per_value(config.kv_lora_rank, config.qk_rope_head_dim, tile),
                        "description": latent_format(f).description} for f in formats},
        "regimes": {},
    }
    bar = tqdm(total=len(regimes) * (len(formats) + 2), desc="quantized cache", unit="step", disable=not progress)
    for regime in regimes:
        bar.set_postfix_str(f"{regime}: {max_context} tokens of latents")
        layer = make_layer(config, regime, seed, device)
        latents, q_lat, q_R = sequence_and_probes(layer, max_context, probes, seed)
        bar.update()
        outs = {}
        for fmt in ["fp32", *formats]:
            bar.set_postfix_str(f"{regime}: {fmt}")
            outs[fmt] = probe_outputs(layer, latents, q_lat, q_R, probes, fmt, block_size, tile, seed, budget_bytes)
            bar.update()
        c_KV = latents[:, : config.kv_lora_rank]
        keys, top = _attention_spread(latents, q_lat, q_R, probes, layer.scale)
        seen_max = c_KV.abs().amax(-1).cummax(0).values                             # largest |c_KV| so far
        result["regimes"][regime] = {
            "latent_abs_max": float(c_KV.abs().max()), "latent_rms": float(c_KV.pow(2).mean().sqrt()),
            "latent_abs_max_seen": [float(seen_max[p]) for p in probes],
            "effective_keys": keys, "max_attention_weight": top,
            "errors": {f: {"vs_bf16": relative_errors(outs[f], outs["bf16"]), "vs_fp32": relative_errors(outs[f], outs["fp32"])}
                       for f in formats},
        }
        del latents, c_KV, q_lat, q_R, outs
    bar.close()
    result["load_average"] = {"start": load_start, "end": _load_average()}
    result["wall_s"] = time.perf_counter() - started
    result["summary"] = summarize_errors(result)
    return result


def _ranges(max_context: int) -> list[tuple[int, int]]:
    """Position ranges [0, 1K), [1K, 4K), [4K, 16K), ... up to the context."""
    edges = [0, 1024]
    while edges[-1] < max_context:
        edges.append(edges[-1] * 4)
    edges[-1] = max_context
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < max_context]


def summarize_errors(result: dict[str, Any]) -> dict[str, Any]:
    """Per regime, format and position range: mean and max relative error (vs bf16 and vs fp32)."""
    probes = result["probes"]
    out: dict[str, Any] = {}
    for regime, data in result["regimes"].items():
        rows = []
        for lo, hi in _ranges(result["max_context"]):
            idx = [i for i, p in enumerate(probes) if lo <= p < hi]
            if not idx:
                continue
            row: dict[str, Any] = {"positions": [lo, hi], "probes": len(idx)}
            for fmt, errs in data["errors"].items():
                for ref in ("vs_bf16", "vs_fp32"):
                    vals = [errs[ref][i] for i in idx]
                    row[f"{fmt}_{ref}_mean"] = sum(vals) / len(vals)
                    row[f"{fmt}_{ref}_max"] = max(vals)
            rows.append(row)
        out[regime] = rows
    return out


# --- bytes per token and the throughput model ----------------------------------------------------
def format_rows(node: rf.Node | None = None, context: int = rf.PAPER_CONTEXT,
                formats: Sequence[str] = ("bf16", "fp8", "int8", "int6")) -> list[dict[str, Any]]:
    """Each format's bytes per token fed into the roofline model of DeepSeek-V2 against DeepSeek 67B
    (chapter 08): cache reduction and maximum-throughput ratio at ``context`` tokens, on ``node``
    (default: the paper's 8 x H800). A row ``"paper: 6 bits"`` gives the paper's 0.75 B/value."""
    node = node or rf.paper_node()
    base = rf.deepseek_67b()
    base_tps = rf.max_throughput(base, node, context).tokens_per_s
    v2 = MLAConfig.deepseek_v2()
    values = v2.latent_cache_dim
    rows = [(f, latent_format(f).row_bytes(v2.kv_lora_rank, v2.qk_rope_head_dim)) for f in formats]
    rows.append(("paper: 6 bits", 0.75 * values))
    out = []
    for name, row_bytes in rows:
        model = rf.deepseek_v2(cache_bytes_per_element=row_bytes / values)
        est = rf.max_throughput(model, node, context)
        out.append({"format": name, "bytes_per_token_per_layer": row_bytes, "bits_per_value": 8 * row_bytes / values,
                    "bytes_per_token": model.cache_bytes_per_token, "cache_reduction_vs_67b": rf.cache_reduction(base, model),
                    "max_batch": est.batch, "tokens_per_s": est.tokens_per_s, "speedup_vs_67b": est.tokens_per_s / base_tps,
                    "bound": est.bound})
    return out


# --- recorded results ----------------------------------------------------------------------------
def quant_results_dir() -> pathlib.Path:
    """``mla_tutorial/results/quant/``: runs of this measurement shipped with the package."""
    return results_dir() / "quant"


def load_quant_results(paths: Sequence[str | pathlib.Path] | None = None) -> list[dict[str, Any]]:
    """Recorded runs (default: every JSON in :func:`quant_results_dir`), oldest first, with ``"path"``."""
    files = sorted(quant_results_dir().glob("*.json")) if paths is None else [pathlib.Path(p) for p in paths]
    runs = [{**json.loads(f.read_text()), "path": str(f)} for f in files]
    return sorted(runs, key=lambda r: r.get("date", ""))


def format_summary(result: dict[str, Any]) -> str:
    """The run as text: per regime, each format's relative error (%) against bf16, mean (max) by position."""
    lines = [f"{result['device']['name']}, torch {result['torch']}, {result['max_context']:,} tokens, "
             f"{len(result['probes'])} probes, {result['wall_s']:.0f} s"]
    fmts = [f for f in result["regimes"][next(iter(result["regimes"]))]["errors"] if f != "bf16"]
    for regime, rows in result["summary"].items():
        lines.append(f"{regime}: error of the layer output against a bf16 cache, %, mean (max)")
        lines.append(f"  {'positions':>16} " + " ".join(f"{f:>12}" for f in fmts))
        for row in rows:
            lo, hi = row["positions"]
            cells = [f"{100 * row[f'{f}_vs_bf16_mean']:.2f} ({100 * row[f'{f}_vs_bf16_max']:.2f})" for f in fmts]
            lines.append(f"  {f'[{lo:,}, {hi:,})':>16} " + " ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mla_tutorial.quant_bench",
                                description="Measure each quantized latent-cache format's attention-output error "
                                            "by position, at DeepSeek-V3's head dimensions.")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available, or $MLA_DEVICE)")
    p.add_argument("--max-context", type=int, default=65536, help="tokens in the sequence (default 65536)")
    p.add_argument("--probes", type=int, default=16, help="probe positions, spread geometrically (default 16)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {sorted(LATENT_FORMATS)}")
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated, from {','.join(REGIMES)}")
    p.add_argument("--hidden-size", type=int, default=2048, help="d_model of the layer (V3: 7168; default 2048)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block (default 64)")
    p.add_argument("--tile", type=int, default=TILE, help=f"values per quantization scale (default {TILE})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default: mla_tutorial/results/quant/<device>-<date>.json)")
    p.add_argument("--note", default="", help="recorded with the results, e.g. what else ran on the machine")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    try:
        config = bench_config(hidden_size=args.hidden_size)
        result = measure_quant_error(config=config, max_context=args.max_context, num_probes=args.probes,
                                     formats=split(args.formats), regimes=split(args.regimes),
                                     block_size=args.block_size, tile=args.tile, seed=args.seed, device=args.device,
                                     progress=not args.no_progress, note=args.note)
    except (ValueError, TypeError, MemoryError) as err:
        sys.exit(f"error: {err}")
    out = args.out or quant_results_dir() / f"{result['device']['type']}-{_dt.date.today():%Y%m%d}.json"
    result["command"] = "python -m mla_tutorial.quant_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    save_results(result, out)
    print(format_summary(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
