"""What model-free quantization does with each tensor of a checkpoint, decided from names and shapes
(``plan_checkpoint``): the facts the model-based path learns from the model.

- decoder layers: the indexed list with the most entries (``model.layers.N``, ``transformer.h.N``);
- a linear: a 2-D floating ``<module>.weight``; outside the layers, embeddings (``embed_tokens``,
  ``wte``, ``word_embeddings``, ... any leaf containing ``embed`` but the heads) stay dense and are
  not listed in ``ignore``, as nn.Embedding is not a linear;
- the output head (``lm_head``, ``embed_out``, ``output`` outside the layers) is matched by the
  pattern ``lm_head`` too; a head tied to the embeddings (``tie_word_embeddings``, and equal to the
  embedding when the file holds it) is dense and stored once, under the embedding's name;
- MoE routers (``gate`` / ``shared_expert_gate`` beside ``experts``) stay dense, as the model path
  leaves them;
- q/k/v and gate/up (``modeling.FUSED_SIBLINGS``) of one parent share one NVFP4 global scale;
- families that transformers builds with ``Conv1D`` (GPT-2) store their layer weights (in, out):
  they are transposed before quantizing, as the model path's ``TransposedLinear`` does;
- tensor names are the ones transformers' model class uses when its loader only renames them
  (GPT-NeoX: ``embed_out`` -> ``lm_head``), as the model-based export writes them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from transformers.models.auto.configuration_auto import model_type_to_module_name

from ..errors import CheckpointError, ConfigError
from ..guards import _non_finite
from ..modeling import fused_groups, name_matches
from ..moe import from_checkpoint_name
from ..quant.config import IntWeightConfig
from ..quant.fp4 import nvfp4_global_scale
from .streaming import ST_DTYPES, TensorEntry, TensorSource

try:                                      # the checkpoint renamings transformers' loader applies (5.x)
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings
except ImportError:                       # an older transformers: names stay as they are
    get_checkpoint_conversion_mapping = WeightRenaming = apply_renamings = None

log = logging.getLogger(__name__)

# Leaf module names of embeddings (nn.Embedding: never a linear target, not listed in `ignore`).
EMBEDDINGS = ("embed_tokens", "embed_positions", "embed_in", "wte", "wpe", "word_embeddings",
              "position_embeddings", "token_type_embeddings", "tok_embeddings", "embeddings", "shared")
# Leaf names of output heads outside the layers (GPT-NeoX's embed_out is a linear despite its name).
HEADS = ("lm_head", "embed_out", "output")
HEAD_ALIAS = "lm_head"            # what ignore patterns call the output head, whatever its name
ROUTERS = ("gate", "shared_expert_gate")
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


@dataclasses.dataclass
class Target:
    """One linear to quantize: its checkpoint module name, weight tensor and resolved config."""

    name: str
    weight: str
    cfg: IntWeightConfig
    model_name: str                     # as the model names it (Mixtral: mlp, not block_sparse_moe)
    shape: tuple[int, int]              # (out_features, in_features) as the model computes
    transposed: bool = False            # Conv1D: stored (in, out)
    global_scale: torch.Tensor | None = None    # NVFP4: shared by the fused siblings


@dataclasses.dataclass
class Plan:
    """What the model-free pass does with every tensor of a checkpoint."""

    targets: dict[str, Target]                        # module name -> target
    copies: list[str]                                 # tensors written as they are (cast to the dtype)
    dense_linears: list[str]                          # module names for quantization_config["ignore"]
    dropped: list[str]                                # tied head tensors (stored once, as the embedding)
    embeddings: list[str]
    uncompressed: dict[str, int]                      # >= 2-D float tensors left alone -> parameters
    dtype: torch.dtype                                # the model dtype: scales and dense floats


def rename_as_transformers(source: TensorSource, config: dict) -> None:
    """Spell the tensors as transformers' model class does when its loader only renames them (GPT-NeoX:
    ``embed_out`` -> ``lm_head``), as the model-based export writes them. Families whose mapping also
    converts tensors (MoE expert merges) keep the checkpoint's names, which the model path writes back
    (``moe.to_checkpoint_name``). transformers' mapping is read, not reimplemented: if its API is not
    there, the names stay as they are."""
    if get_checkpoint_conversion_mapping is None:
        return
    keys = [*(config.get("architectures") or []), config.get("model_type")]
    mapping = next((m for m in (get_checkpoint_conversion_mapping(k) for k in keys if k) if m), None)
    if not mapping or any(type(t) is not WeightRenaming for t in mapping):
        return
    renamed = {apply_renamings(name, mapping): e for name, e in source.entries.items()}
    if len(renamed) != len(source.entries):
        raise CheckpointError("two tensors of the checkpoint get one name under transformers' renaming of "
                              f"{keys[0]!r}; the checkpoint is inconsistent")
    moved = [(e.name, new) for new, e in renamed.items() if new != e.name]
    if moved:
        log.info("%d tensor(s) spelled as transformers' model names them (e.g. %s -> %s)", len(moved), *moved[0])
    source.entries = renamed


def read_tensor(source: TensorSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as the loaded model holds it: floats in the model dtype; NaN/inf refused."""
    t = source.get(name)
    bad = _non_finite(t)
    if bad:
        raise CheckpointError(f"{name} has {bad} NaN/inf value{'s' if bad != 1 else ''}; the checkpoint is corrupt "
                              f"or was overflowed in float16 - re-download it, or quantize from a float32/bfloat16 "
                              f"copy")
    return t.to(dtype) if source.entries[name].floating and t.dtype != dtype else t



# --- what to do with each tensor -----------------------------------------------------------------
def decoder_layers_prefix(names: list[str]) -> str | None:
    """The prefix of the repeated decoder layers (``model.layers``): of the indexed lists not nested
    in another, the one with the most entries (``modeling.find_decoder_layers`` by names)."""
    indices: dict[str, set[int]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        i = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        if i is not None:
            indices[".".join(parts[:i])].add(int(parts[i]))
    return max(indices, key=lambda k: len(indices[k])) if indices else None


def _model_dtype(dtype, config: dict, source: TensorSource) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        alias = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
        if alias not in _FLOAT_DTYPES:
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
        return _FLOAT_DTYPES[alias]
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[named]
    first = next((e for e in source.entries.values() if e.floating), None)
    return ST_DTYPES[first.dtype] if first is not None else torch.float32


def _conv1d_family(model_type: str) -> bool:
    """Whether transformers builds ``model_type`` with Conv1D layers (GPT-2): its modeling module
    builds Conv1D layers (``conv1d.builds_conv1d`` without a model). Read from the module's source,
    not imported (importing a modeling module costs seconds). Unknown types: False."""
    try:
        module_name = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module_name}.modeling_{module_name}")
        text = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
    except Exception:                     # noqa: BLE001  (unknown to this transformers: not a Conv1D family)
        return False
    return re.search(r"\bConv1D\(", text) is not None


def plan_checkpoint(source: TensorSource, config: dict, cfg: IntWeightConfig, dtype="auto") -> Plan:
    """Decide, from names and shapes, what the model-based path would do with every tensor of
    ``source`` (see the module docstring): quantize (the targets), copy, or drop (a tied head)."""
    model_type = str(config.get("model_type", ""))
    names = sorted(source.entries, key=natural_key)
    layers = decoder_layers_prefix(names)
    conv1d = _conv1d_family(model_type)
    tie = config.get("tie_word_embeddings")
    expert_blocks = {n.partition(".experts.")[0] for n in names if ".experts." in n}
    plan = Plan({}, [], [], [], [], {}, _model_dtype(dtype, config, source))
    heads: list[str] = []
    tied: list[tuple[str, bool, str]] = []                  # head tensors config.json says are tied
    for name in names:
        e = source.entries[name]
        module, _, leaf_param = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        inside = layers is not None and module.startswith(layers + ".")
        match_names = [from_checkpoint_name(model_type, module)]
        linear = leaf_param == "weight" and len(e.shape) == 2 and e.floating
        if linear and not inside and leaf in HEADS:
            match_names.append(HEAD_ALIAS)
            heads.append(module)
        ignored = any(name_matches(n, cfg.ignore) for n in match_names)
        if not linear:
            if e.floating and len(e.shape) >= 3 and ".experts." in name + "." and not ignored:
                raise CheckpointError(
                    f"{name} is a {len(e.shape)}-D tensor {list(e.shape)}: mixture-of-experts weights stored fused "
                    f"(one tensor for all experts). Model-free quantization quantizes 2-D linear weights; use the "
                    f"model-based path (compress quantize without --model-free), which splits supported families' "
                    f"experts, or add {module!r} to ignore to keep them in full precision")
            if e.floating and len(e.shape) >= 2 and not ignored:
                plan.uncompressed[name] = e.numel
            plan.copies.append(name)
        elif not inside and (leaf in EMBEDDINGS or ("embed" in leaf and leaf not in HEADS)):
            plan.embeddings.append(name)
            plan.copies.append(name)
        elif leaf in ROUTERS and parent in expert_blocks:
            plan.dense_linears.append(module)               # MoE routers stay dense, as in the model path
            plan.copies.append(name)
        elif module in heads and tie is True:
            tied.append((name, ignored, match_names[0]))          # decided once the embeddings are known
        elif ignored:
            plan.dense_linears.append(module)
            plan.copies.append(name)
        else:
            _add_target(plan, cfg, name, e, match_names[0], transposed=conv1d and inside)
    for name, ignored, model_name in tied:
        module = name.rpartition(".")[0]
        if _equals_an_embedding(source, name, plan.embeddings):
            # transformers ties this head to the embedding: the model path leaves it dense and stores it
            # once, under the embedding's name. (A head whose values differ is not tied by transformers.)
            if not ignored:
                log.warning("%s shares its weight with another module (tied embeddings); left unquantized", module)
            plan.dense_linears.append(module)
            plan.dropped.append(name)
        elif ignored:
            plan.dense_linears.append(module)
            plan.copies.append(name)
        else:
            _add_target(plan, cfg, name, source.entries[name], model_name, transposed=False)
    if not heads and tie is not False:
        # A tied head is not in the checkpoint; the model path still lists the linear as dense.
        if not name_matches(HEAD_ALIAS, cfg.ignore):
            log.warning("%s shares its weight with another module (tied embeddings); left unquantized", HEAD_ALIAS)
        plan.dense_linears.append(HEAD_ALIAS)
    if not plan.targets:
        raise ConfigError(f"no linear weight of the checkpoint is left to quantize after ignore={cfg.ignore}")
    _warn_overrides(cfg, plan)
    _warn_left(plan, source)
    _warn_formats(plan)
    if plan.embeddings:
        log.info("left dense as embeddings: %s", ", ".join(plan.embeddings))
    if conv1d:
        log.warning("%s is a Conv1D family in transformers: its %d quantized layers (e.g. %s) load in compress and "
                    "vLLM, not in transformers + compressed-tensors (docs/checkpoint-format.md, 'Families')",
                    model_type, sum(t.transposed for t in plan.targets.values()), next(iter(plan.targets)))
    return plan


def _add_target(plan: Plan, cfg: IntWeightConfig, name: str, e: TensorEntry, model_name: str, *,
                transposed: bool) -> None:
    module = name.rpartition(".")[0]
    shape = tuple(e.shape[::-1]) if transposed else tuple(e.shape)            # (out_features, in_features)
    plan.targets[module] = Target(module, name, _module_config(cfg, model_name, shape[1]), model_name, shape,
                                  transposed=transposed)


def _equals_an_embedding(source: TensorSource, head: str, embeddings: list[str]) -> bool:
    """Whether the head tensor holds the values of an embedding of its shape (transformers ties them then)."""
    same = [n for n in embeddings if source.entries[n].shape == source.entries[head].shape]
    if not same:
        return False
    values = source.get(head)
    return any(torch.equal(values, source.get(n)) for n in same)


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10 (the model's module order, by layer)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _module_config(cfg: IntWeightConfig, model_name: str, in_features: int) -> IntWeightConfig:
    """The module's resolved config after the format's shape check (quant/apply.py's
    ``_select_targets``: an override's error names the override)."""
    module_cfg = cfg.for_module(model_name)
    try:
        module_cfg.weight_format.check_shape(model_name, in_features)
    except ConfigError as exc:
        pattern = cfg.override_for(model_name)
        if pattern is None:
            raise
        raise ConfigError(f"overrides[{pattern!r}]: {exc}") from None
    return module_cfg


def _warn_overrides(cfg: IntWeightConfig, plan: Plan) -> None:
    used = {cfg.override_for(t.model_name) for t in plan.targets.values()}
    unused = [p for p in cfg.overrides if p not in used]
    if unused:
        log.warning("overrides %s apply to no quantized linear (no match, matched only ignored or tied "
                    "modules, or shadowed by an earlier pattern)", unused)


def _warn_left(plan: Plan, source: TensorSource) -> None:
    """``structure.warn_uncompressed`` by names: float tensors of 2 or more dims that no rule covers."""
    if not plan.uncompressed:
        return
    total = sum(e.numel for e in source.entries.values() if e.floating)
    share = sum(plan.uncompressed.values()) / max(total, 1)
    names = sorted(plan.uncompressed)
    log.warning("%d weight tensor(s) holding %.1f%% of the parameters were not quantized although no ignore pattern "
                "names them (not a 2-D <module>.weight, so not a linear by its name): %s%s", len(names), 100 * share,
                ", ".join(names[:5]), " ..." if len(names) > 5 else "")


def _warn_formats(plan: Plan) -> None:
    """What ``compress.export`` warns about the formats of the quantized layers (export.py's
    ``_warn_partial_groups``, ``_warn_fp8_blocks``, ``_warn_int4_activations``), from shapes."""
    fmts = {n: t.cfg.weight_format for n, t in plan.targets.items()}
    partial = [n for n, f in fmts.items() if f.kind == "int" and f.group_size and plan.targets[n].shape[1] % f.group_size]
    if partial:
        log.warning("%d layers (e.g. %s) end in a partial group: compress loads this checkpoint; compressed-tensors "
                    "0.20 / transformers refuse it", len(partial), partial[0])
    blocks = [n for n, f in fmts.items() if f.weight_strategy == "block"]
    narrow = [n for n in blocks if plan.targets[n].shape[1] % 128]
    fused = [n for g in fused_groups(blocks) if len(g) > 1 for n in g[:-1] if plan.targets[n].shape[0] % 128]
    if narrow or fused:
        log.warning("%d fp8-block layers (e.g. %s) have in_features, or as a fused q/k/v or gate/up shard "
                    "out_features, not a multiple of 128: compress and transformers load this checkpoint, vLLM "
                    "refuses it; use scheme fp8 for vLLM", len(set(narrow + fused)), (narrow + fused)[0])
    int4 = [n for n, f in fmts.items() if f.act_dtype == "int4"]
    if int4:
        log.warning("%d W4A4 int4 layers (e.g. %s): transformers + compressed-tensors scale int4 activations by "
                    "max|x| / 7.5, compress by max|x| / 7 (docs/w8a8.md, 'W4A4 int4')", len(int4), int4[0])


def share_nvfp4_global_scales(plan: Plan, source: TensorSource) -> None:
    """Give the NVFP4 siblings that the model path solves together (q/k/v, gate/up of one parent,
    per scheme) the global scale of their stacked amax (quant/apply.py), one tensor read at a time."""
    inside = [n for n, t in plan.targets.items() if t.cfg.weight_format.kind == "nvfp4"]
    for group in fused_groups(inside):
        by_scheme: dict[str, list[str]] = defaultdict(list)
        for name in group:
            by_scheme[plan.targets[name].cfg.scheme].append(name)
        for members in by_scheme.values():
            if len(members) < 2:
                continue
            amax = torch.stack([read_tensor(source, plan.targets[n].weight, plan.dtype).abs().amax().float()
                                for n in members]).amax()
            scale = nvfp4_global_scale(amax)
            for n in members:
                plan.targets[n].global_scale = scale


__all__ = ["HEAD_ALIAS", "Plan", "Target", "decoder_layers_prefix", "natural_key", "plan_checkpoint", "read_tensor",
           "rename_as_transformers", "share_nvfp4_global_scales"]
