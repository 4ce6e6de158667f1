"""Configs of the one-shot pruning methods: magnitude, Wanda and SparseGPT.

All three zero individual weights of the decoder linears, either a fraction of each row or layer
(unstructured) or N of every M consecutive inputs of a row (N:M, e.g. NVIDIA's 2:4). They differ in
the score that decides which weights go, and SparseGPT also updates the survivors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from ..configs import MethodConfig
from ..errors import ConfigError
from ..formats import WeightFormat

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4): keep 2 of every 4 consecutive inputs of a row. None -> None (unstructured)."""
    if pattern is None:
        return None
    match = _PATTERN.match(str(pattern))
    if not match:
        raise ConfigError(f"pattern must be 'N:M' (keep N of every M consecutive inputs, e.g. '2:4'), "
                          f"got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


@dataclasses.dataclass
class PruneConfig(MethodConfig):
    """What every one-shot pruning method shares: how many weights go, and where.

    sparsity:       fraction of each target linear's weights set to zero, in (0, 1); default 0.5.
                    With a pattern it is implied (1 - N/M) and may be left out.
    pattern:        "N:M" keeps N of every M consecutive input weights of each row ("2:4" is the
                    pattern sparse tensor cores run; "4:8", "1:4", ... work the same way), or null
                    for unstructured sparsity. in_features must be a multiple of M.
    comparison:     unstructured only: weights compete within their output row ("row", uniform
                    sparsity per row, what Wanda prescribes) or across the whole layer ("layer").
    layer_sparsity: per-module overrides, {name pattern: sparsity}; the first pattern that
                    matches a module wins (patterns as in ``ignore``); 0 leaves that module dense.
                    Not with an N:M pattern (the pattern fixes the sparsity).
    ignore:         module-name patterns left dense: a glob against the full name or any dotted
                    suffix ("lm_head", "mlp.down_proj", "*.layers.0.*"), or "re:<regex>".
    route_all_experts: mixture-of-experts models, Wanda and SparseGPT: every expert observes every
                    calibration token; the layer's output still uses the real routing.
    min_expert_tokens: Wanda and SparseGPT: an expert that observed fewer tokens is pruned by
                    magnitude instead (logged, recorded as its fallback). 0 = never.
    """

    sparsity: float | None = None
    pattern: str | None = None
    comparison: Literal["row", "layer"] = "row"
    layer_sparsity: dict = dataclasses.field(default_factory=dict)
    ignore: list[str] = dataclasses.field(default_factory=lambda: ["lm_head"])
    route_all_experts: bool = False
    min_expert_tokens: int = 64

    def validate(self) -> None:
        if self.min_expert_tokens < 0:
            raise ConfigError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(f"pattern {self.pattern!r} means sparsity {implied:g}; drop sparsity "
                                  f"{self.sparsity:g} or the pattern")
            if self.layer_sparsity:
                raise ConfigError("layer_sparsity does not combine with an N:M pattern; use ignore to leave "
                                  "modules dense")
        elif self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not isinstance(self.layer_sparsity, dict):
            raise ConfigError(f"layer_sparsity must map module-name patterns to sparsities, got "
                              f"{self.layer_sparsity!r}")
        for key, value in self.layer_sparsity.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < 1:
                raise ConfigError(f"layer_sparsity[{key!r}] must be a sparsity in [0, 1), got {value!r}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity

    def describe(self) -> str:
        what = self.pattern.replace(" ", "") if self.pattern else f"{100 * self.target_sparsity:g}%"
        return what + ("" if self.pattern or self.comparison == "row" else " per layer")


@dataclasses.dataclass
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: zero the weights of smallest |W|. Needs no calibration data; the
    baseline every data-aware method must beat."""

    method = "magnitude"


@dataclasses.dataclass
class WandaConfig(PruneConfig):
    """Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, the weight times the L2 norm of its
    input feature over the calibration tokens, compared within each output row; no weight update.
    Layers are calibrated in order, so each sees the inputs its pruned predecessors produce."""

    method = "wanda"


@dataclasses.dataclass
class SparseGPTConfig(PruneConfig):
    """SparseGPT (Frantar & Alistarh, 2023): prune one column block at a time by the OBS saliency
    w^2 / [H^-1]_jj^2 and push each pruned weight's error onto the columns not yet visited, as
    GPTQ does for rounding (same Hessian, same damping and Cholesky machinery).

    damp:                  fraction of the mean Hessian diagonal added to the diagonal (escalated
                           tenfold on Cholesky failure, as in GPTQ).
    sparsegpt_block_size:  columns whose mask is chosen together (unstructured) and the lazy-update
                           block; with comparison "row" every row loses the same fraction of
                           each block, with "layer" the block's weights compete across rows.
    bits:                  prune and quantize in one solve: the survivors are rounded onto a
                           symmetric integer grid of this width (2-8), the zeros stay exact zeros,
                           and the layer becomes a packed QuantLinear (null: stay float).
    group_size, observer, partial_groups: the integer grid, as in GPTQConfig.
    """

    method = "sparsegpt"
    damp: float = 0.01
    sparsegpt_block_size: int = 128
    bits: int | None = None
    group_size: int | None = 128
    observer: Literal["minmax", "mse"] = "minmax"
    partial_groups: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp must be in (0, 1), got {self.damp}")
        if self.sparsegpt_block_size <= 0:
            raise ConfigError(f"sparsegpt_block_size must be positive, got {self.sparsegpt_block_size}")
        nm = self.nm
        if nm is not None and self.sparsegpt_block_size % nm[1]:
            raise ConfigError(f"sparsegpt_block_size {self.sparsegpt_block_size} must be a multiple of the "
                              f"pattern's M={nm[1]}")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be between 2 and 8 (or null: no quantization), got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"group_size must be positive or null (per channel), got {self.group_size}")

    @property
    def weight_format(self) -> WeightFormat | None:
        """The symmetric integer format the survivors are quantized to (None: they stay float)."""
        if self.bits is None:
            return None
        return WeightFormat.from_scheme("int", self.bits, self.group_size, True, self.partial_groups)

    def describe(self) -> str:
        quant = "" if self.bits is None else \
            f" w{self.bits}{'ch' if self.group_size is None else f'g{self.group_size}'}"
        return super().describe() + quant
