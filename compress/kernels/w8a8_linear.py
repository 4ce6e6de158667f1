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
same products natively (``torch._scaled_mm`` for FP8 on sm_89+, ``torch._int_mm`` for INT8), with
the activation quantization in a fused Triton kernel.
"""

from __future__ import annotations

import torch

from .act_quant import fake_quantize_activations

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


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None, bias: torch.Tensor | None, *, kind: str, act: str,
                block: int | None = None, group_size: int = 128, backend: str = "auto") -> torch.Tensor:
    """Dispatch: ``torch`` is the reference; ``auto`` runs the native path on a GPU that has it."""
    return w8a8_linear_reference(x, weight, weight_scale, input_scale, bias, kind=kind, act=act, block=block,
                                 group_size=group_size)
