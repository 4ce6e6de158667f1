"""Apply RTN or GPTQ to a model: pick the target linears, solve them (through the calibration
engine when data is needed), and swap each for a packed ``QuantLinear``."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import default_device, run_layerwise
from ..errors import ConfigError
from ..kernels.fp4_linear import BLOCK
from ..modeling import (find_decoder_layers, fused_groups, get_module, name_matches, onloaded, set_module,
                        tied_parameter_names)
from ..stats import HessianStats, InputStats
from .config import GPTQConfig, IntWeightConfig
from .grid import check_group_size
from .fp4 import nvfp4_global_scale
from .formats import make_format
from .fp4_linear import SCHEME_KIND, FP4Linear
from .gptq import gptq_solve
from .linear import QuantLinear
from .rtn import QuantResult, rtn_solve

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


class IntWeightQuantizer:
    """The handler for RTNConfig and GPTQConfig, in the shape the calibration engine expects.

    Every per-module decision reads that module's resolved config (``cfg.for_module(name)``, which
    applies the pass's ``overrides``)."""

    def __init__(self, model: nn.Module, cfg: IntWeightConfig):
        self.cfg = cfg
        self.name = cfg.method
        self.records: dict[str, ModuleRecord] = {}
        self._results: dict[str, QuantResult] = {}
        self._input_amax: dict[str, torch.Tensor] = {}      # W4A4: max |input| seen in calibration
        self.module_cfgs: dict[str, IntWeightConfig] = {}   # target name -> its resolved config
        self._warned_split = False
        self.targets = self._select_targets(model)

    def _select_targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        tied = tied_parameter_names(model)
        targets = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name_matches(name, self.cfg.ignore):
                continue
            if name in tied:
                log.warning("%s shares its weight with another module (tied embeddings); left unquantized", name)
                continue
            cfg = self.cfg.for_module(name)
            try:
                _check_shape(name, module, cfg)
            except ConfigError as exc:
                pattern = self.cfg.override_for(name)
                if pattern is None:
                    raise
                raise ConfigError(f"overrides[{pattern!r}]: {exc}") from None
            targets[name] = module
            self.module_cfgs[name] = cfg
        if not targets:
            raise ConfigError(f"no nn.Linear layer of {type(model).__name__} is left to quantize after "
                              f"ignore={self.cfg.ignore}")
        used = {self.cfg.override_for(name) for name in targets}
        unused = [p for p in self.cfg.overrides if p not in used]
        if unused:
            log.warning("overrides %s apply to no quantized linear (no match, matched only ignored or tied "
                        "modules, or shadowed by an earlier pattern)", unused)
        return targets

    # --- the engine's interface -------------------------------------------------------------
    def is_target(self, name: str, module: nn.Module) -> bool:
        return name in self.targets

    def new_stats(self, module: nn.Linear) -> HessianStats | InputStats:
        # RTN (calibrated only for NVFP4 W4A4's input scale) needs no Hessian.
        stats = HessianStats if isinstance(self.cfg, GPTQConfig) else InputStats
        return stats(module.in_features, device=module.weight.device)

    def solve(self, names: list[str], modules: list[nn.Linear], stats: HessianStats | None) -> None:
        """Solve the linears that share one input together (their rows stacked), then write the
        dequantized weights back so the rest of the layer computes with them. Linears whose
        resolved configs differ are solved in sub-groups of equal configs with the same statistics
        (rows are independent given H, so this equals solving each alone)."""
        cfgs = [self.module_cfgs[n] for n in names]
        calibrated = stats is not None and stats.tokens > 0
        input_amax = stats.amax if calibrated else None
        for name, cfg in zip(names, cfgs):
            if cfg.scheme == "nvfp4" and input_amax is None:
                raise ConfigError(f"{name}: scheme 'nvfp4' (W4A4) needs the activations' range from "
                                  f"calibration data; pass calib= (CLI: --calib FILE)")
        if isinstance(self.cfg, GPTQConfig) and not calibrated:
            log.warning("%s received no calibration input; quantized with round-to-nearest", names[0])
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)
        # A pruned fused group keeps its zeros as a whole, whatever formats its parts get.
        keep_zeros = (isinstance(self.cfg, GPTQConfig) and self.cfg.keep_sparsity
                      and float((weight == 0).float().mean()) >= MIN_PRUNED_FRACTION)
        parts = _split_by_config(names, modules, cfgs)
        if len(parts) > 1 and not self._warned_split:
            self._warned_split = True
            log.warning("%s read one input but get different formats; compress and transformers load that, "
                        "vLLM does not (it fuses them and requires one scheme per fused layer)", ", ".join(names))
        # NVFP4 rows of one fused group share one global scale (vLLM fuses q/k/v and gate/up into
        # one tensor with one); solved in one part, the part's stacked amax gives it.
        shared_global = {} if len(parts) == 1 else _shared_nvfp4_global_scales(parts)
        for cfg, part_names, part_modules in parts:
            self._solve_part(cfg, part_names, part_modules, stats if calibrated else None, keep_zeros,
                             shared_global.get(cfg.scheme))

    def _solve_part(self, cfg: IntWeightConfig, names: list[str], modules: list[nn.Linear],
                    stats: HessianStats | InputStats | None, keep_zeros: bool,
                    global_scale: torch.Tensor | None) -> None:
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)     # (sum of out_features, in)
        dtype = modules[0].weight.dtype
        fmt = make_format(cfg, dtype)
        if global_scale is not None:
            fmt.global_scale = global_scale
        if stats is not None and isinstance(cfg, GPTQConfig):
            result = gptq_solve(stats.hessian, weight, cfg, scale_dtype=dtype, fmt=fmt,
                                keep=weight != 0 if keep_zeros else None)
        else:
            result = rtn_solve(weight, cfg, dtype, stats.diag if stats is not None else None, fmt=fmt)
        if result.fallback:
            log.warning("%s: %s", ", ".join(names), result.fallback)
        row = 0
        for name, module in zip(names, modules):
            rows = slice(row, row + module.out_features)
            row += module.out_features
            part = QuantResult(result.codes[rows], result.scale[rows],
                               None if result.zero_point is None else result.zero_point[rows],
                               result.weight[rows], result.loss, result.damp, result.fallback,
                               result.global_scale)
            module.weight.data.copy_(part.weight.to(dtype))
            self._results[name] = part
            if stats is not None:
                self._input_amax[name] = stats.amax
            self.records[name] = ModuleRecord(name, tuple(module.weight.shape), result.loss, result.damp,
                                              result.fallback)

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        """Swap the solved linears under ``root`` for packed QuantLinear / FP4Linear modules."""
        for local in names:
            full = f"{prefix}{local}"
            cfg = self.module_cfgs[full]
            result = self._results.pop(full)
            old = get_module(root, local)
            if cfg.scheme == "int":
                new = QuantLinear.from_codes(result.codes, result.scale, result.zero_point, bits=cfg.bits,
                                             group_size=cfg.group_size, bias=old.bias,
                                             dtype=old.weight.dtype, actorder=_actorder(cfg),
                                             observer=cfg.observer)
            else:
                amax = self._input_amax.pop(full, None)
                new = FP4Linear.from_codes(result.codes, result.scale, result.global_scale, scheme=cfg.scheme,
                                           bias=old.bias, dtype=old.weight.dtype, observer=cfg.observer,
                                           input_global_scale=None if amax is None else nvfp4_global_scale(amax))
            self._input_amax.pop(full, None)
            set_module(root, local, new.to(old.weight.device))


def _actorder(cfg: IntWeightConfig) -> str | None:
    """The checkpoint's ``actorder``: GPTQ's act-order uses static groups, so no g_idx."""
    return "static" if getattr(cfg, "act_order", False) else None


def _check_shape(name: str, module: nn.Linear, cfg: IntWeightConfig) -> None:
    """Refuse a format the layer's in_features cannot hold, before any work."""
    if cfg.scheme == "int":
        check_group_size(name, module.in_features, cfg.group_size, cfg.partial_groups)
        return
    block = BLOCK[SCHEME_KIND[cfg.scheme]]
    if module.in_features % block:
        raise ConfigError(f"{cfg.scheme} stores blocks of {block} inputs, but in_features "
                          f"{module.in_features} of {name} is not a multiple of {block}; add "
                          f"{name!r} to ignore (it stays in full precision)")


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


def _shared_nvfp4_global_scales(parts) -> dict[str, torch.Tensor]:
    """scheme -> one NVFP4 global scale, for each NVFP4 scheme that several parts of one fused
    group use (e.g. q with observer mse, k/v with minmax): from the amax of all their rows, as a
    single stacked solve would choose it."""
    amax: dict[str, list[torch.Tensor]] = {}
    for cfg, _, modules in parts:
        if SCHEME_KIND.get(cfg.scheme) == "nvfp4":
            amax.setdefault(cfg.scheme, []).extend(m.weight.detach().abs().amax().float() for m in modules)
    counts = {scheme: sum(cfg.scheme == scheme for cfg, _, _ in parts) for scheme in amax}
    return {scheme: nvfp4_global_scale(torch.stack(a).amax()) for scheme, a in amax.items() if counts[scheme] > 1}


def quantize_weights(model: nn.Module, cfg: IntWeightConfig, calib=None, *, device=None,
                     batch_size: int | None = None, progress: bool = True) -> dict[str, ModuleRecord]:
    """Quantize every target linear of ``model`` in place. GPTQ needs ``calib``; RTN ignores it."""
    quantizer = IntWeightQuantizer(model, cfg)
    start = time.perf_counter()
    layers_name, layers = find_decoder_layers(model)
    outside = [n for n in quantizer.targets if not n.startswith(layers_name + ".")]
    w4a4 = [n for n, c in quantizer.module_cfgs.items() if c.scheme == "nvfp4"]
    if isinstance(cfg, GPTQConfig) or w4a4:
        if calib is None:
            what = "GPTQ" if isinstance(cfg, GPTQConfig) else \
                f"scheme 'nvfp4' (W4A4: the activations' range; {len(w4a4)} linear(s), e.g. {w4a4[0]})"
            raise ConfigError(f"{what} needs calibration data: pass calib=compress.calibration_data(tokenizer, "
                              "TEXT_FILE, samples=..., seqlen=...) (CLI: --calib FILE)")
        run_layerwise(model, calib, quantizer, device=device, batch_size=batch_size, progress=progress)
    else:
        device = torch.device(device) if device is not None else default_device()
        for i, layer in enumerate(tqdm(layers, desc=f"{cfg.method} layers", unit="layer", disable=not progress)):
            prefix = f"{layers_name}.{i}."
            names = [n for n, _ in layer.named_modules() if prefix + n in quantizer.targets]
            with onloaded(layer, device):
                # q/k/v and gate/up are solved stacked, so they share a per-tensor (NVFP4) scale.
                for group in fused_groups(names):
                    quantizer.solve([prefix + n for n in group], [layer.get_submodule(n) for n in group], None)
                quantizer.finalize(layer, prefix, names)
    for name in outside:                      # e.g. lm_head when not ignored: no layer inputs captured
        if isinstance(cfg, GPTQConfig):
            log.warning("%s lies outside the decoder layers; quantized with round-to-nearest", name)
        with onloaded(get_module(model, name), default_device() if device is None else torch.device(device)):
            quantizer.solve([name], [get_module(model, name)], None)
            quantizer.finalize(model, "", [name])
    log.info("%s: %d linears quantized in %.1f s", cfg.method, len(quantizer.records), time.perf_counter() - start)
    return quantizer.records
