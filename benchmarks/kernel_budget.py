"""Compile-time budgets of the Triton decode kernels: registers, spills and instruction issue on Hopper.

    python benchmarks/kernel_budget.py                    # table + benchmarks/results/kernel-budget.json
    python benchmarks/kernel_budget.py --cases int4 kv_int4 --json-out /tmp/b.json

No GPU needed: each kernel is compiled for sm_90 (``triton.compile(..., target=GPUTarget("cuda", 90,
32))``) with the configuration the shape heuristics pick for a decode step on Llama-3-8B shapes, and
the SASS that Triton's bundled ``cuobjdump`` prints is read:

- **registers, spills**: ``cuobjdump -res-usage`` (REG, STACK, LOCAL) and the number of local-memory
  instructions (``LDL``/``STL``) in the SASS. A kernel "spills" when any of these is non-zero.
- **main loop**: every branch to a lower address closes a loop; the main loop is the one whose body
  (branch target .. branch, inclusive) holds global loads (``LDG``) and the most instructions. Its
  static count ``L`` is what one warp issues per iteration (no divergence is assumed; a predicated-off
  instruction still takes an issue slot). One iteration of one CTA (``num_warps`` warps) consumes
  ``bytes_per_iter`` bytes of weights (codes + scales) or of KV cache (codes + scales + minima).
- **instructions per byte** = ``L * num_warps / bytes_per_iter`` (warp-instructions per byte).

Per call, with ``I`` main-loop iterations over all CTAs, ``C`` CTAs and ``O`` static instructions
outside the main loop (each counted once per warp of each CTA, a rough stand-in for the prologue and
epilogue)::

    warp_instructions = L * num_warps * I + O * num_warps * C
    t_issue  = warp_instructions / (SMs * SCHEDULERS_PER_SM * clock)
    t_bytes  = format_bytes / HBM_bandwidth          t_bf16 = bf16_bytes / HBM_bandwidth
    byte-bound speed-up  = bf16_bytes / format_bytes
    issue-bound speed-up = t_bf16 / max(t_bytes, t_issue)

``format_bytes`` counts what the kernel must stream from HBM (codes, scales, zero points, KV minima,
the bf16 residual window); ``bf16_bytes`` the same tensor in bf16 (weights N*K*2; KV 2*B*H*T*D*2).
Activations and outputs (a few KB at M = 1) are left out of both. The bf16 baseline is taken to be
bandwidth-bound. The model ignores latency, occupancy, memory-pipeline and dependency stalls, tail
effects of the last wave and clock throttling: it is a ceiling, and a kernel under its target here
cannot meet it on the GPU (see docs/kernel-budget.md).

Each case compiles one kernel (1-10 s on one core); nothing is cached between runs (a fresh Triton
cache directory per run unless ``--keep-cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Hopper issue model. Each SM has 4 warp schedulers, each issuing at most one warp-instruction per
# clock. Clock: the H100 SXM5 / H200 SXM maximum boost (1980 MHz, NVIDIA datasheets); HBM: datasheet
# peak bandwidth. SM counts: 132 for both SXM parts.
SCHEDULERS_PER_SM = 4
GPUS = {
    "H100": dict(sms=132, clock_hz=1.98e9, hbm_Bps=3.35e12),
    "H200": dict(sms=132, clock_hz=1.98e9, hbm_Bps=4.8e12),
}
TARGET_GPU = "H100"        # the issues' targets are set on an H100; H200 is reported beside it

# Llama-3-8B: hidden 4096, MLP 14336, 32 query heads, 8 KV heads, head_dim 128.
LINEAR_SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096)}   # (K, N)
KV = dict(batch=8, heads=32, kv_heads=8, head_dim=128, context=32768, group=64, residual=128)


@dataclasses.dataclass
class Case:
    """One kernel at one decode configuration and the bytes it streams."""
    name: str
    kernel: str                 # "module:function" in compress.kernels
    args: dict                  # parameter -> "*dtype" (pointer, 16-byte aligned) or a Python scalar value
    constexprs: dict
    num_warps: int
    num_stages: int
    bytes_per_iter: int         # format bytes one CTA consumes per main-loop iteration
    iterations: int             # main-loop iterations summed over all CTAs of the call
    ctas: int
    format_bytes: int
    bf16_bytes: int
    target: float               # issue-bound speed-up over bf16 the kernel must reach on TARGET_GPU
    config: str = ""
    note: str = ""


# --------------------------------------------------------------------------- cases

def _heuristic(m, n, k, group):
    from compress.kernels import tuning
    return tuning.heuristic_config(m, n, k, group, sm_count=GPUS[TARGET_GPU]["sms"])


def _split(k: int, cfg) -> int:
    """K slices of a split-K launch, as ``tuning.split_k_launch`` cuts them."""
    k_tiles = -(-k // cfg.block_k)
    per = -(-k_tiles // max(1, min(cfg.split_k, k_tiles))) * cfg.block_k
    return -(-k // per)


def _int_gemv(bits: int, k: int, n: int, target: float, group: int = 128) -> Case:
    import triton.language as tl
    cfg = _heuristic(1, n, k, group)
    per = 32 // bits
    g = k // group
    split = _split(k, cfg)
    args = dict(x_ptr="*bf16", packed_ptr="*i32", scale_ptr="*bf16", zp_ptr="*i32", gidx_ptr="*i32",
                bias_ptr="*bf16", out_ptr="*fp32", M=1, N=n, K=k, KW=k // per, G=g, stride_xm=k, stride_om=n,
                k_per_split=k // split)
    consts = dict(BITS=bits, GROUP_SIZE=group, GROUP_MODE=0, HAS_ZP=False, HAS_BIAS=False, BLOCK_M=1,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
                  DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="ieee", EVEN_K=k % cfg.block_k == 0,
                  PIPE=cfg.num_stages)
    scale_bytes = 2 * n * g
    return Case(f"int{bits}_g{group}_m1_k{k}_n{n}", "dequant_linear_triton:_dequant_matmul_kernel", args, consts,
                cfg.num_warps, cfg.num_stages,
                bytes_per_iter=cfg.block_n * cfg.block_k * bits // 8 + 2 * cfg.block_n * cfg.block_k // group,
                iterations=(n // cfg.block_n) * (k // cfg.block_k), ctas=(n // cfg.block_n) * split,
                format_bytes=n * k * bits // 8 + scale_bytes, bf16_bytes=2 * n * k, target=target, config=cfg.name)


def _fp4_gemv(k: int, n: int, target: float) -> Case:
    import triton.language as tl
    cfg = _heuristic(1, n, k, 16)
    split = _split(k, cfg)
    args = dict(x_ptr="*bf16", words_ptr="*i32", scale_ptr="*u8", gscale_ptr="*fp32", bias_ptr="*bf16",
                out_ptr="*fp32", M=1, N=n, K=k, KW=k // 8, G=k // 16, stride_xm=k, stride_om=n, k_per_split=k // split)
    consts = dict(IS_NV=True, SCALE_BLOCK=16, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  GROUP_M=cfg.group_m, SPLIT_K=split, DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="ieee",
                  X_WORDS=True, EVEN=k % cfg.block_k == 0 and n % cfg.block_n == 0, PIPE=cfg.num_stages)
    return Case(f"nvfp4_m1_k{k}_n{n}", "fp4_linear_triton:_fp4_matmul_kernel", args, consts, cfg.num_warps,
                cfg.num_stages, bytes_per_iter=cfg.block_n * cfg.block_k // 2 + cfg.block_n * cfg.block_k // 16,
                iterations=(n // cfg.block_n) * (k // cfg.block_k), ctas=(n // cfg.block_n) * split,
                format_bytes=n * k // 2 + n * k // 16, bf16_bytes=2 * n * k, target=target, config=cfg.name)


def _sparse24(k: int, n: int, int4: bool, target: float, group: int = 128) -> Case:
    import triton.language as tl
    from compress.kernels import sparse24_linear_triton as sk
    cfg = _heuristic(1, n, k, group if int4 else None)
    split = _split(k, cfg)
    g = k // group if int4 else 1
    args = dict(x_ptr="*bf16", vals_ptr="*u16" if int4 else "*i64", meta_ptr="*u8",
                scale_ptr="*bf16" if int4 else "*u8", bias_ptr="*u8", out_ptr="*fp32", M=1, N=n, K=k, G=g,
                stride_xm=k, stride_v=k // 8, stride_om=n, k_per_split=k // split)
    consts = dict(VALUE_KIND=sk.INT4 if int4 else sk.BFLOAT16, GROUP_SIZE=group if int4 else 0,
                  SCALE_MODE=sk._scale_mode(4 if int4 else None, group, cfg.block_k), HAS_BIAS=False, BLOCK_M=1,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
                  DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="ieee", PIPE=cfg.num_stages,
                  EVEN=k % cfg.block_k == 0 and n % cfg.block_n == 0)
    per8 = 1 + (2 if int4 else 8)                   # bytes per 8 columns: metadata + 4 kept values
    scale_iter = 2 * cfg.block_n * cfg.block_k // group if int4 else 0
    return Case(f"sparse24{'_int4' if int4 else '_bf16'}_m1_k{k}_n{n}", "sparse24_linear_triton:_sparse24_kernel",
                args, consts, cfg.num_warps, cfg.num_stages,
                bytes_per_iter=cfg.block_n * cfg.block_k // 8 * per8 + scale_iter,
                iterations=(n // cfg.block_n) * (k // cfg.block_k), ctas=(n // cfg.block_n) * split,
                format_bytes=n * k // 8 * per8 + (2 * n * g if int4 else 0), bf16_bytes=2 * n * k, target=target,
                config=cfg.name)


def _kv_decode(fmt: str, target: float) -> Case:
    import triton
    import importlib
    import triton.language as tl
    da = importlib.import_module("compress.kernels.decode_attention")   # the package re-exports a function of that name
    dt = importlib.import_module("compress.kernels.decode_attention_triton")
    b, hq, h, d = KV["batch"], KV["heads"], KV["kv_heads"], KV["head_dim"]
    fp8 = fmt == "fp8"
    bits = 8 if fp8 else int(fmt[3:])
    res = 0 if fp8 else KV["residual"]
    length = KV["context"] - res
    group = KV["group"]
    ng = 1 if fp8 else d // min(group, d)
    block_n = 64
    splits_wanted = da.choose_num_splits(b, h, length + res, GPUS[TARGET_GPU]["sms"])
    split_tokens = triton.cdiv(triton.cdiv(length + res, splits_wanted), block_n) * block_n
    quant_splits = triton.cdiv(length, split_tokens)
    splits = quant_splits + triton.cdiv(res, split_tokens)
    width = d if fp8 else d * bits // 8
    blocks = -(-length // group)
    scale = "*fp32" if fp8 else "*fp16"
    args = dict(q_ptr="*bf16", kc_ptr="*u8", ks_ptr=scale, km_ptr="*fp16" if not fp8 else "*bf16", vc_ptr="*u8",
                vs_ptr=scale, vm_ptr="*fp16" if not fp8 else "*bf16", kr_ptr="*bf16", vr_ptr="*bf16",
                po_ptr="*fp32", plse_ptr="*fp32", length=length, res_len=res, split_tokens=split_tokens,
                quant_splits=quant_splits, num_splits=splits, qk_scale=0.127,
                stride_qb=hq * d, stride_qh=d, stride_cb=h * length * width, stride_ch=length * width,
                stride_ct=width, stride_kb=0 if fp8 else h * blocks * d, stride_kh=0 if fp8 else blocks * d,
                stride_kn=0 if fp8 else d, stride_vb=0 if fp8 else h * length * ng, stride_vh=0 if fp8 else length * ng,
                stride_vt=0 if fp8 else ng, stride_rb=h * res * d, stride_rh=res * d, stride_rt=d)
    consts = dict(GROUP=hq // h, NG=ng, QH=dt.rows(hq // h, ng), D=d, BITS=bits, FP8=fp8, GROUP_SIZE=group,
                  BLOCK_N=block_n, QUANT_DTYPE=tl.float16, RES_DTYPE=tl.bfloat16, CODE_OFFSET=dt.code_offset(tl.float16),
                  WORDS=not fp8)                                # as the launcher, for aligned caches
    if fp8:
        per_token = 2 * d                                         # key + value codes
    else:
        per_token = 2 * width + ng * 2 * 2 + 2 * 2 * d / group  # codes, value scale+min, key scale+min per block
    fmt_bytes = int(b * h * (length * per_token + res * 2 * d * 2))
    return Case(f"kv_{fmt}_32k", "decode_attention_triton:_split_kernel", args, consts, 4, 2,
                bytes_per_iter=int(block_n * per_token), iterations=b * h * triton.cdiv(length, block_n),
                ctas=b * h * splits, format_bytes=fmt_bytes, bf16_bytes=b * h * KV["context"] * 2 * d * 2, target=target,
                config=f"BLOCK_N{block_n} QH{consts['QH']} splits{splits} w4p2",
                note=f"B={b} Hq={hq} H={h} D={d}, group {group}, {res}-token bf16 window")


def _w8a8(kind: str, act: str, k: int, n: int, target: float, block: int | None = None) -> Case:
    from compress.kernels import w8a8_linear_triton as wk
    limit = wk.tile_k_limit(act, 128, block)
    cfg = wk.heuristic_config(1, n, k, GPUS[TARGET_GPU]["sms"], limit)
    split = _split(k, cfg)
    code = "*i8" if kind == "int8" else "*fp8e4nv"
    args = dict(a_ptr=code, sa_ptr="*fp32", w_ptr=code, sb_ptr="*bf16", bias_ptr="*bf16", out_ptr="*fp32",
                M=1, N=n, K=k, stride_am=k, stride_wn=k, stride_sam=1 if act == "token" else k // 128,
                stride_sbn=k // block if block else 1, stride_om=n, k_per_split=k // split)
    consts = dict(A_MODE=wk.A_MODES[act], W_MODE=2 if block else 1, A_GROUP=128, W_BLOCK=block or 1,
                  IS_INT=kind == "int8", DOT_MODE=0, HAS_BIAS=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split)
    scales = 4 * (n // block) * (k // block) if block else 2 * n
    return Case(f"w8a8_{kind}_{act}{'_b' + str(block) if block else ''}_m1_k{k}_n{n}",
                "w8a8_linear_triton:_w8a8_matmul_kernel", args, consts, cfg.num_warps, cfg.num_stages,
                bytes_per_iter=cfg.block_n * cfg.block_k, iterations=(n // cfg.block_n) * (k // cfg.block_k),
                ctas=(n // cfg.block_n) * split, format_bytes=n * k + scales, bf16_bytes=2 * n * k, target=target,
                config=cfg.name,
                note="on sm_90 FP8 per-token layers run torch._scaled_mm; this Triton GEMM is the fallback"
                if kind == "fp8" and act == "token" else "")


def cases() -> dict:
    """name -> factory. Targets from the issues: int4 g128 M=1 3.0x; NVFP4 2.8x; 2:4 1.5x, 2:4 + int4
    4x; int4 KV at 32k 2.5x (int2 held to int4's); W8A8 FP8 M=1 1.6x; elsewhere never slower (1.0x)."""
    out = {}
    for label, (k, n) in LINEAR_SHAPES.items():
        out[f"int4_{label}"] = lambda k=k, n=n: _int_gemv(4, k, n, 3.0)
        out[f"int8_{label}"] = lambda k=k, n=n: _int_gemv(8, k, n, 1.0)
        out[f"int2_{label}"] = lambda k=k, n=n: _int_gemv(2, k, n, 3.0)
        out[f"nvfp4_{label}"] = lambda k=k, n=n: _fp4_gemv(k, n, 2.8)
        out[f"sparse24_bf16_{label}"] = lambda k=k, n=n: _sparse24(k, n, False, 1.5)
        out[f"sparse24_int4_{label}"] = lambda k=k, n=n: _sparse24(k, n, True, 4.0)
    for fmt, target in (("int8", 1.0), ("int4", 2.5), ("int2", 2.5), ("fp8", 1.0)):
        out[f"kv_{fmt}"] = lambda fmt=fmt, target=target: _kv_decode(fmt, target)
    out["w8a8_fp8_block_4096x4096"] = lambda: _w8a8("fp8", "group", 4096, 4096, 1.6, block=128)
    out["w8a8_fp8_token_4096x4096"] = lambda: _w8a8("fp8", "token", 4096, 4096, 1.6)
    out["w8a8_int8_token_4096x4096"] = lambda: _w8a8("int8", "token", 4096, 4096, 1.0)
    return out


# --------------------------------------------------------------------------- compile and read SASS

def tool(name: str) -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_case(case: Case):
    """The compiled kernel for sm_90, specialized as Triton's JIT would on these argument values."""
    import importlib
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    module, fn_name = case.kernel.split(":")
    fn = getattr(importlib.import_module(f"compress.kernels.{module}"), fn_name)
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET is set): run without it")
    signature, constants, attrs = {}, dict(case.constexprs), {}
    for name in fn.arg_names:
        if name in case.constexprs:
            signature[name] = "constexpr"
            continue
        value = case.args[name]
        if isinstance(value, str):                         # a pointer, 16-byte aligned like torch's allocations
            ty, spec = value, "D"
        else:
            ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        if ty == "constexpr":                              # the JIT turns an int equal to 1 into a constant
            signature[name], constants[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages})


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction) in order, predicates kept: '@!P0 BRA 0x8b0'."""
    return [(int(a, 16), ins) for a, ins in _LINE.findall(text)]


def opcode(ins: str) -> str:
    words = ins.split()
    if words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0]


def main_loop(sass: list[tuple[int, str]]) -> tuple[int, int]:
    """(first, last) address of the main loop: among the bodies closed by a backward branch, those
    with global loads, the largest."""
    loops = []
    for addr, ins in sass:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if opcode(ins) == "BRA" and m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [i for a, i in sass if lo <= a <= addr]
            if any(opcode(i) in ("LDG", "LDGSTS", "UBLKCP", "UTMALDG") for i in body):
                loops.append((len(body), lo, addr))
    if not loops:
        raise RuntimeError("no loop with global loads found in the SASS")
    _, lo, hi = max(loops)
    return lo, hi


CLASSES = {
    "shuffle": {"SHFL"}, "shared": {"LDS", "STS", "LDSM", "STSM", "BAR", "ATOMS"},
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "MUFU", "FCHK"},
    "fp16": {"HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSETP2"},
    "convert": {"I2F", "I2FP", "F2I", "F2F", "F2FP", "I2I", "F2IP"},
    "int": {"IADD3", "LOP3", "SHF", "IMAD", "LEA", "ISETP", "SEL", "PRMT", "IABS", "IMNMX", "BMSK", "SGXT", "FLO",
            "POPC", "VIADD", "IMUL"},
    "memory": {"LDG", "STG", "LDGSTS", "RED", "ATOMG", "LDGDEPBAR", "DEPBAR", "UBLKCP", "UTMALDG", "SYNCS"},
    "mma": {"HMMA", "HGMMA", "IMMA", "QGMMA", "IGMMA", "WARPGROUP"},
    "local": {"LDL", "STL"},
}


def classify(op: str) -> str:
    for name, ops in CLASSES.items():
        if op in ops:
            return name
    return "other"


def measure(case: Case, workdir: Path) -> dict:
    t0 = time.time()
    kernel = compile_case(case)
    compile_s = time.time() - t0
    cubin = workdir / f"{case.name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    res = subprocess.run([str(tool("cuobjdump")), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    sass = parse_sass(subprocess.run([str(tool("cuobjdump")), "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    lo, hi = main_loop(sass)
    body = [opcode(i) for a, i in sass if lo <= a <= hi]
    outside = sum(1 for a, i in sass if not lo <= a <= hi and opcode(i) != "NOP")
    local_ops = sum(1 for _, i in sass if opcode(i) in CLASSES["local"])
    mix: dict[str, int] = {}
    for op in body:
        mix[classify(op)] = mix.get(classify(op), 0) + 1
    warp_per_iter = len(body) * case.num_warps
    total = warp_per_iter * case.iterations + outside * case.num_warps * case.ctas
    row = dict(name=case.name, kernel=case.kernel, config=case.config, note=case.note, num_warps=case.num_warps,
               registers=usage.get("REG"), stack_bytes=usage.get("STACK", 0), local_bytes=usage.get("LOCAL", 0),
               local_instructions=local_ops, spills=bool(usage.get("STACK", 0) or usage.get("LOCAL", 0) or local_ops),
               loop_instructions=len(body), loop_mix=dict(sorted(mix.items(), key=lambda kv: -kv[1])),
               outside_instructions=outside, bytes_per_iter=case.bytes_per_iter,
               instructions_per_byte=warp_per_iter / case.bytes_per_iter, warp_instructions=total,
               iterations=case.iterations, ctas=case.ctas, format_bytes=case.format_bytes, bf16_bytes=case.bf16_bytes,
               byte_speedup=case.bf16_bytes / case.format_bytes, target=case.target, compile_s=round(compile_s, 2))
    for gpu, g in GPUS.items():
        t_issue = total / (g["sms"] * SCHEDULERS_PER_SM * g["clock_hz"])
        t_bytes = case.format_bytes / g["hbm_Bps"]
        t_bf16 = case.bf16_bytes / g["hbm_Bps"]
        row[gpu] = dict(t_issue_us=t_issue * 1e6, t_bytes_us=t_bytes * 1e6, t_bf16_us=t_bf16 * 1e6,
                        issue_speedup=t_bf16 / max(t_bytes, t_issue), issue_bound=t_issue > t_bytes)
    row["meets_target"] = row[TARGET_GPU]["issue_speedup"] >= case.target and not row["spills"]
    return row


def run(names: list[str] | None = None, keep_cache: bool = False) -> list[dict]:
    missing = [t for t in ("ptxas", "cuobjdump") if not tool(t).exists()]
    if missing:
        raise FileNotFoundError(f"Triton's {', '.join(missing)} not found under {tool('').parent}")
    table = cases()
    names = names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise KeyError(f"unknown case(s) {unknown}; known: {', '.join(table)}")
    with tempfile.TemporaryDirectory() as tmp:
        if not keep_cache:
            os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
        return [measure(table[n](), Path(tmp)) for n in names]


def format_table(rows: list[dict]) -> str:
    head = (f"{'case':34} {'regs':>4} {'spill':>5} {'loop':>5} {'ins/B':>6} {'bytes x':>7} "
            f"{'H100 x':>6} {'H200 x':>6} {'target':>6}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:34} {r['registers']:>4} {'yes' if r['spills'] else 'no':>5} "
                     f"{r['loop_instructions']:>5} {r['instructions_per_byte']:>6.3f} {r['byte_speedup']:>6.2f}x "
                     f"{r['H100']['issue_speedup']:>5.2f}x {r['H200']['issue_speedup']:>5.2f}x {r['target']:>5.1f}x  "
                     f"{'ok' if r['meets_target'] else 'MISS'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", help="case names (default: all)")
    p.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel-budget.json")
    p.add_argument("--label", default="after", help="key to store this run under in the JSON (e.g. before)")
    p.add_argument("--keep-cache", action="store_true", help="use Triton's normal cache (default: a fresh one)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(cases()))
        return 0
    rows = run(args.cases, args.keep_cache)
    print(format_table(rows))
    data = json.loads(args.json_out.read_text()) if args.json_out.exists() else {}
    data["model"] = dict(schedulers_per_sm=SCHEDULERS_PER_SM, gpus=GPUS, target_gpu=TARGET_GPU,
                         formula="issue-bound speed-up = t_bf16 / max(t_bytes, t_issue); see docstring")
    data[args.label] = rows
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(data, indent=1) + "\n")
    return 0 if all(r["meets_target"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)        # must be unset before torch/triton are imported
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
