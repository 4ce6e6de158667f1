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
