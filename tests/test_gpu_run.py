"""The GPU evidence pipeline, on the CPU: scripts/gpu_run.py, mla_tutorial.records, and what the
benchmark's summary shows readers.

- Without a GPU the script refuses to run and says what to do instead; ``--dry-run`` prints the
  plan for a named GPU; ``--tiny`` runs the whole pipeline at tiny sizes on the CPU (the tiny
  benchmark and one notebook), writing the executed copy and the results JSON to a folder of its
  own and leaving the committed notebook untouched.
- Chapters record their figures only when ``$MLA_RECORD_DIR`` is set; the newest GPU run is
  found among recorded results, and "no GPU run yet" is a clear ``None``.
- A results summary carries no maintainers' targets, and the text report prints none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from mla_tutorial import bench, records

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.py"


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


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--notebooks", "notebooks/no_such_chapter.ipynb"], "no such notebook"),
    (["--tiny", "--budget-s", "0"], "--budget-s must be positive"),
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
