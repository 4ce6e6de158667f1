"""Low-rank corrections kept beside the checkpoint as a PEFT LoRA adapter, and read back.

A ``LoRALinear`` (``compress/lora/adapters.py``) without a mask computes ``base(x) + s * x @ A^T @ B^T``
with ``s = alpha / rank``: exactly PEFT's LoRA (scaling ``lora_alpha / r``). The export therefore
writes the *base* module into the main checkpoint, which stays a standard one (plain transformers,
or compressed-tensors pack-quantized), and the adapters into ``adapter/`` in PEFT's own layout::

    adapter/adapter_config.json         peft_type LORA, r, lora_alpha, target_modules = full names
    adapter/adapter_model.safetensors   base_model.model.<module>.lora_A.weight  (r, in)   float32
                                        base_model.model.<module>.lora_B.weight  (out, r)  float32

``config.json["compress_adapter"]`` tells our loader to wrap those modules again
(``install_adapters``); transformers + ``peft.PeftModel.from_pretrained(model, DIR/adapter)`` and
vLLM (``--enable-lora``) read the same files without compress. docs/checkpoint-format.md has the
details and what was checked.

Masked modules (a pruned base retrained under its mask) are written as what they compute: with
``mask_during_training`` a dense base computes with the merged weight ``(W + s*B@A) * M``, which is
written as a plain weight (lossless); without it the module computes the plain low-rank update, which
is an adapter like any other. A packed base trained under its mask cannot be written either way.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..conv1d import TransposedLinear
from ..errors import CheckpointError
from ..modeling import get_module, set_module
from ..lora.adapters import LoRALinear, merged_weight
from ..quant.packed import PackedLinear
from .safetensors_io import read_header

log = logging.getLogger(__name__)

CONFIG_KEY = "compress_adapter"
FORMAT = "peft-lora"
VERSION = 1
DIRNAME = "adapter"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# PeftModel wraps the transformers model as base_model (LoraModel) whose .model is the original, so
# the tensor of module "model.layers.0.self_attn.q_proj" is "base_model.model.model.layers.0....".
PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- writing

def adapter_replacements(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, LoRALinear]]:
    """What the main checkpoint gets in place of each LoRALinear (its base, or for a dense base
    trained under its mask a plain nn.Linear holding the merged weight), and the modules whose
    adapters go to ``adapter/``. The model is not changed."""
    replacements: dict[str, nn.Module] = {}
    adapters: dict[str, LoRALinear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        if module.mask is not None and module.mask_during_training:
            replacements[name] = _merged_linear(name, module)
        else:
            # No mask, or one kept only for a later merge: the module computes base + the plain update.
            replacements[name] = module.base
            adapters[name] = module
    if adapters:
        shared_rank_alpha(adapters)                 # refuse before anything is written
    return replacements, adapters


def _merged_linear(name: str, module: LoRALinear) -> nn.Linear:
    """A new nn.Linear with ``merged_weight(W, A, B, s, M)``: bit for bit the weight the module's
    forward computes with (same function), so writing it loses nothing. (A module built with
    dropout adds the masked update as a second matmul instead: the same up to float rounding.)"""
    base = module.base
    if not isinstance(base, nn.Linear):
        raise CheckpointError(f"{name}: a LoRA adapter trained under the sparsity mask of a packed "
                              f"{type(base).__name__} computes (s*B@A) * M, which is neither a low-rank "
                              f"adapter nor mergeable into packed weights; merge the adapters into the dense "
                              f"model before quantizing (compress.lora.adapters.unwrap_lora), or retrain with "
                              f"mask_during_training=False to keep them as an adapter")
    with torch.no_grad():
        weight = merged_weight(base.weight, module.lora_A, module.lora_B, module.scale, module.mask)
    # A TransposedLinear base stays one, so the merged weight is written in its family's (Conv1D) layout.
    cls = TransposedLinear if isinstance(base, TransposedLinear) else nn.Linear
    lin = cls(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device,
              dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    return lin


def shared_rank_alpha(adapters: dict[str, LoRALinear]) -> tuple[int, float]:
    """The one (rank, alpha) of all adapters. PEFT could give modules their own through
    rank_pattern/alpha_pattern, but vLLM reads a single r and lora_alpha and would scale the others
    wrongly without a word, so one export holds one rank and one alpha."""
    (first, ref), *rest = adapters.items()
    for name, module in rest:
        if module.rank != ref.rank or module.scale != ref.scale:
            raise CheckpointError(
                f"LoRA adapters of one export must share rank and alpha (PEFT's adapter_config holds one r "
                f"and lora_alpha, which vLLM applies to every module): {first} has rank {ref.rank}, alpha "
                f"{ref.scale * ref.rank:g} but {name} has rank {module.rank}, alpha "
                f"{module.scale * module.rank:g}; retrain with one rank and alpha, or merge the adapters "
                f"first (compress.lora.adapters.unwrap_lora, dense bases only)")
    return ref.rank, ref.scale * ref.rank


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(modules: list[str], rank: int, alpha: float) -> dict:
    """adapter_config.json as PEFT 0.21 writes a LoraConfig (the keys older PEFT releases and vLLM
    also know; newer keys keep their defaults when absent). target_modules holds full module names:
    PEFT matches a name exactly or as a dotted suffix, vLLM takes the modules from the tensor names."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _json_number(alpha),
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapters(adapters: dict[str, LoRALinear], directory: Path, metadata: dict[str, str] | None = None) -> dict:
    """Write ``directory/adapter/`` and return the ``compress_adapter`` entry for config.json."""
    rank, alpha = shared_rank_alpha(adapters)
    out = directory / DIRNAME
    out.mkdir()
    tensors = {}
    for name, module in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().float().contiguous().cpu()   # (r, in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().float().contiguous().cpu()   # (out, r)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    modules = sorted(adapters)
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config(modules, rank, alpha), indent=2, sort_keys=True) + "\n")
    return {"format": FORMAT, "version": VERSION, "path": DIRNAME, "modules": modules, "rank": rank,
            "alpha": _json_number(alpha)}


# ---------------------------------------------------------------------------------------------- reading

def check_entry(entry, where: str) -> tuple[list[str], int, float, str]:
    """(modules, rank, alpha, path) of a ``compress_adapter`` entry we can read."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        found = entry.get("format") if isinstance(entry, dict) else entry
        raise CheckpointError(f"{where}: {CONFIG_KEY} has format {found!r}; this compress reads {FORMAT!r}")
    if entry.get("version") != VERSION:
        raise CheckpointError(f"{where}: {CONFIG_KEY} version {entry.get('version')!r} is not supported; this "
                              f"compress reads version {VERSION}; upgrade compress")
    modules, rank, alpha, path = (entry.get(k) for k in ("modules", "rank", "alpha", "path"))
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{where}: {CONFIG_KEY}.modules must list the adapted modules by name; the config "
                              f"is damaged, re-export the checkpoint")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 \
            or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise CheckpointError(f"{where}: {CONFIG_KEY} needs a positive integer rank and a positive alpha, got "
                              f"rank {rank!r}, alpha {alpha!r}; the config is damaged, re-export the checkpoint")
    if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
        raise CheckpointError(f"{where}: {CONFIG_KEY}.path must be a folder inside the checkpoint (e.g. "
                              f"{DIRNAME!r}), got {path!r}")
    return modules, rank, float(alpha), path


def _read_peft_config(path: Path, modules: list[str], rank: int, alpha: float) -> None:
    """adapter_config.json must describe the adapter config.json announces: PEFT and vLLM read it,
    so a disagreement means the two files come from different exports."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint's config.json announces a LoRA adapter "
                              f"there. Copy the whole export directory, adapter/ included, or re-export")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-export the checkpoint") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-export the checkpoint")
    want = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "use_dora": False,
            "use_rslora": False, "fan_in_fan_out": False}
    bad = {k: cfg.get(k, v) for k, v in want.items() if cfg.get(k, v) != v}
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        bad["rank_pattern/alpha_pattern"] = "not empty"
    if sorted(cfg.get("target_modules") or []) != sorted(modules):
        bad["target_modules"] = f"{len(cfg.get('target_modules') or [])} names, not the {len(modules)} of config.json"
    if bad:
        raise CheckpointError(f"{path} does not match config.json[{CONFIG_KEY!r}] (rank {rank}, alpha {alpha:g}, "
                              f"{len(modules)} modules, plain LoRA): {bad}; the adapter is from another export "
                              f"or was edited, re-export the checkpoint")


def _read_adapter_tensors(path: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint's config.json announces a LoRA adapter there. "
                              f"Copy the whole export directory, adapter/ included, or re-export")
    read_header(path)                                   # truncation / corruption, by tensor name
    want = {f"{PREFIX}{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        missing, unexpected = sorted(want - keys), sorted(keys - want)
        if missing or unexpected:
            raise CheckpointError(f"{path}: tensors do not match the adapted modules of config.json: missing "
                                  f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                                  f"{' ...' if len(unexpected) > 3 else ''}; compress reads plain LoRA A/B pairs "
                                  f"only, re-export the checkpoint")
        return {k: fh.get_tensor(k) for k in sorted(want)}


def install_adapters(model: nn.Module, entry: dict, directory: Path, where: str) -> int:
    """Wrap each module ``compress_adapter`` names (already loaded as nn.Linear or a packed layer) in a
    LoRALinear holding the adapter's weights. Returns how many were wrapped."""
    modules, rank, alpha, sub = check_entry(entry, where)
    folder = Path(directory) / sub
    _read_peft_config(folder / PEFT_CONFIG, modules, rank, alpha)
    tensors = _read_adapter_tensors(folder / PEFT_WEIGHTS, modules)
    # A fixed generator for LoRALinear's initial A (overwritten below), so that loading never moves
    # the global random state.
    gen = torch.Generator().manual_seed(0)
    for name in modules:
        try:
            base = get_module(model, name)
        except AttributeError:
            raise CheckpointError(f"{where}: {CONFIG_KEY} names module {name!r}, which the model does not have; "
                                  f"the adapter is from another model") from None
        if not isinstance(base, (nn.Linear, PackedLinear)):
            raise CheckpointError(f"{where}: {CONFIG_KEY} names {name!r}, a {type(base).__name__}; LoRA adapters "
                                  f"sit on linear layers only, the adapter is from another model")
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        for key, t, shape in ((f"{PREFIX}{name}.lora_A.weight", a, (rank, base.in_features)),
                              (f"{PREFIX}{name}.lora_B.weight", b, (base.out_features, rank))):
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise CheckpointError(f"{folder / PEFT_WEIGHTS}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, "
                                      f"the model and rank {rank} need a float {shape}; the adapter is from "
                                      f"another model or export, re-export the checkpoint")
        for p in base.parameters():
            p.requires_grad_(False)                   # the base is frozen, as wrap_lora leaves it
        module = LoRALinear(base, rank, alpha, generator=gen)
        with torch.no_grad():
            module.lora_A.copy_(a.float())
            module.lora_B.copy_(b.float())
        set_module(model, name, module)
    log.debug("installed %d LoRA adapters (rank %d, alpha %g) from %s", len(modules), rank, alpha, folder)
    return len(modules)


def summarize_adapter(directory: Path, entry, where: str) -> dict:
    """modules, rank, alpha, parameters and bytes of a checkpoint's adapter, from its headers."""
    modules, rank, alpha, sub = check_entry(entry, where)
    path = Path(directory) / sub / PEFT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; config.json announces a LoRA adapter there. Copy the whole "
                              f"export directory, adapter/ included, or re-export")
    header = read_header(path)
    params = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return {"path": sub, "modules": len(modules), "rank": rank, "alpha": alpha, "parameters": params,
            "bytes": path.stat().st_size}
