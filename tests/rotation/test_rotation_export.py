"""The rotation's online transform in a checkpoint: compressed-tensors' transform_config and the
+-1 matrices, reloaded by compress; what a checkpoint cannot express is refused before writing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress.errors import CheckpointError
from compress.quant.config import RTNConfig
from compress.rotation import RotationConfig
from compress.transforms import input_transforms
from test_families import IDS, build, calib

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _rotated(scheme: str = "int", **kw):
    model = build("mistral")
    compress.quantize(model, RotationConfig(down_proj_block=32, **kw))
    if scheme == "int":
        compress.quantize(model, RTNConfig(bits=4, group_size=32))
    else:
        compress.quantize(model, RTNConfig(scheme=scheme), calib())
    return model


@pytest.mark.parametrize("scheme", ["int", "nvfp4"])
def test_export_records_the_transform_and_compress_reloads_it(tmp_path, tokenizer, scheme, caplog):
    model = _rotated(scheme)
    ref = _logits(model)
    with caplog.at_level("WARNING"):
        path = compress.export(model, tokenizer, tmp_path / "rot")
    assert "transformers 5.x ignores them" in caplog.text
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    r4 = qc["transform_config"]["config_groups"]["R4"]
    assert r4["type"] == "hadamard" and r4["head_dim"] == 32 and not r4["randomize"]
    assert {e["location"] for e in r4["apply"]} == {"input", "weight_input"}
    assert r4["apply"][0]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    tensors = load_file(path / "model.safetensors")
    h = tensors["model.layers.0.mlp.down_proj.R4_input.weight"]
    assert h.shape == (32, 32) and set(h.unique().tolist()) == {-1.0, 1.0}        # not normalized
    assert torch.equal(h @ h.T, 32 * torch.eye(32))
    loaded, _ = compress.load_model(path)
    assert set(input_transforms(loaded)) == set(input_transforms(model))
    assert torch.allclose(_logits(loaded), ref, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_without_the_transform_would_differ(tmp_path, tokenizer):
    """Negative control: dropping transform_config changes the outputs (the reload above is not vacuous)."""
    model = _rotated()
    ref = _logits(model)
    path = compress.export(model, tokenizer, tmp_path / "rot")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["transform_config"] = {}
    (path / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(path / "model.safetensors").items() if "R4_input" not in k}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    loaded, _ = compress.load_model(path)
    assert ((_logits(loaded) - ref).norm() / ref.norm()).item() > 0.05


def test_a_tampered_matrix_and_an_unknown_location_are_refused(tmp_path, tokenizer):
    path = compress.export(_rotated(), tokenizer, tmp_path / "rot")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.R4_input.weight"][0, 0] *= -1
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not the \\+-1 Sylvester matrix"):
        compress.load_model(path)
    path2 = compress.export(_rotated(), tokenizer, tmp_path / "rot2")
    config = json.loads((path2 / "config.json").read_text())
    config["quantization_config"]["transform_config"]["config_groups"]["R4"]["apply"][0]["location"] = "q_attn"
    (path2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="location 'q_attn'"):
        compress.load_model(path2)


def test_what_a_checkpoint_cannot_express_is_refused_before_writing(tmp_path, tokenizer):
    full = build("mistral")
    compress.quantize(full, RotationConfig(down_proj_block=None))            # one Hadamard of 128: a Sylvester one
    compress.quantize(full, RTNConfig(bits=4, group_size=32))
    with pytest.raises(CheckpointError, match="down_proj_block: 128"):
        compress.export(full, tokenizer, tmp_path / "full")
    floating = build("mistral")
    compress.quantize(floating, RotationConfig(down_proj_block=32))
    with pytest.raises(CheckpointError, match="quantize before exporting"):
        compress.export(floating, tokenizer, tmp_path / "float")
    assert not (tmp_path / "full").exists() and not (tmp_path / "float").exists()


def test_offline_only_rotation_exports_without_a_transform_config(tmp_path, tokenizer):
    model = build("mistral")
    compress.quantize(model, RotationConfig(down_proj=False))
    compress.quantize(model, RTNConfig(bits=4, group_size=32))
    path = compress.export(model, tokenizer, tmp_path / "r1r2")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["transform_config"] == {}
