"""Streamed compression (compress.quantize_streaming): a safetensors checkpoint quantized one decoder
layer in memory at a time gives, tensor for tensor and bit for bit, the checkpoint the in-memory path
(load_model -> quantize -> export) writes, with the same config.json and files; it reloads; each
layer is freed once written; bad inputs are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compress
from compress import streamed
from compress.checkpoint.safetensors_io import INDEX_NAME, read_state_dict
from compress.cli import main
from compress.data import CalibrationData
from compress.errors import CheckpointError, ConfigError, MissingPathError, ModelLoadError
from conftest import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = CalibrationData(torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)), "ids", 1)
CASES = {
    "rtn-int4-g32": compress.RTNConfig(bits=4, group_size=32),
    "gptq-int4-g32": compress.GPTQConfig(bits=4, group_size=32),
    "rtn-fp8": compress.RTNConfig(scheme="fp8"),
    "gptq-nvfp4a16": compress.GPTQConfig(scheme="nvfp4a16"),
}


def _source(tmp_path: Path, tokenizer, model, shard: str | None = None) -> Path:
    path = tmp_path / "src"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return path


def _in_memory(src: Path, cfg, out: Path, calib=CALIB, **export_kw) -> Path:
    model, tok = compress.load_model(src)
    compress.quantize(model, cfg, calib, progress=False)
    return compress.export(model, tok, out, **export_kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = read_state_dict(a), read_state_dict(b)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    if (a / INDEX_NAME).is_file():
        assert json.loads((a / INDEX_NAME).read_text()) == json.loads((b / INDEX_NAME).read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])          # qwen2: tied embeddings
@pytest.mark.parametrize("case", ["rtn-int4-g32", "gptq-int4-g32"])
def test_streamed_equals_the_in_memory_path_bit_for_bit(arch, case, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model(arch))
    cfg = CASES[case]
    a = _in_memory(src, cfg, tmp_path / "memory")
    b = compress.quantize_streaming(src, cfg, tmp_path / "streamed", CALIB, progress=False)
    assert_same_checkpoint(a, b)
    qc = json.loads((b / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"] and "lm_head" in qc["ignore"]
    # Negative control: the weights really are quantized (no float q_proj weight left).
    assert not any(k.endswith("q_proj.weight") for k in read_state_dict(b))


@pytest.mark.parametrize("case", ["rtn-fp8", "gptq-nvfp4a16"])
def test_other_formats_and_a_quantized_head(case, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    cfg = CASES[case]
    cfg = type(cfg)(**{**cfg.__dict__, "ignore": []})                 # lm_head (untied) quantized too
    a = _in_memory(src, cfg, tmp_path / "memory")
    b = compress.quantize_streaming(src, cfg, tmp_path / "streamed", CALIB, progress=False)
    assert_same_checkpoint(a, b)
    assert json.loads((b / "config.json").read_text())["quantization_config"]["ignore"] == []


def test_sharded_input_and_output(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"), shard="40KB")
    cfg = CASES["gptq-int4-g32"]
    a = _in_memory(src, cfg, tmp_path / "memory", max_shard_bytes=30_000)
    b = compress.quantize_streaming(src, cfg, tmp_path / "streamed", CALIB, max_shard_bytes=30_000, progress=False)
    assert (b / INDEX_NAME).is_file() and len(list(b.glob("*.safetensors"))) > 2
    assert_same_checkpoint(a, b)


def test_reloads_with_compress_and_gives_the_in_memory_logits(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("qwen2"))
    cfg = CASES["gptq-int4-g32"]
    a = _in_memory(src, cfg, tmp_path / "memory")
    b = compress.quantize_streaming(src, cfg, tmp_path / "streamed", CALIB, progress=False)
    ids = CALIB.input_ids[:1, :16]
    ma, _ = compress.load_model(a)
    mb, _ = compress.load_model(b)
    with torch.no_grad():
        la, lb = ma(ids).logits, mb(ids).logits
    dense, _ = compress.load_model(src)
    with torch.no_grad():
        assert not torch.equal(dense(ids).logits, lb)                 # really quantized
    assert torch.equal(la, lb)


class _Recording(streamed.LayerStreamer):
    """Records, at each layer's entry, how many layers hold data and how many bytes they hold."""

    made: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen: list[tuple[int, int]] = []
        _Recording.made.append(self)

    def __call__(self, index, prefix, layer):
        cm = super().__call__(index, prefix, layer)
        outer = self

        class Wrap:
            def __enter__(self):
                out = cm.__enter__()
                resident = sum(any(not t.is_meta for t in lay.parameters()) for lay in outer.layers)
                outer.seen.append((resident, outer.resident_layer_bytes()))
                return out

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrap()


@pytest.mark.parametrize("case", ["rtn-int4-g32", "gptq-int4-g32"])         # data-free and calibrated walks
def test_each_layer_is_loaded_alone_and_freed(case, tmp_path, tokenizer, monkeypatch):
    src = _source(tmp_path, tokenizer, tiny_model("llama", num_hidden_layers=3))
    _Recording.made = []
    monkeypatch.setattr(streamed, "LayerStreamer", _Recording)
    compress.quantize_streaming(src, CASES[case], tmp_path / "out", CALIB, progress=False)
    rec = _Recording.made[0]
    one_layer = sum(t.numel() * t.element_size() for k, t in read_state_dict(src).items() if ".layers.0." in k)
    assert [r for r, _ in rec.seen] == [1, 1, 1]            # only the current layer holds data
    assert max(b for _, b in rec.seen) <= one_layer
    assert rec.layers_done == 3
    assert all(t.is_meta for t in [*rec.layers.parameters(), *rec.layers.buffers()])
    # The embeddings and lm_head are freed once the first layer's inputs are captured (or never read
    # without calibration) and copied from the source at the end: an 8B model's are 1 GB, more than a layer.
    assert rec.model.model.embed_tokens.weight.is_meta and rec.model.lm_head.weight.is_meta


def test_cli_stream(tmp_path, tokenizer, text_file, capsys):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    rc = main(["-q", "quantize", str(src), "--stream", "--method", "gptq", "--group-size", "32", "--calib",
               str(text_file), "--calib-samples", "4", "--seqlen", "32", "-o", str(tmp_path / "cli")])
    assert rc == 0 and "streamed" in capsys.readouterr().out
    tok = compress.load_model(src)[1]
    calib = compress.calibration_data(tok, text_file, 4, 32)
    a = _in_memory(src, compress.GPTQConfig(bits=4, group_size=32), tmp_path / "memory", calib=calib)
    assert_same_checkpoint(a, tmp_path / "cli")


def test_cli_refusals(tmp_path, tokenizer, capsys):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    assert main(["quantize", str(src), "--stream", "--method", "gptq", "-o", str(tmp_path / "o")]) != 0
    assert "--calib" in capsys.readouterr().err
    assert main(["quantize", str(src), "--stream", "--model-free", "-o", str(tmp_path / "o")]) != 0
    assert "pick one" in capsys.readouterr().err


# --- bad inputs ----------------------------------------------------------------------------------------
def test_refuses_bad_sources(tmp_path, tokenizer):
    cfg = CASES["rtn-int4-g32"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="GGUF file.*safetensors"):
        compress.quantize_streaming(gguf, cfg, tmp_path / "o")
    with pytest.raises(MissingPathError):
        compress.quantize_streaming(tmp_path / "nope/", cfg, tmp_path / "o")
    pickled = tmp_path / "pickled"
    tiny_model("llama").save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only"):
        compress.quantize_streaming(pickled, cfg, tmp_path / "o")
    with pytest.raises(ConfigError, match="weight quantizers"):
        compress.quantize_streaming(pickled, compress.WandaConfig(), tmp_path / "o")


def test_refuses_a_missing_shard_and_a_missing_tensor(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"), shard="40KB")
    shards = sorted(src.glob("*.safetensors"))
    shards[-1].rename(tmp_path / "away.safetensors")
    with pytest.raises(CheckpointError, match=shards[-1].name):
        compress.quantize_streaming(src, CASES["rtn-int4-g32"], tmp_path / "o")
    src2 = tmp_path / "src2"
    model = tiny_model("llama")
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    model.save_pretrained(src2, state_dict=state)
    tokenizer.save_pretrained(src2)
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        compress.quantize_streaming(src2, CASES["rtn-int4-g32"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_directory_rules(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    cfg = CASES["rtn-int4-g32"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="overwrite"):
        compress.quantize_streaming(src, cfg, out)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        compress.quantize_streaming(src, cfg, out, overwrite=True)
    with pytest.raises(ConfigError, match="lies in the checkpoint"):
        compress.quantize_streaming(src, cfg, src / "q")
    done = compress.quantize_streaming(src, cfg, tmp_path / "q", progress=False)
    compress.quantize_streaming(src, cfg, done, overwrite=True, progress=False)          # replaces a checkpoint
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_failure_midway_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))

    def boom(self, state):
        raise RuntimeError("disk full")

    monkeypatch.setattr(streamed.LayerStreamer, "_write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        compress.quantize_streaming(src, CASES["rtn-int4-g32"], tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_non_finite_layer_weights_like_the_in_memory_path(tmp_path, tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    src = _source(tmp_path, tokenizer, model)
    with pytest.raises(CheckpointError, match=r"model.layers.1: .*up_proj.weight has 1 NaN"):
        compress.quantize_streaming(src, CASES["rtn-int4-g32"], tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("calibrated", [False, True])
def test_refuses_non_finite_embeddings_though_they_are_not_held(tmp_path, tokenizer, calibrated):
    """Without calibration the embeddings are never loaded into the model, only copied at the end:
    they are still checked, before any layer, as the in-memory path checks a loaded model."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 1] = float("inf")
    src = _source(tmp_path, tokenizer, model)
    cfg, calib = (compress.GPTQConfig(bits=4, group_size=32), CALIB) if calibrated else (CASES["rtn-int4-g32"], None)
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight has 1 NaN/inf"):
        compress.quantize_streaming(src, cfg, tmp_path / "o", calib, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
