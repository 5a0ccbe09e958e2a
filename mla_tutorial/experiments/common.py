"""What every experiment of chapters 09 and 10 shares: the two tasks, the model family, parameter
matching, one training run, a pool of runs, and results files.

A :class:`Setting` fixes the sizes of everything: the tasks, the training of each, the seeds and
the evaluation grid. ``SETTINGS["full"]`` is the recorded run (``mla_tutorial/results/lm/``),
``SETTINGS["tiny"]`` runs each experiment end to end in seconds (the tests), and the chapters
build their live versions with :meth:`Setting.replace`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import MQAR, TextCorpus
from ..device import describe_device, pick_device
from ..model import LMConfig, TransformerLM
from ..train import TrainConfig, evaluate, save_checkpoint, train

__all__ = ["Setting", "SETTINGS", "RunSpec", "base_config", "match_params", "make_task", "run_one", "run_all",
           "text_val_loss", "mqar_grid", "count_params", "stats", "metadata", "results_dir", "save_result", "load_result",
           "checkpoint_path", "checkpoint_name", "finish", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
TASKS = ("text", "mqar")


@dataclass(frozen=True)
class Setting:
    """Sizes of an experiment run.

    Attributes:
        name: ``"full"``, ``"tiny"`` or a chapter's own.
        model: the base :class:`LMConfig` (MHA, 6 heads of 16, 2 layers, d_model 96); every
            variant is this config with its attention changed and its MLP width matched.
        text_seq_len: training (and validation) sequence length of the text task.
        mqar: the MQAR task used for training (lengths, pair counts, curriculum).
        mqar_eval_pairs, mqar_eval_len: the accuracy grid: every pair count at one length ...
        mqar_eval_lens, mqar_eval_lens_pairs: ... and every length at one pair count (lengths
            beyond the training lengths test whether recall carries over to longer contexts).
        text_train, mqar_train: the :class:`TrainConfig` of each task (their seeds are set per run).
        seeds: the seeds of each variant of experiment a (model initialisation ``seed``, data ``seed + 1``).
        sweep_seeds: the seeds of each point of experiment b's sweeps.
        eval_batches, eval_batch_size: batches (of sequences) for each MQAR grid point.
        text_val_windows: held-out windows for the final text loss (``None``: all of them).
    """

    name: str
    model: LMConfig = LMConfig()
    text_seq_len: int = 128
    mqar: MQAR = MQAR(num_pairs=(2, 4, 8, 16), seq_len=(16, 32, 64), num_keys=32, num_values=32, easy_steps=300)
    mqar_eval_pairs: tuple[int, ...] = (2, 4, 8, 16)
    mqar_eval_len: int = 64
    mqar_eval_lens: tuple[int, ...] = (16, 32, 64, 128)
    mqar_eval_lens_pairs: int = 4
    text_train: TrainConfig = TrainConfig(steps=250, batch_size=32, lr=1e-2, warmup_steps=25, eval_every=50)
    mqar_train: TrainConfig = TrainConfig(steps=500, batch_size=64, lr=3e-3, warmup_steps=30, weight_decay=0.0,
                                          eval_every=50)
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: tuple[int, ...] = (0, 1)
    eval_batches: int = 8
    eval_batch_size: int = 64
    text_val_windows: int | None = None

    def replace(self, **changes: Any) -> "Setting":
        return dataclasses.replace(self, **changes)

    def train_config(self, task: str, seed: int) -> TrainConfig:
        base = {"text": self.text_train, "mqar": self.mqar_train}[task]
        return base.replace(seed=seed, data_seed=seed + 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists, as they do in a results file)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()  # without the conversion-only fields at their defaults
        d["mqar"]["vocab_size"] = self.mqar.vocab_size
        return json.loads(json.dumps(d))


SETTINGS: dict[str, Setting] = {
    "full": Setting("full"),
    "tiny": Setting(
        "tiny", model=LMConfig(d_model=24, n_heads=6, head_dim=4, d_ff=64, qk_nope_head_dim=4, qk_rope_head_dim=2,
                               v_head_dim=4, kv_lora_rank=16),
        text_seq_len=32, mqar=MQAR(num_pairs=(2, 4), seq_len=(16, 32), num_keys=8, num_values=8, easy_steps=2),
        mqar_eval_pairs=(2, 4), mqar_eval_len=32, mqar_eval_lens=(16, 32, 48), mqar_eval_lens_pairs=2,
        text_train=TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1, eval_batch_size=4),
        mqar_train=TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1, eval_batch_size=4),
        seeds=(0, 1), sweep_seeds=(0,), eval_batches=1, eval_batch_size=8, text_val_windows=8),
}


# --- tasks and models ---------------------------------------------------------------------------
def make_task(task: str, setting: Setting) -> MQAR | TextCorpus:
    """The task named ``task`` (``"text"`` or ``"mqar"``) at the setting's sizes."""
    if task == "text":
        return TextCorpus(seq_len=setting.text_seq_len)
    if task == "mqar":
        return setting.mqar
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def base_config(task: str, setting: Setting, **changes: Any) -> LMConfig:
    """The setting's base model, with the task's vocabulary and context, and ``changes`` applied."""
    if task == "text":
        vocab, context = TextCorpus.vocab_size, setting.text_seq_len
    elif task == "mqar":
        vocab, context = setting.mqar.vocab_size, max(setting.mqar.max_seq_len, setting.mqar_eval_len,
                                                      *setting.mqar_eval_lens)
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return setting.model.replace(vocab_size=vocab, max_seq_len=context, **changes)


def count_params(config: LMConfig) -> int:
    """Parameters of a model with this config, counted without building its weights."""
    with torch.device("meta"):  # counts shapes only: nothing is allocated or initialised
        return TransformerLM(config).num_parameters()


def match_params(config: LMConfig, target: int, min_d_ff: int = 4) -> LMConfig:
    """``config`` with the SwiGLU width ``d_ff`` chosen so that its parameter count is as close to
    ``target`` as an integer width allows. Parameters grow by ``3 d_model n_layers`` per unit of
    ``d_ff``, so the match is within ``1.5 d_model n_layers`` parameters; raises ``ValueError`` if
    the attention alone already needs more than ``target``."""
    per_unit = 3 * config.d_model * config.n_layers
    rest = count_params(config.replace(d_ff=1)) - per_unit
    d_ff = round((target - rest) / per_unit)
    if d_ff < min_d_ff:
        raise ValueError(f"{config.label} with {config.n_layers} layers and {config.n_heads} heads needs "
                         f"{rest:,} parameters without its MLP, too many for a budget of {target:,}; "
                         f"choose fewer heads or layers, or a larger budget")
    return config.replace(d_ff=d_ff)


def text_val_loss(model: TransformerLM, corpus: TextCorpus, batch_size: int = 64,
                  windows: int | None = None) -> float:
    """Mean loss (nats per byte) over the held-out text in fixed windows (the first ``windows``
    of them; ``None``: all)."""
    x, y = corpus.val_windows()
    x, y = x[:windows], y[:windows]
    device = model.embed.weight.device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
            count += yb.numel()
    return total / count


def mqar_grid(model: TransformerLM, setting: Setting, seed: int = 12345) -> dict[str, dict[str, float]]:
    """MQAR accuracy against the number of pairs (at ``mqar_eval_len`` tokens) and against the
    sequence length (at ``mqar_eval_lens_pairs`` pairs), on fixed evaluation batches."""
    task = setting.mqar
    bs = setting.eval_batch_size
    by_pairs = {str(n): evaluate(model, task, setting.eval_batches, bs, seed=seed, num_pairs=n,
                                 seq_len=setting.mqar_eval_len)["accuracy"] for n in setting.mqar_eval_pairs}
    by_len = {str(L): evaluate(model, task, setting.eval_batches, bs, seed=seed, num_pairs=setting.mqar_eval_lens_pairs,
                               seq_len=L)["accuracy"] for L in setting.mqar_eval_lens}
    return {"by_pairs": by_pairs, "by_len": by_len}


# --- one run, and a pool of them ------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training run: a model config trained on a task with a seed.

    ``group`` and ``x`` place it in an experiment (e.g. group ``"heads"``, x = 12);
    ``checkpoint``: a path to save the trained weights to (weights only, bf16)."""

    label: str
    task: str
    config: LMConfig
    seed: int
    group: str = ""
    x: float | None = None
    checkpoint: str | None = None


def run_one(spec: RunSpec, setting: Setting, device: torch.device | str | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Train one model and evaluate it; returns a JSON-ready row."""
    task = make_task(spec.task, setting)
    tc = setting.train_config(spec.task, spec.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    model = TransformerLM(spec.config)
    history = train(model, task, tc, device=device, progress=progress, desc=f"{spec.task} {spec.label} s{spec.seed}")
    row: dict[str, Any] = {
        "label": spec.label, "task": spec.task, "seed": spec.seed, "group": spec.group, "x": spec.x,
        "config": spec.config.to_dict(), "params": model.num_parameters(),
        "params_no_embeddings": model.num_parameters(embeddings=False),
        "cache_values_per_token": spec.config.cache_elements_per_token(),
        "cache_bytes_per_token_bf16": model.cache_bytes_per_token(torch.bfloat16),
        "history": history,
    }
    if spec.task == "text":
        row["val_loss"] = text_val_loss(model, task, windows=setting.text_val_windows)
    else:
        row["mqar"] = mqar_grid(model, setting)
        row["val_loss"] = history[-1]["val_loss"]
    if spec.checkpoint:
        row["checkpoint"] = _save_small_checkpoint(spec, model, history, tc, setting, row)
    row["wall_s"], row["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    return row


def _save_small_checkpoint(spec: RunSpec, model: TransformerLM, history: list, tc: TrainConfig,
                           setting: Setting, row: dict[str, Any]) -> dict[str, Any]:
    """Weights in bf16 (half the bytes); the metrics of the rounded weights are measured again and
    stored with them, so a reader who loads the file can check them."""
    rounded = TransformerLM(spec.config)
    rounded.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    metrics: dict[str, Any] = {}
    if spec.task == "text":
        metrics["val_loss"] = text_val_loss(rounded, make_task("text", setting), windows=setting.text_val_windows)
    else:
        metrics["mqar"] = mqar_grid(rounded, setting)
    path = pathlib.Path(spec.checkpoint)
    save_checkpoint(path, rounded, step=tc.steps, history=history, train_config=tc, dtype=torch.bfloat16,
                    extra={"task": spec.task, "label": spec.label, "seed": spec.seed, "setting": setting.name,
                           "metrics_bf16_weights": metrics,
                           "mqar": dataclasses.asdict(setting.mqar) if spec.task == "mqar" else None})
    return {"path": str(path.relative_to(results_dir())) if path.is_relative_to(results_dir()) else str(path),
            "bytes": path.stat().st_size, "metrics_bf16_weights": metrics}


def _worker_init() -> None:
    # one thread per worker: two single-threaded runs side by side use two cores better than one
    # two-threaded run for models this small, and they suffer less when other programs compete
    torch.set_num_threads(1)


def _run_in_worker(args: tuple[RunSpec, Setting, str | None]) -> dict[str, Any]:
    spec, setting, device = args
    return run_one(spec, setting, device)


def run_all(specs: Sequence[RunSpec], setting: Setting, workers: int = 1, device: torch.device | str | None = None,
            progress: bool = True, desc: str = "runs",
            describe: Callable[[dict[str, Any]], str] | None = None) -> list[dict[str, Any]]:
    """Run every spec (``workers`` processes side by side on a CPU) and return their rows in order.

    The workers are started with ``spawn``, so each imports the calling program's main module: in
    a script, call this under ``if __name__ == "__main__":`` (a notebook needs nothing)."""
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    device_type = pick_device(None if device is None else str(device)).type
    if device_type != "cpu":
        workers = 1  # one GPU: runs go one after the other
    describe = describe or (lambda r: f"{r['task']} {r['label']} s{r['seed']}")
    bar = tqdm(total=len(specs), desc=desc, unit="run", disable=not progress)
    rows: list[dict[str, Any] | None] = [None] * len(specs)
    if workers == 1:
        for i, spec in enumerate(specs):
            bar.set_postfix_str(f"{spec.task} {spec.label} s{spec.seed}")
            rows[i] = run_one(spec, setting, device)
            bar.update()
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
            futures = {pool.submit(_run_in_worker, (spec, setting, None if device is None else str(device))): i
                       for i, spec in enumerate(specs)}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                rows[i] = fut.result()
                bar.set_postfix_str(describe(rows[i]))
                bar.update()
    bar.close()
    return rows  # type: ignore[return-value]


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and sample standard deviation of a metric over seeds."""
    import statistics
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


# --- results files --------------------------------------------------------------------------------
def results_dir() -> pathlib.Path:
    """Where the recorded runs live: ``mla_tutorial/results/lm/``."""
    return pathlib.Path(__file__).resolve().parents[1] / "results" / "lm"


def checkpoint_name(task: str, config: LMConfig) -> str:
    """A file name for a model: ``text-mha``, ``mqar-gqa2``, ``text-mla-dc64``."""
    if config.attention == "mla":
        return f"{task}-mla-dc{config.kv_lora_rank}"
    return f"{task}-{config.label.lower().replace('-', '')}"


def checkpoint_path(name: str, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """A checkpoint of a run: ``<out_dir>/checkpoints/<name>.pt`` (default out_dir: the recorded
    runs, ``mla_tutorial/results/lm/``)."""
    return pathlib.Path(out_dir or results_dir()) / "checkpoints" / f"{name}.pt"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _git_commit() -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _corpus_sha256() -> str | None:
    import hashlib
    from ..data import CORPUS_PATH
    return hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest() if CORPUS_PATH.is_file() else None


def metadata(device: torch.device | str | None = None, workers: int = 1) -> dict[str, Any]:
    """Where and when a run happened: versions, device, threads, niceness, load average (call at
    the start). The load average says how much else the machine was running."""
    dev = pick_device(None if device is None else str(device))
    return {"schema": SCHEMA_VERSION, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
            "corpus_sha256": _corpus_sha256(),
            "nice": os.nice(0) if hasattr(os, "nice") else None,
            "device": {"type": dev.type, "name": describe_device(dev), "platform": platform.platform(),
                       "cpu_count": os.cpu_count()},
            "workers": workers, "threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
            "load_average_start": _load_average()}


def finish(result: dict[str, Any], wall_start: float, cpu_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Add wall time, the runs' summed CPU time and the load average at the end."""
    result["wall_s"] = time.perf_counter() - wall_start
    result["cpu_s_runs"] = sum(r.get("cpu_s", 0.0) for r in cpu_rows)
    result["load_average_end"] = _load_average()
    return result


def save_result(result: dict[str, Any], path: str | pathlib.Path | None = None) -> pathlib.Path:
    path = pathlib.Path(path) if path is not None else results_dir() / f"{result['experiment']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def load_result(name: str, path: str | pathlib.Path | None = None) -> dict[str, Any]:
    """A recorded result: ``mla_tutorial/results/lm/<name>.json`` (or ``path``)."""
    path = pathlib.Path(path) if path is not None else results_dir() / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded result at {path}; run python -m mla_tutorial.experiments {name}")
    return json.loads(path.read_text())
