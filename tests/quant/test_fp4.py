"""NVFP4 / MXFP4 primitives, checked bit for bit (atol=0) against an independent reference.

The reference is numpy float32 arithmetic plus the ml_dtypes casts (float4_e2m1fn, float8_e4m3fn,
float8_e8m0fnu); where compressed-tensors is installed its own helpers are a second reference.
"""

import math
import re

import ml_dtypes
import numpy as np
import pytest
import torch

from compress.quant.fp4 import (MXFP4_GROUP_SIZE, NVFP4_GROUP_SIZE, mxfp4_block_scales, mxfp4_dequantize,
                                mxfp4_fake_quantize, mxfp4_quantize, nvfp4_block_scales, nvfp4_dequantize,
                                nvfp4_fake_quantize, nvfp4_global_scale, nvfp4_quantize)
from compress.kernels.fp4_packing import (E2M1_VALUES, e2m1_decode, e2m1_encode, e8m0_decode, pack_fp4,
                                        unpack_fp4)

F4, E4M3, E8M0 = ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu
f32 = np.float32

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
TIE_CODES = [0, 2, 2, 4, 4, 6, 6]                  # round half to even: 0, 1, 1, 2, 2, 4, 4


# --------------------------------------------------------------------------- the reference

def ref_e2m1(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=f32).astype(F4).view(np.uint8)


def ref_nvfp4(w: np.ndarray):
    """Global scale, fp8 block-scale bits, codes and float32 dequantized weight of ``w``."""
    rows, cols = w.shape
    wb = w.astype(f32).reshape(rows, cols // 16, 16)
    amax = np.abs(wb).max()
    g = f32(1.0) if amax == 0 else (f32(1) / amax) * f32(2688)
    s = (g * (np.abs(wb).max(-1) / f32(6))).astype(f32)
    s8 = np.minimum(s, f32(448)).astype(E4M3)
    s32 = s8.astype(f32)
    s8 = np.where(s32 == 0, f32(0.125), s32).astype(E4M3)
    eff = s8.astype(f32) / g
    scaled = wb / eff[..., None]
    scaled[scaled == 0] = 0.0                                # an exact zero gets code 0
    codes = ref_e2m1(scaled)
    deq = codes.view(F4).astype(f32) * eff[..., None]
    return g, s8.view(np.uint8), codes.reshape(rows, cols), deq.reshape(rows, cols)


def ref_mx_exponent(amax: float) -> int:
    """compressed-tensors' E8M0 exponent, from frexp: round amax up to a power of two when its
    significand is >= 1.75, take log2, subtract E2M1's emax 2, add the bias 127, clamp."""
    if amax == 0:
        return 0
    m, e = math.frexp(amax)                                  # amax = m * 2^e, m in [0.5, 1)
    e -= 1                                                   # significand 2m in [1, 2)
    if 2 * m >= 1.75:
        e += 1
    return min(max(e - 2 + 127, 0), 254)


def ref_mxfp4(w: np.ndarray):
    rows, cols = w.shape
    wb = w.astype(f32).reshape(rows, cols // 32, 32)
    s = np.array([[ref_mx_exponent(float(a)) for a in r] for r in np.abs(wb).max(-1)], dtype=np.uint8)
    scale = s.view(E8M0).astype(f32)
    scaled = wb / scale[..., None]
    scaled[scaled == 0] = 0.0
    codes = ref_e2m1(scaled)
    deq = codes.view(F4).astype(f32) * scale[..., None]
    return s, codes.reshape(rows, cols), deq.reshape(rows, cols)


def _weights(rows, cols, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * scale).to(dtype)


def _rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


# --------------------------------------------------------------------------- E2M1 codes

def test_every_code_decodes_like_ml_dtypes():
    codes = torch.arange(16, dtype=torch.uint8)
    ours = e2m1_decode(codes).numpy()
    ref = np.arange(16, dtype=np.uint8).view(F4).astype(f32)
    assert ours.view(np.uint32).tolist() == ref.view(np.uint32).tolist()   # -0.0 included
    assert ours[:8].tolist() == list(E2M1_VALUES)


def test_every_value_encodes_to_its_own_code():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_encode(e2m1_decode(codes)), codes)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ties_round_half_to_even(sign):
    x = torch.tensor(TIES) * sign
    want = [c | (8 if sign < 0 else 0) for c in TIE_CODES]
    assert e2m1_encode(x).tolist() == want
    assert ref_e2m1(x.numpy()).tolist() == want              # the reference agrees


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encode_matches_ml_dtypes(dtype):
    grid = np.array(E2M1_VALUES, dtype=f32)
    special = np.concatenate([grid, TIES, np.nextafter(f32(TIES), f32(0)), np.nextafter(f32(TIES), f32(9)),
                              [6.0001, 6.5, 7.0, 100.0, 3e38, np.inf, 1e-45, 1e-40, 1e-8, 0.0]]).astype(f32)
    rng = np.random.default_rng(0)
    rand = [rng.standard_normal(4000).astype(f32) * s for s in (0.01, 0.3, 1.0, 3.0, 100.0)]
    x = np.concatenate([special, -special, *rand])
    xt = torch.from_numpy(x).to(dtype)
    assert np.array_equal(e2m1_encode(xt).numpy(), ref_e2m1(xt.float().numpy()))


def test_encode_refuses_integer_input():
    with pytest.raises(ValueError, match="floating-point"):
        e2m1_encode(torch.tensor([1, 2]))


# --------------------------------------------------------------------------- packing

def test_pack_nibble_order_by_hand():
    codes = torch.tensor([[0x1, 0xF, 0x8, 0x7], [0x0, 0x2, 0xA, 0x0]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0xF1, 0x78], [0x20, 0x0A]]   # column 2k low nibble, 2k+1 high
    assert torch.equal(unpack_fp4(packed), codes)


@pytest.mark.parametrize("shape", [(1, 2), (3, 16), (7, 34), (64, 256)])
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_fp4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_fp4(packed), codes)


def test_pack_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    codes = torch.randint(0, 16, (9, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    values = e2m1_decode(codes)
    assert torch.equal(pack_fp4(codes), ct.pack_fp4_to_uint8(values))
    back = ct.unpack_fp4_from_uint8(pack_fp4(codes), 9, 64, dtype=torch.float32)
    assert torch.equal(back.view(torch.int32), values.view(torch.int32))


def test_pack_refuses_odd_columns_and_bad_codes():
    with pytest.raises(ValueError, match=r"even number of columns.*\(2, 5\)"):
        pack_fp4(torch.zeros(2, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_fp4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack_fp4(torch.zeros(2, 4, dtype=torch.int32))


def test_e8m0_decode_matches_ml_dtypes():
    s = np.arange(256, dtype=np.uint8)
    ours = e8m0_decode(torch.from_numpy(s)).numpy()
    ref = s.view(E8M0).astype(f32)
    assert np.array_equal(ours[:255], ref[:255]) and np.isnan(ours[255]) and np.isnan(ref[255])
    assert ours[0] == 2.0 ** -127 and ours[127] == 1.0 and ours[254] == 2.0 ** 127


# --------------------------------------------------------------------------- NVFP4

def test_global_scale():
    # compressed-tensors' ``448*6 / amax`` is evaluated by torch as reciprocal(amax) * 2688.
    amax = np.concatenate([[1e-3, 0.0173, 1.0, 3.7, 448.0, 6e4],
                           np.random.default_rng(12).uniform(1e-3, 10, 1000)]).astype(f32)
    g = torch.cat([nvfp4_global_scale(torch.tensor(a)) for a in amax])
    assert g.dtype == torch.float32
    assert np.array_equal(g.numpy(), (f32(1) / amax) * f32(2688))
    assert g[4].item() == np.nextafter(f32(6), f32(7)) and f32(2688) / f32(448) == 6   # amax 448: not 6
    assert nvfp4_global_scale(torch.tensor([0.5])).shape == (1,)
    for a in (0.0, 1e-40, 1e-37):                            # 2688 / amax overflows: 1.0, as CT
        assert nvfp4_global_scale(a).item() == 1.0
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="amax"):
            nvfp4_global_scale(bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 40.0])
def test_nvfp4_matches_reference(device, dtype, scale):
    w = _weights(48, 256, scale, seed=3, dtype=dtype)
    w[:, :16] *= torch.logspace(-4, 1, 48).unsqueeze(1).to(dtype)   # blocks spanning the fp8 range
    g_ref, s_ref, q_ref, deq_ref = ref_nvfp4(w.float().numpy())
    wd = w.to(device)
    g = nvfp4_global_scale(wd.float().abs().amax())
    bs = nvfp4_block_scales(wd, g)
    codes = nvfp4_quantize(wd, g, bs)
    deq = nvfp4_dequantize(codes, bs, g, torch.float32)
    assert g.item() == g_ref
    assert bs.dtype == torch.float8_e4m3fn and bs.shape == (48, 16)
    assert np.array_equal(bs.cpu().view(torch.uint8).numpy(), s_ref)
    assert np.array_equal(codes.cpu().numpy(), q_ref)
    assert np.array_equal(deq.cpu().numpy().view(np.uint32), deq_ref.view(np.uint32))
    fq = nvfp4_fake_quantize(wd)
    assert fq.dtype == dtype and torch.equal(fq, deq.to(dtype))


def test_block_scale_operation_order():
    # A real tie: global * (amax16 / 6) is exactly 21.0 (-> 20, half to even) while
    # global * amax16 / 6 is 21.000002 (-> 22). compressed-tensors takes the first order.
    amax_t, amax16 = f32(0.11549187451601028), f32(0.005413681734353304)
    g = (f32(1) / amax_t) * f32(2688)
    assert g * (amax16 / f32(6)) == f32(21.0)
    assert g * amax16 / f32(6) > f32(21.0)                   # the negative control
    assert f32(g * amax16 / f32(6)).astype(E4M3).astype(f32) == 22.0
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = float(amax_t), -float(amax16)
    bs = nvfp4_block_scales(w, nvfp4_global_scale(w.abs().amax()))
    assert bs.float().tolist() == [[448.0, 20.0]]


def test_block_scales_saturate_at_448():
    # A global scale meant for a larger tensor (say a fused q/k/v whose amax is elsewhere) is fine;
    # one too large for this tensor pushes block scales past E4M3's max: they clamp to 448, not NaN.
    w = _weights(2, 32, 1.0, seed=13)
    g = nvfp4_global_scale(w.abs().amax()) * 10
    bs = nvfp4_block_scales(w, g)
    assert (bs.float() == 448.0).all()
    codes = nvfp4_quantize(w, g, bs)
    assert ((codes & 7) == 7).any() and torch.isfinite(nvfp4_dequantize(codes, bs, g)).all()


def test_all_zero_block():
    w = _weights(2, 48, 1.0, seed=4)
    w[1, 16:32] = 0.0
    w[0, 32:48] = -0.0
    g = nvfp4_global_scale(w.abs().amax())
    bs = nvfp4_block_scales(w, g)
    assert bs[1, 1].item() == 0.125 and bs[0, 2].item() == 0.125      # compressed-tensors' eps
    codes = nvfp4_quantize(w, g, bs)
    assert (codes[1, 16:32] == 0).all() and (codes[0, 32:48] == 0).all()   # -0.0 -> code 0, as CT
    deq = nvfp4_dequantize(codes, bs, g)
    assert torch.isfinite(deq).all()
    assert deq[1, 16:32].tolist() == [0.0] * 16 and deq[0, 32:48].tolist() == [0.0] * 16


def test_all_zero_tensor():
    w = torch.zeros(4, 32, dtype=torch.bfloat16)
    g = nvfp4_global_scale(w.float().abs().amax())
    assert g.item() == 1.0
    assert (nvfp4_block_scales(w, g).float() == 0.125).all()
    out = nvfp4_fake_quantize(w)
    assert torch.isfinite(out).all() and torch.equal(out, w)


def test_negative_values_that_round_to_zero_keep_the_sign():
    w = torch.tensor([[6.0, -0.0, 0.0, -0.1, 0.1] + [0.0] * 11])
    codes = nvfp4_quantize(w, nvfp4_global_scale(6.0), nvfp4_block_scales(w, nvfp4_global_scale(6.0)))
    assert codes[0, :5].tolist() == [7, 0, 0, 8, 0]


def test_outlier_block():
    w = _weights(1, 16, 0.01, seed=5)
    w[0, 7] = -50.0
    g = nvfp4_global_scale(w.abs().amax())
    bs = nvfp4_block_scales(w, g)
    assert bs.item() == 448.0
    codes = nvfp4_quantize(w, g, bs)
    deq = nvfp4_dequantize(codes, bs, g)
    eff = bs.float() / g                                     # the dequantization step
    assert codes[0, 7].item() == 15 and deq[0, 7].item() == (-6.0 * eff).item()
    assert abs(deq[0, 7].item() + 50.0) <= 50.0 * 2 ** -20
    others = torch.cat([codes[0, :7], codes[0, 8:]]) & 7
    assert (others <= 1).all() and (deq[0, :7].abs() <= eff).all()


def test_subnormal_block_scales():
    # amax 2688 makes the global scale exactly 1, so a block with amax 6 * k * 2^-9 gets the
    # E4M3 subnormal scale k * 2^-9 (below the smallest normal 2^-6). Below 2^-10 the scale rounds
    # to 0 and becomes compressed-tensors' 0.125: such a block quantizes to zeros.
    amaxes = [6 * k * 2.0 ** -9 for k in range(1, 8)] + [6 * 1.4 * 2.0 ** -10, 6 * 0.9 * 2.0 ** -10]
    w = _weights(len(amaxes) + 1, 16, 1.0, seed=6)
    w[0] = 0.0
    w[0, 3] = 2688.0
    for r, a in enumerate(amaxes, start=1):
        w[r] = w[r] / w[r].abs().max() * a
    g = nvfp4_global_scale(w.abs().amax())
    assert g.item() == 1.0
    bs = nvfp4_block_scales(w, g)
    bits = bs.view(torch.uint8)[1:, 0].tolist()
    assert bits[:7] == list(range(1, 8))                     # exponent field 0: subnormal
    assert bits[7] == 1                                      # 1.4 * 2^-10 rounds up to 2^-9
    assert bs[-1, 0].item() == 0.125
    g_ref, s_ref, q_ref, deq_ref = ref_nvfp4(w.numpy())
    codes = nvfp4_quantize(w, g, bs)
    assert np.array_equal(bs.view(torch.uint8).numpy(), s_ref) and np.array_equal(codes.numpy(), q_ref)
    deq = nvfp4_dequantize(codes, bs, g)
    assert np.array_equal(deq.numpy(), deq_ref) and (deq[-1] == 0).all()
    assert ((deq[1:9] - w[1:9]).abs() <= bs[1:9].float()).all()   # half the widest grid step (4 to 6)


def test_nvfp4_round_trip_error():
    w = _weights(256, 1024, 0.02, seed=7)
    err = _rel_rms(nvfp4_fake_quantize(w), w)
    assert 0.085 < err < 0.105                               # measured 0.095
    # Negative control: the right codes on the wrong (shifted) block scales do much worse.
    g = nvfp4_global_scale(w.abs().amax())
    bs = nvfp4_block_scales(w, g)
    codes = nvfp4_quantize(w, g, bs)
    assert _rel_rms(nvfp4_dequantize(codes, bs.roll(1, dims=1), g), w) > 3 * err


# --------------------------------------------------------------------------- MXFP4

def test_mxfp4_exponent_rule_on_edge_values():
    amaxes = [0.0, 1e-45, 2.0 ** -126, 2.0 ** -120, 1.0, 1.5, 1.74999, 1.75, 1.9999999, 2.0, 6.0, 7.0, 8.0,
              0.75, 3.5e-3, 1e30, 3e38]
    amaxes = [float(f32(a)) for a in amaxes] + [float(np.nextafter(f32(1.75), f32(0)))]
    w = torch.zeros(len(amaxes), 32)
    w[:, 5] = torch.tensor(amaxes)
    got = mxfp4_block_scales(w)[:, 0].tolist()
    assert got == [ref_mx_exponent(a) for a in amaxes]
    assert got[4:10] == [125, 125, 125, 126, 126, 126]       # 1.75 rounds up: 2^-1 instead of 2^-2
    ct = pytest.importorskip("compressed_tensors.quantization.utils.mxfp_utils")
    theirs = ct.generate_mx_scales(torch.tensor(amaxes)).clamp(0, 255).tolist()
    # The one documented difference: 3e38 rounds up to 2^128 = inf, which they store as 255 (NaN).
    assert got[16] == 253 and theirs[16] == 255
    assert got[:16] + got[17:] == theirs[:16] + theirs[17:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 40.0])
def test_mxfp4_matches_reference(device, dtype, scale):
    w = _weights(32, 256, scale, seed=8, dtype=dtype)
    w[:, :32] *= torch.logspace(-3, 2, 32).unsqueeze(1).to(dtype)
    s_ref, q_ref, deq_ref = ref_mxfp4(w.float().numpy())
    wd = w.to(device)
    s = mxfp4_block_scales(wd)
    codes = mxfp4_quantize(wd, s)
    deq = mxfp4_dequantize(codes, s)
    assert s.dtype == torch.uint8 and s.shape == (32, 8)
    assert np.array_equal(s.cpu().numpy(), s_ref) and np.array_equal(codes.cpu().numpy(), q_ref)
    assert np.array_equal(deq.cpu().numpy().view(np.uint32), deq_ref.view(np.uint32))
    fq = mxfp4_fake_quantize(wd)
    assert fq.dtype == dtype and torch.equal(fq, deq.to(dtype))


def test_mxfp4_zero_block_and_outlier():
    w = _weights(2, 64, 0.01, seed=9)
    w[0, :32] = 0.0
    w[1, 40] = 20.0                                          # significand 1.25 -> scale 2^(4-2)
    s = mxfp4_block_scales(w)
    assert s[0, 0].item() == 0 and s[1, 1].item() == 127 + 2
    codes = mxfp4_quantize(w, s)
    deq = mxfp4_dequantize(codes, s)
    assert (codes[0, :32] == 0).all() and (deq[0, :32] == 0).all() and torch.isfinite(deq).all()
    assert deq[1, 40].item() == 16.0 and codes[1, 40].item() == 6   # 20 / 4 = 5, a tie -> 4
    assert ((codes[1, 32:] & 7) <= 1).sum() == 31


def test_mxfp4_round_trip_error():
    w = _weights(256, 1024, 0.02, seed=10)
    err = _rel_rms(mxfp4_fake_quantize(w), w)
    assert 0.10 < err < 0.125                                # measured 0.112
    assert err > _rel_rms(nvfp4_fake_quantize(w), w)          # coarser scales than NVFP4
    s = mxfp4_block_scales(w)
    assert _rel_rms(mxfp4_dequantize(mxfp4_quantize(w, s), s + 1), w) > 3 * err   # negative control


# --------------------------------------------------------------------------- compressed-tensors

def _ct_weights(dtype):
    w = _weights(64, 256, 1.0, seed=11) * torch.logspace(-8, 2, 64).unsqueeze(1)
    w[3, 16:48] = 0.0
    w[5, :5] = -0.0
    w[7, 40] = 1e4
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_matches_compressed_tensors(dtype):
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4, unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    args = NVFP4A16["weights"]
    w = _ct_weights(dtype)
    wf = w.float().reshape(64, 16, 16)                       # observers see float32 statistics
    ct_g = helpers.generate_gparam(wf.amin(), wf.amax())
    ct_s, _ = helpers.calculate_qparams(wf.amin(-1), wf.amax(-1), args, global_scale=ct_g)
    ct_packed = quantize_and_pack_fp4(w, ct_s, global_scale=ct_g, group_size=16)
    ct_deq = dequantize(x_q=unpack_fp4_from_uint8(ct_packed, 64, 256), scale=ct_s.to(torch.bfloat16),
                        args=args, global_scale=ct_g, dtype=torch.bfloat16)
    g = nvfp4_global_scale(w.float().abs().amax())
    bs = nvfp4_block_scales(w, g)
    codes = nvfp4_quantize(w, g, bs)
    assert torch.equal(g, ct_g)
    assert torch.equal(bs.view(torch.uint8), ct_s.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(pack_fp4(codes), ct_packed)
    ours = nvfp4_dequantize(codes, bs, g, torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), ct_deq.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_matches_compressed_tensors(dtype):
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.compressors.mx_utils import compress_mx_scale, decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4, unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.quant_scheme import MXFP4A16
    args = MXFP4A16["weights"]
    w = _ct_weights(dtype)
    wf = w.float().reshape(64, 8, 32)
    ct_scale, _ = helpers.calculate_qparams(wf.amin(-1), wf.amax(-1), args)   # float powers of two
    ct_s = compress_mx_scale(ct_scale, torch.uint8)
    ct_packed = quantize_and_pack_fp4(w, ct_scale, group_size=32)
    ct_deq = dequantize(x_q=unpack_fp4_from_uint8(ct_packed, 64, 256), scale=decompress_mx_scale(ct_s),
                        args=args, dtype=torch.bfloat16)
    s = mxfp4_block_scales(w)
    codes = mxfp4_quantize(w, s)
    assert torch.equal(s, ct_s) and torch.equal(pack_fp4(codes), ct_packed)
    assert torch.equal(mxfp4_dequantize(codes, s, torch.bfloat16).view(torch.int16), ct_deq.view(torch.int16))


# --------------------------------------------------------------------------- loud failures

NAME = "model.layers.0.mlp.up_proj.weight"
QUANTIZERS = {
    "nvfp4_block_scales": lambda w: nvfp4_block_scales(w, 1.0, name=NAME),
    "nvfp4_quantize": lambda w: nvfp4_quantize(w, 1.0, torch.ones(w.shape[0], w.shape[1] // 16), name=NAME),
    "nvfp4_fake_quantize": lambda w: nvfp4_fake_quantize(w, name=NAME),
    "mxfp4_block_scales": lambda w: mxfp4_block_scales(w, name=NAME),
    "mxfp4_quantize": lambda w: mxfp4_quantize(w, torch.full((w.shape[0], w.shape[1] // 32), 127,
                                                               dtype=torch.uint8), name=NAME),
    "mxfp4_fake_quantize": lambda w: mxfp4_fake_quantize(w, name=NAME),
}


@pytest.mark.parametrize("fn", QUANTIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(fn, bad):
    w = torch.randn(4, 64)
    w[2, 33] = bad
    want = re.escape(f"{NAME} has 1 non-finite values (NaN or inf), the first at (2, 33)")
    want += ".*add it to `ignore`"
    with pytest.raises(ValueError, match=want):
        QUANTIZERS[fn](w)


@pytest.mark.parametrize("fn, block", [(f, NVFP4_GROUP_SIZE if f.startswith("nv") else MXFP4_GROUP_SIZE)
                                       for f in QUANTIZERS])
def test_columns_must_fill_whole_blocks(fn, block):
    cols = block * 3 // 2                                    # 24 for NVFP4, 48 for MXFP4
    want = re.escape(f"{NAME} has shape (4, {cols})") + f".*blocks of {block}.*not a multiple of {block}"
    with pytest.raises(ValueError, match=want):
        QUANTIZERS[fn](torch.randn(4, cols))


def test_bad_scales_are_refused():
    w = torch.randn(2, 32)
    g = nvfp4_global_scale(w.abs().amax())
    bs = nvfp4_block_scales(w, g)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        nvfp4_quantize(w, g, bs[:, :1])
    with pytest.raises(ValueError, match="finite and positive"):
        nvfp4_quantize(w, g, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="global scale"):
        nvfp4_quantize(w, 0.0, bs)
    with pytest.raises(ValueError, match="E8M0 NaN"):
        mxfp4_quantize(w, torch.full((2, 1), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        mxfp4_dequantize(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 1))


def test_e2m1_round_is_encode_then_decode():
    from compress.kernels.fp4_packing import e2m1_round
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, 6.0, 7.0, 1e9, float("inf")])
    x = torch.cat([ties, -ties, torch.randn(10_000) * 3, torch.randn(1000) * 1e-3])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        assert torch.equal(e2m1_round(xd), e2m1_decode(e2m1_encode(xd)))
    assert not torch.equal(e2m1_round(torch.tensor([0.25])), torch.tensor([0.5]))      # negative control
