"""Compute kernels. Each op has a pure-PyTorch reference (the specification) and a dispatcher
that picks an implementation (``auto | torch``); Triton implementations plug into the same
dispatchers. Importing this package needs neither a GPU nor Triton."""

from .dequant_linear import BACKENDS, dequant_linear, dequant_linear_reference

__all__ = ["BACKENDS", "dequant_linear", "dequant_linear_reference"]
