"""Experiment d: the trained MLA model writes text, in its three cache modes (chapter 09).

The MLA model of experiment a (d_c = 64, seed 0, trained on the book's prose) continues a few
prompts taken from the book. Greedy decoding must give the same tokens in the ``"expanded"``,
``"latent"`` and ``"absorbed"`` cache modes, and the same as recomputing the whole sequence at
every step (no cache). For each mode it records the cache bytes per token and the decoding speed
(tokens per second, the best of a few repeats, at batch 1 and at a larger batch). Timings are a
benchmark of this machine, not a property of the modes: at these tiny sizes the per-step
overheads dominate, and chapter 08 measures the modes at DeepSeek's sizes.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import torch

from ..data import decode, encode
from ..device import synchronize
from ..mla import MLA_MODES
from ..model import TransformerLM
from .common import RunSpec, Setting, checkpoint_name, checkpoint_path, finish, metadata, run_one
from .matched_cache import matched_mla_label, variants

__all__ = ["NAME", "PROMPTS", "run", "decode_speed"]

NAME = "generation"
PROMPTS = ("Multi-Head Latent Attention ", "The KV cache ", "In this chapter we ", "The absorbed ")


def _mla_config(setting: Setting):
    return dict(variants("text", setting))[matched_mla_label(setting)]


def decode_speed(model: TransformerLM, prompt: list[int], new_tokens: int, batch: int, mode: str,
                 repeats: int = 3) -> float:
    """Tokens per second of greedy decoding (``batch`` copies of ``prompt``; prefill included),
    the best of ``repeats`` timed runs after one untimed warm-up."""
    device = model.embed.weight.device
    prompts = [prompt] * batch
    model.generate(prompts, 2, mode=mode)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        model.generate(prompts, new_tokens, mode=mode)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return batch * new_tokens / best


def run(setting: Setting, workers: int = 1, device: str | None = None, progress: bool = True,
        out_dir: str | pathlib.Path | None = None, new_tokens: int | None = None,
        batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 3) -> dict[str, Any]:
    start = time.perf_counter()
    meta = metadata(device, workers)
    cfg = _mla_config(setting)
    path = checkpoint_path(checkpoint_name("text", cfg), out_dir)
    trained_rows, source = [], "recorded checkpoint of matched_cache"
    if not path.is_file():
        trained_rows.append(run_one(RunSpec(cfg.label, "text", cfg, setting.seeds[0], checkpoint=str(path)),
                                    setting, device, progress))
        source = "trained by this experiment"
    model = TransformerLM.from_checkpoint(path).eval()
    if model.config != cfg:
        raise ValueError(f"{path} holds a model of another size than this setting's {cfg.label}")
    new_tokens = new_tokens or min(96, cfg.max_seq_len - max(len(encode(p)) for p in PROMPTS))
    prompts = [encode(p) for p in PROMPTS]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(MLA_MODES) * (1 + len(batch_sizes)) + 2, desc=NAME, disable=not progress)
    greedy: dict[str, list[list[int]]] = {}
    for mode in MLA_MODES:
        greedy[mode] = [model.generate([p], new_tokens, mode=mode)[0] for p in prompts]
        bar.update()
    reference = [model.generate([p], new_tokens, use_cache=False)[0] for p in prompts]
    bar.update()
    g = torch.Generator().manual_seed(0)
    sampled = [model.generate([p], new_tokens, sample=True, temperature=0.8, top_k=20, generator=g)[0]
               for p in prompts]
    bar.update()
    speed: dict[str, dict[str, float]] = {}
    for mode in MLA_MODES:
        speed[mode] = {}
        for b in batch_sizes:
            speed[mode][str(b)] = decode_speed(model, prompts[0], new_tokens, b, mode, repeats)
            bar.update()
    bar.close()
    caches = {mode: model.new_caches(1, 8, mode=mode) for mode in MLA_MODES}
    result = {
        "experiment": NAME, **meta, "setting": setting.to_dict(), "checkpoint": path.name,
        "checkpoint_source": source, "config": cfg.to_dict(), "new_tokens": new_tokens, "prompts": list(PROMPTS),
        "greedy": {mode: [decode(t) for t in toks] for mode, toks in greedy.items()},
        "greedy_tokens_identical": all(greedy[m] == greedy["expanded"] for m in MLA_MODES),
        "greedy_equals_recomputation": greedy["absorbed"] == reference,
        "sampled": {"temperature": 0.8, "top_k": 20, "seed": 0, "texts": [decode(t) for t in sampled]},
        "cache_bytes_per_token": {mode: {"fp32": model.cache_bytes_per_token(torch.float32, mode),
                                         "bf16": model.cache_bytes_per_token(torch.bfloat16, mode),
                                         "measured_fp32": sum(c.bytes_per_token for c in caches[mode])}
                                  for mode in MLA_MODES},
        "tokens_per_s": speed, "batch_sizes": list(batch_sizes), "repeats": repeats,
    }
    return finish(result, start, trained_rows)
