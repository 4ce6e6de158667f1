"""GGUF export: our integer-quantized Llama models in llama.cpp's own block formats (docs/gguf.md).

ggml's 32-weight blocks (ggml-common.h; ``gguf.quants`` is the Python reference):

| type | bytes | layout | value |
|---|---|---|---|
| Q4_0 | 18 | fp16 ``d``, 16 bytes: byte j = q[j] (low nibble) pair q[j+16] (high) | ``(q - 8) * d`` |
| Q4_1 | 20 | fp16 ``d``, fp16 ``m``, the same 16 bytes | ``q * d + m`` |
| Q8_0 | 34 | fp16 ``d``, 32 int8 | ``x * d`` |

Our grid is ``W = (c - zp) * s`` per group (``quant/grid.py``), codes ``c`` signed in
``[-2^(b-1), 2^(b-1) - 1]``. So, with ``d = s``:

- int2..4 symmetric -> Q4_0, ``q = c + 8`` (int4 levels -8..7 are Q4_0's 0..15);
- int2..4 asymmetric -> Q4_1, ``q = c + 2^(b-1)``, ``m = -(zp + 2^(b-1)) * s``;
- int5..8 symmetric and int5..7 asymmetric -> Q8_0, ``x = c - zp`` (fits int8 up to 7 bits).

A group of 64, 128 or a whole row (channel) is a run of 32-blocks sharing one scale, so any
group size that is a multiple of 32 maps exactly too (the file then stores the scale per 32
weights, as llama.cpp's Q4_0 does). Group sizes that are not a multiple of 32 (16, 48),
int8 asymmetric, act-order with a group index, FP4 and W8A8 layers have no exact block type:
refused, or with ``allow_requant`` dequantized and re-rounded by gguf's reference quantizer (what
``llama-quantize`` does) with the error logged. K-quants (Q4_K, Q6_K: 256-weight super-blocks with
6-bit sub-scales of a fp16 super-scale) are not written: our per-group float scales are not
6-bit multiples of one super-scale, so they cannot hold our grid exactly.

Exactness: ``d`` and ``m`` are fp16. Scales of an fp16 or bf16 model are exact in fp16 (bf16 values
in fp16's normal range are); float32 scales are rounded to fp16 (relative error <= 2^-11, the same
rounding llama.cpp's quantizer applies to its own scales), and ``m`` of Q4_1 is rounded to fp16
too. The export measures the largest difference between each GGUF tensor (decoded by
``gguf.quants.dequantize``) and our dequantized weight, and reports it.

Tensors we did not quantize follow llama.cpp's default choice for a Q4_0/Q4_1 file, so sizes
compare fairly: norms F32; the output head (or the tied embedding) Q8_0 (llama.cpp picks Q6_K when
the row length is a multiple of 256, else Q8_0; gguf-py cannot write Q6_K); an untied token
embedding in the file's main type; dense linears F32 (exact).

Llama's q/k rows are permuted as llama.cpp's converter does (``LlamaModel.permute`` in
convert_hf_to_gguf: ggml's rotary embedding pairs adjacent dims, transformers' halves). Groups run
along the input dim, so permuting rows of a quantized weight is exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from hashlib import sha256
from pathlib import Path

import numpy as np
import gguf
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels.packing import unpack_int32
from ..quant.linear import QuantLinear
from ..quant.packed import PackedLinear
from ..quant.w8a8_linear import W8A8Linear
from .transforms import input_transforms

log = logging.getLogger(__name__)

BLOCK = 32                                   # weights per Q4_0 / Q4_1 / Q8_0 block
ARCHITECTURES = ("llama",)                   # model_type values we export (gguf arch "llama")
EMBEDDING_TYPES = ("auto", "f32", "f16", "q8_0", "q4_0")
# tokenizer.ggml.pre: llama.cpp picks its pre-tokenizer regex by this name. convert_hf_to_gguf finds
# it by hashing the token ids of CHECK_TEXT (get_vocab_base_pre); the hashes of a few common BPE
# tokenizers, from llama.cpp's conversion/base.py (vendored in llama-cpp-python 0.3.36).
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
_LLAMA_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
_LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf():
    return gguf                                       # a dependency of compress (it reads the example model)


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of the file: its GGUF name, ggml type, data (uint8 blocks or float rows) and how
    far its decoded values are from our weights (0.0: exact)."""
    name: str
    ggml_type: str
    data: np.ndarray
    source: str
    max_abs_error: float = 0.0
    requantized: bool = False


@dataclasses.dataclass
class GGUFReport:
    path: Path
    tensors: list[GGUFTensor]
    file_bytes: int

    @property
    def exact(self) -> bool:
        """Every quantized linear decodes to exactly our weights."""
        return all(t.max_abs_error == 0 for t in self.quantized)

    @property
    def quantized(self) -> list[GGUFTensor]:
        return [t for t in self.tensors if t.source == "quantized"]

    def summary(self) -> dict:
        types: dict[str, int] = {}
        for t in self.tensors:
            types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
        q = self.quantized
        return {"path": str(self.path), "file_bytes": self.file_bytes, "types": types, "exact": self.exact,
                "quantized_tensors": len(q), "inexact_tensors": sum(t.max_abs_error > 0 for t in q),
                "max_abs_error": max((t.max_abs_error for t in q), default=0.0),
                "requantized": [t.name for t in self.tensors if t.requantized]}


# ----------------------------------------------------------------------------- blocks (pure functions)

def _fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` (float32) rounded to fp16, refusing values outside fp16's range."""
    big = x.abs().max() if x.numel() else torch.tensor(0.0)
    if float(big) > 65504:
        raise CheckpointError(f"{what}: a scale of {float(big):.4g} exceeds fp16's range (65504), which ggml's "
                              f"block scales are stored in; this weight cannot be written as GGUF")
    return x.to(torch.float16)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 32) codes 0..15 -> (rows, blocks, 16) bytes: element j low, j+16 high nibble."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) fp16 -> (rows, blocks, 2) little-endian bytes."""
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def ggml_type_for(bits: int, symmetric: bool, group_size: int | None, in_features: int) -> tuple[str | None, str]:
    """(the ggml type holding this integer grid exactly, or None; why not)."""
    g = in_features if group_size is None else group_size
    if in_features % BLOCK:
        return None, f"in_features {in_features} is not a multiple of ggml's block of {BLOCK}"
    if g % BLOCK:
        return None, (f"group_size {group_size} is not a multiple of {BLOCK}: a ggml block holds one scale per "
                      f"{BLOCK} weights, and a block would straddle two of our scales")
    if bits <= 4:
        return ("Q4_0" if symmetric else "Q4_1"), ""
    if symmetric or bits <= 7:
        return "Q8_0", ""
    return None, "int8 asymmetric: (code - zero point) spans -255..255, which Q8_0's int8 cannot hold"


def int_blocks(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int,
               group_size: int | None, ggml_type: str, what: str = "weight") -> np.ndarray:
    """ggml blocks (rows, in/32 * block bytes) of the integer weight ``(codes - zp) * scale``.

    codes: int (rows, in) signed; scale: (rows, groups); zp: (rows, groups) or None (symmetric)."""
    rows, cols = codes.shape
    g = cols if group_size is None else group_size
    group_of = torch.arange(cols // BLOCK) * BLOCK // g       # our group of each ggml block (a partial last one too)
    c = codes.to(torch.int32).reshape(rows, cols // BLOCK, BLOCK)            # (rows, nb, 32)
    d = _fp16(scale.float(), what)[:, group_of]                              # (rows, nb)
    z = torch.zeros_like(d, dtype=torch.int32) if zp is None else zp.round().to(torch.int32)[:, group_of]
    half = 1 << (bits - 1)
    if ggml_type == "Q4_0":
        parts = [_f16_bytes(d), _nibbles(c + 8)]
    elif ggml_type == "Q4_1":
        m = _fp16(-(z + half).float() * d.float(), what)                     # value = q*d + m, q = c + half
        parts = [_f16_bytes(d), _f16_bytes(m), _nibbles(c + half)]
    elif ggml_type == "Q8_0":
        parts = [_f16_bytes(d), (c - z.unsqueeze(-1)).to(torch.int8).view(torch.uint8)]
    else:
        raise ValueError(f"no exact block layout for {ggml_type}")
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()


def llama_permute(x: np.ndarray | torch.Tensor, n_head: int):
    """convert_hf_to_gguf's ``LlamaModel.permute`` of q/k rows (pass n_kv_head for k)."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# ----------------------------------------------------------------------------- per-module tensors

def _decode(gguf, data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    if ggml_type in ("F32", "F16"):
        return data.astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type]).reshape(shape)


def _float_tensor(gguf, name: str, w: torch.Tensor, ggml_type: str, source: str) -> GGUFTensor:
    w32 = w.detach().float().cpu()
    if ggml_type == "F32":
        return GGUFTensor(name, "F32", w32.numpy(), source)
    if ggml_type == "F16":
        data = w32.to(torch.float16).numpy()
    else:
        data = gguf.quants.quantize(w32.numpy(), gguf.GGMLQuantizationType[ggml_type])
    err = float(np.abs(_decode(gguf, data, ggml_type, tuple(w32.shape)) - w32.numpy()).max())
    return GGUFTensor(name, ggml_type, data, source, err)


def _linear_tensor(gguf, name: str, module_name: str, module: nn.Module, permute: int | None,
                   allow_requant: bool) -> GGUFTensor:
    if isinstance(module, QuantLinear):
        return _quant_tensor(gguf, name, module_name, module, permute, allow_requant)
    if isinstance(module, PackedLinear):
        target = "Q8_0" if isinstance(module, W8A8Linear) else "Q4_0"
        why = (f"{module_name} is {module.label} ({type(module).__name__}), which no ggml block type holds exactly "
               f"(ggml's MXFP4 and NVFP4 types are not written by this export)")
        return _requant(gguf, name, module_name, module.dequantize(torch.float32), target, why, permute, allow_requant)
    w = module.weight.detach().float()
    w = llama_permute(w, permute) if permute else w
    return _float_tensor(gguf, name, w, "F32", "dense")


def _quant_tensor(gguf, name: str, module_name: str, m: QuantLinear, permute: int | None,
                  allow_requant: bool) -> GGUFTensor:
    truth = m.dequantize(torch.float32)                                      # (out, in), exact in float32
    ggml_type, why = ggml_type_for(m.bits, m.symmetric, m.group_size, m.in_features)
    if m.weight_g_idx is not None and m.group_size:
        natural = torch.arange(m.in_features, device=m.weight_g_idx.device) // m.group_size
        if not torch.equal(m.weight_g_idx.long(), natural):
            ggml_type, why = None, "act-order with a group index (weight_g_idx): its groups are not contiguous"
    if ggml_type is None:
        target = "Q4_0" if m.bits <= 4 else "Q8_0"
        if m.bits <= 4 and not m.symmetric:
            target = "Q4_1"
        return _requant(gguf, name, module_name, truth, target, f"{module_name} ({m.label}, "
                        f"{'sym' if m.symmetric else 'asym'}): {why}", permute, allow_requant)
    codes = unpack_int32(m.weight_packed, m.bits, m.in_features).cpu()
    zp = None if m.symmetric else unpack_int32(m.weight_zero_point, m.bits, m.out_features, dim=0).cpu()
    data = int_blocks(codes, m.weight_scale.detach().cpu(), zp, m.bits, m.group_size, ggml_type, module_name)
    if permute:
        data, truth = llama_permute(data, permute), llama_permute(truth, permute)
    decoded = _decode(gguf, data, ggml_type, tuple(truth.shape))
    err = float(np.abs(decoded - truth.cpu().numpy()).max())
    return GGUFTensor(name, ggml_type, np.ascontiguousarray(data), "quantized", err)


def _requant(gguf, name: str, module_name: str, w: torch.Tensor, target: str, why: str, permute: int | None,
             allow_requant: bool) -> GGUFTensor:
    if not allow_requant:
        raise CheckpointError(f"{why}. Re-quantize with a format llama.cpp holds exactly (int4 or int8 with a "
                              f"group_size that is a multiple of {BLOCK}, e.g. --group-size 32), or pass "
                              f"allow_requant=True (--allow-requant) to round the dequantized weights again with "
                              f"llama.cpp's {target} quantizer (adds error, logged per tensor)")
    if w.shape[1] % BLOCK:
        target = "F32"
    w = llama_permute(w.float().cpu(), permute) if permute else w.float().cpu()
    t = _float_tensor(gguf, name, w, target, "quantized")
    t.requantized = True
    rms = float(np.sqrt(((_decode(gguf, t.data, target, tuple(w.shape)) - w.numpy()) ** 2).mean()))
    log.warning("%s: %s; re-rounded to %s: max |error| %.3g, rms error %.3g (rms weight %.3g)", module_name,
                why, target, t.max_abs_error, rms, float(w.pow(2).mean().sqrt()))
    return t


# ----------------------------------------------------------------------------- model and metadata

def check_supported(model: nn.Module) -> None:
    """Refuse what this export cannot express, before any work."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"GGUF export supports model_type {', '.join(ARCHITECTURES)}; this model is "
                              f"{model_type!r}. Export it with compress.export (compressed-tensors) instead")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise CheckpointError("GGUF export: this Llama has attention or MLP biases (attention_bias / mlp_bias), "
                              "which the export does not write")
    rope = _rope(cfg)
    if rope.get("rope_type", "default") not in ("default", None):
        raise CheckpointError(f"GGUF export: rope_type {rope.get('rope_type')!r} (rope scaling) is not written; "
                              f"only plain RoPE (rope_type 'default') is supported")
    if input_transforms(model):
        raise CheckpointError(f"{next(iter(input_transforms(model)))} has an online Hadamard transform, which "
                              f"llama.cpp does not apply; export a model quantized without online rotations")
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    if wrapped:
        raise CheckpointError(f"{wrapped[0]} holds a LoRA adapter; merge it (or export with compress.export, "
                              f"which writes a PEFT adapter) before writing GGUF")


def _rope(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return {"rope_theta": float(theta), "rope_type": params.get("rope_type") or scaling.get("rope_type")
            or scaling.get("type") or "default"}


def _main_type(tensors: list[GGUFTensor]) -> str:
    counts: dict[str, int] = {}
    for t in tensors:
        if t.source == "quantized":
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.data.size
    return max(counts, key=counts.get) if counts else "F32"


def model_tensors(model: nn.Module, *, allow_requant: bool = False, embedding_type: str = "auto") -> list[GGUFTensor]:
    """Every tensor of the GGUF file for a Llama model, in llama.cpp's names and layouts."""
    gguf = _gguf()
    if embedding_type not in EMBEDDING_TYPES:
        raise ConfigError(f"embedding_type must be one of {', '.join(EMBEDDING_TYPES)}; got {embedding_type!r}")
    check_supported(model)
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out: list[GGUFTensor] = []
    for i, layer in enumerate(base.layers):
        for local, short in _LLAMA_LINEARS.items():
            permute = n_head if short == "attn_q" else n_kv if short == "attn_k" else None
            out.append(_linear_tensor(gguf, f"blk.{i}.{short}.weight", f"model.layers.{i}.{local}",
                                      layer.get_submodule(local), permute, allow_requant))
        for local, short in _LLAMA_NORMS.items():
            out.append(_float_tensor(gguf, f"blk.{i}.{short}.weight", getattr(layer, local).weight, "F32", "norm"))
    out.append(_float_tensor(gguf, "output_norm.weight", base.norm.weight, "F32", "norm"))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is None or (not isinstance(head, PackedLinear) and head.weight is embed.weight)
    main = _main_type(out)
    if embedding_type != "auto":
        embd_type = head_type = embedding_type.upper()
    else:
        # llama.cpp (llama-quant.cpp): the output tensor, and the token embedding when tied, get Q6_K,
        # or Q8_0 when the row is not a multiple of 256; an untied embedding gets the file's type.
        # gguf-py cannot write Q6_K: Q8_0 here (the same as llama.cpp when hidden % 256 != 0).
        head_type = "Q8_0"
        embd_type = head_type if tied else (main if main in ("Q4_0", "Q4_1", "Q8_0") else "Q8_0")
    out.insert(0, _float_tensor(gguf, "token_embd.weight", embed.weight, embd_type, "embedding"))
    if not tied:
        if isinstance(head, (QuantLinear, PackedLinear)):
            out.append(_linear_tensor(gguf, "output.weight", "lm_head", head, None, allow_requant))
        else:
            out.append(_float_tensor(gguf, "output.weight", head.weight, head_type, "embedding"))
    return out


def _file_type(gguf, main: str) -> int:
    return {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[main]


def _add_hparams(gguf, w, cfg, main: str, name: str) -> None:
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_name(name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    w.add_rope_freq_base(_rope(cfg)["rope_theta"])
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != cfg.hidden_size:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_file_type(_file_type(gguf, main))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, found as convert_hf_to_gguf finds it."""
    ids = tokenizer.encode(CHECK_TEXT)
    return KNOWN_PRE.get(sha256(str(ids).encode()).hexdigest())


def _add_tokenizer(gguf, w, tokenizer, vocab_size: int, pre: str | None) -> None:
    """The BPE ("gpt2") vocabulary as convert_hf_to_gguf's get_vocab_base + SpecialVocab write it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise CheckpointError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model); this "
                              f"tokenizer is {type(tokenizer).__name__} with model "
                              f"{spec.get('model', {}).get('type')!r}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                              f"{vocab_size}; pass the model's own tokenizer")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    if pre is None:
        pre = pre_tokenizer_name(tokenizer)
        if pre is None:
            log.warning("GGUF export: llama.cpp does not know this tokenizer's pre-tokenizer (hash of the check "
                        "text unknown); writing 'default'. Text llama.cpp tokenizes itself may split differently; "
                        "pass pre_tokenizer= (--pre-tokenizer) with llama.cpp's name if you know it")
            pre = "default"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:          # SpecialVocab reads merges, special ids, template
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    bos = tokenizer.bos_token_id
    # Whether llama.cpp prepends BOS to text it tokenizes: as our tokenizer does (SmolLM2: no).
    if gguf.Keys.Tokenizer.ADD_BOS not in w.kv_data[0]:                    # SpecialVocab may have set it
        w.add_add_bos_token(bool(bos is not None and tokenizer.encode("a")[:1] == [bos]))


def export_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, *, allow_requant: bool = False,
                overwrite: bool = False, embedding_type: str = "auto", pre_tokenizer: str | None = None,
                name: str | None = None) -> GGUFReport:
    """Write ``model`` (a Llama, quantized or not) and ``tokenizer`` as one GGUF file llama.cpp loads.

    Our integer layers become Q4_0 / Q4_1 / Q8_0 blocks holding exactly our grid (see the module
    docstring); layers no ggml type holds are refused unless ``allow_requant``. Returns a report with
    each tensor's type and largest decoding error against our weights."""
    gguf = _gguf()
    path = Path(path).expanduser().resolve()
    if path.exists() and (path.is_dir() or not overwrite):
        raise CheckpointError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it, or choose "
                              f"another file name" if not path.is_dir() else f"{path} is a directory; give a file "
                              f"name such as {path / 'model.gguf'}")
    if tokenizer is None:
        raise CheckpointError("GGUF export needs the tokenizer: llama.cpp reads the vocabulary from the file")
    tensors = model_tensors(model, allow_requant=allow_requant, embedding_type=embedding_type)
    main = _main_type(tensors)
    inexact = [t for t in tensors if t.source == "quantized" and t.max_abs_error > 0 and not t.requantized]
    if inexact:
        worst = max(inexact, key=lambda t: t.max_abs_error)
        log.warning("GGUF export: %d of %d quantized tensors differ from our weights after fp16 rounding of their "
                    "block scales d (float32 scales) or Q4_1 minimums m = -(zp + 8) * d (largest |error| %.3g in %s); "
                    "symmetric formats of an fp16/bf16 model are exact",
                    len(inexact), len([t for t in tensors if t.source == "quantized"]), worst.max_abs_error, worst.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        source = Path(getattr(model.config, "_name_or_path", "") or "model")
        _add_hparams(gguf, w, model.config, main, name or source.stem or source.name)
        _add_tokenizer(gguf, w, tokenizer, int(model.config.vocab_size), pre_tokenizer)
        for t in tensors:
            if t.ggml_type in ("F32", "F16"):
                w.add_tensor(t.name, t.data)
            else:
                w.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)                         # all or nothing, as compress.export
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    report = GGUFReport(path, tensors, path.stat().st_size)
    log.info("wrote %s: %s", path, report.summary())
    return report


# ----------------------------------------------------------------------------- command line

def add_export_parser(sub) -> None:
    """``compress export SOURCE --format gguf -o FILE``."""
    e = sub.add_parser("export", help="write a (compressed) model in another runtime's format: GGUF for llama.cpp",
                       description="Write a model (a compress checkpoint directory, or any model compress loads) "
                                   "as a GGUF file for llama.cpp. Integer layers are written exactly as Q4_0 "
                                   "(int<=4 symmetric), Q4_1 (int<=4 asymmetric) or Q8_0 (int5-8) blocks when "
                                   "their group size is a multiple of 32. See docs/gguf.md.")
    e.add_argument("source", help="checkpoint directory written by compress, .gguf file, package:PKG/FILE or hub id")
    e.add_argument("--format", choices=["gguf"], default="gguf", help="output format (default gguf)")
    e.add_argument("--output", "-o", required=True, help="the .gguf file to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing file")
    e.add_argument("--allow-requant", action="store_true",
                   help="re-round layers no ggml block type holds exactly (group size not a multiple of 32, "
                        "FP4, W8A8) with llama.cpp's reference quantizer instead of refusing; the error is logged")
    e.add_argument("--embedding-type", choices=EMBEDDING_TYPES, default="auto",
                   help="type of the token embedding and an unquantized output head (auto: llama.cpp's defaults)")
    e.add_argument("--pre-tokenizer", default=None,
                   help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre; default: detected as convert_hf_to_gguf does)")
    e.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's)")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
