"""The GPU evidence pipeline, on the CPU: scripts/gpu_run.py, mla_tutorial.records, and what the
benchmark's summary shows readers.

- Without a GPU the script refuses to run and says what to do instead; ``--dry-run`` prints the
  plan for a named GPU; ``--tiny`` runs the whole pipeline at tiny sizes on the CPU (the tiny
  benchmark and one notebook), writing the executed copy and the results JSON to a folder of its
  own and leaving the committed notebook untouched.
- The default plan fits the device time of an H100 or H200 (10 minutes); the kernel benchmark runs
  within its share where Triton compiles for a GPU with bf16 matmuls (the interpreter's smoke run
  with ``--tiny``), is skipped with a recorded reason elsewhere, and a failure is recorded, not raised.
- Chapters record their figures only when ``$MLA_RECORD_DIR`` is set; the newest GPU run is
  found among recorded results, and "no GPU run yet" is a clear ``None``.
- A results summary carries no maintainers' targets, and the text report prints none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from mla_tutorial import bench, records
from mla_tutorial.kernels import kernels_unavailable_reason

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.py"
KERNELS_UNAVAILABLE = kernels_unavailable_reason()


def _script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_to_run_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _script().main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err and "--tiny" in err


def test_dry_run_prints_the_plan_for_a_named_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _script().main(["--dry-run", "--assume", "Tesla T4", "--assume-memory-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "plan for Tesla T4" in out and "each notebook's budget: 180 s" in out
    assert "chapter 07: prompt 2048 tokens" in out and "contexts [1024, 4096, 16384, 65536]" in out
    first = [line.strip() for line in out.splitlines() if line.startswith("  notebooks/")][:2]
    assert first == ["notebooks/07_deepseek_v3_layer.ipynb", "notebooks/08_six_times_faster.ipynb"]
    assert "chapter 04: contexts [512, 1024, 2048, 4096, 8192, 16384] " in out
    assert "chapter 05: chunks [1, 4, 16, 64, 128, 256, 512], contexts [512, 1024, 2048, 4096, 8192, 16384] " in out
    # every notebook of the book is planned, each once
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ") and line.strip().endswith(".ipynb")]
    book = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("book/*.ipynb")])
    assert sorted(listed) == book and len(listed) == len(set(listed))


@pytest.mark.parametrize("gpu, memory_gb", [("NVIDIA H100 80GB HBM3", 80), ("NVIDIA H200", 141)])
def test_default_plan_fits_the_device_time_on_an_h100_or_h200(monkeypatch, capsys, gpu, memory_gb):
    # a GPU session may have 15 minutes in all, start-up included: the default run must stay within 10
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _script().main(["--dry-run", "--assume", gpu, "--assume-memory-gb", str(memory_gb)]) == 0
    out = capsys.readouterr().out
    whole = re.search(r"the whole run: at most (\d+) s .*?kernel benchmark \(at most (\d+) s\), then the notebooks "
                      r"\((\d+) s left for them\)", out)
    assert whole, out
    total, kernel, notebooks = map(int, whole.groups())
    assert total <= 600 and 0 < kernel < total and notebooks >= 5 * 60, out
    assert "kernel benchmark: batches [1, 8, 32, 64, 128] x contexts [1024, 4096, 16384, 32768]" in out


def test_kernel_benchmark_is_skipped_with_a_reason(monkeypatch, tmp_path):
    from mla_tutorial import kernels

    gpu_run = _script()
    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "kernels_unavailable_reason", lambda: "Triton cannot be imported (ImportError)")
    row = gpu_run.run_kernel_bench(cuda, False, 120.0, tmp_path / "k.json", {}, log=lambda *a: None)
    assert row["status"] == "skipped" and "Triton cannot be imported" in row["reason"]
    monkeypatch.setattr(kernels, "kernels_unavailable_reason", lambda: None)
    monkeypatch.setattr(kernels, "triton_mode", lambda: "interpreter")
    assert "TRITON_INTERPRET" in gpu_run.kernel_bench_skip_reason(cuda, tiny=False)
    monkeypatch.setattr(kernels, "triton_mode", lambda: "compiled")        # a fake GPU without bf16 matmuls
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert "compute capability 8.0" in gpu_run.kernel_bench_skip_reason(cuda, tiny=False)
    assert "interpreter" in gpu_run.kernel_bench_skip_reason(torch.device("cpu"), tiny=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert gpu_run.kernel_bench_skip_reason(cuda, tiny=False) is None
    row = gpu_run.run_kernel_bench(cuda, False, 10.0, tmp_path / "k.json", {}, log=lambda *a: None)
    assert row["status"] == "skipped" and "10 s left" in row["reason"]
    assert not (tmp_path / "k.json").exists()


def test_a_failing_kernel_benchmark_is_recorded_not_raised(monkeypatch, tmp_path):
    from mla_tutorial.kernels import bench as kernel_bench

    def broken(**kwargs):
        raise RuntimeError("no tile configuration ran")

    gpu_run = _script()
    monkeypatch.setattr(gpu_run, "kernel_bench_skip_reason", lambda device, tiny: None)
    monkeypatch.setattr(kernel_bench, "run_kernel_benchmark", broken)
    row = gpu_run.run_kernel_bench(torch.device("cuda"), False, 120.0, tmp_path / "k.json", {}, log=lambda *a: None)
    assert row["status"] == "error" and "no tile configuration ran" in row["error"]


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--notebooks", "notebooks/no_such_chapter.ipynb"], "no such notebook"),
    (["--tiny", "--budget-s", "0"], "--budget-s must be positive"),
    (["--tiny", "--kernel-bench-s", "-1"], "--kernel-bench-s must lie in"),
    (["--tiny", "--budget-s", "60", "--kernel-bench-s", "120"], "--kernel-bench-s must lie in"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message):
    with pytest.raises(SystemExit, match=message):
        _script().main(argv)


def test_tiny_run_writes_copies_and_results_and_leaves_the_book_alone(tmp_path):
    ledger = ROOT / "book" / "claims_ledger.ipynb"
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before, "the committed notebook must not change"
    copy = tmp_path / "book" / "claims_ledger.ipynb"
    assert copy.exists()
    executed = json.loads(copy.read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    (results,) = tmp_path.glob("tiny-cpu-*.json")
    data = json.loads(results.read_text())
    assert results.with_suffix(".png").exists()
    assert data["device"]["type"] == "cpu" and data["torch"] == torch.__version__ and data["date"]
    run = data["gpu_run"]
    assert run["device"] and run["torch"] == torch.__version__ and run["date"]
    assert run["total_s"] >= run["benchmark_s"] > 0
    (row,) = run["notebooks"]
    assert row["notebook"] == "book/claims_ledger.ipynb" and row["status"] == "ok" and row["seconds"] > 0
    assert {r["mode"] for r in data["decode"]} == {"mha", "absorbed"} and "targets" not in data["summary"]
    assert records.latest_gpu_run([data]) is None, "a CPU run is not a GPU run"
    kernel = run["kernel_benchmark"]
    if KERNELS_UNAVAILABLE is not None:
        assert kernel["status"] == "skipped" and kernel["reason"] == KERNELS_UNAVAILABLE
    else:   # the interpreter's smoke run, written where a GPU run's JSON goes (here: under --out-dir)
        assert kernel["status"] == "ok" and kernel["kind"] == "smoke" and kernel["all_checks_ok"], kernel
        (saved,) = (tmp_path / "kernels").glob("tiny-cpu-*.json")
        smoke = json.loads(saved.read_text())
        assert smoke["kind"] == "smoke" and smoke["gpu_run"] == run["run"] and smoke["command"] == data["command"]
        assert smoke["device"]["name"] and smoke["torch"] == torch.__version__ and smoke["triton"] == run["triton"]
        assert "target" not in saved.read_text().lower()


def test_chapters_record_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(records.RECORD_DIR_ENV, raising=False)
    assert records.record_chapter("07", {"x": 1}) is None
    monkeypatch.setenv(records.RECORD_DIR_ENV, str(tmp_path / "records"))
    path = records.record_chapter("07", {"median_decode_step_ms": {"MHA": 1.5}})
    assert path == tmp_path / "records" / "07.json"
    got = records.read_chapter_records(tmp_path / "records")
    assert got["07"]["median_decode_step_ms"] == {"MHA": 1.5} and got["07"]["torch"] == torch.__version__
    assert records.read_chapter_records(tmp_path / "missing") == {}
    with pytest.raises(ValueError, match="chapter must be"):
        records.record_chapter("../07", {})
    with pytest.raises(TypeError, match="must be a dict"):
        records.record_chapter("07", [1])


def test_latest_gpu_run_and_chapter_records():
    cpu = {"device": {"type": "cpu", "name": "CPU"}, "date": "2026-12-03", "gpu_run": {"chapters": {}}}
    old = {"device": {"type": "cuda", "name": "A"}, "date": "2026-12-01", "gpu_run": {"chapters": {"07": {"a": 1}}}}
    new = {"device": {"type": "cuda", "name": "B"}, "date": "2026-12-02", "dtype": "bfloat16", "torch": "2.13",
           "gpu_run": {"chapters": {"08": {"b": 2}}}}
    bench_only = {"device": {"type": "cuda", "name": "C"}, "date": "2026-12-04"}   # a bench CLI run, no notebooks
    assert records.latest_gpu_run([cpu, old, new, bench_only]) is new
    assert records.chapter_record("08", new) == {"b": 2} and records.chapter_record("07", new) is None
    assert records.chapter_record("07", None) is None and records.latest_gpu_run([cpu]) is None
    assert records.run_label(new) == "B, bfloat16, torch 2.13, 2026-12-02"


def test_summaries_show_measurements_not_targets():
    """The recorded CPU run still carries targets from before; the report a reader sees prints none."""
    (recorded,) = [r for r in bench.load_results() if r["device"]["type"] == "cpu"][:1]
    text = bench.format_results(recorded)
    assert "target" not in text.lower() and "fraction_of_bound" in text
    fresh = bench.summarize(recorded)
    assert "targets" not in fresh and fresh["absorbed_fraction_of_bound"] == recorded["summary"]["absorbed_fraction_of_bound"]
    assert not hasattr(bench, "TARGETS")
