"""Quantized latent rows (mla_tutorial.quant): FlashMLA's FP8 layout byte by byte, int8, int6."""

import pytest
import torch

from mla_tutorial.quant import (FP8_E4M3_MAX, LATENT_FORMATS, fp8_row_bytes, int6_row_bytes, latent_format,
                                pack_fp8, pack_fp8_pow2, pack_int6, pack_int8, unpack_fp8, unpack_int6, unpack_int8)
from mla_tutorial.quant import _pack6, _unpack6


def latents(*shape, d_c=512, d_R=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_c + d_R, generator=g)
    n = max(1, d_c // 128)
    x[..., :d_c] *= torch.logspace(-2, 1, n).repeat_interleave(d_c // n)              # tiles of different ranges
    return x


def test_fp8_row_is_flashmla_656_bytes_in_order():
    x = latents(3, 5)
    packed = pack_fp8(x, 512)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 656) == (3, 5, fp8_row_bytes(512, 64))
    scales = packed[..., 512:528].contiguous().view(torch.float32)                     # 4 fp32 scales
    amax = x[..., :512].unflatten(-1, (4, 128)).abs().amax(-1)
    torch.testing.assert_close(scales, amax / FP8_E4M3_MAX, rtol=0, atol=0)
    k_R = packed[..., 528:].contiguous().view(torch.bfloat16)                          # 64 bf16 values, unquantized
    assert torch.equal(k_R, x[..., 512:].to(torch.bfloat16))
    codes = packed[..., :512].contiguous().view(torch.float8_e4m3fn).float()
    expect = (x[..., :512] / scales.repeat_interleave(128, -1)).to(torch.float8_e4m3fn).float()
    assert torch.equal(codes, expect)
    assert codes.abs().amax(-1).eq(FP8_E4M3_MAX).all(), "each tile's largest value maps to the e4m3 maximum"


def test_power_of_two_scales_round_up_and_read_back_with_the_same_layout():
    x = latents(3, 5)
    x[0, 0, :128] = 0
    packed = pack_fp8_pow2(x, 512)
    scales = packed[..., 512:528].contiguous().view(torch.float32)
    amax = x[..., :512].unflatten(-1, (4, 128)).abs().amax(-1)
    assert torch.equal(scales.log2(), scales.log2().round()), "powers of two"
    floor = (amax / FP8_E4M3_MAX).clamp(min=1e-4)
    assert (scales >= floor).all() and (scales < 2 * floor).all()
    assert scales[0, 0, 0] == 2.0**-13, "an all-zero tile: FlashMLA's floor of 1e-4, rounded up"
    torch.testing.assert_close(unpack_fp8(packed, 512), x, atol=scales.max().item() * 2**-10, rtol=2**-4)


@pytest.mark.parametrize("name,qmax", [("fp8", FP8_E4M3_MAX), ("int8", 127), ("int6", 31)])
def test_round_trip_error_is_within_half_a_step(name, qmax):
    fmt = LATENT_FORMATS[name]
    x = latents(4, 7)
    y = fmt.unpack(fmt.pack(x, 512), 512)
    assert y.shape == x.shape and y.dtype == torch.float32
    scale = x[..., :512].unflatten(-1, (4, 128)).abs().amax(-1, keepdim=True) / qmax  # (..., 4, 1)
    err = (y - x)[..., :512].unflatten(-1, (4, 128)).abs()
    if name == "fp8":  # 3 mantissa bits: half an ulp is 2^-4 of the value; subnormals step by 2^-9 of the scale
        bound = torch.maximum(x[..., :512].unflatten(-1, (4, 128)).abs() * 2**-4, scale * 2**-10)
    else:              # a uniform grid of step `scale` (int6's bf16 scale may round by 2^-9)
        bound = scale * (0.5 + 2**-7)
    assert (err <= bound * (1 + 1e-5)).all(), f"{name}: worst error / bound {(err / bound).max():.3f}"
    rope_err = (y - x)[..., 512:].abs()
    if name == "int6":
        assert (rope_err <= x[..., 512:].abs().amax(-1, keepdim=True) / 31 * (0.5 + 2**-7)).all()
    else:
        assert (rope_err <= x[..., 512:].abs() * 2**-8).all(), "k_R is stored in bf16"


def test_all_zero_tiles_get_scale_one_and_decode_to_zero():
    x = latents(2)
    x[:, 128:256] = 0
    x[1] = 0
    packed = pack_fp8(x, 512)
    assert packed[..., 512:528].contiguous().view(torch.float32)[:, 1].eq(1).all()
    for name in ("fp8", "int8", "int6"):
        fmt = LATENT_FORMATS[name]
        y = fmt.unpack(fmt.pack(x, 512), 512)
        assert y[:, 128:256].eq(0).all() and y[1].eq(0).all(), name


def test_int6_packs_four_codes_in_three_bytes():
    codes = torch.arange(-31, 33).remainder(63) - 31                                    # every code, shuffled
    codes = codes[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    packed = _pack6(codes)
    assert packed.shape == (48,) and packed.dtype == torch.uint8
    assert torch.equal(_unpack6(packed), codes)
    assert int6_row_bytes(512, 64) == 442 and LATENT_FORMATS["int6"].bits_per_value(512, 64) == pytest.approx(6.139, abs=1e-3)


def test_sizes_of_every_format_at_v3_dims():
    assert {n: f.row_bytes(512, 64) for n, f in LATENT_FORMATS.items()} == {
        "fp32": 2304, "bf16": 1152, "fp16": 1152, "fp8": 656, "fp8_pow2": 656, "int8": 656, "int6": 442}
    for name, fmt in LATENT_FORMATS.items():
        assert fmt.pack(latents(2), 512).shape == (2, fmt.row_width(512, 64)), name


def test_small_configs_use_a_smaller_tile():
    x = latents(3, d_c=32, d_R=8)
    for pack, unpack in ((pack_fp8, unpack_fp8), (pack_int8, unpack_int8), (pack_int6, unpack_int6)):
        y = unpack(pack(x, 32, tile=16), 32, tile=16)
        torch.testing.assert_close(y, x, atol=0.2, rtol=0.1)


def test_bad_input_is_refused_clearly():
    x = latents(2)
    with pytest.raises(ValueError, match="multiple of the scale tile"):
        pack_fp8(x[..., 64:], 448)
    with pytest.raises(ValueError, match="unknown latent cache format"):
        latent_format("int4")
    with pytest.raises(TypeError, match="uint8"):
        unpack_fp8(x, 512)
    with pytest.raises(ValueError, match="do not fit"):
        unpack_int8(pack_int8(x, 512)[..., :520], 512)
    with pytest.raises(ValueError, match="do not fit"):
        unpack_int6(pack_int6(x, 512)[..., :-2], 512)
    with pytest.raises(ValueError, match="multiples of 4"):
        pack_int6(torch.randn(2, 512 + 6), 512)
    with pytest.raises(TypeError, match="floating-point"):
        pack_fp8(torch.ones(2, 576, dtype=torch.int64), 512)
