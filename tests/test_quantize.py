"""quantize() on whole tiny models of every architecture: what it replaces and what it preserves."""

import pytest
import torch

import compress
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.quant.linear import QuantLinear
from conftest import tiny_model


def _calib(ids):
    return CalibrationData(ids, "ids", 0)


def _output_error(model, reference, ids):
    with torch.no_grad():
        return float((model(input_ids=ids).logits - reference).pow(2).mean())


@pytest.mark.parametrize("cfg", [compress.RTNConfig(bits=4, group_size=32),
                                 compress.GPTQConfig(bits=4, group_size=32, symmetric=False)], ids=["rtn", "gptq"])
def test_every_decoder_linear_is_packed_and_lm_head_is_left(arch, calib_ids, cfg):
    model = tiny_model(arch)
    records = compress.quantize(model, cfg, calib=_calib(calib_ids), progress=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert linears == ["lm_head"] and len(packed) == len(records) > 0
    assert all(m.bits == 4 and m.group_size == 32 for m in model.modules() if isinstance(m, QuantLinear))


def test_gptq_output_is_closer_to_float_than_rtn(arch, calib_ids):
    reference_model = tiny_model(arch)
    with torch.no_grad():
        reference = reference_model(input_ids=calib_ids).logits
    errors = {}
    for cfg in (compress.RTNConfig(bits=3, group_size=32, observer="mse"),
                compress.GPTQConfig(bits=3, group_size=32, observer="mse")):
        model = tiny_model(arch)
        compress.quantize(model, cfg, calib=_calib(calib_ids), progress=False)
        errors[cfg.method] = _output_error(model, reference, calib_ids)
    assert 0 < errors["gptq"] < errors["rtn"]          # and quantization did change the model


def test_impossible_group_size_fails_before_any_work(calib_ids):
    model = tiny_model("llama")                         # hidden 64, intermediate 160
    with pytest.raises(ConfigError, match=r"group_size 128 does not divide in_features 64 of model\.layers\.0"):
        compress.quantize(model, compress.GPTQConfig(group_size=128), calib=_calib(calib_ids), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_partial_groups_when_asked(calib_ids):
    model = tiny_model("llama")                         # 160 = 3 * 48 + 16
    compress.quantize(model, compress.GPTQConfig(group_size=48, partial_groups=True), calib=_calib(calib_ids),
                      progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.weight_scale.shape == (64, 4)


def test_ignore_patterns_keep_layers_dense(calib_ids):
    model = tiny_model("llama")
    compress.quantize(model, compress.RTNConfig(group_size=32, ignore=["lm_head", "mlp.down_proj", "re:.*\\.1\\.self_attn"]),
                      progress=False)
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert dense == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                     "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_tied_lm_head_is_never_quantized(calib_ids, caplog):
    model = tiny_model("qwen2")                         # tie_word_embeddings=True
    compress.quantize(model, compress.RTNConfig(group_size=32, ignore=[]), progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "tied" in caplog.text


def test_gptq_needs_calibration_data():
    with pytest.raises(ConfigError, match="calibration"):
        compress.quantize(tiny_model("llama"), compress.GPTQConfig(group_size=32), progress=False)


def test_quantize_refuses_non_quantization_configs():
    with pytest.raises(ConfigError):
        compress.quantize(tiny_model("llama"), object())


def test_gptq_on_an_offloaded_model_matches_in_memory(tmp_path, calib_ids):
    from accelerate import dispatch_model

    cfg = compress.GPTQConfig(bits=4, group_size=32)
    reference = tiny_model("llama")
    compress.quantize(reference, cfg, calib=_calib(calib_ids), progress=False)
    model = tiny_model("llama")
    model = dispatch_model(model, offload_dir=str(tmp_path), device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
        "model.layers.0": "disk", "model.layers.1": "disk"})
    compress.quantize(model, cfg, calib=_calib(calib_ids), device="cpu", progress=False)
    for (name, a), b in zip(reference.named_modules(), model.modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.weight_packed, b.weight_packed), name
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib_ids).logits, reference(input_ids=calib_ids).logits)
    out = compress.export(model, None, tmp_path / "ck")
    reloaded = load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=calib_ids).logits, reference(input_ids=calib_ids).logits)
