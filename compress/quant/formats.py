"""Solver grids: a weight format (``compress.formats.WeightFormat``) as the solvers see it, how a
group of columns gets its scale and how one column is rounded. RTN, GPTQ and SparseGPT are written
once against this interface; the grid decides what a code and a scale are. A grid is made for one
solve by ``fmt.solver_grid(scale_dtype, observer)``.

- ``IntFormat``: the integer grid of ``grid.py`` (2-8 bits, per group or channel, zero points).
- ``FP4Format``: E2M1 codes with per-block scales, ``nvfp4`` (FP8 E4M3 scale per 16 columns over a
  float32 per-tensor global scale) or ``mxfp4`` (E8M0 scale per 32), from ``fp4.py``.
- ``FP8Format``: FP8 E4M3 codes with a scale per output channel, per tensor or per 128x128 block
  (the W8A8 fp8 schemes), from ``fp8.py``. The w8a8-int8 schemes round onto ``IntFormat`` (8 bits,
  per channel, symmetric) and differ only in how they are packed (``W8A8Linear``).

This module also registers, per format kind, the packed module and the grid that
``WeightFormat`` hands out (``register_kind``, at the bottom).

Parameters (``params``) are a dict of (rows, groups) tensors; ``params["div"]`` is what a weight is
divided by before rounding (int: the scale; FP4: the effective block scale; FP8: the scale, held
per row).
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import SCHEMES, WeightFormat, register_kind  # noqa: F401  (SCHEMES: re-exported for the CLI)
from .fp4 import _encode_scaled, _mxfp4_scales, _nvfp4_scales, mxfp4_quantize, nvfp4_global_scale, nvfp4_quantize
from ..kernels.fp4_packing import e2m1_decode, e8m0_decode
from .fp4_linear import FP4Linear
from .fp8 import column_groups, fp8_encode, fp8_quantize, fp8_scale, reduce_rows, row_blocks
from .grid import MSE_SHRINK, code_range, compute_qparams, dequantize, num_groups, quantize
from .linear import QuantLinear
from .w8a8_linear import W8A8Linear


@dataclasses.dataclass
class QuantResult:
    """What a weight solver returns for one (rows, cols) weight.

    codes:        int8 signed codes (int), uint8 E2M1 codes (FP4) or float8_e4m3fn codes (FP8),
                  (rows, cols)
    scale:        int: float32 (rows, groups), values exactly representable in the storage dtype;
                  NVFP4: float8_e4m3fn block scales; MXFP4: uint8 E8M0 exponents; FP8: float32
                  (rows, groups) per row (a tensor's or block's scale repeated on its rows)
    zero_point:   float32 integers (rows, groups), or None when symmetric (always for FP4)
    weight:       the dequantized weight in float32 (what the model computes with)
    loss:         the solver's own error measure (GPTQ: its weighted loss; RTN: squared error)
    damp:         the GPTQ damping that succeeded, if any
    fallback:     why the solver fell back to round-to-nearest, if it did
    global_scale: NVFP4's float32 (1,) per-tensor divisor, shared by the rows solved together
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    weight: torch.Tensor
    loss: float
    damp: float | None = None
    fallback: str | None = None
    global_scale: torch.Tensor | None = None

    def without_weight(self) -> QuantResult:
        """This result without its float ``weight`` (None): what packing needs, once the dequantized
        weight has been written into the model (a layer's results wait for packing until the layer ends;
        holding their float copies too would cost 4 bytes per weight, an MoE layer's worth of experts)."""
        return dataclasses.replace(self, weight=None)

    def take_rows(self, rows: slice) -> QuantResult:
        """The result of ``rows`` alone (one module's share of a stacked solve); the NVFP4 global
        scale stays shared."""
        return dataclasses.replace(self, codes=self.codes[rows], scale=self.scale[rows], weight=self.weight[rows],
                                   zero_point=None if self.zero_point is None else self.zero_point[rows])


# Block-scale multipliers the FP4 MSE observer tries (1.0 = the amax rule).
FP4_MSE_FACTORS = tuple(1.0 + 0.05 * i for i in range(4, 0, -1)) + tuple(1.0 - 0.025 * i for i in range(17))


class IntFormat:
    codes_dtype = torch.int8
    row_unit = 1             # rows that share nothing with other rows (``rtn_solve_inplace`` solves them apart)

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, observer: str,
                 scale_dtype: torch.dtype):
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.observer, self.scale_dtype = observer, scale_dtype

    @classmethod
    def from_format(cls, fmt: WeightFormat, scale_dtype: torch.dtype, observer: str) -> IntFormat:
        return cls(fmt.bits, fmt.group_size, fmt.symmetric, observer, scale_dtype)

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Scales for every group of ``w`` (rows, cols)."""
        scale, zp = compute_qparams(w, self.bits, self.group_size, self.symmetric, self.scale_dtype,
                                    self.observer, col_weight)
        return {"div": scale, "zp": zp}

    def empty(self, rows: int, cols: int, device) -> dict[str, torch.Tensor]:
        groups = num_groups(cols, self.group_size)
        return {"div": torch.ones(rows, groups, device=device), "zp": torch.zeros(rows, groups, device=device)}

    def fit_group(self, params: dict, k: int, w: torch.Tensor, col_weight: torch.Tensor | None) -> None:
        """Fit group ``k`` to its columns ``w`` (rows, g) as they are now (GPTQ without act-order)."""
        s, z = compute_qparams(w, self.bits, None, self.symmetric, self.scale_dtype, self.observer, col_weight)
        params["div"][:, k:k + 1], params["zp"][:, k:k + 1] = s, z

    def round_column(self, x: torch.Tensor, params: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized) of column ``x`` (rows,) in group ``k``."""
        qmin, qmax = code_range(self.bits)
        s, z = params["div"][:, k], params["zp"][:, k]
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        return q.to(torch.int8), (q - z) * s

    def quantize(self, w: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized float32) of the whole weight."""
        codes = quantize(w, params["div"], params["zp"], self.bits, self.group_size)
        return codes, dequantize(codes, params["div"], self._zp(params), self.group_size, torch.float32)

    def _zp(self, params: dict) -> torch.Tensor | None:
        return None if self.symmetric else params["zp"]

    def result(self, codes, params, weight, loss, **kw) -> QuantResult:
        return QuantResult(codes, params["div"], self._zp(params), weight, loss, **kw)


class FP4Format:
    """NVFP4 / MXFP4 weights. ``global_scale`` (NVFP4) is fixed before any block is fitted: from the
    amax of the weight being solved, which is the stacked q/k/v or gate/up weight when those are
    solved together, so fused projections share one global scale as vLLM requires."""

    codes_dtype = torch.uint8
    symmetric = True
    row_unit = 1             # once ``global_scale`` is fixed, every row's blocks are its own

    def __init__(self, fmt: WeightFormat, observer: str = "minmax"):
        if fmt.kind not in ("nvfp4", "mxfp4"):
            raise ValueError(f"FP4 format must be nvfp4 or mxfp4, got {fmt}")
        self.kind, self.observer = fmt.kind, observer
        self.group_size = fmt.group_size                         # the block: 16 (nvfp4) or 32 (mxfp4)
        self.global_scale: torch.Tensor | None = None

    @classmethod
    def from_format(cls, fmt: WeightFormat, scale_dtype: torch.dtype, observer: str) -> FP4Format:
        """``scale_dtype`` does not apply: FP4 scales have their own storage types."""
        return cls(fmt, observer)

    def _global(self, w: torch.Tensor) -> torch.Tensor:
        if self.global_scale is None:
            self.global_scale = nvfp4_global_scale(w.detach().abs().amax().float()).to(w.device)
        return self.global_scale

    def _scales(self, wg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw block scales and divisors (rows, groups) for blocks ``wg`` (rows, groups, g)."""
        if self.kind == "nvfp4":
            g = self._global(wg)
            raw = _nvfp4_scales(wg, g)
            return {"raw": raw, "div": raw.float() / g}
        raw = _mxfp4_scales(wg)
        return {"raw": raw, "div": e8m0_decode(raw)}

    def _candidates(self, wg: torch.Tensor, factor: float) -> dict[str, torch.Tensor]:
        """The amax rule applied to ``factor * amax``: a shrunk (or grown) block scale."""
        return self._scales(wg * factor)

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        if cols % self.group_size:
            raise ValueError(f"{self.kind.upper()} needs in_features to be a multiple of {self.group_size}, "
                             f"got {cols}")
        return w.float().reshape(rows, cols // self.group_size, self.group_size)

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        wg = self._blocks(w)
        if self.kind == "nvfp4":
            self._global(w)
        best = self._scales(wg)
        if self.observer != "mse":
            return best
        cw = None if col_weight is None else col_weight.float().reshape(1, -1, self.group_size)
        best_err = self._error(wg, best["div"], cw)
        for factor in FP4_MSE_FACTORS:
            cand = self._candidates(wg, factor)
            err = self._error(wg, cand["div"], cw)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {key: torch.where(better, cand[key].float(), best[key].float()).to(best[key].dtype)
                    for key in best}
        return best

    @staticmethod
    def _error(wg: torch.Tensor, div: torch.Tensor, cw: torch.Tensor | None) -> torch.Tensor:
        d = div.unsqueeze(-1)
        err = (e2m1_decode(_encode_scaled(wg / d)) * d - wg).pow_(2)
        if cw is not None:
            err.mul_(cw)
        return err.sum(dim=-1)                                     # (rows, groups)

    def empty(self, rows: int, cols: int, device) -> dict[str, torch.Tensor]:
        groups = cols // self.group_size
        raw_dtype = torch.float8_e4m3fn if self.kind == "nvfp4" else torch.uint8
        return {"raw": torch.zeros(rows, groups, device=device).to(raw_dtype),
                "div": torch.ones(rows, groups, device=device)}

    def fit_group(self, params: dict, k: int, w: torch.Tensor, col_weight: torch.Tensor | None) -> None:
        one = self.fit(w, col_weight)
        params["raw"][:, k:k + 1], params["div"][:, k:k + 1] = one["raw"], one["div"]

    def round_column(self, x: torch.Tensor, params: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = params["div"][:, k]
        codes = _encode_scaled(x / d)
        return codes, e2m1_decode(codes) * d

    def quantize(self, w: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "nvfp4":
            codes = nvfp4_quantize(w, self.global_scale, params["raw"])
        else:
            codes = mxfp4_quantize(w, params["raw"])
        rows, cols = w.shape
        deq = e2m1_decode(codes).reshape(rows, -1, self.group_size) * params["div"].unsqueeze(-1)
        return codes, deq.reshape(rows, cols)

    def result(self, codes, params, weight, loss, **kw) -> QuantResult:
        return QuantResult(codes, params["raw"], None, weight, loss, global_scale=self.global_scale, **kw)


class FP8Format:
    """FP8 E4M3 weights (the fp8, fp8-block, fp8-static schemes): a scale per output channel, one per
    tensor (the rows solved together share it: a fused q/k/v gets one scale), or one per 128x128
    block (``group_size`` 128: GPTQ groups columns by it). Scales are kept per row (``fp8.py``)."""

    codes_dtype = torch.float8_e4m3fn
    symmetric = True

    def __init__(self, fmt: WeightFormat, scale_dtype: torch.dtype, observer: str = "minmax"):
        if fmt.kind != "fp8":
            raise ValueError(f"FP8 grid needs an fp8 format, got {fmt}")
        if observer not in ("minmax", "mse"):
            raise ValueError(f"observer must be 'minmax' or 'mse', got {observer!r}")
        self.strategy = fmt.weight_strategy                      # channel | tensor | block
        self.group_size = fmt.group_size                         # None, or 128 columns (block)
        self.scale_dtype, self.observer = scale_dtype, observer

    @classmethod
    def from_format(cls, fmt: WeightFormat, scale_dtype: torch.dtype, observer: str) -> FP8Format:
        return cls(fmt, scale_dtype, observer)

    @property
    def row_unit(self) -> int | None:
        """Rows sharing a scale: 1 per channel, 128 per block, None when one scale spans the tensor."""
        return {"channel": 1, "block": 128}.get(self.strategy)

    def fit(self, w: torch.Tensor, col_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-row scales (rows, groups) of ``w`` (rows, cols); with observer "mse" the scale of
        each channel / tensor / block is the shrunk one (MSE_SHRINK) with the lowest squared error,
        columns weighted by ``col_weight``."""
        wg = column_groups(w.float(), self.group_size)                             # (rows, groups, g)
        blocks = row_blocks(w.shape[0]) if self.strategy == "block" else None
        amax = reduce_rows(wg.abs().amax(dim=-1), self.strategy, blocks, "amax")   # (rows, groups)
        best = fp8_scale(amax, self.scale_dtype)
        if self.observer != "mse":
            return {"div": best}
        cw = None if col_weight is None else column_groups(col_weight.float().reshape(1, -1), self.group_size)
        best_err = self._error(wg, best, cw, blocks)
        for shrink in MSE_SHRINK[1:]:
            cand = fp8_scale(amax * shrink, self.scale_dtype)
            err = self._error(wg, cand, cw, blocks)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, cand, best)
        return {"div": best}

    def _error(self, wg: torch.Tensor, div: torch.Tensor, cw: torch.Tensor | None,
               blocks: torch.Tensor | None) -> torch.Tensor:
        """Squared error of each scale's weights, repeated on its rows: (rows, groups)."""
        d = div.unsqueeze(-1)
        err = (fp8_encode(wg / d).float() * d - wg).pow_(2)
        if cw is not None:
            err.mul_(cw)
        return reduce_rows(err.sum(dim=-1), self.strategy, blocks, "sum")

    def empty(self, rows: int, cols: int, device) -> dict[str, torch.Tensor]:
        return {"div": torch.ones(rows, num_groups(cols, self.group_size), device=device)}

    def fit_group(self, params: dict, k: int, w: torch.Tensor, col_weight: torch.Tensor | None) -> None:
        """Fit column group ``k`` (block scheme) to its columns ``w`` (rows, <= 128) as they are now."""
        params["div"][:, k:k + 1] = self.fit(w, col_weight)["div"]

    def round_column(self, x: torch.Tensor, params: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = params["div"][:, k]
        codes = fp8_encode(x / d)
        return codes, codes.float() * d

    def quantize(self, w: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_quantize(w, params["div"], self.group_size)

    def result(self, codes, params, weight, loss, **kw) -> QuantResult:
        return QuantResult(codes, params["div"], None, weight, loss, **kw)


register_kind("int", packed=QuantLinear, grid=IntFormat, act_quant=False)
register_kind("int", packed=W8A8Linear, grid=IntFormat, act_quant=True)      # w8a8-int8: int8 codes, unpacked
register_kind("fp8", packed=W8A8Linear, grid=FP8Format)
register_kind("nvfp4", packed=FP4Linear, grid=FP4Format)
register_kind("mxfp4", packed=FP4Linear, grid=FP4Format)
