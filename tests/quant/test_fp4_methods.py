"""RTN and GPTQ on the NVFP4 / MXFP4 grids: defining properties against baselines, fused global
scales, W4A4 activations, config errors."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.fp4 import (mxfp4_block_scales, mxfp4_quantize, nvfp4_block_scales, nvfp4_dequantize,
                                nvfp4_fake_quantize_activations, nvfp4_global_scale, nvfp4_quantize)
from compress.quant.fp4_linear import FP4Linear
from compress.kernels.fp4_packing import unpack_fp4
from compress.quant.gptq import gptq_solve
from compress.quant.rtn import rtn_solve, weighted_error
from conftest import tiny_model


def _layer(rows=48, cols=128, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3, cols)   # correlated, uneven
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, 2 * x.T @ x / tokens


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
def test_rtn_is_the_format_primitive_bit_for_bit(scheme):
    w, _ = _layer()
    r = rtn_solve(w, RTNConfig(scheme=scheme), torch.float32)
    if scheme == "mxfp4":
        scales = mxfp4_block_scales(w)
        assert torch.equal(r.scale, scales) and torch.equal(r.codes, mxfp4_quantize(w, scales))
        assert r.global_scale is None
    else:
        g = nvfp4_global_scale(w.abs().amax())
        scales = nvfp4_block_scales(w, g)
        assert torch.equal(r.global_scale, g)
        assert torch.equal(r.scale.view(torch.uint8), scales.view(torch.uint8))
        assert torch.equal(r.codes, nvfp4_quantize(w, g, scales))
        assert torch.equal(r.weight, nvfp4_dequantize(r.codes, r.scale, g))


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_on_the_fp4_grid_beats_round_to_nearest(scheme, act_order):
    w, h = _layer()
    gptq = gptq_solve(h, w, GPTQConfig(scheme=scheme, act_order=act_order, observer="minmax"), torch.float32)
    rtn = rtn_solve(w, RTNConfig(scheme=scheme), torch.float32)
    assert gptq.fallback is None
    assert weighted_error(w, gptq.weight, h) < 0.8 * weighted_error(w, rtn.weight, h)
    # The result is on the grid it claims: decoding its codes on its scales gives its weight.
    if scheme == "nvfp4a16":
        assert torch.equal(nvfp4_dequantize(gptq.codes, gptq.scale, gptq.global_scale), gptq.weight)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
def test_mse_block_scale_search_lowers_the_weighted_error(scheme):
    w, h = _layer(seed=1)
    plain = rtn_solve(w, RTNConfig(scheme=scheme), torch.float32, h.diagonal())
    searched = rtn_solve(w, RTNConfig(scheme=scheme, observer="mse"), torch.float32, h.diagonal())
    # MXFP4's power-of-two scales leave the search few choices; NVFP4's FP8 scales leave many.
    gain = 0.97 if scheme == "nvfp4a16" else 1.0
    assert weighted_error(w, searched.weight, h) < gain * weighted_error(w, plain.weight, h)


def _ids():
    return torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", [RTNConfig, GPTQConfig])
def test_fused_projections_share_one_global_scale(method):
    model = tiny_model("llama")
    compress.quantize(model, method(scheme="nvfp4a16"), calib=CalibrationData(_ids(), "ids", 0), progress=False)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj.weight_global_scale, attn.k_proj.weight_global_scale, attn.v_proj.weight_global_scale]
    assert all(torch.equal(g, qkv[0]) for g in qkv)
    assert torch.equal(mlp.gate_proj.weight_global_scale, mlp.up_proj.weight_global_scale)
    assert not torch.equal(attn.o_proj.weight_global_scale, qkv[0])              # its own tensor
    assert isinstance(mlp.down_proj, FP4Linear) and model.lm_head.__class__.__name__ == "Linear"


def test_w4a4_needs_calibration_and_quantizes_activations():
    with pytest.raises(ConfigError, match="nvfp4.*calibration"):
        compress.quantize(tiny_model("llama"), RTNConfig(scheme="nvfp4"), progress=False)
    calib = CalibrationData(_ids(), "ids", 0)
    w4a4, w4a16 = tiny_model("llama"), tiny_model("llama")
    compress.quantize(w4a4, RTNConfig(scheme="nvfp4"), calib=calib, progress=False)
    compress.quantize(w4a16, RTNConfig(scheme="nvfp4a16"), calib=calib, progress=False)
    q4, q16 = w4a4.model.layers[0].self_attn.q_proj, w4a16.model.layers[0].self_attn.q_proj
    assert torch.equal(q4.weight_packed, q16.weight_packed)                         # same weights
    assert q4.input_global_scale is not None and q16.input_global_scale is None
    # The input scale maps the calibration inputs' max |x| onto 448 * 6.
    captured = {}
    def grab(module, args):
        captured["amax"] = args[0].abs().amax()          # returns None: the input is left alone

    hook = w4a16.model.layers[0].self_attn.q_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        w4a16(input_ids=_ids())
    hook.remove()
    assert torch.equal(q4.input_global_scale, nvfp4_global_scale(captured["amax"]))
    with torch.no_grad():
        assert not torch.equal(w4a4(input_ids=_ids()).logits, w4a16(input_ids=_ids()).logits)


def test_activation_rounding_matches_the_weight_rule_in_float32():
    x = torch.randn(8, 64)
    g = nvfp4_global_scale(x.abs().amax())
    expected = nvfp4_dequantize(nvfp4_quantize(x, g, nvfp4_block_scales(x, g)), nvfp4_block_scales(x, g), g)
    assert torch.equal(nvfp4_fake_quantize_activations(x, g), expected)
    x[:, :16] = 0                                                      # an all-zero block stays zero
    assert torch.equal(nvfp4_fake_quantize_activations(x, g)[:, :16], torch.zeros(8, 16))


def test_fp4_module_forward_is_linear_with_its_dequantized_weight():
    w, _ = _layer(rows=24, cols=64)
    r = rtn_solve(w, RTNConfig(scheme="nvfp4a16"), torch.float32)
    bias = torch.randn(24)
    module = FP4Linear.from_codes(r.codes, r.scale, r.global_scale, scheme="nvfp4a16", bias=bias, dtype=torch.float32)
    assert torch.equal(unpack_fp4(module.weight_packed), r.codes)
    assert torch.equal(module.dequantize(), r.weight)
    x = torch.randn(3, 5, 64)
    assert torch.equal(module(x), torch.nn.functional.linear(x, r.weight, bias))
    assert module.label == "nvfp4a16" and "nvfp4" in repr(module)


@pytest.mark.parametrize("bad,match", [
    (dict(scheme="fp4"), "scheme must be one of"),
    (dict(scheme="nvfp4a16", bits=8), "bits must be 4"),
    (dict(scheme="mxfp4", symmetric=False), "symmetric"),
])
def test_bad_fp4_configs_are_refused_by_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        RTNConfig(**bad)


@pytest.mark.parametrize("scheme,block,other", [("mxfp4", 32, 16), ("nvfp4a16", 16, 32), ("nvfp4", 16, 64)])
def test_a_group_size_other_than_the_fp4_block_is_refused(scheme, block, other):
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}' stores fixed blocks of {block} inputs; "
                                          rf"group_size {other} does not apply.*drop group_size"):
        RTNConfig(scheme=scheme, group_size=other)
    with pytest.raises(ConfigError, match=rf"overrides\['mlp.up_proj'\]: scheme '{scheme}'.*group_size {other}"):
        RTNConfig(group_size=32, overrides={"mlp.up_proj": {"scheme": scheme, "group_size": other}})
    # Negative controls: the block itself, null and the untouched default are fine, and an override
    # that switches to the scheme takes its block instead of the int base's group size.
    for ok in (block, None, 128):
        assert RTNConfig(scheme=scheme, group_size=ok).weight_format.group_size == block
    cfg = RTNConfig(group_size=32 if block != 32 else 64, overrides={"mlp.up_proj": {"scheme": scheme}})
    assert cfg.for_module("model.layers.0.mlp.up_proj").group_size == block


def test_a_layer_that_does_not_fill_whole_blocks_is_named():
    model = tiny_model("llama", intermediate_size=168)                  # 168 = 10 * 16 + 8
    with pytest.raises(ConfigError, match=r"168 of model.layers.0.mlp.down_proj.*multiple of 16.*ignore"):
        compress.quantize(model, RTNConfig(scheme="nvfp4a16"), progress=False)
    compress.quantize(model, RTNConfig(scheme="nvfp4a16", ignore=["lm_head", "down_proj"]), progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, FP4Linear)
