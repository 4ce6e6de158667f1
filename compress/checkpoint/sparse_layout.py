"""The two ways a pruned model is written.

- ``dense`` (default): zeros are stored as zeros, so the checkpoint is a plain transformers one, or
  compressed-tensors pack-quantized when the survivors are quantized. Every standard tool loads it
  (compressed-tensors and vLLM have dropped their sparse checkpoint formats).
- ``compact``: our 2:4 layout (docs/sparse-format.md, version 1): each 2:4 linear becomes a
  ``Sparse24Linear`` with the kept values (float, or int4 codes with their group scales) and 2-bit
  positions, about half the bytes of the dense weight, feeding the 2:4 kernel directly. Only
  compress loads it; ``config.json["compress_sparsity"]`` lists the modules and their storage.

Both are produced by swapping modules for the duration of the export (``swapped``); the user's
model is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..conv1d import TransposedLinear
from ..errors import CheckpointError, ConfigError
from ..kernels.packing import unpack_int32
from ..kernels.sparse24_linear import pack_24
from ..modeling import find_decoder_layers, get_module, set_module
from ..pruning.masks import check_nm
from ..pruning.sparse_linear import Sparse24Linear
from ..quant.linear import DYNAMIC_ACTORDER, QuantLinear

log = logging.getLogger(__name__)

CONFIG_KEY = "compress_sparsity"
FORMAT = "compress-2of4-compact"
VERSION = 1
LAYOUTS = ("dense", "compact")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put ``replacements`` (module name -> module) into ``model``; restore the originals after."""
    originals = {name: get_module(model, name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_module(model, name, module)
        yield
    finally:
        for name, module in originals.items():
            set_module(model, name, module)


def _compact_quant(module: QuantLinear) -> Sparse24Linear | None:
    """A symmetric int4 QuantLinear whose codes are 2:4 -> int4 Sparse24Linear (same codes, same scales)."""
    if module.bits != 4 or not module.symmetric or module.actorder in DYNAMIC_ACTORDER:
        return None
    if module.act_dtype is not None:           # W4A8: the 2:4 layout has no activation rounding; stay dense
        return None
    g = module.group_size
    if g is not None and (g % 8 or module.in_features % g):
        return None
    codes = unpack_int32(module.weight_packed, 4, module.in_features).float()            # (out, in)
    if not check_nm(codes, 2, 4):
        return None
    kept, meta = pack_24(codes)
    return Sparse24Linear.from_parts(meta, codes=kept.round(), scale=module.weight_scale, group_size=g,
                                     bias=module.bias, dtype=module.dtype, backend=module.backend)


def compact_replacements(model: nn.Module) -> dict[str, Sparse24Linear]:
    """Every decoder linear that is 2:4 sparse and fits the layout (in_features a multiple of 8;
    int4: symmetric, group size a multiple of 8 dividing in_features), as a Sparse24Linear."""
    _, layers = find_decoder_layers(model)
    layer_ids = {id(m) for m in layers.modules()}
    out: dict[str, Sparse24Linear] = {}
    skipped, transposed = [], []
    for name, module in model.named_modules():
        if id(module) not in layer_ids or isinstance(module, Sparse24Linear):
            continue
        if isinstance(module, TransposedLinear):
            # A float Sparse24Linear forgets the family's Conv1D layout, so a later dense export of the
            # loaded model could not write it back as transformers reads it: these stay dense here.
            transposed.append(name)
        elif isinstance(module, nn.Linear):
            w = module.weight.detach()
            if module.in_features % 8 or not (w == 0).any() or not check_nm(w, 2, 4):
                skipped.append(name)
                continue
            out[name] = Sparse24Linear.from_dense(w, module.bias, backend="auto")
        elif isinstance(module, QuantLinear):
            new = _compact_quant(module)
            if new is None:
                skipped.append(name)
            else:
                out[name] = new
    if transposed:
        log.warning("compact layout: %d float linears that are Conv1D in transformers (e.g. %s) are written dense, "
                    "in Conv1D's layout (compress stores only quantized Conv1D layers as 2:4)", len(transposed),
                    transposed[0])
    if not out:
        raise CheckpointError("layout 'compact' stores 2:4 sparse linears, and this model has none (prune it "
                              "with pattern '2:4' first"
                              + ("; float Conv1D layers (GPT-2) stay dense, quantize them to int4 to store them "
                                 "as 2:4" if transposed else "") + "); use layout 'dense'")
    if skipped:
        log.info("compact layout: %d decoder linears are not 2:4 (or do not fit the layout) and stay as they "
                 "are, e.g. %s", len(skipped), skipped[0])
    return out


def dense_replacements(model: nn.Module) -> dict[str, nn.Module]:
    """Every Sparse24Linear as what standard tools load: float -> nn.Linear with zeros; int4 ->
    a pack-quantized QuantLinear holding the same codes (zeros at the pruned positions)."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Sparse24Linear):
            continue
        w = module.dequantize(module.dtype)
        if module.bits is None:
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=w.device, dtype=w.dtype)
            lin.weight.data.copy_(w)
            if module.bias is not None:
                lin.bias.data.copy_(module.bias)
            out[name] = lin
        else:
            scale = module.weight_scale.float()
            g = module.group_size or module.in_features
            codes = (w.float() / scale.repeat_interleave(g, dim=1)).round().to(torch.int8)
            out[name] = QuantLinear.from_codes(codes, module.weight_scale, None, bits=4, group_size=module.group_size,
                                               bias=module.bias, dtype=module.dtype)
    return out


def sparsity_config(model: nn.Module) -> dict[str, Any] | None:
    """``config.json["compress_sparsity"]`` for the Sparse24Linear modules of ``model``."""
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, Sparse24Linear):
            modules[name] = {"values": "int4" if module.bits == 4 else str(module.dtype).removeprefix("torch."),
                             "group_size": module.group_size}
    if not modules:
        return None
    return {"format": FORMAT, "version": VERSION, "pattern": "2:4", "modules": modules}


def install_sparse_linears(model: nn.Module, entry: dict, where: str) -> int:
    """Replace the modules ``compress_sparsity`` names by empty Sparse24Linear (on the meta device)
    for the checkpoint's tensors to fill."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise CheckpointError(f"{where}: {CONFIG_KEY} has format {entry.get('format') if isinstance(entry, dict) else entry!r}; "
                              f"this compress reads {FORMAT!r}")
    if entry.get("version") != VERSION:
        raise CheckpointError(f"{where}: {CONFIG_KEY} version {entry.get('version')!r} is not supported; this "
                              f"compress reads version {VERSION}; upgrade compress")
    modules = entry.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{where}: {CONFIG_KEY}.modules must name the 2:4 modules; the config is damaged")
    for name, spec in modules.items():
        try:
            old = get_module(model, name)
        except AttributeError:
            raise CheckpointError(f"{where}: {CONFIG_KEY} names module {name!r}, which the model does not have; "
                                  f"the checkpoint is from another model") from None
        values = spec.get("values") if isinstance(spec, dict) else None
        if values not in ("int4", "float32", "float16", "bfloat16"):
            raise CheckpointError(f"{where}: {CONFIG_KEY}.modules[{name!r}].values is {values!r}; expected int4, "
                                  f"float32, float16 or bfloat16")
        in_f = getattr(old, "in_features", None)
        out_f = getattr(old, "out_features", None)
        has_bias = getattr(old, "bias", None) is not None
        dtype = torch.float32 if values == "int4" else getattr(torch, values)
        if values == "int4":
            dtype = old.weight.dtype if isinstance(old, nn.Linear) else getattr(old, "dtype", torch.float32)
        new = Sparse24Linear(in_f, out_f, bits=4 if values == "int4" else None,
                             group_size=spec.get("group_size") if values == "int4" else None,
                             bias=has_bias, dtype=dtype, device="meta")
        set_module(model, name, new)
    return len(modules)
