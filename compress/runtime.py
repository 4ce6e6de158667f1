"""Run-time settings of a loaded model: which kernel backend its packed layers use.

``backend`` is one of ``compress.kernels.BACKENDS``:
- ``auto``: the fused Triton kernels on a CUDA GPU that supports them, else the PyTorch reference;
- ``torch``: always the PyTorch reference (dequantize, then ``torch.nn.functional.linear``);
- ``triton``: always Triton; an error where Triton cannot run (no CUDA GPU and no
  ``TRITON_INTERPRET=1``, or a bit width the kernels do not cover).
"""

from __future__ import annotations

from torch import nn

from .kernels.dequant_linear import check_backend
from .quant.packed import PackedLinear


def set_backend(model: nn.Module, backend: str) -> int:
    """Set the kernel backend of every packed layer in ``model``; returns how many were set."""
    check_backend(backend)
    count = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.backend = backend
            count += 1
    return count
