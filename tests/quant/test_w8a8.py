"""W8A8 (FP8 / INT8 weights and activations): the FP8 grid, RTN and GPTQ on the 8-bit grids, the
packed W8A8Linear, static activation scales from calibration, config errors."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.formats import WeightFormat
from compress.kernels.act_quant import scale_from_amax
from compress.kernels.w8a8_linear import w8a8_linear_reference
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.gptq import gptq_solve
from compress.quant.rtn import rtn_solve, weighted_error
from compress.quant.w8a8_linear import W8A8Linear
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMES = ["fp8", "fp8-block", "fp8-static", "w8a8-int8", "w8a8-int8-static"]
STATIC = ["fp8-static", "w8a8-int8-static"]


def _layer(rows=200, cols=320, tokens=512, seed=0):
    """A weight with outlier rows and a Hessian of correlated, uneven inputs; 200 x 320 leaves a
    partial 128-block in both dimensions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3, cols)
    w = torch.randn(rows, cols, generator=g) * 0.05 * torch.linspace(0.5, 4, rows).unsqueeze(1)
    return w, 2 * x.T @ x / tokens


def _ids(seed=0):
    return torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(seed))


# --- the grids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_rtn_error_is_small_and_the_codes_are_the_formats(scheme):
    w, _ = _layer()
    r = rtn_solve(w, RTNConfig(scheme=scheme), torch.bfloat16)
    fmt = WeightFormat.parse(scheme)
    assert r.codes.dtype == (torch.float8_e4m3fn if fmt.kind == "fp8" else torch.int8)
    rel = float((r.weight - w).norm() / w.norm())
    # FP8 E4M3 keeps 3 mantissa bits (relative step 2^-4 at worst): ~2-3% RMS; INT8 per channel < 1%.
    assert rel < (0.04 if fmt.kind == "fp8" else 0.01)
    assert rel > 1e-4                                                  # negative control: it is quantized
    # The grid as stored: codes times the scale give the weight the model computes with.
    module = fmt.pack(r, bias=None, dtype=torch.bfloat16, input_amax=torch.tensor(2.0))
    assert torch.equal(module.dequantize(torch.float32), r.weight)


def test_fp8_scales_per_channel_tensor_and_block():
    w, _ = _layer()
    amax_rows = w.abs().amax(dim=1)
    ch = rtn_solve(w, RTNConfig(scheme="fp8"), torch.bfloat16)
    assert torch.equal(ch.scale[:, 0], (amax_rows / 448).to(torch.bfloat16).float())
    tensor = rtn_solve(w, RTNConfig(scheme="fp8-static"), torch.bfloat16)
    assert torch.equal(tensor.scale, torch.full_like(tensor.scale, float((w.abs().amax() / 448).bfloat16())))
    block = rtn_solve(w, RTNConfig(scheme="fp8-block"), torch.bfloat16)
    packed = WeightFormat.parse("fp8-block").pack(block, bias=None, dtype=torch.bfloat16)
    assert packed.weight_scale.shape == (2, 3)                         # ceil(200/128), ceil(320/128)
    # The last block is narrower in both dimensions: rows 128..199, columns 256..319.
    assert float(packed.weight_scale[1, 2]) == float((w[128:, 256:].abs().amax() / 448).bfloat16())
    # Negative control: the three layouts give different codes for the same weight.
    assert not torch.equal(ch.weight, tensor.weight) and not torch.equal(ch.weight, block.weight)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_on_the_8bit_grids_beats_round_to_nearest(scheme, act_order):
    w, h = _layer(rows=64, cols=256)
    cfg = GPTQConfig(scheme=scheme, act_order=act_order, observer="minmax")
    gptq = gptq_solve(h, w, cfg, torch.float32)
    rtn = rtn_solve(w, RTNConfig(scheme=scheme), torch.float32)
    assert gptq.fallback is None and gptq.codes.dtype == rtn.codes.dtype
    assert weighted_error(w, gptq.weight, h) < 0.8 * weighted_error(w, rtn.weight, h)
    # The result is on the grid it claims: decoding its codes on its scales gives its weight.
    module = WeightFormat.parse(scheme).pack(gptq, bias=None, dtype=torch.float32, input_amax=torch.tensor(1.0))
    assert torch.equal(module.dequantize(), gptq.weight)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-static", "w8a8-int8"])
def test_mse_scale_search_lowers_the_diagonal_weighted_error(scheme):
    w, h = _layer(seed=1)
    plain = rtn_solve(w, RTNConfig(scheme=scheme), torch.float32, h.diagonal())
    searched = rtn_solve(w, RTNConfig(scheme=scheme, observer="mse"), torch.float32, h.diagonal())

    def err(r):                                      # what the observer minimises: columns weighted by diag(H)
        return float(((r.weight - w).square() * h.diagonal()).sum())
    assert err(searched) < err(plain)
    assert not torch.equal(searched.scale, plain.scale)               # it did search


# --- the model pass -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["fp8", "fp8-block", "w8a8-int8"])
def test_dynamic_schemes_with_rtn_are_data_free(scheme):
    model, dense = tiny_model("llama"), tiny_model("llama")
    compress.quantize(model, RTNConfig(scheme=scheme), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, W8A8Linear) and q.input_scale is None and q.label == scheme
    assert model.lm_head.__class__.__name__ == "Linear"
    with torch.no_grad():
        a, b = model(input_ids=_ids()).logits, dense(input_ids=_ids()).logits
    assert 0 < float((a - b).norm() / b.norm()) < 0.1


@pytest.mark.parametrize("scheme", STATIC)
def test_static_schemes_need_calibration_and_take_the_input_range(scheme):
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}'.*static activation scale.*calib"):
        compress.quantize(tiny_model("llama"), RTNConfig(scheme=scheme), progress=False)
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}'.*calib"):
        compress.quantize(tiny_model("llama"), RTNConfig(group_size=32, overrides={"q_proj": {"scheme": scheme}}),
                          progress=False)
    model, probe = tiny_model("llama"), tiny_model("llama")
    compress.quantize(model, RTNConfig(scheme=scheme), calib=CalibrationData(_ids(), "ids", 0), progress=False)
    captured = {}

    def grab(module, args):                          # returns None: the input is left alone
        captured["amax"] = torch.maximum(captured.get("amax", torch.tensor(0.0)), args[0].abs().amax())

    hook = probe.model.layers[0].self_attn.q_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        probe(input_ids=_ids())
    hook.remove()
    attn = model.model.layers[0].self_attn
    kind = "fp8" if scheme.startswith("fp8") else "int8"
    assert torch.equal(attn.q_proj.input_scale, scale_from_amax(captured["amax"], kind).reshape(1))
    # q/k/v read one input: one input scale; fp8-static's per-tensor weight scale is shared too.
    assert torch.equal(attn.k_proj.input_scale, attn.q_proj.input_scale)
    assert not torch.equal(attn.o_proj.input_scale, attn.q_proj.input_scale)
    if scheme == "fp8-static":
        assert attn.q_proj.weight_scale.shape == (1,)
        assert torch.equal(attn.q_proj.weight_scale, attn.v_proj.weight_scale)
        assert not torch.equal(attn.q_proj.weight_scale, attn.o_proj.weight_scale)


def test_block_rows_do_not_span_the_fused_modules():
    """q/k/v are solved together, but each module's 128-row blocks start at its own first row: tiny
    llama's q (64 rows), k and v (32 each) stacked would fill one block."""
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in model.model.layers[0].self_attn.named_children()}
    compress.quantize(model, RTNConfig(scheme="fp8-block"), progress=False)
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        mod = getattr(attn, name)
        assert mod.weight_scale.shape == (1, 1)
        assert float(mod.weight_scale) == float(dense[name].abs().amax() / 448)       # its own rows only
    assert not torch.equal(attn.k_proj.weight_scale, attn.v_proj.weight_scale)


def test_overrides_mix_w8a8_and_weight_only_layers():
    model = tiny_model("llama")
    cfg = GPTQConfig(bits=4, group_size=32, overrides={"mlp.down_proj": {"scheme": "w8a8-int8"},
                                                      "self_attn.*": {"scheme": "fp8"}})
    assert cfg.for_module("model.layers.0.mlp.down_proj").weight_format == WeightFormat.parse("w8a8-int8")
    compress.quantize(model, cfg, calib=CalibrationData(_ids(), "ids", 0), progress=False)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.label == "w8a8-int8" and layer.self_attn.q_proj.label == "fp8"
    assert layer.mlp.up_proj.label == "int4 g32"


# --- the packed module --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_quantizes_the_activations(scheme):
    w, _ = _layer(rows=40, cols=192)
    fmt = WeightFormat.parse(scheme)
    r = rtn_solve(w, RTNConfig(scheme=scheme), torch.float32)
    bias = torch.randn(40)
    module = fmt.pack(r, bias=bias, dtype=torch.float32, input_amax=torch.tensor(4.0), observer="minmax")
    x = torch.randn(3, 5, 192)
    y = module(x)
    expected = w8a8_linear_reference(x, module.weight, module.weight_scale, module.input_scale, bias,
                                     kind=module.kind, act=fmt.act_strategy, block=module.block)
    assert torch.equal(y, expected)
    # Negative control: the activations really are rounded (the weight-only product differs).
    assert not torch.equal(y, torch.nn.functional.linear(x, module.dequantize(), bias))
    assert float((y - torch.nn.functional.linear(x, w, bias)).norm() / y.norm()) < 0.1
    assert (module.bits, module.group_size, module.symmetric) == (8, fmt.group_size, True)
    assert scheme in repr(module) and WeightFormat.of_module(module) == fmt


def test_requantized_keeps_the_format_and_the_input_scale():
    w, _ = _layer(rows=40, cols=192)
    fmt = WeightFormat.parse("fp8-static")
    module = fmt.pack(rtn_solve(w, RTNConfig(scheme="fp8-static"), torch.float32), bias=None, dtype=torch.float32,
                      input_amax=torch.tensor(4.0))
    new = module.requantized(w * 1.5)
    assert isinstance(new, W8A8Linear) and WeightFormat.of_module(new) == fmt
    assert torch.equal(new.input_scale, module.input_scale)
    assert not torch.equal(new.weight_scale, module.weight_scale)      # fresh weight scales


# --- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (dict(scheme="fp8", bits=6), "stores 8-bit weights; drop bits"),
    (dict(scheme="w8a8-int8", symmetric=False), "symmetric"),
    (dict(scheme="fp8", group_size=64), "one scale per output channel; group_size 64 does not apply"),
    (dict(scheme="fp8-static", group_size=32), "one scale per tensor"),
    (dict(scheme="fp8-block", group_size=64), "128x128 blocks; group_size 64"),
    (dict(overrides={"q_proj": {"scheme": "fp8", "bits": 4, "group_size": 64}}), r"overrides\['q_proj'\]"),
    (dict(scheme="fp16"), "scheme must be one of"),
])
def test_bad_w8a8_configs_are_refused_by_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        RTNConfig(**bad)


def test_w8a8_configs_accept_the_defaults():
    for kw in (dict(), dict(bits=8), dict(group_size=None), dict(bits=8, group_size=128)):
        assert RTNConfig(scheme="w8a8-int8", **kw).weight_format == WeightFormat.parse("w8a8-int8")
    assert RTNConfig(scheme="fp8-block", group_size=128).weight_format.group_size == 128
    override = RTNConfig(group_size=32, overrides={"o_proj": {"scheme": "fp8-block"}}).for_module("o_proj")
    assert override.weight_format == WeightFormat.parse("fp8-block") and override.bits == 8
