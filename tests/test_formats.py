"""WeightFormat: spellings, configs, shapes, solver grids and packed modules, compressed-tensors
arguments and bytes, each checked against the code that uses it."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import compress
from compress.checkpoint.compressed_tensors import config_group, parse_config, quantization_config
from compress.errors import CheckpointError, ConfigError
from compress.formats import SPELLINGS, WeightFormat, register_kind
from compress.pruning.config import SparseGPTConfig
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.formats import FP4Format, FP8Format, IntFormat
from compress.quant.fp4 import nvfp4_global_scale
from compress.quant.fp4_linear import FP4Linear
from compress.quant.linear import QuantLinear
from compress.quant.rtn import rtn_solve
from conftest import tiny_model

# (spelling, kind, bits, group_size, symmetric, act_quant, partial_groups): every canonical spelling.
CANONICAL = [
    ("bf16", "dense", 16, None, True, False, False),
    ("int8", "int", 8, None, True, False, False),
    ("int4", "int", 4, None, True, False, False),
    ("int2-g32", "int", 2, 32, True, False, False),
    ("int4-g128", "int", 4, 128, True, False, False),
    ("int3-g64-asym", "int", 3, 64, False, False, False),
    ("int4-asym", "int", 4, None, False, False, False),
    ("int4-g128-partial", "int", 4, 128, True, False, True),
    ("int5-g128-asym-partial", "int", 5, 128, False, False, True),
    ("nvfp4a16", "nvfp4", 4, 16, True, False, False),
    ("nvfp4", "nvfp4", 4, 16, True, True, False),
    ("mxfp4", "mxfp4", 4, 32, True, False, False),
    ("fp8", "fp8", 8, None, True, True, False),
    ("fp8-block", "fp8", 8, 128, True, True, False),
    ("fp8-static", "fp8", 8, None, True, True, False),
    ("w8a8-int8", "int", 8, None, True, True, False),
    ("w8a8-int8-static", "int", 8, None, True, True, False),
]
# The W8A8 rows: (spelling, weight_strategy, act_strategy).
W8A8 = [("fp8", "channel", "token"), ("fp8-block", "block", "group"), ("fp8-static", "tensor", "tensor"),
        ("w8a8-int8", None, "token"), ("w8a8-int8-static", None, "tensor")]
# Other spellings that read as a canonical one.
ALIASES = [("dense", "bf16"), ("FP16", "bf16"), ("float", "bf16"), (" INT4-G64 ", "int4-g64"),
           ("uint4-g64", "int4-g64-asym"), ("uint8", "int8-asym"), ("uint4-g64-asym", "int4-g64-asym"),
           ("NVFP4A16", "nvfp4a16"), ("FP8-Block", "fp8-block"), (" W8A8-INT8 ", "w8a8-int8")]
QUANTIZED = [c[0] for c in CANONICAL if c[0] != "bf16"]
# Formats whose compressed-tensors arguments round-trip (compressed-tensors records no partial groups).
CT_FORMATS = [s for s in QUANTIZED if not s.endswith("-partial")]


@pytest.mark.parametrize("spelling,kind,bits,group,sym,act,partial", CANONICAL, ids=[c[0] for c in CANONICAL])
def test_every_spelling_parses_to_its_fields_and_prints_back(spelling, kind, bits, group, sym, act, partial):
    fmt = WeightFormat.parse(spelling)
    assert (fmt.kind, fmt.bits, fmt.group_size, fmt.symmetric, fmt.act_quant, fmt.partial_groups) == \
        (kind, bits, group, sym, act, partial)
    assert str(fmt) == fmt.name == spelling
    assert WeightFormat.parse(str(fmt)) == fmt
    assert eval(repr(fmt), {"WeightFormat": WeightFormat}) == fmt
    assert hash(fmt) == hash(WeightFormat(**dataclasses.asdict(fmt)))      # a value: hashable, rebuilt from JSON
    assert (fmt.weight_strategy, fmt.act_strategy) == next(((w, a) for s, w, a in W8A8 if s == spelling), (None, None))
    assert fmt.w8a8 == any(s == spelling for s, _, _ in W8A8)


@pytest.mark.parametrize("alias,canonical", ALIASES)
def test_aliases_read_as_the_canonical_spelling(alias, canonical):
    assert str(WeightFormat.parse(alias)) == canonical


def test_formats_differ_by_every_field():
    fmts = [WeightFormat.parse(c[0]) for c in CANONICAL]
    assert len(set(fmts)) == len(fmts) and len({str(f) for f in fmts}) == len(fmts)


@pytest.mark.parametrize("bad", ["int9", "int1-g64", "int4-g0", "fp3", "int4-asymm", "", "int4-partial",
                                 "nvfp4-g16", "w8a8-int4", "fp8-g128", "int8-w8a8", "fp8-dynamic", "int4-g-64"])
def test_bad_spellings_name_the_string_and_the_valid_spellings(bad):
    with pytest.raises(ConfigError) as exc:
        WeightFormat.parse(bad)
    assert repr(bad) in str(exc.value) and SPELLINGS in str(exc.value)


@pytest.mark.parametrize("fields,match", [
    (dict(kind="int", bits=9), "bits must be between 2 and 8"),
    (dict(kind="int", bits=4, group_size=-1), "group_size must be a positive integer"),
    (dict(kind="int", bits=4, partial_groups=True), "partial_groups needs a group_size"),
    (dict(kind="int", bits=8, act_quant=True), "not a W8A8 format compress runs"),      # no act_strategy
    (dict(kind="int", bits=4, act_quant=True, act_strategy="token"), "not a W8A8 format"),
    (dict(kind="fp8", bits=8, act_quant=True, weight_strategy="channel", act_strategy="group"), "use one of fp8,"),
    (dict(kind="fp8", bits=8, group_size=64, act_quant=True, weight_strategy="block", act_strategy="group"),
     "not a W8A8 format"),
    (dict(kind="nvfp4", bits=4, group_size=16, act_quant=True, act_strategy="token"), "not a W8A8 format"),
    (dict(kind="nvfp4", bits=4, group_size=32), "blocks of 16"),
    (dict(kind="mxfp4", bits=4, group_size=32, act_quant=True), "not implemented"),
    (dict(kind="fp8", bits=8), "not a W8A8 format"),                  # FP8 weight-only (W8A16) is not one
    (dict(kind="fp4", bits=4), "kind must be one of"),
    (dict(kind="dense", bits=8), "dense format is 16-bit"),
])
def test_impossible_fields_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        WeightFormat(**fields)


# --- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,spelling", [
    (RTNConfig(), "int4-g128"),
    (GPTQConfig(bits=3, group_size=64, symmetric=False), "int3-g64-asym"),
    (GPTQConfig(bits=8, group_size=None, observer="minmax"), "int8"),
    (RTNConfig(group_size=128, partial_groups=True), "int4-g128-partial"),
    (RTNConfig(group_size=None, partial_groups=True), "int4"),            # nothing to be partial
    (RTNConfig(scheme="nvfp4a16"), "nvfp4a16"),                          # group_size 128 does not apply
    (GPTQConfig(scheme="nvfp4", partial_groups=True), "nvfp4"),
    (RTNConfig(scheme="mxfp4"), "mxfp4"),
    (RTNConfig(scheme="fp8"), "fp8"),                                    # bits 4 and group_size 128: defaults
    (GPTQConfig(scheme="fp8-block", bits=8, group_size=128), "fp8-block"),
    (RTNConfig(scheme="fp8-static", group_size=None), "fp8-static"),
    (GPTQConfig(scheme="w8a8-int8", bits=8, group_size=None), "w8a8-int8"),
    (RTNConfig(scheme="w8a8-int8-static"), "w8a8-int8-static"),
    (SparseGPTConfig(bits=4, group_size=64), "int4-g64"),
])
def test_configs_give_the_format_their_fields_name(cfg, spelling):
    assert cfg.weight_format == WeightFormat.parse(spelling)


def test_observer_and_actorder_are_not_part_of_the_format():
    assert GPTQConfig(bits=4, group_size=64).weight_format == RTNConfig(bits=4, group_size=64).weight_format
    assert SparseGPTConfig().weight_format is None                        # bits null: the survivors stay float


def test_a_module_config_gives_its_override_format():
    cfg = GPTQConfig(bits=4, group_size=64, overrides={"mlp.down_proj": {"bits": 8, "group_size": None},
                                                       "q_proj": {"scheme": "mxfp4"}})
    assert cfg.for_module("model.layers.0.mlp.down_proj").weight_format == WeightFormat.parse("int8")
    assert cfg.for_module("model.layers.0.self_attn.q_proj").weight_format == WeightFormat.parse("mxfp4")
    assert cfg.for_module("model.layers.0.self_attn.k_proj").weight_format == WeightFormat.parse("int4-g64")


@pytest.mark.parametrize("spelling", QUANTIZED)
def test_config_fields_make_a_config_of_the_same_format(spelling):
    fmt = WeightFormat.parse(spelling)
    assert RTNConfig(**fmt.config_fields()).weight_format == fmt
    assert GPTQConfig(overrides={"q_proj": fmt.config_fields()}).for_module("q_proj").weight_format == fmt


def test_dense_is_no_config():
    with pytest.raises(ConfigError, match="ignore"):
        WeightFormat.parse("bf16").config_fields()


# --- shapes -------------------------------------------------------------------------------------

def test_smollm2_576_with_group_128_needs_partial_groups():
    name = "model.layers.0.mlp.up_proj"
    with pytest.raises(ConfigError, match=re.escape(f"group_size 128 does not divide in_features 576 of {name}; "
                                                    f"pass group_size=64 (divides 576)")):
        WeightFormat.parse("int4-g128").check_shape(name, 576)
    assert not WeightFormat.parse("int4-g128").fits(576)
    WeightFormat.parse("int4-g128-partial").check_shape(name, 576)        # allowed when asked for
    WeightFormat.parse("int4-g64").check_shape(name, 576)
    WeightFormat.parse("int4").check_shape(name, 577)                     # per channel: any width
    assert WeightFormat.parse("int4-g128-partial").fits(576) and WeightFormat.parse("int4-g64").fits(576)


@pytest.mark.parametrize("spelling,block", [("nvfp4a16", 16), ("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_needs_whole_blocks(spelling, block):
    fmt = WeightFormat.parse(spelling)
    with pytest.raises(ConfigError, match=rf"{spelling} stores blocks of {block} inputs, but in_features "
                                          rf"{block + 8} of x.down_proj is not a multiple of {block}; add "
                                          rf"'x.down_proj' to ignore"):
        fmt.check_shape("x.down_proj", block + 8)
    assert not fmt.fits(block + 8) and fmt.fits(3 * block)
    fmt.check_shape("x.down_proj", 3 * block)
    with pytest.raises(ValueError, match=f"multiple of {block}"):          # the module refuses it too
        fmt.empty_module(block + 8, 4)


def test_check_shape_is_what_quantize_refuses():
    """RTN's target check raises the format's message."""
    model = tiny_model("llama", intermediate_size=168)                    # down_proj: 168 = 10 * 16 + 8
    with pytest.raises(ConfigError) as exc:
        compress.quantize(model, RTNConfig(scheme="nvfp4a16"), progress=False)
    with pytest.raises(ConfigError) as want:
        WeightFormat.parse("nvfp4a16").check_shape("model.layers.0.mlp.down_proj", 168)
    assert str(exc.value) == str(want.value)


# --- solver grids and packed modules ------------------------------------------------------------

@pytest.mark.parametrize("spelling", QUANTIZED)
def test_solver_grid_and_pack_give_a_module_of_the_format(spelling):
    fmt = WeightFormat.parse(spelling)
    grid = fmt.solver_grid(torch.float32, "mse")
    assert isinstance(grid, {"int": IntFormat, "fp8": FP8Format}.get(fmt.kind, FP4Format))
    assert (grid.group_size, grid.symmetric, grid.observer) == (fmt.group_size, fmt.symmetric, "mse")
    cols = 288 if fmt.partial_groups else 256                              # 288 = 2 x 128 + 32
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(0))
    result = rtn_solve(w, RTNConfig(**fmt.config_fields()), torch.float32, fmt=grid)
    bias = torch.randn(24)
    module = fmt.pack(result, bias=bias, dtype=torch.float32, input_amax=torch.tensor(3.0), observer="minmax",
                      actorder="static")
    assert isinstance(module, fmt.packed_class)
    assert torch.equal(module.dequantize(), result.weight)                 # the solve's weights, bit for bit
    assert torch.equal(module.bias, bias)
    if fmt.kind == "nvfp4" and fmt.act_quant:                              # W4A4: the input scale from amax
        assert torch.equal(module.input_global_scale, nvfp4_global_scale(torch.tensor(3.0)).reshape(1))
    if fmt.w8a8:                                                           # static: amax / 448 or / 127
        static = fmt.act_strategy == "tensor"
        assert (module.input_scale is not None) == static
        if static:
            assert torch.equal(module.input_scale, torch.tensor([3.0 / (448 if fmt.kind == "fp8" else 127)]))
    assert WeightFormat.of_module(module) == fmt
    assert not torch.equal(module.dequantize(), w)                         # negative control: it is quantized


def test_pack_needs_the_input_range_only_for_w4a4():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    for spelling in ("nvfp4", "nvfp4a16"):
        fmt = WeightFormat.parse(spelling)
        result = rtn_solve(w, RTNConfig(scheme=spelling), torch.float32)
        if fmt.act_quant:
            with pytest.raises(ValueError, match="input_global_scale"):
                fmt.pack(result, bias=None, dtype=torch.float32)
        else:
            assert fmt.pack(result, bias=None, dtype=torch.float32).input_global_scale is None


def test_of_module_reads_dense_and_partial_layers():
    assert WeightFormat.of_module(nn.Linear(4, 4)) == WeightFormat.parse("bf16")
    q = QuantLinear(576, 8, bits=4, group_size=128, symmetric=False)
    assert WeightFormat.of_module(q) == WeightFormat.parse("int4-g128-asym-partial")
    assert WeightFormat.of_module(FP4Linear(32, 8, scheme="nvfp4")) == WeightFormat.parse("nvfp4")
    with pytest.raises(ConfigError, match="ReLU has no weight format"):
        WeightFormat.of_module(nn.ReLU())


def test_dense_has_no_grid_and_kinds_register_once():
    with pytest.raises(ConfigError, match="not quantized"):
        WeightFormat.parse("bf16").solver_grid(torch.float32)
    assert WeightFormat.parse("bf16").packed_class is nn.Linear
    with pytest.raises(TypeError, match="registered already"):
        register_kind("int", packed=QuantLinear, grid=IntFormat)


# --- bytes --------------------------------------------------------------------------------------

def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("spelling", ["bf16"] + QUANTIZED)
@pytest.mark.parametrize("out_f,in_f", [(24, 96), (7, 160), (64, 576)])
def test_bytes_are_the_packed_modules_tensor_bytes(spelling, out_f, in_f):
    fmt = WeightFormat.parse(spelling)
    if not fmt.fits(in_f):
        pytest.skip(f"{spelling} does not fit in_features {in_f}")
    # The meta-device module the cost model reads, against a real module packed from a solve.
    meta = fmt.empty_module(in_f, out_f, bias=True, dtype=torch.bfloat16)
    assert all(t.is_meta for t in meta.state_dict().values())
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    if fmt.dense:
        real = nn.Linear(in_f, out_f, bias=True, dtype=torch.bfloat16)
    else:
        result = rtn_solve(w, RTNConfig(**fmt.config_fields()), torch.bfloat16)
        real = fmt.pack(result, bias=torch.zeros(out_f), dtype=torch.bfloat16, input_amax=torch.tensor(1.0))
    assert fmt.bytes(out_f, in_f, torch.bfloat16, bias=True) == _state_bytes(real) == _state_bytes(meta)
    assert fmt.tensors(out_f, in_f, torch.bfloat16, bias=True) == \
        {k: (t.dtype, tuple(t.shape)) for k, t in real.state_dict().items()}


def test_bits_per_weight_of_common_formats():
    assert WeightFormat.parse("int4-g64").bits_per_weight(4096, 4096) == pytest.approx(4 + 16 / 64, abs=0.01)
    assert WeightFormat.parse("int4-g64-asym").bits_per_weight(4096, 4096) == pytest.approx(4 + 20 / 64, abs=0.01)
    assert WeightFormat.parse("nvfp4a16").bits_per_weight(4096, 4096) == pytest.approx(4.5, abs=0.01)
    assert WeightFormat.parse("mxfp4").bits_per_weight(4096, 4096) == pytest.approx(4.25, abs=0.01)
    assert WeightFormat.parse("bf16").bits_per_weight(4096, 4096) == 16


# --- compressed-tensors -------------------------------------------------------------------------

def _model(**modules: nn.Module) -> nn.Module:
    """A bare model holding ``modules`` (and the ``config`` the export reads)."""
    model = nn.Sequential()
    for name, module in modules.items():
        model.add_module(name, module)
    model.config = SimpleNamespace()
    return model


@pytest.mark.parametrize("spelling", CT_FORMATS)
def test_compressed_tensors_arguments_round_trip(spelling):
    fmt = WeightFormat.parse(spelling)
    back = WeightFormat.from_ct_args(fmt.ct_format, fmt.weights_args(observer="mse", actorder="static"),
                                     fmt.input_args(), "config group 'group_0'")
    assert back == fmt
    # The group the export writes parses back to the same format, with its provenance.
    module = fmt.empty_module(64, 8, dtype=torch.float32, device="cpu", observer="mse", actorder="static")
    groups, ignore = parse_config(quantization_config(_model(proj=module)), "config.json")
    provenance = {"observer": "mse", "actorder": "static"} if fmt.kind == "int" or fmt.w8a8 else {}
    assert groups == [(["Linear"], fmt, provenance)]
    assert ignore == []


def test_compressed_tensors_arguments_of_each_kind():
    assert WeightFormat.parse("int4-g128-asym").weights_args(observer="mse") == {
        "dynamic": False, "group_size": 128, "num_bits": 4, "strategy": "group", "symmetric": False, "type": "int",
        "observer": "mse"}
    assert WeightFormat.parse("int8").weights_args()["strategy"] == "channel"
    assert WeightFormat.parse("nvfp4a16").weights_args()["strategy"] == "tensor_group"
    assert WeightFormat.parse("mxfp4").weights_args()["scale_dtype"] == "torch.uint8"
    assert "observer" not in WeightFormat.parse("mxfp4").weights_args(observer="mse")   # FP4 presets carry none
    assert WeightFormat.parse("nvfp4").input_args()["dynamic"] == "local"
    assert WeightFormat.parse("nvfp4a16").input_args() is None
    assert [WeightFormat.parse(s).ct_format for s in ("int4", "nvfp4", "mxfp4", "fp8-block", "w8a8-int8", "int8")] == \
        ["pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "float-quantized", "int-quantized",
         "pack-quantized"]


@pytest.mark.parametrize("spelling,preset", [("fp8", "FP8_DYNAMIC"), ("fp8-block", "FP8_BLOCK"), ("fp8-static", "FP8"),
                                             ("w8a8-int8", "W8A8")])
def test_w8a8_arguments_are_the_compressed_tensors_presets(spelling, preset):
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
    scheme = preset_name_to_scheme(preset, ["Linear"])
    fmt = WeightFormat.parse(spelling)
    assert QuantizationArgs.model_validate(fmt.weights_args()) == scheme.weights
    assert QuantizationArgs.model_validate(fmt.input_args()) == scheme.input_activations
    # Negative control: the presets differ from each other where the formats do.
    assert QuantizationArgs.model_validate(WeightFormat.parse("fp8").weights_args()) != \
        preset_name_to_scheme("FP8", ["Linear"]).weights


def test_layers_with_and_without_a_partial_group_share_a_config_group():
    model = _model(a=QuantLinear(576, 8, bits=4, group_size=128, symmetric=True),
                   b=QuantLinear(256, 8, bits=4, group_size=128, symmetric=True),
                   c=QuantLinear(256, 8, bits=4, group_size=128, symmetric=True, observer="mse"))
    assert config_group(model.a) == config_group(model.b) != config_group(model.c)
    groups = quantization_config(model)["config_groups"]
    assert sorted(g["targets"] for g in groups.values()) == [["a", "b"], ["c"]]


@pytest.mark.parametrize("ct_format,weights,inputs,match", [
    ("float-quantized", {"type": "float"}, None, "not a W8A8 variant compress runs.*load this checkpoint with vLLM"),
    ("float-quantized", WeightFormat.parse("fp8").weights_args(), None, "weight-only"),             # FP8 W8A16
    ("float-quantized", WeightFormat.parse("fp8-static").weights_args(), WeightFormat.parse("fp8").input_args(),
     "not a W8A8 variant"),                                  # per-tensor weights, per-token activations
    ("int-quantized", WeightFormat.parse("w8a8-int8").weights_args(),
     {**WeightFormat.parse("w8a8-int8").input_args(), "symmetric": False}, "not a W8A8 variant"),
    ("int-quantized", WeightFormat.parse("fp8").weights_args(), WeightFormat.parse("fp8").input_args(),
     "not a W8A8 variant"),                                  # float weights under the int format
    ("fp8-quantized", WeightFormat.parse("fp8").weights_args(), None, "has format 'fp8-quantized'"),
    ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "block"}, None, "weight strategy 'block'"),
    ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group"}, {"num_bits": 8}, "quantizes activations"),
    ("pack-quantized", {"num_bits": 12, "type": "int", "strategy": "channel"}, None, "bits must be between 2 and 8"),
    ("nvfp4-pack-quantized", {**WeightFormat.parse("nvfp4").weights_args(), "group_size": 32}, None,
     "needs weights group_size=16"),
    ("mxfp4-pack-quantized", WeightFormat.parse("mxfp4").weights_args(), WeightFormat.parse("nvfp4").input_args(),
     "activations quantized as"),
])
def test_checkpoint_groups_compress_cannot_run_are_refused(ct_format, weights, inputs, match):
    with pytest.raises(CheckpointError, match=match) as exc:
        WeightFormat.from_ct_args(ct_format, weights, inputs, "config.json: config group 'group_0'")
    assert "config group 'group_0'" in str(exc.value)
