"""mla_tutorial: the code the MLA book builds, chapter by chapter, in one importable place.

>>> from mla_tutorial import MLAConfig, MultiHeadLatentAttention, kv_cache_elements, AttentionConfig
>>> cfg = MLAConfig.deepseek_v3()
>>> kv_cache_elements(AttentionConfig.from_mla(cfg)) / kv_cache_elements(cfg)   # 32768 / 576
56.888...
"""

from .accounting import bytes_per_element, kv_cache_bytes, kv_cache_elements
from .attention import MultiHeadAttention, attention
from .cache import KVCache
from .config import ATTENTION_PRESETS, AttentionConfig, MLAConfig, yarn_get_mscale
from .device import describe_device, pick_device, pick_dtype, synchronize
from .hf import load_hf_attention, mla_config_from_hf
from .mla import MLA_MODES, MultiHeadLatentAttention, RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_inv_freq, yarn_inv_freq
from .roofline import arithmetic_intensity, attention_bytes_per_cached_token, attention_flops_per_cached_token
from .model import LMConfig, TransformerLM
from .data import MQAR, TextCorpus
from .train import TrainConfig
from .blocks import BlockManager, OutOfBlocks
from .paged import PagedKVCache, PagedLatentCache, paged_absorbed_attention, paged_attention
from .quant import LATENT_FORMATS, latent_format

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_PRESETS", "AttentionConfig", "KVCache", "MLAConfig", "MLA_MODES", "MultiHeadAttention",
    "MultiHeadLatentAttention", "RMSNorm", "RotaryEmbedding", "apply_rope", "attention", "bytes_per_element",
    "describe_device", "kv_cache_bytes", "kv_cache_elements", "pick_device", "pick_dtype", "rope_inv_freq", "synchronize",
    "yarn_get_mscale", "yarn_inv_freq",
    "load_hf_attention", "mla_config_from_hf",
    "arithmetic_intensity", "attention_bytes_per_cached_token", "attention_flops_per_cached_token",
    "run_benchmark", "load_results", "plot_results",
    "LMConfig", "TransformerLM", "MQAR", "TextCorpus", "TrainConfig",
    "BlockManager", "OutOfBlocks", "PagedKVCache", "PagedLatentCache", "paged_absorbed_attention", "paged_attention",
    "LATENT_FORMATS", "latent_format",
]

# The benchmark (``python -m mla_tutorial.bench``) is imported on first use, so that running it as
# a script does not import it twice.
_BENCH_NAMES = ("run_benchmark", "load_results", "plot_results")


def __getattr__(name: str):
    if name in _BENCH_NAMES:
        from . import bench
        return getattr(bench, name)
    raise AttributeError(f"module 'mla_tutorial' has no attribute {name!r}")
