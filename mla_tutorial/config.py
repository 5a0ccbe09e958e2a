"""Model configurations: DeepSeek MLA (:class:`MLAConfig`) and standard attention (:class:`AttentionConfig`).

Field names follow Hugging Face's ``DeepseekV3Config`` so a real ``config.json`` maps onto
:class:`MLAConfig` one to one. The book's chapters use the DeepSeek-V2 paper's symbols; each
field below says which symbol it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .checks import check_bool, check_positive_int, check_real

__all__ = ["MLAConfig", "AttentionConfig", "ATTENTION_PRESETS", "yarn_get_mscale", "check_rope_theta", "check_yarn"]


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    check_real("yarn_get_mscale", "scale", scale, above=0)
    check_real("yarn_get_mscale", "mscale", mscale)
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}
_YARN_EXAMPLE = "{'rope_type': 'yarn', 'factor': 40, 'original_max_position_embeddings': 4096}"


def check_rope_theta(owner: str, theta: Any) -> float:
    """RoPE's base ``theta`` in ``theta ** (-2i / d)``: a finite number above 1 (10000 in DeepSeek)."""
    return check_real(owner, "rope_theta", theta, above=1,
                      hint="the base of RoPE's frequencies theta**(-2i/d); DeepSeek uses 10000")


def check_yarn(owner: str, rope_scaling: Any) -> dict[str, Any]:
    """Check a YaRN ``rope_scaling`` dict (types, ranges, the keys it needs); return a copy.

    ``factor`` >= 1 and finite; ``original_max_position_embeddings`` a positive int;
    ``beta_fast`` >= ``beta_slow`` > 0 (rotations: the fast end of the ramp has more);
    ``mscale`` and ``mscale_all_dim`` >= 0 (0 or absent: not used); ``attention_factor`` > 0;
    ``truncate`` a bool.
    """
    label = f"{owner}.rope_scaling"
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"{label} must be None or a dict such as {_YARN_EXAMPLE}, "
                        f"got {type(rope_scaling).__name__} ({rope_scaling!r})")
    yarn = dict(rope_scaling)
    kinds = {yarn[k] for k in ("rope_type", "type") if k in yarn}
    if kinds != {"yarn"}:
        raise ValueError(f"{label} supports only YaRN ({_YARN_EXAMPLE}) or None, got type "
                         f"{' and '.join(map(repr, sorted(kinds, key=str))) or 'missing'}")
    unknown = set(yarn) - _YARN_KEYS
    if unknown:
        raise ValueError(f"{label} has unknown keys {sorted(unknown)}; valid keys: {sorted(_YARN_KEYS)}")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in yarn:
            raise ValueError(f"{label} (YaRN) needs {key!r}, e.g. {_YARN_EXAMPLE}")
    check_real(label, "['factor']", yarn["factor"], at_least=1,
               hint="how many times the original context is extended")
    check_positive_int(label, "['original_max_position_embeddings']", yarn["original_max_position_embeddings"])
    betas = {}
    for key in ("beta_fast", "beta_slow"):
        if yarn.get(key) is not None:
            betas[key] = check_real(label, f"[{key!r}]", yarn[key], above=0,
                                    hint="a number of rotations within the original context")
    fast, slow = betas.get("beta_fast", 32), betas.get("beta_slow", 1)
    if fast < slow:
        raise ValueError(f"{label}: beta_fast ({fast}) must be >= beta_slow ({slow}): the ramp runs from "
                         f"pairs that turn beta_fast times in the original context to those that turn "
                         f"beta_slow times (DeepSeek: 32 and 1); swap them")
    for key in ("mscale", "mscale_all_dim"):
        if yarn.get(key) is not None:
            check_real(label, f"[{key!r}]", yarn[key], at_least=0, hint="0 turns it off")
    if yarn.get("attention_factor") is not None:
        check_real(label, "['attention_factor']", yarn["attention_factor"], above=0)
    if "truncate" in yarn:
        check_bool(label, "['truncate']", yarn["truncate"])
    return yarn


def check_rope_frequencies(owner: str, frequencies: Any, rope_dim: int) -> tuple[float, ...]:
    """``rope_dim / 2`` angular frequencies, each a finite number >= 0 (0: a pair that never turns);
    returned as a tuple of floats."""
    label = f"{owner}.rope_frequencies"
    if isinstance(frequencies, (str, bytes, Mapping)) or not hasattr(frequencies, "__len__"):
        raise TypeError(f"{label} must be None or a sequence of {rope_dim // 2} numbers (one per RoPE pair), "
                        f"got {type(frequencies).__name__}")
    if len(frequencies) != rope_dim // 2:
        raise ValueError(f"{label} has {len(frequencies)} frequencies; qk_rope_head_dim = {rope_dim} rotates "
                         f"{rope_dim // 2} pairs, one frequency each")
    return tuple(float(check_real(owner, f"rope_frequencies[{i}]", f, at_least=0,
                                  hint="radians per position; 0 is a pair that never turns"))
                 for i, f in enumerate(frequencies))


@dataclass
class MLAConfig:
    """Configuration of one DeepSeek Multi-Head Latent Attention layer (and the model around it).

    =========================  ==========  ==========================================================
    field (HF name)            paper       meaning
    =========================  ==========  ==========================================================
    ``hidden_size``            d_model     width of the residual stream
    ``num_attention_heads``    n_h         query heads
    ``q_lora_rank``            d_c_q       query latent width (``None``: queries projected directly)
    ``kv_lora_rank``           d_c         the cached key/value latent c_KV
    ``qk_nope_head_dim``       d_h         per-head query/key width without position
    ``qk_rope_head_dim``       d_h_R       decoupled RoPE width (one shared, cached key k_R)
    ``v_head_dim``             d_v         per-head value width
    ``kv_norm``                            RMSNorm on c_KV (DeepSeek: on; a converted layer: off)
    ``rope_frequencies``                   angular frequency of each RoPE pair (``None``: theta's)
    =========================  ==========  ==========================================================

    ``rope_frequencies`` (``qk_rope_head_dim / 2`` numbers >= 0) replaces RoPE's
    ``theta ** (-2i / d_h_R)``: a layer converted from MHA or GQA keeps, in its decoupled RoPE part,
    the frequency pairs of the original heads (:mod:`mla_tutorial.convert`).
    """

    hidden_size: int = 7168
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_hidden_layers: int = 61
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    kv_norm: bool = True
    rope_frequencies: tuple[float, ...] | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        # Assigning a field re-runs every check; a value that fails them leaves the config as it was.
        if not self.__dict__.get("_validated") or name not in _MLA_FIELDS:
            object.__setattr__(self, name, value)
            return
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except (TypeError, ValueError):
            object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:
        """Check every field (run at construction and on every assignment; call it after editing
        ``rope_scaling`` in place). Raises ``TypeError`` or ``ValueError`` naming the field."""
        owner = type(self).__name__
        for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "num_hidden_layers", "max_position_embeddings"):
            check_positive_int(owner, name, getattr(self, name))
        if self.q_lora_rank is not None:
            check_positive_int(owner, "q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{owner}.qk_rope_head_dim must be even (RoPE rotates pairs of dimensions), "
                             f"got {self.qk_rope_head_dim}")
        check_rope_theta(owner, self.rope_theta)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", check_yarn(owner, self.rope_scaling))
        check_bool(owner, "rope_interleave", self.rope_interleave)
        check_bool(owner, "kv_norm", self.kv_norm)
        if self.rope_frequencies is not None:
            object.__setattr__(self, "rope_frequencies", check_rope_frequencies(
                owner, self.rope_frequencies, self.qk_rope_head_dim))
            if self.rope_scaling is not None:
                raise ValueError(f"{owner}: give rope_frequencies or rope_scaling (YaRN), not both; YaRN "
                                 f"rescales theta's frequencies, rope_frequencies sets them outright")
        check_real(owner, "rms_norm_eps", self.rms_norm_eps, above=0,
                   hint="added to the mean square before the square root; DeepSeek uses 1e-6")
        if not isinstance(self.name, str):
            raise TypeError(f"{owner}.name must be a str, got {type(self.name).__name__}")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width seen by the softmax: d_h + d_h_R (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_cache_dim(self) -> int:
        """Elements cached per token per layer by MLA: d_c + d_h_R (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale squared when YaRN is on (0.1352 for V3).

        DeepSeek multiplies the scale by ``yarn_get_mscale(factor, mscale_all_dim) ** 2``: the
        attention-temperature correction YaRN asks for, applied to queries and keys alike.
        """
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                scale *= yarn_get_mscale(self.rope_scaling["factor"], mscale_all_dim) ** 2
        return scale

    def replace(self, **changes: Any) -> "MLAConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- presets (values from the models' published config.json) --------------------------
    @classmethod
    def deepseek_v3(cls) -> "MLAConfig":
        """DeepSeek-V3 / R1 (671B): 61 layers, 128 heads, c_KV 512 + k_R 64, YaRN x40."""
        return cls(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=61,
                   rope_theta=10000.0, max_position_embeddings=163840,
                   rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                   name="DeepSeek-V3")

    @classmethod
    def deepseek_v2(cls) -> "MLAConfig":
        """DeepSeek-V2 (236B): 60 layers, 128 heads, hidden 5120, c_KV 512 + k_R 64, YaRN x40."""
        return cls(hidden_size=5120, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=60,
                   rope_theta=10000.0, max_position_embeddings=163840,
                   rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                 "mscale_all_dim": 0.707},
                   name="DeepSeek-V2")

    @classmethod
    def deepseek_v2_lite(cls) -> "MLAConfig":
        """DeepSeek-V2-Lite (16B): 27 layers, 16 heads, no query compression, c_KV 512 + k_R 64."""
        return cls(hidden_size=2048, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=27,
                   rope_theta=10000.0, max_position_embeddings=163840,
                   rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                 "mscale_all_dim": 0.707},
                   name="DeepSeek-V2-Lite")

    @classmethod
    def kimi_k2(cls) -> "MLAConfig":
        """Kimi K2: DeepSeek-V3's MLA with 64 heads, rope_theta 50000, YaRN x32."""
        return cls(hidden_size=7168, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=61,
                   rope_theta=50000.0, max_position_embeddings=131072,
                   rope_scaling={"type": "yarn", "factor": 32, "original_max_position_embeddings": 4096,
                                 "beta_fast": 1, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                   name="Kimi-K2")

    @classmethod
    def tiny(cls) -> "MLAConfig":
        """A CPU-fast toy with every MLA feature on (query compression, YaRN, interleaved RoPE)."""
        return cls(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_hidden_layers=2,
                   rope_theta=10000.0, max_position_embeddings=512,
                   rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                   name="tiny")


_MLA_FIELDS = frozenset(f.name for f in dataclasses.fields(MLAConfig))


@dataclass(frozen=True)
class AttentionConfig:
    """A standard (MHA / GQA / MQA) attention model, for cache comparisons.

    ``num_key_value_heads == num_attention_heads`` is MHA, ``1`` is MQA, anything between is GQA.
    """

    name: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    rope_theta: float | None = 10000.0

    def __post_init__(self) -> None:
        owner = f"AttentionConfig({self.name!r})"
        if not isinstance(self.name, str):
            raise TypeError(f"AttentionConfig.name must be a str, got {type(self.name).__name__} ({self.name!r})")
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_hidden_layers"):
            check_positive_int(owner, name, getattr(self, name))
        if self.rope_theta is not None:
            check_rope_theta(owner, self.rope_theta)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{owner}: num_attention_heads ({self.num_attention_heads}) must be divisible "
                             f"by num_key_value_heads ({self.num_key_value_heads})")

    @property
    def kind(self) -> str:
        """"MHA", "MQA" or "GQA-<groups>"."""
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        if self.num_key_value_heads == 1:
            return "MQA"
        return f"GQA-{self.num_key_value_heads}"

    @classmethod
    def from_mla(cls, config: MLAConfig, num_key_value_heads: int | None = None,
                 head_dim: int | None = None) -> "AttentionConfig":
        """The standard-attention model with an MLA config's heads: "V3 as if it were MHA".

        ``head_dim`` defaults to ``v_head_dim`` (128 for V3), the comparison the 57x figure makes.
        """
        kv = config.num_attention_heads if num_key_value_heads is None else num_key_value_heads
        d = config.v_head_dim if head_dim is None else head_dim
        tag = "MHA" if kv == config.num_attention_heads else ("MQA" if kv == 1 else f"GQA-{kv}")
        return cls(f"{config.name} as {tag}", config.hidden_size, config.num_attention_heads, kv, d,
                   config.num_hidden_layers, config.rope_theta)


#: Published attention shapes of well-known models (from their config.json files).
ATTENTION_PRESETS: dict[str, AttentionConfig] = {
    c.name: c
    for c in [
        AttentionConfig("GPT-2 small", 768, 12, 12, 64, 12, None),
        AttentionConfig("Llama-3-8B", 4096, 32, 8, 128, 32, 500000.0),
        AttentionConfig("Llama-3-70B", 8192, 64, 8, 128, 80, 500000.0),
        AttentionConfig("Llama-3.1-405B", 16384, 128, 8, 128, 126, 500000.0),
        AttentionConfig("Qwen2.5-72B", 8192, 64, 8, 128, 80, 1000000.0),
        AttentionConfig("DeepSeek-67B", 8192, 64, 8, 128, 95, 10000.0),
    ]
}
