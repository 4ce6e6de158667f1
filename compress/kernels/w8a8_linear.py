"""y = quantize(x) @ W8^T, the W8A8 linear: FP8 E4M3 or INT8 weights and activations.

Weights (the compressed-tensors ``float-quantized`` / ``int-quantized`` tensors):

- ``weight``        float8_e4m3fn or int8 (N, K) codes;
- ``weight_scale``  float (N, 1) per output channel, (1,) per tensor, or (ceil(N/B), ceil(K/B)) per
                    B x B block (``block=B``, the DeepSeek-V3 / Qwen3 "FP8 block" layout, B = 128);
- ``input_scale``   float (1,), the static per-tensor activation scale (``act="tensor"``), else None.

Activations are quantized per token (``act="token"``), per 1 x ``group_size`` group (``"group"``)
or with the static scale (``"tensor"``), by ``act_quant``.

The reference simulates the layer on any device: the activations rounded through their codes and
back, the weights decoded, one float32 matmul, then the cast to the activation dtype. A GPU runs the
same products natively, after the fused Triton activation quantization (``act_quant_triton``,
bit for bit the reference's codes and scales):

- FP8 per token or per tensor, compute capability 8.9+: ``torch._scaled_mm`` (row-wise scales
  (M, 1) x (1, N) float32 with bf16 output, or two scalar scales), K and N multiples of 16;
- INT8 per token or per tensor, M > 16, K and N multiples of 8: ``torch._int_mm`` (int32) and the
  scales and bias in a float32 epilogue;
- everything else (FP8 128x128 blocks with 1x128 activation groups, M <= 16 INT8, odd shapes, fp16
  or float32 row-wise FP8, FP8 on sm_80 through fp16 dots): our Triton GEMM (``w8a8_linear_triton``).

``native_plan`` holds those rules; each fallback is logged once. They agree with the reference up
to float32 summation order (the products of two 8-bit codes are exact).
"""

from __future__ import annotations

import functools
import logging

import torch

from .act_quant import ACT_DTYPES, fake_quantize_activations
from .dequant_linear import resolve_backend

log = logging.getLogger(__name__)

W8A8_KINDS = ("fp8", "int8")


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """(N, K) float32 per-element scales from (ceil(N/B), ceil(K/B)) block scales."""
    n, k = shape
    return scale.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def w8a8_dequant_weight(weight: torch.Tensor, weight_scale: torch.Tensor, *, block: int | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) weight: codes times their scale, in float32, cast once to ``dtype``."""
    w = weight.float()
    if block is not None:
        return (w * expand_block_scale(weight_scale, tuple(w.shape), block)).to(dtype)
    s = weight_scale.float()
    return (w * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1))).to(dtype)


def w8a8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          input_scale: torch.Tensor | None, bias: torch.Tensor | None, *, kind: str, act: str,
                          block: int | None = None, group_size: int = 128) -> torch.Tensor:
    """The specification: fake-quantized activations times the decoded weight, in float32."""
    if kind not in W8A8_KINDS:
        raise ValueError(f"W8A8 kind must be one of {W8A8_KINDS}, got {kind!r}")
    xq = fake_quantize_activations(x.float(), kind, act, group_size=group_size, static_scale=input_scale)
    y = torch.nn.functional.linear(xq, w8a8_dequant_weight(weight, weight_scale, block=block))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_w8a8_args(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor | None, *, kind: str, act: str, block: int | None) -> None:
    """Shapes and dtypes only (no values are read: that would sync with the GPU)."""
    if kind not in W8A8_KINDS:
        raise ValueError(f"W8A8 kind must be one of {W8A8_KINDS}, got {kind!r}")
    want = ACT_DTYPES[kind]
    if weight.dtype != want or weight.dim() != 2:
        raise ValueError(f"a {kind} W8A8 weight is a 2-D {want} tensor (out, in), got {weight.dtype} "
                         f"of shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the W8A8 weight {tuple(weight.shape)} takes {k}")
    if block is not None:
        nb, kb = -(-n // block), -(-k // block)
        if tuple(weight_scale.shape) != (nb, kb):
            raise ValueError(f"block={block} weight scales of a ({n}, {k}) weight are ({nb}, {kb}), "
                             f"got {tuple(weight_scale.shape)}")
    elif weight_scale.numel() not in (1, n):
        raise ValueError(f"W8A8 weight scales are per tensor (1,) or per output channel ({n}, 1), "
                         f"got {tuple(weight_scale.shape)}")
    if (act == "tensor") != (input_scale is not None):
        raise ValueError("static per-tensor activations (act='tensor') need input_scale (1,), and dynamic "
                         f"ones take none; got act={act!r} with input_scale "
                         f"{'None' if input_scale is None else tuple(input_scale.shape)}")


def native_plan(kind: str, act: str, block: int | None, m: int, n: int, k: int, dtype: torch.dtype,
                capability: tuple[int, int], weight_tensorwise: bool) -> tuple[str, str]:
    """(path, why) for ``auto`` on a CUDA GPU of ``capability``: ``scaled_mm`` (FP8, cuBLAS/CUTLASS),
    ``int_mm`` (INT8 cuBLAS + a float32 epilogue) or ``triton`` (our GEMM, ``w8a8_linear_triton``).
    A pure function of the shapes, so the CPU tests cover every branch."""
    if kind == "fp8":
        if capability < (8, 9):
            return "triton", f"FP8 tensor cores need compute capability 8.9+, this GPU is {capability}"
        if block is not None or act == "group":
            return "triton", "block-scaled FP8 runs on the Triton block GEMM"
        if k % 16 or n % 16:
            return "triton", f"torch._scaled_mm needs in and out features divisible by 16, got {k} and {n}"
        if act == "tensor" and weight_tensorwise:
            return "scaled_mm", "per-tensor scales"
        if dtype != torch.bfloat16:
            return "triton", f"torch._scaled_mm's row-wise scaling writes bf16 only (sm_89), not {dtype}"
        return "scaled_mm", "row-wise scales"
    if act == "group" or block is not None:
        return "triton", "INT8 with group or block scales runs on the Triton GEMM"
    if m <= 16:
        return "triton", f"torch._int_mm needs more than 16 rows, got {m}"
    if k % 8 or n % 8:
        return "triton", f"torch._int_mm needs in and out features divisible by 8, got {k} and {n}"
    return "int_mm", "cuBLAS INT8"


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    """Each distinct fallback is logged once per process (a deliberate process-wide cache)."""
    log.info("%s", message)


def _scaled_mm(xq: torch.Tensor, sa: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """FP8 GEMM by torch._scaled_mm: both scales scalar (tensor-wise) or (M, 1) x (1, N) float32
    (row-wise; a per-tensor side is expanded); ``weight.t()`` is the column-major operand it wants."""
    m, n = xq.shape[0], weight.shape[0]
    sb = weight_scale.float()
    if sa.numel() == 1 and sb.numel() == 1:
        sa, sb = sa.reshape(()), sb.reshape(())
    else:
        sa = sa.reshape(-1, 1).expand(m, 1).contiguous()                    # (M, 1)
        sb = sb.reshape(1, -1).expand(1, n).contiguous()                    # (1, N)
    b = None if bias is None else bias.to(dtype)
    return torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=dtype)


def _int_mm(xq: torch.Tensor, sa: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """INT8 GEMM by torch._int_mm (exact int32 sums), then sa * sb (+ bias) in float32, cast once."""
    acc = torch._int_mm(xq, weight.t())                                      # (M, N) int32
    y = acc.float() * sa.reshape(-1, 1) * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None, bias: torch.Tensor | None, *, kind: str, act: str,
                block: int | None = None, group_size: int = 128, backend: str = "auto") -> torch.Tensor:
    """Dispatch: ``torch`` is the reference; ``triton`` quantizes and multiplies with our Triton
    kernels (the interpreter on the CPU); ``auto`` runs the reference on the CPU and, on a CUDA GPU,
    the fused Triton activation quantization followed by ``native_plan``'s GEMM."""
    check_w8a8_args(x, weight, weight_scale, input_scale, kind=kind, act=act, block=block)
    if resolve_backend(backend, x, 8) == "torch":
        return w8a8_linear_reference(x, weight, weight_scale, input_scale, bias, kind=kind, act=act,
                                     block=block, group_size=group_size)
    from . import act_quant_triton, w8a8_linear_triton as tk

    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros(*lead, n)
    xq, sa = act_quant_triton.quantize_activations(x2, kind, act, group_size=group_size, static_scale=input_scale)
    path = "triton"
    if backend == "auto":
        path, why = native_plan(kind, act, block, m, n, k, x.dtype, torch.cuda.get_device_capability(x.device),
                                weight_scale.numel() == 1)
        if path == "triton":
            _log_once(f"W8A8 {kind} {act} ({n}x{k}, M={m}, {x.dtype}): Triton GEMM ({why})")
    y = None
    if path == "scaled_mm":
        try:
            y = _scaled_mm(xq, sa, weight, weight_scale, bias, x.dtype)
        except (RuntimeError, ValueError) as err:       # torch's own checks, raised before any launch
            _log_once(f"torch._scaled_mm refused W8A8 fp8 {act} ({n}x{k}, {x.dtype}): {err}; using the Triton GEMM")
    elif path == "int_mm":
        y = _int_mm(xq, sa, weight, weight_scale, bias, x.dtype)
    if y is None:
        y = tk.w8a8_matmul(xq, sa, weight, weight_scale, bias, kind=kind, act=act, block=block,
                           group_size=group_size, out_dtype=x.dtype)
    return y.reshape(*lead, n)
