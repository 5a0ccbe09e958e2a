"""Quantized latent caches: each cached token's [c_KV, k_R] row stored in fewer bytes.

A token of MLA's cache is one row of ``d_c + d_h_R`` values (576 for DeepSeek-V3): the latent
``c_KV`` (512) and the shared RoPE key ``k_R`` (64). The formats here store that row as bytes
(a ``torch.uint8`` tensor of shape ``(..., row_bytes)``) and turn it back into numbers on read:

=========  ===========================================================================  ======
format     one row (d_c = 512, d_h_R = 64, scale tiles of 128 values)                    bytes
=========  ===========================================================================  ======
``bf16``   576 bf16 values (the unquantized cache; also ``fp16``, ``fp32``)               1,152
``fp8``    FlashMLA's layout: 512 float8 e4m3 values of c_KV, 4 fp32 scales (one per 128   656
           values), 64 bf16 values of k_R (RoPE keys are left unquantized)
``fp8_pow2`` the same bytes, each scale rounded up to a power of two (FlashMLA's tests do)  656
``int8``   the same layout with int8 codes (round(c / scale), scale = amax / 127)           656
``int6``   every value (c_KV and k_R) a 6-bit code in [-31, 31], four codes in three        442
           bytes; one bf16 scale per 128 values of c_KV and one for k_R: 6.14 bits a value
=========  ===========================================================================  ======

Scales are per tile: ``scale = amax / qmax`` over the tile's values (448, the largest e4m3
value, for FP8; 127 for int8; 31 for int6), and an all-zero tile gets scale 1. A value is
stored as ``code = value / scale`` (rounded to the format) and read back as ``code * scale``.
Multi-byte fields (fp32 and bf16 scales, bf16 RoPE values) are stored in the machine's native
byte order (little-endian on x86, ARM and GPUs), as a kernel reading them with a typed load sees them.

DeepSeek-V2 served its cache at "6 bits per element on average" (section 3.2.3) citing
KVQuant and Atom, without publishing the scheme; ``int6`` is one scheme of that size, not theirs.

The pack/unpack functions are the torch reference (chapter 12); :mod:`mla_tutorial.paged`
stores rows in these formats and dequantizes them on read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "FP8_E4M3_MAX", "TILE", "LatentFormat", "LATENT_FORMATS", "latent_format",
    "pack_fp8", "pack_fp8_pow2", "unpack_fp8", "pack_int8", "unpack_int8", "pack_int6", "unpack_int6",
    "fp8_row_bytes", "int8_row_bytes", "int6_row_bytes",
]

#: The largest finite float8 e4m3fn value: FP8 scales are amax / 448.
FP8_E4M3_MAX = 448.0
#: Values per scale (FlashMLA's tile of c_KV).
TILE = 128
_INT8_MAX, _INT6_MAX = 127, 31


# --- checks --------------------------------------------------------------------------------------
def _check_latent(latent: torch.Tensor, d_c: int, tile: int | None, who: str) -> int:
    """Validate a (..., d_c + d_h_R) float tensor (and d_c's tiles, unless ``tile`` is None); return d_h_R."""
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
        raise TypeError(f"{who}: latent must be a floating-point tensor (..., d_c + d_h_R), "
                        f"got {getattr(latent, 'dtype', type(latent).__name__)}")
    _check_tiles(d_c, tile or d_c, who)
    d_R = latent.shape[-1] - d_c if latent.dim() else -1
    if d_R < 0:
        raise ValueError(f"{who}: latent rows have {latent.shape[-1] if latent.dim() else 0} values, "
                         f"fewer than d_c = {d_c}; pass rows [c_KV (d_c), k_R (d_h_R)]")
    return d_R


def _check_tiles(d_c: int, tile: int, who: str) -> None:
    for name, value in (("d_c", d_c), ("tile", tile)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
    if d_c % tile:
        raise ValueError(f"{who}: d_c = {d_c} is not a multiple of the scale tile ({tile} values); "
                         f"use a d_c that is (DeepSeek's is 512) or pass a tile that divides it")


def _check_packed(packed: torch.Tensor, who: str) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{who}: packed rows must be a torch.uint8 tensor (..., row_bytes), "
                        f"got {getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.dim() == 0:
        raise ValueError(f"{who}: packed rows must have at least one dimension (the bytes)")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the last dimension's bytes as ``dtype`` (bytes -> fp32 scales, bf16 values)."""
    return t.contiguous().view(dtype)


def _tile_scales(values: torch.Tensor, tile: int, qmax: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """(..., n) values -> (..., n / tile) scales amax / qmax in ``scale_dtype`` (1 for an all-zero tile)."""
    amax = values.float().unflatten(-1, (-1, tile)).abs().amax(-1)                   # (..., n / tile)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype)


def _per_value(scales: torch.Tensor, tile: int) -> torch.Tensor:
    """(..., n / tile) scales -> (..., n) fp32, each scale repeated over its tile."""
    return scales.float().repeat_interleave(tile, dim=-1)


# --- FP8 (FlashMLA's layout) and int8 (the same layout with integer codes) -------------------------
def _pack_tiled(latent: torch.Tensor, d_c: int, tile: int, qmax: float,
                encode: Callable[[torch.Tensor], torch.Tensor], who: str, pow2: bool = False) -> torch.Tensor:
    """[codes of c_KV (d_c bytes) | fp32 scales (4 d_c / tile bytes) | k_R in bf16 (2 d_h_R bytes)]."""
    _check_latent(latent, d_c, tile, who)
    c_KV, k_R = latent[..., :d_c].float(), latent[..., d_c:]
    if pow2:  # FlashMLA's reference quantizer: amax / 448 (at least 1e-4) rounded up to a power of two
        amax = c_KV.unflatten(-1, (-1, tile)).abs().amax(-1)
        scales = torch.exp2((amax / qmax).clamp(min=1e-4).log2().ceil())
    else:
        scales = _tile_scales(c_KV, tile, qmax, torch.float32)                       # (..., d_c / tile)
    codes = encode((c_KV / _per_value(scales, tile)).clamp(-qmax, qmax))             # (..., d_c), 1 byte each
    return torch.cat([codes.view(torch.uint8), _as(scales, torch.uint8),
                      _as(k_R.to(torch.bfloat16), torch.uint8)], dim=-1)


def _unpack_tiled(packed: torch.Tensor, d_c: int, tile: int, code_dtype: torch.dtype,
                  dtype: torch.dtype, who: str) -> torch.Tensor:
    _check_packed(packed, who)
    _check_tiles(d_c, tile, who)
    n_scale_bytes = 4 * (d_c // tile)
    rope_bytes = packed.shape[-1] - d_c - n_scale_bytes
    if rope_bytes < 0 or rope_bytes % 2:
        raise ValueError(f"{who}: rows of {packed.shape[-1]} bytes do not fit d_c = {d_c} with tiles of "
                         f"{tile}: expected {d_c} + {n_scale_bytes} + 2 d_h_R bytes")
    codes = _as(packed[..., :d_c], code_dtype).float()                               # (..., d_c)
    scales = _as(packed[..., d_c:d_c + n_scale_bytes], torch.float32)                # (..., d_c / tile)
    k_R = _as(packed[..., d_c + n_scale_bytes:], torch.bfloat16)                     # (..., d_h_R)
    return torch.cat([codes * _per_value(scales, tile), k_R.float()], dim=-1).to(dtype)


def fp8_row_bytes(d_c: int = 512, d_h_R: int = 64, tile: int = TILE) -> int:
    """Bytes of one token in FlashMLA's FP8 layout: d_c + 4 d_c / tile + 2 d_h_R (656 for V3)."""
    _check_tiles(d_c, tile, "fp8_row_bytes")
    return d_c + 4 * (d_c // tile) + 2 * d_h_R


int8_row_bytes = fp8_row_bytes  # the same layout, int8 codes in place of e4m3 ones


def pack_fp8(latent: torch.Tensor, d_c: int, tile: int = TILE) -> torch.Tensor:
    """Rows [c_KV, k_R] (..., d_c + d_h_R) -> FlashMLA's FP8 bytes (..., d_c + 4 d_c / tile + 2 d_h_R).

    Bytes [0, d_c): c_KV / scale as float8 e4m3fn; then d_c / tile fp32 scales (scale j covers
    c_KV[tile·j : tile·(j+1)], amax / 448, 1 for an all-zero tile); then k_R as bf16."""
    return _pack_tiled(latent, d_c, tile, FP8_E4M3_MAX, lambda x: x.to(torch.float8_e4m3fn), "pack_fp8")


def pack_fp8_pow2(latent: torch.Tensor, d_c: int, tile: int = TILE) -> torch.Tensor:
    """As :func:`pack_fp8` (same bytes, read by :func:`unpack_fp8`) with each scale rounded *up* to
    a power of two, ``2^ceil(log2(max(amax / 448, 1e-4)))``, as the quantizer in FlashMLA's tests
    does (UE8M0 scales: an exponent only, so dequantizing is exact in hardware); an all-zero tile
    gets 2^-13. Rounding up leaves each tile's largest value up to 2x below 448, one bit of range."""
    return _pack_tiled(latent, d_c, tile, FP8_E4M3_MAX, lambda x: x.to(torch.float8_e4m3fn), "pack_fp8_pow2",
                       pow2=True)


def unpack_fp8(packed: torch.Tensor, d_c: int, tile: int = TILE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 rows (..., row_bytes) -> [c_KV, k_R] (..., d_c + d_h_R) in ``dtype``: fp8 value x scale."""
    return _unpack_tiled(packed, d_c, tile, torch.float8_e4m3fn, dtype, "unpack_fp8")


def pack_int8(latent: torch.Tensor, d_c: int, tile: int = TILE) -> torch.Tensor:
    """As :func:`pack_fp8` with int8 codes round(c_KV / scale), scale = amax / 127."""
    return _pack_tiled(latent, d_c, tile, _INT8_MAX, lambda x: x.round().to(torch.int8), "pack_int8")


def unpack_int8(packed: torch.Tensor, d_c: int, tile: int = TILE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 rows (..., row_bytes) -> [c_KV, k_R] (..., d_c + d_h_R) in ``dtype``: code x scale."""
    return _unpack_tiled(packed, d_c, tile, torch.int8, dtype, "unpack_int8")


# --- int6: four 6-bit codes in three bytes -----------------------------------------------------------
def _pack6(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in [-31, 31] -> (..., 3n/4) bytes: u = code + 32 (6 bits), u0 | u1<<6 | u2<<12 | u3<<18."""
    u = (codes.to(torch.int32) + 32).unflatten(-1, (-1, 4))                          # (..., n/4, 4)
    word = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)      # (..., n/4), 24 bits
    return torch.stack([word & 255, (word >> 8) & 255, word >> 16], dim=-1).flatten(-2).to(torch.uint8)


def _unpack6(data: torch.Tensor) -> torch.Tensor:
    """(..., 3n/4) bytes -> (..., n) int32 codes in [-32, 31]."""
    b = data.to(torch.int32).unflatten(-1, (-1, 3))                                  # (..., n/4, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    u = torch.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], dim=-1)              # (..., n/4, 4)
    return u.flatten(-2) - 32


def _check_int6(d_c: int, d_R: int, tile: int, who: str) -> None:
    _check_tiles(d_c, tile, who)
    if d_c % 4 or d_R % 4 or d_R <= 0:
        raise ValueError(f"{who}: int6 packs four values in three bytes, so d_c ({d_c}) and d_h_R ({d_R}) "
                         f"must be positive multiples of 4")


def int6_row_bytes(d_c: int = 512, d_h_R: int = 64, tile: int = TILE) -> int:
    """Bytes of one int6 token: 3/4 byte a value plus a bf16 scale per tile of c_KV and one for k_R
    (442 for V3: 6.14 bits a value)."""
    _check_int6(d_c, d_h_R, tile, "int6_row_bytes")
    return 3 * (d_c + d_h_R) // 4 + 2 * (d_c // tile + 1)


def pack_int6(latent: torch.Tensor, d_c: int, tile: int = TILE) -> torch.Tensor:
    """Rows [c_KV, k_R] -> bytes [c_KV codes (3 d_c / 4) | k_R codes (3 d_h_R / 4) | bf16 scales
    (d_c / tile for c_KV, then 1 for k_R)]. Codes round(value / scale) in [-31, 31], scale = amax / 31
    (rounded to bf16 before use, so reading multiplies by exactly the stored scale)."""
    d_R = _check_latent(latent, d_c, tile, "pack_int6")
    _check_int6(d_c, d_R, tile, "pack_int6")
    c_KV, k_R = latent[..., :d_c].float(), latent[..., d_c:].float()
    s_c = _tile_scales(c_KV, tile, _INT6_MAX, torch.bfloat16)                        # (..., d_c / tile)
    s_R = _tile_scales(k_R, d_R, _INT6_MAX, torch.bfloat16)                          # (..., 1)
    q_c = (c_KV / _per_value(s_c, tile)).round().clamp(-_INT6_MAX, _INT6_MAX)
    q_R = (k_R / s_R.float()).round().clamp(-_INT6_MAX, _INT6_MAX)
    return torch.cat([_pack6(q_c), _pack6(q_R), _as(torch.cat([s_c, s_R], -1), torch.uint8)], dim=-1)


def unpack_int6(packed: torch.Tensor, d_c: int, tile: int = TILE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int6 rows (..., row_bytes) -> [c_KV, k_R] (..., d_c + d_h_R) in ``dtype``."""
    _check_packed(packed, "unpack_int6")
    _check_tiles(d_c, tile, "unpack_int6")
    n_s = d_c // tile + 1
    code_bytes = packed.shape[-1] - 2 * n_s
    d_R = 4 * code_bytes // 3 - d_c
    if code_bytes < 0 or code_bytes % 3 or d_R <= 0 or d_R % 4 or int6_row_bytes(d_c, d_R, tile) != packed.shape[-1]:
        raise ValueError(f"unpack_int6: rows of {packed.shape[-1]} bytes do not fit d_c = {d_c} with tiles of "
                         f"{tile}: expected 3 (d_c + d_h_R) / 4 + {2 * n_s} bytes")
    codes = _unpack6(packed[..., :code_bytes]).float()                               # (..., d_c + d_h_R)
    scales = _as(packed[..., code_bytes:], torch.bfloat16)                           # (..., n_s)
    per_value = torch.cat([_per_value(scales[..., :-1], tile), _per_value(scales[..., -1:], d_R)], -1)
    return (codes * per_value).to(dtype)


# --- the formats by name -------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentFormat:
    """How one token's [c_KV, k_R] row is stored in the pool.

    Attributes:
        name: the format's name (``latent_format(name)``).
        pool_dtype: dtype of the pool tensor (``torch.uint8`` for the quantized formats).
        description: one line for tables.
    """

    name: str
    pool_dtype: torch.dtype
    description: str
    _row_bytes: Callable[[int, int, int], int]
    _pack: Callable[..., torch.Tensor] | None = None
    _unpack: Callable[..., torch.Tensor] | None = None

    @property
    def quantized(self) -> bool:
        return self._pack is not None

    def row_bytes(self, d_c: int, d_h_R: int, tile: int = TILE) -> int:
        """Bytes one token occupies per layer."""
        return self._row_bytes(d_c, d_h_R, tile)

    def row_width(self, d_c: int, d_h_R: int, tile: int = TILE) -> int:
        """Last dimension of the pool: values for a float format, bytes for a quantized one."""
        return self.row_bytes(d_c, d_h_R, tile) // torch.empty((), dtype=self.pool_dtype).element_size()

    def bits_per_value(self, d_c: int, d_h_R: int, tile: int = TILE) -> float:
        """Average bits per cached value, scales included (16 for bf16, 6.14 for int6 at V3's dims)."""
        return 8 * self.row_bytes(d_c, d_h_R, tile) / (d_c + d_h_R)

    def pack(self, latent: torch.Tensor, d_c: int, tile: int = TILE) -> torch.Tensor:
        """Rows [c_KV, k_R] (..., d_c + d_h_R) -> pool rows (..., row_width) of ``pool_dtype``."""
        if self._pack is None:
            _check_latent(latent, d_c, None, f"LatentFormat({self.name!r}).pack")
            return latent.to(self.pool_dtype)
        return self._pack(latent, d_c, tile)

    def unpack(self, rows: torch.Tensor, d_c: int, tile: int = TILE,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pool rows -> [c_KV, k_R] (..., d_c + d_h_R) in ``dtype``."""
        if self._unpack is None:
            return rows.to(dtype)
        return self._unpack(rows, d_c, tile, dtype)


def _float_bytes(n: int) -> Callable[[int, int, int], int]:
    return lambda d_c, d_h_R, tile: n * (d_c + d_h_R)


#: Every latent-cache format, by name.
LATENT_FORMATS: dict[str, LatentFormat] = {f.name: f for f in [
    LatentFormat("fp32", torch.float32, "fp32 values", _float_bytes(4)),
    LatentFormat("bf16", torch.bfloat16, "bf16 values (unquantized)", _float_bytes(2)),
    LatentFormat("fp16", torch.float16, "fp16 values", _float_bytes(2)),
    LatentFormat("fp8", torch.uint8, "FlashMLA's: e4m3 c_KV, fp32 scales, bf16 k_R",
                 fp8_row_bytes, pack_fp8, unpack_fp8),
    LatentFormat("fp8_pow2", torch.uint8, "as fp8, power-of-two scales",
                 fp8_row_bytes, pack_fp8_pow2, unpack_fp8),
    LatentFormat("int8", torch.uint8, "int8 c_KV, fp32 scales, bf16 k_R", int8_row_bytes, pack_int8, unpack_int8),
    LatentFormat("int6", torch.uint8, "6-bit c_KV and k_R, bf16 scales",
                 int6_row_bytes, pack_int6, unpack_int6),
]}

_FLOAT_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def latent_format(fmt: str | torch.dtype | LatentFormat) -> LatentFormat:
    """The :class:`LatentFormat` named ``fmt`` (or of a float dtype); a clear error for anything else."""
    if isinstance(fmt, LatentFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        if fmt not in _FLOAT_FORMATS:
            raise ValueError(f"no latent format stores {fmt}; float pools are {sorted(_FLOAT_FORMATS.values())}, "
                             f"quantized ones are named: {sorted(LATENT_FORMATS)}")
        return LATENT_FORMATS[_FLOAT_FORMATS[fmt]]
    if not isinstance(fmt, str) or fmt not in LATENT_FORMATS:
        raise ValueError(f"unknown latent cache format (quantization) {fmt!r}; choose one of {sorted(LATENT_FORMATS)}")
    return LATENT_FORMATS[fmt]
