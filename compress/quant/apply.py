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
    """The handler for RTNConfig and GPTQConfig, in the shape the calibration engine expects."""

    def __init__(self, model: nn.Module, cfg: IntWeightConfig):
        self.cfg = cfg
        self.name = cfg.method
        self.records: dict[str, ModuleRecord] = {}
        self._results: dict[str, QuantResult] = {}
        self._input_amax: dict[str, torch.Tensor] = {}      # W4A4: max |input| seen in calibration
        self.targets = self._select_targets(model)
        self._actorder = "static" if getattr(cfg, "act_order", False) else None

    def _select_targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        tied = tied_parameter_names(model)
        targets = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name_matches(name, self.cfg.ignore):
                continue
            if name in tied:
                log.warning("%s shares its weight with another module (tied embeddings); left unquantized", name)
                continue
            if self.cfg.scheme == "int":
                check_group_size(name, module.in_features, self.cfg.group_size, self.cfg.partial_groups)
            else:
                block = BLOCK[SCHEME_KIND[self.cfg.scheme]]
                if module.in_features % block:
                    raise ConfigError(f"{self.cfg.scheme} stores blocks of {block} inputs, but in_features "
                                      f"{module.in_features} of {name} is not a multiple of {block}; add "
                                      f"{name!r} to ignore (it stays in full precision)")
            targets[name] = module
        if not targets:
            raise ConfigError(f"no nn.Linear layer of {type(model).__name__} is left to quantize after "
                              f"ignore={self.cfg.ignore}")
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
        dequantized weights back so the rest of the layer computes with them."""
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)
        dtype = modules[0].weight.dtype
        input_amax = stats.amax if stats is not None and stats.tokens > 0 else None
        if self.cfg.scheme == "nvfp4" and input_amax is None:
            raise ConfigError(f"{names[0]}: scheme 'nvfp4' (W4A4) needs the activations' range from "
                              f"calibration data; pass calib= (CLI: --calib FILE)")
        if stats is not None and stats.tokens > 0 and isinstance(self.cfg, GPTQConfig):
            keep = weight != 0
            sparse = self.cfg.keep_sparsity and float((~keep).float().mean()) >= MIN_PRUNED_FRACTION
            result = gptq_solve(stats.hessian, weight, self.cfg, scale_dtype=dtype, keep=keep if sparse else None)
        else:
            if isinstance(self.cfg, GPTQConfig):
                log.warning("%s received no calibration input; quantized with round-to-nearest", names[0])
            col_weight = stats.diag if stats is not None and stats.tokens > 0 else None
            result = rtn_solve(weight, self.cfg, dtype, col_weight)
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
            if input_amax is not None:
                self._input_amax[name] = input_amax
            self.records[name] = ModuleRecord(name, tuple(module.weight.shape), result.loss, result.damp,
                                              result.fallback)

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        """Swap the solved linears under ``root`` for packed QuantLinear modules."""
        for local in names:
            full = f"{prefix}{local}"
            result = self._results.pop(full)
            old = get_module(root, local)
            if self.cfg.scheme == "int":
                new = QuantLinear.from_codes(result.codes, result.scale, result.zero_point, bits=self.cfg.bits,
                                             group_size=self.cfg.group_size, bias=old.bias,
                                             dtype=old.weight.dtype, actorder=self._actorder,
                                             observer=self.cfg.observer)
            else:
                amax = self._input_amax.pop(full, None)
                new = FP4Linear.from_codes(result.codes, result.scale, result.global_scale, scheme=self.cfg.scheme,
                                           bias=old.bias, dtype=old.weight.dtype, observer=self.cfg.observer,
                                           input_global_scale=None if amax is None else nvfp4_global_scale(amax))
            set_module(root, local, new.to(old.weight.device))


def quantize_weights(model: nn.Module, cfg: IntWeightConfig, calib=None, *, device=None,
                     batch_size: int | None = None, progress: bool = True) -> dict[str, ModuleRecord]:
    """Quantize every target linear of ``model`` in place. GPTQ needs ``calib``; RTN ignores it."""
    quantizer = IntWeightQuantizer(model, cfg)
    start = time.perf_counter()
    layers_name, layers = find_decoder_layers(model)
    outside = [n for n in quantizer.targets if not n.startswith(layers_name + ".")]
    if isinstance(cfg, GPTQConfig) or cfg.scheme == "nvfp4":
        if calib is None:
            what = "GPTQ" if isinstance(cfg, GPTQConfig) else "scheme 'nvfp4' (W4A4: the activations' range)"
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
