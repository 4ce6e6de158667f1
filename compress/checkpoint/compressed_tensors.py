"""The compressed-tensors "pack-quantized" checkpoint format: writing its config, reading it back.

What we rely on (checked against compressed-tensors 0.20.0 and vLLM's loader; see
docs/checkpoint-format.md): ``config.json["quantization_config"]`` with ``quant_method:
"compressed-tensors"``, ``format: "pack-quantized"``, ``config_groups`` whose ``targets`` match a
module by exact name, ``re:`` regex (``re.match``) or class name, and an ``ignore`` list naming every
targeted Linear that stayed dense. Tensors per quantized module: ``weight_packed``,
``weight_scale``, ``weight_shape`` and, when asymmetric, ``weight_zero_point``.

A config group's ``format``, ``weights`` and ``input_activations`` are a ``WeightFormat``'s
(``ct_format``, ``weights_args()``, ``input_args()``); reading a group back gives a WeightFormat
(``WeightFormat.from_ct_args``), whose ``empty_module`` is what the checkpoint's tensors load into.

W8A8 (FP8 / INT8 weights and activations; docs/checkpoint-format.md, "W8A8 FP8/INT8"): groups of
format ``float-quantized`` (fp8, fp8-block, fp8-static) or ``int-quantized`` (w8a8-int8,
w8a8-int8-static), tensors ``weight`` (float8_e4m3fn / int8, (out, in)), ``weight_scale`` (model
dtype; (out, 1), (1,) or (ceil(out/128), ceil(in/128))) and, static activations only,
``input_scale`` ((1,), model dtype). Shaped as vLLM's compressed-tensors schemes read them (vLLM
sources read, paths in vllm-project/vllm):

- ``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``: picks the
  scheme from a group's ``weights`` / ``input_activations``: ``_is_fp8_w8a8`` (float weights and
  activations, symmetric static weights with strategy tensor, channel or block; activations dynamic,
  or static per tensor), ``_is_dynamic_token_w8a8`` / ``_is_static_tensor_w8a8`` for int (8 bits,
  weights tensor or channel, symmetric; activations per token dynamic or per tensor static);
- ``.../compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py`` (``CompressedTensorsW8A8Fp8``):
  creates ``weight`` float8_e4m3fn (out, in), ``weight_scale`` float32 (out, 1) per channel, one per
  fused shard per tensor (then requantized to their max), (ceil(out/128), ceil(in/128)) per block,
  and ``input_scale`` (one per shard, their max used) when static; our model-dtype scales are cast
  to float32 on load. Block layers go through ``validate_fp8_block_shape``
  (``.../layers/quantization/utils/fp8_utils.py``): in a fused layer (q/k/v, gate/up) every shard
  but the last must have out_features divisible by 128, and under tensor parallelism each shard of
  in_features too; compressed-tensors' ``initialize_qparams`` notes that vLLM's block kernels need
  in_features divisible by 128. Hence the export warning naming such layers;
- ``.../compressed_tensors/schemes/compressed_tensors_w8a8_int8.py`` (``CompressedTensorsW8A8Int8``):
  int8 ``weight`` (out, in), ``weight_scale`` float32 (out, 1) per channel, ``input_scale`` (1,)
  (its max) when static, ``input_zero_point`` only for asymmetric activations (we write symmetric).

W4A8 (w4a8-int8, w4a8-fp8; docs/w8a8.md, "W4A8"): the ``pack-quantized`` tensors of int4 weights
plus ``input_activations`` 8-bit, dynamic, per token (compressed-tensors 0.20.1's W4A8 / W4AFP8
presets). ``pack-quantized`` rather than compressed-tensors' inferred ``int-quantized`` (unpacked
int8 codes) because vLLM's W4A8 kernels read packed words: ``_is_fp8_w4a8`` ->
``CompressedTensorsW4A8Fp8`` (``weight_packed`` int32, group 128, sm90) whatever the format, and
``_is_wNaM_int`` -> ``CompressedTensorsWNA8Int`` only for ``pack-quantized``. ``install_quant_linears``
rebuilds them as ``QuantLinear`` with ``act_dtype`` (the format's ``empty_module``).

W4A4 int4 (w4a4-int4; docs/w8a8.md, "W4A4 int4"): the same ``pack-quantized`` int4 tensors with
``input_activations`` 4-bit int, dynamic, per token, symmetric (compressed-tensors 0.20.1's W4A4
preset). vLLM main's ``_is_wNaM_int`` with ``input_quant.num_bits == 4`` picks
``CompressedTensorsWNA4Int`` (Humming kernels; read, not run here).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..formats import WeightFormat
from ..kv.model import kv_config_of, kv_scales_of
from ..moe import router_names, to_checkpoint_name
from ..quant.packed import PackedLinear

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
# The compressed-tensors release whose layout we write (dense bit packing for 3/5/6/7 bits).
CT_VERSION = "0.20.0"
# Model types whose transformers weight init reads ``module.weight`` of the family's own nn.Linear
# subclass without checking it exists (transformers 5.25: FalconPreTrainedModel._init_weights on
# FalconLinear). transformers runs that init on every module after loading, and compressed-tensors'
# compressed linears hold weight_packed/weight_scale/weight_shape instead of ``weight``, so
# from_pretrained fails with "'FalconLinear' object has no attribute 'weight'". Their checkpoints
# ask transformers to dequantize while loading ("dequantize": true, a CompressedTensorsConfig field;
# compressed-tensors' QuantizationConfig and vLLM ignore it). tests/checkpoint/test_families_export.py
# fails once transformers loads them compressed, to say the entry can go.
DEQUANTIZE_ON_LOAD = frozenset({"falcon"})


def config_group(module: PackedLinear) -> dict[str, Any]:
    """The config group (without ``targets``) that describes a packed module: its format's
    compressed-tensors arguments (``WeightFormat.of_module``) with the module's provenance
    (observer, actorder)."""
    fmt = WeightFormat.of_module(module)
    weights = fmt.weights_args(observer=module.observer, actorder=getattr(module, "actorder", None))
    return {"format": fmt.ct_format, "input_activations": fmt.input_args(), "output_activations": None,
            "weights": weights}


def kv_cache_scheme(model: nn.Module) -> dict[str, Any] | None:
    """The ``kv_cache_scheme`` of an fp8 KV cache with calibrated scales (what vLLM reads with
    ``k_scale``/``v_scale``); None otherwise: integer KV caches are ours alone and travel in
    ``config.json["compress_kv_cache"]``."""
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
    packed: list[tuple[str, dict[str, Any]]] = []
    dense_linears: list[str] = list(router_names(model))       # MoE routers are never quantized
    for name, module in model.named_modules():
        if name in dense_linears:
            continue
        if getattr(module, "sparse_layout", False):
            dense_linears.append(name)         # our compact 2:4 layout: compress_sparsity describes it
        elif isinstance(module, PackedLinear):
            packed.append((name, config_group(module)))
        elif isinstance(module, nn.Linear):
            dense_linears.append(name)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    # Names as the checkpoint spells them (Mixtral's experts live under block_sparse_moe there).
    return assemble_quantization_config([(to_checkpoint_name(model_type, n), g) for n, g in packed],
                                        [to_checkpoint_name(model_type, n) for n in dense_linears], model_type, kv)


def assemble_quantization_config(packed: list[tuple[str, dict[str, Any]]], dense_linears: list[str],
                                 model_type: str, kv: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``quantization_config`` of a checkpoint whose quantized modules are ``packed`` ((checkpoint
    name, ``config_group``) in module order) and whose dense linears are ``dense_linears``
    (checkpoint names), with ``kv`` as its ``kv_cache_scheme``; None when there is neither. Written
    once for the model-based export and the model-free path (``model_free.py``), which has no model."""
    # Modules whose config groups read the same share one group (a format's layers with and without
    # a narrower last group do: compressed-tensors does not record partial groups).
    by_group: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name, group in packed:
        by_group.setdefault(json.dumps(group, sort_keys=True), (group, []))[1].append(name)
    if not by_group and kv is None:
        return None
    groups = {}
    for i, (group, names) in enumerate(by_group.values()):
        # One group: target the class; several: each group names its modules exactly.
        targets = ["Linear"] if len(by_group) == 1 else sorted(names)
        groups[f"group_{i}"] = {**group, "targets": targets}
    formats = {group["format"] for group, _ in by_group.values()} or {"dense"}
    return {
        **_load_options(model_type, len(by_group)),
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": sorted(set(dense_linears)) if by_group else [],
        "kv_cache_scheme": kv,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _load_options(model_type: str, n_groups: int) -> dict[str, Any]:
    """transformers load options a checkpoint of this family needs (see DEQUANTIZE_ON_LOAD)."""
    if model_type not in DEQUANTIZE_ON_LOAD or not n_groups:
        return {}
    if n_groups == 1:
        return {"dequantize": True}
    # transformers' dequantize-on-load decodes every layer with one config group's scheme.
    log.warning("%s: transformers cannot load this checkpoint (%d config groups): its %s linears must be "
                "dequantized while loading, which transformers does with a single scheme for all layers; "
                "compress and vLLM load it. Quantize every layer with one scheme for transformers.",
                model_type, n_groups, model_type)
    return {}


def _match(name: str, module: nn.Module, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or any(cls.__name__ == p for cls in type(module).__mro__):
            return True
    return False


def parse_config(qc: dict[str, Any], where: str
                 ) -> tuple[list[tuple[list[str], WeightFormat, dict[str, str | None]]], list[str]]:
    """(targets, format, provenance) per config group, and the ignore list; refuses what we cannot
    run. Provenance is the ``observer``/``actorder`` an integer or W8A8 group records (FP4: none)."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quant_method {qc.get('quant_method')!r} is not {QUANT_METHOD!r}")
    groups = []
    for gname, group in (qc.get("config_groups") or {}).items():
        at = f"{where}: config group {gname!r}"
        if group.get("output_activations"):
            raise CheckpointError(f"{at} quantizes output activations, which compress does not run; load it "
                                  f"with vLLM")
        w = group.get("weights") or {}
        fmt = WeightFormat.from_ct_args(group.get("format") or qc.get("format"), w,
                                        group.get("input_activations"), at)
        provenance = ({"observer": w.get("observer"), "actorder": w.get("actorder")}
                      if fmt.kind == "int" or fmt.w8a8 else {})
        groups.append((list(group.get("targets") or []), fmt, provenance))
    if not groups and not qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{where}: quantization_config has no config_groups and no kv_cache_scheme")
    return groups, list(qc.get("ignore") or [])


def install_quant_linears(model: nn.Module, qc: dict[str, Any], where: str) -> int:
    """Replace each Linear the config quantizes by an empty packed layer (QuantLinear, FP4Linear or W8A8Linear,
    on the Linear's device, usually meta) ready for ``load_state_dict(assign=True)``. Returns how
    many were replaced."""
    groups, ignore = parse_config(qc, where)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _match(name, module, ignore):
            continue
        for targets, fmt, provenance in groups:
            if _match(name, module, targets):
                parent, _, child = name.rpartition(".")
                new = fmt.empty_module(module.in_features, module.out_features, bias=module.bias is not None,
                                       dtype=module.weight.dtype, device=module.weight.device, **provenance)
                setattr(model.get_submodule(parent) if parent else model, child, new)
                replaced += 1
                break
    return replaced
