"""The rotation pass: the float model is unchanged, outliers and 4-bit errors shrink, the online
transform survives quantization and reload, unsupported layouts are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.configs import config_from_dict
from compress.errors import ConfigError
from compress.quant.config import RTNConfig
from compress.rotation import RotationConfig
from compress.transforms import detach_input_transform, input_transforms
from conftest import tiny_model
from test_families import IDS, build, calib

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _model(name: str):
    return tiny_model(name) if name in ("llama", "qwen2") else build(name)


def _cfg(name: str, **kw) -> RotationConfig:
    """conftest's llama/qwen2 have an MLP width of 160: R4 blocks of 32 (the default 128 does not divide)."""
    return RotationConfig(**({"down_proj_block": 32} if name in ("llama", "qwen2") else {}), **kw)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("residual", ["random-hadamard", "random"])
def test_the_rotated_float_model_computes_the_same_logits(name, residual):
    model = _model(name).double()
    before = _logits(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    records = compress.quantize(model, _cfg(name, residual=residual))
    assert _rel(_logits(model), before) < 1e-6          # transformers' RMSNorm rounds to float32 inside
    # negative control: the weights really moved, the norms' scales were folded away
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)
    for layer in model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert set(input_transforms(model)) == {f"model.layers.{i}.mlp.down_proj" for i in range(len(model.model.layers))}
    assert records.summary["rotation"]["check"]["max_logit_change"] < 1e-6


def test_tied_embeddings_are_untied_and_only_then():
    tied = tiny_model("qwen2").double()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    rec = compress.quantize(tied, _cfg("qwen2"))
    assert rec.summary["rotation"]["untied"] and not tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() != tied.model.embed_tokens.weight.data_ptr()
    untied = tiny_model("llama").double()
    assert not compress.quantize(untied, _cfg("llama")).summary["rotation"]["untied"]


def _outlier_model(seed=0):
    model = build("mistral", seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :4] *= 30.0      # systematic outlier channels, as in LLMs
        for layer in model.model.layers:                         # and weight columns that meet them
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj):
                lin.weight[:, 4:8] *= 20.0
    return model


def _int4_error(rotate: bool) -> float:
    """Per-channel int4 weights: an outlier column sets the scale of its whole row."""
    model = _outlier_model()
    ref = _logits(model)
    if rotate:
        compress.quantize(model, RotationConfig())
    compress.quantize(model, RTNConfig(bits=4, group_size=None))
    return _rel(_logits(model), ref)


def test_rotation_lowers_the_int4_error():
    plain, rotated = _int4_error(False), _int4_error(True)
    assert rotated < 0.7 * plain, (plain, rotated)


def test_rotated_w4a4_runs_and_stays_close():
    """NVFP4 W4A4 on the rotated model (the online down_proj transform feeds the activation rounding)."""
    model = _outlier_model()
    ref = _logits(model)
    compress.quantize(model, RotationConfig())
    compress.quantize(model, RTNConfig(scheme="nvfp4"), calib())
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "FP4Linear"
    assert model.model.layers[0].mlp.down_proj.input_transform == "hadamard"
    assert _rel(_logits(model), ref) < 0.3                  # a lost transform gives about 1


def test_rotation_spreads_the_outlier_channels():
    model = _outlier_model()
    seen = {}

    def peak(_m, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        seen["ratio"] = (x.abs().amax(0).max() / x.pow(2).mean().sqrt()).item()   # max |x_j| over RMS

    layer = model.model.layers[0]
    handle = layer.self_attn.q_proj.register_forward_pre_hook(peak)
    _logits(model)
    before = seen["ratio"]
    handle.remove()
    compress.quantize(model, RotationConfig(heads=False, down_proj=False))
    layer.self_attn.q_proj.register_forward_pre_hook(peak)
    _logits(model)
    assert seen["ratio"] < 0.5 * before, (before, seen["ratio"])


def test_the_online_transform_survives_quantization():
    model = _model("llama")
    ref = _logits(model)
    compress.quantize(model, _cfg("llama"))
    compress.quantize(model, RTNConfig(bits=8, group_size=None))
    down = model.model.layers[0].mlp.down_proj
    assert type(down).__name__ == "QuantLinear" and down.input_transform == "hadamard"
    assert _rel(_logits(model), ref) < 2e-2
    for layer in model.model.layers:                       # negative control: without it, garbage
        detach_input_transform(layer.mlp.down_proj)
    assert _rel(_logits(model), ref) > 0.1


def test_offline_rotations_export_as_a_plain_checkpoint(tmp_path):
    model = tiny_model("qwen2")                            # tied embeddings, q/k/v biases
    ref = _logits(model)
    compress.quantize(model, RotationConfig(down_proj=False))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _rel(_logits(reloaded), ref) < 1e-5


@pytest.mark.parametrize("name", ["gemma2", "phi3", "qwen3_moe"])
def test_layouts_the_rotation_would_break_are_refused(name):
    model = build(name)
    before = _logits(model)
    with pytest.raises(ConfigError, match=f"model type '{name}' is not supported"):
        compress.quantize(model, RotationConfig())
    assert torch.equal(_logits(model), before)                                   # untouched


def test_opt_is_refused():
    with pytest.raises(ConfigError, match="LayerNorm"):
        compress.quantize(tiny_model("opt"), RotationConfig())


def test_config_round_trip_and_bad_values():
    cfg = RotationConfig(residual="random", heads=False, seed=3)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="residual must be"):
        RotationConfig(residual="householder")
    with pytest.raises(ConfigError, match="nothing to rotate"):
        RotationConfig(residual=None, heads=False, down_proj=False)
    with pytest.raises(ConfigError, match="unknown key 'sed'"):
        config_from_dict({"method": "rotate", "sed": 1})


def test_a_recipe_runs_rotate_before_its_quantization_pass(tmp_path):
    from compress.recipe import load_recipe
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nname: rot\nmodel: dummy\npasses:\n"
                    "  - method: rotate\n    down_proj_block: 64\n"
                    "  - method: rtn\n    bits: 4\n    group_size: 64\n")
    recipe = load_recipe(path)
    assert [p.method for p in recipe.passes] == ["rotate", "rtn"]
    assert recipe.passes[0] == RotationConfig(down_proj_block=64)
    path.write_text("version: 1\nname: rot\nmodel: dummy\npasses:\n  - method: rotate\n    down_proj_block: 96\n")
    with pytest.raises(ConfigError, match="down_proj_block must be a power of two"):
        load_recipe(path)
