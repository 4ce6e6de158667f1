"""Shared pieces of the kernel tests: random packed-weight cases, the float64 reference, tolerances,
and the ``triton_device`` fixture. The Triton code runs for real: compiled on a CUDA GPU, under the
Triton interpreter (TRITON_INTERPRET=1) on the CPU, where CI runs it."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from compress.kernels.dequant_linear import dequant_weight
from compress.kernels.packing import pack_int32

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# ||y - ref|| / ||ref|| allowed per activation dtype, ref computed in float64. float32 is exact up to
# summation order; fp16/bf16 add the rounding of operands and output (bf16 keeps 8 significant bits).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def triton_device() -> str:
    """The device the Triton kernels run on here (tests/conftest.py turns the interpreter on where
    there is no GPU, before torch is imported)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "no GPU and no TRITON_INTERPRET=1"
    return DEVICE


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "NaN in the kernel output (unwritten or poisoned element)"
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()       # the reference may live on the CPU
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@dataclasses.dataclass
class Case:
    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None
    codes: torch.Tensor
    bits: int
    group_size: int | None

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """float64 ground truth for activations ``x``."""
        w = dequant_weight(self.packed.cpu(), self.scale.cpu(), None if self.zero_point is None else
                           self.zero_point.cpu(), self.bits, self.group_size, self.in_features, torch.float64,
                           None if self.g_idx is None else self.g_idx.cpu())
        b = None if self.bias is None else self.bias.cpu().double()
        return torch.nn.functional.linear(x.cpu().double(), w, b)


def make_case(n: int, k: int, *, bits: int = 4, group_size: int | None = 32, symmetric: bool = False,
              g_idx: bool = False, bias: bool = True, dtype=torch.float16, device="cpu", seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(lo, hi, (n, k), generator=gen)
    groups = 1 if group_size is None else -(-k // group_size)
    # Scales of a real layer's size (~amax / 7 of N(0, 0.02) weights), so outputs stay in fp16 range.
    scale = (torch.rand(n, groups, generator=gen) * 0.01 + 0.002).to(dtype)
    zp = None if symmetric else pack_int32(torch.randint(lo, hi, (n, groups), generator=gen), bits, dim=0)
    gi = torch.randint(0, groups, (k,), generator=gen, dtype=torch.int32) if g_idx else None
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    put = (lambda t: None if t is None else t.to(device))
    return Case(put(pack_int32(codes, bits)), put(scale), put(zp), put(gi), put(b), codes, bits, group_size)
