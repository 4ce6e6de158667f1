"""Configs of the smoothing methods: SmoothQuant and AWQ.

Both are recipe passes that run *before* a quantization pass (``smoothquant -> gptq(w8a8-int8)``,
``awq -> gptq(int4)``, ``awq -> rtn``): they leave every linear a float ``nn.Linear`` whose weight
columns were multiplied by a per-input-channel scale ``s`` and divide the same ``s`` out of the
module that produces those inputs (a norm, or the rows of a linear), so the float model computes
what it computed before while the quantizer that follows sees easier weights and activations.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configs import MethodConfig
from ..errors import ConfigError

# SmoothQuant's measured default on SmolLM2-135M (docs/smoothing.md, "Choosing alpha").
DEFAULT_ALPHA = 0.8
# The alphas SmoothQuant's per-layer search tries when ``alpha`` is null.
DEFAULT_ALPHAS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclasses.dataclass
class SmoothingConfig(MethodConfig):
    """What both smoothing methods share.

    max_tokens: calibration tokens each decoder layer's searches look at: whole calibration windows,
                evenly spaced over the set, until this many tokens (4096 = 8 windows of 512). The
                searches cost (tokens x weights) per candidate scale; the statistics of outlier
                channels are systematic, so a few windows find them (SmolLM2: see docs/smoothing.md).
    ignore:     module-name patterns (as in RTN/GPTQ ``ignore``): a scale whose consumers include a
                matching module is not applied (that group is left as it is).
    """

    max_tokens: int = 4096
    ignore: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


@dataclasses.dataclass
class SmoothQuantConfig(SmoothingConfig):
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

    Per input channel j of the linears one norm feeds, s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
    (max over the calibration tokens, and over every consumer's column j).

    alpha:          the migration strength, in [0, 1]: 0 leaves activations alone, 1 moves all of
                    their range into the weights. null: searched per layer and mapping among
                    ``alphas``, on the consumers' output error in ``scheme`` (costs about one
                    layer forward per alpha on ``max_tokens`` tokens).
    alphas:         the candidates of that search.
    scheme:         the W8A8 format whose error the search (and the records' losses) measure:
                    "w8a8-int8" (int8 weights per output channel, int8 activations per token) or
                    "fp8" (FP8 E4M3 the same way). Use the scheme of the quantization pass that follows.
    smooth_linears: also smooth o_proj (folded into v_proj's rows) and down_proj (folded into
                    up_proj's rows); the paper smooths only the linears a norm feeds (q/k/v, gate/up).
    """

    method = "smoothquant"
    alpha: float | None = DEFAULT_ALPHA
    alphas: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_ALPHAS))
    scheme: Literal["w8a8-int8", "fp8"] = "w8a8-int8"
    smooth_linears: bool = False

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (or null to search), got {self.alpha}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigError(f"alphas must be a non-empty list of values in [0, 1], got {self.alphas}")


@dataclasses.dataclass
class AWQConfig(SmoothingConfig):
    """AWQ (Lin et al., 2024): activation-aware scales searched for the weight format that follows.

    For each group of linears that read one input, s = mean|X|^a / mean|W~|^(1-a) (W~: each
    weight divided by its group's max, as AWQ does), normalised to geometric mean 1, for
    ``grid`` values of a in [0, 1), and s = 1; the candidate with the lowest output error of the
    consumers, weights rounded to ``bits``/``group_size``/``symmetric`` (activations in float), is
    folded in. Then each linear but q/k gets AWQ's clipping: per weight group, the max |w| shrunk
    by the factor (1, 0.95, ..., 1 - max_shrink) that minimises that group's output error.

    bits, group_size, symmetric: the integer weight format of the quantization pass that follows
                    (its grid rounds the candidates). null group_size: one scale per output channel.
    grid:           how many values of a are tried (a = i / grid).
    clip:           run the clipping search.
    clip_grid:      shrink step = 1 / clip_grid.
    max_shrink:     the largest fraction of the range clipping may remove (AWQ: 0.5).
    """

    method = "awq"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5

    def validate(self) -> None:
        super().validate()
        if isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"group_size must be a positive integer or null (per channel), got {self.group_size}")
        if self.grid < 1 or self.clip_grid < 1:
            raise ConfigError(f"grid and clip_grid must be >= 1, got {self.grid} and {self.clip_grid}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


__all__ = ["SmoothingConfig", "SmoothQuantConfig", "AWQConfig", "DEFAULT_ALPHA", "DEFAULT_ALPHAS"]
