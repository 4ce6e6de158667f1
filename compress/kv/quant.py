"""KV-cache quantization primitives: pure functions on tensors, no cache bookkeeping.

The storage layout here is the contract between the cache (``cache.py``), the PyTorch
reference attention and the Triton decode-attention kernel (``compress/kernels/decode_attention*``).
All tensors are (B, H, T, D): batch, KV heads, tokens, head_dim.

Integer formats (KIVI, Liu et al. 2024), asymmetric min-max with ``2^bits - 1`` steps:

* keys are quantized **per channel**: one (scale, min) per channel over a block of
  ``group_size`` consecutive tokens (keys have outlier channels, so a channel shares a range);
* values are quantized **per token**: one (scale, min) per token over ``value_group`` channels.

    k_codes  uint8   (B, H, T, D*bits/8)   codes packed along D, little-endian in each byte:
                                            channel d sits in byte d*bits//8 at bit (d*bits) % 8
    k_scale  fp16    (B, H, T/G, D)         per key block of G tokens, per channel
    k_min    fp16    (B, H, T/G, D)
    v_codes  uint8   (B, H, T, D*bits/8)
    v_scale  fp16    (B, H, T, D/Gv)        per token, per group of Gv channels
    v_min    fp16    (B, H, T, D/Gv)

    dequantize: x = code * scale + min

    Scales and minima are fp16 by default, or float8_e4m3fn (``KVCacheConfig.scale_dtype: fp8``,
    saturated at +-448) where one byte each is wanted.

FP8 (E4M3): ``codes`` are float8_e4m3fn (B, H, T, D); a static float32 scale per KV head
(``scale`` (H,), a per-tensor scale is the same value repeated), x = fp8 * scale, as vLLM reads
``k_scale`` / ``v_scale``.

Optional key rotation: keys are multiplied by a normalized Hadamard matrix (orthogonal and
symmetric, so its own inverse; ``compress.kernels.hadamard``) before quantization. Attention is
unchanged if the query is rotated the same way, q.k = (qH).(kH), so the decode kernel never
un-rotates the keys.
"""

from __future__ import annotations

import dataclasses

import torch

from ..kernels.hadamard import rotate

SCALE_DTYPE = torch.float16          # integer scales and minima (the default)
SCALE_DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def packed_width(head_dim: int, bits: int) -> int:
    """Bytes per token per head of packed ``bits``-bit codes."""
    return head_dim * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) integer codes in [0, 2^bits) -> (..., D*bits/8) uint8, little-endian per byte."""
    per_byte = 8 // bits
    d = codes.shape[-1]
    if d % per_byte:
        raise ValueError(f"head_dim {d} is not a multiple of {per_byte} ({bits}-bit codes per byte)")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], d // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D*bits/8) uint8 -> (..., D) int32 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def _store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the storage dtype, saturating (float8 has no infinity: out of range would be NaN)."""
    if dtype == torch.float8_e4m3fn:
        t = t.clamp(-FP8_MAX, FP8_MAX)
    return t.to(dtype)


# Range shrink factors tried by the "mse" clip: the range [min, max] narrowed about its midpoint.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _minmax_codes(x: torch.Tensor, dim: int, bits: int, scale_dtype: torch.dtype = SCALE_DTYPE,
                  clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` reduced over ``dim`` (kept). ``clip="minmax"``: the range is
    [min, max]; ``"mse"``: each group keeps the range among ``CLIP_RATIOS`` narrowings of it whose
    rounding error (sum of squares over the group) is least, as weight quantizers' MSE observers do
    (at 2 bits a Gaussian group of 32 loses about a third of its error). The codes are computed
    from the stored (fp16- or fp8-rounded) scale and min, so dequantization sees what rounding
    assumed."""
    x = x.float()
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    levels = 2 ** bits - 1

    def fit(lo_, hi_):
        scale = _store((hi_ - lo_) / levels, scale_dtype)
        lo_ = _store(lo_, scale_dtype)
        safe = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
        codes = torch.round((x - lo_.float()) / safe).clamp_(0, levels)
        return codes, scale, lo_

    codes, scale, lo_s = fit(lo, hi)
    if clip == "mse":
        err = (codes * scale.float() + lo_s.float() - x).square().sum(dim, keepdim=True)
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        for ratio in CLIP_RATIOS[1:]:
            c, s, m = fit(mid - ratio * half, mid + ratio * half)
            e = (c * s.float() + m.float() - x).square().sum(dim, keepdim=True)
            better = e < err
            codes = torch.where(better, c, codes)
            scale, lo_s, err = torch.where(better, s, scale), torch.where(better, m, lo_s), torch.where(better, e, err)
    elif clip != "minmax":
        raise ValueError(f"clip must be 'minmax' or 'mse', got {clip!r}")
    return codes.to(torch.uint8), scale, lo_s


def quantize_key_blocks(k: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = SCALE_DTYPE,
                        clip: str = "minmax"):
    """Keys (B, H, T, D), T a multiple of ``group_size`` -> packed codes (B, H, T, D*bits/8) and
    scale, min (B, H, T/G, D): one range per channel per block of G tokens."""
    b, h, t, d = k.shape
    if t % group_size:
        raise ValueError(f"{t} key tokens do not fill whole blocks of {group_size}")
    blocks = k.reshape(b, h, t // group_size, group_size, d)                # (B, H, nb, G, D)
    codes, scale, lo = _minmax_codes(blocks, dim=3, bits=bits, scale_dtype=scale_dtype, clip=clip)
    return pack_codes(codes.reshape(b, h, t, d), bits), scale.squeeze(3), lo.squeeze(3)


def quantize_values(v: torch.Tensor, bits: int, value_group: int, scale_dtype: torch.dtype = SCALE_DTYPE,
                    clip: str = "minmax"):
    """Values (B, H, T, D) -> packed codes (B, H, T, D*bits/8) and scale, min (B, H, T, D/Gv)."""
    b, h, t, d = v.shape
    groups = v.reshape(b, h, t, d // value_group, value_group)              # (B, H, T, ng, Gv)
    codes, scale, lo = _minmax_codes(groups, dim=4, bits=bits, scale_dtype=scale_dtype, clip=clip)
    return pack_codes(codes.reshape(b, h, t, d), bits), scale.squeeze(4), lo.squeeze(4)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_key_blocks`` for the first T = codes.shape[2] tokens."""
    q = unpack_codes(codes, bits).float()                                   # (B, H, T, D)
    t = q.shape[2]
    s = scale.float().repeat_interleave(group_size, dim=2)[:, :, :t]       # (B, H, T, D)
    m = lo.float().repeat_interleave(group_size, dim=2)[:, :, :t]
    return (q * s + m).to(dtype)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    q = unpack_codes(codes, bits).float()                                   # (B, H, T, D)
    b, h, t, d = q.shape
    ng = scale.shape[-1]
    q = q.reshape(b, h, t, ng, d // ng)
    return (q * scale.float().unsqueeze(-1) + lo.float().unsqueeze(-1)).reshape(b, h, t, d).to(dtype)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) with a float32 scale per head (H,) -> float8_e4m3fn, saturating at +-448."""
    s = scale.float().view(1, -1, 1, 1)
    return (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float().view(1, -1, 1, 1)).to(dtype)


@dataclasses.dataclass
class QuantizedKV:
    """One layer's cache as the attention reads it: ``length`` quantized tokens followed by the
    full-precision residual window ``k_res`` / ``v_res`` (B, H, R, D) of the most recent tokens.

    ``bits`` is 8, 4 or 2 for the integer formats (``k_min``/``v_min`` set) and 8 with ``fp8``
    for E4M3 (``k_scale``/``v_scale`` float32 per head (H,), mins None). Quantized tensors may be
    views into larger preallocated buffers: only the first ``length`` tokens
    (``ceil(length/group_size)`` key blocks) are valid. ``rotated``: keys (quantized and residual)
    are stored multiplied by the Hadamard matrix; rotate the query to match. ``k_sink`` / ``v_sink``
    (B, H, S, D), when set: the sequence's first S tokens in full precision (rotated like the
    residual), before the quantized ones.
    """

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
    rotated: bool = False
    k_sink: torch.Tensor | None = None
    v_sink: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k_res.dtype

    @property
    def sink_length(self) -> int:
        return 0 if self.k_sink is None else self.k_sink.shape[2]

    @property
    def total_length(self) -> int:
        return self.sink_length + self.length + self.k_res.shape[2]

    def dequantize(self, unrotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, length + R, D) in the residual's dtype, oldest token first."""
        n, dtype = self.length, self.dtype
        if self.fp8:
            k = dequantize_fp8(self.k_codes[:, :, :n], self.k_scale, dtype)
            v = dequantize_fp8(self.v_codes[:, :, :n], self.v_scale, dtype)
        else:
            nb = -(-n // self.group_size)
            k = dequantize_keys(self.k_codes[:, :, :n], self.k_scale[:, :, :nb], self.k_min[:, :, :nb],
                                self.bits, self.group_size, dtype)
            v = dequantize_values(self.v_codes[:, :, :n], self.v_scale[:, :, :n], self.v_min[:, :, :n],
                                  self.bits, dtype)
        k = torch.cat([k, self.k_res] if self.k_sink is None else [self.k_sink, k, self.k_res], dim=2)
        v = torch.cat([v, self.v_res] if self.v_sink is None else [self.v_sink, v, self.v_res], dim=2)
        if self.rotated and unrotate:
            k = rotate(k)
        return k, v
