"""Smoothing before quantization: SmoothQuant and AWQ (docs/smoothing.md).

A per-input-channel scale is divided out of the activations and folded into the weights and the
preceding norm or linear; the methods differ only in how they choose it. ``mappings.py`` is the one
per-family table of which module feeds which linears, ``fold.py`` the folding, ``smoothquant.py``
and ``awq.py`` the scale choices, ``apply.py`` the engine method and the registrations.
"""

from .config import AWQConfig, SmoothQuantConfig

__all__ = ["AWQConfig", "SmoothQuantConfig"]
