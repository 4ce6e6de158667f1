"""Speed of the int4 / int8 / NVFP4 / MXFP4 quantized matmul against bf16 ``torch.nn.functional.linear``.

    python benchmarks/linear_kernels.py                          # H100: Llama-3-8B shapes, M = 1 .. 256
    python benchmarks/linear_kernels.py --bits 8                 # int8 per-channel weights instead
    python benchmarks/linear_kernels.py --format nvfp4           # NVFP4 W4A16 (E2M1, fp8 scale per 16)
    python benchmarks/linear_kernels.py --format mxfp4           # MXFP4 W4A16 (E2M1, E8M0 scale per 32)
    python benchmarks/linear_kernels.py --format fp8             # FP8 W8A8 (per channel x per token), M = 1, 16, 4096
    python benchmarks/linear_kernels.py --format int8            # INT8 W8A8 (per channel x per token)
    TRITON_INTERPRET=1 python benchmarks/linear_kernels.py --device cpu --shapes 96x40 --batches 1,3 --repeat 1

For each layer shape (in_features x out_features) and batch M: the median time of our kernel
(int4 group 128 symmetric, or the FP4 format, with the config the autotuner picks) and of bf16
F.linear, the speed-up, the ideal speed-up (bytes bf16 / bytes quantized for that M: 3.56x for
NVFP4 at M = 1, ignoring activations), and the bandwidth each achieves as a fraction of the
measured device-to-device copy bandwidth (bytes read + written).

W8A8 (``--format fp8 | int8``): the whole layer as a model runs it, ``w8a8_linear(..., backend="auto")``
(dynamic per-token activation quantization by the Triton kernel, then ``torch._scaled_mm`` /
``torch._int_mm`` / our Triton GEMM as ``native_plan`` decides), activation quantization inside
the timed region, against bf16 F.linear; default shapes Llama-3-8B qkv, o, gate_up (fused) and down
at M = 1, 16, 4096. The ideal speed-up is the byte ratio for M <= 16 and 2x (the 8-bit tensor-core
rate) above.

Fairness: both sides run inside CUDA graphs (no launch gaps), and each side rotates over enough
weight copies (>= 4x the L2 size) that every call reads its weights from device memory, not L2.
Prints a table and writes JSON (default benchmarks/results/kernels-<device>.json). A benchmark,
not a test: run it on an idle GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from compress.kernels.dequant_linear import dequant_linear, triton_unsupported
from compress.kernels.fp4_linear import BLOCK, fp4_linear
from compress.kernels.packing import pack_int32
from compress.kernels.w8a8_linear import w8a8_linear
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
# Llama-3-8B: attention out / q (4096 -> 4096), MLP up or gate (4096 -> 14336), MLP down
# (14336 -> 4096), fused QKV (4096 -> 4096 + 2 * 1024).
LLAMA3_8B = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 6144))
# W8A8: fused qkv, o, fused gate_up, down.
LLAMA3_8B_W8A8 = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
# Minimum speed-up over bf16 at these M, per format; never below 1.0 elsewhere.
TARGETS = {"int": {1: 3.0, 16: 2.5}, "nvfp4": {1: 2.8}, "mxfp4": {1: 2.8}, "fp8": {1: 1.6, 4096: 1.6},
           "int8": {}}
FORMATS = tuple(TARGETS)
W8A8 = ("fp8", "int8")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        k, _, n = item.partition("x")
        out.append((int(k), int(n)))
    return out


def timer(device: torch.device, graphs: bool, repeat: int):
    """fn -> median milliseconds of one call of fn."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph
        if graphs:
            return lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median")
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu


def copy_bandwidth(device: torch.device, bench) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def weight_sets(k: int, n: int, bits: int, group_size: int | None, copies: int, device) -> list[tuple]:
    """``copies`` independent random packed weights (packed, scale) of one layer."""
    out = []
    groups = 1 if group_size is None else -(-k // group_size)
    for _ in range(copies):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8)
        scale = (torch.rand(n, groups) * 0.01 + 0.002).to(torch.bfloat16)
        out.append((pack_int32(codes, bits).to(device), scale.to(device)))
    return out


def fp4_weight_sets(k: int, n: int, kind: str, copies: int, device) -> list[tuple]:
    """``copies`` random (packed, scale, global_scale) NVFP4 or MXFP4 weights of one layer."""
    out = []
    for _ in range(copies):
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        if kind == "nvfp4":
            # E4M3 bytes 0x28..0x5E (0.25 .. 30), global scale of a weight with amax ~0.1.
            scale = torch.randint(0x28, 0x5F, (n, k // 16), dtype=torch.uint8).view(torch.float8_e4m3fn)
            g = torch.tensor([2688 / 0.1], dtype=torch.float32).to(device)
        else:
            scale, g = torch.randint(115, 126, (n, k // 32), dtype=torch.uint8), None
        out.append((packed.to(device), scale.to(device), g))
    return out


def w8a8_weight_sets(k: int, n: int, kind: str, copies: int, device) -> list[tuple]:
    """``copies`` random (codes (N, K), bf16 per-channel scales (N, 1)) W8A8 weights of one layer."""
    out = []
    for _ in range(copies):
        if kind == "fp8":
            codes = (torch.randn(n, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        out.append((codes.to(device), (torch.rand(n, 1) * 1e-4 + 1e-5).to(torch.bfloat16).to(device)))
    return out


def quantized_bytes(k: int, n: int, args) -> float:
    """Bytes of one packed weight: codes plus scales (int: bf16 scales; NVFP4: fp8 + the global)."""
    if args.format in W8A8:
        return n * k + n * 2
    if args.format == "int":
        return n * k * args.bits / 8 + n * (1 if args.group_size is None else -(-k // args.group_size)) * 2
    return n * k / 2 + n * k // BLOCK[args.format] + (4 if args.format == "nvfp4" else 0)


def measure(k: int, n: int, m: int, args, bench, device, copy_bw: float) -> dict:
    bits, group = args.bits, args.group_size
    q_bytes = quantized_bytes(k, n, args)
    io_bytes = (m * k + m * n) * 2
    bf16_bytes = n * k * 2
    rotate = max(1, -(-4 * l2_bytes(device) // int(min(q_bytes, bf16_bytes))))
    ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(rotate)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    if args.format == "int":
        qs = weight_sets(k, n, bits, group, rotate, device)
        meta = dict(bits=bits, group_size=group, in_features=k, backend="triton")

        def ours():
            for packed, scale in qs:
                dequant_linear(x, packed, scale, None, None, **meta)
    elif args.format in W8A8:
        wqs = w8a8_weight_sets(k, n, args.format, rotate, device)
        # The layer as a model runs it: auto (native path) on the GPU, the Triton kernels on the CPU.
        backend = "auto" if device.type == "cuda" else "triton"

        def ours():
            for codes, scale in wqs:
                w8a8_linear(x, codes, scale, None, None, kind=args.format, act="token", backend=backend)
    else:
        fqs = fp4_weight_sets(k, n, args.format, rotate, device)

        def ours():
            for packed, scale, g in fqs:
                fp4_linear(x, packed, scale, g, None, kind=args.format, backend="triton")

    def dense():
        for w in ws:
            torch.nn.functional.linear(x, w)

    ours()                                        # autotunes this shape outside any graph capture
    t_ours = bench(ours) / rotate
    t_bf16 = bench(dense) / rotate
    fp4 = args.format in ("nvfp4", "mxfp4")
    ideal = (bf16_bytes + io_bytes) / (q_bytes + io_bytes)
    if args.format in W8A8 and m > 16:
        ideal = 2.0                                                   # compute-bound: 8-bit tensor-core rate
    row = {"in_features": k, "out_features": n, "m": m, "format": args.format,
           "bits": 4 if fp4 else (8 if args.format in W8A8 else bits),
           "group_size": group if args.format == "int" else None, "block_size": BLOCK[args.format] if fp4 else None,
           "ours_us": t_ours * 1e3, "bf16_us": t_bf16 * 1e3, "speedup": t_bf16 / t_ours,
           "ideal_speedup": ideal, "weight_copies": rotate}
    row["ours_bw_frac"] = (q_bytes + io_bytes) / (t_ours * 1e-3) / copy_bw
    row["bf16_bw_frac"] = (bf16_bytes + io_bytes) / (t_bf16 * 1e-3) / copy_bw
    row["target"] = TARGETS[args.format].get(m, 1.0)
    row["meets_target"] = row["speedup"] >= row["target"]
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'in x out':>13} {'M':>4} {'ours us':>9} {'bf16 us':>9} {'speedup':>8} {'ideal':>6} "
            f"{'ours BW':>8} {'bf16 BW':>8} {'target':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['in_features']:>6}x{r['out_features']:<6} {r['m']:>4} {r['ours_us']:>9.2f} "
                     f"{r['bf16_us']:>9.2f} {r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x "
                     f"{r['ours_bw_frac']:>7.0%} {r['bf16_bw_frac']:>7.0%} "
                     f"{'ok' if r['meets_target'] else 'MISS':>4} {r['target']:.1f}x")
    return "\n".join(lines)


def describe(args) -> str:
    if args.format == "nvfp4":
        return "NVFP4 (E2M1, E4M3 scale per 16, float32 global)"
    if args.format == "mxfp4":
        return "MXFP4 (E2M1, E8M0 scale per 32)"
    if args.format in W8A8:
        return f"{args.format.upper()} W8A8 (weights per channel, activations dynamic per token, quantization timed)"
    return f"int{args.bits} {'g' + str(args.group_size) if args.group_size else 'per channel'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="IN1xOUT1,IN2xOUT2,... (default: Llama-3-8B layers)")
    p.add_argument("--batches", default=None, help="comma-separated M values (default 1,4,16,64,256; W8A8 1,16,4096)")
    p.add_argument("--format", choices=FORMATS, default="int",
                   help="int: pack-quantized int4/int8 (--bits, --group-size); nvfp4 / mxfp4: FP4 W4A16; "
                        "fp8 / int8: W8A8 (8-bit weights and activations)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="--format int only")
    p.add_argument("--group-size", type=lambda s: None if s == "channel" else int(s), default=None)
    p.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graphs")
    p.add_argument("--repeat", type=int, default=5, help="CPU only: timed repetitions")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    w8a8 = args.format in W8A8
    if args.shapes is None:
        args.shapes = list(LLAMA3_8B_W8A8 if w8a8 else LLAMA3_8B)
    if args.batches is None:
        args.batches = "1,16,4096" if w8a8 else "1,4,16,64,256"
    if args.group_size is None:
        args.group_size = 128 if args.bits == 4 else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    reason = triton_unsupported(device, torch.bfloat16, args.bits)
    if reason:
        print(f"benchmarks/linear_kernels.py: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bench = timer(device, not args.no_graphs, args.repeat)
    copy_bw = copy_bandwidth(device, bench)
    rows = [measure(k, n, int(m), args, bench, device, copy_bw)
            for k, n in args.shapes for m in args.batches.split(",")]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s (read + write); {describe(args)}; "
          f"{'CUDA graphs' if device.type == 'cuda' and not args.no_graphs else 'eager'}")
    print(format_table(rows))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    suffix = "" if args.format == "int" else f"-{args.format}"
    out = args.json_out or ROOT / "benchmarks" / "results" / f"kernels-{name.replace(' ', '_')}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/linear_kernels.py " + " ".join(argv or sys.argv[1:]),
                               "machine": machine(), "copy_bandwidth_Bps": copy_bw,
                               "graphs": device.type == "cuda" and not args.no_graphs, "rows": rows}, indent=2)
                   + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
