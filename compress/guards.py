"""Cheap checks of what a run is handed, done before any work: the device exists, the weights are finite.

Both raise a ``compress.errors`` error naming what is wrong and what to do, so the CLI prints one
line and exits before a checkpoint is written, instead of failing deep inside a solve or a kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

# Tensors named at most in a non-finite-weights message; the rest are counted.
_NAMED = 3
# Elements per isfinite() call: bounds the temporary bool mask (16 Mi elements = 16 MiB) on big embeddings.
_CHUNK = 1 << 24


def check_device(device: str | torch.device | None, what: str = "device") -> torch.device | None:
    """``device`` as a torch.device (None stays None: the caller's default, CUDA when present), or a
    ConfigError when it is not a device name or names a CUDA device this machine lacks. ``what`` is
    how the caller spells the setting in the message (``--device`` on the command line)."""
    if device is None:
        return None
    fix = (f"use {what} cpu or omit {what}" if what.startswith("--")
           else f"use {what} 'cpu' or leave {what} unset (CUDA when present, else CPU)")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{what} {device}: not a device name ({exc}); {fix}") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} {device}: torch sees no CUDA device on this machine; {fix}")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"{what} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                          f"pick one of those or {fix}")
    return dev


def _finite(chunk: torch.Tensor) -> torch.Tensor:
    """torch.isfinite of a chunk; float8 (the FP4 block scales) has none and is exact in float16."""
    return torch.isfinite(chunk.to(torch.float16) if chunk.element_size() == 1 else chunk)


def _non_finite(t: torch.Tensor) -> int:
    """How many elements of ``t`` are NaN or +-inf (0 for integer and meta tensors)."""
    if t.is_meta or not t.is_floating_point():
        return 0
    chunks = t.detach().reshape(-1).split(_CHUNK)
    if all(bool(_finite(c).all()) for c in chunks):
        return 0
    return sum(int((~_finite(c)).sum()) for c in chunks)


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or inf among its parameters or its quantization scales (floating
    buffers whose name contains ``scale``; other buffers, such as attention masks, may hold -inf on
    purpose), naming the first few tensors. One pass over the tensors; meta (offloaded) tensors
    are skipped. A CheckpointError: every method would run on such weights and export garbage."""
    bad: list[tuple[str, int]] = []
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers()
                                            if "scale" in n.rsplit(".", 1)[-1])]
    for name, t in tensors:
        count = _non_finite(t)
        if count:
            bad.append((name, count))
    if not bad:
        return
    named = ", ".join(f"{name} has {count} NaN/inf value{'s' if count != 1 else ''}" for name, count in bad[:_NAMED])
    rest = len(bad) - _NAMED
    more = f" (and {rest} more tensor{'s' if rest != 1 else ''})" if rest > 0 else ""
    raise CheckpointError(f"{named}{more}; the checkpoint is corrupt or was overflowed in float16 - reload it "
                          f"in float32/bfloat16 (--dtype float32 or bfloat16), or re-download it")
