"""Per-module weight formats in one pass (``overrides``): resolution, the split of fused groups,
export/reload of mixed checkpoints, refusals and the config round trip."""

import json

import pytest
import torch
import yaml
from torch import nn

import compress
from compress.checkpoint.inspect import format_inspection
from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.quant import apply as apply_module
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.fp4_linear import FP4Linear
from compress.quant.gptq import gptq_solve
from compress.quant.linear import QuantLinear
from compress.recipe import recipe_from_dict
from conftest import tiny_model

# First match wins: layer 0's q_proj is int8 per channel although "self_attn.*" also matches it.
OVERRIDES = {
    "layers.0.self_attn.q_proj": {"bits": 8, "group_size": None},
    "self_attn.q_proj": {"bits": 3, "symmetric": False},
    r"re:layers\.1\.self_attn\.k_proj": {"scheme": "nvfp4a16"},
    "self_attn.*": {"bits": 2},
}
IGNORE = ["lm_head", "layers.1.self_attn.v_proj"]            # ignore wins over the overrides


def _expected(name: str):
    """(kind, bits, group_size, symmetric) that OVERRIDES and IGNORE give module ``name``."""
    if name.endswith("lm_head") or name.endswith("layers.1.self_attn.v_proj"):
        return ("dense",)
    if name.endswith("layers.0.self_attn.q_proj"):
        return ("int", 8, None, True)
    if name.endswith("self_attn.q_proj"):
        return ("int", 3, 32, False)
    if name.endswith("layers.1.self_attn.k_proj"):
        return ("nvfp4a16",)
    if ".self_attn." in name:
        return ("int", 2, 32, True)
    return ("int", 4, 32, True)                                # the pass's own format


def _found(module):
    if isinstance(module, QuantLinear):
        return ("int", module.bits, module.group_size, module.symmetric)
    if isinstance(module, FP4Linear):
        return (module.scheme,)
    return ("dense",)


def _calib(ids):
    return CalibrationData(ids, "ids", 0)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_module_ends_in_the_format_its_first_matching_override_names(arch, calib_ids):
    model = tiny_model(arch)
    cfg = GPTQConfig(bits=4, group_size=32, ignore=IGNORE, overrides=OVERRIDES)
    records = compress.quantize(model, cfg, calib=_calib(calib_ids), progress=False)
    tied = arch == "qwen2"                                     # lm_head shares the embedding: never quantized
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear, FP4Linear))}
    assert {n: _found(m) for n, m in linears.items()} == {n: _expected(n) for n in linears}
    assert set(records) == {n for n in linears if _expected(n) != ("dense",)}
    # The formats really differ: five distinct packed formats (int8 ch, int3 asym, int2, int4, nvfp4a16).
    assert len({_found(m) for m in linears.values()} - {("dense",)}) == 5
    assert tied or isinstance(model.lm_head, nn.Linear)


def test_first_match_wins_and_order_matters():
    cfg = GPTQConfig(bits=4, group_size=32, overrides=OVERRIDES)
    q0 = "model.layers.0.self_attn.q_proj"
    assert (cfg.for_module(q0).bits, cfg.for_module(q0).group_size) == (8, None)
    assert cfg.for_module("model.layers.0.mlp.up_proj") is cfg
    assert cfg.for_module(q0).overrides == {}
    flipped = GPTQConfig(bits=4, group_size=32, overrides=dict(reversed(list(OVERRIDES.items()))))
    assert flipped.for_module(q0).bits == 2                    # negative control: "self_attn.*" now first
    # A float scheme needs no bits/symmetric of its own, even over an asymmetric 3-bit pass.
    fp4 = GPTQConfig(bits=3, symmetric=False, overrides={"down_proj": {"scheme": "nvfp4a16"}})
    assert (fp4.for_module("m.down_proj").bits, fp4.for_module("m.down_proj").symmetric) == (4, True)


def test_a_fused_group_with_two_formats_is_solved_in_parts_with_one_hessian(calib_ids, monkeypatch):
    calls = []

    def recording(hessian, weight, cfg, **kw):
        calls.append((hessian.clone(), weight.clone(), cfg))
        return gptq_solve(hessian, weight, cfg, **kw)

    monkeypatch.setattr(apply_module, "gptq_solve", recording)
    model = tiny_model("llama")
    cfg = GPTQConfig(bits=4, group_size=32, overrides={"layers.0.self_attn.q_proj": {"bits": 8, "group_size": None}})
    compress.quantize(model, cfg, calib=_calib(calib_ids), progress=False)

    (h_q, w_q, cfg_q), (h_kv, w_kv, cfg_kv) = calls[:2]        # layer 0 runs q/k/v first: q, then k+v
    attn = model.model.layers[0].self_attn
    assert torch.equal(h_q, h_kv)                              # one Hessian for the whole fused group
    assert (cfg_q.bits, cfg_kv.bits) == (8, 4) and w_q.shape[0] == 64 and w_kv.shape[0] == 64
    assert [attn.q_proj.bits, attn.k_proj.bits, attn.v_proj.bits] == [8, 4, 4]

    # Each part is exactly gptq_solve on its own rows with the shared Hessian ...
    q_alone = gptq_solve(h_q, w_q, cfg.for_module("model.layers.0.self_attn.q_proj"), scale_dtype=torch.float32)
    kv_alone = gptq_solve(h_q, w_kv, cfg, scale_dtype=torch.float32)
    assert torch.equal(attn.q_proj.dequantize(torch.float32), q_alone.weight)
    assert torch.equal(torch.cat([attn.k_proj.dequantize(torch.float32), attn.v_proj.dequantize(torch.float32)]),
                       kv_alone.weight)
    # ... which is what the q rows of an all-8-bit stacked solve are (rows are independent given H;
    # equal up to BLAS summation order).
    stacked = torch.cat([w_q, w_kv])
    q8 = gptq_solve(h_q, stacked, cfg.for_module("model.layers.0.self_attn.q_proj"), scale_dtype=torch.float32)
    torch.testing.assert_close(q8.weight[:64], q_alone.weight, rtol=0, atol=1e-6)
    # Negative control: q at the pass's 4 bits would be something else.
    q4 = gptq_solve(h_q, stacked, cfg, scale_dtype=torch.float32)
    assert not torch.equal(q4.weight[:64], q_alone.weight)
    err = lambda deq, w: float(((deq - w) @ h_q * (deq - w)).sum() / (w @ h_q * w).sum())  # noqa: E731
    assert err(q_alone.weight, w_q) < err(kv_alone.weight, w_kv) / 50


def test_nvfp4_parts_of_one_fused_group_share_one_global_scale():
    split = {"layers.0.self_attn.q_proj": {"scheme": "nvfp4a16", "observer": "mse"},
             "self_attn.*": {"scheme": "nvfp4a16"}}
    model = tiny_model("llama")
    compress.quantize(model, RTNConfig(group_size=32, overrides=split), progress=False)
    attn = model.model.layers[0].self_attn
    scales = [attn.q_proj.weight_global_scale, attn.k_proj.weight_global_scale, attn.v_proj.weight_global_scale]
    assert all(isinstance(m, FP4Linear) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[1], scales[2])
    # Negative control: each alone has its own amax, hence its own global scale.
    lone = tiny_model("llama")
    compress.quantize(lone, RTNConfig(scheme="nvfp4a16", ignore=["lm_head", "k_proj", "v_proj"]), progress=False)
    assert not torch.equal(lone.model.layers[0].self_attn.q_proj.weight_global_scale, scales[0])


MIX = {
    r"re:(mlp\.down_proj|fc2)$": {"bits": 8, "group_size": None},          # int8 per channel
    r"re:self_attn\.(k|v)_proj": {"bits": 3, "symmetric": False},           # int3 g32 asym
    "layers.1.mlp.gate_proj": {"scheme": "nvfp4a16"},                        # NVFP4 (in_features 64)
}                                                                            # the rest: int4 g32 sym
MIX_IGNORE = ["lm_head", "layers.0.mlp.up_proj", "fc1"]                     # dense


def test_mixed_export_reloads_bit_identically_in_compress(arch, calib_ids, tokenizer, tmp_path):
    model = tiny_model(arch)
    compress.quantize(model, GPTQConfig(bits=4, group_size=32, ignore=MIX_IGNORE, overrides=MIX),
                      calib=_calib(calib_ids), progress=False)
    path = compress.export(model, tokenizer, tmp_path / "ck")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    fp4 = arch != "opt"                                        # OPT has no gate_proj
    assert qc["format"] == ("mixed-precision" if fp4 else "pack-quantized")
    bits = sorted((g["weights"]["num_bits"], g["weights"]["type"]) for g in qc["config_groups"].values())
    assert bits == sorted([(3, "int"), (4, "int"), (8, "int")] + ([(4, "float")] if fp4 else []))
    reloaded, _ = compress.load_model(path)
    formats = {n: _found(m) for n, m in reloaded.named_modules() if isinstance(m, (nn.Linear, QuantLinear, FP4Linear))}
    assert formats == {n: _found(m) for n, m in model.named_modules() if n in formats}
    assert len(set(formats.values())) == (5 if fp4 else 4)     # int8, int4, int3 asym, (nvfp4a16), dense
    assert torch.equal(_logits(reloaded, calib_ids), _logits(model, calib_ids))
    text = format_inspection(compress.inspect_checkpoint(path))
    assert "int3 group 32 asymmetric" in text and "of quantized weights" in text
    assert "self_attn.k_proj, self_attn.v_proj: layers 0-1" in text


def test_transformers_loads_a_mixed_int_checkpoint(arch, calib_ids, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    # Symmetric members only: transformers 5.23 + compressed-tensors 0.20 mis-size packed zero points
    # on the default path, and their dequantize=True path applies one config group's scheme to every
    # dense module, so an asymmetric member of a mix loads in neither (see docs/quantization.md).
    mix = {r"re:(mlp\.down_proj|fc2)$": {"bits": 8, "group_size": None}, r"re:self_attn\.(k|v)_proj": {"bits": 2}}
    model = tiny_model(arch)
    compress.quantize(model, GPTQConfig(bits=4, group_size=32, ignore=MIX_IGNORE, overrides=mix),
                      calib=_calib(calib_ids), progress=False)
    path = compress.export(model, None, tmp_path / "ck")
    assert len(json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]) == 3
    theirs = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(_logits(theirs, calib_ids), _logits(model, calib_ids), rtol=0, atol=1e-5)


def test_transformers_loads_int_plus_nvfp4_as_compress_does(calib_ids, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from compress.checkpoint.load import load_compressed
    mix = {"mlp.down_proj": {"bits": 8, "group_size": None}, "mlp.gate_proj": {"scheme": "nvfp4a16"}}
    model = tiny_model("llama").to(torch.bfloat16)             # transformers runs FP4 in bfloat16 only
    compress.quantize(model, GPTQConfig(bits=4, group_size=32, overrides=mix), calib=_calib(calib_ids),
                      progress=False)
    path = compress.export(model, None, tmp_path / "ck")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "mixed-precision"
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert torch.equal(_logits(load_compressed(path), calib_ids), _logits(theirs, calib_ids))


@pytest.mark.parametrize("overrides, match", [
    ({"mlp.*": {"act_order": False}}, r"\['mlp\.\*'\]: 'act_order' cannot be set per module; an override "
                                      r"sets only bits, group_size, symmetric, observer, scheme, partial_groups"),
    ({"mlp.*": {"bits": 9}}, r"\['mlp\.\*'\]: bits must be between 2 and 8, got 9"),
    ({"mlp.*": {"bits": "8"}}, r"\['mlp\.\*'\]: field 'bits' must be an integer"),
    ({"mlp.*": 8}, r"\['mlp\.\*'\] must be a mapping"),
    ({"mlp.*": {"scheme": "nvfp4a16", "bits": 8}}, r"\['mlp\.\*'\]: scheme 'nvfp4a16' .* bits must be 4"),
    ({"mlp.*": {"scheme": "fp3"}}, r"\['mlp\.\*'\]: field 'scheme' must be one of"),
])
def test_bad_overrides_are_refused_naming_the_pattern(overrides, match):
    with pytest.raises(ConfigError, match=match):
        GPTQConfig(overrides=overrides)
    with pytest.raises(ConfigError, match=match):               # as a recipe pass writes it
        config_from_dict({"method": "gptq", "overrides": overrides})


def test_an_override_whose_group_size_does_not_fit_names_pattern_and_module():
    bad = RTNConfig(group_size=32, overrides={"mlp.down_proj": {"group_size": 64}})     # down_proj: in 160
    with pytest.raises(ConfigError, match=r"overrides\['mlp\.down_proj'\]: group_size 64 does not divide "
                                          r"in_features 160 of model\.layers\.0\.mlp\.down_proj"):
        compress.quantize(tiny_model("llama"), bad, progress=False)
    # Negative controls: the same group size elsewhere, or with partial groups allowed, is fine.
    compress.quantize(tiny_model("llama"), RTNConfig(group_size=32, overrides={"q_proj": {"group_size": 64}}),
                      progress=False)
    ok = RTNConfig(group_size=32, overrides={"mlp.down_proj": {"group_size": 64, "partial_groups": True}})
    model = tiny_model("llama")
    compress.quantize(model, ok, progress=False)
    assert model.model.layers[0].mlp.down_proj.group_size == 64


def test_unused_overrides_are_warned_about(caplog):
    cfg = RTNConfig(group_size=32, overrides={"layers.9.mlp.down_proj": {"bits": 8}, "lm_head": {"bits": 8}})
    compress.quantize(tiny_model("llama"), cfg, progress=False)
    assert "['layers.9.mlp.down_proj', 'lm_head'] apply to no quantized linear" in caplog.text


def test_w4a4_override_needs_calibration_data():
    cfg = RTNConfig(group_size=32, overrides={"mlp.gate_proj": {"scheme": "nvfp4"}})
    with pytest.raises(ConfigError, match=r"scheme 'nvfp4' \(W4A4.*model\.layers\.0\.mlp\.gate_proj"):
        compress.quantize(tiny_model("llama"), cfg, progress=False)
    compress.quantize(tiny_model("llama"), RTNConfig(group_size=32, overrides={"mlp.gate_proj": {"bits": 8}}), progress=False)


@pytest.mark.parametrize("scheme", ["fp8-static", "w8a8-int8-static"])
def test_static_w8a8_override_needs_calibration_data_and_dynamic_does_not(scheme):
    cfg = RTNConfig(group_size=32, overrides={"mlp.down_proj": {"scheme": scheme}})
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}' \(W8A8.*model\.layers\.0\.mlp\.down_proj"):
        compress.quantize(tiny_model("llama"), cfg, progress=False)
    dynamic = scheme.replace("-static", "")
    model = tiny_model("llama")
    compress.quantize(model, RTNConfig(group_size=32, overrides={"mlp.down_proj": {"scheme": dynamic}}), progress=False)
    assert model.model.layers[0].mlp.down_proj.label == dynamic
    assert model.model.layers[0].mlp.up_proj.label == "int4 g32"


RECIPE = r"""
version: 1
model: m
calibration: {data: x.txt}
passes:
  - method: gptq
    bits: 4
    group_size: 64
    overrides:                      # first matching pattern wins (mapping order kept)
      "model.layers.0.mlp.down_proj": {bits: 8, group_size: null}
      "re:model\\.layers\\.(1|2)\\.self_attn\\.(q|k|v)_proj": {bits: 3, symmetric: false}
      "model.layers.5.mlp.gate_proj": {scheme: nvfp4a16}
"""


def test_overrides_round_trip_through_dicts_and_yaml_recipes():
    recipe = recipe_from_dict(yaml.safe_load(RECIPE))
    cfg = recipe.passes[0]
    assert list(cfg.overrides) == ["model.layers.0.mlp.down_proj", r"re:model\.layers\.(1|2)\.self_attn\.(q|k|v)_proj",
                                   "model.layers.5.mlp.gate_proj"]
    assert cfg.for_module("model.layers.2.self_attn.v_proj").symmetric is False
    assert cfg.for_module("model.layers.3.self_attn.v_proj") is cfg
    assert cfg.for_module("model.layers.5.mlp.gate_proj").scheme == "nvfp4a16"
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and list(again.overrides) == list(cfg.overrides)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    assert GPTQConfig().overrides == {} and GPTQConfig.from_dict(GPTQConfig().to_dict()).overrides == {}


def test_a_recipe_whose_rtn_override_is_w4a4_needs_calibration_data():
    from compress.errors import ConfigError
    from compress.recipe import recipe_from_dict
    passes = [{"method": "rtn", "bits": 4, "group_size": 32, "overrides": {"mlp.down_proj": {"scheme": "nvfp4"}}}]
    with pytest.raises(ConfigError, match="calibration"):
        recipe_from_dict({"version": 1, "model": "x", "passes": passes})
    plain = [{"method": "rtn", "bits": 4, "group_size": 32, "overrides": {"mlp.down_proj": {"bits": 8}}}]
    recipe_from_dict({"version": 1, "model": "x", "passes": plain})          # no data needed
