"""y = x @ dequantize(W_fp4)^T + b for NVFP4 / MXFP4 weights: reference and dispatch.

The reference decodes both nibbles of every byte through a 256-entry table of E2M1 value pairs and
multiplies each block by its effective scale, ``block_scale / global_scale`` (NVFP4) or
``2^(e - 127)`` (MXFP4), in float32, then casts once to the activation dtype: the same float32
operations as ``compress.quant.fp4.nvfp4_dequantize`` / ``mxfp4_dequantize``, so bit for bit the
weights the model was evaluated with. A Triton kernel registers here as the ``triton`` backend.
"""

from __future__ import annotations

import torch

from .fp4_packing import E2M1_VALUES
from .dequant_linear import resolve_backend

FP4_KINDS = ("nvfp4", "mxfp4")
BLOCK = {"nvfp4": 16, "mxfp4": 32}


def _byte_lut(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: byte -> (value of its low nibble, value of its high nibble)."""
    pos = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    code = torch.cat([pos, -pos])                            # code -> value; code 8 is -0.0
    return torch.stack([code.repeat(16), code.repeat_interleave(16)], dim=-1)


def fp4_block_divisor(scale: torch.Tensor, global_scale: torch.Tensor | None, kind: str) -> torch.Tensor:
    """(out, groups) float32 effective scales."""
    if kind == "nvfp4":
        return scale.float() / global_scale.float()
    return torch.exp2(scale.to(torch.int32).float() - 127.0)     # E8M0, exact in float32


def fp4_dequant_weight(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, *,
                       kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight from packed (out, in/2) uint8 codes and per-block scales."""
    out, half = packed.shape
    block = BLOCK[kind]
    # One gather of two values per byte (a 256-entry table), then one multiply per block.
    values = torch.nn.functional.embedding(packed.int(), _byte_lut(packed.device))   # (out, in/2, 2)
    w = values.view(out, -1, block) * fp4_block_divisor(scale, global_scale, kind).unsqueeze(-1)
    return w.view(out, 2 * half).to(dtype)


def fp4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                         global_scale: torch.Tensor | None, bias: torch.Tensor | None, *, kind: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, fp4_dequant_weight(packed, scale, global_scale, kind=kind,
                                                            dtype=x.dtype), bias)


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
               bias: torch.Tensor | None, *, kind: str, backend: str = "auto") -> torch.Tensor:
    """Dispatch: ``torch`` is the reference; ``auto`` runs Triton on a CUDA GPU; ``triton`` always
    (the interpreter on the CPU), with the reason when it cannot."""
    if kind not in FP4_KINDS:
        raise ValueError(f"FP4 kind must be one of {FP4_KINDS}, got {kind!r}")
    if resolve_backend(backend, x, 4) == "torch":
        return fp4_linear_reference(x, packed, scale, global_scale, bias, kind=kind)
    from . import fp4_linear_triton as tk
    return tk.fp4_linear(x, packed, scale, global_scale, bias, kind=kind)
