import pytest
import torch

from compress.errors import ConfigError
from compress.kernels import dequant_linear, dequant_linear_reference
from compress.kernels.packing import pack_int32


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


def test_reference_with_g_idx_uses_the_group_of_each_column():
    codes, packed, scale, zp = _case(4, out=8, k=40, group=16, asym=True)
    g_idx = torch.randint(0, 3, (40,), dtype=torch.int32)
    y = dequant_linear_reference(torch.eye(40), packed, scale, pack_int32(zp, 4, dim=0), None, bits=4,
                                 group_size=16, in_features=40, g_idx=g_idx)
    w = (codes - zp[:, g_idx.long()]).float() * scale[:, g_idx.long()]
    torch.testing.assert_close(y, w.T, rtol=1e-6, atol=1e-6)


def test_auto_runs_the_reference_on_cpu_even_for_widths_triton_lacks():
    from compress.kernels.dequant_linear import resolve_backend
    assert resolve_backend("auto", torch.zeros(1, 4), 4) == "torch"
    assert resolve_backend("auto", torch.zeros(1, 4), 3) == "torch"
    assert resolve_backend("torch", torch.zeros(1, 4), 4) == "torch"


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    codes, packed, scale, _ = _case(asym=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1.*backend='torch'"):
        dequant_linear(torch.zeros(1, 40), packed, scale, None, None, bits=4, group_size=16, in_features=40,
                       backend="triton")


def test_triton_refuses_3_bit_weights_by_name(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    codes, packed, scale, _ = _case(bits=3, asym=False)
    with pytest.raises(ConfigError, match="not 3-bit"):
        dequant_linear(torch.zeros(1, 40), packed, scale, None, None, bits=3, group_size=16, in_features=40,
                       backend="triton")
