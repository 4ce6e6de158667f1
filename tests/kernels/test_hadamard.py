"""Hadamard rotations: the Walsh-Hadamard rotation the quantized KV cache stores keys in, the
matrices of order 2^a * m (Paley cores), the fast transform and its Triton kernel.

Dense n x n checks stop at n = 4096 (18944^2 float64 values are 2.9 GB); the larger orders are
checked through the fast transform on a few rows."""

import math

import pytest
import torch

from compress.kernels.hadamard import (decompose, hadamard, hadamard_matrix, hadamard_transform,
                                       hadamard_transform_reference, random_hadamard_matrix, rotate)

from kernel_cases import REL_TOL, rel_err, triton_device  # noqa: F401  (fixture)

# Real model widths (hidden, head, intermediate sizes) and the m of n = m * 2^a each is built with.
SIZES = {64: 1, 128: 1, 576: 36, 896: 28, 1536: 12, 2048: 1, 3072: 12, 3584: 28, 4096: 1, 5120: 20,
         8192: 1, 14336: 28, 18944: 148}
DENSE_MAX = 4096


def test_hadamard_is_orthogonal_and_keeps_dot_products():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    q, k = torch.randn(5, 64), torch.randn(7, 64)
    assert torch.allclose(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-4)
    assert torch.allclose(rotate(rotate(q)), q, atol=1e-5)            # its own inverse
    assert not torch.allclose(rotate(q), q, atol=1e-2)                # and not the identity
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


@pytest.mark.parametrize("n", SIZES)
def test_decomposition_takes_the_smallest_paley_order(n):
    m, p = decompose(n)
    assert (m, m * p, p & (p - 1)) == (SIZES[n], n, 0)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 148] + [n for n in SIZES if n <= DENSE_MAX])
def test_hadamard_matrix_is_orthogonal_with_entries_one_over_sqrt_n(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10


@pytest.mark.parametrize("n", [48, 576, 896, 1536])
def test_hadamard_matrix_is_the_kronecker_product_with_the_paley_factor_outer(n):
    """H_n = H_m (x) H_{2^a}: built here from the power-of-two ``hadamard`` (separate code)."""
    m, p = decompose(n)
    want = torch.kron(hadamard_matrix(m, dtype=torch.float64), hadamard(p, dtype=torch.float64))
    assert torch.allclose(hadamard_matrix(n, dtype=torch.float64), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [64, 2048])
def test_power_of_two_orders_are_the_sylvester_matrix(n):
    assert torch.equal(hadamard_matrix(n), hadamard(n))


def test_hadamard_matrix_casts_and_caches():
    h = hadamard_matrix(576, dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and hadamard_matrix(576, dtype=torch.bfloat16) is h
    assert torch.equal(h, hadamard_matrix(576, dtype=torch.float64).to(torch.bfloat16))


@pytest.mark.parametrize("n", [6, 52, 100, 1004])
def test_orders_without_a_construction_are_refused_by_name(n):
    """6: no Hadamard matrix exists; 52 = 4 * 13, 100 = 4 * 25, 1004 = 4 * 251: no m = n / 2^k
    is q + 1 (q = 3 mod 4) or 2 (q + 1) (q = 1 mod 4) for a prime q (25, 51, 99; 250, 501, 1003 are
    not). The message names n and the nearest supported orders."""
    assert decompose(n) is None
    near = {6: "4 and 8", 52: "48 and 56", 100: "96 and 104", 1004: "1000 and 1008"}[n]
    with pytest.raises(ValueError, match=rf"order {n} .*2\^a \* m.* {near}"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match=rf"order {n} "):
        hadamard_transform(torch.zeros(2, n), backend="torch")
    with pytest.raises(ValueError, match="positive order"):
        hadamard_matrix(0)


def test_random_hadamard_matrix_is_orthogonal_deterministic_and_seeded():
    n = 1536
    r = random_hadamard_matrix(n, 7, dtype=torch.float64)
    assert torch.equal(r, random_hadamard_matrix(n, 7, dtype=torch.float64))
    assert (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    # H @ diag(s): each column is H's, up to a sign; signs of both kinds occur.
    h = hadamard_matrix(n, dtype=torch.float64)
    signs = (r / h)[0]
    assert torch.equal(r / h, signs.expand(n, n)) and set(signs.tolist()) == {1.0, -1.0}
    assert not torch.equal(r, random_hadamard_matrix(n, 8, dtype=torch.float64))     # negative control


@pytest.mark.parametrize("n", [12, 64, 576, 1536, 3584, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_equals_the_dense_product(n, dtype):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    ref = x.double() @ hadamard_matrix(n, dtype=torch.float64)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    # float32: summation order only; bf16: the output's rounding (the input is exact in float32).
    assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 5e-3)
    assert rel_err(x, ref) > 0.5                                                  # not the identity


@pytest.mark.parametrize("n", [576, 3584])
def test_transform_undone_by_the_transpose_and_blockwise(n):
    x = torch.randn(4, n, dtype=torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64)
    assert rel_err(hadamard_transform(x.float()).double() @ h.T, x) < 1e-6
    # n smaller than the last dim: each block of n channels rotated on its own.
    xx = torch.randn(2, 3 * n)
    blocks = torch.cat([hadamard_transform(xx[:, i * n:(i + 1) * n]) for i in range(3)], dim=1)
    assert torch.equal(hadamard_transform(xx, n), blocks)
    with pytest.raises(ValueError, match="multiple"):
        hadamard_transform(xx, 5 * 128)


@pytest.mark.parametrize("n", [5120, 8192, 14336, 18944])
def test_large_orders_are_orthogonal_through_the_transform(n):
    """Rows e_i H (a handful of i) have entries +-1/sqrt(n) and are orthonormal; random rows keep
    their norms."""
    idx = torch.tensor([0, 1, 2, n // 2 - 1, n // 3, n - 1])
    rows = hadamard_transform(torch.eye(n, dtype=torch.float64)[idx].float()).double()      # (6, n)
    assert torch.allclose(rows.abs(), torch.full_like(rows, 1 / math.sqrt(n)), rtol=1e-6, atol=0)
    assert (rows @ rows.T - torch.eye(len(idx), dtype=torch.float64)).abs().max() < 1e-5
    x = torch.randn(4, n, dtype=torch.float64)
    y = hadamard_transform(x.float()).double()
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)


@pytest.mark.parametrize("n", [64, 576, 1536, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_equals_the_reference(n, dtype, triton_device):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[1] = 0                                                                     # an all-zero row
    want = hadamard_transform_reference(x)
    y = hadamard_transform(x.to(triton_device), backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    # The same float32 arithmetic; bf16 outputs may differ by one unit in the last place where a
    # GPU's FMAs move a sum across a rounding boundary (under the interpreter they are equal).
    if dtype == torch.float32:
        assert rel_err(y, want) < REL_TOL[torch.float32]
    else:
        assert ((y.float().cpu() - want.float()).abs() <= want.float().abs() * 2 ** -7).all()
    assert not y[1].any()
    assert rel_err(y, x.double() @ hadamard_matrix(n, dtype=torch.float64)) < REL_TOL[dtype]


def test_triton_refuses_a_row_wider_than_its_tile(triton_device):
    x = torch.randn(1, 65536, device=triton_device)
    with pytest.raises(ValueError, match="tile"):
        hadamard_transform(x, backend="triton")
    assert torch.equal(hadamard_transform(x, backend="auto"), hadamard_transform_reference(x))


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend"):
        hadamard_transform(torch.zeros(1, 64), backend="cuda")
