"""Pruned checkpoints: dense (zeros kept; standard tools load it) and our compact 2:4 layout (kept
values + 2-bit positions; compress loads it), both round-tripping into our runtime."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.checkpoint.safetensors_io import read_state_dict
from compress.data import CalibrationData
from compress.errors import CheckpointError, ConfigError
from compress.pruning.masks import check_nm
from compress.pruning.sparse_linear import Sparse24Linear
from compress.quant.linear import QuantLinear
from conftest import tiny_model


def _pruned(calib_ids, arch="llama", cfg=None):
    model = tiny_model(arch)
    compress.prune(model, cfg or compress.WandaConfig(pattern="2:4"), CalibrationData(calib_ids, "ids", 0),
                   progress=False)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _linear_bytes(path):
    state = read_state_dict(path)
    return sum(t.numel() * t.element_size() for k, t in state.items() if ".layers." in k and "norm" not in k)


def test_dense_export_is_a_plain_checkpoint_with_the_zeros(tokenizer, arch, calib_ids, tmp_path):
    model = _pruned(calib_ids, arch)
    path = compress.export(model, tokenizer, tmp_path / "dense")
    config = json.loads((path / "config.json").read_text())
    assert "compress_sparsity" not in config and "quantization_config" not in config
    theirs = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(_logits(theirs, calib_ids), _logits(model, calib_ids))
    down = [m for n, m in theirs.named_modules() if n.endswith(("down_proj", "fc2"))][0]
    assert check_nm(down.weight, 2, 4) and (down.weight == 0).float().mean() == 0.5


def test_compact_export_halves_the_linears_and_reloads_identically(tokenizer, arch, calib_ids, tmp_path):
    model = _pruned(calib_ids, arch)
    dense = compress.export(model, tokenizer, tmp_path / "dense")
    compact = compress.export(model, tokenizer, tmp_path / "compact", layout="compact")
    assert not any(isinstance(m, Sparse24Linear) for m in model.modules())      # the model is left alone
    config = json.loads((compact / "config.json").read_text())
    sparse = config["compress_sparsity"]
    assert sparse["format"] == "compress-2of4-compact" and sparse["version"] == 1
    linears = 12 if arch == "opt" else 14            # 6 or 7 per layer, 2 layers
    assert len(sparse["modules"]) == linears and all(v["values"] == "float32" for v in sparse["modules"].values())
    state = read_state_dict(compact)
    name = next(iter(sparse["modules"]))
    out_f, in_f = state[f"{name}.weight_shape"].tolist()
    assert state[f"{name}.weight_values"].shape == (out_f, in_f // 2)
    assert state[f"{name}.weight_meta"].dtype == torch.uint8 and state[f"{name}.weight_meta"].shape == (out_f, in_f // 8)
    assert f"{name}.weight" not in state
    # float32 values: in/2 * 4 + in/8 bytes per row against in * 4, i.e. 53%
    assert _linear_bytes(compact) / _linear_bytes(dense) == pytest.approx(17 / 32, abs=0.02)
    ours, _ = compress.load_model(compact)
    assert sum(isinstance(m, Sparse24Linear) for m in ours.modules()) == linears
    assert torch.equal(_logits(ours, calib_ids), _logits(model, calib_ids))


def test_compact_bf16_is_56_percent_of_dense(tokenizer, calib_ids, tmp_path):
    model = _pruned(calib_ids).to(torch.bfloat16)
    dense = compress.export(model, tokenizer, tmp_path / "dense")
    compact = compress.export(model, tokenizer, tmp_path / "compact", layout="compact")
    assert _linear_bytes(compact) / _linear_bytes(dense) == pytest.approx(9 / 16, abs=0.01)
    ours, _ = compress.load_model(compact)
    # (the reloaded dense checkpoint, not `model`: .to(bfloat16) also rounded its rotary inv_freq buffer)
    assert torch.equal(_logits(ours, calib_ids), _logits(compress.load_model(dense)[0], calib_ids))


def test_joint_sparse_int4_exports_both_ways(tokenizer, calib_ids, tmp_path):
    model = _pruned(calib_ids, cfg=compress.SparseGPTConfig(pattern="2:4", bits=4, group_size=32))
    ref = _logits(model, calib_ids)
    dense = compress.export(model, tokenizer, tmp_path / "dense")                 # compressed-tensors pack-quantized
    assert json.loads((dense / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    theirs = AutoModelForCausalLM.from_pretrained(dense)
    assert torch.allclose(_logits(theirs, calib_ids), ref, atol=1e-4)
    compact = compress.export(model, tokenizer, tmp_path / "compact", layout="compact")
    config = json.loads((compact / "config.json").read_text())
    assert {v["values"] for v in config["compress_sparsity"]["modules"].values()} == {"int4"}
    assert not config.get("quantization_config", {}).get("config_groups")    # nothing left for compressed-tensors
    assert _linear_bytes(compact) < 0.85 * _linear_bytes(dense)      # 2 + 1 (positions) bits vs 4 bits per weight
    ours, _ = compress.load_model(compact)
    layer = ours.model.layers[0].mlp.down_proj
    assert isinstance(layer, Sparse24Linear) and layer.bits == 4 and layer.group_size == 32
    assert torch.allclose(_logits(ours, calib_ids), ref, atol=1e-5)
    # and back: a compact checkpoint exports dense again, for the standard tools
    again = compress.export(ours, tokenizer, tmp_path / "again")
    assert isinstance(compress.load_model(again)[0].model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(again), calib_ids), ref, atol=1e-4)


def test_compact_float_checkpoint_exports_dense_for_transformers(tokenizer, calib_ids, tmp_path):
    model = _pruned(calib_ids)
    ours, _ = compress.load_model(compress.export(model, tokenizer, tmp_path / "compact", layout="compact"))
    plain = compress.export(ours, tokenizer, tmp_path / "plain")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(plain), calib_ids), _logits(model, calib_ids))


def test_compact_layout_needs_a_2of4_model(tokenizer, calib_ids, tmp_path):
    with pytest.raises(CheckpointError, match="has none"):
        compress.export(tiny_model("llama"), tokenizer, tmp_path / "x", layout="compact")
    with pytest.raises(CheckpointError, match="has none"):
        compress.export(_pruned(calib_ids, cfg=compress.WandaConfig(sparsity=0.5)), tokenizer, tmp_path / "y",
                        layout="compact")
    with pytest.raises(ConfigError, match="layout must be one of"):
        compress.export(tiny_model("llama"), tokenizer, tmp_path / "z", layout="sparse")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["compress_sparsity"].update(version=2), "version 2 is not supported"),
    (lambda c: c["compress_sparsity"].update(format="other"), "this compress reads"),
    (lambda c: c["compress_sparsity"]["modules"].update({"model.layers.9.mlp.up_proj": {"values": "float32"}}),
     "does not have"),
])
def test_damaged_compact_configs_are_refused_by_name(tokenizer, calib_ids, tmp_path, edit, match):
    path = compress.export(_pruned(calib_ids), tokenizer, tmp_path / "c", layout="compact")
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        compress.load_model(path, tokenizer="-")


def test_damaged_positions_are_refused(tokenizer, calib_ids, tmp_path):
    from safetensors.torch import load_file, save_file
    path = compress.export(_pruned(calib_ids), tokenizer, tmp_path / "c", layout="compact")
    file = next(path.glob("*.safetensors"))
    state = load_file(file)
    key = next(k for k in state if k.endswith("weight_meta"))
    state[key][0, 0] = 0x00                                  # idx0 == idx1: no writer produces this
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="weight_meta"):
        compress.load_model(path, tokenizer="-")


def test_inspect_describes_the_compact_layout(tokenizer, calib_ids, tmp_path):
    path = compress.export(_pruned(calib_ids), tokenizer, tmp_path / "c", layout="compact")
    info = compress.inspect_checkpoint(path)
    assert info["sparsity"]["modules"] == 14 and info["sparsity"]["pattern"] == "2:4"
    assert info["sparsity"]["bits_per_weight"] == pytest.approx(17, abs=0.01)     # fp32: 16 + 1 bits per weight
    assert info["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())
    from compress.checkpoint.inspect import format_inspection
    assert "2:4 in 14 modules" in format_inspection(info)
