"""FP8 E4M3 weights: the grid math of the W8A8 FP8 schemes (fp8, fp8-block, fp8-static).

    scale = round_to_scale_dtype(amax / 448)        per output row, per tensor, or per 128x128 block
    code  = fp8_e4m3(clamp(W / scale, -448, 448))   the cast rounds to nearest even
    W'    = float32(code) * scale                   then cast once to the model dtype

as compressed-tensors computes FP8 weight scales (``calculate_qparams``: symmetric ``amax /
(bit_range / 2)`` with bit_range = 448 - (-448)) and stores them: ``weight_scale`` in the model dtype
(``initialize_qparams`` gives scales the observed weight's dtype), so the scale is rounded to that
dtype *before* any code is chosen and what we evaluate is what we export. A row or block of zeros
gets scale 1 (any scale works: its codes are 0).

Scales are held per row, (rows, groups) float32: the per-tensor scale repeated on every row, a
block's scale on each of its rows. Stacked solves (q/k/v, gate/up) then slice a module's rows like
every other format, and the packed module reads the stored shape back (``stored_scale``).

Blocks are 128 x 128 (``W8A8_BLOCK``), counted from the first row and column of the weight being
solved; the last block may be narrower in rows and in columns. A block must not span two modules,
so the block scheme is solved one module at a time (``compress.quant.apply``): SmolLM2's q_proj has
576 rows = 4.5 blocks, and stacked with k_proj a block would mix rows 512-575 of q with k's first 64.
"""

from __future__ import annotations

import torch

from ..formats import W8A8_BLOCK

FP8_MAX = 448.0


def fp8_encode(scaled: torch.Tensor) -> torch.Tensor:
    """float32 ``W / scale`` -> float8_e4m3fn codes (saturating at +-448, round to nearest even)."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_scale(amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """float32 scales holding ``scale_dtype`` values: amax / 448, 1 where amax is 0."""
    s = (amax.float() / FP8_MAX).to(scale_dtype).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def row_blocks(rows: int, block: int = W8A8_BLOCK) -> torch.Tensor:
    """int64 (rows,): the row block each row belongs to (blocks of ``block`` rows from row 0)."""
    return torch.arange(rows) // block


def reduce_rows(x: torch.Tensor, strategy: str, blocks: torch.Tensor | None, op: str) -> torch.Tensor:
    """Per-row values ``x`` (rows, groups) reduced (``op`` "amax" or "sum") over the rows that share
    a scale, and repeated back onto each of those rows: channel keeps rows, tensor reduces all of
    them, block reduces each row block (``blocks``: ``row_blocks``, for "block" only)."""
    if strategy == "channel":
        return x
    if strategy == "tensor":
        r = x.amax() if op == "amax" else x.sum()
        return r.expand_as(x).clone()
    n = int(blocks.max()) + 1 if blocks.numel() else 0
    index = blocks.to(x.device).unsqueeze(1).expand_as(x)
    out = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device)
    out.scatter_reduce_(0, index, x, reduce="amax" if op == "amax" else "sum", include_self=False)
    return out[blocks.to(x.device)]                                 # (rows, groups)


def column_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, g), zero-padding a narrower last group."""
    rows, cols = w.shape
    g = group_size or cols
    groups = -(-cols // g)
    return torch.nn.functional.pad(w, (0, groups * g - cols)).reshape(rows, groups, g)


def expand_columns(div: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """(rows, groups) scales -> (rows, cols), each column its group's."""
    if group_size is None:
        return div.expand(div.shape[0], cols)
    return div.repeat_interleave(group_size, dim=1)[:, :cols]


def fp8_quantize(w: torch.Tensor, div: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 dequantized) of ``w`` (rows, cols) on per-row scales ``div``
    (rows, groups)."""
    s = expand_columns(div, w.shape[1], group_size)
    codes = fp8_encode(w.float() / s)
    return codes, codes.float() * s
