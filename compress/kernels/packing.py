"""Packing signed integer codes into int32 words, as compressed-tensors "pack-quantized" does.

Each row is one little-endian bit stream: code ``i`` (stored unsigned, as ``q + 2^(bits-1)``)
occupies bits ``i*bits .. i*bits+bits-1`` of the stream, and word ``k`` holds stream bits
``32k .. 32k+31``. For 2, 4 and 8 bits no code crosses a word; for 3, 5, 6 and 7 bits codes do
cross word boundaries (32 codes fill exactly ``bits`` words). A row of ``n`` codes takes
``ceil(n * bits / 32)`` words. Zero points are packed the same way along the output dimension.
"""

from __future__ import annotations

import math

import torch

_MASK32 = (1 << 32) - 1


_PACK_BLOCK_ELEMENTS = 1 << 20        # codes packed at once (the int64 work is 24 bytes per code)


def packed_words(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed codes ``q`` (2-D, integer dtype) along ``dim`` into int32 words."""
    if q.dim() != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(q.shape)}")
    if dim == 0:
        return pack_int32(q.t(), bits, dim=1).t().contiguous()
    rows, n = q.shape
    step = max(1, _PACK_BLOCK_ELEMENTS // max(n, 1))
    if rows > step:
        # Row blocks: the int64 work below is 24 bytes per code; an 8B model's gate_proj would need 1.4 GB.
        out = torch.empty(rows, packed_words(n, bits), dtype=torch.int32, device=q.device)
        for r in range(0, rows, step):
            out[r:r + step] = pack_int32(q[r:r + step], bits)
        return out
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q64 = q.to(torch.int64)
    if q64.numel() and (int(q64.min()) < lo or int(q64.max()) > hi):
        raise ValueError(f"codes out of the {bits}-bit range [{lo}, {hi}]")
    u = q64 + (1 << (bits - 1))                                     # (rows, n) unsigned codes
    rows, n = u.shape
    nwords = packed_words(n, bits)
    start = torch.arange(n, device=q.device, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    acc = torch.zeros(rows, nwords + 1, dtype=torch.int64, device=q.device)
    # Bit fields never overlap, so adding them is the same as OR-ing them. A field that crosses
    # a word boundary spills above bit 31 of its int64 accumulator; fold that into the next word.
    acc.scatter_add_(1, word.expand(rows, n), u << offset)
    words = acc & _MASK32
    words[:, 1:] |= acc[:, :-1] >> 32
    words = words[:, :nwords]
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)   # two's complement view
    return words.to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of ``pack_int32``: ``n`` signed codes (int8) per row (or column when dim=0)."""
    if dim == 0:
        return unpack_int32(words.t(), bits, n, dim=1).t().contiguous()
    if words.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {words.dtype}")
    rows, nwords = words.shape
    if nwords != packed_words(n, bits):
        raise ValueError(f"{nwords} int32 words per row cannot hold {n} codes of {bits} bits "
                         f"(expected {packed_words(n, bits)})")
    w = words.to(torch.int64) & _MASK32
    if 32 % bits == 0:                                              # no code crosses a word
        per = 32 // bits
        shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
        u = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, nwords * per)[:, :n]
        return (u - (1 << (bits - 1))).to(torch.int8)
    w = torch.cat([w, torch.zeros(rows, 1, dtype=torch.int64, device=w.device)], dim=1)
    start = torch.arange(n, device=words.device, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    stream = w[:, word] | (w[:, word + 1] << 32)                   # 64 bits starting at the word
    u = (stream >> offset) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)
