"""A continuous-batching serving engine over :class:`~mla_tutorial.model.TransformerLM`.

Requests wait in a queue; each engine step

1. **admits** waiting requests, first come first served, while the pool has blocks for their
   prompts (a request that could never fit is refused when it is submitted, never queued);
2. **prefills** each newly admitted request alone: its whole prompt through every layer at once,
   MLA in the expanded computation (per-head K and V from the fresh latents), every token's cache
   row written to the pool, and its first new token taken from the last position's logits;
3. runs **one batched decode step** for every other running request, whatever its length: each
   sequence's newest token at its own position, its cache row written at its own slot, attention
   read through its own block table: :func:`~mla_tutorial.paged.paged_absorbed_attention` over the
   paged latent pool for MLA (the absorbed decode), :func:`~mla_tutorial.paged.paged_attention`
   over paged K/V pools for MHA, GQA and MQA;
4. **frees** the blocks of every request that has its tokens.

When the running requests need more blocks than are free, the newest running request is
**preempted by recomputation**: its blocks are freed and it goes back to the front of the queue
with the tokens it has generated, to be prefilled again (prompt and generated tokens) when there
is room (vLLM's default policy for a full pool).

Under greedy decoding each request's tokens are those ``model.generate([prompt], n)`` gives it
alone (the engine computes in another order, so the logits may differ by float rounding; the tests and
the chapter check that this changes no token of their models).
Everything else about a run (when each token came out, how many requests ran at once) is in the
:class:`ServeReport`. The trace and the measurements are in :mod:`mla_tutorial.serve_bench`;
``python -m mla_tutorial.serve`` runs them.

Defined in chapter 12.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import MultiHeadAttention, attention
from .blocks import DEFAULT_BLOCK_SIZE, BlockManager
from .mla import MultiHeadLatentAttention
from .model import TransformerLM
from .paged import PagedKVCache, PagedLatentCache
from .quant import TILE, latent_format

__all__ = ["Request", "RequestResult", "ServeReport", "Engine"]


@dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        prompt: token ids (at least one).
        max_new_tokens: tokens to generate (>= 1); the request ends when it has them.
        arrival: when it arrives, in seconds from the start of a run (:meth:`Engine.run`).
        sample: ``False``: greedy; ``True``: sample from softmax(logits / temperature), over the
            ``top_k`` most likely tokens if given, with a generator seeded by ``seed``.
        request_id: a name (default: its place in the trace).
    """

    prompt: Sequence[int]
    max_new_tokens: int
    arrival: float = 0.0
    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    request_id: Any = None


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds on the run's clock."""

    request_id: Any
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0
    rejected: str | None = None          # why the request was refused (None: it was served)

    @property
    def ttft(self) -> float | None:
        """Time to first token: from arrival to the first token."""
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def inter_token(self) -> list[float]:
        """Gaps between successive tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.tensor(list(values), dtype=torch.float64).quantile(q / 100))


@dataclass
class ServeReport:
    """A finished run: every request's result and the engine's counters."""

    results: list[RequestResult]
    wall_s: float                         # the run's clock at the end (busy time plus idle gaps)
    busy_s: float                         # time spent computing steps
    steps: int
    max_running: int                      # the most sequences that were running at once
    preemptions: int
    blocks_free_at_end: int
    num_blocks: int

    @property
    def served(self) -> list[RequestResult]:
        return [r for r in self.results if r.rejected is None]

    @property
    def rejected(self) -> list[RequestResult]:
        return [r for r in self.results if r.rejected is not None]

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.served)

    def summary(self) -> dict[str, Any]:
        """Throughput, concurrency and latency percentiles (seconds), as the results JSON records them."""
        ttft = [r.ttft for r in self.served if r.ttft is not None]
        itl = [g for r in self.served for g in r.inter_token]
        return {"requests": len(self.results), "served": len(self.served), "rejected": len(self.rejected),
                "generated_tokens": self.generated_tokens, "wall_s": self.wall_s, "busy_s": self.busy_s,
                "tokens_per_s": self.generated_tokens / self.wall_s if self.wall_s > 0 else None,
                "steps": self.steps, "max_running": self.max_running, "preemptions": self.preemptions,
                "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
                "itl_p50_s": _percentile(itl, 50), "itl_p99_s": _percentile(itl, 99),
                "blocks_free_at_end": self.blocks_free_at_end, "num_blocks": self.num_blocks}


@dataclass
class _Seq:
    """A running (or preempted) request: its tokens so far and its sampler."""

    request: Request
    result: RequestResult
    generator: torch.Generator | None

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens (the newest generated one is not cached yet)."""
        return list(self.request.prompt) + self.result.tokens

    @property
    def done(self) -> bool:
        return len(self.result.tokens) >= self.request.max_new_tokens


class Engine:
    """Continuous batching over a paged cache for a :class:`TransformerLM`.

    Args:
        model: the language model (any attention kind); run in eval mode, in its own dtype.
        num_blocks: blocks in the pool (each layer's pool has this many; see
            :func:`~mla_tutorial.blocks.blocks_that_fit` to size it from a memory budget).
        block_size: tokens per block.
        kv_format: MLA only: the latent pool's format, ``None`` for the model's float dtype, or
            ``"fp8"``, ``"fp8_pow2"``, ``"int8"``, ``"int6"`` (see :mod:`mla_tutorial.quant`).
        tile: values per quantization scale (d_c must be a multiple).
        max_running: the most sequences a decode step may hold (``None``: as many as fit).
        seed: shuffles the pool's free list (``None``: blocks in order).
    """

    def __init__(self, model: TransformerLM, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 kv_format: str | None = None, tile: int = TILE, max_running: int | None = None,
                 seed: int | None = None):
        if not isinstance(model, TransformerLM):
            raise TypeError(f"Engine serves a TransformerLM, got {type(model).__name__}")
        if max_running is not None and (isinstance(max_running, bool) or not isinstance(max_running, int)
                                        or max_running <= 0):
            raise ValueError(f"Engine: max_running must be a positive int or None, got {max_running!r}")
        self.model = model.eval()
        c = model.config
        self.mla = c.attention == "mla"
        weight = model.embed.weight
        self.manager = BlockManager(num_blocks, block_size, seed=seed)
        if self.mla:
            fmt = latent_format(kv_format if kv_format is not None else weight.dtype)   # unknown name: clear error
            self.cache: PagedLatentCache | PagedKVCache = PagedLatentCache(
                self.manager, c.kv_lora_rank, c.qk_rope_head_dim, c.n_layers, fmt=fmt, tile=tile, device=weight.device)
        else:
            if kv_format is not None and latent_format(kv_format).quantized:
                raise ValueError(f"Engine: quantized cache formats ({kv_format!r}) store MLA's latent; this model's "
                                 f"attention is {c.label}, whose paged K/V pools are float (leave kv_format unset)")
            self.cache = PagedKVCache(self.manager, c.kv_heads, c.d_h, c.n_layers, dtype=weight.dtype,
                                      device=weight.device)
        self.max_running = max_running
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.finished: list[RequestResult] = []
        self.steps = self.preemptions = self.max_seen = 0
        self._submitted = 0
        #: per step: (sequences decoded, their cached tokens in all, lengths of the prefills)
        self.log: list[tuple[int, int, list[int]]] = []

    def __repr__(self) -> str:
        return (f"Engine({self.model.config.label}, {self.cache!r}, {len(self.running)} running, "
                f"{len(self.waiting)} waiting)")

    # --- submission: every check before any work ---------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise a ``ValueError`` (or ``TypeError``) saying what to change if ``request`` cannot be served."""
        c = self.model.config
        if not isinstance(request, Request):
            raise TypeError(f"Engine.submit takes a Request(prompt, max_new_tokens, ...), got {type(request).__name__}")
        who = "request" if request.request_id is None else f"request {request.request_id!r}"
        prompt = request.prompt
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"{who}: the prompt must be a list of token ids, got "
                            f"{type(prompt).__name__} (encode text first, e.g. mla_tutorial.data.encode)")
        if len(prompt) == 0:
            raise ValueError(f"{who}: the prompt is empty; give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < c.vocab_size for t in prompt):
            raise ValueError(f"{who}: prompt token ids must be ints in [0, {c.vocab_size})")
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{who}: max_new_tokens must be a positive int, got {n!r}")
        total = len(prompt) + n
        if total > c.max_seq_len:
            raise ValueError(f"{who}: {len(prompt)} prompt tokens + {n} new tokens = {total} "
                             f"exceed the model's context (max_seq_len={c.max_seq_len}); ask for at most "
                             f"{max(c.max_seq_len - len(prompt), 0)} new tokens")
        if not self.manager.can_ever_hold(total):
            raise ValueError(f"{who}: {total} tokens need {self.manager.blocks_for(total)} "
                             f"blocks of {self.manager.block_size}, and the whole pool has {self.manager.num_blocks}: "
                             f"it could never run; shorten it or give the engine more blocks")
        if request.sample and not (isinstance(request.temperature, (int, float)) and request.temperature > 0):
            raise ValueError(f"{who}: sampling needs temperature > 0, got "
                             f"{request.temperature!r}; for greedy decoding use sample=False")
        k = request.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{who}: top_k must be a positive int or None, got {k!r}")
        if isinstance(request.arrival, bool) or not isinstance(request.arrival, (int, float)) \
                or not math.isfinite(request.arrival) or request.arrival < 0:
            raise ValueError(f"{who}: arrival must be a finite time >= 0, got "
                             f"{request.arrival!r}")

    def submit(self, request: Request, now: float | None = None) -> RequestResult:
        """Queue ``request`` (checked first: a bad one raises and leaves the engine as it was)."""
        self.check(request)
        prompt = [int(t) for t in (request.prompt.tolist() if isinstance(request.prompt, torch.Tensor)
                                   else request.prompt)]
        rid = self._submitted if request.request_id is None else request.request_id
        if any(s.result.request_id == rid for s in (*self.waiting, *self.running)):
            raise ValueError(f"request id {rid!r} is already waiting or running; give each request its own id")
        request = dataclasses.replace(request, prompt=prompt, request_id=rid)
        self._submitted += 1
        gen = None
        if request.sample:
            gen = torch.Generator(device=self.model.embed.weight.device).manual_seed(request.seed)
        result = RequestResult(rid, len(prompt), arrival=float(request.arrival if now is None else now))
        self.waiting.append(_Seq(request, result, gen))
        return result

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # --- one step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, clock: Callable[[], float] = time.perf_counter) -> list[RequestResult]:
        """Admit, prefill, decode once, free; returns the requests that finished in this step.
        ``clock()`` stamps each new token (the run's clock)."""
        self.steps += 1
        m = self.manager
        decoding = list(self.running)                       # every running request has tokens to go
        preempted = self._make_room(decoding)
        reserve = sum(m.blocks_to_append(s.result.request_id, 1) for s in decoding)
        new: list[_Seq] = []
        while self.waiting and not preempted and (self.max_running is None
                                                  or len(decoding) + len(new) < self.max_running):
            seq = self.waiting[0]
            if m.blocks_for(len(seq.tokens)) > m.num_free - reserve:
                break                                       # first come, first served: the rest wait too
            self.waiting.popleft()
            m.allocate(seq.result.request_id, len(seq.tokens))
            new.append(seq)
        for seq in new:
            self._emit([seq], self._prefill(seq), clock)
        if decoding:
            self._emit(decoding, self._decode(decoding), clock)
        self.log.append((len(decoding), sum(m.seq_len(s.result.request_id) for s in decoding),
                         [m.seq_len(s.result.request_id) for s in new]))
        self.running = decoding + new
        self.max_seen = max(self.max_seen, len(self.running))
        done = [s for s in self.running if s.done]
        for s in done:
            m.free(s.result.request_id)
            self.running.remove(s)
            self.finished.append(s.result)
        return [s.result for s in done]

    def _make_room(self, decoding: list[_Seq]) -> bool:
        """Preempt the newest running requests until every one left can grow by a token; whether any was."""
        m, preempted = self.manager, False
        while decoding and sum(m.blocks_to_append(s.result.request_id, 1) for s in decoding) > m.num_free:
            victim = decoding.pop()                       # the newest: admitted last
            m.free(victim.result.request_id)
            victim.result.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(victim)               # first in line; recomputed when it is admitted again
            preempted = True
        return preempted

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor, clock: Callable[[], float]) -> None:
        greedy = logits.argmax(-1).tolist()
        now = clock()
        for b, s in enumerate(seqs):
            r = s.request
            tok = greedy[b] if not r.sample else int(TransformerLM._next_token(
                logits[b:b + 1], True, r.temperature, r.top_k, s.generator)[0])
            s.result.tokens.append(tok)
            s.result.token_times.append(now)

    # --- the model's computation, layer by layer -------------------------------------------------
    def _prefill(self, seq: _Seq) -> torch.Tensor:
        """The whole sequence (prompt, and generated tokens after a preemption) at once: every
        token's cache row written, attention over the sequence itself in the expanded form."""
        model, sid = self.model, seq.result.request_id
        idx = torch.tensor([seq.tokens], dtype=torch.long, device=model.embed.weight.device)     # (1, L)
        L = idx.shape[1]
        positions = torch.arange(L, device=idx.device)
        slots = self.manager.slots(sid, 0, L)[None]                                             # (1, L)
        x = model.embed(idx)                                                                    # (1, L, d_model)
        for i, block in enumerate(model.blocks):
            attn, h = block.attn, block.attn_norm(x)
            if isinstance(attn, MultiHeadLatentAttention):
                q_C, q_R, latent = attn.project(h, positions)                                  # latent (1, 1, L, w)
                self.cache.write(i, slots, latent[:, 0])
                k, v = attn.expand(latent)                                                      # (1, n_h, L, ...)
                a = attn.output(attention(torch.cat([q_C, q_R], dim=-1), k, v, attn.scale))
            else:
                q, k, v = attn.project(h, positions)                                           # (1, n, L, d_h)
                self.cache.write(i, slots, k.transpose(1, 2), v.transpose(1, 2))
                a = attn.output(attention(q, k, v, attn.scale))
            x = x + a
            x = x + block.mlp(block.mlp_norm(x))
        return model.lm_head(model.norm(x[:, -1:])).float()[:, -1]                             # (1, vocab)

    def _decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """One batched decode step: each sequence's newest token -> next-token logits (B, vocab)."""
        model, m = self.model, self.manager
        ids = [s.result.request_id for s in seqs]
        for sid in ids:
            m.append(sid, 1)
        device = model.embed.weight.device
        idx = torch.tensor([[s.result.tokens[-1]] for s in seqs], dtype=torch.long, device=device)  # (B, 1)
        positions = m.last_positions(ids, 1).to(device)                                        # (B, 1)
        slots = m.last_slots(ids, 1)                                                           # (B, 1)
        x = model.embed(idx)                                                                   # (B, 1, d_model)
        for i, block in enumerate(model.blocks):
            attn, h = block.attn, block.attn_norm(x)
            if isinstance(attn, MultiHeadLatentAttention):
                q_C, q_R, latent = attn.project(h, positions)                                 # (B, n_h, 1, ...)
                self.cache.write(i, slots, latent[:, 0])
                q_lat = attn.absorb_query(q_C)                                                 # (B, n_h, 1, d_c)
                o_lat, _ = self.cache.attend(i, q_lat.transpose(1, 2), q_R.transpose(1, 2), ids, attn.scale,
                                             return_lse=False)                                 # (B, 1, n_h, d_c)
                a = attn.absorbed_output(o_lat.transpose(1, 2))
            else:
                assert isinstance(attn, MultiHeadAttention)
                q, k, v = attn.project(h, positions)                                          # (B, n, 1, d_h)
                self.cache.write(i, slots, k.transpose(1, 2), v.transpose(1, 2))
                out = self.cache.attend(i, q.transpose(1, 2), ids, attn.scale)                # (B, 1, n_h, d_h)
                a = attn.output(out.transpose(1, 2))
            x = x + a
            x = x + block.mlp(block.mlp_norm(x))
        return model.lm_head(model.norm(x)).float()[:, -1]                                    # (B, vocab)

    # --- a whole trace -------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], progress: bool = False,
            timer: Callable[[], float] = time.perf_counter) -> ServeReport:
        """Serve ``requests`` as they arrive (``Request.arrival``, seconds) and return the report.

        The run's clock advances by the measured time of each step, and jumps over the gaps when
        nothing is running and the next request has not arrived yet (so a run takes only its busy
        time). A request that fails :meth:`check` is reported rejected, with the reason, and the
        others are served."""
        if not self.idle:
            raise RuntimeError("Engine.run needs an idle engine (nothing waiting or running); make a new Engine")
        order = sorted(range(len(requests)), key=lambda i: (getattr(requests[i], "arrival", 0.0)
                                                            if isinstance(requests[i], Request) else 0.0, i))
        pending = deque(order)
        results: dict[int, RequestResult] = {}
        clock_now, busy = 0.0, 0.0
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(requests), desc=f"serving ({self.model.config.label})", unit="req", leave=False)
        start_steps = self.steps
        while pending or not self.idle:
            while pending and (self.idle or _arrival(requests[pending[0]]) <= clock_now):
                i = pending.popleft()
                req = requests[i]
                if self.idle and isinstance(req, Request) and _arrival(req) > clock_now:
                    clock_now = _arrival(req)           # nothing to do until it arrives
                rid = i if not isinstance(req, Request) or req.request_id is None else req.request_id
                try:
                    if isinstance(req, Request) and req.request_id is None:
                        req = dataclasses.replace(req, request_id=rid)
                    results[i] = self.submit(req, now=_arrival(req))
                except (ValueError, TypeError) as err:
                    results[i] = RequestResult(rid, len(getattr(req, "prompt", []) or []),
                                               arrival=_arrival(req), rejected=str(err))
                    if bar is not None:
                        bar.update(1)
            if self.idle:
                continue
            t0 = timer()
            step_clock = lambda: clock_now + (timer() - t0)  # noqa: E731
            finished = self.step(step_clock)
            dt = timer() - t0
            clock_now += dt
            busy += dt
            if bar is not None:
                bar.update(len(finished))
        if bar is not None:
            bar.close()
        return ServeReport([results[i] for i in range(len(requests))], clock_now, busy, self.steps - start_steps,
                           self.max_seen, self.preemptions, self.manager.num_free, self.manager.num_blocks)


def _arrival(req: Any) -> float:
    a = getattr(req, "arrival", 0.0)
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) else 0.0


if __name__ == "__main__":
    from .serve_bench import main

    main()
