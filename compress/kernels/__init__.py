"""Compute kernels. Each op has three parts: a pure-PyTorch reference (the specification), Triton
code, and a dispatcher that picks between them (``auto | torch | triton``).

- ``dequant_linear.py``         y = x @ dequantize(W)^T + b for packed int2/4/8 weights: reference, dispatch
- ``dequant_linear_triton.py``  its Triton kernels (split-K small batch, tiled tl.dot, dequantize)
- ``tuning.py``                 kernel configs, the shape heuristic, the per-device autotune cache
- ``fp4_linear.py`` / ``fp4_linear_triton.py``  the same for NVFP4 / MXFP4 weights
- ``decode_attention.py`` / ``decode_attention_triton.py``  flash-decoding attention of one query
  token over a quantized KV cache (KIVI int8/4/2 or FP8) plus its full-precision window
- ``sparse24_linear.py`` / ``sparse24_linear_triton.py``  y = x @ W^T + b for a 2:4 sparse weight in the
  compact layout (kept values or int4 codes + 2-bit positions): layout functions, reference, kernel
- ``act_quant.py`` / ``act_quant_triton.py``  FP8 / INT8 / INT4 activation quantization (per token, per 1 x g
  group, static per tensor): reference, dispatch, the fused amax + scale + cast kernel
- ``w8a8_linear.py`` / ``w8a8_linear_triton.py``  the W8A8 linear (FP8 E4M3 or INT8 weights and
  activations): reference, dispatch to torch._scaled_mm / torch._int_mm, the Triton scaled GEMM
  (row/channel, 1 x 128 group and 128 x 128 block scales)

and the raw layouts they read:

- ``packing.py``                int32 words of pack-quantized integer codes (compressed-tensors' order)
- ``fp4_packing.py``            E2M1 / E8M0 codes and their nibble packing
- ``int_grid.py``               the signed code range, group count and the one dequantize formula
- ``hadamard.py``               Hadamard matrices of order 2^a * m (Paley), the fast transform (+ ``hadamard_triton.py``): KV key rotation, rotation pass

A leaf on raw tensors: this package imports torch, triton, the standard library and
``compress.errors``, nothing else of compress (tests/test_structure.py holds it to that); quantizing,
modules and checkpoints build on it. Importing this package needs neither a GPU nor Triton; Triton
is imported on first use.
"""

from .act_quant import quantize_activations, quantize_activations_reference
from .dequant_linear import BACKENDS, check_backend, dequant_linear, dequant_linear_reference
from .decode_attention import decode_attention, decode_attention_reference
from .sparse24_linear import sparse24_linear, sparse24_linear_reference
from .tuning import KernelConfig
from .w8a8_linear import w8a8_linear, w8a8_linear_reference

__all__ = ["BACKENDS", "KernelConfig", "check_backend", "dequant_linear", "dequant_linear_reference",
           "decode_attention", "decode_attention_reference", "sparse24_linear", "sparse24_linear_reference",
           "quantize_activations", "quantize_activations_reference", "w8a8_linear", "w8a8_linear_reference"]
