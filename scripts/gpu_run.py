"""Record the book's GPU evidence with one command: the benchmark and every notebook at GPU sizes.

    python scripts/gpu_run.py              # on a machine with a CUDA GPU: at most --budget-s (540 s)
    python scripts/gpu_run.py --dry-run    # anywhere: print the plan (the sizes chapters 07 and 08 would
                                           # pick, each notebook's time budget) and exit
    python scripts/gpu_run.py --dry-run --assume "Tesla T4" --assume-memory-gb 16
    python scripts/gpu_run.py --tiny       # anywhere, on the CPU: the whole pipeline at tiny sizes
                                           # (the test suite runs this), written under --out-dir only

On a GPU it

1. runs the decode benchmark (`mla_tutorial.bench`) with DeepSeek-V3's attention at full width
   (hidden 7168), at the contexts `mla_tutorial.sizing.bench_plan` picks for the device;
2. runs the fused Triton decode kernel's benchmark (`mla_tutorial.kernels.bench`, chapter 13) at
   its GPU sizes within its share of the run (`--kernel-bench-s`, 120 s: it starts no new case
   after that), and writes its JSON to `mla_tutorial/results/kernels/<run>.json`, where chapter 13
   reads it. Without Triton, with Triton in its interpreter, or on a GPU without bf16 matmuls
   (compute capability below 8.0) it is skipped, and the results say why;
3. executes every notebook of the book (chapters 07 and 08 first, then the others in order), each
   in a fresh kernel with `MLA_DEVICE=cuda` (each chapter picks its own GPU sizes) and
   `MLA_RECORD_DIR` set (chapters 07 and 08 record what they measured, see
   `mla_tutorial.records`), and writes each executed copy
   to `gpu-runs/<run>/` (ignored by git): the committed notebooks and their CPU outputs stay as
   they are, so nbval keeps comparing them;
4. writes `mla_tutorial/results/cuda-<gpu>-<date>.json` (and a latency plot beside it): the
   benchmark's results (device name, torch version, date, every timing) and a `gpu_run` section
   with the Triton version, the kernel benchmark's status, each notebook's wall time and status,
   the total, and the chapters' records. Chapters 07
   and 08 show the newest such file beside the reader's own run. Commit it.

The whole run fits `--budget-s` (`--dry-run` prints the plan): the two benchmarks first, the
kernel benchmark within its share, then the notebooks in the time left. A notebook is started only
if the time left is at least its budget (`sizing.time_budget_s`: 60 s
on an H100-class GPU, 180 s on a T4-class one); the others are listed as not run. Without a CUDA
GPU the script refuses to start, unless `--dry-run` or `--tiny` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import re
import sys
import time
import types
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540.0
#: The kernel benchmark's share of the run, and the least time it is started with.
KERNEL_BENCH_S, MIN_KERNEL_BENCH_S = 120.0, 30.0
TINY_NOTEBOOKS = ("book/claims_ledger.ipynb",)
#: Run first, so that the time budget never leaves out the chapters that record GPU runs.
FIRST = ("notebooks/07_deepseek_v3_layer.ipynb", "notebooks/08_six_times_faster.ipynb")


def book_notebooks() -> list[pathlib.Path]:
    """Every notebook of the book (those `make notebooks` runs), the ones that record GPU evidence
    (:data:`FIRST`) first, then the chapters in order, then the pages in book/."""
    paths = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.ipynb"))
    first = [ROOT / f for f in FIRST if (ROOT / f) in paths]
    return first + [p for p in paths if p not in first]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def execute_notebook(path: pathlib.Path, out: pathlib.Path, timeout_s: float) -> dict[str, Any]:
    """Run ``path`` top to bottom in a fresh kernel (working directory: its own folder) and write
    the executed copy to ``out``. Returns its wall time and status; never raises for a failing cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=int(max(timeout_s, 1)), kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    row: dict[str, Any] = {"notebook": str(path.relative_to(ROOT)), "status": "ok"}
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        row["status"] = "error"
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"[:500]
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["budget_s"] = timeout_s
    row["over_budget"] = row["seconds"] > timeout_s
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    row["executed_copy"] = str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)
    return row


def run_notebooks(paths: list[pathlib.Path], out_dir: pathlib.Path, per_notebook_s: float, deadline: float,
                  env: dict[str, str], log=print) -> list[dict[str, Any]]:
    """Execute each notebook whose budget still fits before ``deadline`` (a ``time.monotonic`` value),
    with ``env`` added to the environment the kernels inherit."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    rows = []
    try:
        for path in paths:
            left = deadline - time.monotonic()
            rel = path.relative_to(ROOT)
            if left < per_notebook_s:
                rows.append({"notebook": str(rel), "status": "not run", "reason":
                             f"{left:.0f} s left of the run's budget, {per_notebook_s:.0f} s needed"})
                log(f"  {rel}: not run ({left:.0f} s left)")
                continue
            row = execute_notebook(path, out_dir / rel, per_notebook_s)
            rows.append(row)
            log(f"  {rel}: {row['status']} in {row['seconds']:.1f} s" + (f" ({row['error']})" if "error" in row else ""))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return rows


def bench_sizes(tiny: bool, budget=None, dtype=None) -> dict[str, Any]:
    """Keyword arguments for `run_benchmark`: GPU sizes from the device's budget, or tiny ones."""
    from mla_tutorial import bench, sizing

    if tiny:
        config = bench.bench_config(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
        return dict(config=config, contexts=[16, 32], modes=["mha", "absorbed"], repeats=1, rounds=1, warmup=1,
                    prefill_tokens=16, prefill_repeats=1,
                    machine={"bandwidth_bytes_per_s": 1e10, "peak_flops_per_s": 1e11})
    config = bench.bench_config(hidden_size=7168)
    sizes = dict(repeats=5, rounds=2, warmup=1, prefill_tokens=4096, prefill_repeats=2)
    plan = sizing.bench_plan(budget, config, bench.BENCH_MODES, dtype=dtype, **sizes)
    return dict(config=config, contexts=list(plan.contexts), modes=list(bench.BENCH_MODES), estimated_s=plan.estimated_s,
                **sizes)


def kernel_bench_skip_reason(device, tiny: bool) -> str | None:
    """Why the kernel benchmark cannot run on ``device`` (None: it can). It needs Triton; on a GPU,
    compiled kernels and bf16 matmuls; with ``--tiny``, Triton's interpreter on the CPU."""
    import torch

    from mla_tutorial import kernels

    reason = kernels.kernels_unavailable_reason()
    if reason is not None:
        return reason
    mode = kernels.triton_mode()
    if tiny:
        return None if mode == "interpreter" else (
            "--tiny runs on the CPU, where the kernels run only in Triton's interpreter; this process compiles "
            "them (TRITON_INTERPRET is not 1)")
    if mode != "compiled":
        return ("Triton runs in its interpreter here (TRITON_INTERPRET=1), which says nothing about speed; "
                "unset TRITON_INTERPRET to compile the kernels for the GPU")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return (f"the kernel benchmark times bf16 matmuls, which need compute capability 8.0 or newer; "
                f"{torch.cuda.get_device_name(device)} is {'.'.join(map(str, capability))}")
    return None


def run_kernel_bench(device, tiny: bool, seconds: float, path: pathlib.Path, extra: dict[str, Any],
                     log=print) -> dict[str, Any]:
    """Run `mla_tutorial.kernels.bench` within ``seconds`` and write its JSON (with ``extra`` added)
    to ``path``; or skip it, saying why. Returns what the run records in ``gpu_run["kernel_benchmark"]``;
    never raises for a failing benchmark."""
    row: dict[str, Any] = {"module": "mla_tutorial.kernels.bench", "budget_s": round(seconds, 1)}
    reason = kernel_bench_skip_reason(device, tiny)
    if reason is None and not tiny and seconds < MIN_KERNEL_BENCH_S:
        reason = f"{seconds:.0f} s left of the run's budget; the kernel benchmark needs at least {MIN_KERNEL_BENCH_S:.0f} s"
    if reason is not None:
        log(f"kernel benchmark: skipped ({reason})")
        return {**row, "status": "skipped", "reason": reason}
    from mla_tutorial import bench
    from mla_tutorial.kernels import bench as kernel_bench

    start = time.monotonic()
    try:
        result = kernel_bench.run_kernel_benchmark(tiny=tiny, device=device, budget_s=seconds, progress=False)
    except Exception as err:   # recorded, and the rest of the run goes on
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:500], seconds=round(time.monotonic() - start, 2))
        log(f"kernel benchmark: error ({row['error']})")
        return row
    saved = bench.save_results({**result, **extra}, path)
    timed = [r for r in result["rows"] if "median_s" in r]
    row.update(status="ok", seconds=round(time.monotonic() - start, 2), kind=result["kind"],
               results=str(saved.relative_to(ROOT) if saved.is_relative_to(ROOT) else saved),
               cases_timed=len(timed), cases_skipped=len(result["rows"]) - len(timed),
               all_checks_ok=result["summary"]["all_checks_ok"])
    log(f"kernel benchmark: {row['seconds']:.1f} s, {len(timed)} of {len(result['rows'])} cases timed -> {saved}")
    return row


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:   # not installed, or a broken install
        return None
    return triton.__version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/gpu_run.py", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    mode.add_argument("--tiny", action="store_true", help="the whole pipeline on the CPU at tiny sizes")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole run's time budget (s)")
    p.add_argument("--kernel-bench-s", type=float, default=KERNEL_BENCH_S,
                   help="the kernel benchmark's share of the budget (s); 0 skips it")
    p.add_argument("--notebooks", nargs="*", default=None,
                   help="notebooks to run (default: every notebook of the book; with --tiny: the ledger)")
    p.add_argument("--out-dir", default=None, help="executed copies of the notebooks (default: gpu-runs/<run>/)")
    p.add_argument("--results-dir", default=None,
                   help="where the results JSON goes (default: mla_tutorial/results/; with --tiny: --out-dir)")
    p.add_argument("--assume", default=None, help="--dry-run only: plan for this GPU name (e.g. 'Tesla T4')")
    p.add_argument("--assume-memory-gb", type=float, default=80.0, help="--dry-run only: its memory (GB)")
    p.add_argument("--note", default=None, help="free text stored with the results")
    return p


def _budget_for(args, torch):
    from mla_tutorial import sizing

    if args.assume:
        if not args.assume_memory_gb > 0:
            raise SystemExit("gpu_run.py: --assume-memory-gb must be positive")
        return sizing.gpu_budget(props=types.SimpleNamespace(name=args.assume, total_memory=args.assume_memory_gb * 1e9))
    if torch.cuda.is_available():
        return sizing.gpu_budget(torch.device("cuda"))
    return sizing.gpu_budget(props=types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80e9))


def dry_run(args, torch, paths) -> int:
    from mla_tutorial import MLAConfig, sizing

    budget = _budget_for(args, torch)
    dtype = torch.bfloat16 if "T4" not in budget.name and "V100" not in budget.name else torch.float16
    print(f"plan for {budget.name}: {budget.memory_bytes / 1e9:.0f} GB, {budget.peak_flops_per_s / 1e12:.0f} TFLOP/s, "
          f"{budget.bandwidth_bytes_per_s / 1e12:.2f} TB/s ({budget.source})")
    print(f"each notebook's budget: {budget.seconds:.0f} s; the whole run's: {args.budget_s:.0f} s")
    sizes = bench_sizes(False, budget, dtype)
    print(f"benchmark: hidden {sizes['config'].hidden_size}, contexts {sizes['contexts']}, {len(sizes['modes'])} modes")
    v3 = MLAConfig.deepseek_v3()
    sweep = sizing.decode_sweep_plan(budget, v3, dtype=dtype)
    print(f"chapter 04: contexts {list(sweep.sizes)} (estimated {sweep.estimated_s:.1f} s, "
          f"{sweep.estimated_bytes / 1e9:.1f} GB)")
    chunks, contexts = sizing.absorption_plan(budget, v3, dtype=dtype)
    print(f"chapter 05: chunks {list(chunks.sizes)}, contexts {list(contexts.sizes)} (estimated "
          f"{chunks.estimated_s + contexts.estimated_s:.1f} s, "
          f"{max(chunks.estimated_bytes, contexts.estimated_bytes) / 1e9:.1f} GB)")
    layer = sizing.layer_run_plan(budget, v3, dtype=dtype)
    print(f"chapter 07: prompt {layer.prompt_len} tokens, then {layer.new_tokens} decoded "
          f"(estimated {layer.estimated_s:.1f} s, {layer.estimated_bytes / 1e9:.1f} GB)")
    from mla_tutorial.kernels import bench as kernel_bench

    full = kernel_bench.FULL
    triton = _triton_version()
    kernel_s = min(args.kernel_bench_s, args.budget_s)
    print(f"kernel benchmark: batches {list(full['batches'])} x contexts {list(full['contexts'])}, bf16 and FP8 pools, "
          f"at most {kernel_s:.0f} s; " + (f"Triton {triton} is installed" if triton else
                                          "Triton is not installed here: skipped (pip install -e \".[kernels]\")"))
    notebook_s = args.budget_s - sizes["estimated_s"] - kernel_s
    print(f"the whole run: at most {args.budget_s:.0f} s ({args.budget_s / 60:.1f} minutes): the benchmark "
          f"(its roofline estimate, a lower bound: {sizes['estimated_s']:.0f} s), the kernel benchmark (at most "
          f"{kernel_s:.0f} s), "
          f"then the notebooks ({max(notebook_s, 0):.0f} s left for them)")
    print(f"{len(paths)} notebooks, in this order; each starts only while at least {budget.seconds:.0f} s of the "
          f"run's budget is left (all {len(paths)} fit if they average under "
          f"{max(notebook_s, 0) / max(len(paths), 1):.0f} s):")
    for p in paths:
        print(f"  {p.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.budget_s > 0:
        raise SystemExit("gpu_run.py: --budget-s must be positive")
    if not args.kernel_bench_s >= 0 or args.kernel_bench_s > args.budget_s:
        raise SystemExit(f"gpu_run.py: --kernel-bench-s must lie in [0, --budget-s = {args.budget_s:g}], "
                         f"got {args.kernel_bench_s:g}")
    paths = ([(ROOT / n).resolve() for n in args.notebooks] if args.notebooks is not None
             else ([ROOT / n for n in TINY_NOTEBOOKS] if args.tiny else book_notebooks()))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"gpu_run.py: no such notebook: {', '.join(missing)}")
    outside = [str(p) for p in paths if not p.is_relative_to(ROOT)]
    if outside:
        raise SystemExit(f"gpu_run.py: notebooks must be inside the repository ({ROOT}): {', '.join(outside)}")

    import torch

    if args.dry_run:
        return dry_run(args, torch, paths)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_run.py: no CUDA GPU on this machine (torch.cuda.is_available() is False). This script "
              "records the book's GPU evidence and runs only on a GPU. Use --dry-run to see the plan, or "
              "--tiny to check the whole pipeline on the CPU at tiny sizes.", file=sys.stderr)
        return 2

    from mla_tutorial import bench, describe_device, pick_dtype, records, sizing

    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else pick_dtype(device)
    name = describe_device(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    run_id = f"{'tiny-' if args.tiny else ''}{device.type}-{slug(name)}-{stamp}"
    out_dir = pathlib.Path(args.out_dir).resolve() if args.out_dir else ROOT / "gpu-runs" / run_id
    results_dir = (pathlib.Path(args.results_dir).resolve() if args.results_dir
                   else (out_dir if args.tiny else bench.results_dir()))
    record_dir = out_dir / "records"
    if args.tiny:
        per_notebook_s = 120.0
    else:
        per_notebook_s = sizing.gpu_budget(device).seconds
    print(f"{run_id}: {name}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}; "
          f"budget {args.budget_s:.0f} s, {per_notebook_s:.0f} s per notebook")

    print("benchmark ...", flush=True)
    sizes = bench_sizes(args.tiny, None if args.tiny else sizing.gpu_budget(device), dtype)
    sizes.pop("estimated_s", None)
    bench_start = time.monotonic()
    result = bench.run_benchmark(device=device, dtype=dtype, progress=False, **sizes)
    bench_s = time.monotonic() - bench_start
    print(f"benchmark: {bench_s:.1f} s, contexts {sizes['contexts']}")

    command = " ".join(["python scripts/gpu_run.py", *(argv if argv is not None else sys.argv[1:])])
    extra = {"command": command, "gpu_run": run_id, **({"note": args.note} if args.note else {})}
    kernel_s = min(args.kernel_bench_s, deadline - time.monotonic())
    if args.kernel_bench_s <= 0:
        kernel_row = {"module": "mla_tutorial.kernels.bench", "status": "skipped", "reason": "--kernel-bench-s 0"}
    else:
        print("kernel benchmark ...", flush=True)
        kernel_row = run_kernel_bench(device, args.tiny, kernel_s, results_dir / "kernels" / f"{run_id}.json", extra)
        if device.type == "cuda":
            torch.cuda.empty_cache()   # the notebooks' kernels get the memory its pools held

    print(f"notebooks -> {out_dir}", flush=True)
    env = {"MLA_DEVICE": device.type, records.RECORD_DIR_ENV: str(record_dir)}
    rows = run_notebooks(paths, out_dir, per_notebook_s, deadline, env)

    result["command"] = command
    if args.note:
        result["note"] = args.note
    result["gpu_run"] = {
        "run": run_id, "device": name, "torch": torch.__version__, "triton": _triton_version(),
        "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s, "per_notebook_budget_s": per_notebook_s,
        "benchmark_s": round(bench_s, 2), "kernel_benchmark": kernel_row, "notebooks": rows,
        "total_s": round(time.monotonic() - start, 2), "executed_copies": str(out_dir),
        "chapters": records.read_chapter_records(record_dir),
    }
    path = bench.save_results(result, results_dir / f"{run_id}.json")
    import matplotlib
    matplotlib.use("Agg")
    bench.plot_results(result, path.with_suffix(".png"))
    failed = [r["notebook"] for r in rows if r["status"] != "ok"] + (
        ["the kernel benchmark"] if kernel_row["status"] == "error" else [])
    print(f"results: {path} ({result['gpu_run']['total_s']:.0f} s in all)"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
