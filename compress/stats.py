"""Statistics that methods collect from a layer's inputs during calibration.

A statistic is fed with ``add(x)`` once per calibration chunk, where ``x`` is the input of a
linear layer, shaped (..., in_features). GPTQ and SparseGPT share ``HessianStats``; activation
norm based methods (Wanda) use the diagonal alone.
"""

from __future__ import annotations

import torch


class HessianStats:
    """H = (2 / n) * sum_t x_t x_t^T over all n calibration tokens, accumulated in float32."""

    REDUCE = {"xtx": "sum", "tokens": "sum", "amax": "max"}     # how shards combine (compress.distributed)

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.amax = torch.zeros((), dtype=torch.float32, device=device)   # max |x|: NVFP4 W4A4 input scale

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features)                      # (tokens, in)
        if x.dtype != torch.float32:
            x = x.float()
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]
        if x.numel():
            self.amax = torch.maximum(self.amax, x.abs().amax())

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("HessianStats.hessian read before any input was added")
        if self.xtx is None:
            raise RuntimeError("HessianStats.hessian read after take_hessian() gave the sums away")
        return self.xtx * (2.0 / self.tokens)

    def take_hessian(self) -> torch.Tensor:
        """``hessian``, made in place from the accumulated sums, which these statistics give up (for
        the one solve that reads them: saves an in^2 float32 copy, 784 MiB for an 8B model's
        down_proj). The same values as ``hessian``."""
        if self.tokens == 0:
            raise RuntimeError("HessianStats.hessian read before any input was added")
        if self.xtx is None:
            raise RuntimeError("HessianStats.take_hessian() called twice")
        h, self.xtx = self.xtx.mul_(2.0 / self.tokens), None
        return h

    @property
    def diag(self) -> torch.Tensor:
        """Per input feature: 2 * mean(x^2), the weight each column's error carries."""
        if self.tokens == 0 or self.xtx is None:
            return self.hessian.diagonal()                        # (raises the reason)
        return self.xtx.diagonal() * (2.0 / self.tokens)         # no in^2 copy for the diagonal


class InputStats:
    """What round-to-nearest needs from a layer's inputs, without the (in x in) Hessian: the
    per-feature ``diag`` (2 * mean(x^2), equal to ``HessianStats.diag``) and ``amax`` (max |x|,
    the NVFP4 W4A4 input scale)."""

    REDUCE = {"sumsq": "sum", "tokens": "sum", "amax": "max"}

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.amax = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()              # (tokens, in)
        self.sumsq += x.square().sum(dim=0)
        self.tokens += x.shape[0]
        if x.numel():
            self.amax = torch.maximum(self.amax, x.abs().amax())

    @property
    def diag(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("InputStats.diag read before any input was added")
        return self.sumsq * (2.0 / self.tokens)
