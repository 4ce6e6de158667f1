"""The cost model: exact checkpoint bytes, format parsing, roofline latency, KV-cache memory."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig

import compress
from compress.checkpoint.safetensors_io import weights_bytes
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.formats import WeightFormat
from compress.plan.cost import (Workload, checkpoint_bytes, formats_of, kv_cache_bytes, model_shape,
                                predict, shape_from_config)
from compress.plan.devices import load_profile
from compress.kv.config import KVCacheConfig
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False)


def _ideal(profile):
    """The profile with every efficiency 1 and no launch overhead: the bare roofline."""
    eff = {ph: {k: 1.0 for k in v} for ph, v in profile.efficiency.items()}
    return dataclasses.replace(profile, efficiency=eff, overhead_us=0.0)


@pytest.mark.parametrize("name,scheme,bits,group,sym", [
    ("bf16", "dense", 16, None, True), ("int8", "int", 8, None, True), ("int4-g64", "int", 4, 64, True),
    ("int3-g32-asym", "int", 3, 32, False), ("nvfp4a16", "nvfp4a16", 4, 16, True), ("mxfp4", "mxfp4", 4, 32, True)])
def test_format_names_parse(name, scheme, bits, group, sym):
    f = WeightFormat.parse(name)
    assert (f.scheme, f.bits, f.group_size, f.symmetric) == (scheme, bits, group, sym)
    assert f.name == name


@pytest.mark.parametrize("bad", ["int9", "int4-g0", "fp3", "int4-asymm", ""])
def test_unknown_formats_are_refused_with_the_spellings(bad):
    with pytest.raises(ConfigError, match="int4-g64"):
        WeightFormat.parse(bad)


def test_bits_per_weight_of_common_formats():
    assert WeightFormat.parse("int4-g64").bits_per_weight(4096, 4096) == pytest.approx(4 + 16 / 64, abs=0.01)
    assert WeightFormat.parse("nvfp4a16").bits_per_weight(4096, 4096) == pytest.approx(4.5, abs=0.01)
    assert WeightFormat.parse("int8").bits_per_weight(4096, 4096) == pytest.approx(8, abs=0.01)
    assert not WeightFormat.parse("int4-g64").fits(160) and WeightFormat.parse("int4-g32").fits(160)


def test_units_follow_the_fused_groups(arch):
    shape = model_shape(tiny_model(arch))
    kinds = {u.name.split(".", 3)[-1] for u in shape.units}
    assert len(shape.units) == 2 * (4 if arch != "opt" else 4)
    qkv = [u for u in shape.units if len(u.members) == 3]
    assert len(qkv) == 2 and all({m[0].rsplit(".", 1)[1] for m in u.members} == {"q_proj", "k_proj", "v_proj"}
                                 for u in qkv), kinds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_checkpoint_bytes_are_exact(arch, tmp_path, dtype, tokenizer):
    model = tiny_model(arch).to(dtype)
    shape = model_shape(model, dtype)
    dense = {u.name: WeightFormat.parse("bf16") for u in shape.units}
    compress.export(model, tokenizer, tmp_path / "out")
    assert checkpoint_bytes(shape, dense) == weights_bytes(tmp_path / "out")


def test_mixed_plan_checkpoint_bytes_are_exact(calib_ids, tmp_path, tokenizer):
    """A GPTQ pass with overrides, exported: the cost model's bytes are the file's bytes."""
    model = tiny_model("llama").to(torch.bfloat16)
    shape = model_shape(model, torch.bfloat16)
    cfg = compress.GPTQConfig(bits=4, group_size=32, overrides={
        "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": None},
        "re:^model\\.layers\\.1\\.self_attn\\.(q|k|v)_proj$": {"bits": 3, "symmetric": False},
        "model.layers.1.mlp.gate_proj": {"scheme": "nvfp4a16"}, "model.layers.1.mlp.up_proj": {"scheme": "nvfp4a16"}},
        ignore=["lm_head", "model.layers.0.self_attn.o_proj"])
    compress.quantize(model, cfg, calib=CalibrationData(calib_ids, "ids", 0), progress=False)
    compress.export(model, tokenizer, tmp_path / "out")
    planned = formats_of(model, shape)
    assert planned["model.layers.0.mlp.down_proj"].name == "int8"
    assert planned["model.layers.1.self_attn.q+k+v"].name == "int3-g32-asym"
    assert planned["model.layers.0.self_attn.o_proj"].dense
    assert checkpoint_bytes(shape, planned) == weights_bytes(tmp_path / "out")
    # negative control: another format for one unit changes the prediction
    planned["model.layers.0.mlp.down_proj"] = WeightFormat.parse("bf16")
    assert checkpoint_bytes(shape, planned) != weights_bytes(tmp_path / "out")


def test_llama3_8b_shape_from_its_config_alone():
    shape = shape_from_config(LlamaConfig(**LLAMA3_8B))
    assert shape.params == pytest.approx(8.03e9, rel=0.01)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (32, 8, 128)


def test_decode_roofline_of_llama3_8b_on_h100_by_hand():
    """At efficiency 1, no launch cost, batch 1 and a 1-token context, a bf16 decode step reads
    every weight once: 16.06 GB / 3.35 TB/s (plus the tiny activations and cache)."""
    h100 = _ideal(load_profile("h100"))
    shape = shape_from_config(LlamaConfig(**LLAMA3_8B))
    fm = {u.name: WeightFormat.parse("bf16") for u in shape.units}
    pred = predict(shape, fm, h100, Workload(1, 1))
    weights = 2 * (shape.params - shape.vocab * shape.hidden)    # the input embedding is not read by a matmul
    assert pred.decode_s == pytest.approx(weights / 3.35e12, rel=0.01)


def test_int4_decodes_faster_than_bf16_on_a_gpu_but_prefill_is_compute_bound():
    h100 = load_profile("h100")
    shape = shape_from_config(LlamaConfig(**LLAMA3_8B))
    bf16 = predict(shape, {u.name: WeightFormat.parse("bf16") for u in shape.units}, h100, Workload(1, 2048))
    int4 = predict(shape, {u.name: WeightFormat.parse("int4-g128") for u in shape.units}, h100, Workload(1, 2048))
    assert int4.decode_s < 0.65 * bf16.decode_s          # launches and attention do not shrink
    assert int4.weight_bytes < 0.4 * bf16.weight_bytes        # embedding and lm_head stay bf16
    big = Workload(8, 4096)
    p_bf16 = predict(shape, {u.name: WeightFormat.parse("bf16") for u in shape.units}, h100, big)
    assert p_bf16.prefill_s > 2 * shape.params * 8 * 4096 / 989.4e12      # at least the FLOPs at peak


def test_a_format_without_a_kernel_costs_the_reference_path():
    """int3 has no Triton kernel on GPUs: it is costed as dequantize + dense matmul, slower than bf16."""
    h100 = load_profile("h100")
    assert "int3" not in h100.kernel_formats
    shape = shape_from_config(LlamaConfig(**LLAMA3_8B))
    bf16 = predict(shape, {u.name: WeightFormat.parse("bf16") for u in shape.units}, h100, Workload(1, 1))
    int3 = predict(shape, {u.name: WeightFormat.parse("int3-g128") for u in shape.units}, h100, Workload(1, 1))
    assert int3.decode_s > bf16.decode_s


def test_kv_cache_memory_scales_with_batch_context_and_format():
    shape = shape_from_config(LlamaConfig(**LLAMA3_8B))
    dense = kv_cache_bytes(shape, None, Workload(8, 8192))
    assert dense == 8 * 8192 * 32 * 2 * 8 * 128 * 2                     # 8 x 8192 x 128 KiB = 8 GiB
    fp8 = kv_cache_bytes(shape, KVCacheConfig(scheme="fp8"), Workload(8, 8192))
    int4 = kv_cache_bytes(shape, KVCacheConfig(scheme="int4"), Workload(8, 8192))
    assert fp8 == dense // 2 and int4 < fp8
    assert kv_cache_bytes(shape, None, Workload(8, 4096)) == dense // 2


def test_workload_and_prediction_errors():
    with pytest.raises(ConfigError, match="batch"):
        Workload(0, 10)
    shape = model_shape(tiny_model("llama"))
    with pytest.raises(ConfigError, match="no weight format"):
        predict(shape, {}, load_profile("h100"), Workload())


def test_decode_gets_cheaper_per_token_with_batch():
    h100 = load_profile("h100")
    shape = shape_from_config(LlamaConfig(**LLAMA3_8B))
    fm = {u.name: WeightFormat.parse("int4-g128") for u in shape.units}
    one = predict(shape, fm, h100, Workload(1, 512))
    eight = predict(shape, fm, h100, Workload(8, 512))
    assert eight.decode_s < 2 * one.decode_s                    # weights are read once for the whole batch
    assert math.isclose(eight.memory_bytes - eight.kv_bytes - eight.activation_bytes, eight.weight_bytes)
