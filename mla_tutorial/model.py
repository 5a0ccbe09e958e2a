"""A small decoder-only language model in DeepSeek-V3's shape, with the attention chosen by config.

    embed -> [RMSNorm -> attention -> + -> RMSNorm -> SwiGLU MLP -> +] x n_layers -> RMSNorm -> lm_head

The attention of every block is one of the package's own modules, not a second implementation:
``"mha"``, ``"gqa"`` and ``"mqa"`` are :class:`~mla_tutorial.MultiHeadAttention` (RoPE on every
head, half-split), ``"mla"`` is :class:`~mla_tutorial.MultiHeadLatentAttention` (decoupled RoPE,
any of its three cache modes). Each block keeps its own :class:`~mla_tutorial.KVCache`;
:meth:`TransformerLM.new_caches` makes one per layer and :meth:`TransformerLM.generate` decodes a
batch of prompts of different lengths (left-padded, with a key mask).

Defined in chapter 09; trained in chapters 09 and 10 (:mod:`mla_tutorial.train`).

>>> cfg = LMConfig(attention="gqa", n_kv_heads=2)
>>> model = TransformerLM(cfg)
>>> model.cache_bytes_per_token(torch.bfloat16)     # 2 layers x 2 (K, V) x 2 heads x 16 x 2 B
256
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import bytes_per_element, kv_cache_elements
from .attention import MultiHeadAttention
from .cache import KVCache
from .config import AttentionConfig, MLAConfig
from .mla import MLA_MODES, MultiHeadLatentAttention, RMSNorm

__all__ = ["ATTENTION_KINDS", "LMConfig", "SwiGLU", "Block", "TransformerLM"]

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")


def _positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LMConfig:
    """Configuration of a :class:`TransformerLM`.

    ==================  ===========  ===============================================================
    field               paper        meaning
    ==================  ===========  ===============================================================
    ``vocab_size``                   token ids are ``0 .. vocab_size - 1`` (256: bytes)
    ``d_model``         d_model      width of the residual stream (``hidden_size``)
    ``n_layers``        l            blocks (``num_hidden_layers``)
    ``n_heads``         n_h          query heads (``num_attention_heads``)
    ``attention``                    ``"mha"``, ``"gqa"``, ``"mqa"`` or ``"mla"``
    ``n_kv_heads``      n_g          key/value heads of GQA (the number of groups); MHA: n_h, MQA: 1
    ``head_dim``        d_h          MHA/GQA/MQA head width (default ``d_model // n_heads``)
    ``kv_lora_rank``    d_c          MLA: the cached latent c_KV
    ``q_lora_rank``     d_c_q        MLA: query latent (``None``: queries straight from h)
    ``qk_nope_head_dim``  d_h        MLA: per-head query/key width without position
    ``qk_rope_head_dim``  d_h_R      MLA: decoupled RoPE width (one shared, cached key k_R)
    ``v_head_dim``      d_v          MLA: per-head value width
    ``mla_mode``                     MLA: default cache mode (``"expanded"``, ``"latent"``, ``"absorbed"``)
    ``kv_norm``                      MLA: RMSNorm on c_KV (off in a model converted from MHA/GQA)
    ``rope_frequencies``             MLA: per layer, the frequency of each RoPE pair (``None``: theta's)
    ``d_ff``                         SwiGLU hidden width (``intermediate_size``)
    ``max_seq_len``                  context: the longest sequence the model may see
    ==================  ===========  ===============================================================
    """

    vocab_size: int = 256
    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 6
    attention: str = "mha"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    kv_lora_rank: int = 64
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    mla_mode: str = "absorbed"
    d_ff: int = 256
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    kv_norm: bool = True
    rope_frequencies: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        owner = "LMConfig"
        self._check_conversion_fields(owner)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{owner}.attention: unknown attention kind {self.attention!r}; "
                             f"choose one of {ATTENTION_KINDS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "head_dim", self.head_dim, allow_none=True)
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive_int(owner, name, getattr(self, name))
            _positive_int(owner, "q_lora_rank", self.q_lora_rank, allow_none=True)
            if self.mla_mode not in MLA_MODES:
                raise ValueError(f"{owner}.mla_mode: unknown MLA mode {self.mla_mode!r}; choose one of {MLA_MODES}")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"{owner}.qk_rope_head_dim must be even (RoPE rotates pairs), got "
                                 f"{self.qk_rope_head_dim}")
            if self.n_kv_heads is not None:
                raise ValueError(f"{owner}.n_kv_heads applies to MHA/GQA/MQA; MLA caches a latent of width "
                                 f"kv_lora_rank + qk_rope_head_dim instead (leave n_kv_heads unset)")
            return
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"{owner}: d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                             f"set head_dim explicitly")
        if self.attention == "gqa":
            if self.n_kv_heads is None:
                raise ValueError(f"{owner}: attention='gqa' needs n_kv_heads (the number of key/value groups)")
            _positive_int(owner, "n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                divisors = [g for g in range(1, self.n_heads + 1) if self.n_heads % g == 0]
                raise ValueError(f"{owner}: GQA groups must divide the heads: n_heads ({self.n_heads}) is not "
                                 f"divisible by n_kv_heads ({self.n_kv_heads}); choose one of {divisors}")
        elif self.n_kv_heads is not None and self.n_kv_heads != self.kv_heads:
            raise ValueError(f"{owner}: attention={self.attention!r} has {self.kv_heads} key/value heads, got "
                             f"n_kv_heads={self.n_kv_heads}; use attention='gqa' for other group counts")
        if (self.head_dim or self.d_model // self.n_heads) % 2:
            raise ValueError(f"{owner}: RoPE needs an even head_dim, got {self.head_dim or self.d_model // self.n_heads}")

    def _check_conversion_fields(self, owner: str) -> None:
        """``kv_norm`` and ``rope_frequencies``: MLA only (set by :mod:`mla_tutorial.convert`)."""
        if not isinstance(self.kv_norm, bool):
            raise TypeError(f"{owner}.kv_norm must be True or False, got {self.kv_norm!r}")
        if self.attention != "mla":
            if not self.kv_norm or self.rope_frequencies is not None:
                raise ValueError(f"{owner}: kv_norm and rope_frequencies apply to attention='mla' only")
            return
        if self.rope_frequencies is None:
            return
        from .config import check_rope_frequencies
        freqs = self.rope_frequencies
        if isinstance(freqs, (str, bytes)) or not hasattr(freqs, "__len__") or len(freqs) != self.n_layers:
            raise ValueError(f"{owner}.rope_frequencies must hold one sequence of qk_rope_head_dim / 2 frequencies "
                             f"per layer ({self.n_layers} layers), got {type(freqs).__name__}"
                             f"{f' of length {len(freqs)}' if hasattr(freqs, '__len__') else ''}")
        object.__setattr__(self, "rope_frequencies", tuple(
            check_rope_frequencies(f"{owner}[layer {i}]", f, self.qk_rope_head_dim) for i, f in enumerate(freqs)))

    # --- derived sizes --------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads of MHA/GQA/MQA (n_h, n_kv_heads, 1)."""
        if self.attention == "mla":
            raise ValueError("MLA has no key/value heads: it caches a latent (see attention_config())")
        return {"mha": self.n_heads, "mqa": 1}.get(self.attention, self.n_kv_heads)

    @property
    def d_h(self) -> int:
        """Per-head width: head_dim for MHA/GQA/MQA, qk_nope_head_dim for MLA."""
        if self.attention == "mla":
            return self.qk_nope_head_dim
        return self.head_dim or self.d_model // self.n_heads

    @property
    def label(self) -> str:
        """A short name: ``"MHA"``, ``"GQA-2"``, ``"MQA"``, ``"MLA d_c=64"``."""
        if self.attention == "mla":
            return f"MLA d_c={self.kv_lora_rank}"
        kv = self.kv_heads
        return "MHA" if kv == self.n_heads else ("MQA" if kv == 1 else f"GQA-{kv}")

    def attention_config(self, layer: int = 0) -> AttentionConfig | MLAConfig:
        """The package's config of one attention layer (for cache accounting and the MLA module);
        ``layer`` matters only for a converted MLA model, whose layers keep different RoPE pairs."""
        if self.attention == "mla":
            freqs = None if self.rope_frequencies is None else self.rope_frequencies[layer]
            return MLAConfig(hidden_size=self.d_model, num_attention_heads=self.n_heads,
                             q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                             qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                             v_head_dim=self.v_head_dim, num_hidden_layers=self.n_layers,
                             rope_theta=self.rope_theta, max_position_embeddings=self.max_seq_len,
                             rope_scaling=None, rope_interleave=False, rms_norm_eps=self.rms_norm_eps,
                             kv_norm=self.kv_norm, rope_frequencies=freqs, name=self.label)
        return AttentionConfig(self.label, self.d_model, self.n_heads, self.kv_heads, self.d_h, self.n_layers,
                               self.rope_theta)

    def cache_elements_per_token(self, mode: str | None = None) -> int:
        """Values cached per token over all layers: ``2 n_kv d_h l`` or ``(d_c + d_h_R) l`` (MLA's
        latent and absorbed modes; ``mode="expanded"`` gives the per-head K/V of the naive path)."""
        self._check_mode(mode)
        return kv_cache_elements(self.attention_config(), mode if self.attention == "mla" else None) * self.n_layers

    def _check_mode(self, mode: str | None) -> None:
        if mode is None:
            return
        if self.attention != "mla":
            raise ValueError(f"cache modes apply to MLA only; this model's attention is {self.label} "
                             f"(leave mode unset)")
        if mode not in MLA_MODES:
            raise ValueError(f"unknown MLA mode {mode!r}; choose one of {MLA_MODES}")

    def replace(self, **changes: Any) -> "LMConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``kv_norm`` and ``rope_frequencies`` appear only when a conversion set them,
        so the configs of the recorded runs (which predate them) compare equal."""
        d = dataclasses.asdict(self)
        if d["kv_norm"]:
            del d["kv_norm"]
        if d["rope_frequencies"] is None:
            del d["rope_frequencies"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"LMConfig has no fields {sorted(unknown)}")
        return cls(**d)


class SwiGLU(nn.Module):
    """DeepSeek's (and Llama's) MLP: ``W_down(silu(W_gate x) * W_up x)``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.W_gate = nn.Linear(d_model, d_ff, bias=False)   # gate_proj
        self.W_up = nn.Linear(d_model, d_ff, bias=False)     # up_proj
        self.W_down = nn.Linear(d_ff, d_model, bias=False)   # down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_down(F.silu(self.W_gate(x)) * self.W_up(x))


class Block(nn.Module):
    """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. ``block.attn`` is the
    package's :class:`MultiHeadAttention` or :class:`MultiHeadLatentAttention`."""

    def __init__(self, config: LMConfig, layer: int = 0):
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)        # input_layernorm
        if c.attention == "mla":
            self.attn: nn.Module = MultiHeadLatentAttention(c.attention_config(layer), mode=c.mla_mode)
        else:
            self.attn = MultiHeadAttention(c.d_model, c.n_heads, c.kv_heads, c.d_h, rope_theta=c.rope_theta)
        self.mlp_norm = RMSNorm(c.d_model, c.rms_norm_eps)         # post_attention_layernorm
        self.mlp = SwiGLU(c.d_model, c.d_ff)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        if isinstance(self.attn, MultiHeadLatentAttention) and torch.is_autocast_enabled(x.device.type):
            # Under autocast the MLA layer's RMSNorm'd c_KV stays fp32 while its other projections
            # come out in bf16/fp16, and attention() refuses keys and queries of different dtypes;
            # so MLA's attention runs in fp32 (the rest of the block stays under autocast).
            with torch.autocast(x.device.type, enabled=False):
                a = self.attn(h.float(), cache=cache, key_mask=key_mask)
        else:
            a = self.attn(h, cache=cache, key_mask=key_mask)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """A decoder-only language model whose attention is MHA, GQA, MQA or MLA (see :class:`LMConfig`).

    ``model(idx)`` maps token ids (B, T) to next-token logits (B, T, vocab_size). With
    ``caches=model.new_caches(...)``, the T tokens follow the ones already cached (prefill, then
    one token at a time). ``model.blocks[i].attn`` is layer i's attention module.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"TransformerLM needs an LMConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)          # embed_tokens
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight: a matrix that reads ``n`` numbers (its last dimension: the input
        of an ``nn.Linear``, d_c for W_UK and W_UV) gets N(0, 1/n), so each output starts with unit
        variance; the two projections that write into the residual stream (attention's W_O, the
        MLP's W_down) are scaled down by 1/sqrt(2 n_layers), so the stream does not grow with
        depth (GPT-2's rule); embeddings N(0, 1); norm gains 1. Small models learn attention
        patterns far sooner from this than from GPT-2's fixed std of 0.02, which suits d_model = 768."""
        residual_out = ("W_O.weight", "W_down.weight")
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif p is self.embed.weight:
                nn.init.normal_(p, std=1.0)
            else:
                std = p.shape[-1] ** -0.5
                if name.endswith(residual_out):
                    std /= math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(p, std=std)

    # --- sizes -------------------------------------------------------------------------------
    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameters; ``embeddings=False`` leaves out the token embedding and the output head."""
        skip = set() if embeddings else {id(self.embed.weight), id(self.lm_head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def cache_bytes_per_token(self, dtype: torch.dtype | float | None = None, mode: str | None = None) -> int:
        """Bytes one token occupies in the caches of all layers (default dtype: the model's)."""
        dtype = self.embed.weight.dtype if dtype is None else dtype
        total = self.config.cache_elements_per_token(mode) * bytes_per_element(dtype)
        return int(total) if float(total).is_integer() else total

    def describe(self) -> str:
        c = self.config
        return (f"{c.label}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, d_ff {c.d_ff}; "
                f"{self.num_parameters():,} parameters; cache {c.cache_elements_per_token():,} values "
                f"= {self.cache_bytes_per_token(torch.float32):,} B per token in fp32")

    @property
    def attention_modules(self) -> list[nn.Module]:
        """Each block's attention module, layer by layer."""
        return [b.attn for b in self.blocks]

    # --- caches and the forward pass ------------------------------------------------------------
    def new_caches(self, batch_size: int, max_len: int | None = None, mode: str | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[KVCache]:
        """One empty :class:`KVCache` per layer for ``batch_size`` sequences of up to ``max_len``
        tokens (default: the context). ``mode`` picks MLA's cache mode (default ``config.mla_mode``)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        _positive_int("new_caches", "max_len", max_len)
        if max_len > self.config.max_seq_len:
            raise ValueError(f"new_caches: max_len {max_len} exceeds the model's context "
                             f"(max_seq_len={self.config.max_seq_len})")
        self.config._check_mode(mode)
        kwargs = {"dtype": dtype, "device": device}
        if self.config.attention == "mla":
            kwargs["mode"] = mode or self.config.mla_mode
        return [b.attn.new_cache(batch_size, max_len, **kwargs) for b in self.blocks]

    def forward(self, idx: torch.Tensor, caches: Sequence[KVCache] | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size), in fp32.

        ``caches``: one per layer (from :meth:`new_caches`); the T tokens follow the cached ones.
        ``key_mask``: (B, S) bool, S = cached + new tokens, True where a key is a real token (False
        for left padding); ``None``: every key is real."""
        self._check_idx(idx)
        T = idx.shape[1]
        start = 0
        if caches is not None:
            if len(caches) != len(self.blocks):
                raise ValueError(f"expected {len(self.blocks)} caches (one per layer), got {len(caches)}; "
                                 f"use model.new_caches()")
            start = caches[0].length
        if start + T > self.config.max_seq_len:
            raise ValueError(f"{start + T} tokens exceed the model's context (max_seq_len="
                             f"{self.config.max_seq_len})")
        if key_mask is not None and tuple(key_mask.shape) != (idx.shape[0], start + T):
            raise ValueError(f"key_mask must be (batch, cached + new tokens) = {(idx.shape[0], start + T)}, "
                             f"got {tuple(key_mask.shape)}")
        x = self.embed(idx)                                                   # (B, T, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], key_mask)
        return self.lm_head(self.norm(x)).float()                             # (B, T, vocab)

    def _check_idx(self, idx: torch.Tensor) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TransformerLM expects token ids as an int64 tensor (B, T), got "
                            f"{type(idx).__name__}{'' if not isinstance(idx, torch.Tensor) else ' of ' + str(idx.dtype)}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"TransformerLM expects token ids of shape (batch, tokens) with at least one token, "
                             f"got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next-token logits against ``targets`` (B, T); -100 is ignored."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    # --- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path, map_location: str | torch.device = "cpu") -> "TransformerLM":
        """A model rebuilt from a checkpoint written by :func:`mla_tutorial.train.save_checkpoint`."""
        from .train import load_checkpoint
        ckpt = load_checkpoint(path, map_location=map_location)
        model = cls(LMConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *,
                 sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 stop_token: int | None = None, mode: str | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens of each.

        Args:
            prompts: token-id lists (of any lengths) or a (B, T) tensor.
            sample: ``False``: greedy (argmax); ``True``: sample from softmax(logits / temperature),
                over the ``top_k`` most likely tokens if given.
            stop_token: a sequence ends after it emits this token (kept in its output); generation
                stops when every sequence has ended or has ``max_new_tokens`` new tokens.
            mode: MLA's cache mode (default ``config.mla_mode``); not for MHA/GQA/MQA.
            use_cache: ``False`` recomputes the whole sequence at every step (a reference).
            generator: the random generator for sampling, on the model's device (seed it for
                reproducible samples).

        Prompts of different lengths are left-padded to the longest and a key mask hides the
        padding; RoPE depends only on the distance between a query and a key, so shifting a
        prompt to the right changes nothing it computes.
        """
        rows = self._check_generate_args(prompts, max_new_tokens, sample, temperature, top_k, stop_token, mode)
        device = self.embed.weight.device
        B, lengths = len(rows), [len(r) for r in rows]
        P = max(lengths)
        total = P + max_new_tokens
        tokens = torch.zeros(B, total, dtype=torch.long, device=device)             # left-padded ids
        real = torch.zeros(B, total, dtype=torch.bool, device=device)               # True: not padding
        for b, row in enumerate(rows):
            tokens[b, P - len(row):P] = torch.tensor(row, dtype=torch.long)
            real[b, P - len(row):] = True
        padded = min(lengths) < P
        caches = self.new_caches(B, total, mode=mode) if use_cache else None
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        pos = P                                                                      # next position to fill
        step_in = tokens[:, :P]
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if use_cache:
                    mask = real[:, :pos] if padded else None
                    logits = self(step_in, caches, mask)[:, -1]                      # (B, vocab)
                else:
                    logits = self(tokens[:, :pos], None, real[:, :pos] if padded else None)[:, -1]
                nxt = self._next_token(logits, sample, temperature, top_k, generator)  # (B,)
                nxt = torch.where(done, torch.zeros_like(nxt), nxt)
                tokens[:, pos] = nxt
                for b, (tok, finished) in enumerate(zip(nxt.tolist(), done.tolist())):
                    if not finished:
                        out[b].append(tok)
                if stop_token is not None:
                    done |= nxt == stop_token
                pos += 1
                if bool(done.all()):
                    break
                step_in = tokens[:, pos - 1:pos]
        finally:
            self.train(was_training)
        return out

    @staticmethod
    def _next_token(logits: torch.Tensor, sample: bool, temperature: float, top_k: int | None,
                    generator: torch.Generator | None) -> torch.Tensor:
        if not sample:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _check_generate_args(self, prompts, max_new_tokens, sample, temperature, top_k, stop_token,
                             mode) -> list[list[int]]:
        c = self.config
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"generate: a prompt tensor must be (batch, tokens), got {tuple(prompts.shape)}")
            rows = prompts.tolist()
        elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)) and prompts \
                and all(isinstance(p, Sequence) and not isinstance(p, (str, bytes)) for p in prompts):
            rows = [list(p) for p in prompts]
        else:
            raise TypeError("generate: prompts must be a list of token-id lists (one per sequence) or a "
                            "(batch, tokens) tensor; wrap a single prompt as [prompt]")
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"generate: prompt {i} is empty; give at least one token")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < c.vocab_size for t in row):
                raise ValueError(f"generate: prompt {i} has token ids outside [0, {c.vocab_size})")
            if len(row) > c.max_seq_len:
                raise ValueError(f"generate: prompt {i} has {len(row)} tokens, longer than the model's context "
                                 f"(max_seq_len={c.max_seq_len}); shorten it")
        _positive_int("generate", "max_new_tokens", max_new_tokens)
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > c.max_seq_len:
            raise ValueError(f"generate: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                             f"exceeds the context (max_seq_len={c.max_seq_len}); ask for at most "
                             f"{c.max_seq_len - longest} new tokens")
        if sample and not temperature > 0:
            raise ValueError(f"generate: sampling needs temperature > 0, got {temperature}; for greedy decoding "
                             f"use sample=False")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive int (or None for no limit), got {top_k!r}")
        if stop_token is not None and (isinstance(stop_token, bool) or not isinstance(stop_token, int)
                                       or not 0 <= stop_token < c.vocab_size):
            raise ValueError(f"generate: stop_token must be a token id in [0, {c.vocab_size}), got {stop_token!r}")
        c._check_mode(mode)
        return rows
