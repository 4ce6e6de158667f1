"""Online input transforms (the rotation pass's R4) in compressed-tensors' ``transform_config``.

What a checkpoint holds (the schema compressed-tensors defines and vLLM validates, no other keys;
facts in docs/rotation.md, "In a checkpoint"):

- ``quantization_config.transform_config = {"config_groups": {"R4": {"type": "hadamard",
  "head_dim": b, "apply": [{targets, "location": "input"}, {targets, "location": "weight_input",
  "inverse": true}], ...}}}``: the weights were multiplied by the block-diagonal Hadamard offline
  (``weight_input``, nothing stored for it) and the engine rotates each target's input at run time;
- ``<module>.R4_input.weight``: the ±1 Sylvester matrix of order b, *not* divided by sqrt(b) (both
  compressed-tensors and vLLM normalize at load; a normalized matrix would be scaled twice).

vLLM applies it (any linear scheme, tensor parallel 1); transformers 5.x ignores ``transform_config``
and computes wrong outputs from such a checkpoint, which ``export`` says when it writes one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CheckpointError
from ..kernels.hadamard import hadamard
from ..moe import from_checkpoint_name, to_checkpoint_name
from ..quant.packed import PackedLinear
from ..transforms import attach_input_transform, input_transforms

log = logging.getLogger(__name__)

GROUP = "R4"
SUFFIX = f".{GROUP}_input.weight"


def _sylvester(b: int) -> torch.Tensor:
    return (hadamard(b, dtype=torch.float64) * b ** 0.5).round().float()          # entries +-1


def check_exportable(model: nn.Module) -> None:
    """Refuse what a checkpoint cannot express: a full-width (non power-of-two block) transform, or
    online transforms on a model with no quantized layer (compressed-tensors' config carries them)."""
    found = input_transforms(model)
    if not found:
        return
    full = [n for n, (_, block) in found.items() if block is None]
    if full:
        raise CheckpointError(f"{full[0]} rotates its input with one Hadamard of its full width (rotate's "
                              f"down_proj_block: null): checkpoints store block-diagonal Hadamards of a power of two "
                              f"only (what vLLM applies); rotate with down_proj_block: 128 to export")
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        raise CheckpointError(f"{next(iter(found))} has an online input transform but no layer is quantized: the "
                              f"transform is recorded in the quantization config, so quantize before exporting, or "
                              f"rotate with down_proj: false")


def transform_config(model: nn.Module) -> dict:
    """``transform_config`` for the online transforms of ``model`` ({} if none)."""
    found = input_transforms(model)
    if not found:
        return {}
    blocks = {block for _, block in found.values()}
    if len(blocks) != 1:
        raise CheckpointError(f"online transforms with different block sizes {sorted(blocks)}: one per checkpoint")
    model_type = getattr(model.config, "model_type", "")
    targets = sorted(to_checkpoint_name(model_type, n) for n in found)
    apply = [{"targets": targets, "location": "input", "inverse": False, "ignore": []},
             {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []}]
    return {"config_groups": {GROUP: {"type": "hadamard", "apply": apply, "randomize": False, "requires_grad": False,
                                      "head_dim": blocks.pop(), "precision": "torch.float32"}}}


def transform_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored matrices, one per transformed module (checkpoint names)."""
    model_type = getattr(model.config, "model_type", "")
    return {to_checkpoint_name(model_type, n) + SUFFIX: _sylvester(block)
            for n, (_, block) in input_transforms(model).items()}


def install_transforms(model: nn.Module, tc: dict, state: dict[str, torch.Tensor], where: str) -> int:
    """Attach the online transforms ``tc`` describes and take their matrices out of ``state``
    (checked against the Sylvester matrix compress computes). Returns how many modules got one."""
    if not tc:
        return 0
    groups = tc.get("config_groups") if isinstance(tc, dict) else None
    if not isinstance(groups, dict):
        raise CheckpointError(f"{where}: transform_config has no config_groups mapping: {tc!r}")
    modules = dict(model.named_modules())
    model_type = getattr(model.config, "model_type", "")
    count = 0
    for gname, scheme in groups.items():
        kind, block = scheme.get("type"), scheme.get("head_dim")
        if kind != "hadamard" or scheme.get("randomize"):
            raise CheckpointError(f"{where}: transform group {gname!r} is {kind!r}"
                                  f"{' randomized' if scheme.get('randomize') else ''}; compress applies "
                                  f"type 'hadamard' (Sylvester blocks) only: serve this checkpoint with vLLM")
        for entry in scheme.get("apply", []):
            location = entry.get("location")
            if location == "weight_input":
                continue                            # folded into the stored weights at export
            if location != "input":
                raise CheckpointError(f"{where}: transform group {gname!r} has location {location!r}; compress "
                                      f"applies 'input' (online) and 'weight_input' (folded) only")
            for target in entry.get("targets", []):
                target = from_checkpoint_name(model_type, target)
                module = modules.get(target)
                if module is None:
                    raise CheckpointError(f"{where}: transform target {target!r} is not a module name of this "
                                          f"model (compress reads exact names, as it writes them)")
                stored = state.pop(target + f".{gname}_input.weight", None)
                b = block or module.in_features
                if stored is not None and not torch.equal(stored.float().cpu(), _sylvester(b)):
                    raise CheckpointError(f"{where}: {target}.{gname}_input.weight is not the +-1 Sylvester matrix "
                                          f"of order {b}; compress cannot apply it")
                attach_input_transform(module, "hadamard", block)
                count += 1
    # matrices of other modules (llm-compressor stores one per shared scheme) are not needed
    for key in [k for k in state if k.endswith(tuple(f".{g}_input.weight" for g in groups))]:
        del state[key]
    return count


def warn_transformers(model: nn.Module, path) -> None:
    if input_transforms(model):
        log.warning("%s: online input transforms (rotation R4) are recorded in transform_config; vLLM and compress "
                    "apply them, transformers 5.x ignores them and would compute wrong outputs "
                    "(docs/rotation.md)", path)


__all__ = ["check_exportable", "install_transforms", "transform_config", "transform_tensors", "warn_transformers"]
