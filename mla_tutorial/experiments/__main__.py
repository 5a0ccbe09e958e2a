"""Command line: ``python -m mla_tutorial.experiments NAME [--setting full|tiny] [--workers 2] ...``."""

from __future__ import annotations

import argparse
import pathlib
import sys

from . import EXPERIMENTS, SETTINGS, run_experiment
from .common import results_dir, save_result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mla_tutorial.experiments",
                                description="Train the small language models of chapters 09-10 and record the results.")
    p.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment (all: every one, in order)")
    p.add_argument("--setting", default="full", choices=sorted(SETTINGS),
                   help="full: the recorded sizes; tiny: seconds, for testing")
    p.add_argument("--workers", type=int, default=1,
                   help="training runs side by side, one CPU thread each (a GPU runs one at a time)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available, or $MLA_DEVICE)")
    p.add_argument("--out", default=None,
                   help=f"folder for the JSON files and checkpoints (default: {results_dir()})")
    p.add_argument("--note", default=None, help="free text stored with the results, e.g. what else the machine ran")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        _parser().error(f"--workers must be at least 1, got {args.workers}")
    from ..device import pick_device
    try:
        pick_device(args.device)
    except ValueError as err:
        _parser().error(str(err))
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    out_dir = pathlib.Path(args.out) if args.out else None
    command = " ".join(["python -m mla_tutorial.experiments", *(argv if argv is not None else sys.argv[1:])])
    for name in names:
        result = run_experiment(name, args.setting, args.workers, args.device, not args.quiet, out_dir)
        result["command"] = command
        if args.note:
            result["note"] = args.note
        folder = out_dir or getattr(EXPERIMENTS[name], "RESULTS_DIR", None)
        path = save_result(result, None if folder is None else folder / f"{name}.json")
        print(f"{name}: {result['wall_s']:.0f} s wall, {result['cpu_s_runs']:.0f} s CPU in training runs -> {path}")


if __name__ == "__main__":
    main()
