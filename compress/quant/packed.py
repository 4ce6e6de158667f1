"""The base of every packed (quantized) linear layer, whatever its format.

Runtime code (reports, ``compress bench``, ``set_backend``, export) works against this interface:
``in_features``, ``out_features``, ``bias``, ``backend``, ``dequantize(dtype)`` and ``label``.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    in_features: int
    out_features: int
    backend: str

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight the layer computes with."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Short name of the format, e.g. ``int4 g128`` or ``nvfp4a16``."""
        raise NotImplementedError
