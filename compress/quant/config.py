"""Configs of the weight-quantization methods (round-to-nearest and GPTQ): integer, FP4 and W8A8
(FP8 / INT8 weights and activations) schemes."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from ..configs import MethodConfig, check_type
from ..errors import ConfigError
from ..formats import INT4_ACT_SCHEMES, WeightFormat
from ..modeling import name_matches

# What an override may set: the weight format of the modules it matches. Everything else (ignore,
# act_order, damp, ...) belongs to the whole pass.
OVERRIDE_KEYS = ("bits", "group_size", "symmetric", "observer", "scheme", "partial_groups")
# The default group_size. A 4-bit float scheme fixes its own block, so this default (the field left
# alone), null or the block itself are the values group_size may have there.
DEFAULT_GROUP_SIZE = 128


@dataclasses.dataclass
class IntWeightConfig(MethodConfig):
    """What every integer weight quantizer shares: the grid and which layers it touches.

    bits:           2..8 bits per weight.
    group_size:     columns (input features) that share one scale; None = one scale per output
                    channel. A group size that does not divide a layer's in_features is an error
                    unless ``partial_groups`` is set (see below).
    symmetric:      codes in [-2^(b-1), 2^(b-1)-1], no zero point; else codes in [0, 2^b-1]
                    with a per-group integer zero point.
    observer:       how each group's scale is chosen: "minmax" (cover the range) or "mse"
                    (search shrunk ranges for the lowest squared error, weighted by the input
                    second moments when calibration statistics are available).
    partial_groups: let the last group of a row be narrower than group_size when group_size does
                    not divide in_features (SmolLM2's 576 with 128 gives 4 full groups + one of
                    64). Our runtime and kernels load such checkpoints; compressed-tensors 0.20 and
                    therefore transformers refuse them, so this is opt-in.
    ignore:         module-name patterns left in full precision: a glob matched against the full
                    name or any dotted suffix ("lm_head", "mlp.down_proj", "*.layers.0.*"), or
                    "re:<regex>" searched in the full name.
    scheme:         the weight format: "int" (the integer grid above), or a 4-bit float format
                    whose block size and scales are fixed by the format ("group_size",
                    "symmetric" and "partial_groups" do not apply; a group_size other than the
                    default, null or the format's block is refused, not ignored):
                    "nvfp4a16" (E2M1 weights, an FP8 E4M3 scale per 16 inputs, a float32 global
                    scale per tensor; activations stay 16-bit), "nvfp4" (the same weights plus
                    activations rounded to NVFP4 per 16-block at run time over a static global
                    scale from calibration: W4A4; needs calibration data even with rtn), or
                    "mxfp4" (E2M1 weights, an E8M0 power-of-two scale per 32 inputs).
                    With observer "mse" the FP4 block scales are searched too.
                    W8A8 schemes (8-bit weights *and* activations, run natively by FP8 / INT8 tensor
                    cores; "bits" is 8 or left at its default, "group_size" is left alone, null,
                    or 128 for fp8-block):
                    "fp8" (FP8 E4M3 weights, a scale per output channel; FP8 activations with a
                    dynamic scale per token: llm-compressor's FP8_DYNAMIC), "fp8-block" (a weight
                    scale per 128x128 block, activations per 1x128 group: FP8_BLOCK; a narrower
                    last block is allowed, vLLM wants in_features divisible by 128),
                    "fp8-static" (one weight scale per tensor, shared by the fused q/k/v or
                    gate/up rows; one static activation scale per tensor from calibration),
                    "w8a8-int8" (INT8 symmetric weights per channel, INT8 activations dynamic per
                    token: W8A8) and "w8a8-int8-static" (activations static per tensor). The
                    static schemes need calibration data even with rtn; the dynamic ones with
                    rtn are data-free. GPTQ solves on their 8-bit grids.
                    W4A8 schemes (int4 symmetric weights with "group_size" as for "int", activations
                    rounded to 8 bits with a dynamic scale per token; "bits" must stay 4):
                    "w4a8-int8" (INT8 activations: compressed-tensors' W4A8, QServe's W4A8 without
                    its progressive step) and "w4a8-fp8" (FP8 E4M3 activations: W4AFP8, served by
                    vLLM on Hopper with group_size 128). The weights are solved exactly as int4;
                    only the run-time activation rounding differs. Data-free with rtn.
                    "w4a4-int4" (W4A4 int4, QuaRot's format: the same int4 weights, use group_size
                    null for QuaRot's per-channel scales; activations rounded to INT4 symmetric
                    per token, scale max|x| / 7: compressed-tensors' W4A4 preset). Run it after a
                    rotation pass (RotationConfig): on SmolLM2-135M GPTQ W4A4 gives perplexity 6913
                    without one and 51.5 with it, float 25.6 (docs/w8a8.md, "W4A4 int4").
    overrides:      per-module formats: {pattern: {field: value}}, patterns as in ``ignore``, fields
                    among bits, group_size, symmetric, observer, scheme, partial_groups. The first
                    pattern (in mapping order) that matches a module gives its format: this config
                    with those fields replaced (``for_module``). ``ignore`` wins over overrides. An
                    override to a 4-bit float scheme implies bits 4 and symmetric unless it says
                    otherwise; an override to a W8A8 scheme implies bits 8. Example: {"model.layers.0.mlp.down_proj": {"bits": 8,
                    "group_size": None}, "re:self_attn\\.(q|k|v)_proj": {"scheme": "nvfp4a16"}}.
    """

    bits: int = 4
    group_size: int | None = DEFAULT_GROUP_SIZE
    symmetric: bool = True
    observer: Literal["minmax", "mse"] = "minmax"
    partial_groups: bool = False
    ignore: list[str] = dataclasses.field(default_factory=lambda: ["lm_head"])
    scheme: Literal["int", "nvfp4a16", "nvfp4", "mxfp4", "fp8", "fp8-block", "fp8-static", "w8a8-int8",
                    "w8a8-int8-static", "w4a8-int8", "w4a8-fp8", "w4a4-int4"] = "int"
    overrides: dict[str, dict] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        fmt = WeightFormat.from_config(self)            # ConfigError naming the field that makes no format
        if fmt.w8a8 and self.group_size not in (None, DEFAULT_GROUP_SIZE, fmt.group_size):
            layout = ("128x128 blocks" if fmt.weight_strategy == "block" else
                      f"one scale per {'tensor' if fmt.weight_strategy == 'tensor' else 'output channel'}")
            raise ConfigError(f"scheme {self.scheme!r} stores its weights with {layout}; group_size "
                              f"{self.group_size} does not apply to it: drop group_size, or use scheme 'int' "
                              f"for integer groups of {self.group_size} (weight-only)")
        if self.scheme != "int" and self.group_size not in (None, DEFAULT_GROUP_SIZE, fmt.group_size):
            raise ConfigError(f"scheme {self.scheme!r} stores fixed blocks of {fmt.group_size} inputs; group_size "
                              f"{self.group_size} does not apply to it: drop group_size (or set it to "
                              f"{fmt.group_size}), or use scheme 'int' for integer groups of {self.group_size}")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides must be a mapping {{pattern: {{field: value}}}}, got {self.overrides!r}")
        for pattern, override in self.overrides.items():
            self._resolve(pattern, override)            # every override must give a valid config

    @property
    def weight_format(self) -> WeightFormat:
        """The format this config's fields name (``scheme``, ``bits``, ``group_size``, ``symmetric``,
        ``partial_groups``); ``for_module(name).weight_format`` is a module's."""
        return WeightFormat.from_config(self)

    def override_for(self, name: str) -> str | None:
        """The pattern of the first override matching module ``name``, or None."""
        return next((p for p in self.overrides if name_matches(name, [p])), None)

    def for_module(self, name: str) -> IntWeightConfig:
        """The config module ``name`` is quantized with: the first matching override applied to this
        config (its ``overrides`` emptied), or this config itself when none matches."""
        pattern = self.override_for(name)
        return self if pattern is None else self._resolve(pattern, self.overrides[pattern])

    def resolved_configs(self) -> list[IntWeightConfig]:
        """This config and every override's resolved config (e.g. to ask whether any needs data)."""
        return [self] + [self._resolve(p, o) for p, o in self.overrides.items()]

    def _resolve(self, pattern: Any, override: Any) -> IntWeightConfig:
        where = f"overrides[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}: a pattern is a non-empty module-name glob or 're:<regex>'")
        if not isinstance(override, dict):
            raise ConfigError(f"{where} must be a mapping of format fields ({', '.join(OVERRIDE_KEYS)}), "
                              f"got {override!r}")
        for key in override:
            if key not in OVERRIDE_KEYS:
                raise ConfigError(f"{where}: {key!r} cannot be set per module; an override sets only "
                                  f"{', '.join(OVERRIDE_KEYS)} ({key!r} applies to the whole pass)")
        hints = typing.get_type_hints(type(self))
        values = {k: check_type(v, hints[k], f"{where}: field {k!r}") for k, v in override.items()}
        if values.get("scheme", "int") != "int":
            # The FP4, W8A8, W4A8 and W4A4 formats fix these; do not make every override repeat them.
            values.setdefault("bits", WeightFormat.from_scheme(values["scheme"]).bits)
            values.setdefault("symmetric", True)
            if values["scheme"] not in INT4_ACT_SCHEMES:     # W4A8/W4A4 take the pass's group_size, like int
                values.setdefault("group_size", WeightFormat.from_scheme(values["scheme"]).group_size)
        try:
            return dataclasses.replace(self, **values, overrides={})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclasses.dataclass
class RTNConfig(IntWeightConfig):
    """Round-to-nearest: each weight rounded onto its group's grid, no calibration data."""

    method = "rtn"


@dataclasses.dataclass
class GPTQConfig(IntWeightConfig):
    """GPTQ (Frantar et al., 2022): quantize one input column at a time and push the error onto
    the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

    act_order:        quantize columns in order of decreasing Hessian diagonal. Groups stay the
                      natural contiguous column ranges ("static" groups: scales are fixed from the
                      weights before the solve), so no g_idx is needed at run time.
    damp:             fraction of the mean Hessian diagonal added to the diagonal. Escalated
                      tenfold (up to 4 times) when the Cholesky factorisation fails; if it still
                      fails that layer falls back to round-to-nearest with a warning.
    gptq_block_size:  columns per lazy-update block (a speed knob; rounded up to a multiple of
                      group_size).
    keep_sparsity:    in a layer whose weight is at least 10% exact zeros (a pruned model), those
                      weights stay exactly zero: they take the code of 0 and the solve compensates
                      for them like for any rounding error (a 2:4 model stays 2:4). False: zeros
                      are weights like any other and the error feedback fills them in.
    route_all_experts: mixture-of-experts models: every expert observes every calibration token
                      (its Hessian is built from all of them) while the layer's output still uses
                      the real routing. Off: an expert's Hessian comes from the tokens routed to it.
    min_expert_tokens: an expert whose linears observed fewer tokens than this is rounded to
                      nearest instead (a Hessian of a few tokens fits those tokens, not the expert);
                      logged, counted in the records. 0 = never.
    """

    method = "gptq"
    observer: Literal["minmax", "mse"] = "mse"
    act_order: bool = True
    damp: float = 0.01
    gptq_block_size: int = 128
    keep_sparsity: bool = True
    route_all_experts: bool = False
    min_expert_tokens: int = 64

    def validate(self) -> None:
        super().validate()
        if self.min_expert_tokens < 0:
            raise ConfigError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens}")
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp must be in (0, 1), got {self.damp}")
        if self.gptq_block_size <= 0:
            raise ConfigError(f"gptq_block_size must be positive, got {self.gptq_block_size}")
