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

Before 2a, a method may transform the layer (``prepare_layer``): rescale a norm and the linears it
feeds (SmoothQuant, AWQ), rotate, and so on. It runs before anything is traced or observed, in both
paths, and may itself run the layer's calibration inputs through the layer (``LayerInputs``), so
every statistic the solve sees comes from the transformed layer and the two paths agree.

``compress_layers`` is the one driver every weight method calls: the walk above when the method
uses data, otherwise a data-free walk (one layer onloaded at a time, fused siblings such as q/k/v
solved together), then the targets outside the decoder layers (e.g. an untied lm_head), which no
calibration input reaches. A method plugs in with ``LayerMethod``'s calls: ``is_target(name,
module)``, ``new_stats(module)`` (an object with ``add(x)``), ``solve(names, modules, stats)``
(stats is None without data), ``finalize(layer, prefix, names)`` and, optionally,
``prepare_layer(layer, prefix, inputs)``. Shared helpers: ``select_linears`` (target selection:
ignore patterns, tied weights, shape checks) and ``write_rows`` (a stacked solve's rows written
back to each linear).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Iterator
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .modeling import (find_decoder_layers, fused_groups, module_device, name_matches, onloaded,
                       tied_parameter_names)
from .moe import expert_of, router_names

log = logging.getLogger(__name__)

# Activation memory the engine may use per forward chunk before it splits the samples.
DEFAULT_CHUNK_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class EngineContext:
    """How the engine runs, set around any method call with ``engine_context`` rather than passed
    through every method's signature.

    ``layer_scope(index, prefix, layer)``: a context manager the walk enters around each decoder
    layer's whole turn (prepare, observe, solve, finalize); streaming compression uses it to load the
    layer's weights from the checkpoint on entry and to write the finished layer out and free it on
    exit. ``parallel``: data-parallel calibration across torch.distributed ranks (compress.distributed)."""

    layer_scope: Callable[[int, str, nn.Module], ContextManager] | None = None
    parallel: Any = None


_CONTEXT: contextvars.ContextVar[EngineContext] = contextvars.ContextVar("compress_engine", default=EngineContext())


def current_context() -> EngineContext:
    return _CONTEXT.get()


@contextlib.contextmanager
def engine_context(**changes) -> Iterator[EngineContext]:
    """Run the enclosed method calls with the engine context's fields ``changes`` replaced."""
    token = _CONTEXT.set(dataclasses.replace(_CONTEXT.get(), **changes))
    try:
        yield _CONTEXT.get()
    finally:
        _CONTEXT.reset(token)


def _layer_scope(index: int, prefix: str, layer: nn.Module) -> ContextManager:
    scope = _CONTEXT.get().layer_scope
    return scope(index, prefix, layer) if scope is not None else contextlib.nullcontext()


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


# One chunk of layer inputs: hidden states, remaining positional args, keyword args.
Chunk = tuple[torch.Tensor, tuple, dict]


class LayerMethod:
    """What the engine calls on a method; subclass and override. ``targets`` maps the full names of
    the modules the method compresses onto them (``select_linears`` builds it for linears)."""

    name: str = "method"
    targets: dict[str, nn.Module]
    # In the data-free walk, finalize each group right after its solve (nothing computes with the
    # layer in between), so one group's unpacked weights are resident at a time, not the layer's.
    finalize_each_group: bool = False

    def is_target(self, name: str, module: nn.Module) -> bool:
        return name in self.targets

    def prepare_layer(self, layer: nn.Module, prefix: str, inputs: LayerInputs | None) -> None:
        """Transform ``layer`` before any of its targets is observed. ``inputs``: its calibration
        inputs (None in the data-free walk)."""

    def new_stats(self, module: nn.Module) -> Any:
        """A fresh statistics object (with ``add(x)``, ``x`` the module's input) for a group whose
        first module is ``module``."""
        raise NotImplementedError(f"{type(self).__name__} observes no statistics")

    def solve(self, names: list[str], modules: list[nn.Module], stats: Any) -> None:
        """Compress the modules that read one input (full ``names``), from ``stats`` (None: no data)."""
        raise NotImplementedError

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        """After the layer's groups are solved: ``names`` relative to ``root``, full name = prefix + name."""


# The interface as a type (kept for callers that annotate with it).
LayerwiseMethod = LayerMethod


class Records(dict):
    """What a weight method returns: module name -> its record, plus ``summary``, facts about the
    whole pass for the run report (e.g. ``{"experts": {tokens per expert ...}}``)."""

    summary: dict

    def __init__(self, records: dict, summary: dict | None = None):
        super().__init__(records)
        self.summary = summary or {}


class LayerInputs:
    """The calibration inputs of one decoder layer, as ``prepare_layer`` sees them."""

    def __init__(self, layer: nn.Module, chunks: list[Chunk]):
        self.layer, self.chunks = layer, chunks

    def observe(self, modules: dict[str, nn.Module], new_stats: Callable[[nn.Module], Any], *,
                select: Callable[[tuple, dict], Any] | None = None) -> dict[str, Any]:
        """Run every chunk through the layer as it is now, feeding each module's input to its own
        statistics (``new_stats(module)``, an object with ``add(x)``); a chunk's forward stops once
        every module has seen it. ``select(args, kwargs)`` picks what ``add`` gets (default: the
        first input). Returns name -> statistics."""
        stats = {name: new_stats(module) for name, module in modules.items()}
        seen: set[str] = set()
        select = select or _input_of

        def hook(module, args, kwargs, name):
            stats[name].add(select(args, kwargs))
            seen.add(name)
            if len(seen) == len(stats):
                raise _StopForward

        handles = [m.register_forward_pre_hook(lambda m, a, k, n=name: hook(m, a, k, n), with_kwargs=True)
                   for name, m in modules.items()]
        try:
            for chunk in self.chunks:
                seen.clear()
                try:
                    _run_layer(self.layer, chunk)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        return stats

    def outputs(self) -> list[torch.Tensor]:
        """The layer's output hidden states for every chunk, as the layer is now."""
        return [_run_layer(self.layer, chunk)[0] for chunk in self.chunks]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compress_layers(model: nn.Module, method: LayerMethod, calib=None, *, device: torch.device | str | None = None,
                    batch_size: int | None = None, progress: bool = True) -> None:
    """Apply ``method`` to every target of ``model``: layer by layer with ``calib`` (``run_layerwise``),
    or without data when ``calib`` is None; then the targets outside the decoder layers, which no
    calibration input reaches, each solved without data."""
    dev = torch.device(device) if device is not None else default_device()
    if calib is not None:
        run_layerwise(model, calib, method, device=dev, batch_size=batch_size, progress=progress)
    else:
        _walk_without_data(model, method, dev, progress)
    layers_name, _ = find_decoder_layers(model)
    outside = [(n, m) for n, m in model.named_modules()
               if n != layers_name and not n.startswith(layers_name + ".") and method.is_target(n, m)]
    for name, module in outside:
        if calib is not None:
            log.info("%s lies outside the decoder layers; no calibration input reaches it", name)
        with onloaded(module, dev):
            method.solve([name], [module], None)
            method.finalize(model, "", [name])


def _walk_without_data(model: nn.Module, method: LayerMethod, device: torch.device, progress: bool) -> None:
    layers_name, layers = find_decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc=f"{method.name} layers", unit="layer", disable=not progress)):
        prefix = f"{layers_name}.{i}."
        with _layer_scope(i, prefix, layer), onloaded(layer, device):
            prepare = getattr(method, "prepare_layer", None)
            if prepare is not None:
                prepare(layer, prefix, None)
            names = [n for n, m in layer.named_modules() if method.is_target(prefix + n, m)]
            if not names:
                continue
            # Linears that read one input (q/k/v; gate/up) are solved together, as with data.
            groups = fused_groups(names)
            for group in groups:
                method.solve([prefix + n for n in group], [layer.get_submodule(n) for n in group], None)
                if method.finalize_each_group:
                    method.finalize(layer, prefix, group)
            if not method.finalize_each_group:
                method.finalize(layer, prefix, names)


def select_linears(model: nn.Module, ignore: list[str], *, verb: str, left: str,
                   check: Callable[[str, nn.Linear], bool] | None = None, after: str = "") -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` a weight method targets: not matching ``ignore``, not sharing
    its weight with another module (tied embeddings: warned about, left ``left``), and accepted by
    ``check(name, module)`` (which may also raise a ConfigError for a shape the method cannot take).
    ``verb`` ("quantize", "prune") and ``after`` word the error when nothing is left."""
    tied = tied_parameter_names(model)
    routers = set(router_names(model))
    if routers:
        log.info("%d MoE router(s) stay dense (e.g. %s), as vLLM and transformers expect", len(routers),
                 sorted(routers)[0])
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name_matches(name, ignore) or name in routers:
            continue
        if name in tied:
            log.warning("%s shares its weight with another module (tied embeddings); left %s", name, left)
            continue
        if check is None or check(name, module):
            targets[name] = module
    if not targets:
        raise ConfigError(f"no nn.Linear layer of {type(model).__name__} is left to {verb} after "
                          f"ignore={ignore}{after}")
    return targets


def write_rows(modules: list[nn.Module], weight: torch.Tensor) -> list[slice]:
    """Write a stacked solve's ``weight`` (sum of out_features, in) back into each module's weight,
    in order, cast to its dtype; returns each module's row slice of ``weight``."""
    slices, row = [], 0
    for module in modules:
        rows = slice(row, row + module.weight.shape[0])
        row = rows.stop
        module.weight.data.copy_(weight[rows].to(module.weight.dtype))
        slices.append(rows)
    if row != weight.shape[0]:
        raise ValueError(f"stacked weight has {weight.shape[0]} rows, the modules {row}")
    return slices


def run_layerwise(model: nn.Module, calib, method: LayerMethod, *, device: torch.device | str | None = None,
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
    parallel = _CONTEXT.get().parallel
    if parallel is not None:
        # Data-parallel calibration (compress.distributed): the walk on this rank's shards.
        parallel.run_layerwise(model, calib, method, device=device, batch_size=batch_size, progress=progress)
        return
    start = time.perf_counter()
    with torch.no_grad():
        chunks = capture_layer_inputs(model, layers, input_ids, batch_size, device)
        log.info("captured inputs of %s.0: %d samples x %d tokens in %d chunk(s)", layers_name,
                 calib.samples, calib.seqlen, len(chunks))
        bar = tqdm(range(len(layers)), desc=f"{method.name} layers", disable=not progress, unit="layer")
        for i in bar:
            layer = layers[i]
            prefix = f"{layers_name}.{i}."
            with _layer_scope(i, prefix, layer), onloaded(layer, device):
                prepare = getattr(method, "prepare_layer", None)     # optional for duck-typed methods
                if prepare is not None:
                    prepare(layer, prefix, LayerInputs(layer, chunks))
                targets = {name: m for name, m in layer.named_modules() if method.is_target(prefix + name, m)}
                if targets:
                    groups = trace_groups(layer, chunks[0], targets)
                    if len(chunks) == 1:
                        chunks = [_solve_in_one_pass(layer, chunks[0], groups, targets, method, prefix)]
                    else:
                        _solve_group_by_group(layer, chunks, groups, targets, method, prefix)
                        chunks = [_run_layer(layer, c) for c in chunks]
                    method.finalize(layer, prefix, list(targets))
                    targets = groups = None      # the replaced linears (their dense weights) go now, not next layer
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
        # Experts the traced sample did not route to are expected; anything else is worth a warning.
        level = logging.DEBUG if all(expert_of(n) for n in missing) else logging.WARNING
        log.log(level, "%d target(s) did not run on the traced sample and will be solved last: %s",
                len(missing), ", ".join(missing[:4]))
    # Siblings that read one input (an expert's gate/up) still form one group.
    return ordered + fused_groups(missing)


def _solve_in_one_pass(layer, chunk: Chunk, groups, targets, method: LayerMethod, prefix: str) -> Chunk:
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


def _solve_group_by_group(layer, chunks: list[Chunk], groups, targets, method: LayerMethod, prefix: str) -> None:
    """Several chunks: one pass over the chunks per wave of groups (``expert_waves``: the experts of an
    MoE block are observed together, a bounded number of Hessians at a time; any other group alone,
    its forward stopped once it has its input), then the wave's groups are solved."""
    for wave in expert_waves(groups, targets, prefix):
        stats = _observe_wave(layer, chunks, wave, targets, method)
        for group, group_stats in zip(wave, stats):
            method.solve([prefix + n for n in group], [targets[n] for n in group], group_stats)
        del stats


def _observe_wave(layer, chunks: list[Chunk], wave: list[list[str]], targets, method: LayerMethod) -> list:
    """One pass over ``chunks`` feeding each group of ``wave`` its input; a lone group's forward stops
    as soon as it has it. Returns the groups' statistics, in order."""
    stats = [method.new_stats(targets[group[0]]) for group in wave]
    alone = len(wave) == 1

    def observe(module, args, kwargs, i):
        stats[i].add(_input_of(args, kwargs))
        if alone:
            raise _StopForward

    handles = [targets[group[0]].register_forward_pre_hook(
        lambda m, a, k, i=i: observe(m, a, k, i), with_kwargs=True) for i, group in enumerate(wave)]
    try:
        for chunk in chunks:
            try:
                _run_layer(layer, chunk)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


# Float statistics (Hessians) one wave of expert groups may hold at once in the chunked path.
WAVE_STATS_BYTES = 1 << 30


def expert_waves(groups: list[list[str]], targets: dict[str, nn.Module], prefix: str) -> list[list[list[str]]]:
    """``groups`` (in execution order) as waves observed in one pass each. Experts of one MoE block do
    not read each other's outputs, so their first groups (gate/up) form waves, then their second
    groups (down), each wave holding at most WAVE_STATS_BYTES of float32 Hessians; every other group
    is a wave of its own, in order. The order stays valid: an expert's down projection comes after its
    own gate/up, and nothing outside the block is reordered past it."""
    waves: list[list[list[str]]] = []
    pending: dict[tuple[str, int], list[list[str]]] = {}       # (block, stage) -> groups, block in progress
    stage_of: dict[tuple[str, int], int] = {}                  # (block, expert) -> groups seen so far

    def flush():
        for key in sorted(pending, key=lambda k: k[1]):
            wave, size = [], 0
            for group in pending[key]:
                n = 4 * getattr(targets[group[0]], "in_features", 0) ** 2
                if wave and size + n > WAVE_STATS_BYTES:
                    waves.append(wave)
                    wave, size = [], 0
                wave.append(group)
                size += n
            waves.append(wave)
        pending.clear()

    for group in groups:
        where = expert_of(prefix + group[0])
        if where is None:
            flush()
            waves.append([group])
            continue
        if pending and next(iter(pending))[0] != where[0]:
            flush()
        stage = stage_of.get(where, 0)
        stage_of[where] = stage + 1
        pending.setdefault((where[0], stage), []).append(group)
    flush()
    return waves


__all__ = ["EngineContext", "engine_context", "current_context", "Records", "compress_layers", "run_layerwise", "capture_layer_inputs", "trace_groups", "LayerMethod", "LayerInputs",
           "select_linears", "write_rows", "module_device"]
