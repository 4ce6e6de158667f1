"""The layer-by-layer calibration engine, written once for every method that needs data.

1. Capture: the calibration samples run through the model up to the first decoder layer, whose
   inputs (hidden states and keyword arguments such as the attention mask and rotary embeddings)
   are kept.
2. For each decoder layer, with only that layer onloaded to the compute device:
   a. Trace: one sample runs through the layer to learn in which order the target linears run and
      which of them read the same input tensor (q/k/v; gate/up). Such a group is solved together.
   b. Observe and solve in execution order, so that every group sees inputs produced by the groups
      before it *after* they were compressed:
      - all samples in one chunk: a pre-hook on each group's first linear collects the statistics
        from the whole input, solves the group and writes the new weights before the linear runs,
        so one forward pass per layer does everything;
      - several chunks (samples that do not fit in memory at once): one pass per group over the
        chunks collects its statistics and stops the forward right after; then the group is solved.
   c. The outputs of the compressed layer become the next layer's inputs.
   d. The method finalizes the layer (e.g. swaps in packed modules).

A method plugs in with four calls: ``is_target(name, module)``, ``new_stats(module)`` (an object
with ``add(x)``), ``solve(names, modules, stats)`` and ``finalize(layer, prefix, names)``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError
from .modeling import find_decoder_layers, module_device, onloaded

log = logging.getLogger(__name__)

# Activation memory the engine may use per forward chunk before it splits the samples.
DEFAULT_CHUNK_BYTES = 4 << 30


class LayerwiseMethod(Protocol):
    name: str

    def is_target(self, name: str, module: nn.Module) -> bool: ...

    def new_stats(self, module: nn.Module) -> Any: ...

    def solve(self, names: list[str], modules: list[nn.Module], stats: Any) -> None: ...

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None: ...


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


# One chunk of layer inputs: hidden states, remaining positional args, keyword args.
Chunk = tuple[torch.Tensor, tuple, dict]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_layerwise(model: nn.Module, calib, method: LayerwiseMethod, *, device: torch.device | str | None = None,
                  batch_size: int | None = None, progress: bool = True) -> None:
    """Walk ``model``'s decoder layers with the calibration samples, letting ``method`` observe and
    compress each. ``batch_size`` = samples per forward chunk (default: all that fit in
    DEFAULT_CHUNK_BYTES of activations)."""
    device = torch.device(device) if device is not None else default_device()
    layers_name, layers = find_decoder_layers(model)
    input_ids = calib.input_ids
    check_seqlen(model, calib.seqlen)
    if batch_size is None:
        batch_size = _auto_batch_size(model, calib.samples, calib.seqlen)
    start = time.perf_counter()
    with torch.no_grad():
        chunks = capture_layer_inputs(model, layers, input_ids, batch_size, device)
        log.info("captured inputs of %s.0: %d samples x %d tokens in %d chunk(s)", layers_name,
                 calib.samples, calib.seqlen, len(chunks))
        bar = tqdm(range(len(layers)), desc=f"{method.name} layers", disable=not progress, unit="layer")
        for i in bar:
            layer = layers[i]
            prefix = f"{layers_name}.{i}."
            with onloaded(layer, device):
                targets = {name: m for name, m in layer.named_modules() if method.is_target(prefix + name, m)}
                if targets:
                    groups = trace_groups(layer, chunks[0], targets)
                    if len(chunks) == 1:
                        chunks = [_solve_in_one_pass(layer, chunks[0], groups, targets, method, prefix)]
                    else:
                        _solve_group_by_group(layer, chunks, groups, targets, method, prefix)
                        chunks = [_run_layer(layer, c) for c in chunks]
                    method.finalize(layer, prefix, list(targets))
                else:
                    chunks = [_run_layer(layer, c) for c in chunks]
    log.info("%s: %d layers in %.1f s", method.name, len(layers), time.perf_counter() - start)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise DataError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}; "
                        f"use seqlen <= {limit}")


def _auto_batch_size(model: nn.Module, samples: int, seqlen: int) -> int:
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    # Live activations per token inside a layer, float32: residual, norms, q/k/v/o, MLP branches.
    per_token = 4 * (8 * hidden + 3 * inter)
    fit = max(1, DEFAULT_CHUNK_BYTES // (per_token * seqlen))
    return min(samples, fit)


@contextlib.contextmanager
def _outside_layers_onloaded(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Onload everything that runs before/after the decoder layers (embeddings, rotary, norm)."""
    with contextlib.ExitStack() as stack:
        def visit(module: nn.Module) -> None:
            for child in module.children():
                if child is layers:
                    continue
                if any(m is layers for m in child.modules()):
                    visit(child)
                else:
                    stack.enter_context(onloaded(child, device))
        visit(model)
        yield


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[Chunk]:
    """Inputs of the first decoder layer, one entry per chunk of ``batch_size`` samples."""
    chunks: list[Chunk] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        chunks.append((hidden, tuple(args[1:]), kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _outside_layers_onloaded(model, layers, device):
            for ids in input_ids.split(batch_size):
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(chunks) != len(input_ids.split(batch_size)):
        raise RuntimeError("the first decoder layer was not reached while capturing calibration inputs")
    return chunks


def _run_layer(layer: nn.Module, chunk: Chunk) -> Chunk:
    hidden, args, kwargs = chunk
    out = layer(hidden, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out, args, kwargs


def _first_sample(chunk: Chunk) -> Chunk:
    """The chunk cut to its first sample (tensors whose leading dim is the batch)."""
    hidden, args, kwargs = chunk
    batch = hidden.shape[0]

    def cut(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return x[:1]
        if isinstance(x, tuple):
            return tuple(cut(v) for v in x)
        return x

    return hidden[:1], tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def trace_groups(layer: nn.Module, chunk: Chunk, targets: dict[str, nn.Module]) -> list[list[str]]:
    """Target names grouped by the input tensor they read, in execution order. Targets that never
    ran on the traced sample come last, each in a group of its own."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: seen.append((name, _input_of(args, kwargs))), with_kwargs=True)
        for name, module in targets.items()]
    try:
        _run_layer(layer, _first_sample(chunk))
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    done: set[str] = set()
    for name, x in seen:                       # `seen` keeps every x alive, so ids are unique
        if name not in done:
            groups.setdefault(id(x), []).append(name)
            done.add(name)
    ordered = list(groups.values())
    missing = [n for n in targets if n not in done]
    if missing:
        log.warning("%d target(s) did not run on the traced sample and will be solved last: %s",
                    len(missing), ", ".join(missing[:4]))
    return ordered + [[n] for n in missing]


def _solve_in_one_pass(layer, chunk: Chunk, groups, targets, method: LayerwiseMethod, prefix: str) -> Chunk:
    handles = []
    solved: set[int] = set()
    for gi, group in enumerate(groups):
        def solve_now(module, args, kwargs, gi=gi, group=group):
            stats = method.new_stats(module)
            stats.add(_input_of(args, kwargs))
            method.solve([prefix + n for n in group], [targets[n] for n in group], stats)
            solved.add(gi)
        handles.append(targets[group[0]].register_forward_pre_hook(solve_now, with_kwargs=True))
    try:
        out = _run_layer(layer, chunk)
    finally:
        for h in handles:
            h.remove()
    for gi, group in enumerate(groups):        # targets the forward never reached: solve without data
        if gi not in solved:
            method.solve([prefix + n for n in group], [targets[n] for n in group], None)
    return out


def _solve_group_by_group(layer, chunks: list[Chunk], groups, targets, method: LayerwiseMethod, prefix: str) -> None:
    for group in groups:
        first = targets[group[0]]
        stats = method.new_stats(first)

        def observe(module, args, kwargs):
            stats.add(_input_of(args, kwargs))
            raise _StopForward

        handle = first.register_forward_pre_hook(observe, with_kwargs=True)
        try:
            for chunk in chunks:
                try:
                    _run_layer(layer, chunk)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        method.solve([prefix + n for n in group], [targets[n] for n in group], stats)


__all__ = ["run_layerwise", "capture_layer_inputs", "trace_groups", "LayerwiseMethod", "module_device"]
