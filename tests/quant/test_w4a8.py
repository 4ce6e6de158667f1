"""W4A8 (int4 weights, INT8 / FP8 activations dynamic per token): the formats and their errors, the
layer against an independent computation, RTN and GPTQ on tiny models, the compressed-tensors export,
our reload and transformers' reload, the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.checkpoint.export import export
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from compress.errors import CheckpointError, ConfigError
from compress.formats import WeightFormat
from compress.kernels.act_quant import fake_quantize_activations
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.linear import QuantLinear
from compress.recipe import load_recipe
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMES = ["w4a8-int8", "w4a8-fp8"]
ACT = {"w4a8-int8": "int8", "w4a8-fp8": "fp8"}
RECIPE = Path(__file__).parents[2] / "recipes" / "smollm2-w4a8-int8-gptq.yaml"


def _ids(seed=0):
    return torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(seed))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _quantized(method: str, scheme: str, arch: str = "llama", dtype=torch.float32):
    """A tiny model built in ``dtype`` and quantized with ``method`` (rtn | gptq | int4: weight-only)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = tiny_model(arch)
    finally:
        torch.set_default_dtype(default)
    if method == "gptq":
        cfg = GPTQConfig(scheme=scheme, group_size=32)
        compress.quantize(model, cfg, calib=CalibrationData(_ids(1), "ids", 0), progress=False)
    else:
        compress.quantize(model, RTNConfig(scheme=scheme, group_size=32), progress=False)
    return model


# --- formats and configs ------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_format_is_int4_groups_with_8bit_token_activations(scheme):
    fmt = RTNConfig(scheme=scheme, group_size=64).weight_format
    assert (fmt.kind, fmt.bits, fmt.group_size, fmt.symmetric, fmt.act_quant) == ("int", 4, 64, True, True)
    assert (fmt.act_strategy, fmt.act_codes, fmt.scheme) == ("token", ACT[scheme], scheme)
    assert fmt.w4a8 and not fmt.w8a8 and not fmt.static_activations
    assert str(fmt) == f"{scheme}-g64" and WeightFormat.parse(str(fmt)) == fmt
    assert WeightFormat.parse(f"{scheme}-g64-partial").partial_groups
    assert WeightFormat.parse(scheme).group_size is None                 # per output channel
    assert fmt.packed_class is QuantLinear and fmt.ct_format == "pack-quantized"
    # compressed-tensors 0.20.1's presets W4A8 / W4AFP8, key by key (the group size is the config's).
    assert fmt.weights_args() == {"dynamic": False, "group_size": 64, "num_bits": 4, "strategy": "group",
                                  "symmetric": True, "type": "int"}
    assert fmt.input_args() == {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token",
                                "symmetric": True, "type": "float" if scheme == "w4a8-fp8" else "int"}
    # Negative control: the weight-only int4 format is a different format with no input_activations.
    plain = RTNConfig(group_size=64).weight_format
    assert plain != fmt and plain.input_args() is None and plain.weights_args() == fmt.weights_args()


def test_the_presets_of_compressed_tensors_match():
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    for scheme, preset in (("w4a8-int8", "W4A8"), ("w4a8-fp8", "W4AFP8")):
        fmt = WeightFormat.from_scheme(scheme, 4, 128)
        want = PRESET_SCHEMES[preset]
        keys = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size")
        for ours, theirs in ((fmt.weights_args(), want["weights"]), (fmt.input_args(), want["input_activations"])):
            dumped = theirs.model_dump(mode="json")
            assert {k: ours[k] for k in keys} == {k: dumped[k] for k in keys}


@pytest.mark.parametrize("kw,match", [
    (dict(bits=8), "stores 4-bit integer weights.*w8a8-int8"),
    (dict(bits=3), "stores 4-bit integer weights"),
    (dict(symmetric=False), "symmetric.*drop symmetric: false"),
    (dict(group_size=0), "group_size must be a positive integer"),
])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_configs_that_make_no_w4a8_are_refused(scheme, kw, match):
    with pytest.raises(ConfigError, match=match):
        RTNConfig(scheme=scheme, **kw)


def test_fields_in_between_are_refused():
    with pytest.raises(ConfigError, match="not a W8A8 format compress runs \\(nor a W4A8 or W4A4 one\\)"):
        WeightFormat("int", 4, 64, act_quant=True, act_strategy="tensor", act_dtype="int8")
    with pytest.raises(ConfigError, match="not a W8A8 format compress runs \\(nor a W4A8 or W4A4 one\\)"):
        WeightFormat("int", 8, None, act_quant=True, act_strategy="token", act_dtype="int8")
    with pytest.raises(ConfigError, match="not a W8A8 format compress runs \\(nor a W4A8 or W4A4 one\\)"):
        WeightFormat("int", 4, 64, act_quant=True, act_strategy="token", act_dtype="nvfp4")
    with pytest.raises(ConfigError, match="unknown weight format"):
        WeightFormat.parse("w4a8-int4-g64")


def test_an_override_keeps_the_pass_group_size():
    cfg = GPTQConfig(group_size=32, overrides={"q_proj": {"scheme": "w4a8-fp8"}})
    assert cfg.for_module("model.layers.0.self_attn.q_proj").weight_format == WeightFormat.parse("w4a8-fp8-g32")
    assert cfg.for_module("model.layers.0.self_attn.k_proj").weight_format == WeightFormat.parse("int4-g32")


# --- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_layer_is_int4_weights_times_fake_quantized_activations(method, scheme):
    model = _quantized(method, scheme)
    dense = tiny_model("llama")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.act_dtype == ACT[scheme]
        assert layer.weight_format == WeightFormat.parse(f"{scheme}-g32") and layer.label == f"{scheme}-g32"
        x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(2))
        x[0, 0] = 0                                                       # an all-zero token
        x[1, 2, 5] = 40.0                                                 # an outlier token
        with torch.no_grad():
            y = layer(x)
            # Independently: every token rounded through its codes, times the decoded int4 weight.
            xq = fake_quantize_activations(x, ACT[scheme], "token")
            want = torch.nn.functional.linear(xq, layer.dequantize(torch.float32))
            weight_only = torch.nn.functional.linear(x, layer.dequantize(torch.float32))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(y[0, 0], torch.zeros_like(y[0, 0]))
        # Negative control: the activation rounding really happens (not the weight-only int4 output).
        assert _rel(y, weight_only) > 1e-3
        # The weights are plain int4 groups: the dense weight is on the g32 grid, not the float one.
        w = layer.dequantize(torch.float32)
        assert 0 < _rel(w, dense.get_submodule(name).weight.detach()) < 0.3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weights_are_the_weight_only_solve(scheme):
    """Only the run-time rounding differs: RTN gives the same codes and scales as int4 g32."""
    w4a8, int4 = _quantized("rtn", scheme), _quantized("rtn", "int")
    a, b = w4a8.model.layers[0].mlp.up_proj, int4.model.layers[0].mlp.up_proj
    assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scale, b.weight_scale)
    assert b.act_dtype is None and not torch.equal(_logits(w4a8), _logits(int4))


def test_bfloat16_layer_matches_the_float32_computation():
    model = _quantized("rtn", "w4a8-int8", dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        y = layer(x)
        want = torch.nn.functional.linear(fake_quantize_activations(x.float(), "int8", "token"),
                                          layer.dequantize(torch.float32))
    assert y.dtype == torch.bfloat16 and _rel(y.float(), want) < 1e-2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_beats_round_to_nearest_on_the_model(scheme):
    dense = _logits(tiny_model("llama"))
    gptq, rtn = _logits(_quantized("gptq", scheme)), _logits(_quantized("rtn", scheme))
    assert 0 < _rel(gptq, dense) < _rel(rtn, dense)


# --- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_export_writes_w4a8_and_our_reload_is_identical(tmp_path, method, scheme):
    model = _quantized(method, scheme)
    export(model, None, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == "pack-quantized"
    want_in = {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token", "symmetric": True,
               "type": "int" if scheme == "w4a8-int8" else "float"}
    assert group["input_activations"] == want_in
    assert {k: group["weights"][k] for k in ("num_bits", "group_size", "strategy", "symmetric", "type")} == {
        "num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": True, "type": "int"}
    back = load_compressed(tmp_path / "ck")
    q = back.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.act_dtype == ACT[scheme]
    assert torch.equal(_logits(back), _logits(model))
    # Negative control: the same weights without activation rounding give other logits.
    q.act_dtype = None
    assert not torch.equal(_logits(back), _logits(model))


# transformers + compressed-tensors decompress the int4 weights and fake-quantize the activations per
# token: FP8 as we do (float32: to rounding), INT8 with scale amax / 127.5 (ours and vLLM's: amax /
# 127), the same difference as for w8a8-int8 (docs/w8a8.md). Tolerances: measured x ~3.
HF_TOLERANCE = {("w4a8-fp8", torch.float32): 1e-6, ("w4a8-int8", torch.float32): 3e-2,
                ("w4a8-fp8", torch.bfloat16): 8e-2, ("w4a8-int8", torch.bfloat16): 4e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_the_checkpoint_without_compress(tmp_path, scheme, dtype):
    model = _quantized("rtn", scheme, dtype=dtype)
    export(model, None, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=dtype)
    assert type(hf.model.layers[0].self_attn.q_proj).__module__.startswith("torch")     # no compress module
    ours, theirs = _logits(model), _logits(hf)
    assert _rel(theirs, ours) <= HF_TOLERANCE[(scheme, dtype)]
    assert _rel(theirs, _logits(tiny_model("llama"))) > 1e-3         # negative control: it is quantized


def test_transformers_rounds_the_activations(tmp_path):
    """At the layer: transformers' q_proj output is fake-quantized activations times its weight (INT8
    with amax / 127.5), not the plain product."""
    model = _quantized("rtn", "w4a8-int8")
    export(model, None, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    got = {}
    hook = hf.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: got.update(x=args[0].detach(), y=out.detach(), w=mod.weight.detach().clone()))
    try:
        _logits(hf)
    finally:
        hook.remove()
    x, y, w = got["x"], got["y"], got["w"]
    s = x.abs().amax(dim=-1, keepdim=True) / 127.5
    xq = torch.clamp(torch.round(x / s), -128, 127) * s
    torch.testing.assert_close(y, torch.nn.functional.linear(xq, w), rtol=1e-5, atol=1e-6)
    assert _rel(y, torch.nn.functional.linear(x, w)) > 1e-3          # negative control: rounded


def _rewrite(path, edit) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    edit(config["quantization_config"])
    config_path.write_text(json.dumps(config))


def _group(edit):
    return lambda qc: edit(qc["config_groups"]["group_0"])


@pytest.mark.parametrize("edit,match", [
    (_group(lambda g: g["input_activations"].update(strategy="tensor", dynamic=False)), "dynamic per token"),
    (_group(lambda g: g["input_activations"].update(num_bits=6)), "dynamic per token"),   # 4: W4A4 (test_w4a4)
    (_group(lambda g: g["weights"].update(num_bits=8)), "int4 symmetric weights"),
    (lambda qc: [g.update(format="int-quantized") for g in [*qc["config_groups"].values(), qc]],
     "stores W4A8/W4A4 codes unpacked.*pack-quantized"),
])
def test_other_w4a8_variants_are_refused_naming_the_group(tmp_path, edit, match):
    export(_quantized("rtn", "w4a8-int8"), None, tmp_path / "ck")
    _rewrite(tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_compressed(tmp_path / "ck")
    assert "config group 'group_0'" in str(exc.value) and "vLLM" in str(exc.value)


def test_the_recipe_is_gptq_w4a8_int8_g64():
    (cfg,) = load_recipe(RECIPE).passes
    assert isinstance(cfg, GPTQConfig)
    assert cfg.weight_format == WeightFormat.parse("w4a8-int8-g64")
