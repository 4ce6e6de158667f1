"""The compressed-tensors "pack-quantized" checkpoint format: writing its config, reading it back.

What we rely on (checked against compressed-tensors 0.20.0 and vLLM's loader; see
docs/checkpoint-format.md): ``config.json["quantization_config"]`` with ``quant_method:
"compressed-tensors"``, ``format: "pack-quantized"``, ``config_groups`` whose ``targets`` match a
module by exact name, ``re:`` regex (``re.match``) or class name, and an ``ignore`` list naming every
targeted Linear that stayed dense. Tensors per quantized module: ``weight_packed``,
``weight_scale``, ``weight_shape`` and, when asymmetric, ``weight_zero_point``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..quant.fp4_linear import FP4Linear
from ..quant.linear import QuantLinear
from ..quant.packed import PackedLinear

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
# The compressed-tensors release whose layout we write (dense bit packing for 3/5/6/7 bits).
CT_VERSION = "0.20.0"


@dataclasses.dataclass(frozen=True)
class IntScheme:
    bits: int
    group_size: int | None
    symmetric: bool
    actorder: str | None = None
    observer: str | None = None

    def weights_args(self) -> dict[str, Any]:
        # Keys as compressed-tensors serializes them: None-valued optional keys (block_structure,
        # scale_dtype, zp_dtype, actorder) are left out, which also keeps readers older than 0.13
        # (no scale_dtype/zp_dtype fields) able to validate the config.
        args: dict[str, Any] = {
            "dynamic": False,
            "group_size": self.group_size,
            "num_bits": self.bits,
            "strategy": "channel" if self.group_size is None else "group",
            "symmetric": self.symmetric,
            "type": "int",
        }
        if self.actorder is not None:
            args["actorder"] = self.actorder
        if self.observer is not None:
            args["observer"] = self.observer
        return args


    format = FORMAT

    def input_args(self) -> dict[str, Any] | None:
        return None


FP4_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


@dataclasses.dataclass(frozen=True)
class FP4Scheme:
    """NVFP4A16, NVFP4 (W4A4) or MXFP4(A16), as the compressed-tensors 0.20 presets write them."""

    scheme: str                               # nvfp4a16 | nvfp4 | mxfp4

    @property
    def kind(self) -> str:
        return "mxfp4" if self.scheme == "mxfp4" else "nvfp4"

    @property
    def format(self) -> str:
        return FP4_FORMATS[self.kind]

    def weights_args(self) -> dict[str, Any]:
        if self.kind == "nvfp4":
            return {"dynamic": False, "group_size": 16, "num_bits": 4, "scale_dtype": "torch.float8_e4m3fn",
                    "strategy": "tensor_group", "symmetric": True, "type": "float"}
        return {"dynamic": False, "group_size": 32, "num_bits": 4, "scale_dtype": "torch.uint8",
                "strategy": "group", "symmetric": True, "type": "float"}

    def input_args(self) -> dict[str, Any] | None:
        if self.scheme != "nvfp4":
            return None
        # Dynamic per-16 local scales over a static global scale from calibration ("local").
        return {"dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "static_minmax",
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                "type": "float"}


def scheme_of(module: PackedLinear) -> IntScheme | FP4Scheme:
    if isinstance(module, FP4Linear):
        return FP4Scheme(module.scheme)
    return IntScheme(module.bits, module.group_size, module.symmetric, module.actorder, module.observer)


def kv_cache_scheme(model: nn.Module) -> dict[str, Any] | None:
    """The ``kv_cache_scheme`` of an fp8 KV cache with calibrated scales (what vLLM reads with
    ``k_scale``/``v_scale``); None otherwise: integer KV caches are ours alone and travel in
    ``config.json["compress_kv_cache"]``."""
    from ..kv import kv_config_of, kv_scales_of
    cfg = kv_config_of(model)
    if cfg is None or not cfg.is_fp8 or kv_scales_of(model) is None:
        return None
    return {"dynamic": False, "group_size": None, "num_bits": 8,
            "strategy": "attn_head" if cfg.fp8_scale == "head" else "tensor",
            "symmetric": True, "type": "float"}


def parse_kv_cache_scheme(kv: dict[str, Any], where: str) -> str:
    """The fp8 scale granularity ("tensor" | "head") of a kv_cache_scheme we can run."""
    want = {"num_bits": 8, "type": "float", "symmetric": True}
    bad = {k: kv.get(k) for k, v in want.items() if kv.get(k, v) != v}
    if bad or kv.get("dynamic") not in (False, None) or kv.get("strategy") not in ("tensor", "attn_head"):
        raise CheckpointError(f"{where}: kv_cache_scheme {kv} is not a static fp8 (E4M3) cache with per-tensor or "
                              f"per-head scales, the one compress runs; load it with vLLM")
    return "head" if kv["strategy"] == "attn_head" else "tensor"


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The ``quantization_config`` describing the packed modules of ``model`` and its fp8 KV
    cache (None if neither)."""
    kv = kv_cache_scheme(model)
    by_scheme: dict[IntScheme | FP4Scheme, list[str]] = {}
    dense_linears: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, "sparse_layout", False):
            dense_linears.append(name)         # our compact 2:4 layout: compress_sparsity describes it
        elif isinstance(module, PackedLinear):
            by_scheme.setdefault(scheme_of(module), []).append(name)
        elif isinstance(module, nn.Linear):
            dense_linears.append(name)
    if not by_scheme and kv is None:
        return None
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        # One scheme: target the class; several: each group names its modules exactly.
        targets = ["Linear"] if len(by_scheme) == 1 else sorted(names)
        groups[f"group_{i}"] = {"format": scheme.format, "input_activations": scheme.input_args(),
                                "output_activations": None, "targets": targets, "weights": scheme.weights_args()}
    formats = {scheme.format for scheme in by_scheme} or {"dense"}
    return {
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": sorted(dense_linears) if by_scheme else [],
        "kv_cache_scheme": kv,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _match(name: str, module: nn.Module, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or any(cls.__name__ == p for cls in type(module).__mro__):
            return True
    return False


def parse_config(qc: dict[str, Any], where: str) -> tuple[list[tuple[list[str], IntScheme]], list[str]]:
    """(targets, scheme) per config group, and the ignore list; refuses what we cannot run."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quant_method {qc.get('quant_method')!r} is not {QUANT_METHOD!r}")
    groups = []
    for gname, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        w = group.get("weights") or {}
        if fmt in FP4_FORMATS.values():
            groups.append((list(group.get("targets") or []), _parse_fp4(fmt, group, f"{where}: config group {gname!r}")))
            continue
        if fmt != FORMAT or w.get("type", "int") != "int":
            raise CheckpointError(f"{where}: config group {gname!r} has format {fmt!r} (weights type "
                                  f"{w.get('type')!r}); compress runs {FORMAT!r} integer weights and "
                                  f"{', '.join(FP4_FORMATS.values())}")
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(f"{where}: config group {gname!r} quantizes activations, which compress "
                                  f"does not run yet; load it with vLLM")
        strategy = w.get("strategy")
        group_size = w.get("group_size") if strategy == "group" else None
        if strategy not in ("group", "channel"):
            raise CheckpointError(f"{where}: config group {gname!r} has weight strategy {strategy!r}; "
                                  f"compress runs 'group' and 'channel'")
        scheme = IntScheme(int(w["num_bits"]), group_size, bool(w.get("symmetric", True)), w.get("actorder"),
                           w.get("observer"))
        groups.append((list(group.get("targets") or []), scheme))
    if not groups and not qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{where}: quantization_config has no config_groups and no kv_cache_scheme")
    return groups, list(qc.get("ignore") or [])


def _parse_fp4(fmt: str, group: dict[str, Any], where: str) -> FP4Scheme:
    w = group.get("weights") or {}
    kind = "nvfp4" if fmt == FP4_FORMATS["nvfp4"] else "mxfp4"
    want = FP4Scheme("nvfp4a16" if kind == "nvfp4" else "mxfp4").weights_args()
    for key in ("num_bits", "type", "group_size", "strategy"):
        if w.get(key) != want[key]:
            raise CheckpointError(f"{where}: format {fmt!r} needs weights {key}={want[key]!r}, got {w.get(key)!r}; "
                                  f"the config is damaged or from an unknown variant")
    inputs = group.get("input_activations")
    if group.get("output_activations"):
        raise CheckpointError(f"{where}: output activation quantization is not supported; load it with vLLM")
    if not inputs:
        return FP4Scheme("nvfp4a16" if kind == "nvfp4" else "mxfp4")
    if kind == "nvfp4" and inputs.get("dynamic") == "local" and inputs.get("group_size") == 16 \
            and inputs.get("num_bits") == 4 and inputs.get("type") == "float":
        return FP4Scheme("nvfp4")
    raise CheckpointError(f"{where}: activations quantized as {inputs}; compress simulates NVFP4 W4A4 "
                          f"(dynamic 'local' 16-blocks) only; load this checkpoint with vLLM")


def _empty_module(module: nn.Linear, scheme: IntScheme | FP4Scheme) -> PackedLinear:
    common = dict(bias=module.bias is not None, dtype=module.weight.dtype, device=module.weight.device)
    if isinstance(scheme, FP4Scheme):
        return FP4Linear(module.in_features, module.out_features, scheme=scheme.scheme, **common)
    return QuantLinear(module.in_features, module.out_features, bits=scheme.bits, group_size=scheme.group_size,
                       symmetric=scheme.symmetric, actorder=scheme.actorder, observer=scheme.observer, **common)


def install_quant_linears(model: nn.Module, qc: dict[str, Any], where: str) -> int:
    """Replace each Linear the config quantizes by an empty packed layer (QuantLinear or FP4Linear,
    on the Linear's device, usually meta) ready for ``load_state_dict(assign=True)``. Returns how
    many were replaced."""
    groups, ignore = parse_config(qc, where)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _match(name, module, ignore):
            continue
        for targets, scheme in groups:
            if _match(name, module, targets):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, _empty_module(module, scheme))
                replaced += 1
                break
    return replaced
