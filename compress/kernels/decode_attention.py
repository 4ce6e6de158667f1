"""Decode attention over a quantized KV cache: one query token per sequence, reference and dispatch.

The cache is anything shaped like ``compress.kv.quant.QuantizedKV`` (``QuantizedKVLike``: the
kernels read its tensors by attribute and never import the cache): ``length`` quantized tokens
(KIVI int8/4/2 or FP8 E4M3) followed by a full-precision residual window. The reference dequantizes
the whole cache with ``QuantizedKV.dequantize(unrotate=False)`` (so in the cache's dtype, exactly the tensors
the model would see), rotates the query instead of un-rotating the keys when the keys are stored
Hadamard-rotated, and computes ``softmax(q.k * scale) v`` in float32 over every cached token (no
mask: a decoding token attends to the whole cache). It is the specification the Triton
flash-decoding kernel (``decode_attention_triton``) is tested against, and the path every CPU takes.

Backends as for the matmul kernels (``dequant_linear.BACKENDS``): ``auto`` runs Triton on a CUDA GPU
with compute capability 8.0+ and the reference elsewhere; ``torch`` always runs the reference;
``triton`` always runs Triton (the interpreter on the CPU under ``TRITON_INTERPRET=1``) and says why
when it cannot.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..errors import ConfigError
from .dequant_linear import resolve_backend
from .hadamard import rotate

MIN_TOKENS_PER_SPLIT = 256     # below this a split's fixed cost (q load, partial store, combine) dominates
PROGRAMS_PER_SM = 4            # flash-decoding target: about this many (batch, kv head, split) programs per SM
CPU_SM_COUNT = 4               # what the split heuristic assumes off the GPU (interpreter tests)


class QuantizedKVLike(Protocol):
    """What decode attention reads of one layer's quantized cache, in the layout ``compress.kv.quant``
    documents (``QuantizedKV`` is the container that has it): ``length`` quantized tokens, then the
    residual window ``k_res``/``v_res`` (B, H, R, D); ``rotated`` keys are stored times the Hadamard
    matrix. Integer caches set ``k_min``/``v_min``; fp8 ones (``fp8``) hold float32 scales per head."""

    bits: int
    fp8: bool
    group_size: int
    length: int
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor | None
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor | None
    k_res: torch.Tensor
    v_res: torch.Tensor
    rotated: bool

    @property
    def dtype(self) -> torch.dtype: ...

    def dequantize(self, unrotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, length + R, D) in the residual's dtype."""


def _check_shapes(q: torch.Tensor, kv: QuantizedKVLike) -> tuple[int, int, int, int]:
    """(B, Hq, H, D), or a ValueError that says which tensor disagrees."""
    if q.dim() != 3:
        raise ValueError(f"decode attention takes one query token per sequence, q (B, Hq, D); got shape "
                         f"{tuple(q.shape)} (squeeze the token dimension of a (B, Hq, 1, D) query)")
    b, hq, d = q.shape
    kb, h, _, kd = kv.k_res.shape
    if (kb, kd) != (b, d):
        raise ValueError(f"q {tuple(q.shape)} does not match the cache's residual keys {tuple(kv.k_res.shape)} "
                         f"(batch and head_dim must agree)")
    if h == 0 or hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of the cache's {h} KV heads")
    return b, hq, h, d


def decode_attention_reference(q: torch.Tensor, kv: QuantizedKVLike, scale: float) -> torch.Tensor:
    """(B, Hq, D) output for queries q (B, Hq, D); query head ``i`` reads KV head ``i // (Hq / H)``."""
    b, hq, h, d = _check_shapes(q, kv)
    if kv.rotated:
        q = rotate(q)                     # q.k = (qH).(kH): rotate the query, never un-rotate the keys
    k, v = kv.dequantize(unrotate=False)                                     # (B, H, T, D) each
    qg = q.float().reshape(b, h, hq // h, d)                                 # (B, H, Hq/H, D)
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale          # (B, H, Hq/H, T)
    out = torch.einsum("bhgt,bhtd->bhgd", scores.softmax(-1), v.float())     # (B, H, Hq/H, D)
    return out.reshape(b, hq, d).to(q.dtype)


def layout_unsupported(q: torch.Tensor, kv: QuantizedKVLike) -> str | None:
    """Why the Triton kernel cannot read this cache, or None when it can."""
    d = q.shape[-1]
    if getattr(kv, "k_sink", None) is not None:
        return "the Triton kernel reads no full-precision sink tokens (KVCacheConfig.sink_tokens)"
    if d < 16 or d > 256 or d & (d - 1):
        return f"the Triton kernel needs a power-of-two head_dim in 16..256, not {d}"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 8:
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"the Triton decode-attention kernel needs compute capability 8.0+, this GPU has {major}.{minor}"
    if kv.fp8:
        return None
    g = kv.group_size
    if g < 16 or g & (g - 1):
        return f"the Triton kernel needs a power-of-two key group_size >= 16 (tl.dot tiles), not {g}"
    per_byte = 8 // kv.bits
    groups = kv.v_scale.shape[-1]
    if d % groups or (d // groups) % per_byte:
        return (f"{groups} value groups of head_dim {d} do not hold whole bytes of {kv.bits}-bit codes; "
                f"use a value group of at least {per_byte} channels")
    return None


def resolve(backend: str, q: torch.Tensor, kv: QuantizedKVLike) -> str:
    """``torch`` or ``triton`` for this call (the matmul kernels' rules, plus the cache layout)."""
    chosen = resolve_backend(backend, q, kv.bits)
    if chosen == "torch":
        return chosen
    reason = layout_unsupported(q, kv)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ConfigError(f"backend 'triton' cannot run decode attention: {reason}")
    return "torch"


def choose_num_splits(batch: int, kv_heads: int, tokens: int, sm_count: int) -> int:
    """Sequence splits per (sequence, KV head): enough programs for about ``PROGRAMS_PER_SM`` per SM,
    but no split shorter than ``MIN_TOKENS_PER_SPLIT`` tokens (short caches need no split)."""
    programs = max(1, batch * kv_heads)
    wanted = math.ceil(PROGRAMS_PER_SM * sm_count / programs)
    useful = math.ceil(tokens / MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful))


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(q: torch.Tensor, kv: QuantizedKVLike, scale: float, *, backend: str = "auto",
                     num_splits: int | None = None) -> torch.Tensor:
    """softmax(q.k * scale) v for one query token per sequence: q (B, Hq, D) -> (B, Hq, D) in q.dtype.

    ``num_splits`` overrides the number of sequence slices (flash-decoding splits) per (sequence,
    KV head); by default ``choose_num_splits`` picks it from the cache length and the SM count.
    """
    _check_shapes(q, kv)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 (or None for the heuristic), got {num_splits}")
    if resolve(backend, q, kv) == "torch":
        return decode_attention_reference(q, kv, scale)
    from . import decode_attention_triton as tk
    return tk.decode_attention(q, kv, scale, num_splits=num_splits)
