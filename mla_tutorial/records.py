"""Recorded GPU runs: what a chapter measured on a GPU, kept with the package and shown beside yours.

``scripts/gpu_run.py`` runs every notebook at its GPU sizes and the decode benchmark, then writes
one results file to ``mla_tutorial/results/`` (the benchmark's JSON, see :mod:`mla_tutorial.bench`,
with a ``"gpu_run"`` section: each notebook's wall time and what the chapters recorded).

* :func:`record_chapter` is called by a chapter with the figures it measured. It writes them only
  when ``$MLA_RECORD_DIR`` is set (the GPU run script sets it); in a reader's session it does
  nothing.
* :func:`latest_gpu_run` returns the newest recorded GPU run, :func:`chapter_record` what one
  chapter recorded in it; both return ``None`` when nothing is recorded yet.

Used by chapters 07 and 08 and by ``scripts/gpu_run.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
from typing import Any

import torch

__all__ = ["RECORD_DIR_ENV", "record_chapter", "read_chapter_records", "latest_gpu_run", "chapter_record",
           "run_label"]

#: The environment variable naming the folder chapters write their records to.
RECORD_DIR_ENV = "MLA_RECORD_DIR"


def _chapter_name(chapter: str) -> str:
    if not isinstance(chapter, str) or not chapter or not all(ch.isalnum() or ch in "-_" for ch in chapter):
        raise ValueError(f"chapter must be a short name of letters, digits, '-' or '_' (e.g. '07'), got {chapter!r}")
    return chapter


def record_chapter(chapter: str, data: dict[str, Any]) -> pathlib.Path | None:
    """Write ``data`` (JSON-ready) as ``$MLA_RECORD_DIR/<chapter>.json``, with the torch version,
    Python version and date added; do nothing and return ``None`` when the variable is unset."""
    chapter = _chapter_name(chapter)
    if not isinstance(data, dict):
        raise TypeError(f"record_chapter: data must be a dict, got {type(data).__name__}")
    folder = os.environ.get(RECORD_DIR_ENV)
    if not folder:
        return None
    record = {"chapter": chapter, "torch": torch.__version__, "python": platform.python_version(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **data}
    path = pathlib.Path(folder) / f"{chapter}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_chapter_records(folder: str | pathlib.Path) -> dict[str, dict[str, Any]]:
    """Every ``<chapter>.json`` in ``folder``, by chapter name (empty if the folder does not exist)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def latest_gpu_run(runs: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The newest recorded run on a CUDA GPU made by ``scripts/gpu_run.py`` (a results file with a
    ``"gpu_run"`` section), from ``runs`` (default: :func:`mla_tutorial.bench.load_results`)."""
    if runs is None:
        from .bench import load_results
        runs = load_results(device_type="cuda")
    gpu = [r for r in runs if r.get("device", {}).get("type") == "cuda" and "gpu_run" in r]
    return max(gpu, key=lambda r: r.get("date", ""), default=None)


def chapter_record(chapter: str, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``chapter`` recorded in ``run`` (a results file from :func:`latest_gpu_run`), or ``None``."""
    chapter = _chapter_name(chapter)
    if run is None:
        return None
    return run.get("gpu_run", {}).get("chapters", {}).get(chapter)


def run_label(run: dict[str, Any]) -> str:
    """One line naming a recorded run: device, dtype, torch version and date."""
    return (f"{run.get('device', {}).get('name', '?')}, {run.get('dtype', '?')}, torch {run.get('torch', '?')}, "
            f"{run.get('date', '?')[:10]}")
