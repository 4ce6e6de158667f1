import pytest
import torch

from compress.errors import ConfigError
from compress.kernels import dequant_linear, dequant_linear_reference
from compress.quant.packing import pack_int32


def _case(bits=4, out=8, k=40, group=16, asym=True):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (out, k))
    groups = -(-k // group)
    scale = torch.rand(out, groups) + 0.1
    zp = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (out, groups)) if asym else None
    return codes, pack_int32(codes, bits), scale, zp


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_equals_the_formula(bits):
    codes, packed, scale, zp = _case(bits)
    zp_packed = pack_int32(zp, bits, dim=0)
    x = torch.randn(1, 40)                                   # M = 1
    idx = torch.arange(40) // 16
    w = (codes - zp[:, idx]).float() * scale[:, idx]
    y = dequant_linear_reference(x, packed, scale, zp_packed, None, bits=bits, group_size=16, in_features=40)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-6, atol=1e-6)


def test_all_zero_group():
    codes, packed, scale, _ = _case(asym=False)
    codes[:, :16] = 0
    packed = pack_int32(codes, 4)
    y = dequant_linear(torch.zeros(2, 40), packed, scale, None, None, bits=4, group_size=16, in_features=40)
    assert torch.equal(y, torch.zeros(2, 8))


def test_unknown_backend_is_refused():
    codes, packed, scale, _ = _case(asym=False)
    with pytest.raises(ConfigError, match="backend"):
        dequant_linear(torch.zeros(1, 40), packed, scale, None, None, bits=4, group_size=16, in_features=40,
                       backend="cuda-magic")
