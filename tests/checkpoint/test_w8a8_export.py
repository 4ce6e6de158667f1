"""W8A8 checkpoints (compressed-tensors float-quantized / int-quantized): the config groups, our
reload (identical logits), transformers + compressed-tensors without compress (close logits), the
fp8-block warnings, inspect, and the variants we refuse."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.checkpoint.export import export
from compress.checkpoint.inspect import format_inspection, inspect_checkpoint
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from compress.errors import CheckpointError
from compress.formats import WeightFormat
from compress.quant.config import RTNConfig
from compress.quant.w8a8_linear import W8A8Linear
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMES = ["fp8", "fp8-block", "fp8-static", "w8a8-int8", "w8a8-int8-static"]


def _ids():
    return torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))


def _quantized(arch: str, scheme: str, dtype=torch.float32, **kw):
    """A tiny model built in ``dtype`` (not cast afterwards: a cast model's rotary buffers differ from
    a loaded one's) and quantized with RTN; calibrated for the static schemes."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = tiny_model(arch, **kw)
    finally:
        torch.set_default_dtype(default)
    compress.quantize(model, RTNConfig(scheme=scheme), calib=CalibrationData(_ids(), "ids", 0), progress=False)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_export_writes_the_scheme_and_our_reload_is_identical(tmp_path, arch, scheme):
    model = _quantized(arch, scheme)
    export(model, None, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    fmt = WeightFormat.parse(scheme)
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == ("float-quantized" if scheme.startswith("fp8") else "int-quantized")
    assert group["weights"] == fmt.weights_args(observer="minmax") and group["input_activations"] == fmt.input_args()
    assert "lm_head" in qc["ignore"] or arch == "qwen2"                  # qwen2's head is tied
    back = load_compressed(tmp_path / "ck")
    q = back.model.layers[0].self_attn.q_proj
    assert isinstance(q, W8A8Linear) and WeightFormat.of_module(q) == fmt and q.observer == "minmax"
    assert torch.equal(_logits(back), _logits(model))
    assert not torch.equal(_logits(back), _logits(tiny_model(arch)))    # negative control: not the dense model


# transformers + compressed-tensors on CPU decompress the weights and fake-quantize the activations in
# the model dtype. float32 FP8 and static INT8 match our simulation bit for bit; dynamic INT8 differs
# because compressed-tensors' scale is amax / 127.5 (vLLM's and ours: amax / 127), which clips each
# token's largest value; bfloat16 rounds the activations and products in bfloat16 where we use float32.
# Tolerances: measured values x ~2 (docs/checkpoint-format.md, "W8A8 FP8/INT8").
HF_TOLERANCE = {("fp8", torch.float32): 1e-6, ("fp8-static", torch.float32): 1e-6,
                ("w8a8-int8-static", torch.float32): 1e-6, ("w8a8-int8", torch.float32): 3e-2,
                ("fp8", torch.bfloat16): 6e-2, ("fp8-static", torch.bfloat16): 6e-2,
                ("w8a8-int8", torch.bfloat16): 3e-2, ("w8a8-int8-static", torch.bfloat16): 3e-2}


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
@pytest.mark.parametrize("scheme", ["fp8", "fp8-static", "w8a8-int8", "w8a8-int8-static"])
def test_transformers_loads_the_checkpoint_without_compress(tmp_path, arch, dtype, scheme):
    model = _quantized(arch, scheme, dtype)
    export(model, None, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=dtype)
    assert type(hf.model.layers[0].self_attn.q_proj).__module__.startswith("torch")     # no compress module
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype in (torch.float8_e4m3fn, torch.int8, dtype)
    ours, theirs, dense = _logits(model), _logits(hf), _logits(tiny_model(arch))
    assert _rel(theirs, ours) <= HF_TOLERANCE[(scheme, dtype)]
    assert _rel(theirs, dense) > 1e-3                                 # negative control: it is quantized


def test_transformers_runs_fp8_block_where_in_features_are_multiples_of_128(tmp_path):
    model = _quantized("llama", "fp8-block", hidden_size=128, intermediate_size=256)
    export(model, None, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert _rel(_logits(hf), _logits(model)) <= 1e-6
    assert torch.equal(_logits(load_compressed(tmp_path / "ck")), _logits(model))


def test_export_names_fp8_block_layers_vllm_refuses(tmp_path, caplog):
    model = _quantized("llama", "fp8-block")                        # hidden 64, k_proj 32 rows: both < 128
    with caplog.at_level(logging.WARNING, logger="compress.checkpoint.export"):
        export(model, None, tmp_path / "ck")
    text = caplog.text
    assert "in_features not a multiple of 128" in text and "model.layers.0.self_attn.q_proj" in text
    assert "validate_fp8_block_shape" in text and "model.layers.0.self_attn.k_proj" in text
    caplog.clear()
    wide = _quantized("llama", "fp8-block", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                      num_key_value_heads=2)                        # every shard 128 or 256 wide
    with caplog.at_level(logging.WARNING, logger="compress.checkpoint.export"):
        export(wide, None, tmp_path / "wide")
    assert "fp8-block" not in caplog.text                             # negative control: nothing to warn about


def test_inspect_counts_w8a8_modules_once(tmp_path):
    dense = tiny_model("llama")
    model = _quantized("llama", "fp8-static")
    export(model, None, tmp_path / "ck")
    info = inspect_checkpoint(tmp_path / "ck")
    assert info["quantized_modules"] == 14                          # 7 linears x 2 layers
    assert info["parameters"] == sum(p.numel() for p in dense.parameters())
    assert 8 < info["bits_per_quantized_weight"] < 8.2
    assert "float-quantized: float8 weights per tensor" in format_inspection(info)


def _rewrite(path, edit) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    edit(config["quantization_config"]["config_groups"]["group_0"])
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit,match", [
    (lambda g: g.pop("input_activations"), "weight-only"),
    (lambda g: g["input_activations"].update(symmetric=False), "not a W8A8 variant"),
    (lambda g: g["weights"].update(strategy="tensor"), "not a W8A8 variant"),
    (lambda g: g["input_activations"].update(num_bits=4), "not a W8A8 variant"),
])
def test_other_w8a8_variants_are_refused_naming_the_group(tmp_path, edit, match):
    export(_quantized("llama", "w8a8-int8"), None, tmp_path / "ck")
    _rewrite(tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_compressed(tmp_path / "ck")
    assert "config group 'group_0'" in str(exc.value) and "load this checkpoint with vLLM" in str(exc.value)
