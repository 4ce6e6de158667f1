"""Exports of families whose transformers code needs something of the checkpoint beyond the common
contract (tests/checkpoint/test_export.py): Falcon, whose weight init cannot see a compressed Linear."""

import json
import logging

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

import compress
from compress.checkpoint.compressed_tensors import DEQUANTIZE_ON_LOAD
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from conftest import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_falcon(new_decoder_architecture: bool, seed: int = 0) -> FalconForCausalLM:
    """Falcon-7B style (multi-query attention, parallel attention and MLP) or, with the new decoder
    architecture, Falcon-40B/180B style (grouped KV heads, two layer norms)."""
    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                          new_decoder_architecture=new_decoder_architecture,
                          num_kv_heads=2 if new_decoder_architecture else None)
    torch.manual_seed(seed)
    return FalconForCausalLM(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantize(model, method, calib_ids, **fields):
    if method == "gptq":
        cfg = compress.GPTQConfig(bits=4, group_size=32, **fields)
        compress.quantize(model, cfg, calib=CalibrationData(calib_ids, "ids", 0), progress=False)
    else:
        compress.quantize(model, compress.RTNConfig(bits=4, group_size=32, **fields), progress=False)
    return model


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("new_arch", [False, True], ids=["falcon-7b", "falcon-40b"])
def test_falcon_export_loads_in_transformers_with_our_logits(method, new_arch, calib_ids, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = _logits(tiny_falcon(new_arch), calib_ids)
    model = _quantize(tiny_falcon(new_arch), method, calib_ids)
    quantized = _logits(model, calib_ids)
    assert not torch.allclose(quantized, dense, atol=1e-3)                   # int4 really acted
    path = compress.export(model, tokenizer, tmp_path / "ck")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["dequantize"] is True and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["ignore"] == ["lm_head"]

    ours, _ = compress.load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(path)
    assert type(theirs).__name__ == "FalconForCausalLM"
    assert torch.equal(_logits(ours, calib_ids), quantized)
    torch.testing.assert_close(_logits(theirs, calib_ids), _logits(ours, calib_ids), rtol=0, atol=1e-5)


def test_transformers_still_cannot_load_compressed_falcon_linears(calib_ids, tmp_path):
    """The reason for DEQUANTIZE_ON_LOAD: on transformers' default (compressed) path, Falcon's weight
    init reads FalconLinear.weight, which compressed-tensors replaced by weight_packed. When this
    stops failing, drop 'falcon' from DEQUANTIZE_ON_LOAD (compress/checkpoint/compressed_tensors.py)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = compress.export(_quantize(tiny_falcon(False), "rtn", calib_ids), None, tmp_path / "ck")
    try:
        AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=False))
    except AttributeError as exc:
        assert "'FalconLinear' object has no attribute 'weight'" in str(exc)
    else:
        pytest.fail("transformers loads compressed Falcon linears now: remove 'falcon' from DEQUANTIZE_ON_LOAD")
    assert "falcon" in DEQUANTIZE_ON_LOAD


def test_mixed_scheme_falcon_is_exported_with_a_warning_and_no_load_option(calib_ids, tmp_path, caplog):
    """transformers' dequantize-on-load decodes every layer with one group's scheme, which would be
    wrong here: say so instead of writing the option."""
    model = _quantize(tiny_falcon(True), "rtn", calib_ids, overrides={"*.mlp.*": {"group_size": 16}})
    with caplog.at_level(logging.WARNING, logger="compress.checkpoint.compressed_tensors"):
        path = compress.export(model, None, tmp_path / "ck")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2 and "dequantize" not in qc
    assert "transformers cannot load this checkpoint (2 config groups)" in caplog.text
    assert torch.equal(_logits(load_compressed(path), calib_ids), _logits(model, calib_ids))


def test_other_families_keep_the_compressed_load_path(calib_ids, tmp_path):
    model = tiny_model("llama")
    compress.quantize(model, compress.RTNConfig(bits=4, group_size=32), progress=False)
    qc = json.loads((compress.export(model, None, tmp_path / "ck") / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in qc
