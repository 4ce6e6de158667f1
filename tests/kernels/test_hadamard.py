"""The Walsh-Hadamard rotation the quantized KV cache stores keys in."""

import pytest
import torch

from compress.kernels.hadamard import hadamard, rotate


def test_hadamard_is_orthogonal_and_keeps_dot_products():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    q, k = torch.randn(5, 64), torch.randn(7, 64)
    assert torch.allclose(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-4)
    assert torch.allclose(rotate(rotate(q)), q, atol=1e-5)            # its own inverse
    assert not torch.allclose(rotate(q), q, atol=1e-2)                # and not the identity
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)
