"""Kernel configurations for the quantized matmul, the shape heuristic, and the autotuner with its
per-device, per-shape cache.

Three kinds of configuration compete for a call ``x (M, K) @ W^T (K, N)``:

- ``splitk``: the small-batch schedule (M <= 16): few rows, K split over SPLIT_K programs;
- ``tiled``:  the medium-batch schedule: ``tl.dot`` tiles, SPLIT_K = 1;
- ``dense``:  dequantize the weight with a Triton kernel, then cuBLAS (large M, where the
  matmul is compute-bound and dequantizing once is cheap next to it).

``heuristic_config`` picks one from the shape and the GPU's SM count without running anything.
``Autotuner`` times every candidate once per (device, shape bucket) under CUDA graphs with a cold
L2 (``graph_bench``), keeps the fastest, and stores the choice in a JSON file per device
(``$COMPRESS_CACHE_DIR``, default ``~/.cache/compress``), so a later process starts with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KINDS = ("splitk", "tiled", "dense")
SMALL_M = 16          # largest batch the split-K schedule is meant for
DENSE_M = 256         # from this batch up the heuristic dequantizes and calls cuBLAS


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    kind: str
    block_m: int = 1
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        return (f"{self.kind}_m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")

    @classmethod
    def from_name(cls, name: str) -> KernelConfig:
        for cfg in all_configs():
            if cfg.name == name:
                return cfg
        raise KeyError(name)


# One token (BLOCK_M = 1): (BLOCK_N, BLOCK_K, warps, stages). Besides plain loads (stages 1) the
# loop can stream its weights through the cp.async pipeline (stages 3: two tiles ahead, for a
# shared-memory round trip), and tiles can span 2 or 4 whole groups of 128 (BLOCK_K 256 / 512:
# GROUP_MODE 3 in dequant_linear_triton.py, every group's words loaded before the first is decoded).
# Measured on an H200 (benchmarks/results/gemv-sweep-h200.json, Llama-3-8B MLP shapes): at the
# best split (8) plain loads win (20.0-22.2 us); the pipeline only helps with one split (23.4 us
# against 33-38 us), and the wide tiles never lead.
_GEMV_TILES = ((32, 128, 4, 1), (64, 128, 4, 1), (128, 128, 4, 1), (32, 128, 4, 3), (64, 128, 4, 3),
               (64, 256, 8, 1), (32, 256, 4, 1), (64, 512, 4, 1), (64, 512, 4, 3), (32, 512, 4, 3))
# The ones the autotuner times on first use (each costs a compile, ~1 s): the measured leaders and
# the best one-split tile. benchmarks/gemv_sweep.py times every _GEMV_TILES entry.
_GEMV_AUTOTUNE = ((32, 128, 4, 1), (64, 128, 4, 1), (128, 128, 4, 1), (64, 512, 4, 3))
# BLOCK_M = 16 reduces with tl.dot, which Triton pipelines at any stage count.
_SMALL_M_TILES = ((32, 128, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 8, 3), (32, 256, 4, 3))


def _splitk_configs() -> list[KernelConfig]:
    out = []
    for block_m, tiles in ((1, _GEMV_TILES), (16, _SMALL_M_TILES)):
        for block_n, block_k, warps, stages in tiles:
            for split_k in (1, 2, 4, 8):
                out.append(KernelConfig("splitk", block_m, block_n, block_k, split_k, 1, warps, stages))
    return out


def _tiled_configs() -> list[KernelConfig]:
    return [KernelConfig("tiled", m, n, k, 1, 8, w, s) for m, n, k, w, s in (
        (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (64, 64, 128, 4, 3),
        (64, 128, 64, 4, 4), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 64, 128, 8, 3))]


def all_configs() -> list[KernelConfig]:
    """Every configuration any call may run; the interpreter tests run each one."""
    return _splitk_configs() + _tiled_configs() + [KernelConfig("dense")]


def m_bucket(m: int) -> int:
    """Calls whose batch falls in one bucket share a tuned config: 1, 2, 4, ..., 4096."""
    bucket = 1
    while bucket < m and bucket < 4096:
        bucket *= 2
    return bucket


def candidates(m: int, group_size: int | None, exhaustive: bool = False) -> list[KernelConfig]:
    """The configs worth timing for a batch of ``m`` rows. Tiles whose BLOCK_K does not divide the
    group size are kept out where another tile keeps the scale-once-per-tile path. ``exhaustive``:
    every one-token tile (benchmarks/gemv_sweep.py), not only the autotuner's shortlist."""
    def fits(cfg: KernelConfig) -> bool:
        if group_size is None or group_size % cfg.block_k == 0 or group_size < 64:
            return True
        # one token: a tile of 2 or 4 whole groups keeps the scale-once path
        return cfg.block_m == 1 and cfg.block_k % group_size == 0 and cfg.block_k // group_size in (2, 4)
    out = []
    if m == 1:
        tuned = {(n, k, w, st) for n, k, w, st in _GEMV_AUTOTUNE}
        wide = group_size is None or group_size >= 256     # 256-wide tiles inside one group, as before
        out += [c for c in _splitk_configs() if c.block_m == 1 and (
            exhaustive or (c.block_n, c.block_k, c.num_warps, c.num_stages) in tuned
            or (wide and c.block_k == 256))]
    elif m <= SMALL_M:
        out += [c for c in _splitk_configs() if c.block_m > 1]
    if m > 1:
        out += [c for c in _tiled_configs() if c.block_m <= max(16, 2 * m_bucket(m))]
    out = [c for c in out if fits(c)] or out
    return out + [KernelConfig("dense")]


def heuristic_config(m: int, n: int, k: int, group_size: int | None, sm_count: int = 132) -> KernelConfig:
    """A good config without timing anything: enough programs for every SM, tiles inside a group."""
    block_k = 128 if group_size is None or group_size % 128 == 0 else 64 if group_size % 64 == 0 else 128
    if m >= DENSE_M:
        return KernelConfig("dense")
    if m > SMALL_M:
        block_m = 32 if m <= 32 else 64
        return KernelConfig("tiled", block_m, 64 if m <= 64 else 128, block_k, 1, 8, 4, 3)
    block_m, block_n = (1, 64) if m == 1 else (16, 64)
    stages = 1 if m == 1 else 3                  # the M = 1 tile measured on the H200 (tuning's _GEMV_TILES)
    n_tiles = -(-n // block_n)
    k_tiles = -(-k // block_k)
    split_k = 1
    # Aim for several programs per SM so that loads from several programs overlap (one token: eight;
    # measured on an H200, split 8 beat 4 on both Llama-3-8B MLP shapes, 21.0 vs 22.0 and 22.2 vs
    # 31.8 us), but keep at least two K tiles in every slice.
    per_sm = 8 if m == 1 else 4
    while n_tiles * split_k < per_sm * sm_count and split_k * 2 <= 8 and k_tiles // (split_k * 2) >= 2:
        split_k *= 2
    return KernelConfig("splitk", block_m, block_n, block_k, split_k, 1, 4, stages)


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE_DIR") or Path.home() / ".cache" / "compress")


class Autotuner:
    """Times candidate configs on the current GPU and remembers the fastest per shape.

    One instance per process (``dequant_linear.tuner()``); its table maps
    ``"bits|group|zp|gidx|bias|dtype|m_bucket|n|k"`` (int kernels, ``int4|...``) or
    ``"format|bias|dtype|m_bucket|n|k"`` (FP4 kernels, ``nvfp4|...`` / ``mxfp4|...``) to a config
    name and is mirrored to ``cache_dir()/autotune-<device>.json``.
    """

    def __init__(self, device_key: str, directory: Path | None = None):
        self.device_key = device_key
        self.path = (directory or cache_dir()) / f"autotune-{_safe(device_key)}.json"
        self.table: dict[str, str] = self._read()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable autotune cache %s (%s); it will be rewritten", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("device") != self.device_key:
            return {}
        return {k: v for k, v in (data.get("configs") or {}).items() if isinstance(v, str)}

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"device": self.device_key, "configs": self.table}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write the autotune cache %s (%s); tuning will repeat next run", self.path, exc)

    def lookup(self, key: str) -> KernelConfig | None:
        name = self.table.get(key)
        if name is None:
            return None
        try:
            return KernelConfig.from_name(name)
        except KeyError:                       # written by another version of compress
            return None

    def tune(self, key: str, run_config, configs: list[KernelConfig], bench) -> KernelConfig:
        """Time ``run_config(cfg)`` for each config with ``bench(fn) -> ms``; keep the fastest."""
        timings = {}
        for cfg in configs:
            try:
                timings[cfg] = bench(lambda cfg=cfg: run_config(cfg))
            except Exception as exc:           # a config the compiler or the GPU refuses (shared memory, ...)
                log.debug("autotune %s: %s failed (%s)", key, cfg.name, exc)
        if not timings:
            raise RuntimeError(f"no kernel config ran for {key}")
        best = min(timings, key=timings.get)
        log.info("autotune %s: %s (%.4f ms; %d configs timed)", key, best.name, timings[best], len(timings))
        self.table[key] = best.name
        self._write()
        return best


def graph_bench(fn, *, calls: int = 8, trials: int = 7, flush_bytes: int | None = None) -> float:
    """Milliseconds one ``fn()`` call takes on the GPU, timed the way decoding runs it: replayed from a
    CUDA graph (no launch gaps between the kernels of a call, so a split-K call's zero-fill, kernel and
    copy cost what they cost under graphs) with the L2 cache flushed before each call (weights come
    from HBM, as they do when a whole model streams through). Two graphs of ``calls`` calls each,
    flush + call and flush alone; the result is the median difference per call over ``trials``.

    Timing single launches instead (``triton.testing.do_bench``) charges each kernel its CPU launch
    time: on an H200 it kept a 1-slice int4 config for 4096x14336 at one token that measured 32.9 us
    under graphs against 21.0 us for the 8-slice one (benchmarks/results/gpu-suite-h200.json)."""
    device = torch.cuda.current_device()
    if flush_bytes is None:
        flush_bytes = 2 * int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)
    flush = torch.empty(max(flush_bytes // 4, 1), dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # compile and warm outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(body) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        return graph

    def call_after_flush():
        flush.zero_()
        fn()

    graphs = {"flush": capture(flush.zero_), "both": capture(call_after_flush)}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: dict[str, list[float]] = {"flush": [], "both": []}
    for graph in graphs.values():
        graph.replay()
    for _ in range(trials):                       # interleaved, so clock drift hits both alike
        for name, graph in graphs.items():
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    del graphs
    diff = sorted((b - f) / calls for b, f in zip(times["both"], times["flush"]))
    return max(diff[len(diff) // 2], 1e-6)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def split_k_launch(M: int, N: int, K: int, config: KernelConfig, x: torch.Tensor,
                   out: torch.Tensor | None = None) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """The split-K plan every fused linear kernel launches with: (split_k, k_per_split, result, acc).

    K is cut into ``split_k`` slices of whole BLOCK_K tiles, none empty. With one slice the kernel
    writes ``result`` (M, N) in x's dtype directly; with several, the slices add float32 partial sums
    into a zeroed ``acc`` that the caller copies into ``result`` after the launch."""
    k_tiles = -(-K // config.block_k)
    split_k = max(1, min(config.split_k, k_tiles))
    k_per_split = -(-k_tiles // split_k) * config.block_k
    split_k = -(-K // k_per_split)                                       # no empty slices
    result = out if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    acc = result if split_k == 1 else torch.zeros(M, N, device=x.device, dtype=torch.float32)
    return split_k, k_per_split, result, acc
