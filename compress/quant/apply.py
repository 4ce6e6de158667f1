"""Apply RTN or GPTQ to a model: pick the target linears, solve them through the engine's driver
(layer by layer with calibration data when the config needs it), and swap each for a packed
``QuantLinear`` / ``FP4Linear`` / ``W8A8Linear``. The "rtn" and "gptq" methods are registered at the
bottom."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from ..configs import register_method
from ..engine import LayerMethod, Records, compress_layers, select_linears, write_rows
from ..errors import ConfigError
from ..modeling import get_module, set_module
from ..moe import describe_tokens, expert_of, prepare_experts, set_route_all, token_summary
from ..stats import HessianStats, InputStats
from ..structure import warn_uncompressed
from .config import GPTQConfig, IntWeightConfig, RTNConfig
from .fp4 import nvfp4_global_scale
from .gptq import gptq_solve
from .rtn import QuantResult, rtn_solve, rtn_solve_inplace

log = logging.getLogger(__name__)

# GPTQ keeps the zeros of a layer with at least this fraction of exact zeros (a pruned layer); a
# dense model's occasional zero weights are left to the solve.
MIN_PRUNED_FRACTION = 0.1


@dataclasses.dataclass
class ModuleRecord:
    """What happened to one module: for reports and for tests."""

    name: str
    shape: tuple[int, int]
    loss: float
    damp: float | None
    fallback: str | None
    tokens: int | None = None          # calibration tokens the module's statistics observed


class IntWeightQuantizer(LayerMethod):
    """The engine method of RTNConfig and GPTQConfig.

    Every per-module decision reads that module's resolved config (``cfg.for_module(name)``, which
    applies the pass's ``overrides``)."""

    finalize_each_group = True            # data-free: pack each group at once (engine.LayerMethod)

    def __init__(self, model: nn.Module, cfg: IntWeightConfig):
        self.cfg = cfg
        self.name = cfg.method
        self.gptq = isinstance(cfg, GPTQConfig)           # solve on the Hessian; else round to nearest
        self.records: dict[str, ModuleRecord] = {}
        self._results: dict[str, QuantResult] = {}
        self._input_amax: dict[str, torch.Tensor] = {}      # static activations: max |input| in calibration
        self.module_cfgs: dict[str, IntWeightConfig] = {}   # target name -> its resolved config
        self._warned_split = False
        self.routed: dict[str, int] = {}                     # expert name -> tokens routed to it
        self.targets = self._select_targets(model)

    def _select_targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        def check(name: str, module: nn.Linear) -> bool:
            cfg = self.cfg.for_module(name)
            try:
                cfg.weight_format.check_shape(name, module.in_features)
            except ConfigError as exc:
                pattern = self.cfg.override_for(name)
                if pattern is None:
                    raise
                raise ConfigError(f"overrides[{pattern!r}]: {exc}") from None
            self.module_cfgs[name] = cfg
            return True

        targets = select_linears(model, self.cfg.ignore, verb="quantize", left="unquantized", check=check)
        used = {self.cfg.override_for(name) for name in targets}
        unused = [p for p in self.cfg.overrides if p not in used]
        if unused:
            log.warning("overrides %s apply to no quantized linear (no match, matched only ignored or tied "
                        "modules, or shadowed by an earlier pattern)", unused)
        return targets

    # --- the engine's interface -------------------------------------------------------------
    def prepare_layer(self, layer: nn.Module, prefix: str, inputs) -> None:
        """MoE layers: count the tokens routed to each expert and, if asked, let every expert
        observe every token."""
        self.routed.update(prepare_experts(layer, prefix, inputs, self.gptq and self.cfg.route_all_experts))

    def new_stats(self, module: nn.Linear) -> HessianStats | InputStats:
        # RTN (calibrated only for static activation scales: NVFP4 W4A4, fp8-static, w8a8-int8-static)
        # needs no Hessian.
        stats = HessianStats if self.gptq else InputStats
        return stats(module.in_features, device=module.weight.device)

    def solve(self, names: list[str], modules: list[nn.Linear], stats: HessianStats | None) -> None:
        """Solve the linears that share one input together (their rows stacked), then write the
        dequantized weights back so the rest of the layer computes with them. Linears whose
        resolved configs differ are solved in sub-groups of equal configs with the same statistics
        (rows are independent given H, so this equals solving each alone)."""
        cfgs = [self.module_cfgs[n] for n in names]
        calibrated = stats is not None and stats.tokens > 0
        tokens = stats.tokens if stats is not None else 0
        # An expert the calibration never reached counts as 0 tokens: summed per layer, not warned one by one.
        few = self.gptq and all(expert_of(n) for n in names) and tokens < self.cfg.min_expert_tokens
        if few:
            # Routed too few tokens for a Hessian worth solving on: round to nearest (summed per layer).
            calibrated, stats = False, None
        input_amax = stats.amax if calibrated else None
        for name, cfg in zip(names, cfgs):
            if cfg.weight_format.static_activations and input_amax is None:
                raise ConfigError(f"{name}: scheme {cfg.scheme!r} quantizes activations with a static scale, "
                                  f"which needs the activations' range from calibration data; pass calib= "
                                  f"(CLI: --calib FILE), or use a dynamic scheme (nvfp4a16, fp8, w8a8-int8)")
        if self.gptq and not calibrated and not few:
            log.warning("%s received no calibration input; quantized with round-to-nearest", names[0])
        # A pruned fused group keeps its zeros as a whole, whatever formats its parts get.
        keep_zeros = (self.gptq and self.cfg.keep_sparsity
                      and _zero_fraction([m.weight.detach() for m in modules]) >= MIN_PRUNED_FRACTION)
        parts = _split_by_config(names, modules, cfgs)
        if len(parts) > 1 and not self._warned_split:
            self._warned_split = True
            log.warning("%s read one input but get different formats; compress and transformers load that, "
                        "vLLM does not (it fuses them and requires one scheme per fused layer)", ", ".join(names))
        # NVFP4 rows of one fused group share one global scale (vLLM fuses q/k/v and gate/up into
        # one tensor with one); solved in one part, the part's stacked amax gives it.
        shared_global = {} if len(parts) == 1 else _shared_nvfp4_global_scales(parts)
        blocks = _split_blocks(parts)
        for cfg, part_names, part_modules in blocks:
            self._solve_part(cfg, part_names, part_modules, stats if calibrated else None, keep_zeros,
                             shared_global.get(cfg.scheme), last_reader=len(blocks) == 1)
        for name in names:
            self.records[name].tokens = tokens
            if few:
                self.records[name].fallback = (f"round-to-nearest: observed {tokens} calibration tokens, fewer "
                                               f"than min_expert_tokens={self.cfg.min_expert_tokens}")

    def _solve_part(self, cfg: IntWeightConfig, names: list[str], modules: list[nn.Linear],
                    stats: HessianStats | InputStats | None, keep_zeros: bool,
                    global_scale: torch.Tensor | None, last_reader: bool = False) -> None:
        """``last_reader``: no other part reads ``stats``, so GPTQ may take its Hessian sums in place."""
        dtype = modules[0].weight.dtype
        fmt = cfg.weight_format.solver_grid(dtype, cfg.observer)
        if global_scale is not None:
            fmt.global_scale = global_scale
        if not (stats is not None and self.gptq):
            # Round-to-nearest in row blocks, straight into the modules' weights: no stacked copy and no
            # float32 copy of the whole group (streamed compression of an 8B layer stays near its size).
            results = rtn_solve_inplace([m.weight.data for m in modules], cfg, dtype,
                                        stats.diag if stats is not None else None, fmt=fmt)
            if results is not None:
                for name, module, result in zip(names, modules, results):
                    self._results[name] = result
                    if stats is not None:
                        self._input_amax[name] = stats.amax
                    self.records[name] = ModuleRecord(name, tuple(module.weight.shape), result.loss, None, None)
                return
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)     # (sum of out_features, in)
        if stats is not None and self.gptq:
            hessian = stats.take_hessian() if last_reader and hasattr(stats, "take_hessian") else stats.hessian
            result = gptq_solve(hessian, weight, cfg, scale_dtype=dtype, fmt=fmt,
                                keep=weight != 0 if keep_zeros else None, own_hessian=True)
            del hessian
        else:
            result = rtn_solve(weight, cfg, dtype, stats.diag if stats is not None else None, fmt=fmt)
        if result.fallback:
            log.warning("%s: %s", ", ".join(names), result.fallback)
        for name, module, rows in zip(names, modules, write_rows(modules, result.weight)):
            self._results[name] = result.take_rows(rows).without_weight()     # the weight is in the module now
            if stats is not None:
                self._input_amax[name] = stats.amax
            self.records[name] = ModuleRecord(name, tuple(module.weight.shape), result.loss, result.damp,
                                              result.fallback)

    def solve_state(self, names: list[str]) -> dict:
        """What ``finalize`` needs of the solve of ``names`` besides their weights (data-parallel
        calibration broadcasts it from the rank that solved them)."""
        return {n: (self.records[n], self._results[n], self._input_amax.get(n)) for n in names}

    def load_solve_state(self, state: dict) -> None:
        for name, (record, result, amax) in state.items():
            self.records[name], self._results[name] = record, result
            if amax is not None:
                self._input_amax[name] = amax

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        """Swap the solved linears under ``root`` for packed QuantLinear / FP4Linear / W8A8Linear modules."""
        if set_route_all(root, False):
            self._log_experts(prefix, names)
        for local in names:
            full = f"{prefix}{local}"
            cfg = self.module_cfgs[full]
            result = self._results.pop(full)
            old = get_module(root, local)
            new = cfg.weight_format.pack(result, bias=old.bias, dtype=old.weight.dtype,
                                         input_amax=self._input_amax.pop(full, None), observer=cfg.observer,
                                         actorder=_actorder(cfg))
            new = new.to(old.weight.device)
            set_module(root, local, new)
            # Hold the packed module, not the dense one: the dense weight is freed now, not when the
            # quantizer is (the whole model's float weights otherwise outlive their layers).
            self.targets[full] = new


    def _log_experts(self, prefix: str, names: list[str]) -> None:
        full = [prefix + n for n in names if expert_of(prefix + n)]
        summary = token_summary({n: c for n, c in self.routed.items() if n.startswith(prefix)})
        few = {expert_of(n) for n in full if (self.records[n].fallback or "").startswith("round-to-nearest: observed")}
        if summary:
            log.info("%s: %s%s", prefix.rstrip("."), describe_tokens(summary),
                     f"; {len(few)} expert(s) rounded to nearest (fewer than {self.cfg.min_expert_tokens} tokens)"
                     if few else "")

    def expert_summary(self) -> dict | None:
        """Routed tokens per expert over the whole model (min / median / max / zero) and how many
        experts fell back to round-to-nearest; None for a dense model."""
        summary = token_summary(self.routed)
        if summary is None:
            return None
        fell_back = {expert_of(n) for n, r in self.records.items()
                     if expert_of(n) and (r.fallback or "").startswith("round-to-nearest: observed")}
        return {**summary, "rtn_fallback": len(fell_back)}


def _actorder(cfg: IntWeightConfig) -> str | None:
    """The checkpoint's ``actorder``: GPTQ's act-order uses static groups, so no g_idx."""
    return "static" if getattr(cfg, "act_order", False) else None


def _zero_fraction(weights: list[torch.Tensor]) -> float:
    """The fraction of exact zeros among ``weights`` together (no stacked copy)."""
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def _split_by_config(names: list[str], modules: list[nn.Linear], cfgs: list[IntWeightConfig]
                     ) -> list[tuple[IntWeightConfig, list[str], list[nn.Linear]]]:
    """(config, names, modules) per distinct config, in order of first appearance."""
    parts: list[tuple[IntWeightConfig, list[str], list[nn.Linear]]] = []
    for name, module, cfg in zip(names, modules, cfgs):
        part = next((p for p in parts if p[0] == cfg), None)
        if part is None:
            parts.append((cfg, [name], [module]))
        else:
            part[1].append(name)
            part[2].append(module)
    return parts


def _split_blocks(parts):
    """``parts`` with each fp8-block part split into one part per module: a 128-row weight block must
    not span two modules (q_proj's 576 rows end mid-block), and rows are independent given H, so
    solving them apart with the same statistics gives each module what a solve of its own would."""
    out = []
    for cfg, names, modules in parts:
        if cfg.weight_format.weight_strategy == "block":
            out += [(cfg, [n], [m]) for n, m in zip(names, modules)]
        else:
            out.append((cfg, names, modules))
    return out


def _shared_nvfp4_global_scales(parts) -> dict[str, torch.Tensor]:
    """scheme -> one NVFP4 global scale, for each NVFP4 scheme that several parts of one fused
    group use (e.g. q with observer mse, k/v with minmax): from the amax of all their rows, as a
    single stacked solve would choose it."""
    amax: dict[str, list[torch.Tensor]] = {}
    for cfg, _, modules in parts:
        if cfg.weight_format.kind == "nvfp4":
            amax.setdefault(cfg.scheme, []).extend(m.weight.detach().abs().amax().float() for m in modules)
    counts = {scheme: sum(cfg.scheme == scheme for cfg, _, _ in parts) for scheme in amax}
    return {scheme: nvfp4_global_scale(torch.stack(a).amax()) for scheme, a in amax.items() if counts[scheme] > 1}


def needs_data(cfg: IntWeightConfig) -> bool:
    """GPTQ solves on the Hessian of calibration inputs; RTN needs data only for a static activation
    scale (NVFP4 W4A4, fp8-static, w8a8-int8-static), in its own scheme or a per-layer override."""
    return isinstance(cfg, GPTQConfig) or any(c.weight_format.static_activations for c in cfg.resolved_configs())


def quantize_weights(model: nn.Module, cfg: IntWeightConfig, calib=None, *, device=None,
                     batch_size: int | None = None, progress: bool = True) -> Records:
    """Quantize every target linear of ``model`` in place. GPTQ (and schemes with static activation
    scales: nvfp4, fp8-static, w8a8-int8-static) need ``calib``; otherwise it is ignored."""
    quantizer = IntWeightQuantizer(model, cfg)
    start = time.perf_counter()
    if needs_data(cfg) and calib is None:
        static = [(n, c.scheme) for n, c in quantizer.module_cfgs.items() if c.weight_format.static_activations]
        what = "GPTQ" if isinstance(cfg, GPTQConfig) else \
            (f"scheme {static[0][1]!r} ({'W4A4' if static[0][1] == 'nvfp4' else 'W8A8'}: a static activation "
             f"scale from the activations' range; {len(static)} "
             f"linear(s), e.g. {static[0][0]})" if static else "an override with a static activation scheme")
        raise ConfigError(f"{what} needs calibration data: pass calib=compress.calibration_data(tokenizer, "
                          "TEXT_FILE, samples=..., seqlen=...) (CLI: --calib FILE)")
    compress_layers(model, quantizer, calib if needs_data(cfg) else None, device=device, batch_size=batch_size,
                    progress=progress)
    log.info("%s: %d linears quantized in %.1f s", cfg.method, len(quantizer.records), time.perf_counter() - start)
    warn_uncompressed(model, set(quantizer.records), cfg.ignore, "quantized")
    experts = quantizer.expert_summary()
    if experts:
        log.info("%s: %s; %d expert(s) rounded to nearest", cfg.method, describe_tokens(experts),
                 experts["rtn_fallback"])
    return Records(quantizer.records, {"experts": experts} if experts else None)


register_method(RTNConfig, quantize_weights, area="quantize", needs_data=needs_data, statistics="input")
register_method(GPTQConfig, quantize_weights, area="quantize", statistics="hessian")
