"""The KV-cache quantization config, and what a cache of that kind costs per token."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from ..configs import MethodConfig
from ..errors import ConfigError
from .quant import SCALE_DTYPES

KV_SCHEMES = ("fp8", "int8", "int4", "int2")


@dataclasses.dataclass
class KVCacheConfig(MethodConfig):
    """How keys and values are stored while generating (a ``kv_cache`` pass in a recipe).

    scheme:           "int8" / "int4" / "int2": KIVI-style asymmetric integers, keys per channel
                      (a scale and minimum per channel per block of ``group_size`` tokens) and
                      values per token (a scale and minimum per token per ``group_size`` channels,
                      capped at head_dim); "fp8": E4M3 with a static scale calibrated on data
                      (the format vLLM and TensorRT-LLM serve; exported as k_scale / v_scale).
    group_size:       integer schemes: tokens per key block and channels per value group.
    residual_length:  the most recent tokens kept in full precision (default 128 for integer
                      schemes, 0 for fp8). Integer keys need a whole block of ``group_size`` tokens
                      before they can be quantized per channel, so up to ``group_size - 1`` more
                      tokens wait in full precision; they are flushed block by block. Must be a
                      multiple of ``group_size``.
    fp8_scale:        "tensor" (one k and one v scale per layer) or "head" (one per KV head).
    rotate_keys:      multiply keys by a Hadamard matrix before quantizing (RotateKV); attention
                      rotates the query the same way, so nothing is un-rotated. Needs a
                      power-of-two head_dim.
    scale_dtype:      integer schemes: how each group's scale and minimum are stored, "fp16"
                      (default) or "fp8" (E4M3, one byte each: int2 g32 then costs 2.5 bits per
                      element instead of 3; the codes are rounded against the stored fp8 values).
    clip:             integer schemes: "minmax" (default, KIVI) or "mse": each group's range is the
                      narrowing of [min, max] with the least squared rounding error (nine tried;
                      costs nothing at read time, about nine times the quantization work per flush).
    sink_tokens:      the first tokens of every sequence kept in full precision for its whole life
                      (attention sinks: IntactKV, KVSink). A fixed cost like the window, not per
                      token; 0 (default) quantizes them like the rest. Not for sliding-window layers.
    h2o_budget:       H2O eviction (Heavy-Hitter Oracle, Zhang et al. 2023; ``compress.kv.h2o``): keep
                      at most this many tokens per layer and KV head, evict the rest. A float in
                      (0, 1] is a fraction of the tokens seen so far (0.2 = 20% of the context), an
                      int >= 1 a token count; None (default) keeps everything. Kept tokens are
                      quantized by ``scheme`` as usual; ``scheme: none`` keeps them in the model's dtype.
    h2o_recent:       the share of the budget kept for the most recent tokens (default 0.5, the
                      paper's half/half); the rest goes to the heavy hitters, the older tokens with
                      the largest attention received, summed over queries (and over the query heads
                      of a GQA group). 1.0 = a recent-window-only cache of the same budget.
    """

    method = "kv_cache"
    scheme: Literal["fp8", "int8", "int4", "int2", "none"] = "int4"
    group_size: int = 64
    residual_length: int | None = None
    fp8_scale: Literal["tensor", "head"] = "tensor"
    rotate_keys: bool = False
    scale_dtype: Literal["fp16", "fp8"] = "fp16"
    clip: Literal["minmax", "mse"] = "minmax"
    sink_tokens: int = 0
    h2o_budget: int | float | None = None
    h2o_recent: float = 0.5

    def validate(self) -> None:
        if self.scheme not in KV_SCHEMES + ("none",):
            raise ConfigError(f"kv cache scheme must be one of {', '.join(KV_SCHEMES)} (or 'none' with h2o_budget); "
                              f"got {self.scheme!r}")
        self._validate_h2o()
        if self.group_size <= 0 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"kv cache group_size must be a power of two (16, 32, 64, 128), got {self.group_size}")
        if self.rotate_keys and self.is_fp8:
            raise ConfigError("rotate_keys is for the integer schemes: an fp8 cache is exported for vLLM, which "
                              "does not rotate keys; drop rotate_keys or use int8/int4/int2")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"kv cache scale_dtype must be one of {', '.join(SCALE_DTYPES)}; "
                              f"got {self.scale_dtype!r}")
        if self.scale_dtype != "fp16" and self.is_fp8:
            raise ConfigError("scale_dtype is for the integer schemes (their per-group scales and minima); an fp8 "
                              "cache has one float32 scale per head: drop scale_dtype or use int8/int4/int2")
        if self.clip not in ("minmax", "mse"):
            raise ConfigError(f"kv cache clip must be 'minmax' or 'mse'; got {self.clip!r}")
        if self.clip != "minmax" and self.is_fp8:
            raise ConfigError("clip is for the integer schemes (their per-group ranges); an fp8 cache's scale is "
                              "calibrated per head: drop clip or use int8/int4/int2")
        if self.sink_tokens < 0:
            raise ConfigError(f"kv cache sink_tokens must be >= 0, got {self.sink_tokens}")
        r = self.residual_length
        if r is not None and r < 0:
            raise ConfigError(f"residual_length must be >= 0, got {r}")
        if r is not None and not self.is_fp8 and r % self.group_size:
            raise ConfigError(f"residual_length {r} must be a multiple of group_size {self.group_size} (the window "
                              f"is flushed one key block at a time); try {r // self.group_size * self.group_size or self.group_size}")

    def _validate_h2o(self) -> None:
        b = self.h2o_budget
        if b is None:
            if self.scheme == "none":
                raise ConfigError("kv cache scheme 'none' keeps tokens unquantized and is only for H2O eviction: "
                                  "set h2o_budget (e.g. 0.2), or pick a scheme (int8/int4/int2/fp8)")
            return
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ConfigError(f"kv cache h2o_budget must be a fraction in (0, 1] (float) or a token count >= 1 (int); "
                              f"got {b!r}")
        if isinstance(b, float) and not 0.0 < b <= 1.0:
            raise ConfigError(f"kv cache h2o_budget {b} as a fraction of the context must be in (0, 1]; give an "
                              f"integer (e.g. {max(1, int(b))}) for a token count")
        if isinstance(b, int) and b < 1:
            raise ConfigError(f"kv cache h2o_budget must be >= 1 token (or a fraction in (0, 1]); got {b}")
        if isinstance(self.h2o_recent, bool) or not 0.0 <= self.h2o_recent <= 1.0:
            raise ConfigError(f"kv cache h2o_recent (the budget's share for recent tokens) must be in [0, 1]; "
                              f"got {self.h2o_recent!r}")
        for field, bad, why in (("sink_tokens", self.sink_tokens, "keep them as heavy hitters instead"),
                                ("rotate_keys", self.rotate_keys, "set rotate_keys: false"),
                                ("fp8", self.is_fp8, "use scheme int8/int4/int2 or none")):
            if bad:
                raise ConfigError(f"kv cache h2o_budget does not combine with {field}: {why}")

    @property
    def is_h2o(self) -> bool:
        return self.h2o_budget is not None

    def h2o_kept(self, seen: int) -> tuple[int, int]:
        """(heavy hitters, recent tokens) an H2O cache keeps after ``seen`` tokens."""
        b = self.h2o_budget
        budget = min(seen, math.ceil(b * seen) if isinstance(b, float) else b)
        recent = min(budget, math.ceil(budget * self.h2o_recent))
        return budget - recent, recent

    @property
    def is_fp8(self) -> bool:
        return self.scheme == "fp8"

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        """The dtype of the integer schemes' stored scales and minima."""
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def bits(self) -> int:
        if self.scheme == "none":
            return 16
        return 8 if self.is_fp8 else int(self.scheme[3:])

    @property
    def residual(self) -> int:
        if self.scheme == "none":
            return 0
        if self.residual_length is not None:
            return self.residual_length
        return 0 if self.is_fp8 else 128

    @property
    def flush_block(self) -> int:
        """Tokens moved from the window into quantized storage at a time."""
        return 1 if self.is_fp8 else self.group_size

    def value_group(self, head_dim: int) -> int:
        g = min(self.group_size, head_dim)
        if head_dim % g:
            raise ConfigError(f"kv cache group_size {self.group_size} does not divide head_dim {head_dim}")
        return g

    def check_model(self, head_dim: int, where: str = "model") -> None:
        """Refuse a model this cache cannot hold, before any work."""
        if self.scheme == "none":
            return
        if not self.is_fp8:
            self.value_group(head_dim)
            if head_dim % (8 // self.bits):
                raise ConfigError(f"{where}: head_dim {head_dim} cannot be packed {8 // self.bits} codes per byte")
        if self.rotate_keys and head_dim & (head_dim - 1):
            raise ConfigError(f"{where}: rotate_keys needs a power-of-two head_dim, got {head_dim}; "
                              f"set rotate_keys: false")

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Bytes one more token costs in one layer's quantized storage (keys + values, scales
        included, amortized over key blocks). The residual window is a fixed cost on top:
        ``residual_bytes``. FP8's per-layer scales are constant and not counted."""
        elems = num_kv_heads * head_dim
        if self.scheme == "none":
            return float(dense_bytes_per_token(num_kv_heads, head_dim))
        if self.is_fp8:
            return 2.0 * elems
        scale_bytes = 2 * (torch.finfo(self.scale_torch_dtype).bits // 8)        # scale + min
        keys = elems * self.bits / 8 + elems * scale_bytes / self.group_size
        values = elems * self.bits / 8 + num_kv_heads * (head_dim // self.value_group(head_dim)) * scale_bytes
        return keys + values

    def residual_bytes(self, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Bytes of the largest full-precision window: residual + up to one unfinished key block,
        plus the sink tokens."""
        if self.scheme == "none":
            return 0
        tokens = self.residual + self.flush_block - 1 + self.sink_tokens
        return 2 * tokens * num_kv_heads * head_dim * dtype_bytes

    def describe(self) -> str:
        if self.is_h2o:
            b = f"{100 * self.h2o_budget:g}%" if isinstance(self.h2o_budget, float) else f"{self.h2o_budget} tokens"
            kind = "recent window" if self.h2o_recent == 1.0 else f"H2O (recent share {self.h2o_recent:g})"
            base = "16-bit" if self.scheme == "none" else KVCacheConfig.describe(dataclasses.replace(self, h2o_budget=None))
            return f"{kind} {b}, {base}"
        if self.is_fp8:
            return f"fp8 ({self.fp8_scale} scales{', window %d' % self.residual if self.residual else ''})"
        rot = ", rotated keys" if self.rotate_keys else ""
        scales = ", fp8 scales" if self.scale_dtype == "fp8" else ""
        clip = ", mse clip" if self.clip == "mse" else ""
        sink = f", {self.sink_tokens} sink tokens" if self.sink_tokens else ""
        return f"{self.scheme} g{self.group_size} window {self.residual}{rot}{scales}{clip}{sink}"


def dense_bytes_per_token(num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """A bf16/fp16 cache: keys + values."""
    return 2 * num_kv_heads * head_dim * dtype_bytes
