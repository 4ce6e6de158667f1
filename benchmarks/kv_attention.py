"""Decode-attention speed on a quantized KV cache against bf16 ``scaled_dot_product_attention``.

    python benchmarks/kv_attention.py                        # H100: Llama-3-8B attention, batch 8, 4k..32k
    python benchmarks/kv_attention.py --contexts 65536 --batch 1 --formats int4
    TRITON_INTERPRET=1 python benchmarks/kv_attention.py --smoke   # CPU: tiny shapes, torch + interpreter

For each context length and cache format (int8 / int4 / int2 KIVI with group 64 and a 128-token bf16
residual window, or fp8 E4M3 with a per-head scale and no window): the median time of one decode
step of ``compress.kernels.decode_attention`` (Triton, flash-decoding, one query token per sequence)
and of bf16 SDPA on a (B, Hq, 1, D) query over the dense (B, H, T, D) cache with ``enable_gqa=True``
(torch's default choice, plus the flash and memory-efficient backends when they accept the call),
the speed-up over the default and over the fastest bf16 backend, the bytes each reads (cache, query,
output) and the bandwidth that achieves. Each row also checks the kernel against the PyTorch
reference once (``rel_err``).

Fairness: both sides run inside CUDA graphs (``--no-graphs`` for eager launches, timed with CUDA
events after a warm-up either way), and each side rotates over enough cache copies (>= 4x the L2
size) that every call reads from device memory, not L2. Prints a table and writes JSON (default
benchmarks/results/kv_attention-<device>.json). A benchmark, not a test: run it on an idle GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from compress.kernels.decode_attention import decode_attention, decode_attention_reference
from compress.kernels.dequant_linear import triton_unsupported
from compress.kv.quant import FP8_DTYPE, QuantizedKV, packed_width
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]


def _matmul_benchmark():
    """benchmarks/linear_kernels.py, loaded by path (benchmarks/ is not a package): its timer, L2 size and
    copy-bandwidth helpers are shared, so both benchmarks time the same way."""
    spec = importlib.util.spec_from_file_location("compress_bench_kernels", ROOT / "benchmarks" / "linear_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _matmul_benchmark()
copy_bandwidth, l2_bytes, timer = _shared.copy_bandwidth, _shared.l2_bytes, _shared.timer

FORMATS = ("int8", "int4", "int2", "fp8")
# Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128.
LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128)
SMOKE = ["--device", "cpu", "--batch", "1", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
         "--contexts", "80,144", "--group-size", "16", "--residual", "16", "--repeat", "1"]


def random_cache(fmt: str, b: int, h: int, d: int, context: int, group: int, residual: int, device) -> QuantizedKV:
    """A cache of ``context`` tokens with random codes and realistic scales: integer formats keep the
    last ``residual`` tokens in bf16 (the quantized part a whole number of key blocks), fp8 none."""
    res = 0 if fmt == "fp8" else min(residual, context)
    length = context - res
    k_res = torch.randn(b, h, res, d, device=device, dtype=torch.bfloat16)
    v_res = torch.randn(b, h, res, d, device=device, dtype=torch.bfloat16)
    if fmt == "fp8":
        ks = torch.full((h,), 4 / 448, device=device)
        kc = (torch.randn(b, h, length, d, device=device) * 100).clamp(-448, 448).to(FP8_DTYPE)
        vc = (torch.randn(b, h, length, d, device=device) * 100).clamp(-448, 448).to(FP8_DTYPE)
        return QuantizedKV(8, True, group, length, kc, ks, None, vc, ks.clone(), None, k_res, v_res)
    bits = int(fmt[3:])
    gv = min(group, d)
    width = packed_width(d, bits)
    blocks = -(-length // group)

    def codes():
        return torch.randint(0, 256, (b, h, length, width), device=device, dtype=torch.uint8)

    def scales(*shape):
        return (torch.rand(*shape, device=device) * 0.1 / (2 ** bits - 1) + 1e-3).half()

    def mins(*shape):
        return (torch.randn(*shape, device=device) * 0.1 - 1).half()

    return QuantizedKV(bits, False, group, length, codes(), scales(b, h, blocks, d), mins(b, h, blocks, d),
                       codes(), scales(b, h, length, d // gv), mins(b, h, length, d // gv), k_res, v_res)


def cache_bytes(kv: QuantizedKV) -> int:
    """Bytes one decode step reads from the cache: valid codes, scales, minima, residual window."""
    n, (b, h, r, d) = kv.length, kv.k_res.shape
    total = 2 * b * h * r * d * kv.k_res.element_size()
    if kv.fp8:
        return total + 2 * b * h * n * d + 2 * h * 4
    blocks = -(-n // kv.group_size)
    groups = kv.v_scale.shape[-1]
    return total + 2 * b * h * n * packed_width(d, kv.bits) + 2 * b * h * (blocks * d + n * groups) * 2


def sdpa_backends(device: torch.device) -> dict:
    """name -> context manager factory (None: torch's own choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {"default": None}
    if device.type == "cuda":
        out["flash"] = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        out["efficient"] = lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    return out


def time_sdpa(q4: torch.Tensor, dense: list, ctx, bench) -> float | str:
    """Milliseconds per call over the dense copies, or the reason the backend refused."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        for k, v in dense:
            sdpa(q4, k, v, enable_gqa=True)
    try:
        if ctx is None:
            run()
            return bench(run) / len(dense)
        with ctx():
            run()
            return bench(run) / len(dense)
    except RuntimeError as e:                     # "No available kernel" and friends
        return str(e).splitlines()[0][:120]


def measure(fmt: str, context: int, args, bench, device) -> dict:
    b, hq, h, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    io = 2 * b * hq * d * 2                                       # query in, output out (bf16)
    first = random_cache(fmt, b, h, d, context, args.group_size, args.residual, device)
    q_bytes, dense_bytes = cache_bytes(first) + io, 2 * b * h * context * d * 2 + io
    rotate_q = max(1, math.ceil(4 * l2_bytes(device) / q_bytes))
    rotate_d = max(1, math.ceil(4 * l2_bytes(device) / dense_bytes))
    caches = [first] + [random_cache(fmt, b, h, d, context, args.group_size, args.residual, device)
                        for _ in range(rotate_q - 1)]
    ref = decode_attention_reference(q, first, scale).float()
    err = ((decode_attention(q, first, scale, backend="triton").float() - ref).norm()
           / ref.norm().clamp_min(1e-30)).item()
    del ref

    def ours():
        for kv in caches:
            decode_attention(q, kv, scale, backend="triton")

    ours()                                                        # compiles outside any graph capture
    t_ours = bench(ours) / rotate_q
    del caches
    q4 = q.unsqueeze(2)                                           # (B, Hq, 1, D)
    dense = [(torch.randn(b, h, context, d, device=device, dtype=torch.bfloat16),
              torch.randn(b, h, context, d, device=device, dtype=torch.bfloat16)) for _ in range(rotate_d)]
    bf16 = {name: time_sdpa(q4, dense, ctx, bench) for name, ctx in sdpa_backends(device).items()}
    del dense
    times = {k: v for k, v in bf16.items() if isinstance(v, float)}
    best = min(times.values())
    row = {"format": fmt, "context": context, "length": first.length, "residual": first.k_res.shape[2],
           "batch": b, "heads": hq, "kv_heads": h, "head_dim": d,
           "group_size": None if fmt == "fp8" else args.group_size, "ours_us": t_ours * 1e3,
           "bf16_us": {k: (v * 1e3 if isinstance(v, float) else None) for k, v in bf16.items()},
           "bf16_unavailable": {k: v for k, v in bf16.items() if not isinstance(v, float)},
           "speedup": times["default"] / t_ours, "speedup_vs_best_bf16": best / t_ours,
           "ours_bytes": q_bytes, "bf16_bytes": dense_bytes, "ideal_speedup": dense_bytes / q_bytes,
           "ours_GBps": q_bytes / (t_ours * 1e-3) / 1e9, "bf16_GBps": dense_bytes / (best * 1e-3) / 1e9,
           "rel_err": err, "copies": [rotate_q, rotate_d]}
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'format':>6} {'context':>7} {'ours us':>9} {'sdpa us':>9} {'flash us':>9} {'effic us':>9} "
            f"{'speedup':>8} {'vs best':>8} {'ideal':>6} {'ours GB/s':>9} {'bf16 GB/s':>9} {'rel err':>8}")
    lines = [head, "-" * len(head)]

    def us(x):
        return f"{x:>9.1f}" if x is not None else f"{'-':>9}"
    for r in rows:
        t = r["bf16_us"]
        lines.append(f"{r['format']:>6} {r['context']:>7} {r['ours_us']:>9.1f} {us(t.get('default'))} "
                     f"{us(t.get('flash'))} {us(t.get('efficient'))} {r['speedup']:>7.2f}x "
                     f"{r['speedup_vs_best_bf16']:>7.2f}x {r['ideal_speedup']:>5.2f}x {r['ours_GBps']:>9.0f} "
                     f"{r['bf16_GBps']:>9.0f} {r['rel_err']:>8.1e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=LLAMA3_8B["heads"], help="query heads")
    p.add_argument("--kv-heads", type=int, default=LLAMA3_8B["kv_heads"])
    p.add_argument("--head-dim", type=int, default=LLAMA3_8B["head_dim"])
    p.add_argument("--contexts", default="4096,8192,16384,32768", help="comma-separated cached tokens")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {', '.join(FORMATS)}")
    p.add_argument("--group-size", type=int, default=64, help="int formats: key block / value group")
    p.add_argument("--residual", type=int, default=128, help="int formats: bf16 residual window (tokens)")
    p.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graphs")
    p.add_argument("--repeat", type=int, default=5, help="CPU only: timed repetitions")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), for tests")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/kv_attention-<device>.json)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.smoke:                                # smoke defaults first, explicit flags still win
        args = p.parse_args(SMOKE + argv)
    bad = [f for f in args.formats.split(",") if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    return args, argv


def main(argv: list[str] | None = None) -> int:
    args, argv = parse_args(argv)
    device = torch.device(args.device)
    reason = triton_unsupported(device, torch.bfloat16, 8)
    if reason:
        print(f"benchmarks/kv_attention.py: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bench = timer(device, not args.no_graphs, args.repeat)
    rows = [measure(fmt, int(ctx), args, bench, device)
            for ctx in args.contexts.split(",") for fmt in args.formats.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device, bench) if device.type == "cuda" else None
    print(f"device: {name}{f'; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)' if bw else ''}; "
          f"B={args.batch} Hq={args.heads} H={args.kv_heads} D={args.head_dim}; int: group {args.group_size}, "
          f"residual {args.residual}; {'CUDA graphs' if device.type == 'cuda' and not args.no_graphs else 'eager'}")
    print(format_table(rows))
    out = args.output or ROOT / "benchmarks" / "results" / f"kv_attention-{name.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/kv_attention.py " + " ".join(argv),
                               "machine": machine(), "copy_bandwidth_Bps": bw,
                               "graphs": device.type == "cuda" and not args.no_graphs, "rows": rows}, indent=2)
                   + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
