"""The GPU suite's first phase: does this machine run our Triton kernels at all? About 20 seconds.

    python benchmarks/gpu_sanity.py                       # on the GPU machine; exit 0 when every check passes
    TRITON_INTERPRET=1 python benchmarks/gpu_sanity.py --device cpu   # the same checks under the interpreter

Three checks, in order, each stopping the run with a message that says what to do:

1. CUDA is visible: device name, compute capability (8.0+ for bf16), SMs, memory, torch / Triton /
   CUDA versions (and the driver when ``nvidia-smi`` answers);
2. Triton compiles and runs one tiny kernel (``z = x + y``, compared exactly);
3. one of our kernels matches its reference: the int4 g128 linear (``dequant_linear``, backend
   ``triton``, the shape heuristic's split-K configs at M = 1 and M = 16) against a float64
   reference at a small Llama-like shape, within the kernel tests' bf16 bound.

``benchmarks/gpu_suite.py`` runs this first, as its own process, and stops when it fails: timing
kernels that do not compile or compute the wrong thing would only waste the GPU lease.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                     # runs from a bare copy of the repo, installed or not
    sys.path.insert(0, str(ROOT))

from compress.kernels import tuning  # noqa: E402
from compress.kernels.dequant_linear import dequant_linear, dequant_weight, triton_unsupported  # noqa: E402
from compress.kernels.packing import pack_int32  # noqa: E402

BF16_REL_TOL = 1e-2                               # tests/kernels/kernel_cases.py REL_TOL[bfloat16]
# (N, K): one 4096-wide row block of a Llama layer, small enough to check in a second; K = 4 groups.
SHAPE = (256, 512)
GROUP_SIZE = 128


class SanityError(RuntimeError):
    """A check failed; the message says what was wrong and what to do."""


@triton.jit
def _add_kernel(x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(z_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def check_device(device: torch.device) -> dict:
    """Check 1: the facts every later number depends on."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "torch_cuda": torch.version.cuda, "device": str(device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if device.type == "cpu":
        info["name"] = "cpu"
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SanityError("--device cpu runs the checks under the Triton interpreter: start Python with "
                              "TRITON_INTERPRET=1")
        return info
    if not torch.cuda.is_available():
        raise SanityError(f"CUDA is not visible: torch {torch.__version__} (built for CUDA {torch.version.cuda}) "
                          f"sees no GPU. Run on the GPU machine, check `nvidia-smi`, and install a CUDA build of "
                          f"torch (a +cpu wheel never sees a GPU)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SanityError("TRITON_INTERPRET is set: the kernels would run in the interpreter, not on the GPU; "
                          "unset it")
    props = torch.cuda.get_device_properties(device)
    info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                memory_GiB=round(props.total_memory / 2**30, 1),
                l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), driver=driver_version())
    reason = triton_unsupported(device, torch.bfloat16, 4)
    if reason:
        raise SanityError(f"our Triton kernels cannot run on {props.name}: {reason}")
    return info


def check_triton(device: torch.device) -> None:
    """Check 2: the Triton toolchain (compiler, ptxas, launcher) works, apart from any kernel of ours."""
    n = 1000
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    z = torch.full_like(x, float("nan"))
    try:
        _add_kernel[(triton.cdiv(n, 256),)](x, y, z, n, BLOCK=256)
    except Exception as exc:
        raise SanityError(f"Triton {triton.__version__} could not compile or launch a 5-line kernel "
                          f"({type(exc).__name__}: {exc}); check that torch and Triton match "
                          f"(pip show torch triton) and that the CUDA driver is loaded") from exc
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not torch.equal(z, x + y):
        raise SanityError("Triton's tiny kernel ran but wrote wrong values: the toolchain or the GPU is broken; "
                          "give the machine back and report it")


def check_int4_linear(device: torch.device) -> list[dict]:
    """Check 3: our int4 g128 linear against a float64 reference, at M = 1 (CUDA cores) and 16 (tl.dot)."""
    n, k = SHAPE
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scale = (torch.rand(n, k // GROUP_SIZE, generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
    packed = pack_int32(codes, 4)
    w64 = dequant_weight(packed, scale, None, 4, GROUP_SIZE, k, torch.float64)
    meta = dict(bits=4, group_size=GROUP_SIZE, in_features=k)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    rows = []
    for m in (1, 16):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        ref = x.double() @ w64.T
        cfg = tuning.heuristic_config(m, n, k, GROUP_SIZE, sms)
        try:
            y = dequant_linear(x.to(device), packed.to(device), scale.to(device), None, None, backend="triton",
                               config=cfg, **meta).cpu()
        except Exception as exc:
            raise SanityError(f"the int4 linear kernel failed at M={m} N={n} K={k} with config {cfg.name} "
                              f"({type(exc).__name__}: {exc}); run `python -m pytest tests/kernels/"
                              f"test_dequant_linear_triton.py -x` here to see which configs break") from exc
        err = ((y.double() - ref).norm() / ref.norm()).item()
        rows.append({"m": m, "n": n, "k": k, "config": cfg.name, "rel_err": err})
        if not err < BF16_REL_TOL:                # also catches NaN
            raise SanityError(f"the int4 linear kernel disagrees with its reference at M={m} N={n} K={k} "
                              f"(config {cfg.name}): relative error {err:.3g} >= {BF16_REL_TOL}; the kernel is "
                              f"wrong on this GPU/Triton, so its timings would mean nothing")
    return rows


def run(device: torch.device) -> dict:
    out = {"ok": False, "checks": []}
    for name, check in (("device", check_device), ("triton", check_triton), ("int4_linear", check_int4_linear)):
        start = time.perf_counter()
        try:
            result = check(device)
        except SanityError as exc:
            out["checks"].append({"check": name, "ok": False, "seconds": time.perf_counter() - start})
            out["error"] = str(exc)
            return out
        out["checks"].append({"check": name, "ok": True, "seconds": time.perf_counter() - start})
        if name == "device":
            out["device"] = result
        elif name == "int4_linear":
            out["int4_linear"] = result
        print(f"sanity: {name} ok ({time.perf_counter() - start:.1f} s)", flush=True)
    out["ok"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1 (tests)")
    p.add_argument("--json-out", type=Path, help="write the checks and the device facts here")
    args = p.parse_args(argv)
    out = run(torch.device(args.device))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    d = out.get("device") or {}
    if not out["ok"]:
        print(f"sanity: FAILED: {out['error']}", file=sys.stderr, flush=True)
        return 2
    print(f"sanity: {d.get('name')} (capability {d.get('capability', '-')}, {d.get('sms', '-')} SMs, "
          f"{d.get('memory_GiB', '-')} GiB), torch {d['torch']}, Triton {d['triton']}, CUDA {d['torch_cuda']}, "
          f"driver {d.get('driver') or '-'}; int4 linear rel err "
          + ", ".join(f"M={r['m']} {r['rel_err']:.1e}" for r in out["int4_linear"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
