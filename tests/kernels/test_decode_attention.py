"""Decode attention over a quantized KV cache: the Triton kernel against the reference (a table of
tiny caches, every format, odd lengths, GQA ratios, splits), and the reference against float
attention (rotation, 8-bit accuracy, a 2-bit negative control). Under the interpreter on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_cases import CUDA, rel_err, triton_device  # noqa: F401  (fixture)

from compress.errors import ConfigError
from compress.kernels.decode_attention import (choose_num_splits, decode_attention, decode_attention_reference,
                                               layout_unsupported)
from compress.kernels.hadamard import rotate
from compress.kv import quant as kq

# ||kernel - reference|| / ||reference|| per query dtype. The reference rounds the dequantized cache to
# the cache dtype and computes in float32; the kernel rounds elsewhere (q * key_scale and p * value_scale
# as tl.dot operands, the output under the interpreter toward zero), so 16-bit dtypes differ by about
# their own rounding of K and V, amplified by the softmax. float32 is exact up to summation order.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def make_cache(b: int, h: int, d: int, length: int, res: int, *, bits: int = 4, fp8: bool = False,
               group_size: int = 32, value_group: int | None = None, dtype=torch.float16, rotated: bool = False,
               seed: int = 0, spare: int = 8, v_spare: int | None = None, device="cpu"):
    """A QuantizedKV of random keys (with outlier channels and offsets) and values, stored as the cache
    stores it: quantized tensors are whole preallocated buffers with ``spare`` extra tokens of garbage
    (random codes, NaN scales, NaN fp8 bytes), the tokens of a partial last key block past ``length``
    hold real codes of other tokens, and the residual window is a view into a larger buffer.
    Returns (kv, k, v): k, v (B, H, length + res, D) float32, the unquantized, unrotated cache."""
    gen = torch.Generator().manual_seed(seed)
    nb = -(-length // group_size)
    stored = length if fp8 else nb * group_size          # quantized tokens written, incl. a partial block's tail
    n = stored + res
    chan = 1 + 4 * (torch.rand(d, generator=gen) < 0.1).float()
    k = torch.randn(b, h, n, d, generator=gen) * chan + torch.randn(d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen)
    kr = rotate(k) if rotated else k
    res_k = torch.randn(b, h, res + 5, d, generator=gen) * 1e3
    res_v = torch.randn(b, h, res + 5, d, generator=gen) * 1e3
    res_k[:, :, :res], res_v[:, :, :res] = kr[:, :, stored:], v[:, :, stored:]
    k_res, v_res = res_k.to(dtype)[:, :, :res], res_v.to(dtype)[:, :, :res]
    cap, v_cap = stored + spare, stored + (spare if v_spare is None else v_spare)

    def garbage(t, *shape):
        return torch.randint(0, 256, (b, h, t, *shape), generator=gen, dtype=torch.uint8)

    if fp8:
        def head_scale(x):
            return (x.abs().amax((0, 2, 3)) / kq.FP8_MAX).clamp_min(1e-6) if length else torch.ones(h)
        ks, vs = head_scale(kr[:, :, :length]), head_scale(v[:, :, :length])
        kc, vc = garbage(cap, d).view(kq.FP8_DTYPE), garbage(v_cap, d).view(kq.FP8_DTYPE)
        kc[:, :, :length] = kq.quantize_fp8(kr[:, :, :length], ks)
        vc[:, :, :length] = kq.quantize_fp8(v[:, :, :length], vs)
        kv = kq.QuantizedKV(8, True, group_size, length, kc, ks, None, vc, vs, None, k_res, v_res, rotated)
    else:
        gv = value_group or min(group_size, d)
        width = kq.packed_width(d, bits)
        nan = float("nan")
        kc, vc = garbage(cap, width), garbage(v_cap, width)
        k_scale = torch.full((b, h, nb + 2, d), nan, dtype=kq.SCALE_DTYPE)
        k_min = torch.full((b, h, nb + 2, d), nan, dtype=kq.SCALE_DTYPE)
        v_scale = torch.full((b, h, v_cap, d // gv), nan, dtype=kq.SCALE_DTYPE)
        v_min = torch.full((b, h, v_cap, d // gv), nan, dtype=kq.SCALE_DTYPE)
        if length:
            kc[:, :, :stored], k_scale[:, :, :nb], k_min[:, :, :nb] = kq.quantize_key_blocks(
                kr[:, :, :stored], bits, group_size)
            vc[:, :, :length], v_scale[:, :, :length], v_min[:, :, :length] = kq.quantize_values(
                v[:, :, :length], bits, gv)
        kv = kq.QuantizedKV(bits, False, group_size, length, kc, k_scale, k_min, vc, v_scale, v_min, k_res, v_res,
                            rotated)
    keep = torch.cat([torch.arange(length), torch.arange(stored, n)])
    if device != "cpu":
        kv = dataclasses.replace(kv, **{f.name: getattr(kv, f.name).to(device) for f in dataclasses.fields(kv)
                                        if isinstance(getattr(kv, f.name), torch.Tensor)})
    return kv, k[:, :, keep], v[:, :, keep]


def float_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention in float64, query head i on KV head i // (Hq / H)."""
    b, hq, d = q.shape
    h = k.shape[1]
    qg = q.double().reshape(b, h, hq // h, d)
    p = (torch.einsum("bhgd,bhtd->bhgt", qg, k.double()) * scale).softmax(-1)
    return torch.einsum("bhgt,bhtd->bhgd", p, v.double()).reshape(b, hq, d)


def queries(b: int, hq: int, d: int, dtype, device, seed: int = 1) -> torch.Tensor:
    return (torch.randn(b, hq, d, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype).to(device)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 1
    h: int = 2
    group: int = 4                  # query heads per KV head
    d: int = 64
    length: int = 77
    res: int = 32
    bits: int = 4
    fp8: bool = False
    group_size: int = 32
    value_group: int | None = None
    dtype: torch.dtype = torch.float16
    q_dtype: torch.dtype | None = None
    rotated: bool = False
    num_splits: int | None = None
    block_n: int | None = None


CASES = [
    Case("int4-partial-block-gqa4", b=2),                                             # 77 = 2*32 + 13
    Case("int8-gqa3-4vgroups-3splits", b=2, group=3, length=50, res=16, bits=8, group_size=16,
         dtype=torch.bfloat16, num_splits=3),
    Case("int2-mha-no-residual-1split", group=1, length=130, res=0, bits=2, group_size=64,
         dtype=torch.float32, num_splits=1),
    Case("fp8-gqa4-many-splits", b=2, length=45, res=0, fp8=True, dtype=torch.bfloat16, num_splits=64),
    Case("fp8-rotated-residual", group=1, length=40, res=24, fp8=True, rotated=True, num_splits=3),
    Case("only-residual-3-splits", b=2, group=3, d=32, length=0, res=40, group_size=16, num_splits=3),
    Case("int4-rotated-8chan-vgroups", group=2, d=32, length=60, res=16, group_size=16, value_group=8,
         dtype=torch.float32, rotated=True, num_splits=3),
    Case("int4-d128-gqa8-g128", h=1, group=8, d=128, length=200, res=128, group_size=128, value_group=64,
         dtype=torch.bfloat16, num_splits=2),
    Case("int2-d16", group=2, d=16, length=37, res=16, bits=2, group_size=16, dtype=torch.float32),
    Case("int4-4-tiles-per-block", length=64, res=0, group_size=64, num_splits=1, block_n=16),
    Case("int4-fp32-query-fp16-cache", group=2, length=33, res=8, q_dtype=torch.float32),
    Case("int8-fp16-many-splits", length=96, res=32, bits=8, value_group=64, num_splits=100),
    Case("int4-d256", h=1, group=2, d=256, length=40, res=8, dtype=torch.bfloat16),
    Case("int2-fp16-code-pairs", group=2, length=70, res=8, bits=2, group_size=32),      # 2-bit fp16x2 pairs
    Case("int2-d16-bf16-one-word", group=2, d=16, length=37, res=16, bits=2, group_size=16, dtype=torch.bfloat16),
]


def run_case(case: Case, device: str, **kw):
    kv, k, v = make_cache(case.b, case.h, case.d, case.length, case.res, bits=case.bits, fp8=case.fp8,
                          group_size=case.group_size, value_group=case.value_group, dtype=case.dtype,
                          rotated=case.rotated, device=device, **kw)
    q = queries(case.b, case.h * case.group, case.d, case.q_dtype or case.dtype, device)
    return kv, q


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_the_reference(case, triton_device):
    from compress.kernels import decode_attention_triton as tk
    kv, q = run_case(case, triton_device)
    scale = case.d ** -0.5
    ref = decode_attention_reference(q, kv, scale)
    out = torch.full_like(q, float("nan"))                    # every element must be written
    y = tk.decode_attention(q, kv, scale, num_splits=case.num_splits, block_n=case.block_n, out=out)
    assert y.shape == q.shape and y.dtype == q.dtype
    # The reference rounds the dequantized cache to the cache dtype: the coarser dtype sets the bound.
    assert rel_err(y, ref) < max(REL_TOL[q.dtype], REL_TOL[kv.dtype])


@pytest.mark.parametrize("bits", [4, 2])
def test_code_rows_read_byte_by_byte_give_the_same_result(bits, triton_device, monkeypatch):
    """Caches whose rows cannot be read as int32 words (``_word_rows`` false: unaligned) take the
    per-column loader in the same column order; both match the reference."""
    from compress.kernels import decode_attention_triton as tk
    kv, q = run_case(Case("bytes", length=70, res=8, bits=bits, group_size=32), triton_device)
    ref = decode_attention_reference(q, kv, 0.125)
    words = tk.decode_attention(q, kv, 0.125, num_splits=2)
    monkeypatch.setattr(tk, "_word_rows", lambda *a: False)
    by_byte = tk.decode_attention(q, kv, 0.125, num_splits=2)
    assert rel_err(words, ref) < REL_TOL[q.dtype] and rel_err(by_byte, ref) < REL_TOL[q.dtype]


def test_dispatch_runs_the_kernel_with_the_heuristic_splits(triton_device):
    case = Case("dispatch", b=2, length=100, res=16, group_size=16)
    kv, q = run_case(case, triton_device)
    y = decode_attention(q, kv, 0.125, backend="triton")
    assert rel_err(y, decode_attention_reference(q, kv, 0.125)) < REL_TOL[q.dtype]


@pytest.mark.parametrize("fp8", [False, True])
def test_tokens_past_length_are_never_read(fp8, triton_device):
    """Two caches that differ only in their garbage (codes past ``length``, NaN scales of unwritten
    blocks and tokens, NaN fp8 bytes) give bit-identical outputs."""
    kw = dict(fp8=fp8, group_size=32, dtype=torch.float32, device=triton_device)
    kv1, _, _ = make_cache(1, 2, 32, 45, 8, seed=3, spare=40, **kw)
    kv2, _, _ = make_cache(1, 2, 32, 45, 8, seed=3, spare=40, **kw)
    for a, b_ in ((kv2.k_codes, kv1.k_codes), (kv2.v_codes, kv1.v_codes)):
        a.view(torch.uint8)[:, :, 45:] = 0x7F                 # an fp8 NaN / a large int code
        assert not torch.equal(a.view(torch.uint8), b_.view(torch.uint8))
    q = queries(1, 4, 32, torch.float32, triton_device)
    from compress.kernels import decode_attention_triton as tk
    assert torch.equal(tk.decode_attention(q, kv1, 0.2, num_splits=2), tk.decode_attention(q, kv2, 0.2, num_splits=2))


def test_strided_queries_and_caches(triton_device):
    """A query that is a view of a (B, 1, Hq, D) tensor, a value buffer of another capacity than the
    key buffer (different strides: the kernel reads copies), and a residual that is a view."""
    from compress.kernels import decode_attention_triton as tk
    kv, _, _ = make_cache(2, 2, 32, 50, 16, group_size=16, dtype=torch.float32, v_spare=30, device=triton_device)
    assert kv.k_codes.stride() != kv.v_codes.stride()
    q_big = torch.randn(2, 4, 48, device=triton_device)
    q = q_big[:, :, 8:40]                                      # rows 48 apart
    ref = decode_attention_reference(q.contiguous(), kv, 0.2)
    assert rel_err(tk.decode_attention(q, kv, 0.2, num_splits=2), ref) < REL_TOL[torch.float32]
    qt = torch.randn(2, 32, 4, device=triton_device).transpose(1, 2)                # last dim strided
    ref = decode_attention_reference(qt.contiguous(), kv, 0.2)
    assert rel_err(tk.decode_attention(qt, kv, 0.2), ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_cache_gives_zeros(backend, triton_device):
    kv, _, _ = make_cache(2, 2, 32, 0, 0, device=triton_device)
    q = queries(2, 4, 32, torch.float16, triton_device)
    y = decode_attention(q, kv, 0.2, backend=backend)
    assert y.shape == q.shape and torch.equal(y, torch.zeros_like(q))


# --- the reference against float attention ---------------------------------------------------------------

@pytest.mark.parametrize("fp8", [False, True])
def test_reference_rotated_keys_equal_unrotated_attention(fp8):
    """Rotating the query instead of un-rotating the keys is exact: the reference on a rotated cache
    equals plain attention on ``kv.dequantize()`` (keys rotated back) with the unrotated query."""
    kv, _, _ = make_cache(2, 2, 64, 70, 16, fp8=fp8, dtype=torch.float32, rotated=True)
    q = queries(2, 8, 64, torch.float32, "cpu")
    k, v = kv.dequantize()                                    # unrotate=True
    assert rel_err(decode_attention_reference(q, kv, 0.125), float_attention(q, k, v, 0.125)) < 1e-5
    # Negative control: forgetting to rotate the query changes the result.
    plain = dataclasses.replace(kv, rotated=False)
    assert rel_err(decode_attention_reference(q, plain, 0.125), float_attention(q, k, v, 0.125)) > 0.05


def quantization_error(bits: int = 8, fp8: bool = False) -> float:
    kv, k, v = make_cache(2, 2, 64, 192, 0, bits=bits, fp8=fp8, group_size=32, dtype=torch.float32, seed=5)
    q = queries(2, 8, 64, torch.float32, "cpu")
    return rel_err(decode_attention_reference(q, kv, 0.125), float_attention(q, k, v, 0.125))


def test_reference_8bit_is_close_to_float_attention():
    # The cache itself is off by ~0.4% (int8) and ~2.7% (E4M3: 3 mantissa bits); a sharp softmax over
    # 192 tokens roughly doubles or triples that in the output (measured: 0.9% and 7.5%).
    assert quantization_error(bits=8) < 0.02
    assert quantization_error(fp8=True) < 0.1


def test_reference_2bit_differs_measurably_from_float_attention():
    """Negative control: the comparison above can fail. 2-bit keys and values move the output by
    tens of percent, far more than 4 bits, which is far more than 8."""
    err2, err4, err8 = quantization_error(bits=2), quantization_error(bits=4), quantization_error(bits=8)
    assert err2 > 0.2
    assert err2 > 3 * err4 > 9 * err8


# --- dispatch ------------------------------------------------------------------------------------------------

def test_torch_and_cpu_auto_run_the_reference():
    kv, _, _ = make_cache(1, 2, 32, 40, 8, dtype=torch.float32)
    q = queries(1, 4, 32, torch.float32, "cpu")
    ref = decode_attention_reference(q, kv, 0.2)
    assert torch.equal(decode_attention(q, kv, 0.2, backend="torch"), ref)
    assert torch.equal(decode_attention(q, kv, 0.2), ref)      # auto: the interpreter is never chosen


def test_bad_arguments_fail_loudly():
    kv, _, _ = make_cache(1, 2, 32, 40, 8)
    with pytest.raises(ConfigError, match="backend"):
        decode_attention(queries(1, 4, 32, torch.float16, "cpu"), kv, 0.2, backend="cuda")
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(queries(1, 3, 32, torch.float16, "cpu"), kv, 0.2)
    with pytest.raises(ValueError, match=r"\(B, Hq, D\)"):
        decode_attention(torch.zeros(1, 4, 1, 32, dtype=torch.float16), kv, 0.2)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(queries(1, 4, 32, torch.float16, "cpu"), kv, 0.2, num_splits=0)


def test_layouts_the_kernel_cannot_read_fall_back_or_are_refused(triton_device):
    kv, _, _ = make_cache(1, 2, 32, 40, 8, group_size=8, device=triton_device)
    q = queries(1, 4, 32, torch.float16, triton_device)
    assert "group_size" in layout_unsupported(q, kv)
    ref = decode_attention_reference(q, kv, 0.2)
    assert torch.equal(decode_attention(q, kv, 0.2, backend="torch"), ref)
    if CUDA:
        assert torch.equal(decode_attention(q, kv, 0.2), ref)                  # auto falls back
    with pytest.raises(ConfigError, match="group_size"):
        decode_attention(q, kv, 0.2, backend="triton")
    kv2, _, _ = make_cache(1, 2, 32, 40, 8, bits=2, value_group=2)
    assert "whole bytes" in layout_unsupported(queries(1, 4, 32, torch.float16, "cpu"), kv2)


def test_split_heuristic():
    # Llama-3-8B decode on an H100: 8 x 8 programs want ~4 per SM -> 9 splits of a 32k cache.
    assert choose_num_splits(8, 8, 32768, 132) == 9
    assert choose_num_splits(1, 8, 32768, 132) == 66
    assert choose_num_splits(64, 8, 32768, 132) == 2
    assert choose_num_splits(1, 8, 300, 132) == 2                             # >= 256 tokens per split
    assert choose_num_splits(256, 8, 100, 132) == 1


def test_kernel_reads_fp8_scales_and_minima(triton_device):
    """KVCacheConfig.scale_dtype fp8: the kernel reads the E4M3 scales and minima (widened to fp16)."""
    from compress.kernels import decode_attention_triton as tk
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 96, 32, generator=torch.Generator().manual_seed(1)) * 3 + 1, torch.randn(1, 2, 96, 32, generator=gen)
    fp8 = torch.float8_e4m3fn
    kc, ks, km = kq.quantize_key_blocks(k, 4, 16, fp8)
    vc, vs, vm = kq.quantize_values(v, 4, 16, fp8)
    res = torch.randn(1, 2, 8, 32, generator=gen).half()
    kv = kq.QuantizedKV(4, False, 16, 96, kc, ks, km, vc, vs, vm, res, res.clone())
    kv = type(kv)(**{f: (t.to(triton_device) if isinstance(t, torch.Tensor) else t) for f, t in vars(kv).items()})
    q = torch.randn(1, 4, 32, generator=gen).half().to(triton_device)
    ref = decode_attention_reference(q, kv, 0.2)
    assert rel_err(tk.decode_attention(q, kv, 0.2, num_splits=2), ref) < 3e-3
