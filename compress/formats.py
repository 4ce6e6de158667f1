"""WeightFormat: what one quantized weight is, as one value.

A frozen dataclass that answers every question about a weight format:

- its spelling: ``WeightFormat.parse("int4-g128")`` and ``str(fmt)`` (``parse(str(fmt)) == fmt``);
- whether a layer can hold it: ``check_shape(name, in_features)`` / ``fits(in_features)``;
- the grid RTN, GPTQ and SparseGPT round onto: ``solver_grid(scale_dtype, observer)``;
- the packed module that stores it: ``packed_class``, ``empty_module(...)``, ``pack(result, ...)``;
- its compressed-tensors config group: ``ct_format``, ``weights_args()``, ``input_args()``, and
  back: ``WeightFormat.from_ct_args(ct_format, weights, input_activations, where)``;
- its stored tensors and bytes for the cost model: ``tensors(out, in)``, ``bytes(out, in)``;
- configs: ``WeightFormat.from_config(cfg)`` (what ``cfg.weight_format`` returns) and back,
  ``config_fields()``; packed modules: ``WeightFormat.of_module(module)``.

Spellings (case-insensitive; ``str`` gives the first form of each):

    bf16               dense: the layer stays a float nn.Linear in the model dtype (the planner's
                       "leave it"); dense, fp16 and float read the same
    int8, int4         B-bit integer codes (B in 2..8), symmetric, one scale per output channel
    int4-g128          one scale per group of 128 input columns
    int4-g128-asym     asymmetric: codes in [0, 2^B-1] over an integer zero point per group
                       (uint4-g128 reads the same)
    int4-g128-partial  the last group of a row may be narrower when 128 does not divide in_features
                       (SmolLM2's 576 = 4 x 128 + 64); compress loads that, compressed-tensors does not
    nvfp4a16           E2M1 weights, an FP8 E4M3 scale per 16 inputs over a float32 global scale;
                       activations stay 16-bit
    nvfp4              the same weights, activations rounded to NVFP4 at run time (W4A4)
    mxfp4              E2M1 weights, an E8M0 power-of-two scale per 32 inputs
    fp8                W8A8: FP8 E4M3 weights, a scale per output channel; FP8 activations with a
                       dynamic scale per token (llm-compressor's FP8_DYNAMIC)
    fp8-block          FP8 E4M3 weights, a scale per 128x128 block; FP8 activations with a dynamic
                       scale per 1x128 group (FP8_BLOCK, DeepSeek-V3 / Qwen3). A last block (rows or
                       columns) narrower than 128 is allowed (SmolLM2's 576 = 4 x 128 + 64), as
                       compressed-tensors allows it; vLLM needs in_features divisible by 128
    fp8-static         FP8 E4M3 weights, one scale per tensor; FP8 activations with one static scale
                       per tensor from calibration (llm-compressor's FP8)
    w8a8-int8          INT8 symmetric weights, a scale per output channel; INT8 symmetric activations
                       with a dynamic scale per token (llm-compressor's W8A8 / INT8)
    w8a8-int8-static   the same weights; INT8 activations with one static scale per tensor
    w4a8-int8-g64      W4A8: int4 symmetric weights, a scale per 64 inputs (per output channel
                       without -g; -partial as for int); INT8 symmetric activations with a dynamic
                       scale per token (compressed-tensors' W4A8 preset; QServe's W4A8 without its
                       progressive per-channel int8 step)
    w4a8-fp8-g128      the same weights; FP8 E4M3 activations, dynamic per token (W4AFP8, which
                       vLLM serves on Hopper with group 128)
    w4a4-int4          W4A4 int4 (QuaRot's format): int4 symmetric weights per output channel (-g64:
                       per 64 inputs; -partial as for int); INT4 symmetric activations with a
                       dynamic scale per token (compressed-tensors' W4A4 preset)

``kind`` names the storage ("dense", "int", "nvfp4", "mxfp4", "fp8") and ``act_quant`` whether the
activations are quantized too; ``weight_strategy`` (fp8 only: "channel", "tensor", "block") and
``act_strategy`` (W8A8 only: "token", "group", "tensor") say how the scales are laid out. The W8A8
formats are exactly the five rows above: other combinations of these fields are refused. ``int8``
stays the weight-only format; ``w8a8-int8`` is ``int8`` with ``act_quant``. The W4A8 formats are
``int4`` (any group size) with ``act_quant``, ``act_strategy`` "token" and ``act_dtype`` ("int8" or
"fp8", the activation codes; W8A8 activations follow their weights' kind and leave it None); W4A4
int4 is the same with ``act_dtype`` "int4" (``int4_act`` covers both). They keep the weight-only
storage (QuantLinear's packed int32 words, compressed-tensors ``pack-quantized``), which rounds its
inputs itself. The scheme tables are in ``compress.act_schemes``.

Not part of a format: the observer (how a solver chose the scales) and GPTQ's ``actorder``. They do
not change what the stored numbers mean, so layers solved differently still share a format (the
planner, fused-layer checks and config equality rely on it). They travel beside it as provenance:
``solver_grid`` takes the observer; ``pack`` and ``empty_module`` record both on the module; and
``weights_args`` writes them into integer config groups, as compressed-tensors does.

The packed modules and solver grids live in ``compress.quant``, which depends on this module, not
the reverse: ``compress.quant.formats`` registers them per kind (``register_kind``). FP4 block sizes
are the kernels' storage spec, ``compress.kernels.fp4_linear.BLOCK``; everything else reads them
from a WeightFormat (``group_size``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .kernels.fp4_linear import BLOCK
# The activation-scheme tables; W4A8_SCHEMES, W8A8_SCHEMES, W8A8_BLOCK are re-exported (public names).
from .act_schemes import (ACT_BITS, INT4_ACT_RE, INT4_ACT_SCHEMES, INT4_ACT_TABLE,  # noqa: F401
                                W4A4_SCHEMES, W4A8_SCHEMES, W8A8_BLOCK, W8A8_SCHEMES, W8A8_TABLE)

KINDS = ("dense", "int", "nvfp4", "mxfp4", "fp8")
# The 4-bit float schemes as configs name them: scheme -> (kind, activations quantized too).
_FP4_SCHEMES = {"nvfp4a16": ("nvfp4", False), "nvfp4": ("nvfp4", True), "mxfp4": ("mxfp4", False)}
FP4_SCHEMES = tuple(_FP4_SCHEMES)
SCHEMES = ("int",) + FP4_SCHEMES + W8A8_SCHEMES + INT4_ACT_SCHEMES     # the values of IntWeightConfig.scheme
# compressed-tensors' "format" of a config group, per kind (integer W8A8: "int-quantized", see ct_format).
CT_FORMATS = {"int": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized",
              "fp8": "float-quantized"}
CT_INT_W8A8 = "int-quantized"
_DENSE_NAMES = ("bf16", "dense", "fp16", "float")
_INT_RE = re.compile(r"^(?P<u>u?)int(?P<bits>\d+)(?:-g(?P<g>\d+))?(?P<asym>-asym)?(?P<partial>-partial)?$")
SPELLINGS = ("bf16, int8 (a scale per output channel), int4-g64 (a scale per 64 inputs), int3-g64-asym "
             "(zero points; uint3-g64 reads the same), int4-g128-partial (a narrower last group allowed), "
             "nvfp4a16, nvfp4 (W4A4), mxfp4, fp8 (W8A8, per-token activations), fp8-block, fp8-static, "
             "w8a8-int8, w8a8-int8-static, w4a8-int8-g64 (W4A8: int4 weights, int8 activations per token), "
             "w4a8-fp8-g128 (FP8 activations) or w4a4-int4 (W4A4: int4 weights per channel, int4 activations "
             "per token)")

# (kind, act_quant or None for both) -> (packed module class, solver grid class), registered by
# compress.quant.formats. Integer weights are stored two ways: packed int32 words (weight-only,
# QuantLinear) or plain int8 beside int8 activations (W8A8Linear), so "int" registers per act_quant.
# W4A8 and W4A4 int4 formats look up act_quant=False: their weights are stored packed like
# weight-only int4, and QuantLinear rounds the activations itself (see WeightFormat._classes).
_KIND_CLASSES: dict[tuple[str, bool | None], tuple[type, type]] = {}


def register_kind(kind: str, *, packed: type, grid: type, act_quant: bool | None = None) -> None:
    """Register the packed module class and the solver grid class of ``kind``, once.

    ``act_quant``: register only the formats of ``kind`` whose activations are (True) or are not
    (False) quantized; None (default) registers both. ``packed`` provides ``for_format(fmt,
    in_features, out_features, *, bias, dtype, device, observer, actorder)`` (an empty module) and
    ``from_result(fmt, result, *, bias, dtype, input_amax, observer, actorder)`` (a module holding a
    solve's codes); ``grid`` provides ``from_format(fmt, scale_dtype, observer)``."""
    if kind not in KINDS or kind == "dense":
        raise TypeError(f"kind must be one of {', '.join(KINDS[1:])}, got {kind!r}")
    clash = [key for key in _KIND_CLASSES if key[0] == kind and (act_quant is None or key[1] in (None, act_quant))]
    if clash:
        packed_old, grid_old = _KIND_CLASSES[clash[0]]
        what = "" if clash[0][1] is None else f" with act_quant={clash[0][1]}"
        raise TypeError(f"weight format kind {kind!r}{what} is registered already "
                        f"({packed_old.__name__}, {grid_old.__name__})")
    _KIND_CLASSES[(kind, act_quant)] = (packed, grid)


def check_group_size(name: str, in_features: int, group_size: int | None, partial_groups: bool) -> None:
    """Refuse a group size that does not divide ``in_features`` unless partial groups are allowed."""
    if group_size is None or in_features % group_size == 0 or partial_groups:
        return
    fits = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0 and g < group_size]
    hint = f"pass group_size={fits[0]} (divides {in_features}), " if fits else ""
    raise ConfigError(
        f"group_size {group_size} does not divide in_features {in_features} of {name}; {hint}"
        f"or set partial_groups=true (--partial-groups) to quantize the last "
        f"{in_features % group_size} columns as a smaller group (loads in compress; "
        f"compressed-tensors/transformers refuse such checkpoints), or ignore that layer")


@dataclasses.dataclass(frozen=True, repr=False)
class WeightFormat:
    """kind:           "dense" | "int" | "nvfp4" | "mxfp4" (the storage)
    bits:           bits per weight: 2..8 for int, 4 for FP4, 16 for dense
    group_size:     input columns per scale; None = one scale per output channel. FP4: the block
                    size the format fixes (16 for nvfp4, 32 for mxfp4)
    symmetric:      no zero points (always for FP4)
    act_quant:      activations are quantized too (nvfp4: W4A4; fp8 and w8a8-int8: W8A8)
    partial_groups: int only: the last group of a row may be narrower than group_size
    weight_strategy: fp8 only: "channel" (a scale per output row), "tensor" (one scale) or "block"
                    (a scale per 128x128 block; group_size 128, a narrower last block allowed)
    act_strategy:   W8A8, W4A8, W4A4 int4: "token" (dynamic per row), "group" (dynamic per 1x128) or
                    "tensor" (static, from calibration); W4A8 and W4A4 int4 are always "token"
    act_dtype:      W4A8 / W4A4 int4 only: the activation codes, "int8", "fp8" (E4M3) or "int4".
                    None elsewhere (W8A8 activations are of their weights' kind)
    """

    kind: str
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    act_quant: bool = False
    partial_groups: bool = False
    weight_strategy: str | None = None
    act_strategy: str | None = None
    act_dtype: str | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ConfigError(problem)

    def _problem(self) -> str | None:
        kind, bits, g = self.kind, self.bits, self.group_size
        if kind not in KINDS:
            return f"weight format kind must be one of {', '.join(KINDS)}, got {kind!r}"
        if kind == "fp8" or self.act_strategy is not None or self.weight_strategy is not None or (
                self.act_dtype is not None or (kind == "int" and self.act_quant)):
            return self._w8a8_problem()
        if kind == "dense":
            if (bits, g, self.symmetric, self.act_quant, self.partial_groups) != (16, None, True, False, False):
                return "a dense format is 16-bit, with no groups, zero points or activation quantization"
            return None
        if kind == "int":
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                return f"bits must be between 2 and 8, got {bits}"
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
                return f"group_size must be a positive integer or null (per channel), got {g}"
            if self.partial_groups and g is None:
                return "partial_groups needs a group_size (per-channel scales have no groups)"
            return None
        block = BLOCK[kind]
        if bits != 4:
            return f"{kind} stores 4-bit floats; bits must be 4, got {bits}"
        if g != block:
            return f"{kind} stores blocks of {block} inputs; group_size must be {block}, got {g}"
        if not self.symmetric or self.partial_groups:
            return f"{kind} has no zero points and no partial blocks"
        if self.act_quant and kind != "nvfp4":
            return f"{kind} with quantized activations is not implemented; nvfp4 (W4A4) is"
        return None

    def _w8a8_problem(self) -> str | None:
        """Formats with quantized activations (other than nvfp4) are the rows of W8A8_TABLE and
        INT4_ACT_TABLE, nothing in between."""
        if self._w8a8_scheme() is None and self._int4_act_scheme() is None:
            return (f"{self.kind} weights with weight_strategy={self.weight_strategy!r}, act_strategy="
                    f"{self.act_strategy!r}, act_dtype={self.act_dtype!r}, bits={self.bits}, group_size="
                    f"{self.group_size}, symmetric={self.symmetric} is not a W8A8 format compress runs (nor a "
                    f"W4A8 or W4A4 one); use one of {', '.join(W8A8_SCHEMES + INT4_ACT_SCHEMES)}")
        return None

    def _int4_act_scheme(self) -> str | None:
        """The W4A8 / W4A4 int4 scheme these fields spell (int4 symmetric, any valid grouping,
        activations dynamic per token in ``act_dtype``), or None."""
        g = self.group_size
        if (self.kind, self.bits, self.symmetric, self.act_quant, self.weight_strategy, self.act_strategy) != (
                "int", 4, True, True, None, "token"):
            return None
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
            return None
        if self.partial_groups and g is None:
            return None
        return next((s for s, act in INT4_ACT_TABLE.items() if act == self.act_dtype), None)

    def _w8a8_scheme(self) -> str | None:
        """The W8A8 scheme these fields spell exactly, or None."""
        for scheme, (kind, weight_strategy, act_strategy) in W8A8_TABLE.items():
            group = W8A8_BLOCK if weight_strategy == "block" else None
            if (self.kind, self.bits, self.group_size, self.symmetric, self.act_quant, self.partial_groups,
                    self.weight_strategy, self.act_strategy, self.act_dtype) == (
                        kind, 8, group, True, True, False, weight_strategy, act_strategy, None):
                return scheme
        return None

    @property
    def w8a8(self) -> bool:
        """FP8 or INT8 weights with FP8 / INT8 activations (W8A8Linear)."""
        return self.act_strategy is not None and self.act_dtype is None

    @property
    def int4_act(self) -> bool:
        """int4 weights (packed, QuantLinear) with activations rounded per token at run time: W4A8
        (INT8 / FP8) and W4A4 int4."""
        return self.act_dtype is not None

    @property
    def w4a8(self) -> bool:
        """int4 weights (packed, QuantLinear) with INT8 / FP8 activations dynamic per token."""
        return self.act_dtype is not None and ACT_BITS[self.act_dtype] == 8

    @property
    def act_codes(self) -> str | None:
        """What the activations are rounded to at run time: "int8" or "fp8" (W8A8, W4A8), "int4"
        (W4A4 int4), "nvfp4" (NVFP4 W4A4), None when they stay in the model dtype."""
        if not self.act_quant:
            return None
        if self.int4_act:
            return self.act_dtype
        return {"fp8": "fp8", "int": "int8"}.get(self.kind, self.kind)

    @property
    def static_activations(self) -> bool:
        """The activations' scale is fixed from calibration data (nvfp4 W4A4's global scale, the
        static per-tensor W8A8 schemes): quantizing needs calibration data even with RTN."""
        return self.act_quant and (self.kind == "nvfp4" or self.act_strategy == "tensor")

    # --- names --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> WeightFormat:
        """The format a spelling names (see the module docstring); ConfigError listing the valid
        spellings otherwise."""
        original = text
        text = str(text).strip().lower()
        if text in _DENSE_NAMES:
            return cls("dense", 16)
        if text in _FP4_SCHEMES or text in W8A8_TABLE:
            return cls.from_scheme(text)
        m = INT4_ACT_RE.match(text)
        if m is not None:
            if m["partial"] and not m["g"]:
                raise ConfigError(f"weight format {original!r}: -partial needs a group size "
                                  f"({m['scheme']}-g128-partial); valid spellings: {SPELLINGS}")
            try:
                return cls.from_scheme(m["scheme"], 4, int(m["g"]) if m["g"] else None, True, bool(m["partial"]))
            except ConfigError as exc:
                raise ConfigError(f"weight format {original!r}: {exc}; valid spellings: {SPELLINGS}") from None
        m = _INT_RE.match(text)
        if m is None:
            raise ConfigError(f"unknown weight format {original!r}; valid spellings: {SPELLINGS}")
        if m["partial"] and not m["g"]:
            raise ConfigError(f"weight format {original!r}: -partial needs a group size (int4-g128-partial); "
                              f"valid spellings: {SPELLINGS}")
        try:
            return cls("int", int(m["bits"]), int(m["g"]) if m["g"] else None, not (m["u"] or m["asym"]),
                       partial_groups=bool(m["partial"]))
        except ConfigError as exc:
            raise ConfigError(f"weight format {original!r}: {exc}; valid spellings: {SPELLINGS}") from None

    def __str__(self) -> str:
        if self.int4_act:
            return (f"{self.scheme}{'' if self.group_size is None else f'-g{self.group_size}'}"
                    f"{'-partial' if self.partial_groups else ''}")
        if self.kind == "int" and not self.w8a8:
            return (f"int{self.bits}{'' if self.group_size is None else f'-g{self.group_size}'}"
                    f"{'' if self.symmetric else '-asym'}{'-partial' if self.partial_groups else ''}")
        return "bf16" if self.dense else self.scheme

    def __repr__(self) -> str:
        return f"WeightFormat.parse({str(self)!r})"

    @property
    def name(self) -> str:
        """The canonical spelling (``str(self)``)."""
        return str(self)

    @property
    def scheme(self) -> str:
        """The scheme as configs name it: int, nvfp4a16, nvfp4, mxfp4, fp8, fp8-block, fp8-static,
        w8a8-int8, w8a8-int8-static, w4a8-int8, w4a8-fp8, w4a4-int4 (dense: "dense")."""
        if self.w8a8:
            return self._w8a8_scheme()
        if self.int4_act:
            return self._int4_act_scheme()
        if self.kind in ("dense", "int"):
            return self.kind
        return next(s for s, (k, act) in _FP4_SCHEMES.items() if (k, act) == (self.kind, self.act_quant))

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    @property
    def family(self) -> str:
        """The kernel family of the cost model's efficiency tables: bf16, int, fp4, or for W8A8 the
        native math it runs on, fp8 or int8 (``compress.plan.cost`` falls back to bf16's efficiency
        where a profile has no entry for them)."""
        if self.w8a8:
            return "fp8" if self.kind == "fp8" else "int8"
        return {"dense": "bf16", "int": "int"}.get(self.kind, "fp4")

    # --- configs and modules --------------------------------------------------------------------
    @classmethod
    def from_scheme(cls, scheme: str, bits: int = 4, group_size: int | None = None, symmetric: bool = True,
                    partial_groups: bool = False) -> WeightFormat:
        """The format of a config's fields. The FP4 and W8A8 schemes fix their layout, so
        ``group_size`` and ``partial_groups`` do not apply to them (but must still be valid values);
        ``partial_groups`` of a per-channel integer format means nothing and is dropped. W8A8
        schemes take ``bits`` 8 or the config default 4 (the field left alone). W4A8 and W4A4 int4
        schemes take ``group_size`` and ``partial_groups`` like "int" and refuse bits other than 4
        and asymmetric weights (the int8 x int4 and int4 x int4 kernels have no zero points)."""
        if scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
        if scheme in INT4_ACT_TABLE:
            if bits != 4:
                raise ConfigError(f"scheme {scheme!r} stores 4-bit integer weights; drop bits (or set it to 4), got "
                                  f"{bits}. For 8-bit weights with 8-bit activations use w8a8-int8 or fp8")
            if not symmetric:
                kernels = "W4A4" if scheme in W4A4_SCHEMES else "W4A8"
                raise ConfigError(f"scheme {scheme!r} is symmetric ({kernels} kernels take no zero points); drop "
                                  f"symmetric: false")
            if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                           or group_size <= 0):
                raise ConfigError(f"group_size must be a positive integer or null (per channel), got {group_size}")
            return cls("int", 4, group_size, True, act_quant=True, partial_groups=partial_groups and group_size is not None,
                       act_strategy="token", act_dtype=INT4_ACT_TABLE[scheme])
        if scheme in W8A8_TABLE:
            if bits not in (4, 8):
                raise ConfigError(f"scheme {scheme!r} stores 8-bit weights; drop bits (or set it to 8), got {bits}")
            if not symmetric:
                raise ConfigError(f"scheme {scheme!r} is symmetric (no zero points); drop symmetric: false")
            if group_size is not None and (isinstance(group_size, bool) or group_size <= 0):
                raise ConfigError(f"group_size must be a positive integer or null (per channel), got {group_size}")
            kind, weight_strategy, act_strategy = W8A8_TABLE[scheme]
            return cls(kind, 8, W8A8_BLOCK if weight_strategy == "block" else None, act_quant=True,
                       weight_strategy=weight_strategy, act_strategy=act_strategy)
        if scheme != "int":
            if bits != 4:
                raise ConfigError(f"scheme {scheme!r} stores 4-bit floats; bits must be 4, got {bits}")
            if not symmetric:
                raise ConfigError(f"scheme {scheme!r} is symmetric (no zero points); drop symmetric: false")
        if not 2 <= bits <= 8:
            raise ConfigError(f"bits must be between 2 and 8, got {bits}")
        if group_size is not None and group_size <= 0:
            raise ConfigError(f"group_size must be a positive integer or null (per channel), got {group_size}")
        if scheme == "int":
            return cls("int", bits, group_size, symmetric, partial_groups=partial_groups and group_size is not None)
        kind, act_quant = _FP4_SCHEMES[scheme]
        return cls(kind, 4, BLOCK[kind], act_quant=act_quant)

    @classmethod
    def from_config(cls, cfg: Any) -> WeightFormat:
        """The format of a weight-quantization config (RTNConfig, GPTQConfig, a ``for_module``
        config; a config without ``scheme``/``symmetric``/``partial_groups`` means int, symmetric,
        whole groups)."""
        return cls.from_scheme(getattr(cfg, "scheme", "int"), cfg.bits, cfg.group_size, getattr(cfg, "symmetric", True),
                               getattr(cfg, "partial_groups", False))

    def config_fields(self) -> dict[str, Any]:
        """The fields an RTN/GPTQ config (or one of its overrides) takes for this format."""
        if self.kind == "int" and not self.w8a8:
            out = {"scheme": self.scheme, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
            if self.partial_groups:
                out["partial_groups"] = True
            return out
        if self.dense:
            raise ConfigError("bf16 is not a quantization config: leave the layer out (add it to ignore)")
        return {"scheme": self.scheme}

    @classmethod
    def of_module(cls, module: nn.Module) -> WeightFormat:
        """The format a model's layer holds: a packed module's (its ``weight_format``), dense for a
        plain nn.Linear. A packed layer whose last group is narrower gets ``partial_groups``."""
        fmt = getattr(module, "weight_format", None)
        if isinstance(fmt, WeightFormat):
            return fmt
        if isinstance(module, nn.Linear):
            return cls("dense", 16)
        raise ConfigError(f"a {type(module).__name__} has no weight format (nn.Linear, QuantLinear, FP4Linear and "
                          f"W8A8Linear have one)")

    # --- shapes -------------------------------------------------------------------------------
    def check_shape(self, name: str, in_features: int) -> None:
        """Refuse a layer (``name``, ``in_features`` inputs) this format cannot hold, saying what to do.
        W8A8 formats hold any layer: fp8-block's last block may be narrower than 128 (vLLM refuses
        in_features not divisible by 128 there; the export warns, naming the layers)."""
        if self.w8a8:
            return
        if self.kind == "int":
            check_group_size(name, in_features, self.group_size, self.partial_groups)
        elif not self.dense and in_features % self.group_size:
            block = self.group_size
            raise ConfigError(f"{self.scheme} stores blocks of {block} inputs, but in_features {in_features} of "
                              f"{name} is not a multiple of {block}; add {name!r} to ignore (it stays in full "
                              f"precision)")

    def fits(self, in_features: int) -> bool:
        """Whether a layer with ``in_features`` inputs can take this format (``check_shape`` passes)."""
        if self.dense or self.w8a8 or self.group_size is None or (self.kind == "int" and self.partial_groups):
            return True
        return in_features % self.group_size == 0

    # --- solver and packed module ---------------------------------------------------------------
    def _classes(self) -> tuple[type, type]:
        if self.dense:
            raise ConfigError("bf16 is not quantized: it has no solver grid and no packed module")
        # W4A8 / W4A4 int4 keep the weight-only storage (packed int4 words): QuantLinear, which rounds
        # its inputs.
        stored_act = self.act_quant and not self.int4_act
        classes = _KIND_CLASSES.get((self.kind, stored_act)) or _KIND_CLASSES.get((self.kind, None))
        if classes is None:
            raise ConfigError(f"no packed module is registered for {self}; compress.quant.formats registers "
                              f"{', '.join(KINDS[1:])} (import compress)")
        return classes

    @property
    def packed_class(self) -> type[nn.Module]:
        """The module class that stores this format (nn.Linear for dense)."""
        return nn.Linear if self.dense else self._classes()[0]

    def solver_grid(self, scale_dtype: torch.dtype, observer: str = "minmax"):
        """A fresh grid for one solve (``compress.quant.formats.IntFormat`` / ``FP4Format`` /
        ``FP8Format``; w8a8-int8 weights use the 8-bit per-channel IntFormat): how groups get their scales (``observer``: minmax or mse; integer scales are rounded to
        ``scale_dtype``, the model dtype) and how a column is rounded."""
        return self._classes()[1].from_format(self, scale_dtype, observer)

    def pack(self, result, *, bias: torch.Tensor | None, dtype: torch.dtype, input_amax: torch.Tensor | None = None,
             observer: str | None = None, actorder: str | None = None) -> nn.Module:
        """The packed module (QuantLinear, FP4Linear, W8A8Linear) holding a solve's ``result`` (a
        ``compress.quant.formats.QuantResult`` of one module's rows). ``input_amax``: the
        calibration inputs' max |x|, required when ``static_activations`` and ignored otherwise;
        ``observer``/``actorder``: provenance for the checkpoint (FP4 config groups carry none)."""
        return self._classes()[0].from_result(self, result, bias=bias, dtype=dtype, input_amax=input_amax,
                                              observer=observer, actorder=actorder)

    def empty_module(self, in_features: int, out_features: int, *, bias: bool = False,
                     dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = "meta",
                     observer: str | None = None, actorder: str | None = None) -> nn.Module:
        """An empty module of this format (arguments in nn.Linear's order), by default on the meta
        device: its state dict names, dtypes and shapes are the checkpoint's."""
        if self.dense:
            return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        return self._classes()[0].for_format(self, in_features, out_features, bias=bias, dtype=dtype, device=device,
                                             observer=observer, actorder=actorder)

    # --- bytes (the cost model) -----------------------------------------------------------------
    def tensors(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16,
                bias: bool = False) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The tensors an (out_features, in_features) weight stores in this format: {suffix: (dtype,
        shape)}, read off the packed module built on the meta device."""
        module = self.empty_module(in_features, out_features, bias=bias, dtype=dtype)
        return {k: (t.dtype, tuple(t.shape)) for k, t in module.state_dict().items()}

    def bytes(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16,
              bias: bool = False) -> int:
        """Data bytes of an (out_features, in_features) weight in this format (scales included)."""
        return sum(math.prod(shape) * d.itemsize for d, shape in self.tensors(out_features, in_features, dtype,
                                                                              bias).values())

    def bits_per_weight(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> float:
        return 8 * self.bytes(out_features, in_features, dtype) / (out_features * in_features)

    # --- compressed-tensors ---------------------------------------------------------------------
    @property
    def ct_format(self) -> str:
        """The config group's ``format``: pack-quantized (integer weight-only, W4A8, W4A4 int4),
        nvfp4-pack-quantized, mxfp4-pack-quantized, float-quantized (FP8 W8A8), int-quantized (INT8
        W8A8). W4A8 is pack-quantized as llm-compressor saves W4AFP8 and as vLLM's W4A8 kernels read
        it (``weight_packed`` int32); compressed-tensors 0.20's own inference would say int-quantized
        (unpacked int8 codes), which only vLLM's older CPU W4A8 path reads. See docs/w8a8.md."""
        if self.dense:
            raise ConfigError("bf16 has no compressed-tensors form: a dense layer is listed in 'ignore'")
        return CT_INT_W8A8 if self.kind == "int" and self.w8a8 else CT_FORMATS[self.kind]

    def weights_args(self, observer: str | None = None, actorder: str | None = None) -> dict[str, Any]:
        """The config group's ``weights``, as compressed-tensors 0.20 serializes them. Integer groups
        carry the provenance ``observer``/``actorder`` when given; the FP4 presets carry none.
        W8A8: as compressed-tensors' presets FP8_DYNAMIC, FP8_BLOCK, FP8, INT8_W8A8 dump them
        (``block_structure`` [128, 128] for the block scheme), with the provenance when given."""
        if self.w8a8:
            args = {"dynamic": False, "group_size": None, "num_bits": 8, "symmetric": True,
                    "strategy": self.weight_strategy or "channel", "type": "float" if self.kind == "fp8" else "int"}
            if self.weight_strategy == "block":
                args["block_structure"] = [W8A8_BLOCK, W8A8_BLOCK]
            if actorder is not None:
                args["actorder"] = actorder
            if observer is not None:
                args["observer"] = observer
            return args
        if self.kind == "int":
            # None-valued optional keys (block_structure, scale_dtype, zp_dtype, actorder) are left out,
            # which also keeps readers older than 0.13 (no scale_dtype/zp_dtype) able to validate it.
            args: dict[str, Any] = {
                "dynamic": False,
                "group_size": self.group_size,
                "num_bits": self.bits,
                "strategy": "channel" if self.group_size is None else "group",
                "symmetric": self.symmetric,
                "type": "int",
            }
            if actorder is not None:
                args["actorder"] = actorder
            if observer is not None:
                args["observer"] = observer
            return args
        if self.kind == "nvfp4":
            return {"dynamic": False, "group_size": self.group_size, "num_bits": 4,
                    "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                    "type": "float"}
        if self.kind == "mxfp4":
            return {"dynamic": False, "group_size": self.group_size, "num_bits": 4, "scale_dtype": "torch.uint8",
                    "strategy": "group", "symmetric": True, "type": "float"}
        raise ConfigError("bf16 has no compressed-tensors form: a dense layer is listed in 'ignore'")

    def input_args(self) -> dict[str, Any] | None:
        """The config group's ``input_activations`` (None: activations stay in the model dtype)."""
        if not self.act_quant:
            return None
        if self.w8a8 or self.int4_act:
            # W4A8 / W4A4 int4: compressed-tensors' W4A8 / W4AFP8 / W4A4 presets (8 or 4 bits, token,
            # symmetric, dynamic).
            args = {"dynamic": self.act_strategy != "tensor",
                    "group_size": W8A8_BLOCK if self.act_strategy == "group" else None,
                    "num_bits": ACT_BITS.get(self.act_dtype, 8),
                    "strategy": self.act_strategy, "symmetric": True,
                    "type": "float" if self.act_codes == "fp8" else "int"}
            if self.act_strategy == "tensor":
                args["observer"] = "static_minmax"        # the calibration inputs' max |x|, as FP8's preset says
            return args
        # NVFP4 W4A4: dynamic per-block local scales over a static global scale from calibration.
        return {"dynamic": "local", "group_size": self.group_size, "num_bits": 4, "observer": "static_minmax",
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                "type": "float"}

    @classmethod
    def from_ct_args(cls, ct_format: str, weights: dict[str, Any] | None,
                     input_activations: dict[str, Any] | None, where: str) -> WeightFormat:
        """The format of a compressed-tensors config group (its ``format``, ``weights`` and
        ``input_activations``); CheckpointError naming ``where`` for what compress cannot run.
        Provenance (observer, actorder) is the caller's to read from ``weights``."""
        w = weights or {}
        if ct_format in (CT_FORMATS["fp8"], CT_INT_W8A8):
            return cls._from_w8a8_args(ct_format, w, input_activations, where)
        kind = next((k for k, f in CT_FORMATS.items() if f == ct_format), None)
        if kind is None or (kind == "int" and w.get("type", "int") != "int"):
            raise CheckpointError(f"{where} has format {ct_format!r} (weights type {w.get('type')!r}); compress "
                                  f"runs {CT_FORMATS['int']!r} integer weights, "
                                  f"{CT_FORMATS['nvfp4']}, {CT_FORMATS['mxfp4']} and the W8A8 "
                                  f"{CT_FORMATS['fp8']}, {CT_INT_W8A8} schemes ({', '.join(W8A8_SCHEMES)})")
        if kind == "int":
            strategy = w.get("strategy")
            if strategy not in ("group", "channel"):
                raise CheckpointError(f"{where} has weight strategy {strategy!r}; compress runs 'group' and "
                                      f"'channel'")
            try:
                fmt = cls("int", int(w["num_bits"]), w.get("group_size") if strategy == "group" else None,
                          bool(w.get("symmetric", True)))
            except (ConfigError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{where}: weights {w} are not a valid integer format ({exc}); the config "
                                      f"is damaged") from None
            return fmt if not input_activations else cls._int4_act_from_args(fmt, input_activations, where)
        weight_only = cls(kind, 4, BLOCK[kind])
        want = weight_only.weights_args()
        for key in ("num_bits", "type", "group_size", "strategy"):
            if w.get(key) != want[key]:
                raise CheckpointError(f"{where}: format {ct_format!r} needs weights {key}={want[key]!r}, got "
                                      f"{w.get(key)!r}; the config is damaged or from an unknown variant")
        if not input_activations:
            return weight_only
        if kind == "nvfp4":
            w4a4 = dataclasses.replace(weight_only, act_quant=True)
            want_in = w4a4.input_args()
            if all(input_activations.get(k) == want_in[k] for k in ("dynamic", "group_size", "num_bits", "type")):
                return w4a4
        raise CheckpointError(f"{where}: activations quantized as {input_activations}; compress simulates NVFP4 "
                              f"W4A4 (dynamic 'local' {BLOCK['nvfp4']}-blocks) only; load this checkpoint with vLLM")

    @classmethod
    def _int4_act_from_args(cls, weights: WeightFormat, input_activations: dict[str, Any],
                            where: str) -> WeightFormat:
        """The W4A8 / W4A4 int4 format of pack-quantized ``weights`` whose ``input_activations``
        match such a scheme's key by key; CheckpointError naming ``where`` otherwise."""
        keys = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size")
        if weights.bits == 4 and weights.symmetric:
            for scheme in INT4_ACT_SCHEMES:
                fmt = cls.from_scheme(scheme, 4, weights.group_size, True)
                if all(_ct_value(input_activations, k) == _ct_value(fmt.input_args(), k) for k in keys):
                    return fmt
        raise CheckpointError(f"{where} quantizes activations as {input_activations} over {weights} weights; "
                              f"compress runs int4 symmetric weights with 8-bit or int4 activations dynamic per "
                              f"token ({', '.join(INT4_ACT_SCHEMES)}: compressed-tensors' W4A8, W4AFP8 and "
                              f"W4A4); load this checkpoint with vLLM")

    @classmethod
    def _from_w8a8_args(cls, ct_format: str, w: dict[str, Any], input_activations: dict[str, Any] | None,
                        where: str) -> WeightFormat:
        """The W8A8 scheme whose ``weights_args``/``input_args`` the group's match, key by key (the
        keys vLLM and compressed-tensors act on); CheckpointError naming ``where`` otherwise."""
        kind = "fp8" if ct_format == CT_FORMATS["fp8"] else "int"
        keys = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size", "block_structure")

        def same(got: dict[str, Any] | None, want: dict[str, Any] | None) -> bool:
            if not got or not want:
                return not got and not want
            return all(_ct_value(got, k) == _ct_value(want, k) for k in keys)

        for scheme, (scheme_kind, _, _) in W8A8_TABLE.items():
            fmt = cls.from_scheme(scheme)
            if scheme_kind == kind and same(w, fmt.weights_args()) and same(input_activations, fmt.input_args()):
                return fmt
        ours = ", ".join(s for s, (k, _, _) in W8A8_TABLE.items() if k == kind)
        what = "weight-only (16-bit activations)" if not input_activations else f"activations {input_activations}"
        if kind == "int" and w.get("num_bits") == 4:
            raise CheckpointError(f"{where}: format {ct_format!r} with 4-bit weights {w} stores W4A8/W4A4 codes "
                                  f"unpacked (one int8 per weight; compressed-tensors' default for its W4A8 and W4A4 "
                                  f"presets); compress reads W4A8 and W4A4 int4 as 'pack-quantized' (weight_packed), "
                                  f"as vLLM's W4A8 / W4A4 GPU kernels do. "
                                  f"Load this checkpoint with vLLM, or re-save it with "
                                  f"quantization_format='pack-quantized'")
        raise CheckpointError(f"{where}: format {ct_format!r} with weights {w} and {what} is not a W8A8 variant "
                              f"compress runs ({ours}: compressed-tensors' FP8_DYNAMIC, FP8_BLOCK, FP8 and W8A8 "
                              f"presets); load this checkpoint with vLLM")


def _ct_value(args: dict[str, Any], key: str) -> Any:
    """A compressed-tensors argument as it means: absent keys at their defaults, lists as lists."""
    default = {"symmetric": True, "dynamic": False}.get(key)
    value = args.get(key, default)
    return list(value) if isinstance(value, (list, tuple)) else value
