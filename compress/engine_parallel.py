"""The engine's layer walk, data-parallel (compress.distributed explains the scheme).

The same steps as ``engine.run_layerwise``, with three differences: each rank captures and runs only
its own shards of the calibration samples (each shard in its own forward chunks, so a sample's
activations never depend on which rank or how many ranks ran it); every group is observed over the
chunks and its statistics summed over the shard tree (``DataParallel.reduce_shards``), never solved
inside the forward; and each group is solved by one rank, which broadcasts the result.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import DataParallel
from .engine import (Chunk, LayerInputs, LayerMethod, _layer_scope, _observe_wave, _run_layer,
                     capture_layer_inputs, expert_waves, trace_groups)
from .errors import ConfigError
from .modeling import find_decoder_layers, onloaded

log = logging.getLogger(__name__)


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
    """``run_layerwise`` with this rank's share of ``calib`` (``batch_size``: samples per forward chunk)."""
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
