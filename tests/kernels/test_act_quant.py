"""Activation quantization for W8A8 / W4A8 / W4A4: the reference's defining properties, and the fused
Triton kernel equal to it bit for bit (codes compared as bytes, -0 included; scales exactly) for FP8,
INT8 and INT4, per token / per group / per tensor, every kernel config, and the edge rows."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import triton_device  # noqa: F401  (fixture)

from compress.errors import ConfigError
from compress.kernels.act_quant import (FP8_MIN_SCALE, dequantize_activations, fake_quantize_activations,
                                        quantize_activations, quantize_activations_reference)

KINDS = ("fp8", "int8", "int4")
QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}
STRATEGIES = ("token", "group", "tensor")
# (M, K, group_size): M = 1; K not a multiple of any tile or group (200, 576 = SmolLM2, 300 with
# groups of 88); a group wider than K; a group equal to K.
SHAPES = [(1, 200, 128), (3, 576, 128), (4, 300, 88), (2, 64, 128), (5, 96, 32)]
STATIC = torch.tensor([0.02])                  # saturates rows of |x| > 8.96 (fp8) / 2.54 (int8) / 0.14 (int4)


def _bytes(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


def _rows(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows with an all-zero row, a large-magnitude row and a row of tiny values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    if m >= 2:
        x[1] = 0.0
    if m >= 3:
        x[2] *= 1e5 if dtype == torch.float32 else 1e3      # amax ~4e5 (float32), ~4e3 (inside fp16's range)
    if m >= 4:
        x[3] *= 1e-3
    return x.to(dtype)


def _assert_same(got, want):
    (c, s), (rc, rs) = got, want
    assert c.dtype == rc.dtype and c.shape == rc.shape
    assert torch.equal(_bytes(c), _bytes(rc)), f"{(_bytes(c) != _bytes(rc)).sum().item()} codes differ"
    assert s.dtype == torch.float32 and torch.equal(s, rs)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("kind", KINDS)
def test_reference_scales_and_round_trip(kind):
    x = _rows(4, 256, torch.float32)
    codes, scale = quantize_activations_reference(x, kind, "token")
    qmax = QMAX[kind]
    assert torch.equal(scale[0], x[0].abs().max().reshape(1) / qmax)
    assert scale[1].item() == pytest.approx(FP8_MIN_SCALE if kind == "fp8" else 1e-10, rel=1e-6)   # zero row: floor
    assert torch.count_nonzero(codes[1].float()) == 0
    back = dequantize_activations(codes, scale, "token")
    # E4M3 keeps 3 mantissa bits (<= 1/16 relative), INT8 / INT4 half a step of amax / 127 / amax / 7.
    err = ((back - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30))[[0, 2, 3]]
    assert err.max() < {"fp8": 0.04, "int8": 0.01, "int4": 0.2}[kind]
    assert codes.float().min() >= -qmax - 1 and codes.float().max() <= qmax
    assert (err > 1e-4).all()                                              # negative control: it rounds


def test_reference_groups_are_independent():
    x = torch.ones(1, 300)
    x[0, 130] = 1000.0                                                     # only group 1 sees it
    codes, scale = quantize_activations_reference(x, "int8", "group", group_size=128)
    assert scale.shape == (1, 3) and scale[0, 0] == scale[0, 2] == 1.0 / 127.0
    assert codes[0, 0] == 127 and codes[0, 129] == 0 and codes[0, 130] == 127
    fq = fake_quantize_activations(x, "int8", "group", group_size=128)
    assert fq.shape == x.shape and torch.equal(fq[0, :128], x[0, :128])


# --------------------------------------------------------------------------- the Triton kernel


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("m,k,group_size", SHAPES)
def test_triton_equals_reference_every_config(kind, strategy, m, k, group_size, triton_device):
    from compress.kernels import act_quant_triton as tk
    x = _rows(m, k, torch.float32, seed=m + k).to(triton_device)
    static = STATIC.to(triton_device) if strategy == "tensor" else None
    want = quantize_activations_reference(x.cpu(), kind, strategy, group_size=group_size,
                                          static_scale=None if static is None else static.cpu())
    for cfg in tk.act_quant_configs():
        got = tk.quantize_activations(x, kind, strategy, group_size=group_size, static_scale=static, config=cfg)
        _assert_same(tuple(t.cpu() for t in got), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_half_inputs(kind, dtype, triton_device):
    x = _rows(4, 576, dtype, seed=3).to(triton_device)
    for strategy in ("token", "group"):
        got = quantize_activations(x, kind, strategy, backend="triton")
        _assert_same(tuple(t.cpu() for t in got), quantize_activations_reference(x.cpu(), kind, strategy))


@pytest.mark.parametrize("kind", KINDS)
def test_triton_ties_signed_zero_and_subnormals(kind, triton_device):
    """Values that land exactly between two codes round to even; tiny negatives give -0 (FP8
    byte 0x80), subnormal E4M3 codes and the smallest normal. Row 0's amax makes the scale 1."""
    qmax = QMAX[kind]
    if kind == "fp8":
        # 17 and 19 are ties between 16/18 and 18/20 (to 16, 20); 2^-9 * 2.5 a subnormal tie (to 2 * 2^-9);
        # 2^-6 * (1 - 2^-5) rounds up to the smallest normal; -1e-9 to -0; -300 to -288.
        vals = [qmax, 17.0, 19.0, 2.5 * 2 ** -9, -3.5 * 2 ** -9, 2 ** -6 * (1 - 2 ** -5), -1e-9, -300.0, 0.0]
    elif kind == "int8":
        vals = [qmax, 2.5, -2.5, 3.5, -0.5, 0.5, 1.5, -126.5, 0.0]
    else:
        vals = [qmax, 2.5, -2.5, 3.5, -0.5, 0.5, 1.5, -6.5, 0.0]
    x = torch.tensor([vals], dtype=torch.float32).to(triton_device)
    got = quantize_activations(x, kind, "token", backend="triton")
    want = quantize_activations_reference(x.cpu(), kind, "token")
    _assert_same(tuple(t.cpu() for t in got), want)
    assert want[1].item() == 1.0
    if kind == "fp8":
        assert want[0].float()[0, 1:4].tolist() == [16.0, 20.0, 2 * 2 ** -9]
        assert _bytes(want[0])[0, 6].item() == 0x80                                  # -0
    else:
        assert want[0][0, 1:8].tolist() == [2, -2, 4, 0, 0, 2, -126 if kind == "int8" else -6]


@pytest.mark.parametrize("kind", KINDS)
def test_triton_static_scale_from_model_dtype(kind, triton_device):
    """A static scale stored in bf16 (the checkpoint's input_scale) saturates large values."""
    x = _rows(3, 200, torch.bfloat16).to(triton_device)
    s = torch.tensor([0.0173], dtype=torch.bfloat16)
    codes, scale = quantize_activations(x, kind, "tensor", static_scale=s.to(triton_device), backend="triton")
    want = quantize_activations_reference(x.cpu(), kind, "tensor", static_scale=s)
    _assert_same((codes.cpu(), scale.cpu()), want)
    saturated = QMAX[kind] + (kind != "fp8")                   # integer codes reach -128 / -8
    assert _bytes(codes).cpu()[2].float().abs().max() > 0 and codes.float().abs().max() == saturated


def test_empty_batch_and_backend_choice(triton_device):
    x = torch.zeros(0, 64, device=triton_device)
    codes, scale = quantize_activations(x, "fp8", "token", backend="triton")
    assert codes.shape == (0, 64) and scale.shape == (0, 1)
    y = _rows(2, 64, torch.float32)
    _assert_same(quantize_activations(y, "int8", "group", group_size=32, backend="torch"),
                 quantize_activations_reference(y, "int8", "group", group_size=32))
    _assert_same(quantize_activations(y, "fp8", "token"), quantize_activations_reference(y, "fp8", "token"))
    with pytest.raises(ConfigError, match="backend"):
        quantize_activations(y, "fp8", "token", backend="cuda")
    with pytest.raises(ValueError, match="strategy"):
        quantize_activations(y, "fp8", "channel")
    with pytest.raises(ValueError, match="static_scale"):
        quantize_activations(y, "fp8", "tensor", backend="triton")
