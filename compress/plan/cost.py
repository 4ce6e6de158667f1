"""The cost model: bytes, FLOPs, memory and latency of a model whose linears each have a format.

- ``WeightFormat`` (``compress.formats``): one candidate weight format ("bf16", "int8", "int4-g64",
  "int3-g64-asym", "nvfp4a16", ...). The bytes it stores for a (out, in) linear are read off its
  packed module built on the meta device, so they are the checkpoint's bytes by construction.
- ``ModelShape``: what the cost model needs from a model: its decision units (the linears that
  read one input: q/k/v, gate/up; o_proj and down_proj alone), every other stored tensor, and the
  attention dimensions. Built from a loaded model or from a config alone (meta device), so an
  8B-parameter model is costed without its weights.
- ``checkpoint_bytes``: the exact size of the safetensors file(s) the export writes.
- ``predict``: memory and prefill / decode latency on a ``DeviceProfile`` for a batch and context.
  Each kernel's time is the roofline, max(bytes / bandwidth, FLOPs / throughput), divided by the
  profile's efficiency for that kernel family and phase, plus a launch overhead. The throughput is
  bf16's for weight-only formats and the device's FP8 / INT8 / FP4 tensor-core rate for formats
  whose activations are rounded to that where the device has it (``native_math``; W8A8, W4A8,
  NVFP4 W4A4); ``math_note`` says which, in words, for the plan's output.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import ConfigError
from ..formats import WeightFormat
from ..modeling import find_decoder_layers, fused_groups, name_matches, tied_parameter_names
from ..moe import expert_of, expert_share
from ..structure import prepare_model
from ..kv.config import KVCacheConfig, dense_bytes_per_token
from ..quant.packed import PackedLinear
from ..version import __version__

if TYPE_CHECKING:
    from .devices import DeviceProfile

# Kernel launches per decoder layer besides its linears and attention (norms, rotary, residual adds,
# activation, cache update): each costs the profile's launch overhead in decode.
OTHER_KERNELS_PER_LAYER = 8

# The order of safetensors' dtype enum: a file lays its tensors out by dtype, last in this list
# first, then by name (the offsets, and so the header's length, depend on it).
_ST_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
# safetensors dtype names and element sizes (the header spells dtypes this way).
_ST_DTYPES = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2),
              torch.int32: ("I32", 4), torch.int64: ("I64", 8), torch.uint8: ("U8", 1), torch.int8: ("I8", 1),
              torch.float8_e4m3fn: ("F8_E4M3", 1), torch.bool: ("BOOL", 1)}


@dataclasses.dataclass
class Unit:
    """Linears that read one input and take one format (vLLM fuses q/k/v and gate/up, so their
    shards must share a scheme): ``members`` are (full name, out_features, in_features, bias)."""

    name: str
    layer: int
    members: list[tuple[str, int, int, bool]]
    active: float = 1.0           # share of tokens routed through it: top_k / experts for an MoE expert

    @property
    def in_features(self) -> int:
        return self.members[0][2]

    @property
    def params(self) -> int:
        return sum(o * i for _, o, i, _ in self.members)

    def bytes(self, fmt: WeightFormat, dtype: torch.dtype) -> int:
        return sum(fmt.bytes(o, i, dtype, b) for _, o, i, b in self.members)


@dataclasses.dataclass
class ModelShape:
    """The shapes the cost model reads. ``other`` holds every stored tensor that is not a unit's
    linear weight (embeddings, norms, an untied lm_head), as {name: (dtype, shape)}."""

    units: list[Unit]
    other: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: torch.dtype
    lm_head_params: int                # the output projection's weights (tied or not), read every step
    layers_name: str = "model.layers"  # the decoder layers' ModuleList (unit members are named under it)

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units) + sum(math.prod(s) for _, s in self.other.values())


def model_shape(model: nn.Module, dtype: torch.dtype = torch.bfloat16, ignore: tuple[str, ...] = ("lm_head",)
                ) -> ModelShape:
    """The ModelShape of ``model`` (real or meta weights) stored in ``dtype``: every nn.Linear inside
    the decoder layers becomes part of a unit; tied weights count once."""
    prepare_model(model)                      # MoE experts as per-expert linears: one unit per expert projection
    layers_name, layers = find_decoder_layers(model)
    tied = tied_parameter_names(model)
    active = expert_share(model.config)
    units: list[Unit] = []
    member_names: set[str] = set()
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}."
        names = [n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, PackedLinear))
                 and not name_matches(prefix + n, ignore) and prefix + n not in tied]
        for group in fused_groups(names):
            members = []
            for n in group:
                lin = layer.get_submodule(n)
                members.append((prefix + n, lin.out_features, lin.in_features, lin.bias is not None))
                member_names.add(prefix + n)
            units.append(Unit(_unit_name(prefix, group), i, members, active if expert_of(prefix + group[0]) else 1.0))
    other = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.rpartition(".")[0] in member_names:
            continue                                  # a unit's own tensors: costed by its format
        key = (id(t),)
        if key in seen:
            continue                                  # tied: stored once
        seen.add(key)
        tdtype = dtype if t.is_floating_point() else t.dtype
        other[name] = (tdtype, tuple(t.shape))
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    lm = model.get_output_embeddings()
    return ModelShape(units, other, len(layers), cfg.hidden_size, heads,
                      getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.vocab_size, dtype,
                      lm.weight.numel() if lm is not None else cfg.vocab_size * cfg.hidden_size, layers_name)


def formats_of(model: nn.Module, shape: ModelShape) -> dict[str, WeightFormat]:
    """The format each unit of a loaded (e.g. compressed) model has now: dense ``nn.Linear`` is
    bf16, a packed layer its ``WeightFormat.of_module``. A unit is costed by its first member.
    Layers the cost model does not know (the compact 2:4 layout) are an error."""
    out = {}
    for unit in shape.units:
        m = model.get_submodule(unit.members[0][0])
        if getattr(m, "sparse_layout", False):
            raise ConfigError(f"{unit.members[0][0]} is stored in the compact 2:4 layout, which the cost model "
                              f"does not cover yet")
        try:
            out[unit.name] = WeightFormat.of_module(m)
        except ConfigError:
            raise ConfigError(f"{unit.members[0][0]} is a {type(m).__name__}, which the cost model does not "
                              f"cover") from None
    return out


def shape_from_config(config, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """A ModelShape from a transformers config alone: the model is built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model_shape(model, dtype)


def _unit_name(prefix: str, group: list[str]) -> str:
    if len(group) == 1:
        return prefix + group[0]
    parent = group[0].rpartition(".")[0]
    leaves = "+".join(n.rpartition(".")[2].removesuffix("_proj") for n in group)
    return f"{prefix}{parent}.{leaves}"


# --- checkpoint bytes ---------------------------------------------------------------------------

def specs_bytes(specs) -> int:
    """Data bytes of tensors given as (dtype, shape) pairs."""
    return sum(math.prod(s) * _ST_DTYPES[d][1] for d, s in specs)


def safetensors_file_bytes(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                           metadata: dict[str, str] | None = None) -> int:
    """Size of the .safetensors file holding ``tensors``: 8-byte header length, the JSON header
    (padded with spaces to a multiple of 8) and the data, laid out as the safetensors library does
    (by dtype, then by name)."""
    order = sorted(tensors, key=lambda k: (-_ST_ORDER.index(_ST_DTYPES[tensors[k][0]][0]), k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for k in order:
        d, s = tensors[k]
        n = math.prod(s) * _ST_DTYPES[d][1]
        header[k] = {"dtype": _ST_DTYPES[d][0], "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    length = len(text.encode()) + (-len(text.encode())) % 8
    return 8 + length + offset


def plan_tensors(shape: ModelShape, formats: dict[str, WeightFormat]) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every tensor the export of ``shape`` with ``formats`` (unit name -> format) stores."""
    out = dict(shape.other)
    for unit in shape.units:
        fmt = formats[unit.name]
        for name, o, i, b in unit.members:
            for suffix, spec in fmt.tensors(o, i, shape.dtype, b).items():
                out[f"{name}.{suffix}"] = spec
    return out


def checkpoint_bytes(shape: ModelShape, formats: dict[str, WeightFormat], metadata: dict[str, str] | None = None
                     ) -> int:
    """Bytes of the weight file our export writes for this plan (one file; exports above the
    shard size add an index and a header per shard, a few KiB)."""
    meta = {"format": "pt", "compress_version": __version__, **(metadata or {})}
    return safetensors_file_bytes(plan_tensors(shape, formats), meta)


# --- latency and memory -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    """batch sequences of ``context`` tokens: prefill processes ``context`` tokens per sequence;
    a decode step reads a KV cache of ``context`` tokens per sequence."""

    batch: int = 1
    context: int = 2048

    def __post_init__(self):
        if self.batch < 1 or self.context < 1:
            raise ConfigError(f"batch and context must be >= 1, got batch={self.batch}, context={self.context}")


def kv_bytes_per_token_layer(shape: ModelShape, kv: KVCacheConfig | None) -> float:
    """Bytes one token's keys and values take in one layer (scales included)."""
    if kv is None:
        return float(dense_bytes_per_token(shape.kv_heads, shape.head_dim, _ST_DTYPES[shape.dtype][1]))
    return kv.bytes_per_token(shape.kv_heads, shape.head_dim)


def kv_cache_bytes(shape: ModelShape, kv: KVCacheConfig | None, work: Workload) -> int:
    per_seq = work.context * kv_bytes_per_token_layer(shape, kv)
    if kv is not None and not kv.is_fp8:
        per_seq += kv.residual_bytes(shape.kv_heads, shape.head_dim)
    return int(math.ceil(work.batch * shape.layers * per_seq))


def activation_bytes(shape: ModelShape, work: Workload) -> int:
    """Peak working memory of a prefill besides weights and cache (an estimate: the widest MLP
    intermediate of one layer, a few hidden-size buffers, and the last position's logits)."""
    tokens = work.batch * work.context
    widest = max((sum(o for _, o, _, _ in u.members) for u in shape.units), default=shape.hidden)
    elem = _ST_DTYPES[shape.dtype][1]
    return tokens * (widest + 4 * shape.hidden) * elem + work.batch * shape.vocab * 4


@dataclasses.dataclass
class Prediction:
    """What a plan costs on a device. Seconds are per forward: ``decode_s`` one step of ``batch``
    new tokens, ``prefill_s`` the whole batch x context prompt."""

    device: str
    batch: int
    context: int
    weight_bytes: int
    checkpoint_bytes: int
    kv_bytes: int
    activation_bytes: int
    decode_s: float
    prefill_s: float
    decode_breakdown: dict[str, float]

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second for each sequence (one per step)."""
        return 1.0 / self.decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.context / self.prefill_s

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(memory_bytes=self.memory_bytes, decode_tokens_per_s=self.decode_tokens_per_s,
                   prefill_tokens_per_s=self.prefill_tokens_per_s)
        return out


# What the activations of a format with quantized activations are rounded to (``act_codes``), and
# the math that runs on them: the profile's ``tflops`` key and the ``native_formats`` name that say
# the device has it (FP8 and INT8 tensor cores: "fp8", "int8"; FP4 ones: "fp4" and "nvfp4").
ACT_MATH = {"fp8": ("fp8", "fp8"), "int8": ("int8", "int8"), "nvfp4": ("fp4", "nvfp4")}
_ACT_NAMES = {"fp8": "FP8", "int8": "INT8", "nvfp4": "FP4 (NVFP4)"}


def dense_rate(profile: DeviceProfile) -> float:
    """FLOP/s of the bf16 math weight-only formats dequantize to (fp32 where bf16 is absent)."""
    return (profile.tflops.get("bf16") or profile.tflops.get("fp32")) * 1e12


def native_math(profile: DeviceProfile, fmt: WeightFormat) -> str | None:
    """The ``tflops`` key of the low-precision math a linear in ``fmt`` runs on ``profile``: its
    activations' codes (``fmt.act_codes``: W8A8 and W4A8 "fp8" / "int8", NVFP4 W4A4 "fp4") where
    the device has that tensor-core math (in ``native_formats`` and ``tflops``); None when the
    matmul runs in bf16: weight-only formats, and activation-quantized ones on a device without
    their math (they are then costed at their weight-only twin's speed, see ``math_note``)."""
    codes = fmt.act_codes
    if codes is None:
        return None
    key, native = ACT_MATH[codes]
    return key if native in profile.native_formats and key in profile.tflops else None


def _throughput(profile: DeviceProfile, fmt: WeightFormat) -> float:
    """FLOP/s of the math a linear in ``fmt`` runs: FP4 for NVFP4 W4A4, FP8 or INT8 for W8A8 and
    W4A8 on devices that have it, bf16 otherwise (weight-only formats are dequantized to bf16
    inside our kernels)."""
    key = native_math(profile, fmt)
    return profile.tflops[key] * 1e12 if key is not None else dense_rate(profile)


def missing_math(profile: DeviceProfile, fmt: WeightFormat) -> str | None:
    """Why ``profile`` cannot run the low-precision math ``fmt``'s activations need, in words
    ("a100 has no FP8 tensor cores (no tflops.fp8, no fp8 in native_formats)"); None when it can
    or when ``fmt`` is weight-only."""
    codes = fmt.act_codes
    if codes is None or native_math(profile, fmt) is not None:
        return None
    key, native = ACT_MATH[codes]
    detail = [f"no tflops.{key}"] if key not in profile.tflops else []
    detail += [f"no {native} in native_formats"] if native not in profile.native_formats else []
    return f"{profile.name} has no {_ACT_NAMES[codes]} tensor cores ({', '.join(detail)})"


def math_note(profile: DeviceProfile, fmt: WeightFormat) -> str | None:
    """How the cost model runs a format with quantized activations on ``profile``, in words (None
    for weight-only formats): the tensor-core rate its prefill gets, or why it gets bf16's."""
    codes = fmt.act_codes
    if codes is None:
        return None
    missing = missing_math(profile, fmt)
    if missing is None:
        key = ACT_MATH[codes][0]
        unit = "TOPS" if key == "int8" else "TFLOPS"
        rate = f"the {_ACT_NAMES[codes]} tensor-core rate, {profile.tflops[key]:g} {unit}"
        if fmt.w8a8:
            return f"prefill at {rate} (a vendor GEMM); decode reads 8-bit weights"
        return (f"decode reads {weight_only_twin(fmt).name}'s weights (memory-bound, as W4A16); prefill at {rate}, "
                f"as a serving engine's {'W4A8' if fmt.w4a8 else 'NVFP4'} kernel runs it (compress's own runtime "
                f"rounds the activations and multiplies in bf16)")
    if fmt.w8a8:
        if has_kernel(profile, fmt):
            return f"{missing}: costed at the bf16 rate"
        return f"{missing}: costed on the reference path (dequantized to bf16, then a bf16 matmul)"
    return (f"{missing}: costed at {weight_only_twin(fmt).name}'s weight-only speed (bf16 math); the "
            f"activations are still rounded, which its sensitivity counts")


def weight_only_twin(fmt: WeightFormat) -> WeightFormat:
    """The weight-only format storing the same weights as ``fmt`` (int4-g128 for w4a8-int8-g128,
    nvfp4a16 for nvfp4; ``fmt`` itself when weight-only). W8A8 formats have none."""
    if fmt.w4a8:
        return dataclasses.replace(fmt, act_quant=False, act_strategy=None, act_dtype=None)
    if fmt.kind == "nvfp4" and fmt.act_quant:
        return dataclasses.replace(fmt, act_quant=False)
    return fmt


def kernel_seconds(profile: DeviceProfile, phase: str, family: str, nbytes: float, flops: float,
                   math_rate: float | None = None, launches: int = 1) -> float:
    """Roofline time of a kernel divided by the profile's efficiency, plus its launches.
    ``math_rate``: FLOP/s of its math (default bf16, or fp32 where bf16 is absent)."""
    eff = efficiency(profile.efficiency[phase], family)
    if math_rate is None:
        math_rate = dense_rate(profile)
    return (max(nbytes / (profile.bandwidth_gbs * 1e9), flops / math_rate) / eff
            + launches * profile.overhead_us * 1e-6)


# Kernel families a profile's efficiency table may lack, and the entry they read instead: the W8A8
# GEMMs (torch._scaled_mm, torch._int_mm) are vendor GEMMs like bf16's, not our dequantizing kernels.
# W4A8 has no entry: its family is "int" (``WeightFormat.family``), as its kernels are mixed-input
# ones that unpack int4 weights in registers like ours, in decode and in prefill, whatever math
# (bf16, or INT8 / FP8 where native) they then run.
EFFICIENCY_FALLBACK = {"fp8": "bf16", "int8": "bf16"}


def efficiency(table: dict[str, float], family: str) -> float:
    """``table[family]``, or its EFFICIENCY_FALLBACK entry where the profile has none (the shipped
    profiles list bf16, int, fp4, sparse24 and attention)."""
    return table[family] if family in table else table[EFFICIENCY_FALLBACK.get(family, "bf16")]


def efficiency_family(table: dict[str, float], family: str) -> str:
    """The key of ``table`` that ``efficiency`` reads for ``family`` (what a calibration refits)."""
    return family if family in table else EFFICIENCY_FALLBACK.get(family, "bf16")


def kernel_key(fmt: WeightFormat) -> str:
    """The name ``DeviceProfile.kernel_formats`` lists for the kernel that runs ``fmt``."""
    if fmt.kind == "int":
        return f"int{fmt.bits}"
    return "bf16" if fmt.dense else fmt.kind                    # nvfp4a16 and nvfp4 run one weight kernel


def has_kernel(profile: DeviceProfile, fmt: WeightFormat) -> bool:
    """Whether ``fmt`` runs a fused kernel on ``profile`` (else the reference path: dequantize the
    whole weight to bf16, then a dense matmul). W8A8 runs the native FP8 / INT8 GEMM where the
    device has that math."""
    if fmt.w8a8:
        return fmt.family in profile.native_formats
    return fmt.dense or kernel_key(fmt) in profile.kernel_formats


def linear_seconds(profile: DeviceProfile, phase: str, fmt: WeightFormat, out_f: int, in_f: int, tokens: int,
                   dtype: torch.dtype) -> float:
    elem = _ST_DTYPES[dtype][1]
    nbytes = fmt.bytes(out_f, in_f, dtype) + tokens * (in_f + out_f) * elem
    flops = 2.0 * tokens * in_f * out_f
    launches = 1
    family = fmt.family              # that family's efficiency: how well its path (kernel or reference) runs
    if not has_kernel(profile, fmt):
        # reference path: the dequantized weight is written and read back, in two launches
        nbytes += 2 * out_f * in_f * elem
        launches = 2
    return kernel_seconds(profile, phase, family, nbytes, flops, _throughput(profile, fmt), launches)


def unit_seconds(profile: DeviceProfile, shape: ModelShape, unit: Unit, fmt: WeightFormat, work: Workload,
                 phase: str) -> float:
    tokens = work.batch if phase == "decode" else work.batch * work.context
    if unit.active >= 1:
        return sum(linear_seconds(profile, phase, fmt, o, i, tokens, shape.dtype) for _, o, i, _ in unit.members)
    # An expert runs only when a token is routed to it: with probability ``hit`` in a step, then on
    # the tokens routed to it (its expected share, given that it runs).
    hit = 1 - (1 - unit.active) ** tokens
    routed = max(1, round(tokens * unit.active / hit))
    return hit * sum(linear_seconds(profile, phase, fmt, o, i, routed, shape.dtype) for _, o, i, _ in unit.members)


def fixed_seconds(profile: DeviceProfile, shape: ModelShape, kv: KVCacheConfig | None, work: Workload,
                  phase: str) -> dict[str, float]:
    """What does not depend on the weight formats: attention over the cache, the output
    projection, and the other small kernels of every layer."""
    elem = _ST_DTYPES[shape.dtype][1]
    overhead = profile.overhead_us * 1e-6
    if phase == "decode":
        kv_read = kv_cache_bytes(shape, kv, work) / shape.layers
        flops = 4.0 * work.batch * work.context * shape.heads * shape.head_dim
        attention = kernel_seconds(profile, phase, "attention", kv_read, flops)
        lm_tokens = work.batch
    else:
        tokens = work.batch * work.context
        qkvo = tokens * (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim * elem
        flops = 2.0 * work.batch * work.context ** 2 * shape.heads * shape.head_dim   # causal: half of 4*T^2
        attention = kernel_seconds(profile, phase, "attention", qkvo, flops)
        lm_tokens = work.batch                                                       # logits of the last position
    lm_bytes = shape.lm_head_params * elem + lm_tokens * (shape.hidden + shape.vocab) * elem
    lm_head = kernel_seconds(profile, phase, "bf16", lm_bytes, 2.0 * lm_tokens * shape.lm_head_params)
    return {"attention": attention * shape.layers, "lm_head": lm_head,
            "other kernels": OTHER_KERNELS_PER_LAYER * shape.layers * overhead}


def predict(shape: ModelShape, formats: dict[str, WeightFormat], profile: DeviceProfile, work: Workload,
            kv: KVCacheConfig | None = None) -> Prediction:
    """Memory and latency of ``shape`` with ``formats`` (unit name -> WeightFormat) on ``profile``."""
    missing = [u.name for u in shape.units if u.name not in formats]
    if missing:
        raise ConfigError(f"no weight format for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    weights = specs_bytes(plan_tensors(shape, formats).values())
    breakdown = {"linears": sum(unit_seconds(profile, shape, u, formats[u.name], work, "decode")
                                for u in shape.units)}
    breakdown.update(fixed_seconds(profile, shape, kv, work, "decode"))
    prefill = sum(unit_seconds(profile, shape, u, formats[u.name], work, "prefill") for u in shape.units)
    prefill += sum(fixed_seconds(profile, shape, kv, work, "prefill").values())
    return Prediction(profile.name, work.batch, work.context, weights, checkpoint_bytes(shape, formats),
                      kv_cache_bytes(shape, kv, work), activation_bytes(shape, work),
                      sum(breakdown.values()), prefill, breakdown)
