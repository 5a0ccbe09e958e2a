"""Turning a trained MHA or GQA layer into MLA: exactly from GQA, approximately from MHA.

A GQA layer has ``n_kv`` key/value heads of width ``d_h``; query head ``h`` reads key/value head
``g(h) = h // (n_h / n_kv)``, and RoPE turns every dimension of queries and keys. The package's MLA
layer (:class:`~mla_tutorial.mla.MultiHeadLatentAttention`) caches ``[c_KV, k_R]``: a latent that
up-projections expand into per-head keys and values with no position in them, and one RoPE key
shared by every head.

* :func:`gqa_to_mla` (exact, after TransMLA, Meng et al. 2025). RoPE cannot pass through an
  up-projection (``R_s W_UK c`` cannot be absorbed into the query: the matrix between query and
  latent would depend on the key's position), so every rotated dimension must sit in the decoupled
  RoPE part. The GQA keys go there whole: ``k_R`` holds all ``n_kv`` rotated key heads
  (``d_h_R = n_kv d_h``, each pair keeping its own frequency: ``rope_frequencies``); head ``h``'s
  RoPE query holds its query in the slot of ``g(h)`` and zeros elsewhere. The latent holds the
  values, ``c_KV = W_V h`` (``d_c = n_kv d_h``, no RMSNorm: ``kv_norm=False``), and ``W_UV[h]``
  copies value head ``g(h)``. The cache is GQA's ``2 n_kv d_h`` values per token, and the outputs
  are GQA's in every cache mode, absorbed included. The price is query width: each head's RoPE
  query is ``n_kv d_h`` wide, most of it zeros.
* :func:`mha_to_mla` (approximate, after MHA2MLA, Ji et al. 2025): keep ``r`` frequency pairs
  per key/value head as RoPE (chosen by their contribution to the scores, or the highest or the
  lowest frequencies), drop RoPE from the other dimensions, and factor those keys jointly with
  the values, ``[W_K,nope; W_V] ≈ U D``, by a truncated SVD to rank ``d_c`` (``W_DKV = D``,
  ``W_UK`` and ``W_UV`` from ``U``), optionally whitened by the layer's inputs' second moment so
  the factorisation minimises the error on real activations rather than on the weights.
  Works on GQA layers too (MHA is ``n_kv = n_h``).
* :func:`mean_pool_kv`: the GQA baseline at a given cache (Ainslie et al. 2023's mean-pooled heads).
* :func:`convert_model`: a whole :class:`~mla_tutorial.model.TransformerLM`, layer by layer.

Defined in chapter 11.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .attention import MultiHeadAttention
from .config import MLAConfig
from .mla import MultiHeadLatentAttention
from .model import LMConfig, TransformerLM

__all__ = ["PAIR_RULES", "pair_scores", "select_rope_pairs", "gqa_to_mla", "mha_to_mla", "mean_pool_kv",
           "max_kv_lora_rank", "attention_inputs", "convert_model"]

#: How :func:`select_rope_pairs` picks the pairs kept as RoPE.
PAIR_RULES = ("contribution", "high", "low")


# --- checks ---------------------------------------------------------------------------------------
def _check_source(attn: nn.Module, owner: str) -> MultiHeadAttention:
    if not isinstance(attn, MultiHeadAttention):
        raise TypeError(f"{owner} converts the package's MultiHeadAttention (MHA/GQA/MQA), got {type(attn).__name__}")
    if any(getattr(attn, name).bias is not None for name in ("W_Q", "W_K", "W_V", "W_O")):
        raise ValueError(f"{owner}: this layer has biases; a key bias adds a position-independent term that MLA's "
                         f"latent cannot hold without a constant input. Fold or drop the biases first "
                         f"(MultiHeadAttention(..., bias=False), as in Llama and DeepSeek)")
    if attn.rope is None:
        raise ValueError(f"{owner}: this layer has no RoPE (rope_theta=None); the conversion maps RoPE pairs "
                         f"into MLA's decoupled RoPE part, so the source needs RoPE")
    return attn


def _check_inputs(x: torch.Tensor | None, attn: MultiHeadAttention, owner: str) -> torch.Tensor | None:
    """Calibration inputs of the layer (..., d_model) -> (N, d_model) in fp64."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[-1] != attn.hidden_size:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: inputs must be the layer's floating-point inputs (..., {attn.hidden_size}), "
                         f"got {got}; see attention_inputs()")
    x = x.reshape(-1, x.shape[-1]).double()
    if x.shape[0] < 2:
        raise ValueError(f"{owner}: inputs hold {x.shape[0]} token; give at least a few hundred")
    return x


def _check_pairs(attn: MultiHeadAttention, rope_pairs: int, owner: str) -> int:
    half = attn.head_dim // 2
    if isinstance(rope_pairs, bool) or not isinstance(rope_pairs, int) or not 1 <= rope_pairs <= half:
        raise ValueError(f"{owner}: rope_pairs must be an int from 1 to {half}: a head of width {attn.head_dim} "
                         f"has {half} RoPE pairs, got {rope_pairs!r}")
    return rope_pairs


# --- which RoPE pairs to keep ---------------------------------------------------------------------
def pair_scores(attn: MultiHeadAttention, inputs: torch.Tensor) -> torch.Tensor:
    """Each RoPE pair's contribution to the scores, per key/value head: (n_kv, d_h / 2).

    Pair ``j`` of head ``h`` adds ``q_j · k_j`` to a score, at most ``|q_j| |k_j|`` whatever the
    rotation (MHA2MLA's 2-norm criterion). The score of pair ``j`` of key/value head ``g`` is
    ``mean_t |q_{h,j}(t)| · mean_s |k_{g,j}(s)|`` summed over the query heads ``h`` that read ``g``.
    Norms do not change under rotation, so no positions are needed."""
    attn = _check_source(attn, "pair_scores")
    x = _check_inputs(inputs, attn, "pair_scores")
    if x is None:
        raise ValueError("pair_scores needs the layer's inputs (see attention_inputs())")
    n_h, n_kv, d_h = attn.num_heads, attn.num_kv_heads, attn.head_dim
    half = d_h // 2

    def pair_norms(weight: torch.Tensor, heads: int) -> torch.Tensor:                  # -> (heads, d_h/2)
        y = (x @ weight.detach().double().T).view(-1, heads, 2, half)                 # (N, heads, 2, d_h/2)
        return y.norm(dim=2).mean(0)                                      # half-split: pair j is (j, j + d_h/2)

    q, k = pair_norms(attn.W_Q.weight, n_h), pair_norms(attn.W_K.weight, n_kv)
    return (q.view(n_kv, n_h // n_kv, half).sum(1) * k).float()


def select_rope_pairs(attn: MultiHeadAttention, rope_pairs: int, rule: str = "contribution",
                      inputs: torch.Tensor | None = None) -> torch.Tensor:
    """The ``rope_pairs`` pair indices (0 = the highest frequency) each key/value head keeps as
    RoPE, sorted: (n_kv, rope_pairs). ``rule``: ``"contribution"`` (largest :func:`pair_scores`;
    needs ``inputs``), ``"high"`` (the highest frequencies: pairs 0 .. r-1) or ``"low"`` (the lowest)."""
    attn = _check_source(attn, "select_rope_pairs")
    r = _check_pairs(attn, rope_pairs, "select_rope_pairs")
    half, n_kv = attn.head_dim // 2, attn.num_kv_heads
    if rule not in PAIR_RULES:
        raise ValueError(f"select_rope_pairs: unknown rule {rule!r}; choose one of {PAIR_RULES}")
    if rule == "high":
        return torch.arange(r).expand(n_kv, r).clone()
    if rule == "low":
        return torch.arange(half - r, half).expand(n_kv, r).clone()
    if inputs is None:
        raise ValueError("select_rope_pairs: rule='contribution' ranks pairs on real activations; pass inputs "
                         "(the layer's inputs, see attention_inputs()) or use rule='high' or 'low'")
    return pair_scores(attn, inputs).topk(r, dim=1).indices.sort(dim=1).values


# --- the mapping ----------------------------------------------------------------------------------
def max_kv_lora_rank(attn: MultiHeadAttention, rope_pairs: int) -> int:
    """The largest useful latent: the rank of ``[W_K,nope; W_V]``, at most ``min(rows, d_model)``."""
    attn = _check_source(attn, "max_kv_lora_rank")
    r = _check_pairs(attn, rope_pairs, "max_kv_lora_rank")
    return min(attn.num_kv_heads * (2 * attn.head_dim - 2 * r), attn.hidden_size)


def _build(attn: MultiHeadAttention, pairs: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
           mode: str) -> MultiHeadLatentAttention:
    """The MLA layer that keeps ``pairs`` (n_kv, r) as RoPE and factors ``[K_nope; V] = up @ down``.

    ``up`` is (n_kv (d_h - 2r) + n_kv d_h, d_c): the key rows of every key/value head, then the
    value rows; ``down`` is W_DKV (d_c, d_model)."""
    n_h, n_kv, d_h = attn.num_heads, attn.num_kv_heads, attn.head_dim
    half, r = d_h // 2, pairs.shape[1]
    group = n_h // n_kv
    d_R = 2 * n_kv * r                      # every kept pair of every key/value head, half-split
    d_nope_real = d_h - 2 * r
    d_nope = max(d_nope_real, 1)            # MLA needs a content part: a zero one when all pairs rotate
    d_c = down.shape[0]
    inv_freq = attn.rope.inv_freq.cpu()
    freqs = inv_freq[pairs].reshape(-1)     # pair p = g r + i of k_R turns like pair pairs[g, i] of head g
    config = MLAConfig(hidden_size=attn.hidden_size, num_attention_heads=n_h, q_lora_rank=None,
                       kv_lora_rank=d_c, qk_nope_head_dim=d_nope, qk_rope_head_dim=d_R, v_head_dim=d_h,
                       num_hidden_layers=1, rope_scaling=None, rope_interleave=False, kv_norm=False,
                       rope_frequencies=freqs.tolist(), name=f"MLA from {attn.num_kv_heads} KV heads")
    # Copies are exact in any precision; the SVD's factors arrive in fp64 and are rounded once.
    work = torch.promote_types(attn.W_Q.weight.dtype, torch.float32)
    W_Q, W_K, W_O = (getattr(attn, n).weight.detach().cpu() for n in ("W_Q", "W_K", "W_O"))
    d_model = attn.hidden_size
    # MLA scales scores by 1/sqrt(d_nope + d_R), the source by 1/sqrt(d_h): fold the difference into q.
    q_gain = math.sqrt(d_nope + d_R) / math.sqrt(d_h)
    rope_dims = torch.cat([pairs, pairs + half], dim=1)                                 # (n_kv, 2r): (j, j + d_h/2)
    nope_dims = [[d for d in range(d_h) if d not in set(rope_dims[g].tolist())] for g in range(n_kv)]

    with torch.device("meta"):  # shapes only: every weight is written below, none is initialised
        layer = MultiHeadLatentAttention(config, mode=mode)
    layer = layer.to_empty(device="cpu").to(work)
    layer.rope.inv_freq = torch.tensor(config.rope_frequencies, dtype=torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        W_KR = layer.W_KR.weight                                                      # (d_R, d_model)
        W_QR = layer.W_QR.weight.view(n_h, d_R, d_model)
        W_UQ = layer.W_UQ.weight.view(n_h, d_nope, d_model)
        for g in range(n_kv):
            slots = torch.cat([g * r + torch.arange(r), d_R // 2 + g * r + torch.arange(r)])  # k_R dims of head g
            W_KR[slots] = W_K[g * d_h + rope_dims[g]].to(work)
            for h in range(g * group, (g + 1) * group):
                W_QR[h, slots] = W_Q[h * d_h + rope_dims[g]].to(work) * q_gain          # zeros outside g's slots
                if d_nope_real:
                    W_UQ[h] = W_Q[h * d_h + torch.tensor(nope_dims[g])].to(work) * q_gain
        up = up.to(work)
        n_key_rows = n_kv * d_nope_real
        for h in range(n_h):
            g = h // group
            if d_nope_real:
                layer.W_UK[h] = up[g * d_nope_real:(g + 1) * d_nope_real]
            layer.W_UV[h] = up[n_key_rows + g * d_h:n_key_rows + (g + 1) * d_h]
        layer.W_DKV.weight.copy_(down)
        layer.W_O.weight.copy_(W_O)
    dtype, device = attn.W_Q.weight.dtype, attn.W_Q.weight.device
    return layer.to(device=device, dtype=dtype)


def gqa_to_mla(attn: MultiHeadAttention, mode: str = "absorbed") -> MultiHeadLatentAttention:
    """The MLA layer that computes exactly what a GQA (or MHA, or MQA) layer computes, with the same
    cache: ``k_R`` holds the rotated keys of every key/value head, ``c_KV = W_V h`` their values."""
    attn = _check_source(attn, "gqa_to_mla")
    n_kv, d_h = attn.num_kv_heads, attn.head_dim
    pairs = torch.arange(d_h // 2).expand(n_kv, -1)
    W_V = attn.W_V.weight.detach().cpu()
    return _build(attn, pairs, W_V, torch.eye(n_kv * d_h), mode)


def mha_to_mla(attn: MultiHeadAttention, kv_lora_rank: int, rope_pairs: int, rule: str = "contribution",
               inputs: torch.Tensor | None = None, whiten: bool = False,
               mode: str = "absorbed") -> MultiHeadLatentAttention:
    """An MLA layer approximating an MHA (or GQA) layer, after MHA2MLA.

    Args:
        kv_lora_rank: d_c, the latent; at most :func:`max_kv_lora_rank` (there the SVD is exact and
            only the dropped rotations differ from the source).
        rope_pairs: r, pairs per key/value head kept as RoPE (``d_h_R = 2 n_kv r``); 1 .. d_h/2.
        rule: which pairs (see :func:`select_rope_pairs`).
        inputs: the layer's inputs (N, d_model) from a few batches: needed by ``rule="contribution"``
            and by ``whiten``.
        whiten: factor ``[W_K,nope; W_V] L`` with ``L Lᵀ`` the inputs' second moment, so the SVD
            minimises the error on these inputs rather than on the weights.
    """
    attn = _check_source(attn, "mha_to_mla")
    r = _check_pairs(attn, rope_pairs, "mha_to_mla")
    largest = max_kv_lora_rank(attn, r)
    if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or not 1 <= kv_lora_rank <= largest:
        raise ValueError(f"mha_to_mla: kv_lora_rank must be an int from 1 to {largest}: [W_K,nope; W_V] has "
                         f"{attn.num_kv_heads * (2 * attn.head_dim - 2 * r)} rows and {attn.hidden_size} columns, "
                         f"so its rank is at most {largest}; got {kv_lora_rank!r}")
    if not isinstance(whiten, bool):
        raise TypeError(f"mha_to_mla: whiten must be True or False, got {whiten!r}")
    x = _check_inputs(inputs, attn, "mha_to_mla")
    if whiten and x is None:
        raise ValueError("mha_to_mla: whiten=True needs inputs (the layer's inputs, see attention_inputs())")
    pairs = select_rope_pairs(attn, r, rule, None if x is None else x.float())
    n_kv, d_h, half = attn.num_kv_heads, attn.head_dim, attn.head_dim // 2
    W_K = attn.W_K.weight.detach().double().cpu().view(n_kv, d_h, -1)
    keep = torch.ones(n_kv, d_h, dtype=torch.bool)
    keep.scatter_(1, torch.cat([pairs, pairs + half], dim=1), False)
    M = torch.cat([W_K[keep], attn.W_V.weight.detach().double().cpu()])                # (n_kv (2 d_h - 2r), d_model)
    # The best rank-d_c approximation of M (or of M L, with L Lᵀ = E[x xᵀ] the inputs' second moment,
    # when whitening) keeps its top d_c left singular vectors U: M ≈ U (Uᵀ M). They are the top
    # eigenvectors of M Mᵀ (or M L Lᵀ Mᵀ), a small symmetric matrix: cheaper than an SVD of M.
    gram = M @ (x.T @ x / x.shape[0]) @ M.T if whiten else M @ M.T                   # (rows, rows)
    U = _top_eigenvectors(gram, kv_lora_rank)                                         # (rows, d_c)
    down = U.T @ M                                                                    # W_DKV (d_c, d_model)
    return _build(attn, pairs, down, U, mode)


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` eigenvectors of a symmetric matrix with the largest eigenvalues, largest first.
    On one thread: a small eigenproblem on several threads spends most of its time synchronising
    them (50 times slower for 168 x 168 on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :k]
    finally:
        torch.set_num_threads(threads)


def mean_pool_kv(attn: MultiHeadAttention, num_kv_heads: int) -> MultiHeadAttention:
    """GQA with ``num_kv_heads`` heads from an MHA/GQA layer: each new key and value head is the mean
    of the consecutive heads it replaces (the GQA paper's conversion); queries and W_O are kept."""
    attn = _check_source(attn, "mean_pool_kv")
    n_kv = attn.num_kv_heads
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or n_kv % num_kv_heads:
        divisors = [g for g in range(1, n_kv + 1) if n_kv % g == 0]
        raise ValueError(f"mean_pool_kv: num_kv_heads must divide the layer's {n_kv} key/value heads; "
                         f"choose one of {divisors}, got {num_kv_heads!r}")
    out = MultiHeadAttention(attn.hidden_size, attn.num_heads, num_kv_heads, attn.head_dim,
                             rope_theta=10000.0).to(attn.W_Q.weight)
    out.rope.inv_freq = attn.rope.inv_freq.clone()  # the source's own frequencies, whatever its theta
    with torch.no_grad():
        out.W_Q.weight.copy_(attn.W_Q.weight)
        out.W_O.weight.copy_(attn.W_O.weight)
        for name in ("W_K", "W_V"):
            w = getattr(attn, name).weight.view(num_kv_heads, n_kv // num_kv_heads, attn.head_dim, -1)
            getattr(out, name).weight.copy_(w.mean(1).reshape(-1, attn.hidden_size))
    return out


# --- whole models ---------------------------------------------------------------------------------
@torch.no_grad()
def attention_inputs(model: TransformerLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """What each layer's attention reads (its RMSNorm'd residual stream) on the token ids ``idx``
    (B, T): one (B T, d_model) tensor per layer, for pair selection and whitening."""
    if not isinstance(model, TransformerLM):
        raise TypeError(f"attention_inputs needs a TransformerLM, got {type(model).__name__}")
    seen: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
             for b in model.blocks]
    try:
        model.eval()(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def convert_model(model: TransformerLM, method: str, *, kv_lora_rank: int | None = None,
                  rope_pairs: int | None = None, rule: str = "contribution", calibration: torch.Tensor | None = None,
                  whiten: bool = False, num_kv_heads: int | None = None) -> TransformerLM:
    """A copy of ``model`` (MHA/GQA/MQA attention) with every attention layer converted.

    ``method``: ``"gqa_to_mla"`` (exact), ``"mha_to_mla"`` (needs ``kv_lora_rank`` and ``rope_pairs``;
    ``calibration`` token ids (B, T) for ``rule="contribution"`` and ``whiten``) or ``"mean_pool"``
    (GQA with ``num_kv_heads``). Embeddings, norms, MLPs and the output head are copied as they are."""
    if not isinstance(model, TransformerLM):
        raise TypeError(f"convert_model needs a TransformerLM, got {type(model).__name__}")
    c = model.config
    if c.attention == "mla":
        raise ValueError("convert_model: this model's attention is already MLA")
    methods = ("gqa_to_mla", "mha_to_mla", "mean_pool")
    if method not in methods:
        raise ValueError(f"convert_model: unknown method {method!r}; choose one of {methods}")
    inputs = [None] * c.n_layers
    if method == "mha_to_mla" and (rule == "contribution" or whiten):
        if calibration is None:
            raise ValueError("convert_model: rule='contribution' and whiten=True need calibration token ids (B, T)")
        inputs = attention_inputs(model, calibration)
    if method == "mean_pool":
        layers = [mean_pool_kv(b.attn, num_kv_heads) for b in model.blocks]
        kind = "mha" if num_kv_heads == c.n_heads else ("mqa" if num_kv_heads == 1 else "gqa")
        new = c.replace(attention=kind, n_kv_heads=num_kv_heads if kind == "gqa" else None)
    else:
        if method == "gqa_to_mla":
            layers = [gqa_to_mla(b.attn) for b in model.blocks]
        else:
            if kv_lora_rank is None or rope_pairs is None:
                raise ValueError("convert_model: method='mha_to_mla' needs kv_lora_rank and rope_pairs")
            layers = [mha_to_mla(b.attn, kv_lora_rank, rope_pairs, rule, x, whiten)
                      for b, x in zip(model.blocks, inputs)]
        mc = layers[0].config
        new = c.replace(attention="mla", n_kv_heads=None, head_dim=None, kv_lora_rank=mc.kv_lora_rank,
                        q_lora_rank=None, qk_nope_head_dim=mc.qk_nope_head_dim,
                        qk_rope_head_dim=mc.qk_rope_head_dim, v_head_dim=mc.v_head_dim, kv_norm=False,
                        rope_frequencies=tuple(layer.config.rope_frequencies for layer in layers))
    weight = model.embed.weight
    out = TransformerLM(new).to(device=weight.device, dtype=weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k}
    for i, layer in enumerate(layers):
        state.update({f"blocks.{i}.attn.{k}": v for k, v in layer.state_dict().items()})
    out.load_state_dict(state)
    if method == "mean_pool":
        for b, layer in zip(out.blocks, layers):
            b.attn.rope.inv_freq = layer.rope.inv_freq.clone()
    return out.train(model.training)
