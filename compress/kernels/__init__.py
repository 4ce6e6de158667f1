"""Compute kernels. Each op has three parts: a pure-PyTorch reference (the specification), Triton
code, and a dispatcher that picks between them (``auto | torch | triton``).

- ``dequant_linear.py``         y = x @ dequantize(W)^T + b for packed int2/4/8 weights: reference, dispatch
- ``dequant_linear_triton.py``  its Triton kernels (split-K small batch, tiled tl.dot, dequantize)
- ``tuning.py``                 kernel configs, the shape heuristic, the per-device autotune cache

Importing this package needs neither a GPU nor Triton; Triton is imported on first use.
"""

from .dequant_linear import BACKENDS, check_backend, dequant_linear, dequant_linear_reference
from .tuning import KernelConfig

__all__ = ["BACKENDS", "KernelConfig", "check_backend", "dequant_linear", "dequant_linear_reference"]
