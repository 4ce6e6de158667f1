"""The normalized Walsh-Hadamard rotation along the last dimension of a tensor.

The Sylvester Hadamard matrix of order n (a power of two), divided by sqrt(n), is orthogonal and
symmetric, so it is its own inverse: rotating twice gives x back, and dot products survive a
rotation of both sides, (qH).(kH) = q.k. The quantized KV cache stores keys rotated (outlier
channels spread over all channels before quantizing) and the decode-attention kernels rotate the
query instead of un-rotating the keys.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    # Kept per device: a host-to-device copy on every call would break CUDA-graph capture.
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def hadamard(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order ``n`` (a power of two): H = H^T = H^-1."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    return _hadamard(n, str(torch.device(device or "cpu")), dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dim (applying it twice gives x back)."""
    return (x.float() @ hadamard(x.shape[-1], x.device)).to(x.dtype)
