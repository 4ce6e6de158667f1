"""NVFP4 and MXFP4 weights: E2M1 codes with per-block scales, bit for bit as compressed-tensors.

NVFP4 (block 16 along the input dimension):

    global   = 448*6 / amax(|W|)                                   float32, stored as a divisor
    scale[b] = fp8_e4m3(clamp(global * (amax16[b] / 6), max=448))   round half to even; 0 -> 0.125
    q        = e2m1(W / (scale[b] / global))                        round half to even, saturate at 6
    W'       = e2m1_value(q) * (scale[b] / global)                  float32, then cast once

MXFP4 (block 32, OCP Microscaling): ``scale[b] = 2^(s - 127)`` with ``s`` a uint8 E8M0 exponent,
``q = e2m1(W / scale[b])``, ``W' = e2m1_value(q) * scale[b]``; no global scale.

Every float32 operation and its order is the one compressed-tensors 0.20.0 uses, read from its
source (paths relative to the package; line numbers of 0.20.0):

- Global scale, ``quantization/utils/helpers.py: generate_gparam`` (l.324-353):
  ``448*6 / clamp(amax, min=float32 tiny)``, then ``nan_to_num(nan=posinf=neginf=1.0)``. So an
  all-zero tensor (or amax below ~7.9e-36, where the quotient overflows) gets global scale 1.0.
  The division is a Python float over a tensor, which torch computes as
  ``reciprocal(amax) * 2688`` (two roundings; amax = 448 gives 6.0000005): we do the same.
- Block scale, ``helpers.py: calculate_qparams`` (l.81-128): ``amax16 / 6.0`` (``bit_range/2``,
  l.88), then ``global_scale * scales`` (l.104), then ``round_to_quantized_type_dtype``
  (``quantization/quant_args.py`` l.452-477: clamp into [-448, 448], ``.to(float8_e4m3fn)``; torch's
  cast saturates at 448 anyway, ml_dtypes' gives NaN above 464, so the clamp is kept), then
  every scale that is 0 becomes ``eps = 0.125`` (l.117-128, ``_get_dtype_eps`` l.379: 0.125 for
  float8_e4m3fn). There is no lower clamp: an all-zero block, and a nonzero block whose scale
  rounds to 0 in E4M3 (below 2^-10), both get 0.125; E4M3 subnormal scales (2^-9..7*2^-9) are
  kept. ``(amax16 / 6)`` first matters: ``global * amax16 / 6`` lands on the other side of FP8
  rounding ties in real checkpoints (see ../shared/FORMATS.md).
- Quantize, ``quantization/lifecycle/forward_helpers.py: _quantize`` (l.523-544):
  ``scale = scale / global_scale``; ``x / scale``; clamp to [-6, 6]; ``cast_to_fp4``
  (``quantization/utils/fp4_utils.py`` l.77-97), whose thresholds are round half to even. The
  Triton kernels (``_quantize_kernel``, ``compressors/nvfp4/helpers.py:
  _quantize_and_pack_fp4_kernel``) do the same two ``div_rn`` in the same order.
- Sign of zero: compressed-tensors sets the sign bit only when ``x / scale < 0`` (``torch.sign``
  on CPU, ``x < 0`` in Triton; Model Optimizer's ``_cast_fp4`` also uses ``x < 0``). An exact zero
  weight, +0 or -0, gets code 0; a negative weight that rounds to zero gets code 8 (-0). We match
  that by turning -0.0 into +0.0 before ``e2m1_encode`` (which itself follows ml_dtypes: -0.0 -> 8).
- Dequantize, ``forward_helpers.py: _dequantize`` (l.548-570): ``scale / global_scale`` in float32,
  times the E2M1 value, cast to the model dtype.
- MXFP4 exponent, ``quantization/utils/mxfp_utils.py: generate_mx_scales`` / ``round_to_power_2``:
  ``127 + floor(log2(p)) - 2`` where ``p`` is amax rounded *up* to the next power of two when its
  significand is >= 1.75 (adding 2^(mantissa_bits-2) to the bit pattern, then truncating), then
  clamped into uint8 (``round_to_quantized_type_dtype``). This is not the OCP v1.0 rule
  ``floor(log2(amax)) - 2``: a block whose max has significand in [1.75, 2) gets twice the
  spec's scale (its max rounds to 4 instead of saturating at 6). All-zero block: log2(0) = -inf,
  clamped to exponent 0 (2^-127); the codes are all 0 either way. We compute the same exponent on
  the integer bits, and clamp to 254 rather than 255 (differs only for amax >= 1.75 * 2^127,
  where compressed-tensors would store 255 = NaN).

NVIDIA Model Optimizer (``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``, commit 0ad6e5f in
the stored snapshot) differs: it stores the reciprocal global scale, gives an all-zero block scale
1.0, and quantizes ``x / (scale * (amax / 2688))``, which rounds differently; the [2^-9, 448] clamp
../shared/FORMATS.md attributes to it is not in that snapshot. We follow compressed-tensors because
we export its format.

Amax is taken in float32 of the weight (exact for bf16/fp16 weights); a reference computed this
way reproduced the peer toolkit's NVFP4A16 SmolLM2 export bit for bit (FORMATS.md).
"""

from __future__ import annotations

import math

import torch

from ..formats import WeightFormat
from ..kernels.fp4_packing import FP4_MAX, e2m1_decode, e2m1_encode, e2m1_round, e8m0_decode

FP8_E4M3_MAX = 448.0
NVFP4_GROUP_SIZE = WeightFormat.parse("nvfp4a16").group_size     # 16: the block each scale covers
MXFP4_GROUP_SIZE = WeightFormat.parse("mxfp4").group_size        # 32
NVFP4_ZERO_BLOCK_SCALE = 0.125      # compressed-tensors' eps for float8_e4m3fn scales
_E2M1_EMAX = 2                      # floor(log2(6)): the MX exponent offset for E2M1


# --------------------------------------------------------------------------- validation

def _blocks(w: torch.Tensor, group_size: int, fmt: str, name: str) -> torch.Tensor:
    """(rows, cols) weight -> (rows, cols/group_size, group_size) float32, after checking it."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{fmt} expects a 2-D floating-point weight (out_features, in_features); "
                         f"{name} is {w.dtype} of shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(
            f"{name} has shape ({rows}, {cols}): {fmt} scales blocks of {group_size} along the "
            f"input dimension and {cols} is not a multiple of {group_size}; leave this layer "
            f"unquantized (add it to `ignore`) or pad in_features to a multiple of {group_size}")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (NaN or inf), the first at {first}; "
            f"{fmt} cannot represent them. Check the checkpoint (non-finite weights usually mean a "
            f"corrupt file or a diverged run) or leave this layer unquantized (add it to `ignore`)")
    return w.float().reshape(rows, cols // group_size, group_size)


def _check_scale_shape(scale: torch.Tensor, rows: int, groups: int, what: str) -> None:
    if tuple(scale.shape) != (rows, groups):
        raise ValueError(f"{what} must have shape ({rows}, {groups}) (one per block), "
                         f"got {tuple(scale.shape)}")


def _as_global(global_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if g.numel() != 1:
        raise ValueError(f"the NVFP4 global scale is one float32 per tensor, got shape {tuple(g.shape)}")
    value = float(g)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the NVFP4 global scale must be finite and positive, got {value}; "
                         f"compute it with nvfp4_global_scale(amax)")
    return g.reshape(1)


def _encode_scaled(scaled: torch.Tensor) -> torch.Tensor:
    # An exact zero gets code 0 even when it is -0.0, as in compressed-tensors (module docstring).
    return e2m1_encode(torch.where(scaled == 0, torch.zeros_like(scaled), scaled))


# --------------------------------------------------------------------------- NVFP4

def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """float32 (1,) global scale ``448*6 / amax``; 1.0 when amax is 0 (never inf or NaN).

    ``amax`` is max |W| over the tensor (over all shards of a fused q/k/v or gate/up projection).
    """
    a = torch.as_tensor(amax, dtype=torch.float32)
    if a.numel() != 1:
        raise ValueError(f"nvfp4_global_scale takes one amax per tensor, got shape {tuple(a.shape)}")
    if not (math.isfinite(float(a)) and float(a) >= 0):
        raise ValueError(f"amax must be finite and >= 0, got {float(a)}; "
                         f"check the weight for NaN/inf values")
    # compressed-tensors writes ``448*6 / amax``, a Python float over a tensor, which torch
    # evaluates as ``amax.reciprocal() * 2688`` (Tensor.__rtruediv__): not always the correctly
    # rounded quotient (amax = 448 gives 6.0000005, not 6). Spelled out here so it stays that way.
    g = a.clamp(min=torch.finfo(torch.float32).tiny).reciprocal() * (FP8_E4M3_MAX * FP4_MAX)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def _nvfp4_scales(wg: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    amax = wg.abs().amax(dim=-1)                                   # (rows, groups)
    # Divide by a tensor, not a Python float: CUDA turns ``x / python_float`` into
    # ``x * (1 / python_float)``, which is not the true quotient compressed-tensors computes.
    six = torch.tensor(FP4_MAX, device=amax.device)
    s = g * (amax / six)                                           # this order, see docstring
    s = s.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, NVFP4_ZERO_BLOCK_SCALE), s)
    return s.to(torch.float8_e4m3fn)


def nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor | float,
                       name: str = "weight") -> torch.Tensor:
    """float8_e4m3fn (rows, cols/16) block scales of the weight ``w`` (rows, cols)."""
    wg = _blocks(w, NVFP4_GROUP_SIZE, "NVFP4", name)               # (rows, groups, 16)
    return _nvfp4_scales(wg, _as_global(global_scale, w.device))


def _nvfp4_divisor(block_scale: torch.Tensor, g: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """The effective per-block scale ``block_scale / global`` (rows, groups, 1), float32."""
    _check_scale_shape(block_scale, rows, groups, "NVFP4 block scales")
    s = block_scale.float()
    if not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError("NVFP4 block scales must be finite and positive; "
                         "compute them with nvfp4_block_scales")
    return (s / g).unsqueeze(-1)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor | float, block_scale: torch.Tensor,
                   name: str = "weight") -> torch.Tensor:
    """uint8 E2M1 codes (rows, cols) of ``w`` on the given scales (``pack_fp4`` packs them)."""
    wg = _blocks(w, NVFP4_GROUP_SIZE, "NVFP4", name)               # (rows, groups, 16)
    rows, groups, _ = wg.shape
    eff = _nvfp4_divisor(block_scale, _as_global(global_scale, w.device), rows, groups)
    return _encode_scaled(wg / eff).reshape(w.shape)


def nvfp4_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor | float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, cols) weight ``e2m1(codes) * (block_scale / global_scale)``, float32 cast to ``dtype``."""
    rows, cols = codes.shape
    if cols % NVFP4_GROUP_SIZE:
        raise ValueError(f"NVFP4 codes of shape ({rows}, {cols}): cols must be a multiple of "
                         f"{NVFP4_GROUP_SIZE} (unpack_fp4 the packed bytes first)")
    groups = cols // NVFP4_GROUP_SIZE
    eff = _nvfp4_divisor(block_scale, _as_global(global_scale, codes.device), rows, groups)
    w = e2m1_decode(codes).reshape(rows, groups, NVFP4_GROUP_SIZE) * eff
    return w.reshape(rows, cols).to(dtype)


def nvfp4_fake_quantize(w: torch.Tensor, global_scale: torch.Tensor | float | None = None,
                        name: str = "weight") -> torch.Tensor:
    """Round-to-nearest NVFP4 round trip of ``w``, in ``w.dtype``.

    ``global_scale=None`` computes it from ``w`` itself; pass the shared one for fused projections.
    """
    wg = _blocks(w, NVFP4_GROUP_SIZE, "NVFP4", name)               # (rows, groups, 16)
    g = nvfp4_global_scale(wg.abs().amax()) if global_scale is None else global_scale
    g = _as_global(g, w.device)
    eff = (_nvfp4_scales(wg, g).float() / g).unsqueeze(-1)         # (rows, groups, 1)
    q = e2m1_decode(_encode_scaled(wg / eff)) * eff
    return q.reshape(w.shape).to(w.dtype)


# --------------------------------------------------------------------------- MXFP4

def _mxfp4_scales(wg: torch.Tensor) -> torch.Tensor:
    amax = wg.abs().amax(dim=-1)                                   # (rows, groups), >= 0, finite
    # Adding 2^21 to the float32 bits carries into the exponent exactly when the significand is
    # >= 1.75 (compressed-tensors' round_to_power_2); the exponent field is then the biased
    # exponent of that power of two (0 for amax = 0 or subnormal).
    biased = (amax.view(torch.int32) + (1 << 21)) >> 23
    return (biased - _E2M1_EMAX).clamp(0, 254).to(torch.uint8)


def mxfp4_block_scales(w: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """uint8 E8M0 exponents (rows, cols/32): block max maps to E2M1's top binade (see docstring)."""
    return _mxfp4_scales(_blocks(w, MXFP4_GROUP_SIZE, "MXFP4", name))


def _mxfp4_divisor(scales: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    _check_scale_shape(scales, rows, groups, "MXFP4 scales")
    s = e8m0_decode(scales)                                        # raises unless uint8
    if bool(torch.isnan(s).any()):
        raise ValueError("MXFP4 scales contain 255 (the E8M0 NaN); compute them with mxfp4_block_scales")
    return s.unsqueeze(-1)                                         # (rows, groups, 1)


def mxfp4_quantize(w: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """uint8 E2M1 codes (rows, cols) of ``w`` on the given E8M0 block scales."""
    wg = _blocks(w, MXFP4_GROUP_SIZE, "MXFP4", name)               # (rows, groups, 32)
    rows, groups, _ = wg.shape
    return _encode_scaled(wg / _mxfp4_divisor(scales, rows, groups)).reshape(w.shape)


def mxfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, cols) weight ``e2m1(codes) * 2^(scales - 127)``, cast to ``dtype`` (exact in float32)."""
    rows, cols = codes.shape
    if cols % MXFP4_GROUP_SIZE:
        raise ValueError(f"MXFP4 codes of shape ({rows}, {cols}): cols must be a multiple of "
                         f"{MXFP4_GROUP_SIZE} (unpack_fp4 the packed bytes first)")
    groups = cols // MXFP4_GROUP_SIZE
    w = e2m1_decode(codes).reshape(rows, groups, MXFP4_GROUP_SIZE) * _mxfp4_divisor(scales, rows, groups)
    return w.reshape(rows, cols).to(dtype)


def mxfp4_fake_quantize(w: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Round-to-nearest MXFP4 round trip of ``w``, in ``w.dtype``."""
    wg = _blocks(w, MXFP4_GROUP_SIZE, "MXFP4", name)               # (rows, groups, 32)
    s = e8m0_decode(_mxfp4_scales(wg)).unsqueeze(-1)               # (rows, groups, 1)
    return (e2m1_decode(_encode_scaled(wg / s)) * s).reshape(w.shape).to(w.dtype)



def nvfp4_fake_quantize_activations(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 W4A4 run-time rounding of activations ``x`` (tokens, in): dynamic per-16-block scales
    over the static ``global_scale``, exactly as compressed-tensors' ``dynamic: "local"`` path
    (``forward.py: forward_quantize`` -> ``helpers.py: compute_dynamic_scales_and_zp`` ->
    ``_quantize_dequantize``): the block max over 6 is rounded in the activations' own dtype, then
    scaled by the float32 global scale, cast to E4M3 (0 -> 0.125); the values are divided by
    ``scale / global`` in float32, rounded to E2M1 and multiplied back, then cast to x's dtype."""
    rows, cols = x.shape
    if cols % NVFP4_GROUP_SIZE:
        raise ValueError(f"NVFP4 activations need a multiple of {NVFP4_GROUP_SIZE} features, got {cols}")
    xg = x.reshape(rows, cols // NVFP4_GROUP_SIZE, NVFP4_GROUP_SIZE)
    g = _as_global(global_scale, x.device)
    amax_over_six = xg.abs().amax(dim=-1) / torch.tensor(FP4_MAX, dtype=x.dtype, device=x.device)
    s = (g * amax_over_six).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, NVFP4_ZERO_BLOCK_SCALE), s)
    eff = (s / g).unsqueeze(-1)                                    # (rows, groups, 1)
    q = e2m1_round(xg.float() / eff) * eff                         # = e2m1_decode(e2m1_encode(.)) * eff
    return q.reshape(rows, cols).to(x.dtype)
