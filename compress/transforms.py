"""Online input transforms (the rotation pass's R4, compress/rotation/): a linear whose weight was multiplied offline by an orthogonal H (on its
input side) must see ``x @ H`` at run time. The transform is a forward pre-hook, so the module
keeps its name and type (quantizers, exports and ignore patterns see the same ``down_proj``), and
``input_transform`` on the module says which transform it is. ``compress.modeling.set_module``
carries the hook over when a pass replaces the module (a float linear by its quantized form), so
the calibration of the quantizer (Hessians, activation ranges) and the quantized runtime both see
the rotated input.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.hadamard import hadamard, hadamard_transform

# input_transform name -> what it computes (the one kind so far)
TRANSFORMS = ("hadamard",)


def apply_hadamard(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """``x @ H`` along the last dim: H block-diagonal with normalized Sylvester blocks of ``block``
    (a power of two dividing the width: what compressed-tensors calls type "hadamard" with
    ``head_dim`` = block, and what vLLM applies), or one Hadamard of the full width (None)."""
    if block is None:
        return hadamard_transform(x)
    n = x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(*x.shape[:-1], n // block, block) @ hadamard(block, x.device, work)   # (..., n/b, b)
    return y.reshape(x.shape).to(x.dtype)


def _hadamard_pre_hook(module: nn.Module, args: tuple):
    x = args[0]
    if x.shape[-1] != module.input_transform_size:
        raise RuntimeError(f"{type(module).__name__} was rotated for {module.input_transform_size} input features "
                           f"but receives {x.shape[-1]}: a pass changed its width after the rotation; rotate "
                           f"after structured pruning, not before")
    return (apply_hadamard(x, module.input_transform_block),) + tuple(args[1:])


def attach_input_transform(module: nn.Module, kind: str = "hadamard", block: int | None = None) -> None:
    """Make ``module`` rotate its input (``apply_hadamard(x, block)``) before its forward. Idempotent."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown input transform {kind!r}; known: {TRANSFORMS}")
    n = int(module.in_features)
    if block is not None and (block <= 0 or block & (block - 1) or n % block):
        raise ValueError(f"a Hadamard block of {block} must be a power of two dividing in_features {n}")
    if getattr(module, "input_transform", None) is not None:
        if (module.input_transform, module.input_transform_block) == (kind, block):
            return
        raise ValueError(f"{type(module).__name__} already has input transform {module.input_transform!r}")
    module.input_transform = kind
    module.input_transform_block = block
    module.input_transform_size = n
    module._input_transform_hook = module.register_forward_pre_hook(_hadamard_pre_hook)


def detach_input_transform(module: nn.Module) -> None:
    handle = getattr(module, "_input_transform_hook", None)
    if handle is not None:
        handle.remove()
    for attr in ("input_transform", "input_transform_block", "input_transform_size", "_input_transform_hook"):
        if hasattr(module, attr):
            delattr(module, attr)


def carry_input_transform(old: nn.Module | None, new: nn.Module) -> None:
    """``new`` replaces ``old``: give it ``old``'s online input transform, if any."""
    kind = getattr(old, "input_transform", None)
    if kind is not None and new is not old:
        attach_input_transform(new, kind, old.input_transform_block)


def input_transforms(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Module name -> (input transform, block) of every module that has one."""
    return {name: (m.input_transform, m.input_transform_block) for name, m in model.named_modules()
            if getattr(m, "input_transform", None) is not None}


__all__ = ["TRANSFORMS", "attach_input_transform", "carry_input_transform", "detach_input_transform",
           "input_transforms"]
