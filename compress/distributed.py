"""Data-parallel calibration on torch.distributed (NCCL on GPUs, gloo on CPU).

Every rank holds the whole model and walks the decoder layers with the engine, in step. The
calibration samples are cut into ``shards`` contiguous shards (the reduction layout, fixed
independently of the number of ranks); rank r runs its block of shards through each layer. The
statistics a layer's groups need (Hessians, activation sums, routing counts) are summed over a fixed
binary tree of shards: each rank sums the subtrees that lie in its block, the roots of those subtrees
are broadcast, and every rank combines the top of the tree in the same order. One process with the
same ``shards`` evaluates the same tree, so N ranks produce the same checkpoint as one, bit for bit,
for any N that divides ``shards`` (float addition is commutative but not associative: a fixed tree
is what makes the sum independent of N). The solves of a layer go round-robin to the ranks; the owner
of a group solves it and broadcasts the new weights and the method's record of the solve, which every
rank then packs the same way.

Launch: ``torchrun --nproc-per-node N compress quantize ...`` or ``compress quantize ... --workers N``
(spawns N local processes with the same arguments); ``--workers 1`` runs the same reduction layout
in one process (the reference the N-rank result equals). Rank 0 alone evaluates, writes the export
and the report; the other ranks only take part in the calibration walk.

Which methods qualify: those whose statistics declare how they combine (a ``REDUCE`` table:
attribute -> "sum" or "max") and whose ``prepare_layer`` only observes statistics. Methods that
search over the layer's raw inputs (AWQ, SmoothQuant) are refused with a message; passes that do not
use the calibration engine (training) run unchanged on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .engine import (Chunk, LayerInputs, LayerMethod, _layer_scope, _observe_wave, _run_layer, capture_layer_inputs,
                     engine_context, expert_waves, trace_groups)
from .errors import ConfigError
from .modeling import find_decoder_layers, onloaded

log = logging.getLogger(__name__)

# Shards of the reduction layout: 1, 2, 4 or 8 ranks all reproduce one process's result.
DEFAULT_SHARDS = 8
ENV_SHARDS = "COMPRESS_SHARDS"


class DataParallel:
    """This process's place in a data-parallel calibration: ``rank`` of ``world``, and the reduction
    layout of ``shards`` calibration shards (rank r owns shards [r*S/N, (r+1)*S/N))."""

    def __init__(self, rank: int = 0, world: int = 1, shards: int | None = None):
        shards = shards or default_shards(world)
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"data parallel: rank {rank} of world size {world} is not a valid place")
        if shards < 1 or shards % world:
            raise ConfigError(f"data parallel: {world} workers cannot split {shards} calibration shards evenly; "
                              f"pass --shards with a multiple of {world} (e.g. {default_shards(world)})")
        self.rank, self.world, self.shards = rank, world, shards
        self._solves = 0                   # groups solved so far: the next one's owner is _solves % world

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world={self.world}, shards={self.shards})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- the layout ---------------------------------------------------------------------------
    def shard_bounds(self, samples: int) -> list[tuple[int, int]]:
        """[start, stop) sample ranges of every shard, in order (near-equal, contiguous)."""
        if samples < self.shards:
            raise ConfigError(f"data parallel: {samples} calibration samples cannot fill {self.shards} shards; "
                              f"use at least {self.shards} samples (--calib-samples) or fewer shards (--shards)")
        base, extra = divmod(samples, self.shards)
        bounds, start = [], 0
        for s in range(self.shards):
            stop = start + base + (s < extra)
            bounds.append((start, stop))
            start = stop
        return bounds

    def owned(self) -> range:
        per = self.shards // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def _owner(self, lo: int, hi: int) -> int | None:
        """The rank whose block holds shards [lo, hi), or None when it spans ranks."""
        per = self.shards // self.world
        q = lo // per
        return q if hi <= (q + 1) * per else None

    def next_solver(self) -> int:
        """The rank that solves the next group (round-robin over the whole walk)."""
        owner = self._solves % self.world
        self._solves += 1
        return owner

    # --- reductions -----------------------------------------------------------------------------
    def reduce_shards(self, leaf: Callable[[int], list], empty: Callable[[], list]) -> list:
        """Sum statistics over all shards on the fixed tree. ``leaf(s)``: the list of statistics
        objects observed on this rank's shard ``s``; ``empty()``: fresh ones of the same shapes (to
        receive another rank's subtree into). Every rank returns the same sums."""
        def local(lo: int, hi: int) -> list:
            if hi - lo == 1:
                return leaf(lo)
            mid = (lo + hi) // 2
            return merge_lists(local(lo, mid), local(mid, hi))

        def maximal(lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
            q = self._owner(lo, hi)
            if q is not None:
                yield lo, hi, q
            else:
                mid = (lo + hi) // 2
                yield from maximal(lo, mid)
                yield from maximal(mid, hi)

        # Each rank first sums its own subtrees (concurrently with the others), then the top is combined.
        mine = {(lo, hi): local(lo, hi) for lo, hi, q in maximal(0, self.shards) if q == self.rank}

        def top(lo: int, hi: int) -> list:
            q = self._owner(lo, hi)
            if q is not None:
                value = mine[(lo, hi)] if q == self.rank else empty()
                if self.world > 1:
                    for stats in value:
                        broadcast_stats(stats, q)
                return value
            mid = (lo + hi) // 2
            return merge_lists(top(lo, mid), top(mid, hi))

        return top(0, self.shards)

    def broadcast_object(self, obj: Any, src: int, device: torch.device | None = None) -> Any:
        """``obj`` from rank ``src`` on every rank (tensors inside land on ``device``; CPU by default)."""
        if self.world == 1:
            return obj
        wire = _wire_device()
        if self.rank == src:
            buf = io.BytesIO()
            torch.save(_to_cpu(obj), buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(wire)
            size = torch.tensor([data.numel()], dtype=torch.long, device=wire)
        else:
            size = torch.zeros(1, dtype=torch.long, device=wire)
        dist.broadcast(size, src)
        if self.rank != src:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=wire)
        dist.broadcast(data, src)
        if self.rank == src:
            return obj
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=device or "cpu", weights_only=False)

    def run_layerwise(self, model: nn.Module, calib, method: LayerMethod, *, device: torch.device, batch_size: int,
                      progress: bool = True) -> None:
        """The engine's layer walk on this rank's shards (``run_layerwise_parallel``)."""
        run_layerwise_parallel(model, calib, method, self, device=device, batch_size=batch_size, progress=progress)

    def broadcast_tensors(self, tensors: list[torch.Tensor], src: int) -> None:
        """Overwrite ``tensors`` in place on every rank with rank ``src``'s."""
        if self.world == 1:
            return
        for t in tensors:
            dist.broadcast(t, src)


def default_shards(world: int) -> int:
    """The reduction layout for ``world`` ranks: a multiple of both 8 and ``world``, so 1, 2, 4 and 8
    ranks agree with each other (and any world size agrees with one process given the same shards)."""
    return math.lcm(DEFAULT_SHARDS, max(world, 1))


# --- statistics -------------------------------------------------------------------------------------

def _reduce_table(stats: Any) -> dict[str, str]:
    table = getattr(type(stats), "REDUCE", None)
    if table is None:
        raise ConfigError(f"{type(stats).__name__} statistics do not declare how they combine across calibration "
                          f"shards (a REDUCE table), so this method cannot run data-parallel; run it without "
                          f"--workers / torchrun")
    return table


def merge_stats(a: Any, b: Any) -> Any:
    """a := a (+) b field by field, as ``REDUCE`` says; returns ``a``."""
    for field, op in _reduce_table(a).items():
        setattr(a, field, _combine(getattr(a, field), getattr(b, field), op, field))
    return a


def merge_lists(a: list, b: list) -> list:
    return [merge_stats(x, y) for x, y in zip(a, b, strict=True)]


def _combine(x, y, op: str, field: str):
    if isinstance(x, dict):
        return {k: _combine(x[k], y[k], op, f"{field}[{k!r}]") for k in x}
    if op == "sum":
        return x + y
    if op == "max":
        return torch.maximum(x, y) if isinstance(x, torch.Tensor) else max(x, y)
    raise ValueError(f"REDUCE op {op!r} of {field} is neither 'sum' nor 'max'")


def broadcast_stats(stats: Any, src: int) -> None:
    """Every REDUCE field of ``stats`` from rank ``src``, in place (numbers travel as tensors)."""
    for field in _reduce_table(stats):
        setattr(stats, field, _broadcast_value(getattr(stats, field), src))


def _broadcast_value(value, src: int):
    if isinstance(value, dict):
        return {k: _broadcast_value(v, src) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        wire = value if value.device.type != "cpu" or _wire_device().type == "cpu" else value.to(_wire_device())
        wire = wire.contiguous()
        dist.broadcast(wire, src)
        return wire.to(value.device) if wire is not value else value
    as_tensor = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.long,
                             device=_wire_device())
    dist.broadcast(as_tensor, src)
    return type(value)(as_tensor.item())


def _wire_device() -> torch.device:
    """Where collectives' scratch tensors live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


# --- process groups and launching -----------------------------------------------------------------

def launched_world() -> int:
    """WORLD_SIZE as torchrun (or ``--workers``) set it; 1 when not launched as ranks."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(shards: int | None = None) -> DataParallel:
    """Join the process group torchrun / ``--workers`` described in the environment (NCCL when this
    rank has a GPU, else gloo) and return this rank's ``DataParallel``."""
    world = launched_world()
    rank = int(os.environ.get("RANK", "0"))
    shards = shards or (int(os.environ[ENV_SHARDS]) if os.environ.get(ENV_SHARDS) else None)
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank))
            if local >= torch.cuda.device_count():
                raise ConfigError(f"rank {rank} has LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} "
                                  f"GPU(s); start at most that many workers per node")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DataParallel(rank, world, shards)


def rank_device(requested: str | None) -> str | None:
    """The compute device of this rank: its own GPU under NCCL whatever ``requested`` says about cuda."""
    if launched_world() > 1 and torch.cuda.is_available() and (requested is None or requested.startswith("cuda")):
        return f"cuda:{torch.cuda.current_device()}"
    return requested


@contextlib.contextmanager
def data_parallel(shards: int | None = None) -> Iterator[DataParallel]:
    """Inside a script started by torchrun (or alone, as the one-process reference): run the enclosed
    calibration with this rank's share of the samples.

        with compress.data_parallel(shards=8) as dp:
            compress.quantize(model, GPTQConfig(bits=4), calib=calib)
        if dp.is_main:
            compress.export(model, tok, "out")
    """
    dp = init_from_env(shards)
    with engine_context(parallel=dp):
        yield dp


def spawn(argv: list[str], workers: int, shards: int | None = None) -> int:
    """Run ``python -m compress ARGV`` as ``workers`` local ranks (the environment torchrun would set,
    with a free port on 127.0.0.1); returns the first non-zero exit code, else 0. Each rank gets an
    equal share of this machine's CPU threads."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: pass at least 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = []
    for rank in range(workers):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(workers),
                   RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(workers),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
        if shards:
            env[ENV_SHARDS] = str(shards)
        procs.append(subprocess.Popen([sys.executable, "-m", "compress", *argv], env=env))
    codes = [p.wait() for p in procs]
    bad = [c for c in codes if c]
    return bad[0] if bad else 0


# --- the engine's walk, data-parallel -----------------------------------------------------------------

class ShardedLayerInputs(LayerInputs):
    """A layer's calibration inputs as ``prepare_layer`` sees them under data parallelism: ``observe``
    sums statistics over every rank's shards; the raw inputs themselves are not all on this rank."""

    def __init__(self, layer: nn.Module, shards: dict[int, list[Chunk]], dp: DataParallel, method: str):
        self.layer, self.shards, self.dp, self.method = layer, shards, dp, method

    def observe(self, modules, new_stats, *, select=None):
        names = list(modules)

        def leaf(s: int) -> list:
            found = LayerInputs(self.layer, self.shards[s]).observe(modules, new_stats, select=select)
            return [found[n] for n in names]

        summed = self.dp.reduce_shards(leaf, lambda: [new_stats(modules[n]) for n in names])
        return dict(zip(names, summed))

    @property
    def chunks(self):
        raise ConfigError(f"{self.method} searches over a layer's raw calibration inputs, which data-parallel "
                          f"calibration spreads over the ranks; run this pass without --workers / torchrun")

    def outputs(self):
        return self.chunks


def run_layerwise_parallel(model: nn.Module, calib, method: LayerMethod, dp: DataParallel, *,
                           device: torch.device, batch_size: int, progress: bool = True) -> None:
    """``engine.run_layerwise`` with this rank's share of ``calib`` (``batch_size``: samples per forward
    chunk). The same steps, with three differences: each rank captures and runs only its own shards
    (each shard in its own forward chunks, so a sample's activations never depend on which rank or how
    many ranks ran it); every group is observed over the chunks and its statistics summed over the
    shard tree, never solved inside the forward; and each group is solved by one rank, which broadcasts
    the result."""
    layers_name, layers = find_decoder_layers(model)
    bounds = dp.shard_bounds(calib.samples)
    start = time.perf_counter()
    with torch.no_grad():
        shards = {s: capture_layer_inputs(model, layers, calib.input_ids[bounds[s][0]:bounds[s][1]], batch_size, device)
                  for s in dp.owned()}
        log.info("rank %d of %d: shards %s of %d (%d of %d samples)", dp.rank, dp.world, list(dp.owned()),
                 dp.shards, sum(bounds[s][1] - bounds[s][0] for s in dp.owned()), calib.samples)
        bar = tqdm(range(len(layers)), desc=f"{method.name} layers", unit="layer",
                   disable=not (progress and dp.is_main))
        for i in bar:
            layer = layers[i]
            prefix = f"{layers_name}.{i}."
            with _layer_scope(i, prefix, layer), onloaded(layer, device):
                prepare = getattr(method, "prepare_layer", None)
                if prepare is not None:
                    prepare(layer, prefix, ShardedLayerInputs(layer, shards, dp, method.name))
                targets = {name: m for name, m in layer.named_modules() if method.is_target(prefix + name, m)}
                if targets:
                    # Group order comes from the first sample of shard 0, the same one whatever the world size.
                    groups = trace_groups(layer, shards[0][0], targets) if dp.is_main else None
                    groups = dp.broadcast_object(groups, 0)
                    for wave in expert_waves(groups, targets, prefix):
                        stats = dp.reduce_shards(
                            lambda s, wave=wave: _observe_wave(layer, shards[s], wave, targets, method),
                            lambda wave=wave: [method.new_stats(targets[g[0]]) for g in wave])
                        _solve_wave(wave, stats, targets, method, prefix, dp)
                # The next layer's inputs, computed (as the one-process walk does) before finalize packs
                # the solved linears.
                shards = {s: [_run_layer(layer, c) for c in chunks] for s, chunks in shards.items()}
                if targets:
                    method.finalize(layer, prefix, list(targets))
                targets = stats = None           # the replaced linears (their dense weights) go now
    log.info("%s: %d layers in %.1f s on rank %d of %d", method.name, len(layers), time.perf_counter() - start,
             dp.rank, dp.world)


def _solve_wave(wave: list[list[str]], stats: list, targets: dict[str, nn.Module], method: LayerMethod,
                prefix: str, dp: DataParallel) -> None:
    """Each group of ``wave`` solved by its owner rank and broadcast (weights, then the method's record
    of the solve); a method that cannot hand its records over is solved on every rank instead, which
    gives the same result since every rank holds the same statistics."""
    shareable = hasattr(method, "solve_state") and hasattr(method, "load_solve_state") and dp.world > 1
    owners = [dp.next_solver() if shareable else dp.rank for _ in wave]
    for group, group_stats, owner in zip(wave, stats, owners):
        if owner == dp.rank:
            method.solve([prefix + n for n in group], [targets[n] for n in group], group_stats)
    if not shareable:
        return
    for group, owner in zip(wave, owners):
        modules = [targets[n] for n in group]
        dp.broadcast_tensors([p.data for m in modules for p in m.parameters(recurse=False)], owner)
        names = [prefix + n for n in group]
        state = dp.broadcast_object(method.solve_state(names) if owner == dp.rank else None, owner,
                                    device=modules[0].weight.device)
        if owner != dp.rank:
            method.load_solve_state(state)
