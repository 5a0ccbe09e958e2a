"""The experiments of Part IV: small language models trained in the book, measured.

    python -m mla_tutorial.experiments matched_cache     # a. quality at matched cache bytes
    python -m mla_tutorial.experiments heads_layers      # b. heads and layers at a fixed budget
    python -m mla_tutorial.experiments spectra           # c. are trained keys and values low-rank?
    python -m mla_tutorial.experiments generation        # d. the MLA model writes, in three cache modes
    python -m mla_tutorial.experiments convert           # e. the MHA and GQA models converted to MLA
    python -m mla_tutorial.experiments all --workers 2   # all five, in that order

Each writes ``mla_tutorial/results/lm/<name>.json`` (config, seeds, torch version, device, date,
wall time, every run's history and final metrics); ``matched_cache`` also saves small checkpoints
of its first-seed MHA, GQA-2 and MLA models in ``mla_tutorial/results/lm/checkpoints/``, which
``spectra`` and ``generation`` (and later chapters) load. ``--setting tiny`` runs everything end
to end in seconds. Chapters 09 and 10 plot the results with each module's ``plot_*`` functions;
``convert`` writes ``mla_tutorial/results/convert/convert.json`` instead (chapter 11).
"""

from __future__ import annotations

from . import conversion, generation, heads_layers, matched_cache, spectra
from .common import SETTINGS, Setting, load_result, results_dir

__all__ = ["EXPERIMENTS", "SETTINGS", "Setting", "load_result", "results_dir", "run_experiment",
           "matched_cache", "heads_layers", "spectra", "generation", "conversion"]

#: name -> module with ``run(setting, workers, device, progress, out_dir)``, in dependency order
EXPERIMENTS = {m.NAME: m for m in (matched_cache, heads_layers, spectra, generation, conversion)}


def run_experiment(name: str, setting: str | Setting = "full", workers: int = 1, device: str | None = None,
                   progress: bool = True, out_dir=None) -> dict:
    """Run one experiment and return its result (not saved; see ``common.save_result``)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {list(EXPERIMENTS)}")
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose one of {list(SETTINGS)}")
        setting = SETTINGS[setting]
    return EXPERIMENTS[name].run(setting, workers=workers, device=device, progress=progress, out_dir=out_dir)
