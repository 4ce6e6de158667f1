"""Activation quantization for W8A8, W4A8 and W4A4 (int4) layers: the reference (the specification),
and the dispatch to the fused Triton kernel (``act_quant_triton``) on a GPU.

An activation ``x`` (..., K) is rounded to FP8 E4M3, INT8 or INT4 with symmetric scales:

- ``token``: one scale per row (token), computed at run time from the row's max |x| (dynamic);
- ``group``: one scale per row and per ``group_size`` consecutive columns (dynamic; the FP8 block
  scheme's 1x128 groups; a last group narrower than ``group_size`` when it does not divide K);
- ``tensor``: one static scale for every element, from calibration (``static_scale``).

Scales follow vLLM, the client that serves these checkpoints: ``amax / 448`` (FP8, at least
``FP8_MIN_SCALE``) and ``amax / 127`` (INT8), float32; INT4 likewise ``amax / 7`` (QuaRot's
symmetric activation quantizer without its clipping ratio; compressed-tensors' fake quantization
uses ``amax / 7.5``). Codes are ``x / scale`` clamped to the format's range and cast (FP8: round to
nearest even by the cast; INT8/INT4: ``torch.round``, also half to even; INT4 codes, in [-8, 7], are
stored one per int8). A zero row gets the smallest scale and all-zero codes.
"""

from __future__ import annotations

import torch

from .dequant_linear import resolve_backend

# Activation kind -> the dtype its codes are stored in (int4: one code in [-8, 7] per int8).
ACT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.int8}
ACT_STRATEGIES = ("token", "group", "tensor")
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_MAX = 7.0
# vLLM's lower bound on a dynamic FP8 scale (1 / (448 * 512)): keeps x / scale finite for zero rows.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
INT8_MIN_SCALE = 1e-10


def qmax(kind: str) -> float:
    """The largest code of ``kind`` (symmetric scales map max |x| onto it)."""
    return {"fp8": FP8_MAX, "int8": INT8_MAX, "int4": INT4_MAX}[kind]


def _check(kind: str, strategy: str) -> None:
    if kind not in ACT_DTYPES:
        raise ValueError(f"activation kind must be one of {', '.join(ACT_DTYPES)}, got {kind!r}")
    if strategy not in ACT_STRATEGIES:
        raise ValueError(f"activation strategy must be one of {', '.join(ACT_STRATEGIES)}, got {strategy!r}")


def scale_from_amax(amax: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 scale(s) for max |x| ``amax``: amax / 448 (FP8), amax / 127 (INT8) or amax / 7 (INT4),
    floored."""
    floor = FP8_MIN_SCALE if kind == "fp8" else INT8_MIN_SCALE
    return (amax.float() / qmax(kind)).clamp(min=floor)


def _round(y: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 ``y`` (already divided by its scale) -> codes of ``kind``."""
    if kind == "fp8":
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    top = qmax(kind)
    return torch.round(y).clamp(-top - 1.0, top).to(torch.int8)


def quantize_activations_reference(x: torch.Tensor, kind: str, strategy: str, *, group_size: int = 128,
                                   static_scale: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of ``x`` (M, K): codes (M, K) float8_e4m3fn or int8 (int4 codes too); scales float32 of
    shape (M, 1) for ``token``, (M, ceil(K / group_size)) for ``group``, (1,) for ``tensor``."""
    _check(kind, strategy)
    xf = x.float()
    m, k = xf.shape
    if strategy == "tensor":
        if static_scale is None:
            raise ValueError("static per-tensor activation quantization needs static_scale (from calibration)")
        scale = static_scale.float().reshape(1)
        return _round(xf / scale, kind), scale
    if strategy == "token":
        scale = scale_from_amax(xf.abs().amax(dim=-1, keepdim=True), kind)                  # (M, 1)
        return _round(xf / scale, kind), scale
    groups = -(-k // group_size)
    pad = groups * group_size - k
    xg = torch.nn.functional.pad(xf, (0, pad)).view(m, groups, group_size)                  # (M, G, g)
    scale = scale_from_amax(xg.abs().amax(dim=-1), kind)                                     # (M, G)
    codes = _round(xg / scale.unsqueeze(-1), kind).view(m, groups * group_size)[:, :k]
    return codes.contiguous(), scale


def quantize_activations(x: torch.Tensor, kind: str, strategy: str, *, group_size: int = 128,
                         static_scale: torch.Tensor | None = None, backend: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: ``torch`` is the reference; ``auto`` runs the fused Triton kernel on a CUDA GPU;
    ``triton`` always (the interpreter on the CPU), with the reason when it cannot. Either way the
    result is bit for bit the reference's. ``x`` (M, K)."""
    _check(kind, strategy)
    if group_size < 1:
        raise ValueError(f"activation group_size must be positive, got {group_size}")
    if resolve_backend(backend, x, 8) == "torch":
        return quantize_activations_reference(x, kind, strategy, group_size=group_size, static_scale=static_scale)
    from . import act_quant_triton as tk
    return tk.quantize_activations(x, kind, strategy, group_size=group_size, static_scale=static_scale)


def dequantize_activations(codes: torch.Tensor, scale: torch.Tensor, strategy: str, *, group_size: int = 128,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float ``codes * scale`` (M, K), the inverse of ``quantize_activations_reference``."""
    m, k = codes.shape
    cf = codes.float()
    if strategy == "group":
        groups = scale.shape[-1]
        cf = torch.nn.functional.pad(cf, (0, groups * group_size - k)).view(m, groups, group_size)
        return (cf * scale.float().unsqueeze(-1)).view(m, groups * group_size)[:, :k].to(dtype)
    return (cf * scale.float()).to(dtype)


def fake_quantize_activations(x: torch.Tensor, kind: str, strategy: str, *, group_size: int = 128,
                              static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., K) rounded through ``kind`` codes and back, in ``x``'s dtype: what a W8A8 layer
    computes with (simulation on any device; the search loss of SmoothQuant/AWQ)."""
    shape = x.shape
    codes, scale = quantize_activations_reference(x.reshape(-1, shape[-1]), kind, strategy,
                                                  group_size=group_size, static_scale=static_scale)
    return dequantize_activations(codes, scale, strategy, group_size=group_size, dtype=x.dtype).reshape(shape)
