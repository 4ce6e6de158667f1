"""y = x @ dequantize(W_packed)^T + b for pack-quantized integer weights: reference and dispatch.

The reference unpacks the int32 words, applies ``(q - zp) * scale`` per group in float32 (the
formula in ``int_grid.dequantize``), casts once to the activation dtype and calls
``torch.nn.functional.linear``. It is the specification the Triton kernels
(``dequant_linear_triton``) are tested against, and the path every CPU takes.

Backends (``BACKENDS``): ``auto`` runs Triton on a CUDA GPU that supports it (compute capability
8.0+ for bf16, 7.0+ for fp16/fp32; bit widths 2, 4, 8) and the reference elsewhere; ``torch``
always runs the reference; ``triton`` always runs Triton and says why when it cannot (no GPU and
no ``TRITON_INTERPRET=1``, 3-bit weights, Triton missing).

On the GPU each call picks a kernel configuration (``tuning``): the autotuned one for this device
and shape when known, else it tunes once (outside CUDA-graph capture) and caches the result.
``COMPRESS_AUTOTUNE=0`` skips tuning and uses the shape heuristic.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from ..errors import ConfigError
from . import tuning
from .int_grid import dequantize
from .packing import unpack_int32

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
TRITON_BITS = (2, 4, 8)               # widths whose codes never cross an int32 word


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def dequant_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   bits: int, group_size: int | None, in_features: int, dtype: torch.dtype,
                   g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (out, in) weight from the packed checkpoint tensors (reference)."""
    q = unpack_int32(packed, bits, in_features)
    zp = None
    if zero_point is not None:
        zp = unpack_int32(zero_point, bits, packed.shape[0], dim=0)
    return dequantize(q, scale, zp, group_size, dtype, g_idx)


def dequant_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor | None, bias: torch.Tensor | None, *,
                             bits: int, group_size: int | None, in_features: int,
                             g_idx: torch.Tensor | None = None) -> torch.Tensor:
    w = dequant_weight(packed, scale, zero_point, bits, group_size, in_features, x.dtype, g_idx)
    return torch.nn.functional.linear(x, w, bias)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported(device: torch.device, dtype: torch.dtype, bits: int) -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if bits not in TRITON_BITS:
        return f"the Triton kernels cover {TRITON_BITS}-bit weights, not {bits}-bit (codes cross int32 words)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 tensor-core dots need compute capability 8.0+, this GPU has {major}.{minor}"
        if major < 7:
            return f"Triton needs compute capability 7.0+, this GPU has {major}.{minor}"
        return None
    if device.type == "cpu" and _interpreting():
        import triton.language as tl
        if type(tl.cdiv).__name__ != "InterpretedFunction":
            return ("TRITON_INTERPRET=1 was set after Triton was imported (torch imports it), so its "
                    "functions are compiled, not interpreted; set the variable before Python starts")
        return None
    return (f"Triton kernels run on CUDA GPUs (tensors are on {device}); set TRITON_INTERPRET=1 to run "
            f"them slowly on the CPU, or use backend='torch'")


def resolve_backend(backend: str, x: torch.Tensor, bits: int) -> str:
    """``torch`` or ``triton`` for this call."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    reason = triton_unsupported(x.device, x.dtype, bits)
    if backend == "triton":
        if reason:
            raise ConfigError(f"backend 'triton' cannot run: {reason}")
        return "triton"
    # auto: the interpreter is for tests, never chosen automatically.
    return "triton" if reason is None and x.device.type == "cuda" else "torch"


def dequant_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   zero_point: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int,
                   group_size: int | None, in_features: int, g_idx: torch.Tensor | None = None,
                   backend: str = "auto", config: tuning.KernelConfig | None = None) -> torch.Tensor:
    """Dispatch; ``config`` forces one kernel configuration (tests, benchmarks)."""
    if resolve_backend(backend, x, bits) == "torch":
        return dequant_linear_reference(x, packed, scale, zero_point, bias, bits=bits, group_size=group_size,
                                        in_features=in_features, g_idx=g_idx)
    from . import dequant_linear_triton as tk

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, packed.shape[0])
    args = (packed, scale, zero_point, g_idx)
    meta = dict(bits=bits, group_size=group_size, in_features=in_features)

    def run(cfg: tuning.KernelConfig) -> torch.Tensor:
        if cfg.kind == "dense":
            w = tk.dequant_weight(*args, dtype=x2.dtype, **meta)
            return torch.nn.functional.linear(x2, w, bias)
        return tk.dequant_matmul(x2, *args, bias, config=cfg, **meta)

    cfg = config or choose_config(x2, packed.shape[0], bias is not None, zero_point is not None,
                                  g_idx is not None, run, bits=bits, group_size=group_size)
    return run(cfg).reshape(*lead, packed.shape[0])


def choose_config(x2: torch.Tensor, n: int, has_bias: bool, has_zp: bool, has_gidx: bool, run, *,
                  bits: int, group_size: int | None) -> tuning.KernelConfig:
    key = (f"int{bits}|g{group_size or 'ch'}|zp{int(has_zp)}|gidx{int(has_gidx)}|bias{int(has_bias)}|"
           f"{str(x2.dtype).removeprefix('torch.')}|m{tuning.m_bucket(x2.shape[0])}|n{n}|k{x2.shape[1]}")
    return pick_config(x2, n, group_size, key, run)


def pick_config(x2: torch.Tensor, n: int, group_size: int | None, key: str, run) -> tuning.KernelConfig:
    """The config for ``x2`` (M, K) times an (N, K) weight: tuned for this GPU and ``key``, else tuned
    now (outside CUDA-graph capture) by timing ``run(cfg)``, else the shape heuristic. Shared by the
    integer and FP4 kernels."""
    m, k = x2.shape
    if x2.device.type != "cuda":
        return tuning.heuristic_config(m, n, k, group_size, sm_count=4)
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
    if os.environ.get("COMPRESS_AUTOTUNE", "1") == "0":
        return tuning.heuristic_config(m, n, k, group_size, sms)
    tuner = _tuner(x2.device.index if x2.device.index is not None else torch.cuda.current_device())
    cfg = tuner.lookup(key)
    if cfg is not None:
        return cfg
    if torch.cuda.is_current_stream_capturing():
        # Timing inside a CUDA-graph capture would break it; run a warm-up call before capturing.
        log.warning("no tuned kernel config for %s during CUDA-graph capture; using the heuristic", key)
        return tuning.heuristic_config(m, n, k, group_size, sms)
    return tuner.tune(key, run, tuning.candidates(m, group_size), tuning.graph_bench)


@functools.lru_cache(maxsize=None)
def _tuner(device_index: int) -> tuning.Autotuner:
    """One autotuner per GPU per process: the tuned table is shared by every layer of every model
    on that GPU (a deliberate process-wide cache, mirrored to disk)."""
    import triton
    name = torch.cuda.get_device_name(device_index)
    major, minor = torch.cuda.get_device_capability(device_index)
    # "-graphs": tables timed with single launches (before graph_bench) are not reused
    return tuning.Autotuner(f"{name}-sm{major}{minor}-triton{triton.__version__}-graphs")
