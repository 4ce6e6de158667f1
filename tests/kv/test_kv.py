"""The kv_cache pass: fp8 scale calibration, export as vLLM's k_scale/v_scale + kv_cache_scheme,
reload by compress and by transformers + compressed-tensors, CLI and recipe."""

import json

import pytest
import torch

import compress
from compress.checkpoint.load import load_compressed
from compress.cli import main
from compress.errors import CheckpointError, ConfigError
from compress.evaluation import perplexity_through_cache
from compress.kv import kv_cache, kv_config_of, kv_scales_of
from compress.kv.config import KVCacheConfig
from compress.recipe import recipe_from_dict
from conftest import ct_simulates_kv_cache, tiny_model


@pytest.mark.parametrize("granularity, shape", [("tensor", (1,)), ("head", (2, 1, 1))])
def test_fp8_scales_are_the_calibration_range_over_448(calib_ids, granularity, shape):
    model = tiny_model("llama")
    seen = [[], []]

    def grab(module, args, kwargs, out):                      # k_proj / v_proj outputs of layer 1
        seen[module is model.model.layers[1].self_attn.v_proj].append(out.detach())
    hooks = [model.model.layers[1].self_attn.v_proj.register_forward_hook(grab, with_kwargs=True)]
    try:
        compress.quantize(model, KVCacheConfig("fp8", fp8_scale=granularity), calib=calib_ids, progress=False)
    finally:
        for h in hooks:
            h.remove()
    attn = model.model.layers[1].self_attn
    assert attn.k_scale.shape == shape and attn.v_scale.dtype == torch.float32
    v = torch.cat(seen[1]).view(-1, 2, 16)                    # values are not rotated by RoPE: check them exactly
    want = v.abs().amax(dim=(0, 2)) / 448 if granularity == "head" else v.abs().amax().reshape(1) / 448
    assert torch.allclose(attn.v_scale.flatten(), want.flatten(), rtol=1e-6)
    assert kv_config_of(model) == KVCacheConfig("fp8", fp8_scale=granularity)


def test_fp8_without_calibration_data_is_refused():
    with pytest.raises(ConfigError, match="give calibration data"):
        compress.quantize(tiny_model("llama"), KVCacheConfig("fp8"))


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_fp8_export_loads_in_compress_and_transformers_with_identical_logits(tmp_path, calib_ids, weights,
                                                                             granularity):
    from transformers import AutoModelForCausalLM
    model = tiny_model("llama")
    if weights:
        compress.quantize(model, compress.RTNConfig(bits=4, group_size=32), progress=False)
    compress.quantize(model, KVCacheConfig("fp8", fp8_scale=granularity), calib=calib_ids, progress=False)
    path = compress.export(model, None, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["kv_cache_scheme"] == {"dynamic": False, "group_size": None, "num_bits": 8, "symmetric": True,
                                     "type": "float", "strategy": "attn_head" if granularity == "head" else "tensor"}
    assert qc["format"] == ("pack-quantized" if weights else "dense") and "config_groups" in qc
    assert config["compress_kv_cache"]["scheme"] == "fp8"

    ours = load_compressed(path)
    assert all(torch.equal(a, b) for mine, orig in zip(kv_scales_of(ours), kv_scales_of(model), strict=True)
               for a, b in zip(mine, orig, strict=True))
    ids = calib_ids[:2]
    reference = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = ours(ids, past_key_values=kv_cache(ours), use_cache=True).logits
        theirs = reference(ids).logits
        dense = ours(ids).logits
    assert not torch.allclose(logits, dense, atol=1e-4)                       # the fp8 cache really acted
    if ct_simulates_kv_cache(reference):
        assert torch.equal(logits, theirs)                                    # compressed-tensors simulates fp8 K/V
    else:                                                                     # the KV scheme skipped (see conftest)
        assert torch.equal(theirs, dense)


def test_integer_kv_configs_travel_in_config_json_only(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    cfg = KVCacheConfig("int2", group_size=16, residual_length=32, rotate_keys=True, scale_dtype="fp8")
    compress.quantize(model, cfg)
    path = compress.export(model, tokenizer, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config                                # vLLM has no integer KV format
    reloaded, _ = compress.load_model(path)
    assert kv_config_of(reloaded) == cfg


def test_unsupported_kv_cache_scheme_is_refused_by_file(tmp_path, calib_ids):
    model = tiny_model("llama")
    compress.quantize(model, KVCacheConfig("fp8"), calib=calib_ids, progress=False)
    path = compress.export(model, None, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"]["num_bits"] = 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: kv_cache_scheme .* not a static fp8"):
        load_compressed(path)


def test_evaluate_decodes_through_the_cache_the_model_carries(tokenizer, text_file):
    model = tiny_model("llama")
    plain = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, progress=False)
    compress.quantize(model, KVCacheConfig("int2", group_size=16, residual_length=0))
    through = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, kv_chunk=4, progress=False)
    forced_plain = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, kv_cache=False,
                                     progress=False)
    assert plain.kv_cache is None and forced_plain.perplexity == plain.perplexity
    assert through.kv_cache == "int2 g16 window 0" and through.kv_chunk == 4
    assert through.perplexity != plain.perplexity and through.tokens == plain.tokens


def test_chunk_must_be_positive():
    with pytest.raises(ConfigError, match="kv_chunk must be >= 1"):
        perplexity_through_cache(tiny_model("llama"), torch.zeros(1, 8, dtype=torch.long),
                                 KVCacheConfig("int4", group_size=16), chunk=0, progress=False)


def test_recipe_kv_pass_round_trips_and_needs_data_only_for_fp8(tmp_path):
    data = {"version": 1, "model": "m", "passes": [{"method": "kv_cache", "scheme": "int4", "residual_length": 64}],
            "evaluation": {"data": "t.txt", "kv_chunk": 8}}
    recipe = recipe_from_dict(data)
    assert recipe.passes[0] == KVCacheConfig("int4", residual_length=64) and recipe.evaluation.kv_chunk == 8
    assert recipe_from_dict(recipe.to_dict()).passes == recipe.passes
    with pytest.raises(ConfigError, match="need calibration data"):
        recipe_from_dict({"version": 1, "model": "m", "passes": [{"method": "kv_cache", "scheme": "fp8"}]})
    with pytest.raises(ConfigError, match="unknown key 'residual'"):
        recipe_from_dict({"version": 1, "model": "m", "passes": [{"method": "kv_cache", "residual": 64}]})


def test_cli_eval_with_a_kv_cache(base, text_file, capsys):
    assert main(["-q", "eval", str(base), "--data", str(text_file), "--seqlen", "40", "--max-windows", "2",
                 "--kv-cache", "int4", "--kv-group-size", "16", "--kv-residual", "0", "--kv-chunk", "8"]) == 0
    assert "decoded through a int4 g16 window 0 KV cache, 8 token(s) per step" in capsys.readouterr().out
    assert main(["-q", "eval", str(base), "--data", str(text_file), "--seqlen", "40", "--max-windows", "1",
                 "--kv-cache", "fp8", "--calib", str(text_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == "fp8 (tensor scales)"
    assert main(["-q", "eval", str(base), "--data", str(text_file), "--kv-cache", "int4",
                 "--kv-residual", "10"]) == 2
    assert "multiple of group_size" in capsys.readouterr().err
    assert main(["-q", "eval", str(base), "--data", str(text_file), "--seqlen", "40", "--max-windows", "1",
                 "--kv-cache", "int2", "--kv-group-size", "16", "--kv-residual", "0", "--kv-scale-dtype", "fp8",
                 "--kv-sink", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == "int2 g16 window 0, fp8 scales, 2 sink tokens"
    assert main(["-q", "eval", str(base), "--data", str(text_file), "--kv-cache", "fp8",
                 "--kv-scale-dtype", "fp8"]) == 2
    assert "scale_dtype is for the integer schemes" in capsys.readouterr().err


def test_cli_quantize_kv_only_and_with_weights(base, text_file, tmp_path, capsys):
    out = tmp_path / "kv"
    assert main(["-q", "quantize", str(base), "--method", "none", "--kv-cache", "fp8", "--kv-fp8-scale", "head",
                 "--calib", str(text_file), "--calib-samples", "4", "--seqlen", "32", "--output", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["strategy"] == "attn_head" and qc["config_groups"] == {}
    out2 = tmp_path / "both"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--group-size", "32", "--kv-cache", "int4",
                 "--kv-group-size", "16", "--eval", str(text_file), "--seqlen", "32", "--max-windows", "1",
                 "--output", str(out2)]) == 0
    table = capsys.readouterr().out
    assert "kv_cache int4 g16 window 128" in table
    assert json.loads((out2 / "config.json").read_text())["compress_kv_cache"]["group_size"] == 16
    assert main(["-q", "quantize", str(base), "--method", "none", "--output", str(tmp_path / "x")]) == 2
    assert "--kv-cache SCHEME" in capsys.readouterr().err
    assert main(["-q", "quantize", str(base), "--method", "none", "--kv-cache", "fp8",
                 "--output", str(tmp_path / "y")]) == 2
    assert "add --calib" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_triton_decode_steps_match_the_reference_path_in_a_model(scheme, calib_ids):
    """backend='triton' hands single-token decode steps to the kernel through the compress_kv
    attention (the interpreter on CPU); prefill chunks stay on SDPA."""
    model = tiny_model("llama")
    if scheme == "fp8":
        compress.quantize(model, KVCacheConfig("fp8", fp8_scale="head"), calib=calib_ids, progress=False)
    cfg = KVCacheConfig(scheme, group_size=16, residual_length=0 if scheme == "fp8" else 16)
    prompt = calib_ids[:2, :20]
    logits = {}
    for backend in ("torch", "triton"):
        cache = kv_cache(model, cfg, backend=backend)
        assert any(layer.fused for layer in cache.layers) == (backend == "triton")
        with torch.no_grad():
            model(prompt, past_key_values=cache, use_cache=True)
            steps = [model(calib_ids[:2, 20 + i:21 + i], past_key_values=cache, use_cache=True).logits
                     for i in range(12)]
        logits[backend] = torch.cat(steps, dim=1)
    assert model.config._attn_implementation == "compress_kv"
    assert torch.allclose(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)
