"""compress bench on tiny models (CPU): the measurements, the dequantized baseline, the CLI and its errors."""

import json

import pytest
import torch
from torch import nn

import compress
from compress.bench import (BenchSettings, benchmark, dequantize_model, greedy_tokens, measure, random_prompt,
                            weight_bytes)
from compress.cli import main
from compress.errors import ConfigError, ModelLoadError
from compress.quant.linear import QuantLinear
from conftest import tiny_model

SMALL = BenchSettings(prompt_len=16, new_tokens=4, warmup=0, repeats=2)
SMALL_FLAGS = ["--device", "cpu", "--prompt-len", "16", "--new-tokens", "4", "--warmup", "0", "--repeats", "2"]


def _quantized(arch: str, seed: int = 0) -> nn.Module:
    model = tiny_model(arch, seed=seed)
    with torch.no_grad():                         # transformers zero-initializes biases; make them count
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.1)
    compress.quantize(model, compress.RTNConfig(bits=4, group_size=32), progress=False)
    return model


@pytest.fixture
def dense_dir(tmp_path, tokenizer):
    path = tmp_path / "dense"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def exported(tmp_path, tokenizer):
    return compress.export(_quantized("llama"), tokenizer, tmp_path / "q")


def test_measure_fields_are_positive_and_consistent(arch):
    model = _quantized(arch)
    m = measure(model, SMALL, "ours")
    assert m.prefill_tokens_per_s > 0 and m.decode_tokens_per_s > 0
    assert m.prefill_tokens_per_s == pytest.approx(SMALL.batch_size * SMALL.prompt_len / m.prefill_seconds)
    assert m.decode_tokens_per_s == pytest.approx(SMALL.batch_size * SMALL.new_tokens / m.decode_seconds)
    assert m.peak_memory_bytes is None and m.backend == "auto" and not m.cuda_graphs   # CPU: no CUDA peak
    packed_bytes = weight_bytes(model)
    dequantize_model(model)
    dense = measure(model, SMALL, "dense")
    assert dense.backend is None and dense.weight_bytes == weight_bytes(model) > packed_bytes == m.weight_bytes


def test_decode_loop_is_greedy_generation(arch):
    model = _quantized(arch)
    ids = random_prompt(model, BenchSettings(prompt_len=12, batch_size=2))                 # (2, 12)
    ours = greedy_tokens(model, ids, 6)                                                   # (2, 6)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                   do_sample=False, pad_token_id=0)[:, 12:]
    assert ours.shape == (2, 6) and torch.equal(ours, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_baseline_computes_what_the_quantized_model_does(arch, dtype):
    model = _quantized(arch).to(dtype)
    ids = random_prompt(model, BenchSettings(prompt_len=24, batch_size=2))
    with torch.no_grad():
        quantized_logits = model(input_ids=ids).logits
    packed = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert packed >= 12 and dequantize_model(model) == packed
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(m.weight.dtype == dtype for m in model.modules() if isinstance(m, nn.Linear))
    other = _quantized(arch, seed=1).to(dtype)                      # negative control: different weights
    dequantize_model(other)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, quantized_logits)
        assert not torch.allclose(other(input_ids=ids).logits, quantized_logits, atol=1e-2)


def test_benchmark_checkpoint_against_its_dequantized_self(exported):
    result = benchmark(exported, device="cpu", settings=SMALL)
    ours, base = result.models
    assert ours.name == "compress int4 g32 (auto)" and base.name == "bfloat16 (dequantized)"
    assert result.dtype == "bfloat16" and result.baseline == "dequantized" and result.device == "cpu"
    assert base.weight_bytes > ours.weight_bytes
    assert result.speedup("decode") == pytest.approx(ours.decode_tokens_per_s / base.decode_tokens_per_s)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["speedup_prefill"] > 0 and data["settings"]["prompt_len"] == 16 and "machine" in data
    assert "decode tok/s" in result.table() and "(dequantized)" in result.table()


def test_benchmark_against_a_dense_original_and_alone(exported, dense_dir):
    result = benchmark(exported, baseline=dense_dir, device="cpu", dtype="float32", settings=SMALL)
    assert [m.name for m in result.models] == ["compress int4 g32 (auto)", "dense (baseline)"]
    alone = benchmark(exported, baseline=None, device="cpu", settings=SMALL, backend="torch")
    assert len(alone.models) == 1 and alone.speedup() is None and alone.models[0].backend == "torch"


def test_baseline_of_another_architecture_is_refused_before_measuring(exported, tmp_path, tokenizer, monkeypatch):
    other = tmp_path / "other"
    tiny_model("qwen2").save_pretrained(other)
    tokenizer.save_pretrained(other)
    monkeypatch.setattr(compress.bench, "measure", lambda *a, **k: pytest.fail("measured before checking"))
    with pytest.raises(ModelLoadError, match=r"not the architecture .*model_type 'llama' vs 'qwen2'"):
        benchmark(exported, baseline=other, device="cpu", settings=SMALL)


@pytest.mark.parametrize("kwargs, message", [
    ({"settings": BenchSettings(prompt_len=500, new_tokens=20)}, r"520 tokens exceed .*max_position_embeddings 512"),
    ({"settings": BenchSettings(cuda_graphs=True, prompt_len=16)}, "needs a CUDA device"),
    ({"backend": "fast"}, "kernel backend must be one of auto, torch, triton"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_bad_settings_are_refused(exported, kwargs, message):
    with pytest.raises(compress.CompressError, match=message):
        benchmark(exported, device="cpu", **kwargs)


def test_bench_settings_name_the_flag():
    with pytest.raises(ConfigError, match=r"prompt_len \(--prompt-len\) must be an integer >= 1, got 0"):
        BenchSettings(prompt_len=0)
    with pytest.raises(ConfigError, match=r"--warmup"):
        BenchSettings(warmup=-1)


def test_dense_checkpoint_has_no_dequantized_baseline(dense_dir):
    with pytest.raises(ConfigError, match="no packed quantized layers"):
        benchmark(dense_dir, device="cpu", settings=SMALL)


def test_cli_bench_json_and_table(exported, capsys):
    assert main(["-q", "bench", str(exported), *SMALL_FLAGS, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["models"]] == ["compress int4 g32 (auto)", "bfloat16 (dequantized)"]
    assert all(m["prefill_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0 for m in data["models"])
    assert data["speedup_decode"] > 0 and data["settings"]["new_tokens"] == 4
    assert main(["-q", "bench", str(exported), *SMALL_FLAGS, "--no-baseline", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "compress int4 g32 (torch)" in out and "prefill tok/s" in out and "dequantized" not in out


@pytest.mark.parametrize("extra, message", [
    (["--prompt-len", "600"], "max_position_embeddings 512; lower --prompt-len or --new-tokens"),
    (["--repeats", "0"], "repeats (--repeats) must be an integer >= 1"),
    (["--cuda-graphs"], "--cuda-graphs) needs a CUDA device"),
])
def test_cli_bench_errors_exit_2(exported, capsys, extra, message):
    assert main(["-q", "bench", str(exported), *SMALL_FLAGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compress bench: error:") and message in err


def test_cli_bench_missing_checkpoint_and_bad_backend(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["bench", str(tmp_path), "--backend", "cuda"])
    assert done.value.code == 2 and "invalid choice: 'cuda'" in capsys.readouterr().err


def test_failed_cuda_graph_capture_falls_back_to_eager_with_a_warning(caplog):
    from compress.bench import StaticDecoder
    model = _quantized("llama")
    ids = random_prompt(model, BenchSettings(prompt_len=8))
    decoder = StaticDecoder(model, max_len=8 + 5)
    with torch.inference_mode():
        assert decoder.capture(ids) is False                          # no CUDA here: capture cannot start
        assert decoder.graph is None and torch.equal(decoder.generate(ids, 4), greedy_tokens(model, ids, 5))
    assert "CUDA graph capture of the decode step failed" in caplog.text and "decoding eagerly" in caplog.text
