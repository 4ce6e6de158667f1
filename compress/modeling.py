"""Model-structure helpers that work for any transformers causal LM without per-model code."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import named_module_tensors, set_module_tensor_to_device
from torch import nn

from .errors import ModelLoadError
from .transforms import carry_input_transform


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the largest ModuleList whose entries share one class
    (``model.layers`` in Llama/Qwen2/Mistral, ``model.decoder.layers`` in OPT, ``transformer.h``)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ModelLoadError(f"{type(model).__name__} has no list of repeated decoder layers; "
                             f"compress supports transformer decoders (Llama, Qwen2, Mistral, OPT, ...)")
    return best


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` by ``new``; an online input transform of the old module (a
    rotation pass's, compress/transforms.py) goes with it."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(root, parent_name)
    carry_input_transform(getattr(parent, child, None), new)
    setattr(parent, child, new)


def name_matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Does a module name match any pattern? A pattern is "re:<regex>" (searched in the full name)
    or a glob matched against the full name or any of its dotted suffixes."""
    parts = name.split(".")
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts))):
            return True
    return False


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Module names (not parameter names) whose weight is shared with another module."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            key = id(weight)
            if key in seen and seen[key] != name:
                tied.update({name, seen[key]})
            seen.setdefault(key, name)
    return tied


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def has_offloaded_params(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(hook is not None and getattr(hook, "offload", False))


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Bring a module's weights onto ``device`` for the duration of the block.

    A plain module is moved and moved back at exit. Submodules offloaded by accelerate (weights on
    the meta device, data in their hook's weights map on CPU or disk) are materialized and their
    hooks detached, so that weights changed inside the block are the weights that run; at exit each
    surviving submodule is offloaded again with its *current* values (kept on the CPU). Modules
    created inside the block (quantized replacements) keep their tensors where they are.
    """
    offloaded = [m for m in module.modules() if has_offloaded_params(m)]
    if offloaded:
        with _materialized(offloaded, device):
            yield module
        return
    home = module_device(module)
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def _materialized(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    saved = []
    for sub in modules:
        hook = sub._hf_hook
        names = [n for n, _ in named_module_tensors(sub, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True)]
        for name in names:
            set_module_tensor_to_device(sub, name, device, value=hook.weights_map[name])
        remove_hook_from_module(sub)
        saved.append((sub, hook, names))
    try:
        yield
    finally:
        for sub, hook, names in saved:
            values = {n: _get_tensor(sub, n).detach().to("cpu") for n in names}
            add_hook_to_module(sub, AlignDevicesHook(
                execution_device=hook.execution_device, offload=True, io_same_device=hook.io_same_device,
                weights_map=values, offload_buffers=hook.offload_buffers, place_submodules=hook.place_submodules))


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


# Sibling projections that serving engines fuse into one matrix (vLLM's qkv_proj, gate_up_proj):
# formats with a per-tensor scale (NVFP4) must give them one shared scale. w1/w3: Mixtral's expert gate/up.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def fused_groups(names: list[str]) -> list[list[str]]:
    """``names`` partitioned into groups that share one parent and one FUSED_SIBLINGS set; every
    other name is a group of its own. Order follows ``names``."""
    groups: list[list[str]] = []
    index: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        fam = next((i for i, fam in enumerate(FUSED_SIBLINGS) if leaf in fam), None)
        if fam is None:
            groups.append([name])
        elif (parent, fam) in index:
            index[(parent, fam)].append(name)
        else:
            index[(parent, fam)] = [name]
            groups.append(index[(parent, fam)])
    return groups
