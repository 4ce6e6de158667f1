"""Model-free quantization (compress.quantize_model_free): a float safetensors checkpoint quantized
tensor by tensor without building the model gives, bit for bit, the checkpoint the model-based path
(load_model -> quantize(RTNConfig) -> export) writes: same tensor names, dtypes and values, same
quantization_config, same files; it reloads to the same logits; bad inputs are refused by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import compress
from compress.checkpoint import model_free
from compress.checkpoint.safetensors_io import INDEX_NAME, read_state_dict
from compress.checkpoint.streaming import ShardWriter, TensorSource
from compress.cli import main
from compress.errors import CheckpointError, ConfigError, MissingPathError, ModelLoadError
from compress.quant.fp4 import nvfp4_global_scale
from conftest import VOCAB, tiny_model
from test_families import build

pytestmark = pytest.mark.usefixtures("one_thread")

R = compress.RTNConfig
SCHEMES = {
    "int4-g32": R(bits=4, group_size=32),
    "int4-g32-asym": R(bits=4, group_size=32, symmetric=False),
    "int8": R(bits=8, group_size=None),
    "fp8": R(scheme="fp8"),
    "nvfp4a16": R(scheme="nvfp4a16"),
}
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def _source(tmp_path: Path, tokenizer, model, shard: str | None = None) -> Path:
    path = tmp_path / "src"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return path


def _model_based(src: Path, cfg, out: Path, **export_kw) -> Path:
    model, tok = compress.load_model(src)
    compress.quantize(model, cfg, progress=False)
    return compress.export(model, tok, out, **export_kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: torch.equal of these is bit equality for every dtype (float8 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _qc(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _groups(qc: dict) -> list[str]:
    """Config groups as a sorted list, without their names (numbering may follow another order)."""
    return sorted(json.dumps(g, sort_keys=True) for g in qc["config_groups"].values())


def assert_identical(a: Path, b: Path, *, group_names: bool = True) -> None:
    sa, sb = read_state_dict(a), read_state_dict(b)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), key
    qa, qb = _qc(a), _qc(b)
    if group_names:
        assert qa == qb
    else:
        assert {k: v for k, v in qa.items() if k != "config_groups"} == {k: v for k, v in qb.items()
                                                                          if k != "config_groups"}
        assert _groups(qa) == _groups(qb)
    files = lambda p: sorted(f.name for f in p.iterdir() if f.name.endswith((".safetensors", ".index.json")))  # noqa: E731
    assert files(a) == files(b)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_free_equals_the_model_based_path_bit_for_bit(arch, scheme, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model(arch))
    cfg = SCHEMES[scheme]
    out = compress.quantize_model_free(src, tmp_path / "free", cfg, progress=False)
    assert_identical(_model_based(src, cfg, tmp_path / "based"), out)
    qc = _qc(out)
    assert qc["ignore"] == ["lm_head"]          # untied (llama) or tied (qwen2, not in the file): listed alike
    raw = read_state_dict(src)
    packed = read_state_dict(out)
    down = "model.layers.0.mlp.down_proj."
    assert not any(k.startswith(down) and v.dtype == torch.float32 and v.shape == raw[down + "weight"].shape
                   for k, v in packed.items())                       # negative control: it was quantized
    assert torch.equal(packed["model.embed_tokens.weight"], raw["model.embed_tokens.weight"])
    assert torch.equal(packed["model.norm.weight"], raw["model.norm.weight"])


@pytest.mark.parametrize("scheme", ["int4-g32", "nvfp4a16"])
def test_sharded_input_and_output_equal_the_model_based_export(scheme, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"), shard="40KB")
    assert (src / INDEX_NAME).is_file() and len(list(src.glob("*.safetensors"))) > 3
    cfg = SCHEMES[scheme]
    out = compress.quantize_model_free(src, tmp_path / "free", cfg, max_shard_bytes=60_000, progress=False)
    based = _model_based(src, cfg, tmp_path / "based", max_shard_bytes=60_000)
    assert len(list(out.glob("*.safetensors"))) > 2
    assert_identical(based, out)
    index = lambda p: json.loads((p / INDEX_NAME).read_text())  # noqa: E731
    assert index(out) == index(based)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


@pytest.mark.parametrize("scheme", ["int4-g32", "fp8", "nvfp4a16"])
def test_reload_gives_the_logits_of_the_model_based_export(scheme, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    cfg = SCHEMES[scheme]
    free, _ = compress.load_model(compress.quantize_model_free(src, tmp_path / "free", cfg, progress=False))
    based, _ = compress.load_model(_model_based(src, cfg, tmp_path / "based"))
    dense, _ = compress.load_model(src)
    assert torch.equal(_logits(free), _logits(based))
    assert not torch.equal(_logits(free), _logits(dense))       # negative control: quantized for real


@pytest.mark.parametrize("family", ["opt", "gpt2", "mixtral", "gpt_neox"])
def test_other_families_conv1d_moe_and_renamed_heads(family, tmp_path, tokenizer):
    """OPT (biases, tied head), GPT-2 (Conv1D weights stored (in, out)), Mixtral (per-expert weights under
    block_sparse_moe, dense routers), GPT-NeoX (embed_out, which transformers calls lm_head)."""
    model = tiny_model("opt") if family == "opt" else build(family)
    src = _source(tmp_path, tokenizer, model)
    cfg = R(bits=4, group_size=16)
    out = compress.quantize_model_free(src, tmp_path / "free", cfg, progress=False)
    assert_identical(_model_based(src, cfg, tmp_path / "based"), out)
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.gate" in _qc(out)["ignore"]
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_packed" in read_state_dict(out)


@pytest.mark.parametrize("head", ["the embedding's values", "its own values"])
def test_a_tied_head_stored_in_the_file(head, tmp_path, tokenizer):
    """tie_word_embeddings with lm_head.weight in the file too: transformers ties them when the values
    agree (then the export stores the embedding once) and keeps both when they differ."""
    src = _source(tmp_path, tokenizer, tiny_model("qwen2"))
    state = read_state_dict(src)
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed.clone() if head == "the embedding's values" else torch.randn_like(embed)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    for ignore in (["lm_head"], []):
        cfg = R(bits=4, group_size=32, ignore=ignore)
        out = compress.quantize_model_free(src, tmp_path / f"free{len(ignore)}", cfg, progress=False)
        assert_identical(_model_based(src, cfg, tmp_path / f"based{len(ignore)}"), out)
        assert ("lm_head.weight" in read_state_dict(out)) == (head == "its own values" and bool(ignore))


def test_overrides_and_ignore_give_the_same_groups(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    cfg = R(bits=4, group_size=32, ignore=["lm_head", "*.layers.0.self_attn.o_proj"],
            overrides={"re:mlp\\.down_proj": {"bits": 8, "group_size": None},
                       "re:self_attn\\.(q|k|v)_proj": {"scheme": "nvfp4a16"}})
    out = compress.quantize_model_free(src, tmp_path / "free", cfg, progress=False)
    # Several config groups: compressed-tensors reads them by their targets, not their numbering.
    assert_identical(_model_based(src, cfg, tmp_path / "based"), out, group_names=False)
    assert len(_qc(out)["config_groups"]) == 3
    assert _qc(out)["ignore"] == ["lm_head", "model.layers.0.self_attn.o_proj"]


def test_nvfp4_siblings_share_one_global_scale(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    out = read_state_dict(compress.quantize_model_free(src, tmp_path / "free", R(scheme="nvfp4a16"), progress=False))
    raw = read_state_dict(src)
    attn = "model.layers.0.self_attn."
    scales = [out[f"{attn}{p}_proj.weight_global_scale"] for p in "qkv"]
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[1], scales[2])
    stacked = torch.cat([raw[f"{attn}{p}_proj.weight"] for p in "qkv"]).abs().amax()
    assert torch.equal(scales[0], nvfp4_global_scale(stacked))
    alone = [nvfp4_global_scale(raw[f"{attn}{p}_proj.weight"].abs().amax()) for p in "qkv"]
    assert not all(torch.equal(a, scales[0]) for a in alone)      # the sharing is what made them equal
    assert not torch.equal(out[f"{attn}o_proj.weight_global_scale"], scales[0])   # o_proj is alone


def test_each_tensor_is_read_once(tmp_path, tokenizer, monkeypatch):
    """One tensor in memory at a time, and no second pass over the checkpoint (NVFP4's fused siblings
    are read once more, for their shared global scale)."""
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    reads: list[str] = []
    get = TensorSource.get
    monkeypatch.setattr(TensorSource, "get", lambda self, name: reads.append(name) or get(self, name))
    compress.quantize_model_free(src, tmp_path / "int4", R(bits=4, group_size=32), progress=False)
    assert sorted(reads) == sorted(read_state_dict(src))
    reads.clear()
    compress.quantize_model_free(src, tmp_path / "fp4", R(scheme="nvfp4a16"), progress=False)
    twice = sorted({n for n in reads if reads.count(n) == 2})
    assert len(twice) == 2 * 5 and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
                                       for n in twice)


def test_an_architecture_transformers_does_not_know(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    known = compress.quantize_model_free(src, tmp_path / "known", R(scheme="nvfp4a16"), progress=False)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="brand_new_lm", architectures=["BrandNewForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception):
        compress.load_model(src)                  # the model-based path cannot build it
    new = compress.quantize_model_free(src, tmp_path / "new", R(scheme="nvfp4a16"), progress=False)
    a, b = read_state_dict(known), read_state_dict(new)
    assert sorted(a) == sorted(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    assert json.loads((new / "config.json").read_text())["model_type"] == "brand_new_lm"


def test_cli_model_free(tmp_path, tokenizer, capsys):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    out = tmp_path / "cli"
    assert main(["-q", "quantize", str(src), "--model-free", "--bits", "4", "--group-size", "32", "-o", str(out)]) == 0
    assert "model-free" in capsys.readouterr().out
    api = compress.quantize_model_free(src, tmp_path / "api", R(bits=4, group_size=32), progress=False)
    assert_identical(api, out)
    assert main(["-q", "quantize", str(src), "--model-free", "--method", "gptq", "-o", str(tmp_path / "x")]) == 2
    assert "Hessian of its calibration inputs" in capsys.readouterr().err
    assert main(["-q", "quantize", str(src), "--model-free", "--calib", "t.txt", "-o", str(tmp_path / "x")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- refused ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, match", [
    (compress.GPTQConfig(bits=4, group_size=32), "Hessian of its calibration inputs"),
    (R(scheme="nvfp4"), "static scale"),
    (R(scheme="fp8-static"), "static scale"),
    (R(bits=4, group_size=32, overrides={"re:down_proj": {"scheme": "w8a8-int8-static"}}), "w8a8-int8-static"),
    (compress.WandaConfig(), "needs the model"),
])
def test_schemes_that_need_data_or_the_model_are_refused(cfg, match, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    with pytest.raises(ConfigError, match=match):
        compress.quantize_model_free(src, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_pickle_gguf_missing_and_quantized_sources_are_refused(tmp_path, tokenizer):
    model = tiny_model("llama")
    pickled = tmp_path / "bin"
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*safetensors only.*save_pretrained"):
        compress.quantize_model_free(pickled, tmp_path / "out", R(), progress=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="GGUF file"):
        compress.quantize_model_free(gguf, tmp_path / "out", R(), progress=False)
    with pytest.raises(MissingPathError):
        compress.quantize_model_free(tmp_path / "nowhere", tmp_path / "out", R(), progress=False)
    src = _source(tmp_path, tokenizer, model, shard="40KB")
    done = compress.quantize_model_free(src, tmp_path / "done", R(bits=4, group_size=32), progress=False)
    with pytest.raises(CheckpointError, match="quantized already"):
        compress.quantize_model_free(done, tmp_path / "out", R(), progress=False)
    shard = sorted(src.glob("*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*incomplete"):
        compress.quantize_model_free(src, tmp_path / "out", R(), progress=False)
    assert not (tmp_path / "out").exists()


def test_shapes_the_format_cannot_hold_and_nan_weights_are_refused_by_name(tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, tiny_model("llama", intermediate_size=40))     # down_proj: 40 inputs
    with pytest.raises(ConfigError, match="in_features 40 of model.layers.0.mlp.down_proj.*ignore"):
        compress.quantize_model_free(src, tmp_path / "out", R(scheme="nvfp4a16"), progress=False)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    nan = _source(tmp_path / "nan", tokenizer, model)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight has 1 NaN"):
        compress.quantize_model_free(nan, tmp_path / "out", R(bits=4, group_size=32), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def _raw_checkpoint(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "tie_word_embeddings": False, **config}))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _llama_tensors() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_model("llama").state_dict().items()}


def test_fused_3d_experts_are_refused_and_other_weights_warned(tmp_path, caplog):
    tensors = _llama_tensors()
    fused = {**tensors, "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 32, 64)}
    src = _raw_checkpoint(tmp_path / "moe", fused)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.experts.gate_up_proj is a 3-D tensor.*ignore"):
        compress.quantize_model_free(src, tmp_path / "out", R(bits=4, group_size=32), progress=False)
    table = torch.randn(8, 64)
    src = _raw_checkpoint(tmp_path / "odd", {**tensors, "model.layers.0.mlp.lookup_table": table})
    with caplog.at_level(logging.WARNING, logger="compress"):
        out = compress.quantize_model_free(src, tmp_path / "out", R(bits=4, group_size=32), progress=False)
    warned = [r.getMessage() for r in caplog.records if "were not quantized" in r.getMessage()]
    assert warned and "model.layers.0.mlp.lookup_table" in warned[0] and "0.4%" in warned[0]
    assert torch.equal(read_state_dict(out)["model.layers.0.mlp.lookup_table"], table)


def test_a_failed_run_leaves_the_destination_as_it_was(tmp_path, tokenizer, monkeypatch):
    src = _source(tmp_path, tokenizer, tiny_model("llama"))
    out = compress.quantize_model_free(src, tmp_path / "out", R(bits=4, group_size=32), progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(CheckpointError, match="already exists"):
        compress.quantize_model_free(src, out, R(bits=8, group_size=None), progress=False)
    calls = []

    def fail_late(target, source, dtype, real=model_free._quantize):
        calls.append(target.name)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return real(target, source, dtype)

    monkeypatch.setattr(model_free, "_quantize", fail_late)
    with pytest.raises(RuntimeError, match="interrupted"):
        compress.quantize_model_free(src, out, R(bits=8, group_size=None), overwrite=True, progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]      # no temporary directory left
    with pytest.raises(ConfigError, match="lies in the checkpoint being read"):
        compress.quantize_model_free(src, src / "q", R(), progress=False)


def test_shard_writer_matches_the_safetensors_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.weight_packed": torch.randint(0, 99, (3, 2), dtype=torch.int32),
               "a.weight_shape": torch.tensor([3, 16]), "c.weight_scale": torch.randn(3, 1).to(torch.float8_e4m3fn),
               "d": torch.randint(0, 255, (7,), dtype=torch.uint8), "e": torch.randn(5).bfloat16(), "f": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = ShardWriter(tmp_path / "ours.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                         {"format": "pt"})
    for key in reversed(list(tensors)):            # any order: each tensor lands at its own offset
        writer.write(key, tensors[key])
    writer.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    source = TensorSource([tmp_path / "ours.safetensors"])
    assert all(torch.equal(_bits(source.get(k)), _bits(v)) for k, v in tensors.items())
    unfinished = ShardWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,))})
    with pytest.raises(RuntimeError, match="never written"):
        unfinished.close()
