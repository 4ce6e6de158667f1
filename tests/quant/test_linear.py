import pytest
import torch

from compress.quant.grid import compute_qparams, dequantize, quantize
from compress.quant.linear import QuantLinear


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, None, 24])        # 24: partial last group of 40 columns
def test_forward_is_linear_with_the_dequantized_weight(symmetric, group_size):
    w = torch.randn(12, 40)
    bias = torch.randn(12)
    scale, zp = compute_qparams(w, 4, group_size, symmetric, torch.float32)
    codes = quantize(w, scale, zp, 4, group_size)
    module = QuantLinear.from_codes(codes, scale, None if symmetric else zp, bits=4, group_size=group_size,
                                    bias=bias, dtype=torch.float32)
    expected_w = dequantize(codes, scale, None if symmetric else zp, group_size, torch.float32)
    assert torch.equal(module.dequantize(), expected_w)
    x = torch.randn(3, 5, 40)
    assert torch.equal(module(x), torch.nn.functional.linear(x, expected_w, bias))
    assert module.weight_shape.tolist() == [12, 40]
    assert ("weight_zero_point" in dict(module.named_buffers())) == (not symmetric)


def test_bfloat16_activations():
    w = torch.randn(8, 32)
    scale, zp = compute_qparams(w, 4, 16, True, torch.bfloat16)
    module = QuantLinear.from_codes(quantize(w, scale, zp, 4, 16), scale, None, bits=4, group_size=16, bias=None,
                                    dtype=torch.bfloat16)
    y = module(torch.randn(2, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and module.weight_scale.dtype == torch.bfloat16


def test_dynamic_actorder_module_gathers_scales_by_g_idx():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (12, 40), dtype=torch.int8)
    scale, zp = torch.rand(12, 3) + 0.1, torch.randint(-8, 8, (12, 3)).float()
    module = QuantLinear.from_codes(codes, scale, zp, bits=4, group_size=16, bias=None, dtype=torch.float32,
                                    actorder="group")
    assert module.weight_g_idx.tolist() == [i // 16 for i in range(40)]     # natural order by default
    g_idx = torch.randint(0, 3, (40,), dtype=torch.int32)
    module.weight_g_idx.copy_(g_idx)
    expected = (codes.float() - zp[:, g_idx.long()]) * scale[:, g_idx.long()]
    assert torch.equal(module.dequantize(), expected)
    x = torch.randn(2, 40)
    torch.testing.assert_close(module(x), x @ expected.T)
    assert "g_idx" in repr(module)


def test_g_idx_outside_the_scale_table_is_refused_by_name():
    from compress.errors import CheckpointError
    module = QuantLinear(40, 12, bits=4, group_size=16, symmetric=True, actorder="group")
    module.check_g_idx("layer")                                  # the default is valid
    module.weight_g_idx[5] = 3                                   # 3 groups: 0, 1, 2
    with pytest.raises(CheckpointError, match=r"layer.weight_g_idx .*\[0, 3\).*re-export"):
        module.check_g_idx("layer")


@pytest.mark.parametrize("symmetric", [True, False])
def test_triton_backend_matches_torch_backend_on_a_module(symmetric):
    pytest.importorskip("triton")
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(24, 72) * 0.02
    scale, zp = compute_qparams(w, 4, 32, symmetric, torch.float32)         # 72 = 2*32 + 8: partial group
    module = QuantLinear.from_codes(quantize(w, scale, zp, 4, 32), scale, None if symmetric else zp, bits=4,
                                    group_size=32, bias=torch.randn(24), dtype=torch.float32).to(device)
    x = torch.randn(3, 5, 72, device=device)
    ref = module(x)
    module.backend = "triton"
    torch.testing.assert_close(module(x), ref, rtol=1e-4, atol=1e-5)
