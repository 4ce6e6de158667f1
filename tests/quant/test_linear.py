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
