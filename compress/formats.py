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

``kind`` names the storage ("dense", "int", "nvfp4", "mxfp4") and ``act_quant`` whether the
activations are quantized too. Formats still to come slot in as a kind (``fp8``: float8 weights)
or as ``act_quant`` on a kind (``w8a8-int8``: int8 weights and activations).

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

KINDS = ("dense", "int", "nvfp4", "mxfp4")
# The 4-bit float schemes as configs name them: scheme -> (kind, activations quantized too).
_FP4_SCHEMES = {"nvfp4a16": ("nvfp4", False), "nvfp4": ("nvfp4", True), "mxfp4": ("mxfp4", False)}
FP4_SCHEMES = tuple(_FP4_SCHEMES)
SCHEMES = ("int",) + FP4_SCHEMES                    # the values of IntWeightConfig.scheme
# compressed-tensors' "format" of a config group, per kind.
CT_FORMATS = {"int": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_DENSE_NAMES = ("bf16", "dense", "fp16", "float")
_INT_RE = re.compile(r"^(?P<u>u?)int(?P<bits>\d+)(?:-g(?P<g>\d+))?(?P<asym>-asym)?(?P<partial>-partial)?$")
SPELLINGS = ("bf16, int8 (a scale per output channel), int4-g64 (a scale per 64 inputs), int3-g64-asym "
             "(zero points; uint3-g64 reads the same), int4-g128-partial (a narrower last group allowed), "
             "nvfp4a16, nvfp4 (W4A4) or mxfp4")

# kind -> (packed module class, solver grid class), registered by compress.quant.formats.
_KIND_CLASSES: dict[str, tuple[type, type]] = {}


def register_kind(kind: str, *, packed: type, grid: type) -> None:
    """Register the packed module class and the solver grid class of ``kind``, once.

    ``packed`` provides ``for_format(fmt, in_features, out_features, *, bias, dtype, device,
    observer, actorder)`` (an empty module) and ``from_result(fmt, result, *, bias, dtype,
    input_amax, observer, actorder)`` (a module holding a solve's codes); ``grid`` provides
    ``from_format(fmt, scale_dtype, observer)``."""
    if kind not in KINDS or kind == "dense":
        raise TypeError(f"kind must be one of {', '.join(KINDS[1:])}, got {kind!r}")
    if kind in _KIND_CLASSES:
        raise TypeError(f"weight format kind {kind!r} is registered already "
                        f"({_KIND_CLASSES[kind][0].__name__}, {_KIND_CLASSES[kind][1].__name__})")
    _KIND_CLASSES[kind] = (packed, grid)


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
    act_quant:      activations are quantized too (nvfp4: W4A4)
    partial_groups: int only: the last group of a row may be narrower than group_size
    """

    kind: str
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    act_quant: bool = False
    partial_groups: bool = False

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ConfigError(problem)

    def _problem(self) -> str | None:
        kind, bits, g = self.kind, self.bits, self.group_size
        if kind not in KINDS:
            return f"weight format kind must be one of {', '.join(KINDS)}, got {kind!r}"
        if kind == "dense":
            if (bits, g, self.symmetric, self.act_quant, self.partial_groups) != (16, None, True, False, False):
                return "a dense format is 16-bit, with no groups, zero points or activation quantization"
            return None
        if kind == "int":
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                return f"bits must be between 2 and 8, got {bits}"
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
                return f"group_size must be a positive integer or null (per channel), got {g}"
            if self.act_quant:
                return "integer formats with quantized activations (w8a8-int8) are not implemented yet"
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

    # --- names --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> WeightFormat:
        """The format a spelling names (see the module docstring); ConfigError listing the valid
        spellings otherwise."""
        original = text
        text = str(text).strip().lower()
        if text in _DENSE_NAMES:
            return cls("dense", 16)
        if text in _FP4_SCHEMES:
            return cls.from_scheme(text)
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
        if self.kind == "int":
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
        """The scheme as configs name it: int, nvfp4a16, nvfp4, mxfp4 (dense: "dense")."""
        if self.kind in ("dense", "int"):
            return self.kind
        return next(s for s, (k, act) in _FP4_SCHEMES.items() if (k, act) == (self.kind, self.act_quant))

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    @property
    def family(self) -> str:
        """The kernel family of the cost model's efficiency tables: bf16, int or fp4."""
        return {"dense": "bf16", "int": "int"}.get(self.kind, "fp4")

    # --- configs and modules --------------------------------------------------------------------
    @classmethod
    def from_scheme(cls, scheme: str, bits: int = 4, group_size: int | None = None, symmetric: bool = True,
                    partial_groups: bool = False) -> WeightFormat:
        """The format of a config's fields. The FP4 schemes fix their block, so ``group_size`` and
        ``partial_groups`` do not apply to them (but must still be valid values); ``partial_groups``
        of a per-channel integer format means nothing and is dropped."""
        if scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
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
        if self.kind == "int":
            out = {"scheme": "int", "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
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
        raise ConfigError(f"a {type(module).__name__} has no weight format (nn.Linear, QuantLinear and FP4Linear "
                          f"have one)")

    # --- shapes -------------------------------------------------------------------------------
    def check_shape(self, name: str, in_features: int) -> None:
        """Refuse a layer (``name``, ``in_features`` inputs) this format cannot hold, saying what to do."""
        if self.kind == "int":
            check_group_size(name, in_features, self.group_size, self.partial_groups)
        elif not self.dense and in_features % self.group_size:
            block = self.group_size
            raise ConfigError(f"{self.scheme} stores blocks of {block} inputs, but in_features {in_features} of "
                              f"{name} is not a multiple of {block}; add {name!r} to ignore (it stays in full "
                              f"precision)")

    def fits(self, in_features: int) -> bool:
        """Whether a layer with ``in_features`` inputs can take this format (``check_shape`` passes)."""
        if self.dense or self.group_size is None or (self.kind == "int" and self.partial_groups):
            return True
        return in_features % self.group_size == 0

    # --- solver and packed module ---------------------------------------------------------------
    def _classes(self) -> tuple[type, type]:
        if self.dense:
            raise ConfigError("bf16 is not quantized: it has no solver grid and no packed module")
        if self.kind not in _KIND_CLASSES:
            raise ConfigError(f"no packed module is registered for {self}; compress.quant.formats registers "
                              f"{', '.join(KINDS[1:])} (import compress)")
        return _KIND_CLASSES[self.kind]

    @property
    def packed_class(self) -> type[nn.Module]:
        """The module class that stores this format (nn.Linear for dense)."""
        return nn.Linear if self.dense else self._classes()[0]

    def solver_grid(self, scale_dtype: torch.dtype, observer: str = "minmax"):
        """A fresh grid for one solve (``compress.quant.formats.IntFormat`` / ``FP4Format``): how
        groups get their scales (``observer``: minmax or mse; integer scales are rounded to
        ``scale_dtype``, the model dtype) and how a column is rounded."""
        return self._classes()[1].from_format(self, scale_dtype, observer)

    def pack(self, result, *, bias: torch.Tensor | None, dtype: torch.dtype, input_amax: torch.Tensor | None = None,
             observer: str | None = None, actorder: str | None = None) -> nn.Module:
        """The packed module (QuantLinear, FP4Linear) holding a solve's ``result`` (a
        ``compress.quant.formats.QuantResult`` of one module's rows). ``input_amax``: the
        calibration inputs' max |x|, required when ``act_quant`` and ignored otherwise;
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
        """The config group's ``format``: pack-quantized, nvfp4-pack-quantized, mxfp4-pack-quantized."""
        if self.dense:
            raise ConfigError("bf16 has no compressed-tensors form: a dense layer is listed in 'ignore'")
        return CT_FORMATS[self.kind]

    def weights_args(self, observer: str | None = None, actorder: str | None = None) -> dict[str, Any]:
        """The config group's ``weights``, as compressed-tensors 0.20 serializes them. Integer groups
        carry the provenance ``observer``/``actorder`` when given; the FP4 presets carry none."""
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
        kind = next((k for k, f in CT_FORMATS.items() if f == ct_format), None)
        if kind is None or (kind == "int" and w.get("type", "int") != "int"):
            raise CheckpointError(f"{where} has format {ct_format!r} (weights type {w.get('type')!r}); compress "
                                  f"runs {CT_FORMATS['int']!r} integer weights and "
                                  f"{CT_FORMATS['nvfp4']}, {CT_FORMATS['mxfp4']}")
        if kind == "int":
            if input_activations:
                raise CheckpointError(f"{where} quantizes activations, which compress does not run yet; load "
                                      f"it with vLLM")
            strategy = w.get("strategy")
            if strategy not in ("group", "channel"):
                raise CheckpointError(f"{where} has weight strategy {strategy!r}; compress runs 'group' and "
                                      f"'channel'")
            try:
                return cls("int", int(w["num_bits"]), w.get("group_size") if strategy == "group" else None,
                           bool(w.get("symmetric", True)))
            except (ConfigError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{where}: weights {w} are not a valid integer format ({exc}); the config "
                                      f"is damaged") from None
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
