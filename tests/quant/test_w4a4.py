"""W4A4 int4 (int4 weights, INT4 activations dynamic per token; QuaRot's format): the format and its
errors, the layer against an independent computation and against W4A8 / W4A16 on the same weights,
RTN and GPTQ, the rotation that makes it work, the compressed-tensors export, our reload and
transformers' reload (which rounds activations with another scale)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.checkpoint.export import export
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from compress.errors import CheckpointError, ConfigError
from compress.formats import WeightFormat
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.linear import QuantLinear
from compress.rotation import RotationConfig
from conftest import tiny_model
from test_w4a8 import _group, _rewrite  # the same config.json edits as W4A8's refusal tests
from test_families import IDS, build

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEME = "w4a4-int4"
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def _ids(seed=0):
    return torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _quantized(method: str, scheme: str = SCHEME, group_size: int | None = 32, dtype=torch.float32):
    """A tiny llama built in ``dtype`` and quantized with ``method`` (rtn | gptq) to ``scheme``."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = tiny_model("llama")
    finally:
        torch.set_default_dtype(default)
    if method == "gptq":
        cfg = GPTQConfig(scheme=scheme, group_size=group_size)
        compress.quantize(model, cfg, calib=CalibrationData(_ids(1), "ids", 0), progress=False)
    else:
        compress.quantize(model, RTNConfig(scheme=scheme, group_size=group_size), progress=False)
    return model


def _int4_tokens(x: torch.Tensor, half_range: float = 7.0) -> torch.Tensor:
    """Each token (last dim) rounded to int4 codes [-8, 7] with scale max|x| / half_range and back,
    written out here rather than taken from compress.kernels.act_quant."""
    s = (x.float().abs().amax(dim=-1, keepdim=True) / half_range).clamp_min(1e-10)
    return torch.clamp(torch.round(x.float() / s), -8, 7) * s


# --- format and configs -------------------------------------------------------------------------

def test_the_format_is_int4_weights_with_int4_token_activations():
    fmt = RTNConfig(scheme=SCHEME, group_size=None).weight_format
    assert (fmt.kind, fmt.bits, fmt.group_size, fmt.symmetric, fmt.act_quant) == ("int", 4, None, True, True)
    assert (fmt.act_strategy, fmt.act_codes, fmt.scheme) == ("token", "int4", SCHEME)
    assert fmt.int4_act and not fmt.w4a8 and not fmt.w8a8 and not fmt.static_activations
    assert str(fmt) == SCHEME and WeightFormat.parse(SCHEME) == fmt          # the spelling is per channel
    assert WeightFormat.parse("w4a4-int4-g64").group_size == 64
    assert WeightFormat.parse("w4a4-int4-g128-partial").partial_groups
    assert fmt.packed_class is QuantLinear and fmt.ct_format == "pack-quantized"
    assert fmt.weights_args() == {"dynamic": False, "group_size": None, "num_bits": 4, "strategy": "channel",
                                  "symmetric": True, "type": "int"}
    assert fmt.input_args() == {"dynamic": True, "group_size": None, "num_bits": 4, "strategy": "token",
                                "symmetric": True, "type": "int"}
    # Negative controls: W4A8 INT8 on the same weights is another format, with 8-bit activations.
    w4a8 = RTNConfig(scheme="w4a8-int8", group_size=None).weight_format
    assert w4a8 != fmt and w4a8.input_args()["num_bits"] == 8 and w4a8.weights_args() == fmt.weights_args()


def test_compressed_tensors_accepts_it_as_its_w4a4_preset():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    fmt = WeightFormat.from_scheme(SCHEME, 4, 128)
    want = PRESET_SCHEMES["W4A4"]
    keys = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size")
    for ours, theirs in ((fmt.weights_args(), want["weights"]), (fmt.input_args(), want["input_activations"])):
        dumped = theirs.model_dump(mode="json")
        assert {k: ours[k] for k in keys} == {k: dumped[k] for k in keys}
    # Its validators take our per-channel config group as it is.
    channel = WeightFormat.parse(SCHEME)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**channel.weights_args()),
                                input_activations=QuantizationArgs(**channel.input_args()))
    assert scheme.input_activations.num_bits == 4 and scheme.input_activations.strategy == "token"


@pytest.mark.parametrize("kw,match", [
    (dict(bits=8), "stores 4-bit integer weights"),
    (dict(bits=2), "stores 4-bit integer weights"),
    (dict(symmetric=False), "symmetric \\(W4A4 kernels.*drop symmetric: false"),
    (dict(group_size=0), "group_size must be a positive integer"),
])
def test_configs_that_make_no_w4a4_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        RTNConfig(scheme=SCHEME, **kw)


def test_fields_in_between_are_refused():
    for bad in (dict(bits=4, act_strategy="tensor"), dict(bits=8, act_strategy="token"),
                dict(bits=4, act_strategy="token", symmetric=False)):
        with pytest.raises(ConfigError, match="nor a W4A8 or W4A4 one.*w4a4-int4"):
            WeightFormat("int", group_size=64, act_quant=True, act_dtype="int4", **bad)
    with pytest.raises(ConfigError, match="unknown weight format"):
        WeightFormat.parse("w4a4-int8")
    with pytest.raises(ConfigError, match="-partial needs a group size \\(w4a4-int4-g128-partial\\)"):
        WeightFormat.parse("w4a4-int4-partial")
    with pytest.raises(ValueError, match="int8, fp8 or int4 over int4 symmetric"):
        QuantLinear(64, 8, bits=4, group_size=None, symmetric=True, act_dtype="int2")


def test_an_override_keeps_the_pass_group_size():
    cfg = GPTQConfig(group_size=None, overrides={"down_proj": {"scheme": SCHEME}})
    assert cfg.for_module("model.layers.0.mlp.down_proj").weight_format == WeightFormat.parse(SCHEME)
    assert cfg.for_module("model.layers.0.mlp.up_proj").weight_format == WeightFormat.parse("int4")


# --- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_layer_is_int4_weights_times_int4_rounded_tokens(method):
    model = _quantized(method)
    for name in LAYERS:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.act_dtype == "int4"
        assert layer.weight_format == WeightFormat.parse("w4a4-int4-g32") and layer.label == "w4a4-int4-g32"
        x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(2))
        x[0, 0] = 0                                                       # an all-zero token
        x[1, 2, 5] = 40.0                                                 # an outlier token
        w = layer.dequantize(torch.float32)
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, torch.nn.functional.linear(_int4_tokens(x), w), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[0, 0], torch.zeros_like(y[0, 0]))
        # Negative controls: not the weight-only product, not compressed-tensors' max|x| / 7.5 grid.
        assert _rel(y, torch.nn.functional.linear(x, w)) > 1e-2
        assert _rel(y, torch.nn.functional.linear(_int4_tokens(x, 7.5), w)) > 1e-3


def test_int4_activations_cost_more_than_int8_on_the_same_weights():
    """The defining property against its baselines: same int4 weights (RTN), so the layer's error
    against the float layer grows from W4A16 to W4A8 (slightly) and to W4A4 (clearly)."""
    dense = tiny_model("llama")
    models = {s: _quantized("rtn", s) for s in (SCHEME, "w4a8-int8", "int")}
    for name in LAYERS:
        x = torch.randn(3, 7, dense.get_submodule(name).in_features, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            ref = dense.get_submodule(name)(x)
            err = {s: _rel(m.get_submodule(name)(x), ref) for s, m in models.items()}
        assert err[SCHEME] > 1.3 * err["w4a8-int8"] and err["w4a8-int8"] >= 0.99 * err["int"], err
    a, b = models[SCHEME].model.layers[0].mlp.up_proj, models["int"].model.layers[0].mlp.up_proj
    assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scale, b.weight_scale)
    assert _rel(_logits(models[SCHEME]), _logits(dense)) > _rel(_logits(models["w4a8-int8"]), _logits(dense))


def test_bfloat16_layer_matches_the_float32_computation():
    model = _quantized("rtn", dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        y = layer(x)
    want = torch.nn.functional.linear(_int4_tokens(x), layer.dequantize(torch.float32))
    assert y.dtype == torch.bfloat16 and _rel(y.float(), want) < 1e-2


def test_gptq_beats_round_to_nearest_on_the_model():
    dense = _logits(tiny_model("llama"))
    for group_size in (32, None):
        gptq = _logits(_quantized("gptq", group_size=group_size))
        rtn = _logits(_quantized("rtn", group_size=group_size))
        assert 0 < _rel(gptq, dense) < _rel(rtn, dense)


def _outlier_model():
    """tests/rotation's model with outlier channels in the residual stream (and weight columns that meet them)."""
    model = build("mistral", 0)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :4] *= 30.0
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj):
                lin.weight[:, 4:8] *= 20.0
    return model


def test_rotation_lowers_the_w4a4_error():
    """QuaRot's claim on a model with outlier channels: per-token int4 activations (and per-channel
    int4 weights) lose much less after the rotation pass (R4 online before down_proj)."""
    errors = {}
    for rotate in (False, True):
        model = _outlier_model()
        ref = _logits(model, IDS)
        if rotate:
            compress.quantize(model, RotationConfig(), progress=False)
        compress.quantize(model, RTNConfig(scheme=SCHEME, group_size=None), progress=False)
        assert model.model.layers[0].mlp.down_proj.act_dtype == "int4"
        errors[rotate] = _rel(_logits(model, IDS), ref)
    assert errors[True] < 0.7 * errors[False], errors


# --- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,group_size", [("rtn", 32), ("gptq", None)])
def test_export_writes_w4a4_and_our_reload_is_identical(tmp_path, method, group_size, caplog):
    model = _quantized(method, group_size=group_size)
    with caplog.at_level(logging.WARNING, logger="compress"):
        export(model, None, tmp_path / "ck")
    assert "W4A4 int4 layers" in caplog.text and "max|x| / 7.5" in caplog.text
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == "pack-quantized"
    assert group["input_activations"] == {"dynamic": True, "group_size": None, "num_bits": 4, "strategy": "token",
                                          "symmetric": True, "type": "int"}
    assert {k: group["weights"][k] for k in ("num_bits", "group_size", "strategy", "symmetric", "type")} == {
        "num_bits": 4, "group_size": group_size, "strategy": "group" if group_size else "channel", "symmetric": True,
        "type": "int"}
    back = load_compressed(tmp_path / "ck")
    q = back.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.act_dtype == "int4"
    assert torch.equal(_logits(back), _logits(model))
    # Negative control: the same weights with 8-bit activations give other logits.
    q.act_dtype = "int8"
    assert not torch.equal(_logits(back), _logits(model))


def test_w4a8_exports_without_the_int4_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="compress"):
        export(_quantized("rtn", "w4a8-int8"), None, tmp_path / "ck")
    assert "W4A4 int4" not in caplog.text


def test_transformers_rounds_with_its_own_scale(tmp_path):
    """transformers + compressed-tensors 0.20.1 load the checkpoint, decompress the int4 weights and
    fake-quantize each token to int4 with scale max|x| / 7.5 (half its code range [-8, 7]); compress,
    like QuaRot, uses max|x| / 7. At the layer: exactly their formula, and not ours."""
    model = _quantized("rtn")
    export(model, None, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert type(hf.model.layers[0].self_attn.q_proj).__module__.startswith("torch")     # no compress module
    got = {}
    hook = hf.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: got.update(x=args[0].detach(), y=out.detach(), w=mod.weight.detach().clone()))
    try:
        theirs = _logits(hf)
    finally:
        hook.remove()
    x, y, w = got["x"], got["y"], got["w"]
    torch.testing.assert_close(y, torch.nn.functional.linear(_int4_tokens(x, 7.5), w), rtol=1e-5, atol=1e-5)
    assert _rel(y, torch.nn.functional.linear(_int4_tokens(x, 7.0), w)) > 1e-3
    torch.testing.assert_close(w, model.model.layers[0].self_attn.q_proj.dequantize(torch.float32))
    # At the logits the two grids differ by about as much as the quantization itself (measured 0.12
    # here, against 0.14 from the float model): a different model, not a rounding difference.
    ours, dense = _logits(model), _logits(tiny_model("llama"))
    assert 1e-3 < _rel(theirs, ours) < 0.25 and _rel(theirs, dense) > 1e-2


@pytest.mark.parametrize("edit,match", [
    (_group(lambda g: g["input_activations"].update(strategy="tensor", dynamic=False)), "dynamic per token"),
    (_group(lambda g: g["input_activations"].update(symmetric=False)), "dynamic per token"),
    (_group(lambda g: g["input_activations"].update(num_bits=3)), "8-bit or int4 activations"),
    (_group(lambda g: g["input_activations"].update(type="float")), "dynamic per token"),
    (_group(lambda g: g["weights"].update(num_bits=8)), "int4 symmetric weights"),
    (lambda qc: [g.update(format="int-quantized") for g in [*qc["config_groups"].values(), qc]],
     "stores W4A8/W4A4 codes unpacked.*pack-quantized"),
])
def test_other_w4a4_variants_are_refused_naming_the_group(tmp_path, edit, match):
    export(_quantized("rtn"), None, tmp_path / "ck")
    _rewrite(tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_compressed(tmp_path / "ck")
    assert "config group 'group_0'" in str(exc.value) and "vLLM" in str(exc.value)
