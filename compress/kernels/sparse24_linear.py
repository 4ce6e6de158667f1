"""y = x @ W^T + b for a 2:4 semi-structured sparse weight W held in the compact layout: the layout's
pure functions, the reference, and dispatch.

**Layout** ("compress 2:4 compact layout, version 1"; docs/sparse-format.md is the contract). W
(out, in) has at most 2 nonzeros in every group of 4 consecutive input columns of a row; ``in`` is
a multiple of 8.

- ``values`` (out, in/2) in the model dtype: the two kept entries of each group, in increasing
  column order. A group with fewer than 2 nonzeros keeps its nonzeros first, then its lowest-index
  zero positions, sorted ascending (so zeros are stored as values).
- ``meta`` uint8 (out, in/8): group g of a row (columns 4g .. 4g+3) has the nibble
  ``idx0 | idx1 << 2`` (idx0 < idx1, the in-group positions of its kept values); byte j holds
  group 2j in the low nibble and group 2j+1 in the high nibble. Equivalently: kept value k of a
  row has its position in bits ``2 * (k % 4)`` of byte ``k // 4`` and sits in column
  ``4 * (k // 2) + position``.
- int4: ``packed`` int32 (out, ceil((in/2) * 4 / 32)), the signed symmetric codes (-8..7) of the
  kept values packed by ``packing.pack_int32`` (QuantLinear's bit order), and
  ``scale`` (out, groups) in the model dtype, groups over the ORIGINAL input columns
  (``group_size`` columns, a multiple of 8 dividing ``in``; None = one per output channel). Kept
  value k's scale is ``scale[row, col(k) // group_size]``; its value is ``code * scale``.

**Reference** (the specification): the dense weight is rebuilt by adding each kept value (float
mode: as stored; int4: ``code * scale`` in float32) into column ``col(k)`` of a zero matrix, cast
once to the activation dtype, then ``torch.nn.functional.linear``. The kernels compute the same
sum ``sum_k value_k * x[col(k)]``, so the two agree for any meta byte, even a malformed one
(idx0 >= idx1) that ``pack_24`` never writes and ``check_meta`` refuses at load.

**Backends** as ``dequant_linear``: ``auto`` runs Triton on a CUDA GPU and the reference elsewhere;
``torch`` always the reference; ``triton`` always Triton (the interpreter on the CPU under
``TRITON_INTERPRET=1``) and says why when it cannot. On the GPU each call picks a kernel config
with the integer kernels' autotuner (``dequant_linear.pick_config``): the fused kernel
(``sparse24_linear_triton``) for small batches (split-K, M <= 16, the decode case it is built for)
and medium ones (tiled ``tl.dot``), or ``dense`` (rebuild the dense weight with the reference's
torch ops, then cuBLAS), which the heuristic takes from M = 256 and the autotuner wherever it wins.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from . import tuning
from .dequant_linear import pick_config, resolve_backend
from .int_grid import code_range
from .packing import packed_words, unpack_int32

log = logging.getLogger(__name__)

LAYOUT = "compress 2:4 compact layout"
LAYOUT_VERSION = 1
BITS = (None, 4)                   # None: float values in the model dtype; 4: symmetric int4 codes
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The 6 well-formed nibbles idx0 | idx1 << 2 with idx0 < idx1.
CANONICAL_NIBBLES = tuple(i | (j << 2) for j in range(4) for i in range(j))


# --------------------------------------------------------------------------- layout

def check_shape(out_features: int, in_features: int) -> None:
    if in_features <= 0 or in_features % 8:
        raise ConfigError(f"the weight of shape ({out_features}, {in_features}) cannot take the 2:4 compact layout: "
                          f"in_features {in_features} is not a positive multiple of 8 (two groups of 4 columns "
                          f"per metadata byte); leave this layer dense")


def check_group_size(in_features: int, group_size: int | None) -> None:
    """int4 scale groups: None (per output channel) or a multiple of 8 dividing ``in_features``."""
    if group_size is None:
        return
    if group_size <= 0 or group_size % 8 or in_features % group_size:
        fits = [g for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0]
        raise ConfigError(f"2:4 int4 group_size {group_size} must be a multiple of 8 dividing in_features "
                          f"{in_features} (a scale group never splits a metadata byte); pass group_size="
                          f"{fits[0] if fits else 8} or None (one scale per output channel)")


def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2) in weight's dtype, meta uint8 (out, in/8)) of a 2:4 sparse ``weight``."""
    if weight.dim() != 2:
        raise ConfigError(f"pack_24 takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    out, cols = weight.shape
    check_shape(out, cols)
    w = weight.detach().reshape(out, cols // 4, 4)                       # (out, groups, 4)
    nonzero = w != 0                                                      # NaN counts as nonzero
    count = nonzero.sum(dim=-1)                                           # (out, groups)
    bad = count > 2
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        row, group = divmod(first, cols // 4)
        raise ConfigError(f"the weight of shape ({out}, {cols}) is not 2:4 sparse: row {row}, group {group} "
                          f"(columns {4 * group}..{4 * group + 3}) holds {int(count[row, group])} nonzeros, "
                          f"{int(bad.sum())} groups in all hold more than 2; prune it to a 2:4 pattern "
                          f"first, or leave the layer dense")
    # Nonzeros first, then the lowest-index zeros; the two kept positions in ascending order.
    key = (~nonzero).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = key.argsort(dim=-1)[..., :2].sort(dim=-1).values                # (out, groups, 2)
    values = w.gather(2, pos).reshape(out, cols // 2)
    nib = pos[..., 0] | (pos[..., 1] << 2)                                # (out, groups)
    pair = nib.reshape(out, cols // 8, 2)
    meta = (pair[..., 0] | (pair[..., 1] << 4)).to(torch.uint8)
    return values.contiguous(), meta


def _check_meta_shape(meta: torch.Tensor, in_features: int) -> None:
    if meta.dtype != torch.uint8 or meta.dim() != 2 or meta.shape[1] * 8 != in_features:
        raise ConfigError(f"2:4 metadata must be uint8 of shape (out, in_features / 8) = (out, {in_features // 8}); "
                          f"got {meta.dtype} of shape {tuple(meta.shape)}")


def kept_columns(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """int64 (out, in/2): the column of each kept value."""
    check_shape(meta.shape[0] if meta.dim() else 0, in_features)
    _check_meta_shape(meta, in_features)
    out = meta.shape[0]
    shifts = torch.arange(4, device=meta.device, dtype=torch.int64) * 2
    pos = ((meta.to(torch.int64).unsqueeze(-1) >> shifts) & 3).reshape(out, in_features // 2)   # (out, in/2)
    base = (torch.arange(in_features // 2, device=meta.device) // 2) * 4
    return base + pos


def check_meta(meta: torch.Tensor) -> str | None:
    """Why ``meta`` is not what ``pack_24`` writes (a nibble with idx0 >= idx1), or None."""
    nib = torch.stack([meta & 15, meta >> 4], dim=-1)
    ok = torch.zeros(16, dtype=torch.bool, device=meta.device)
    ok[list(CANONICAL_NIBBLES)] = True
    bad = ~ok[nib.long()]
    if not bool(bad.any()):
        return None
    first = int(bad.flatten().nonzero()[0])
    row, group = divmod(first, nib.shape[1] * 2)
    return (f"row {row}, group {group} has nibble {int(nib.flatten()[first]):#x} (kept positions must be "
            f"idx0 < idx1); {int(bad.sum())} groups in all are malformed")


def _scatter_dense(kept: torch.Tensor, cols: torch.Tensor, in_features: int) -> torch.Tensor:
    dense = torch.zeros(kept.shape[0], in_features, dtype=kept.dtype, device=kept.device)
    return dense.scatter_add_(1, cols, kept)


def unpack_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense (out, in) weight in ``values``' dtype (inverse of ``pack_24``)."""
    cols = kept_columns(meta, in_features)
    if values.shape != cols.shape:
        raise ConfigError(f"2:4 values must have shape (out, in_features / 2) = {tuple(cols.shape)}; "
                          f"got {tuple(values.shape)}")
    return _scatter_dense(values, cols, in_features)


def _kept_scales(scale: torch.Tensor, cols: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """float32 (out, in/2): the scale of each kept value, by its original column."""
    if group_size is None:
        return scale.float()[:, :1].expand(cols.shape)
    return scale.float().gather(1, cols // group_size)


def quantize_24(values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                in_features: int) -> torch.Tensor:
    """Signed int4 codes (int8, out x in/2) of the kept ``values`` on the given per-group scales
    (``grid.quantize``'s rounding: round(v / scale), clamped to -8..7)."""
    check_group_size(in_features, group_size)
    cols = kept_columns(meta, in_features)
    lo, hi = code_range(4)
    return torch.clamp(torch.round(values.float() / _kept_scales(scale, cols, group_size)), lo, hi).to(torch.int8)


def dequant_24_int4(packed: torch.Tensor, scale: torch.Tensor, meta: torch.Tensor, in_features: int,
                    group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight: ``code * scale`` of every kept value in float32, cast once to ``dtype``."""
    check_group_size(in_features, group_size)
    cols = kept_columns(meta, in_features)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (cols.shape[0], packed_words(in_features // 2, 4)):
        raise ConfigError(f"2:4 int4 codes must be int32 of shape (out, ceil(in_features / 16)) = "
                          f"{(cols.shape[0], packed_words(in_features // 2, 4))}; got {packed.dtype} of shape "
                          f"{tuple(packed.shape)}")
    codes = unpack_int32(packed, 4, in_features // 2)                     # (out, in/2) int8
    kept = codes.float() * _kept_scales(scale, cols, group_size)
    return _scatter_dense(kept, cols, in_features).to(dtype)


def sparse24_weight(values_or_packed: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor | None, *,
                    in_features: int, group_size: int | None, bits: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight in ``dtype`` from either mode's tensors."""
    if bits not in BITS:
        raise ConfigError(f"2:4 weights hold float values (bits=None) or int4 codes (bits=4), not bits={bits}")
    if bits is None:
        return unpack_24(values_or_packed, meta, in_features).to(dtype)
    return dequant_24_int4(values_or_packed, scale, meta, in_features, group_size, dtype)


# --------------------------------------------------------------------------- reference and dispatch

def sparse24_linear_reference(x: torch.Tensor, values_or_packed: torch.Tensor, meta: torch.Tensor,
                              scale: torch.Tensor | None, bias: torch.Tensor | None, *, in_features: int,
                              group_size: int | None, bits: int | None) -> torch.Tensor:
    w = sparse24_weight(values_or_packed, meta, scale, in_features=in_features, group_size=group_size, bits=bits,
                        dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def sparse24_linear(x: torch.Tensor, values_or_packed: torch.Tensor, meta: torch.Tensor,
                    scale: torch.Tensor | None, bias: torch.Tensor | None, *, in_features: int,
                    group_size: int | None, bits: int | None, backend: str = "auto",
                    config: tuning.KernelConfig | None = None) -> torch.Tensor:
    """Dispatch; ``config`` forces one kernel configuration (tests, benchmarks)."""
    if bits not in BITS:
        raise ConfigError(f"2:4 weights hold float values (bits=None) or int4 codes (bits=4), not bits={bits}")
    # The kernel's width check is the int4 one: float values never need a bit width.
    if resolve_backend(backend, x, 4) == "torch":
        return sparse24_linear_reference(x, values_or_packed, meta, scale, bias, in_features=in_features,
                                         group_size=group_size, bits=bits)
    from . import sparse24_linear_triton as tk

    n = meta.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, n)

    def run(cfg: tuning.KernelConfig) -> torch.Tensor:
        if cfg.kind == "dense":
            return sparse24_linear_reference(x2, values_or_packed, meta, scale, bias, in_features=in_features,
                                             group_size=group_size, bits=bits)
        return tk.sparse24_matmul(x2, values_or_packed, meta, scale, bias, bits=bits, group_size=group_size,
                                  config=cfg)

    if config is None:
        m = x2.shape[0]
        kind = f"int4|g{group_size or 'ch'}" if bits else str(values_or_packed.dtype).removeprefix("torch.")
        key = (f"sp24|{kind}|bias{int(bias is not None)}|{str(x2.dtype).removeprefix('torch.')}|"
               f"m{tuning.m_bucket(m)}|n{n}|k{in_features}")
        # A tile never straddles a scale group when BLOCK_K divides it; float values have no groups.
        config = pick_config(x2, n, group_size if bits else None, key, run)
    return run(config).reshape(*lead, n)
