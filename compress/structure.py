"""The model's normal form for compression: every weight a pass may compress is an ``nn.Linear``.

``prepare_model`` runs before every method (``compress.apply``), before an export and when a
compressed checkpoint is loaded: it is idempotent, changes no computation, and is the one place
where a family's unusual weight containers are turned into linears (3D MoE experts: ``moe.py``;
GPT-2's ``Conv1D``: ``conv1d.py``).
A family compress cannot turn into linears is refused here, before any work.
"""

from __future__ import annotations

import logging

from torch import nn

from .conv1d import conv1d_to_linear
from .modeling import name_matches
from .moe import router_names, unfuse_experts

log = logging.getLogger(__name__)


def prepare_model(model: nn.Module) -> nn.Module:
    """Bring ``model`` into the normal form in place (see the module docstring); returns it."""
    unfuse_experts(model)
    conv1d_to_linear(model)
    return model


def uncompressed_weights(model: nn.Module, done: set[str], ignore: list[str]) -> dict[str, int]:
    """Weight tensors shaped like a pass's targets (floating point, 2D or more) that the pass left
    alone although nobody asked it to: not in a module of ``done``, not matched by ``ignore``, not an
    embedding (or the output head tied to it), not a MoE router. name -> parameter count."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip = set(router_names(model))
    out = {}
    for module_name, module in model.named_modules():
        if module_name in done or module_name in skip or isinstance(module, nn.Embedding) \
                or name_matches(module_name, ignore):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dim() >= 2 and id(p) not in embeddings:
                out[f"{module_name}.{pname}" if module_name else pname] = p.numel()
    return out


def warn_uncompressed(model: nn.Module, done: set[str], ignore: list[str], verb: str) -> dict[str, int]:
    """Warn about ``uncompressed_weights``, naming them and their share of the parameters."""
    left = uncompressed_weights(model, done, ignore)
    if left:
        total = sum(p.numel() for p in model.parameters())
        share = sum(left.values()) / max(total, 1)
        names = sorted(left)
        log.warning("%d weight tensor(s) holding %.1f%% of the parameters were not %s although no ignore pattern "
                    "names them (compress has no rule for their module type): %s%s", len(left), 100 * share, verb,
                    ", ".join(names[:5]), " ..." if len(names) > 5 else "")
    return left


__all__ = ["prepare_model", "uncompressed_weights", "warn_uncompressed"]
