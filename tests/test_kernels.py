"""The Triton decode kernel (mla_tutorial.kernels) against the torch oracle, in Triton's interpreter.

Every kernel test runs on the CPU with TRITON_INTERPRET=1 (set by mla_tutorial.kernels when no
GPU is present) at tiny sizes, and is skipped with the reason when Triton cannot be imported.
The input checks need no Triton and always run. In the interpreter a bf16 tl.dot runs on fp32
copies of the bf16 values (see decode._mma); everything else (bf16 loads, casts, the rounding
of the probabilities to bf16) is what a GPU runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from mla_tutorial.kernels import (DecodeProblem, check_decode_inputs, choose_num_splits, kernels_unavailable_reason,
                                  paged_mla_decode, triton_available, triton_mode)
from mla_tutorial.paged import paged_absorbed_attention as oracle
from mla_tutorial.quant import fp8_row_bytes, pack_fp8, unpack_fp8

UNAVAILABLE = kernels_unavailable_reason()
needs_triton = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"the kernel tests need Triton: {UNAVAILABLE}")
# The interpreter runs on the CPU; with a GPU (TRITON_INTERPRET unset) the same tests run compiled.
DEVICE = torch.device("cuda" if UNAVAILABLE is None and triton_mode() == "compiled" else "cpu")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


# --- test problems ---------------------------------------------------------------------------------------
def _problem(lens, T=1, H=3, d_c=32, d_R=16, block_size=16, dtype=torch.float32, seed=0, spare_blocks=3, device=None):
    """A pool with NaN in every row no sequence owns, a shuffled block table whose entries past each
    sequence's end point at NaN blocks, and random queries."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    B = len(lens)
    max_blocks = max(1, -(-int(lens.max()) // block_size)) + 1
    used = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(used) + spare_blocks
    pool = torch.full((num_blocks, block_size, d_c + d_R), float("nan"))
    order = torch.randperm(num_blocks, generator=g)
    nan_blocks = order[sum(used):]
    table = torch.empty(B, max_blocks, dtype=torch.int32)
    k = 0
    for b, n in enumerate(used):
        table[b, :n] = order[k:k + n]
        k += n
        table[b, n:] = nan_blocks[torch.randint(len(nan_blocks), (max_blocks - n,), generator=g)]
        for j in range(n):
            rows = min(block_size, int(lens[b]) - j * block_size)   # rows past the end stay NaN
            pool[table[b, j], :rows] = torch.randn(rows, d_c + d_R, generator=g)
    q_lat = torch.randn(B, T, H, d_c, generator=g).to(dtype)
    q_R = torch.randn(B, T, H, d_R, generator=g).to(dtype)
    tensors = (t.to(device or DEVICE) for t in (q_lat, q_R, pool.to(dtype), table, lens))
    return (*tensors, (d_c + d_R) ** -0.5)


def _check(out, ref, dtype):
    o, lse = out
    o_ref, lse_ref = ref
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(o).all(), "NaN from unused pool rows or blocks leaked into the output"
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)


# --- correctness in the interpreter ----------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lengths_around_a_64_token_block(dtype):
    # 0: nothing to see; 1: one token; 63/64/65: one block short of full, exactly full, one over.
    args = _problem([0, 1, 63, 64, 65], H=5, d_c=64, d_R=16, block_size=64, dtype=dtype)
    for splits in (1, 3):
        o, lse = paged_mla_decode(*args, num_splits=splits)
        _check((o, lse), oracle(*args), dtype)
        assert (o[0] == 0).all() and (lse[0] == float("-inf")).all(), "length 0: zeros and lse = -inf"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [2, 3])
def test_several_new_queries_are_causal_among_themselves(dtype, T):
    args = _problem([3, 17, 40], T=T, H=6, block_size=8, dtype=dtype, seed=T)
    _check(paged_mla_decode(*args, num_splits=2), oracle(*args), dtype)
    # the first new query of a sequence must not see the ones after it: change the last key only
    q_lat, q_R, pool, table, lens, scale = args
    o1, _ = paged_mla_decode(*args)
    last = int(lens[1]) - 1
    pool = pool.clone()
    pool[table[1, last // 8], last % 8] += 3.0
    o2, _ = paged_mla_decode(q_lat, q_R, pool, table, lens, scale)
    assert torch.equal(o1[1, :T - 1], o2[1, :T - 1]), "an earlier query saw a later token"
    assert not torch.equal(o1[1, T - 1], o2[1, T - 1])


@needs_triton
@pytest.mark.parametrize("H", [1, 7, 20])
def test_head_counts_that_are_not_powers_of_two(H):
    # 20 heads x 2 queries = 40 rows: three row blocks of 16, the last one part-empty
    args = _problem([5, 33], T=2, H=H, d_c=48, d_R=8, block_size=16, seed=H)
    _check(paged_mla_decode(*args), oracle(*args), torch.float32)


@needs_triton
def test_splits_merge_to_the_unsplit_result():
    args = _problem([1, 30, 129], H=4, block_size=16, seed=3)
    o1, l1 = paged_mla_decode(*args, num_splits=1)
    for splits in (2, 5, 16):   # 16 splits of a 30-token sequence leave most splits empty
        o, lse = paged_mla_decode(*args, num_splits=splits, block_n=16)
        torch.testing.assert_close(o, o1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, l1, atol=1e-6, rtol=1e-6)


@needs_triton
def test_float16_and_tile_sizes():
    args = _problem([50, 7], T=2, H=3, block_size=16, dtype=torch.float16, seed=4)
    ref = oracle(*args)
    for block_h, block_n in ((16, 16), (32, 64)):
        _check(paged_mla_decode(*args, block_h=block_h, block_n=block_n, num_splits=2), ref, torch.float16)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_pool_is_dequantized_inside_the_kernel(dtype):
    q_lat, q_R, pool, table, lens, scale = _problem([0, 2, 40], T=2, H=3, d_c=256, d_R=16, block_size=16,
                                                    seed=5)
    packed = pack_fp8(pool, 256)
    dequant = unpack_fp8(packed, 256)
    assert packed.shape[-1] == fp8_row_bytes(256, 16) == 256 + 8 + 32
    # NaN in every byte no sequence owns: 0xFF is NaN as e4m3, as fp32 scale and as bf16
    owned = torch.isfinite(pool).all(-1)
    packed[~owned] = 0xFF
    q_lat, q_R = q_lat.to(dtype), q_R.to(dtype)
    out = paged_mla_decode(q_lat, q_R, packed, table, lens, scale, "fp8", num_splits=2)
    _check(out, oracle(q_lat, q_R, packed, table, lens, scale, "fp8"), dtype)
    # a scale tile of 64 values instead of FlashMLA's 128
    packed = pack_fp8(dequant, 256, tile=64)
    _check(paged_mla_decode(q_lat, q_R, packed, table, lens, scale, "fp8", tile=64),
           oracle(q_lat, q_R, packed, table, lens, scale, "fp8", tile=64), dtype)


def test_fp8_row_is_656_bytes_for_deepseek_v3():
    assert fp8_row_bytes(512, 64) == 656


# --- errors before launch (no Triton needed) -------------------------------------------------------------
def _good(device="cpu"):
    return _problem([5, 20], T=2, H=3, block_size=8, device=device)


def _call(**changes):
    q_lat, q_R, pool, table, lens, scale = _good()
    kw = dict(q_lat=q_lat, q_R=q_R, kv_pool=pool, block_table=table, seq_lens=lens, scale=scale)
    kw.update(changes)
    return check_decode_inputs(**kw)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: dict(q_lat=a[0][0]), ValueError, "(batch, T, n_h, d_c)"),
    (lambda a: dict(q_R=a[1][:, :, :2]), ValueError, "must agree"),
    (lambda a: dict(q_lat=a[0].double(), q_R=a[1].double()), TypeError, "must share one of"),
    (lambda a: dict(q_R=a[1].half()), TypeError, "must share one of"),
    (lambda a: dict(kv_pool=a[2][..., :-1]), ValueError, "wide"),
    (lambda a: dict(kv_pool=a[2].half()), TypeError, "kv_pool is torch.float16"),
    (lambda a: dict(kv_pool=a[2].transpose(1, 2)), ValueError, "contiguous"),
    (lambda a: dict(kv_pool=a[2].to(torch.uint8)), ValueError, "kv_format='fp8'"),
    (lambda a: dict(kv_pool=a[2].to(torch.uint8), kv_format="fp8"), ValueError, "divides d_c = 32"),
    (lambda a: dict(kv_pool=a[2].to(torch.uint8), kv_format="int8"), ValueError, "torch reference"),
    (lambda a: dict(kv_format="fp9"), ValueError, "unknown latent cache format"),
    (lambda a: dict(kv_format="bf16"), TypeError, "kv_format is 'bf16'"),
    (lambda a: dict(block_table=a[3].long()), TypeError, "torch.int32"),
    (lambda a: dict(seq_lens=a[4].float()), TypeError, "torch.int32"),
    (lambda a: dict(block_table=a[3][:1]), ValueError, "(batch, max_blocks_per_seq)"),
    (lambda a: dict(seq_lens=a[4][:1]), ValueError, "seq_lens must be (2,)"),
    (lambda a: dict(seq_lens=torch.tensor([5, 10_000], dtype=torch.int32)), ValueError, "[0, 32]"),
    (lambda a: dict(seq_lens=torch.tensor([-1, 5], dtype=torch.int32)), ValueError, "[0, 32]"),
    (lambda a: dict(seq_lens=torch.tensor([1, 5], dtype=torch.int32)), ValueError, "at least T = 2"),
    (lambda a: dict(block_table=a[3].clone().fill_(99)), ValueError, "name a pool block"),
    (lambda a: dict(scale=0.0), ValueError, "scale"),
    (lambda a: dict(scale=float("nan")), ValueError, "scale"),
    (lambda a: dict(q_lat="q"), TypeError, "torch.Tensor"),
])
def test_bad_input_gets_a_clear_error(change, error, words):
    with pytest.raises(error) as info:
        _call(**change(_good()))
    assert words in str(info.value), str(info.value)


def test_fp8_pool_width_is_checked():
    q_lat, q_R, _, table, lens, scale = _problem([5, 20], T=2, H=3, d_c=128, d_R=16, block_size=8, device="cpu")
    pool = torch.zeros(10, 8, fp8_row_bytes(128, 16) + 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bytes per token"):
        check_decode_inputs(q_lat, q_R, pool, table, lens, scale, "fp8")


def test_entries_past_a_sequence_end_are_not_checked_or_read():
    q_lat, q_R, pool, table, lens, scale = _good(DEVICE)
    table = table.clone()
    table[0, 1:] = -7            # sequence 0 has 5 tokens: only entry 0 is in use
    problem = check_decode_inputs(q_lat, q_R, pool, table, lens, scale)
    assert problem == DecodeProblem(2, 2, 3, 32, 16, 8, pool.shape[0], table.shape[1], 20, False)
    if triton_available():
        _check(paged_mla_decode(q_lat, q_R, pool, table, lens, scale), oracle(q_lat, q_R, pool, table, lens, scale),
               torch.float32)


def test_tuning_arguments_are_checked():
    args = _good()
    for kw, words in ((dict(block_h=24), "power of two"), (dict(block_n=8), "at least 16"),
                      (dict(num_splits=0), "positive int"), (dict(num_warps=2.0), "positive int")):
        with pytest.raises(ValueError, match=words):
            paged_mla_decode(*args, **kw)


def test_num_splits_fills_the_machine_but_keeps_splits_long():
    p = DecodeProblem(1, 1, 128, 512, 64, 64, 1000, 512, 32768, False)     # V3, one 32K-token sequence
    assert choose_num_splits(p, 16, 132) == 33            # 8 programs -> 264 on a 132-SM GPU
    assert choose_num_splits(dataclasses.replace(p, batch=64), 16, 132) == 1
    assert choose_num_splits(dataclasses.replace(p, max_len=1000), 16, 132) == 4   # splits of >= 256 tokens
    assert choose_num_splits(dataclasses.replace(p, max_len=0), 16, 132) == 1
    assert choose_num_splits(p, 16, 1) == 1               # the interpreter: one "SM"


# --- the package without Triton, and the interpreter switch ----------------------------------------------
def _python(code: str, env: dict[str, str | None]) -> str:
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({k: v for k, v in env.items() if v is not None})
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


BLOCK_TRITON = """
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (blocked by the test)")
sys.meta_path.insert(0, _NoTriton())
"""


def test_package_imports_and_checks_inputs_without_triton():
    # and an explicit TRITON_INTERPRET=0 is left alone
    code = BLOCK_TRITON + """
import os, torch, mla_tutorial, mla_tutorial.kernels as k
print(os.environ["TRITON_INTERPRET"], k.INTERPRETER_SET_BY_PACKAGE, k.triton_available(), k.triton_mode())
q, r = torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 4)
pool, table, lens = torch.zeros(2, 4, 12), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
try:
    k.paged_mla_decode(q, r, pool[..., :11], table, lens, 0.1)
except ValueError as err:
    print("checked first:", "wide" in str(err))
try:
    k.paged_mla_decode(q, r, pool, table, lens, 0.1)
except k.TritonUnavailableError as err:
    print("then:", "pip install" in str(err))
"""
    out = _python(code, {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert out == "0 False False unavailable\nchecked first: True\nthen: True"


def test_interpreter_is_switched_on_at_import_without_a_gpu():
    code = """
import os, mla_tutorial
print(os.environ.get("TRITON_INTERPRET"))   # the package alone changes nothing
import mla_tutorial.kernels as k
print(os.environ.get("TRITON_INTERPRET"), k.INTERPRETER_SET_BY_PACKAGE, k.triton_mode())
"""
    mode = "interpreter" if triton_available() else "unavailable"
    assert _python(code, {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": ""}) == f"None\n1 True {mode}"


@needs_triton
def test_triton_imported_before_the_interpreter_was_set_is_a_clear_error():
    # torch.utils.flop_counter imports triton; its standard library is then built for a GPU
    code = """
import torch.utils.flop_counter, torch
import mla_tutorial.kernels as k
from mla_tutorial.quant import TILE
q, r = torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 4)
pool, table, lens = torch.zeros(2, 4, 20), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
try:
    k.paged_mla_decode(q, r, pool, table, lens, 0.1)
except k.TritonUnavailableError as err:
    print("refused:", "set TRITON_INTERPRET=1 in the environment before Python starts" in str(err))
"""
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU the kernels are compiled, not interpreted")
    assert _python(code, {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": ""}) == "refused: True"


@needs_triton
def test_compiled_kernels_refuse_cpu_tensors_with_a_clear_error(monkeypatch):
    from mla_tutorial.kernels import decode

    monkeypatch.setattr(decode, "INTERPRETED", False)   # as if TRITON_INTERPRET=0 at import
    with pytest.raises(ValueError, match="compiled Triton kernels need CUDA tensors"):
        paged_mla_decode(*_good())


# --- the benchmark script, at tiny sizes -----------------------------------------------------------------
@needs_triton
def test_benchmark_script_runs_and_records_what_the_chapter_reads(tmp_path, capsys):
    from mla_tutorial.kernels import bench
    from mla_tutorial.quant import fp8_row_bytes

    out = tmp_path / "r.json"
    result = bench.main(["--tiny", "--out", str(out), "--quiet", "--device", str(DEVICE)])
    # what a reader sees, the printed table and the JSON, has measurements and no pass/fail targets
    assert "target" not in capsys.readouterr().out.lower() and "target" not in out.read_text().lower()
    assert not any(name.startswith("TARGET") for name in vars(bench))
    saved = json.loads(out.read_text())
    assert saved["summary"] == result["summary"] and saved["command"].endswith(f"--device {DEVICE}")
    assert {"date", "device", "torch", "triton", "machine", "checks", "tuning", "chosen", "rows"} <= set(saved)
    assert saved["torch"] == torch.__version__ and saved["device"]["name"]
    assert saved["kind"] == ("gpu" if DEVICE.type == "cuda" else "smoke")
    if saved["kind"] == "smoke":
        assert "not a measurement" in saved["note"] and not any(k.startswith("speedup") for k in saved["summary"])
        assert not any("fraction_of_bound" in r for r in saved["rows"]), "no rates from the interpreter's timings"
    assert all(c["ok"] for c in saved["checks"]), saved["checks"]
    s = bench.TINY
    for r in saved["rows"]:
        assert "median_s" in r or "skipped" in r
        q_bytes = r["batch"] * s["heads"] * (2 * s["d_c"] + s["d_h_R"]) * 2
        per_token = {"triton_fp8": fp8_row_bytes(s["d_c"], s["d_h_R"]), "sdpa_expanded": s["heads"] *
                     (s["d_h"] + s["d_h_R"] + s["d_v"]) * 2}.get(r["impl"], (s["d_c"] + s["d_h_R"]) * 2)
        assert r["bytes"] == r["batch"] * r["context"] * per_token + q_bytes
    impls = {r["impl"] for r in saved["rows"] if "median_s" in r}
    assert impls == set(bench.IMPLS)
    assert "SMOKE TEST" in bench.format_kernel_results(saved) or saved["kind"] == "gpu"
    # the rendering a GPU run gets (the chapter shows it when one is recorded)
    machine = saved["machine"]
    as_gpu = {**saved, "kind": "gpu", "rows": [dict(r) for r in saved["rows"]]}
    for r in as_gpu["rows"]:
        if "median_s" in r:
            bench._rate(r, machine["bandwidth_bytes_per_s"], machine["peak_flops_per_s"])
    table = bench.format_kernel_results(as_gpu)
    assert "measured peaks" in table and "GB/s" in table and "of BW" in table
    summary = bench.summarize(as_gpu)
    assert summary["triton_bf16"]["cases"] == len(s["batches"]) * len(s["contexts"])
    assert 0 < summary["triton_bf16"]["median_fraction_of_bound"] and summary["all_checks_ok"]


def test_full_benchmark_refuses_to_run_without_a_gpu():
    from mla_tutorial.kernels import bench

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises((ValueError, RuntimeError), match="GPU|Triton"):
        bench.run_kernel_benchmark(tiny=False, progress=False)
