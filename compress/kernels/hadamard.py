"""Hadamard rotations along the last dimension of a tensor: the Walsh-Hadamard rotation of the
quantized KV cache, and the rotations of QuaRot / SpinQuant for the sizes real models have.

A Hadamard matrix of order n has entries +-1 and H H^T = n I; divided by sqrt(n) it is orthogonal,
so rotating activations by H and weights by H^T leaves a layer's output unchanged while spreading
outlier channels over all channels before quantizing.

- ``hadamard`` / ``rotate``: the Sylvester matrix of a power-of-two order (symmetric, its own
  inverse). The quantized KV cache stores keys rotated and the decode-attention kernels rotate the
  query instead of un-rotating the keys, since (qH).(kH) = q.k.
- ``hadamard_matrix``: every order n = 2^a * m with m = 1 or a Paley order (below), as
  H_n = H_m (x) H_{2^a} (Kronecker product, H_m the outer factor), so index i = i_m * 2^a + i_p.
  Not symmetric in general: its inverse is its transpose.
- ``hadamard_transform``: x @ H_n without the n x n matrix: the last dim viewed as (m, 2^a), a dense
  m x m matmul on the first axis and the fast Walsh-Hadamard butterfly on the second; Triton on a GPU.

Paley's constructions, for a prime q (the Jacobsthal matrix Q[i, j] = chi(j - i), chi the quadratic
character mod q):
- Paley I, q = 3 (mod 4): order q + 1 (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, 104, 108, ...);
- Paley II, q = 1 (mod 4): order 2 (q + 1) (12, 28, 36, 60, 76, 84, 108, 124, 148, ...).
The smallest m that works is used. Prime powers q (GF(q) arithmetic) are not built, so for example
100 = 4 * 25 is refused.
"""

from __future__ import annotations

import functools
import math

import torch

from .dequant_linear import resolve_backend


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


# ---------------------------------------------------------------------------------------------------
# Orders 2^a * m: Paley cores and the Kronecker product with the Sylvester matrix.


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_prime(m: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) when Paley's construction gives order ``m``, else None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I", m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II", m // 2 - 1
    return None


def decompose(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and m = 1 or a Paley order, m smallest; or None."""
    if n < 1:
        return None
    p = n & -n                                       # the largest power of two dividing n
    m = n // p
    while p >= 1:
        if m == 1 or _paley_prime(m) is not None:
            return m, p
        m, p = m * 2, p // 2
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) mod the prime q: 0 on the diagonal, +1 for a quadratic residue, else -1."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[torch.arange(1, q) ** 2 % q] = 1.0
    chi[0] = 0.0
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]                                    # (q, q)


@functools.lru_cache(maxsize=32)
def _core(m: int) -> torch.Tensor:
    """The unnormalized (+-1) Hadamard matrix H_m, float64 on the CPU, checked: H_m H_m^T = m I."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _paley_prime(m)
    one = torch.ones(q, 1, dtype=torch.float64)
    jac = _jacobsthal(q)
    if kind == "I":
        # Skew conference matrix S = [[0, 1^T], [-1, Q]] (Q^T = -Q as chi(-1) = -1); H = I + S.
        s = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), one.T], 1),
                       torch.cat([-one, jac], 1)], 0)
        h = torch.eye(q + 1, dtype=torch.float64) + s
    else:
        # Symmetric conference matrix C = [[0, 1^T], [1, Q]]; H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
        c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), one.T], 1),
                       torch.cat([one, jac], 1)], 0)
        h = (torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
             + torch.kron(torch.eye(q + 1, dtype=torch.float64),
                          torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)))
    # Exact in float64 (integers). H_m (x) H_p is then Hadamard too, so the n x n product is not formed.
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"Paley {kind} (q = {q}) did not give a Hadamard matrix of order {m}")
    return h


def _unsupported(n: int) -> ValueError:
    if n < 1:
        return ValueError(f"a Hadamard matrix needs a positive order, got {n}")
    near = [k for k in range(max(1, n - 64), n + 65) if decompose(k) is not None]
    below = max((k for k in near if k < n), default=1)
    above = min(k for k in near if k > n)                 # n + 1 .. n + 64 always holds a multiple of 64
    return ValueError(
        f"no Hadamard matrix of order {n} here: the supported orders are n = 2^a * m with m = 1, "
        f"m = q + 1 (Paley I, q a prime = 3 mod 4: 12, 20, 24, 32, 44, ...) or m = 2 (q + 1) (Paley II, "
        f"q a prime = 1 mod 4: 12, 28, 36, 60, 76, ...); the nearest supported orders are {below} and "
        f"{above}: pad the dimension to one of them or rotate it in blocks of a supported size")


def _split(n: int) -> tuple[int, int]:
    mp = decompose(n)
    if mp is None:
        raise _unsupported(n)
    return mp


@functools.lru_cache(maxsize=16)
def _hadamard_matrix(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    m, p = _split(n)
    work = torch.float64 if dtype == torch.float64 else torch.float32            # +-1/sqrt(n) rounded once
    core = _core(m).to(device=device, dtype=work)
    syl = torch.ones(1, 1, dtype=work, device=device)
    while syl.shape[0] < p:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    h = torch.kron(core, syl).mul_(1.0 / math.sqrt(n))                          # (n, n), H_m outer
    return h.to(dtype)


def hadamard_matrix(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalized Hadamard matrix H_m (x) H_{2^a} / sqrt(n) of order n = 2^a * m (orthogonal:
    H H^T = I). Cached per (n, device, dtype). Raises ValueError for an order it cannot build."""
    return _hadamard_matrix(n, str(torch.device(device or "cpu")), dtype)


def random_hadamard_matrix(n: int, seed: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """H_n @ diag(s) with random signs s from ``torch.Generator().manual_seed(seed)``: orthogonal,
    the same for the same seed on every device (QuaRot's rotation of the residual stream)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1                # (n,) on the CPU
    h = hadamard_matrix(n, device=device, dtype=dtype)
    return h * signs.to(device=h.device, dtype=dtype)[None, :]


# ---------------------------------------------------------------------------------------------------
# The fast transform.


@functools.lru_cache(maxsize=32)
def _core_on(m: int, device: str) -> torch.Tensor:
    # Kept per device like _hadamard: no host-to-device copy per call (CUDA-graph capture).
    return _core(m).to(device=device, dtype=torch.float32)


def _order(x: torch.Tensor, n: int | None) -> tuple[int, int, int]:
    """(n, m, p) of a transform of ``x``'s last dim in blocks of ``n`` (default: all of it)."""
    k = x.shape[-1]
    n = k if n is None else n
    if n < 1 or k % n:
        raise ValueError(f"a Hadamard transform of order {n} needs a last dim that is a multiple of it, got {k}")
    return (n, *_split(n))


def hadamard_transform_reference(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``hadamard_transform`` in PyTorch: float32 butterflies and one small matmul, no n x n matrix."""
    n, m, p = _order(x, n)
    y = x.float().reshape(-1, m, p)                                             # (R, m, p), R = rows * k / n
    if m > 1:
        y = _core_on(m, str(x.device)).T @ y                                    # y[j] = sum_i H_m[i, j] x[i]
    h = 1
    while h < p:
        # Pairs (i, i + h) inside blocks of 2h: (a, b) -> (a + b, a - b), i.e. H_2 on one bit of i_p.
        y = y.reshape(-1, m, p // (2 * h), 2, h)                                # (R, m, blocks, 2, h)
        a, b = y[:, :, :, 0], y[:, :, :, 1]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)


def hadamard_transform(x: torch.Tensor, n: int | None = None, *, backend: str = "auto") -> torch.Tensor:
    """x @ H_n along the last dim, in float32, returned in x's dtype. ``n`` defaults to x.shape[-1];
    a smaller n must divide it and rotates each block of n consecutive channels (a block-diagonal
    rotation, e.g. per attention head). The inverse is ``y @ hadamard_matrix(n).T`` (H_n is
    not symmetric in general).

    ``backend``: ``torch`` runs ``hadamard_transform_reference``; ``auto`` runs the Triton kernel
    on CUDA tensors (and the reference for the rare size the kernel does not take); ``triton``
    always (the interpreter on the CPU), with a ValueError saying why when it cannot."""
    n, m, p = _order(x, n)
    if resolve_backend(backend, x, 8) == "torch":                    # 8: no weight bit width limits this kernel
        return hadamard_transform_reference(x, n)
    from . import hadamard_triton as tk

    reason = tk.unsupported(m, p, x.dtype)
    if reason is not None:
        if backend == "triton":
            raise ValueError(f"backend 'triton' cannot run a Hadamard transform of order {n}: {reason}; "
                             f"use backend='torch' or 'auto'")
        return hadamard_transform_reference(x, n)
    return tk.hadamard_transform(x, m, p, _core_on(m, str(x.device)))
