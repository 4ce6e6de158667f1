"""Every one-token (M = 1) kernel configuration of the int4 and NVFP4 linears, timed one by one.

    python benchmarks/gemv_sweep.py                                   # GPU: int4 g128 + NVFP4, Llama-3-8B MLP
    python benchmarks/gemv_sweep.py --formats int4 --shapes 4096x14336 --json-out /tmp/sweep.json
    TRITON_INTERPRET=1 python benchmarks/gemv_sweep.py --device cpu --shapes 256x128 --limit 3   # plumbing only

``linear_kernels.py`` reports the config the autotuner keeps; this script reports all of them, so
that the candidate list and the shape heuristic (``compress/kernels/tuning.py``) can be set from
measurements: the time of each config, its speed-up over bf16 ``F.linear`` and the weight bandwidth
it reaches (bytes of codes + scales per second). Same fairness rules as ``linear_kernels.py``: CUDA
graphs on both sides and enough weight copies (>= 4x L2) that every call reads device memory.

Compiling ~50 configs one after the other takes minutes, so the kernels are first compiled in
``--workers`` processes at once (they share Triton's on-disk cache); the timing then runs in this
process alone. Prints a table per shape, best first, and writes JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from linear_kernels import copy_bandwidth, fp4_weight_sets, l2_bytes, parse_shapes, timer, weight_sets  # noqa: E402

from compress.kernels import tuning  # noqa: E402
from compress.report import machine  # noqa: E402

GROUP = 128


def configs(fmt: str) -> list[tuning.KernelConfig]:
    group = GROUP if fmt == "int4" else 16
    return [c for c in tuning.candidates(1, group, exhaustive=True) if c.kind == "splitk"]


def _call(fmt: str, x, weight, cfg):
    if fmt == "int4":
        from compress.kernels.dequant_linear import dequant_linear
        packed, scale = weight
        return dequant_linear(x, packed, scale, None, None, bits=4, group_size=GROUP, in_features=x.shape[-1],
                              backend="triton", config=cfg)
    from compress.kernels.fp4_linear_triton import fp4_matmul
    packed, scale, g = weight
    return fp4_matmul(x, packed, scale, g, None, kind="nvfp4", config=cfg)


def _weights(fmt: str, k: int, n: int, copies: int, device):
    if fmt == "int4":
        return weight_sets(k, n, 4, GROUP, copies, device)
    return fp4_weight_sets(k, n, "nvfp4", copies, device)


def _compile(job) -> str | None:
    """Worker: run each (format, k, n, config) once so that its kernel lands in Triton's cache."""
    fmt, k, n, names, device = job
    try:
        dev = torch.device(device)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        w = _weights(fmt, k, n, 1, dev)[0]
        for name in names:
            _call(fmt, x, w, tuning.KernelConfig.from_name(name))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:                                   # reported, the timing phase skips nothing
        return f"{fmt} {k}x{n}: {type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="int4,nvfp4")
    p.add_argument("--shapes", default="4096x14336,14336x4096", help="in x out, comma separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--limit", type=int, default=0, help="only the first N configs (plumbing checks)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = parse_shapes(args.shapes)
    fmts = args.formats.split(",")
    plan = {f: [c.name for c in configs(f)][: args.limit or None] for f in fmts}

    t0 = time.time()
    if args.workers > 1 and device.type == "cuda":
        jobs = []
        for f in fmts:
            for k, n in shapes:
                names = plan[f]
                per = -(-len(names) // max(1, args.workers // (len(fmts) * len(shapes))))
                jobs += [(f, k, n, names[i:i + per], args.device) for i in range(0, len(names), per)]
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            for err in pool.map(_compile, jobs):
                if err:
                    print("compile:", err, flush=True)
    compile_s = time.time() - t0
    print(f"compiled {sum(len(v) for v in plan.values()) * len(shapes)} kernels in {compile_s:.0f} s", flush=True)

    if device.type == "cuda":                  # short runs: ~150 configs to time
        from triton.testing import do_bench_cudagraph

        def bench(fn):
            return do_bench_cudagraph(fn, rep=20, return_mode="median")
    else:
        bench = timer(device, False, 3)
    copy_bw = copy_bandwidth(device, bench)
    rows = []
    for k, n in shapes:
        for f in fmts:
            q_bytes = n * k / 2 + (n * (k // GROUP) * 2 if f == "int4" else n * k // 16 + 4)
            rotate = max(1, -(-4 * l2_bytes(device) // int(q_bytes)))
            ws = _weights(f, k, n, rotate, device)
            x = torch.randn(1, k, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            dense_w = [torch.randn(n, k, device=device, dtype=x.dtype) for _ in range(max(1, rotate // 4))]
            t_bf16 = bench(lambda: [torch.nn.functional.linear(x, w) for w in dense_w]) / len(dense_w)
            for name in plan[f]:
                cfg = tuning.KernelConfig.from_name(name)
                try:
                    _call(f, x, ws[0], cfg)
                    t = bench(lambda: [_call(f, x, w, cfg) for w in ws]) / rotate
                except Exception as exc:
                    rows.append(dict(format=f, in_features=k, out_features=n, config=name, error=str(exc)[:300]))
                    continue
                rows.append(dict(format=f, in_features=k, out_features=n, config=name, us=t * 1e3,
                                 bf16_us=t_bf16 * 1e3, speedup=t_bf16 / t, weight_bytes=q_bytes,
                                 weight_TBps=q_bytes / (t * 1e-3) / 1e12, copy_frac=q_bytes / (t * 1e-3) / copy_bw))
            best = sorted((r for r in rows if r["format"] == f and r["in_features"] == k and r["out_features"] == n
                           and "us" in r), key=lambda r: r["us"])
            print(f"\n{f} {k}x{n} M=1: bf16 {t_bf16 * 1e3:.1f} us, {len(best)} configs, best first", flush=True)
            for r in best[:12]:
                print(f"  {r['config']:<26} {r['us']:7.1f} us  {r['speedup']:5.2f}x  {r['weight_TBps']:5.2f} TB/s")
            if best:
                print(f"  ... worst {best[-1]['config']} {best[-1]['us']:.1f} us")
    out = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               machine=machine(), copy_bandwidth_Bps=copy_bw, compile_s=compile_s, rows=rows)
    path = args.json_out or ROOT / "benchmarks" / "results" / f"gemv-sweep-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
