"""load_model on every kind of source, and the errors a user gets for bad ones."""

import json

import pytest
import torch

import compress
from compress.errors import CheckpointError, MissingPathError, ModelLoadError
from compress.quant.linear import QuantLinear
from conftest import tiny_model


@pytest.fixture
def hf_dir(tmp_path, tokenizer):
    model = tiny_model("llama")
    path = tmp_path / "hf"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_plain_transformers_directory(hf_dir, calib_ids):
    path, model = hf_dir
    loaded, tok = compress.load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=calib_ids).logits, model(input_ids=calib_ids).logits)
    assert tok is not None and not loaded.training


def test_exported_checkpoint_loads_with_packed_modules(hf_dir, tmp_path, calib_ids, tokenizer):
    path, model = hf_dir
    compress.quantize(model, compress.RTNConfig(group_size=32), progress=False)
    out = compress.export(model, tokenizer, tmp_path / "q")
    loaded, tok = compress.load_model(out)
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_dtype_override(hf_dir):
    loaded, _ = compress.load_model(hf_dir[0], dtype="bfloat16")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        compress.load_model(hf_dir[0], dtype="float8")


def test_missing_path(tmp_path):
    with pytest.raises(MissingPathError, match="no such file or directory"):
        compress.load_model(tmp_path / "nothing-here")
    with pytest.raises(MissingPathError):
        compress.load_model("./not/there")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        compress.load_model(tmp_path)


def test_unsupported_architecture(hf_dir):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    config["architectures"] = ["NoSuchForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load this as a causal language model"):
        compress.load_model(path)


def test_not_a_causal_lm(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="decoder-only causal LMs"):
        compress.load_model(tmp_path / "bert")


def test_corrupt_config_json(hf_dir):
    path, _ = hf_dir
    (path / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        compress.load_model(path)


def test_truncated_safetensors_is_named(hf_dir):
    path, _ = hf_dir
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        compress.load_model(path)


@pytest.fixture
def exported(hf_dir, tmp_path, tokenizer):
    _, model = hf_dir
    compress.quantize(model, compress.RTNConfig(group_size=32), progress=False)
    return compress.export(model, tokenizer, tmp_path / "q")


def test_exported_checkpoint_missing_a_tensor(exported):
    from safetensors.torch import load_file, save_file
    out = exported
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing.*model.layers.1.mlp.up_proj.weight_scale"):
        compress.load_model(out)


def test_unknown_checkpoint_format_is_refused(exported):
    out = exported
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "float-quantized"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="float-quantized"):
        compress.load_model(out)


def test_package_locator_errors():
    with pytest.raises(MissingPathError, match="not installed"):
        compress.load_model("package:no_such_package_xyz/model.gguf")
    with pytest.raises(MissingPathError, match="has no file"):
        compress.load_model("package:compress/no-model.gguf")


def test_hub_id_without_network_says_what_to_do(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="hub"):
        compress.load_model("some-org-that-does-not-exist/tiny-model")


def test_backend_is_set_on_every_packed_layer(exported, hf_dir):
    loaded, _ = compress.load_model(exported)
    packed = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14 and {m.backend for m in packed} == {"auto"}
    loaded, _ = compress.load_model(exported, backend="torch")
    assert {m.backend for m in loaded.modules() if isinstance(m, QuantLinear)} == {"torch"}
    loaded, _ = compress.load_model(exported, backend="triton")     # set; a forward needing Triton decides
    assert {m.backend for m in loaded.modules() if isinstance(m, QuantLinear)} == {"triton"}
    dense, _ = compress.load_model(hf_dir[0], backend="torch")       # nothing packed: nothing to set
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())


def test_bad_backend_is_refused_before_loading(tmp_path):
    from compress.errors import ConfigError
    with pytest.raises(ConfigError, match="kernel backend must be one of auto, torch, triton; got 'cuda'"):
        compress.load_model(tmp_path / "not-even-there", backend="cuda")
