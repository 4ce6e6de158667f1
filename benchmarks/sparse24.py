"""Speed of the 2:4 sparse linear (bf16 values, or int4 codes) against dense bf16 ``F.linear`` at decode batches.

    python benchmarks/sparse24.py                        # H100: Llama-3-8B MLP shapes, M = 1, 4, 16
    python benchmarks/sparse24.py --batches 1 --no-graphs
    TRITON_INTERPRET=1 python benchmarks/sparse24.py --smoke   # CPU: tiny shapes, correctness only

For each layer shape (in_features x out_features: the MLP's gate/up 4096 x 14336 and down
14336 x 4096) and batch M, four ways to compute ``x @ W^T`` with bf16 activations:

- ``bf16``:      dense bf16 weight, ``torch.nn.functional.linear`` (cuBLAS);
- ``sp24_bf16``: our 2:4 kernel on the compact layout, bf16 kept values + 2-bit positions
  (``compress.kernels.sparse24_linear``): 0.5625x the bf16 bytes;
- ``sp24_int4``: the same with int4 g128 codes of the kept values: 0.195x the bf16 bytes;
- ``int4``:      our dense int4 g128 kernel (``dequant_linear``), for reference: 0.258x.

Each gets the median time of one call, the speed-up over bf16, the ideal speed-up (bytes moved,
activations included), the bandwidth as a fraction of a measured device-to-device copy, and its
relative error against the PyTorch reference (checked once per row). Targets at M = 1: 2:4 bf16 at
least 1.5x bf16, 2:4 int4 at least 4x.

Fairness as in benchmarks/linear_kernels.py (whose timer, L2 size and copy-bandwidth helpers this script
loads): every variant runs inside CUDA graphs (``--no-graphs`` for eager launches) and rotates over
enough weight copies (>= 4x the L2 size) that every call reads its weights from device memory.
Our kernels are autotuned for each shape before timing. Prints a table and writes JSON (default
benchmarks/results/sparse24-<device>.json). A benchmark, not a test: run it on an idle GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import torch

from compress.kernels.dequant_linear import dequant_linear, dequant_linear_reference, triton_unsupported
from compress.kernels.sparse24_linear import (CANONICAL_NIBBLES, sparse24_linear, sparse24_linear_reference)
from compress.kernels.packing import packed_words
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]


def _matmul_benchmark():
    """benchmarks/linear_kernels.py, loaded by path (benchmarks/ is not a package): its timer, L2 size and
    copy-bandwidth helpers are shared, so every kernel benchmark times the same way."""
    spec = importlib.util.spec_from_file_location("compress_bench_kernels", ROOT / "benchmarks" / "linear_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _matmul_benchmark()
copy_bandwidth, l2_bytes, parse_shapes, timer = (_shared.copy_bandwidth, _shared.l2_bytes, _shared.parse_shapes,
                                                 _shared.timer)

# Llama-3-8B MLP: gate / up (4096 -> 14336), down (14336 -> 4096).
LLAMA3_8B_MLP = ((4096, 14336), (14336, 4096))
VARIANTS = ("bf16", "sp24_bf16", "sp24_int4", "int4")
# Minimum speed-up over bf16 at these M (H100).
TARGETS = {"sp24_bf16": {1: 1.5}, "sp24_int4": {1: 4.0}}
SMOKE = ["--device", "cpu", "--shapes", "64x40,136x24", "--batches", "1,3", "--repeat", "1"]
SMOKE_TOL = 2e-2                   # bf16 activations and output: ||y - ref|| / ||ref||


def random_weight(variant: str, k: int, n: int, group_size: int, device) -> tuple:
    """The tensors one layer of ``variant`` holds, random values of a real layer's size."""
    if variant == "bf16":
        return (torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02,)
    if variant == "int4":
        packed = torch.randint(-2**31, 2**31 - 1, (n, packed_words(k, 4)), device=device, dtype=torch.int32)
        return packed, (torch.rand(n, k // group_size, device=device) * 0.01 + 0.002).to(torch.bfloat16)
    nibbles = torch.tensor(CANONICAL_NIBBLES, device=device, dtype=torch.uint8)
    pick = torch.randint(0, len(CANONICAL_NIBBLES), (n, k // 8, 2), device=device)
    meta = nibbles[pick[..., 0]] | (nibbles[pick[..., 1]] << 4)                 # well-formed positions
    if variant == "sp24_bf16":
        return torch.randn(n, k // 2, device=device, dtype=torch.bfloat16) * 0.02, meta
    packed = torch.randint(-2**31, 2**31 - 1, (n, packed_words(k // 2, 4)), device=device, dtype=torch.int32)
    return packed, meta, (torch.rand(n, k // group_size, device=device) * 0.01 + 0.002).to(torch.bfloat16)


def weight_bytes(weights: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in weights)


def caller(variant: str, group_size: int, k: int):
    """(ours(x, weights) -> y, reference(x, weights) -> y) for ``variant``."""
    if variant == "bf16":
        def dense(x, w):
            return torch.nn.functional.linear(x, w[0])
        return dense, dense
    if variant == "int4":
        meta = dict(bits=4, group_size=group_size, in_features=k)
        return (lambda x, w: dequant_linear(x, w[0], w[1], None, None, backend="triton", **meta),
                lambda x, w: dequant_linear_reference(x, w[0], w[1], None, None, **meta))
    bits, gs = (None, None) if variant == "sp24_bf16" else (4, group_size)

    def parts(w):
        return (w[0], w[1], None) if bits is None else (w[0], w[1], w[2])
    return (lambda x, w: sparse24_linear(x, *parts(w), None, in_features=k, group_size=gs, bits=bits,
                                         backend="triton"),
            lambda x, w: sparse24_linear_reference(x, *parts(w), None, in_features=k, group_size=gs, bits=bits))


def measure(k: int, n: int, m: int, args, bench, device, copy_bw: float) -> dict:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    io = (m * k + m * n) * 2
    row = {"in_features": k, "out_features": n, "m": m, "group_size": args.group_size}
    for variant in VARIANTS:
        first = random_weight(variant, k, n, args.group_size, device)
        wb = weight_bytes(first)
        rotate = max(1, math.ceil(4 * l2_bytes(device) / wb))
        copies = [first] + [random_weight(variant, k, n, args.group_size, device) for _ in range(rotate - 1)]
        ours, reference = caller(variant, args.group_size, k)
        ref = reference(x, first).float()
        err = ((ours(x, first).float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

        def run():
            for w in copies:
                ours(x, w)
        run()                                     # compiles and autotunes outside any graph capture
        t = bench(run) / rotate
        row[variant] = {"us": t * 1e3, "weight_bytes": wb, "copies": rotate, "rel_err": err,
                        "bw_frac": (wb + io) / (t * 1e-3) / copy_bw if copy_bw else None}
        del copies
    base = row["bf16"]
    for variant in VARIANTS[1:]:
        r = row[variant]
        r["speedup"] = base["us"] / r["us"]
        r["ideal_speedup"] = (base["weight_bytes"] + io) / (r["weight_bytes"] + io)
        target = TARGETS.get(variant, {}).get(m)
        r["target"] = target
        r["meets_target"] = None if target is None else r["speedup"] >= target
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'in x out':>13} {'M':>3} {'bf16 us':>8}" + "".join(
        f" {v + ' us':>13} {'x':>6} {'ideal':>6}" for v in VARIANTS[1:]) + f" {'max err':>8}  targets"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f" {r[v]['us']:>13.2f} {r[v]['speedup']:>5.2f}x {r[v]['ideal_speedup']:>5.2f}x"
                        for v in VARIANTS[1:])
        err = max(r[v]["rel_err"] for v in VARIANTS)
        marks = ", ".join(f"{v} {'ok' if r[v]['meets_target'] else 'MISS'} {r[v]['target']:.1f}x"
                          for v in VARIANTS[1:] if r[v]["target"] is not None)
        lines.append(f"{r['in_features']:>6}x{r['out_features']:<6} {r['m']:>3} {r['bf16']['us']:>8.2f}{cells} "
                     f"{err:>8.1e}  {marks}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=parse_shapes, default=list(LLAMA3_8B_MLP), help="IN1xOUT1,IN2xOUT2,...")
    p.add_argument("--batches", default="1,4,16", help="comma-separated M values (the kernel targets 1..16)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (both int4 variants)")
    p.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graphs")
    p.add_argument("--repeat", type=int, default=5, help="CPU only: timed repetitions")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter): correctness")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/sparse24-<device>.json)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.smoke:                                # smoke defaults first, explicit flags still win
        args = p.parse_args(SMOKE + ["--group-size", "8"] + argv)
    return args, argv


def main(argv: list[str] | None = None) -> int:
    args, argv = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    reason = triton_unsupported(device, torch.bfloat16, 4)
    if reason:
        print(f"benchmarks/sparse24.py: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bench = timer(device, not args.no_graphs, args.repeat)
    copy_bw = copy_bandwidth(device, bench) if device.type == "cuda" else None
    rows = [measure(k, n, int(m), args, bench, device, copy_bw) for k, n in args.shapes
            for m in args.batches.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    graphs = device.type == "cuda" and not args.no_graphs
    print(f"device: {name}{f'; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)' if copy_bw else ''}; "
          f"bf16 activations; int4 group {args.group_size}; {'CUDA graphs' if graphs else 'eager'}")
    print(format_table(rows))
    out = args.output or ROOT / "benchmarks" / "results" / f"sparse24-{name.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/sparse24.py " + " ".join(argv), "machine": machine(),
                               "copy_bandwidth_Bps": copy_bw, "graphs": graphs, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    bad = [(r["in_features"], r["out_features"], r["m"], v) for r in rows for v in VARIANTS
           if not r[v]["rel_err"] < SMOKE_TOL]
    if bad:
        print(f"benchmarks/sparse24.py: kernels disagree with the reference at {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
