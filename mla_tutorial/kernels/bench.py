"""Benchmark of the fused decode kernel on a GPU, against PyTorch, in one run of a few minutes.

    python -m mla_tutorial.kernels.bench                     # a CUDA GPU: the sweep, no new case after --budget-s
    python -m mla_tutorial.kernels.bench --tiny              # anywhere: tiny sizes (the interpreter on a CPU)

With DeepSeek-V3's attention dims (128 heads, d_c = 512, d_h_R = 64) and one new token per
sequence, for batch 1 to 128 and contexts of 1K to 32K cached tokens, it

1. measures this GPU's memory bandwidth and dense bf16 matmul peak (``mla_tutorial.bench``);
2. checks the kernel against the torch oracle at full size (bf16 and FP8 pools);
3. tries a few tile configurations on one mid-sized case and keeps the fastest for each pool;
4. times, for every (batch, context): the kernel over a bf16 paged pool, over an FP8 pool, the
   package's PyTorch absorbed path (``attention`` over a contiguous latent cache, as
   ``MultiHeadLatentAttention`` runs decode) and an expanded baseline (PyTorch's
   ``scaled_dot_product_attention`` over per-head K and V: 80 KB per token, skipped where it does
   not fit);
5. reports achieved bandwidth (bytes the step must read / time) and TFLOPS (FLOPs counted from
   the shapes), as fractions of the measured peaks, and which roofline limit applies;

and writes it all as JSON with the device name, torch and Triton versions and the date. Each
timing flushes the L2 cache first (writes 256 MB) and is the median of CUDA-event timings.
Cases not reached within ``--budget-s`` are listed as skipped.

``--tiny`` runs every step at toy sizes so the script itself can be tested anywhere. On a CPU the
kernel runs in Triton's interpreter (NumPy, one program at a time): those timings are a smoke
test of the script, not a measurement of the kernel, and the JSON says so (``"kind": "smoke"``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import pathlib
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import bench as layer_bench
from ..attention import attention
from ..config import MLAConfig
from ..device import describe_device, pick_device, synchronize
from ..paged import paged_absorbed_attention
from ..quant import fp8_row_bytes, pack_fp8
from ..roofline import attention_bytes_per_cached_token, attention_flops_per_cached_token
from . import kernels_unavailable_reason, paged_mla_decode, triton_mode

__all__ = ["FULL", "TINY", "run_kernel_benchmark", "load_kernel_results", "kernel_results_dir",
           "format_kernel_results", "main"]

SCHEMA_VERSION = 1
IMPLS = ("triton_bf16", "triton_fp8", "torch_absorbed", "sdpa_expanded")
#: Tile configurations tried: (block_h, block_n, num_warps, num_stages).
#: Hopper's warpgroup matmuls want 64 rows; smaller tiles need fewer registers for the 512-wide fp32 acc.
CONFIGS = ((16, 32, 4, 2), (16, 64, 4, 2), (16, 64, 4, 3), (32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2),
           (64, 16, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2))
#: The full run (a GPU) and the tiny one (anywhere).
FULL = dict(heads=128, d_c=512, d_h_R=64, d_h=128, d_v=128, block_size=64, batches=(1, 8, 32, 64, 128),
            contexts=(1024, 4096, 16384, 32768), tune_case=(32, 4096), check_case=(4, 4096), configs=CONFIGS,
            repeats=10, flush_bytes=256 * 2**20, sdpa_max_bytes=24e9)
TINY = dict(heads=16, d_c=128, d_h_R=32, d_h=16, d_v=16, block_size=16, batches=(1, 2), contexts=(48, 96),
            tune_case=(1, 48), check_case=(2, 40), configs=((16, 16, 4, 2), (16, 32, 4, 2)),
            repeats=1, flush_bytes=0, sdpa_max_bytes=1e8)


def kernel_results_dir() -> pathlib.Path:
    """Recorded runs: ``mla_tutorial/results/kernels/``."""
    return pathlib.Path(__file__).resolve().parents[1] / "results" / "kernels"


def load_kernel_results(kind: str | None = None) -> list[dict[str, Any]]:
    """Recorded runs (oldest first), each with its ``"path"``; ``kind``: ``"gpu"`` or ``"smoke"``."""
    out = []
    for f in sorted(kernel_results_dir().glob("*.json")):
        data = json.loads(f.read_text())
        if kind is None or data.get("kind") == kind:
            out.append({**data, "path": str(f)})
    return sorted(out, key=lambda r: r.get("date", ""))


# --- timing ---------------------------------------------------------------------------------------
class _Timer:
    """Median time of ``fn``: CUDA events after an L2 flush on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, flush_bytes: int):
        self.device = device
        self.flush = torch.empty(flush_bytes, dtype=torch.int8, device=device) if flush_bytes else None

    def __call__(self, fn: Callable[[], Any], repeats: int) -> list[float]:
        # a GPU's first call compiles the kernel; the interpreter has nothing to warm up
        for _ in range(1 if self.device.type == "cuda" else 0):
            fn()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if self.flush is not None:
                    self.flush.zero_()   # also keeps the GPU busy while the host launches fn
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                synchronize(self.device)
                t0 = time.perf_counter()
                fn()
                synchronize(self.device)
                times.append(time.perf_counter() - t0)
        return times


# --- the problem ----------------------------------------------------------------------------------
def _config(s: dict[str, Any]) -> MLAConfig:
    return layer_bench.bench_config(num_attention_heads=s["heads"], kv_lora_rank=s["d_c"], qk_rope_head_dim=s["d_h_R"],
                                    qk_nope_head_dim=s["d_h"], v_head_dim=s["d_v"])


class _Pools:
    """One bf16 pool and its FP8 copy, big enough for the largest case, and random queries;
    each case takes a shuffled block table into them."""

    def __init__(self, s: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
        self.s, self.device, self.dtype = s, device, dtype
        g = torch.Generator(device=device).manual_seed(seed)
        bs = s["block_size"]
        tokens = max(s["batches"]) * max(s["contexts"])
        self.num_blocks = -(-tokens // bs) + 1
        width = s["d_c"] + s["d_h_R"]
        self.pool = torch.randn(self.num_blocks, bs, width, generator=g, device=device, dtype=dtype)
        self.pool_fp8 = torch.empty(self.num_blocks, bs, fp8_row_bytes(s["d_c"], s["d_h_R"]), dtype=torch.uint8,
                                    device=device)
        for i in range(0, self.num_blocks, 4096):   # in chunks: packing makes fp32 copies
            self.pool_fp8[i:i + 4096] = pack_fp8(self.pool[i:i + 4096], s["d_c"])
        self.order = torch.randperm(self.num_blocks, generator=g, device=device).to(torch.int32)
        T = 1
        self.q_lat = torch.randn(max(s["batches"]), T, s["heads"], s["d_c"], generator=g, device=device, dtype=dtype)
        self.q_R = torch.randn(max(s["batches"]), T, s["heads"], s["d_h_R"], generator=g, device=device, dtype=dtype)

    def case(self, batch: int, context: int) -> tuple[torch.Tensor, ...]:
        bs = self.s["block_size"]
        per_seq = -(-context // bs)
        table = self.order[:batch * per_seq].view(batch, per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        return self.q_lat[:batch], self.q_R[:batch], table, lens


def _scale(s: dict[str, Any]) -> float:
    return (s["d_h"] + s["d_h_R"]) ** -0.5


# --- the run --------------------------------------------------------------------------------------
def run_kernel_benchmark(*, tiny: bool = False, device: torch.device | str | None = None, budget_s: float = 270.0,
                         seed: int = 0, progress: bool = True, sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return its results as a dict."""
    began = time.perf_counter()
    reason = kernels_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the kernel benchmark needs Triton: {reason}")
    device = pick_device(None if device is None else str(device))
    mode = triton_mode()
    if mode == "compiled" and device.type != "cuda":
        raise ValueError(f"Triton compiles for CUDA GPUs; got device {device}. Run with --tiny on a machine without "
                         f"a GPU (the interpreter), or pick a CUDA device")
    if mode == "interpreter" and device.type != "cpu":
        raise ValueError("Triton's interpreter is on (TRITON_INTERPRET=1); use --device cpu, or unset it to compile")
    if not tiny and mode != "compiled":
        raise ValueError("the full benchmark needs a CUDA GPU with compiled Triton kernels; on a CPU use --tiny "
                         "(Triton's interpreter: a smoke test, not a measurement)")
    s = dict(TINY if tiny else FULL, **(sizes or {}))
    dtype = torch.bfloat16
    say = print if progress else (lambda *a, **k: None)
    timer = _Timer(device, s["flush_bytes"] if device.type == "cuda" else 0)
    config = _config(s)
    scale = _scale(s)

    def left() -> float:
        return budget_s - (time.perf_counter() - began)

    say(f"device: {describe_device(device)}; Triton {_triton_version()} ({mode}); torch {torch.__version__}")
    bw = layer_bench.measure_bandwidth(device, dtype, nbytes=None if not tiny else 32 * 2**20, repeats=5)
    peak = layer_bench.measure_peak_flops(device, dtype, n=None if not tiny else 512, repeats=5)
    say(f"measured: {bw / 1e9:,.0f} GB/s memory bandwidth, {peak / 1e12:,.1f} TFLOPS dense bf16")
    pools = _Pools(s, device, dtype, seed)
    # float8 e4m3 is converted in hardware from compute capability 8.9 (Ada, Hopper) on
    no_fp8 = (device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)
              and f"needs compute capability 8.9+ for float8, this GPU has "
                  f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
    formats = [("bf16", pools.pool, None)] + ([] if no_fp8 else [("fp8", pools.pool_fp8, "fp8")])

    # correctness at the benchmark's own dims, against the torch oracle
    checks = []
    B, L = s["check_case"]
    q_lat, q_R, table, lens = pools.case(B, L)
    for fmt, pool, kv_format in formats:
        o, lse = paged_mla_decode(q_lat, q_R, pool, table, lens, scale, kv_format)
        o_ref, lse_ref = paged_absorbed_attention(q_lat, q_R, pool, table, lens, scale, kv_format)
        err_o = (o.float() - o_ref.float()).abs().max().item()
        err_l = (lse - lse_ref).abs().max().item()
        ok = err_o <= 2e-2 + 2e-2 * o_ref.float().abs().max().item() and err_l <= 2e-2
        checks.append(dict(pool=fmt, batch=B, context=L, max_abs_err_o=err_o, max_abs_err_lse=err_l, ok=bool(ok)))
        say(f"check {fmt}: max |o - oracle| = {err_o:.2e}, max |lse - oracle| = {err_l:.2e} ({'ok' if ok else 'FAIL'})")

    # tuning: the fastest tile configuration of each pool on one case
    tuning, best = [], {}
    B, L = s["tune_case"]
    q_lat, q_R, table, lens = pools.case(B, L)
    for fmt, pool, kv_format in formats:
        for block_h, block_n, warps, stages in s["configs"]:
            row = dict(pool=fmt, block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
            kw = dict(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages, check_values=False)
            try:
                t = statistics.median(timer(lambda: paged_mla_decode(q_lat, q_R, pool, table, lens, scale, kv_format,
                                                                     **kw), max(1, s["repeats"] // 2)))
                row["median_s"] = t
            except Exception as err:   # a tile that does not fit this GPU's registers or shared memory
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            tuning.append(row)
        timed = [r for r in tuning if r["pool"] == fmt and "median_s" in r]
        if not timed:
            raise RuntimeError(f"no tile configuration ran for the {fmt} pool: {tuning}")
        best[fmt] = min(timed, key=lambda r: r["median_s"])
        say(f"tuned {fmt}: block_h {best[fmt]['block_h']}, block_n {best[fmt]['block_n']}, "
            f"{best[fmt]['num_warps']} warps, {best[fmt]['num_stages']} stages ({best[fmt]['median_s'] * 1e3:.3f} ms)")

    # the sweep
    bytes_per_token = {"triton_bf16": attention_bytes_per_cached_token(config, "absorbed", dtype),
                       "triton_fp8": fp8_row_bytes(s["d_c"], s["d_h_R"]),
                       "torch_absorbed": attention_bytes_per_cached_token(config, "absorbed", dtype),
                       "sdpa_expanded": attention_bytes_per_cached_token(config, "expanded", dtype)}
    flops_per_token = {"triton_bf16": attention_flops_per_cached_token(config, "absorbed"),
                       "triton_fp8": attention_flops_per_cached_token(config, "absorbed"),
                       "torch_absorbed": attention_flops_per_cached_token(config, "absorbed"),
                       "sdpa_expanded": attention_flops_per_cached_token(config, "expanded")}
    rows = []
    for L in s["contexts"]:
        for B in s["batches"]:
            q_lat, q_R, table, lens = pools.case(B, L)
            for impl in IMPLS:
                row: dict[str, Any] = dict(impl=impl, batch=B, context=L, queries=1,
                                           bytes=B * L * bytes_per_token[impl], flops=B * L * flops_per_token[impl])
                q_bytes = B * s["heads"] * (2 * s["d_c"] + s["d_h_R"]) * 2   # q_lat, q_R in, o_lat out
                row["bytes"] += q_bytes
                if left() < 0:
                    row["skipped"] = "time budget"
                elif impl == "triton_fp8" and no_fp8:
                    row["skipped"] = no_fp8
                elif impl == "sdpa_expanded" and row["bytes"] * 1.5 > s["sdpa_max_bytes"]:
                    row["skipped"] = f"per-head K and V need {row['bytes'] / 1e9:.1f} GB"
                else:
                    fn = _impl_fn(impl, s, pools, q_lat, q_R, table, lens, scale, best, config)
                    times = timer(fn, s["repeats"])
                    row.update(times_s=times, median_s=statistics.median(times))
                    if mode == "compiled":   # the interpreter's timings measure NumPy: no rates from them
                        _rate(row, bw, peak)
                    del fn
                rows.append(row)
            done = [r for r in rows if r["context"] == L and r["batch"] == B and "median_s" in r]
            say(f"context {L:>6}, batch {B:>3}: " + ", ".join(f"{r['impl']} {r['median_s'] * 1e3:.3f} ms" for r in done))
    if device.type == "cuda":
        torch.cuda.empty_cache()

    result = {
        "schema": SCHEMA_VERSION,
        "kind": "gpu" if mode == "compiled" else "smoke",
        "note": (None if mode == "compiled" else
                 "Triton interpreter on a CPU at toy sizes: a smoke test of the benchmark script, not a measurement "
                 "of the kernel's speed"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": describe_device(device), "platform": platform.platform()},
        "torch": torch.__version__, "triton": _triton_version(), "triton_mode": mode,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": "bfloat16", "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "machine": {"bandwidth_bytes_per_s": bw, "peak_flops_per_s": peak},
        "checks": checks, "tuning": tuning, "chosen": best, "rows": rows,
        "elapsed_s": time.perf_counter() - began, "budget_s": budget_s,
    }
    result["summary"] = summarize(result)
    return result


def _impl_fn(impl, s, pools, q_lat, q_R, table, lens, scale, best, config):
    d_c = s["d_c"]
    if impl in ("triton_bf16", "triton_fp8"):
        fmt = impl.split("_")[1]
        pool, kv_format = (pools.pool, None) if fmt == "bf16" else (pools.pool_fp8, "fp8")
        b = best[fmt]
        kw = dict(block_h=b["block_h"], block_n=b["block_n"], num_warps=b["num_warps"], num_stages=b["num_stages"],
                  check_values=False)
        return lambda: paged_mla_decode(q_lat, q_R, pool, table, lens, scale, kv_format, **kw)
    B, L = q_lat.shape[0], int(lens[0])
    q = torch.cat([q_lat, q_R], -1).transpose(1, 2)                                  # (B, n_h, 1, d_c + d_h_R)
    if impl == "torch_absorbed":
        # the contiguous latent cache MultiHeadLatentAttention's absorbed decode reads
        latent = pools.pool.view(-1, pools.pool.shape[-1])[:B * L].view(B, 1, L, -1)   # (B, 1, L, d_c + d_h_R)
        return lambda: attention(q, latent, latent[..., :d_c], scale)
    # expanded: per-head K (d_h + d_h_R) and V (d_v), as a cache of expanded keys and values holds them
    g = torch.Generator(device=q.device).manual_seed(1)
    H = s["heads"]
    k = torch.randn(B, H, L, s["d_h"] + s["d_h_R"], generator=g, device=q.device, dtype=q.dtype)
    v = torch.randn(B, H, L, s["d_v"], generator=g, device=q.device, dtype=q.dtype)
    q_exp = torch.randn(B, H, 1, s["d_h"] + s["d_h_R"], generator=g, device=q.device, dtype=q.dtype)
    return lambda: F.scaled_dot_product_attention(q_exp, k, v, scale=scale)


def _rate(row: dict[str, Any], bw: float, peak: float) -> None:
    """Achieved rates, fractions of the measured peaks, and which roofline limit applies."""
    t = row["median_s"]
    memory_s, compute_s = row["bytes"] / bw, row["flops"] / peak
    row.update(bytes_per_s=row["bytes"] / t, flops_per_s=row["flops"] / t,
               fraction_of_bandwidth=row["bytes"] / t / bw, fraction_of_peak=row["flops"] / t / peak,
               bound="memory" if memory_s >= compute_s else "compute",
               fraction_of_bound=max(memory_s, compute_s) / t)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per implementation: best and median fraction of the roofline bound; the kernel's speed-up
    over the PyTorch paths at the largest case timed. A smoke run (the interpreter) gets only its
    counts of cases: its timings are no measure of speed."""
    rows = [r for r in result["rows"] if "median_s" in r]
    out: dict[str, Any] = {}
    if result["kind"] != "gpu":
        out = {impl: {"cases": sum(r["impl"] == impl for r in rows)} for impl in IMPLS}
        out["all_checks_ok"] = all(c["ok"] for c in result["checks"])
        return out
    for impl in IMPLS:
        mine = [r for r in rows if r["impl"] == impl]
        if mine:
            out[impl] = {"cases": len(mine), "median_fraction_of_bound": statistics.median(r["fraction_of_bound"] for r in mine),
                         "best_fraction_of_bandwidth": max(r["fraction_of_bandwidth"] for r in mine),
                         "best_fraction_of_peak": max(r["fraction_of_peak"] for r in mine)}
    kernel = [r for r in rows if r["impl"] == "triton_bf16"]
    if kernel:
        big = max(kernel, key=lambda r: (r["batch"] * r["context"], r["context"]))
        for other in ("torch_absorbed", "sdpa_expanded", "triton_fp8"):
            match = [r for r in rows if r["impl"] == other and (r["batch"], r["context"]) == (big["batch"], big["context"])]
            if match:
                out[f"speedup_over_{other}_at_batch_{big['batch']}_context_{big['context']}"] = \
                    match[0]["median_s"] / big["median_s"]
    out["all_checks_ok"] = all(c["ok"] for c in result["checks"])
    return out


def format_kernel_results(result: dict[str, Any]) -> str:
    """A plain-text table of a run. A smoke run (the interpreter) shows only its timings: rates and
    fractions of a CPU's peaks computed from them would mean nothing."""
    smoke = result["kind"] == "smoke"
    lines = [f"{result['device']['name']}, Triton {result['triton']} ({result['triton_mode']}), torch {result['torch']}, "
             f"{result['date']}"]
    if smoke:
        lines += textwrap.wrap(f"SMOKE TEST: {result['note']}", 96)
        lines.append(f"{'impl':>15} {'batch':>5} {'context':>7} {'seconds':>9}")
    else:
        m = result["machine"]
        lines += [f"measured peaks: {m['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s, "
                  f"{m['peak_flops_per_s'] / 1e12:,.1f} TFLOPS dense bf16",
                  f"{'impl':>15} {'batch':>5} {'context':>7} {'ms':>9} {'GB/s':>8} {'TFLOPS':>7} {'of BW':>6} "
                  f"{'of peak':>7} {'bound':>7}"]
    for r in result["rows"]:
        head = f"{r['impl']:>15} {r['batch']:>5} {r['context']:>7}"
        if "median_s" not in r:
            lines.append(f"{head}  skipped: {r['skipped']}")
        elif smoke:
            lines.append(f"{head} {r['median_s']:>9.3f}")
        else:
            lines.append(f"{head} {r['median_s'] * 1e3:>9.3f} {r['bytes_per_s'] / 1e9:>8,.0f} {r['flops_per_s'] / 1e12:>7.1f} "
                         f"{r['fraction_of_bandwidth']:>6.0%} {r['fraction_of_peak']:>7.0%} {r['bound']:>7}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mla_tutorial.kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes: runs anywhere (Triton's interpreter on a CPU), "
                   "a smoke test of the script, not a measurement")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the best available, or $MLA_DEVICE)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: mla-kernel-<kind>-<device>-<date>.json)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line (``python -m mla_tutorial.kernels.bench --help``)."""
    args = _parser().parse_args(argv)
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        raise SystemExit("--budget-s must be a positive number of seconds")
    result = run_kernel_benchmark(tiny=args.tiny, device=args.device, budget_s=args.budget_s, seed=args.seed,
                                  progress=not args.quiet)
    result["command"] = " ".join(["python -m mla_tutorial.kernels.bench", *(argv if argv is not None else sys.argv[1:])])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out = layer_bench.save_results(result, args.out or f"mla-kernel-{result['kind']}-{result['device']['type']}-{stamp}.json")
    print(format_kernel_results(result))
    print(f"summary: {json.dumps(result['summary'], indent=1)}")
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
