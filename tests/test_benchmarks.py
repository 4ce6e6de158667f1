"""Smoke tests of the scripts in benchmarks/ at tiny sizes on the CPU (seconds), so they keep running."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_tiny_on_cpu(tmp_path, capsys):
    decode = _script("decode")
    out = tmp_path / "decode.json"
    assert decode.main(["--tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    ours, dense = data["models"]
    assert ours["name"] == "compress int4 g128 (auto)" and dense["name"] == "bfloat16"
    assert ours["weight_bytes"] < 0.6 * dense["weight_bytes"]                # int4 linears really packed
    assert data["speedup_decode"] > 0 and data["quantization"]["group_size"] == 128
    assert data["model_config"]["num_key_value_heads"] == 2 and data["device"] == "cpu"
    assert "decode speed-up" in capsys.readouterr().out


def test_decode_benchmark_defaults_are_llama3_8b():
    decode = _script("decode")
    dims = decode.model_dims(decode.argparse.Namespace(tiny=False, layers=None, hidden=None, intermediate=None,
                                                       heads=None, kv_heads=None, vocab=None))
    assert dims == dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)


def test_decode_benchmark_refuses_8b_on_cpu_before_building(capsys):
    decode = _script("decode")
    assert decode.parameter_count(decode.LLAMA3_8B) == 8_030_261_248                     # Llama-3-8B's count
    assert decode.main(["--device", "cpu"]) == 2
    assert "8.0B parameters on cpu" in capsys.readouterr().err
    assert decode.main(["--tiny", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_kv_cache_benchmark_tiny(tmp_path, tokenizer, text_file, capsys):
    from conftest import tiny_model
    kv = _script("kv_cache")
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "kv.json"
    assert kv.main(["--model", str(model_dir), "--test", str(text_file), "--calib", str(text_file), "--calib-samples",
                    "2", "--seqlen", "160", "--max-windows", "2", "--chunk", "8", "--prompts", "2", "--prompt-len", "8",
                    "--new-tokens", "6", "--only", "fp8-head", "int2-w0", "--agreement", "int2-w0", "--quiet",
                    "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert list(rows) == ["float", "fp8-head", "int2-w0"] and data["chunk"] == 8   # 160 tokens: two 64-token key blocks quantized
    assert rows["int2-w0"]["ratio"] == rows["float"]["bytes_per_token"] / rows["int2-w0"]["bytes_per_token"]
    assert rows["int2-w0"]["agreement"]["new_tokens"] == 6 and "agreement" not in rows["fp8-head"]
    assert rows["int2-w0"]["perplexity"] != rows["float"]["perplexity"]
    assert "int2-w0" in capsys.readouterr().out


def test_pruning_benchmark_tiny(tmp_path, tokenizer, text_file, capsys):
    from conftest import tiny_model
    bench = _script("pruning")
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "pruning.json"
    assert bench.main(["--model", str(model_dir), "--calib", str(text_file), "--eval", str(text_file), "--samples", "2",
                       "--train-samples", "4", "--seqlen", "32", "--max-windows", "2", "--lora-steps", "2",
                       "--only", "float", "wanda-2of4+lora", "mlp25-weight", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["setting"]: r for r in data["rows"]}
    pruned, retrained = rows["wanda-2of4+lora"]["stages"]
    assert pruned["is_2of4"] and retrained["is_2of4"] and retrained["sparsity"] == pruned["sparsity"] > 0.49
    assert retrained["retrain"]["steps"] == 2 and retrained["retrain"]["max_mask_deviation"] == 0.0
    assert rows["mlp25-weight"]["stages"][0]["parameters"] < rows["float"]["stages"][0]["parameters"]
    assert "gap closed" in capsys.readouterr().out


def test_plan_latency_benchmark_tiny_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    bench = _script("plan_latency")
    out = tmp_path / "latency.json"
    assert bench.main(["--tiny", "--device", "cpu", "--profile", "cpu", "--formats", "bf16", "int4-g128",
                       "--repeats", "1", "--warmup", "0", "--calibrate", "cpu-tiny", "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["format"]: r for r in data["rows"]}
    assert set(rows) == {"bf16", "int4-g128"}
    for r in rows.values():
        assert r["predicted_decode_seconds"] > 0 and r["measured_decode_seconds"] > 0
        assert r["decode_error"] == r["measured_decode_seconds"] / r["predicted_decode_seconds"] - 1
    assert rows["int4-g128"]["weight_bytes"] < 0.6 * rows["bf16"]["weight_bytes"]
    assert data["calibrated_profile"]["source"] == "calibrated"
    assert (tmp_path / "home" / "devices" / "cpu-tiny.yaml").is_file()
    assert "within 15%" in capsys.readouterr().out
    assert bench.main(["--tiny", "--device", "cpu", "--formats", "int5"]) == 2


def test_no_benchmark_script_shadows_an_importable_module():
    """`python benchmarks/NAME.py` puts benchmarks/ first on sys.path, so a script named like a
    package a dependency imports (transformers imports `kernels` when that package is installed)
    would be imported in its place and break the run."""
    import sys
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))

    def installed(name: str) -> bool:        # importable from outside this checkout (tests/ is on sys.path)
        spec = importlib.util.find_spec(name)
        if spec is None:
            return False
        places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
        return any(place and not Path(place).resolve().is_relative_to(ROOT) for place in places)

    shadowing = [s for s in scripts if s in sys.stdlib_module_names or installed(s)]
    assert not shadowing, f"benchmarks/{shadowing[0]}.py shadows an importable module; rename it"


def test_moe_benchmark_tiny(tmp_path, capsys):
    moe = _script("moe")
    out = tmp_path / "moe.json"
    assert moe.main(["--tiny", "--samples", "2", "--seqlen", "64", "--min-tokens", "16", "--quiet",
                     "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    topk, every = data["results"]
    assert not topk["route_all_experts"] and every["route_all_experts"]
    assert topk["quantized_linears"] == 2 * (16 * 3 + 4)           # every expert projection and q/k/v/o
    tokens = topk["tokens_per_expert"]
    assert tokens["experts"] == 32 and tokens["min"] <= tokens["median"] <= tokens["max"] < 2 * 64
    # one Hessian group at a time: far below all of a layer's experts' Hessians at once
    assert 0 < topk["hessian_peak_bytes"] <= topk["all_expert_hessians_one_layer_bytes"] / 8
    assert every["tokens_per_expert"]["rtn_fallback"] == 0 and "tokens/expert" in capsys.readouterr().out
