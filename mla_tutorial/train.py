"""Training a :class:`~mla_tutorial.model.TransformerLM`: a loop a reader can hold in their head.

    model = TransformerLM(LMConfig(attention="mla"))
    history = train(model, TextCorpus(seq_len=128), TrainConfig(steps=300))

* AdamW (no weight decay on norms), linear warm-up then cosine decay to ``min_lr_ratio`` of the
  peak, gradient clipping, a seed for the model's initialisation and one for the data.
* A progress bar with the loss; evaluation every ``eval_every`` steps (loss and the accuracy of
  the scored positions, which for :class:`~mla_tutorial.data.MQAR` is its recall accuracy).
* Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint`; ``train(..., resume=path)``
  continues a run exactly where it stopped (optimizer, schedule and data generator included).
* On a GPU the forward and backward passes run under autocast: bf16 where the GPU has it
  (Ampere and newer), fp16 with a gradient scaler on older ones such as Colab's T4.

Defined in chapter 09.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .device import pick_device
from .model import LMConfig, TransformerLM

__all__ = ["TrainConfig", "Task", "train", "evaluate", "lr_at", "save_checkpoint", "load_checkpoint",
           "autocast_dtype", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


class Task(Protocol):
    """What :func:`train` needs from data: :class:`~mla_tutorial.data.MQAR` and
    :class:`~mla_tutorial.data.TextCorpus` are two."""

    vocab_size: int

    def batch(self, split: str, batch_size: int, generator: torch.Generator | None = None,
              step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (see the module docstring)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    eval_batch_size: int = 64
    seed: int = 0            # the model's initialisation
    data_seed: int = 1       # training batches (evaluation batches use data_seed + 1_000_003)
    amp: bool | None = None  # autocast: None = on for CUDA, off elsewhere

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive, got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then a cosine from ``lr`` down to ``min_lr_ratio * lr`` at the last step."""
    c = config
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    span = max(1, c.steps - c.warmup_steps - 1)
    progress = min(1.0, (step - c.warmup_steps) / span)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on ``device``: bf16 on GPUs that run it fast (compute
    capability 8 and up), fp16 on older GPUs (with a gradient scaler), ``None`` (fp32) on a CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return None


def _optimizer(model: TransformerLM, config: TrainConfig) -> torch.optim.AdamW:
    # weight decay on matrices and embeddings only, not on the norms' gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def _check_task(model: TransformerLM, task: Task) -> None:
    if not hasattr(task, "batch"):
        raise TypeError(f"the task must have a batch(split, batch_size, generator) method, got {type(task).__name__}")
    if task.vocab_size > model.config.vocab_size:
        raise ValueError(f"the task's vocabulary ({task.vocab_size} tokens) does not fit the model's "
                         f"(vocab_size={model.config.vocab_size}); build the model with vocab_size={task.vocab_size}")
    seq_len = getattr(task, "max_seq_len", None)
    if seq_len is not None and seq_len > model.config.max_seq_len:
        raise ValueError(f"the task's sequences ({seq_len} tokens) are longer than the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")


@torch.no_grad()
def evaluate(model: TransformerLM, task: Task, batches: int = 4, batch_size: int = 64, seed: int = 0,
             split: str = "val", amp_dtype: torch.dtype | None = None, **batch_kwargs: Any) -> dict[str, float]:
    """Mean loss and accuracy of the argmax over the scored positions of ``batches`` batches drawn
    with a generator seeded by ``seed`` (the same batches every call). ``batch_kwargs`` go to
    ``task.batch`` (e.g. ``num_pairs`` for MQAR)."""
    device = model.embed.weight.device
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for _ in range(batches):
            x, y = (t.to(device) for t in task.batch(split, batch_size, g, **batch_kwargs))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            scored = y != IGNORE_INDEX
            loss_sum += F.cross_entropy(logits[scored], y[scored], reduction="sum").item()
            correct += (logits[scored].argmax(-1) == y[scored]).sum().item()
            count += int(scored.sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def train(model: TransformerLM, task: Task, config: TrainConfig = TrainConfig(), *,
          device: torch.device | str | None = None, progress: bool = True,
          checkpoint: str | pathlib.Path | None = None, checkpoint_every: int | None = None,
          resume: str | pathlib.Path | None = None, stop_after: int | None = None,
          desc: str | None = None, init: bool = True) -> list[dict[str, float]]:
    """Train ``model`` on ``task`` for ``config.steps`` steps; returns the history: one row per
    evaluation (``step``, ``lr``, ``train_loss`` (mean since the last row), ``val_loss``,
    ``val_accuracy``, ``seconds``).

    The model is initialised here from ``config.seed`` (so a run is reproducible from its
    configs alone), unless ``resume`` names a checkpoint to continue from or ``init=False`` keeps
    the weights it has (fine-tuning a loaded or converted model). ``checkpoint``: save
    to this path every ``checkpoint_every`` steps (default: at each evaluation) and at the end.
    ``stop_after``: stop after this many steps (to test resuming); the schedule is still that of
    ``config.steps``.
    """
    if not isinstance(model, TransformerLM):
        raise TypeError(f"train() needs a TransformerLM, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    _check_task(model, task)
    device = pick_device(None if device is None else str(device))
    amp_dtype = autocast_dtype(device) if config.amp in (None, True) else None
    if config.amp is True and amp_dtype is None:
        amp_dtype = torch.bfloat16  # asked for explicitly on a CPU: bf16 autocast (slow, but it tests the path)
    every = checkpoint_every or config.eval_every
    model.to(device)
    opt = _optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    data_gen = torch.Generator().manual_seed(config.data_seed)
    step, history = 0, []
    if resume is not None:
        ckpt = load_checkpoint(resume, model, map_location=device)
        if ckpt.get("train_config") != config.to_dict():
            diff = {k: (ckpt.get("train_config", {}).get(k), v) for k, v in config.to_dict().items()
                    if ckpt.get("train_config", {}).get(k) != v}
            raise ValueError(f"cannot resume {resume}: it was trained with another TrainConfig "
                             f"(checkpoint vs now: {diff})")
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        data_gen.set_state(ckpt["data_generator"])
        step, history = ckpt["step"], list(ckpt["history"])
    else:
        torch.manual_seed(config.seed)
        if init:
            model.reset_parameters()
    end = config.steps if stop_after is None else min(config.steps, step + stop_after)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc=desc or model.config.label, disable=not progress,
               unit="step", leave=True)
    start = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    model.train()
    running, n_running = 0.0, 0
    while step < end:
        lr = lr_at(step, config)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (t.to(device) for t in task.batch("train", config.batch_size, data_gen, step=step))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower TrainConfig.lr "
                                     f"(now {config.lr}) or raise warmup_steps")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        running += loss.item()
        n_running += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # drawn when tqdm next redraws
        bar.update()
        if step % config.eval_every == 0 or step == config.steps:
            ev = evaluate(model, task, config.eval_batches, config.eval_batch_size, seed=config.data_seed + 1_000_003,
                          amp_dtype=amp_dtype)
            history.append({"step": step, "lr": lr, "train_loss": running / n_running, "val_loss": ev["loss"],
                            "val_accuracy": ev["accuracy"], "seconds": time.perf_counter() - start})
            running, n_running = 0.0, 0
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{ev['loss']:.3f}", refresh=False)
        if checkpoint is not None and (step % every == 0 or step == end):
            save_checkpoint(checkpoint, model, opt, step=step, history=history, train_config=config,
                            data_generator=data_gen, scaler=scaler)
    bar.close()
    model.eval()
    return history


# --- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(path: str | pathlib.Path, model: TransformerLM, optimizer: torch.optim.Optimizer | None = None,
                    *, step: int = 0, history: list | None = None, train_config: TrainConfig | None = None,
                    data_generator: torch.Generator | None = None, scaler: Any = None,
                    extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write the model's config and weights (and, for resuming, the optimizer, step, history and
    data generator) to ``path``. Without an optimizer it is a small weights-only file; ``dtype``
    (e.g. ``torch.bfloat16``) stores the weights rounded to it, loaded back into the model's dtype."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    ckpt: dict[str, Any] = {"version": CHECKPOINT_VERSION, "model_config": model.config.to_dict(),
                            "model": weights,
                            "step": step, "history": list(history or [])}
    if train_config is not None:
        ckpt["train_config"] = train_config.to_dict()
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if data_generator is not None:
        ckpt["data_generator"] = data_generator.get_state()
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    if extra:
        ckpt["extra"] = extra
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind
    return path


def load_checkpoint(path: str | pathlib.Path, model: TransformerLM | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; with ``model``, also load its weights into the model, after checking
    that the checkpoint was made for the same :class:`LMConfig` (a clear error names the fields
    that differ)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by mla_tutorial.train.save_checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt.get('version')}; this package reads "
                         f"version {CHECKPOINT_VERSION}")
    if model is not None:
        saved = LMConfig.from_dict(ckpt["model_config"])
        if saved != model.config:
            diff = {k: (v, getattr(model.config, k)) for k, v in saved.to_dict().items()
                    if getattr(model.config, k) != v}
            raise ValueError(f"checkpoint {path} was made for another model config; differing fields "
                             f"(checkpoint, model): {diff}. Build the model with "
                             f"TransformerLM.from_checkpoint(path) instead")
        model.load_state_dict(ckpt["model"])
    return ckpt
