"""The smoothing passes: SmoothQuant and AWQ as one engine method.

For each decoder layer, before anything else looks at it (the engine's ``prepare_layer``):

1. resolve the family's mappings (``mappings.py``) in the layer; trace one calibration sample to
   find which candidate linears read each norm's output (refusing a reader the table does not list);
2. observe the inputs of every linear of the layer on a subsample of the calibration windows
   (``max_tokens``), all from the layer as it is (AWQ's order);
3. per mapping, in execution order (input norm -> q/k/v, v -> o, post-attention norm -> gate/up,
   up -> down): choose s (SmoothQuant: the alpha rule, fixed or searched; AWQ: the grid search),
   fold it (``fold.py``) and divide the consumers' observed inputs by it;
4. check on the traced sample that the layer's float output did not change (beyond rounding), else
   restore the layer and refuse;
5. AWQ only: the clipping search on every quantized linear but q/k (fused q/k/v included), on its
   scaled inputs.

The method has no quantization targets: the engine then only runs the transformed layer to make
the next layer's inputs. The quantization pass that follows (rtn, gptq) sees the smoothed weights.
Registered as "smoothquant" and "awq" (area "quantize", calibration data required).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..configs import register_method
from ..engine import LayerInputs, LayerMethod, Records, compress_layers
from ..errors import ConfigError
from ..modeling import find_decoder_layers, name_matches
from ..moe import router_names
from . import awq, smoothquant
from .config import AWQConfig, SmoothingConfig, SmoothQuantConfig
from .fold import fold, norm_offset, per_row
from .mappings import LayerMapping, choose_consumers, expert_block, family_of, norm_readers, resolve

log = logging.getLogger(__name__)

# Largest change of a layer's float output (relative to its max |output|) a fold may cause, by the
# dtype of the weights (rounding the rescaled weights); beyond it the fold is wrong and refused.
FOLD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
FOLD_TOLERANCE_16BIT = 5e-2
# Linears AWQ does not clip (their outputs meet in the attention scores; AWQ skips them).
NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "c_attn", "query_key_value", "q_a_proj", "q_b_proj",
           "kv_a_proj_with_mqa", "kv_b_proj")


def _select(chunk, idx: torch.Tensor):
    """The samples ``idx`` of an engine chunk (tensors whose leading dim is the batch)."""
    hidden, args, kwargs = chunk
    batch = hidden.shape[0]

    def cut(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return x.index_select(0, idx.to(x.device))
        if isinstance(x, tuple):
            return tuple(cut(v) for v in x)
        return x

    return cut(hidden), tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def subsample(chunks: list, max_tokens: int) -> list:
    """Whole calibration windows, evenly spaced over all chunks, until ``max_tokens`` tokens."""
    sizes = [c[0].shape[0] for c in chunks]
    seqlen = chunks[0][0].shape[1] if chunks[0][0].dim() > 2 else 1
    want = max(1, min(sum(sizes), math.ceil(max_tokens / seqlen)))
    picks = sorted(set(torch.linspace(0, sum(sizes) - 1, want).round().long().tolist()))
    out, start = [], 0
    for chunk, size in zip(chunks, sizes):
        idx = [i - start for i in picks if start <= i < start + size]
        if idx:
            out.append(chunk if len(idx) == size else _select(chunk, torch.tensor(idx)))
        start += size
    return out


class _Inputs:
    """A linear's observed inputs: the rows of every chunk, float32, (t, in) once ``x`` is read."""

    def __init__(self, module: nn.Module):
        self.parts: list[torch.Tensor] = []
        self.in_features = module.weight.shape[1]

    def add(self, x: torch.Tensor) -> None:
        self.parts.append(x.detach().reshape(-1, self.in_features).float())

    @property
    def x(self) -> torch.Tensor:
        if len(self.parts) != 1:
            self.parts = [torch.cat(self.parts)] if self.parts else [torch.zeros(0, self.in_features)]
        return self.parts[0]


class Smoother(LayerMethod):
    """The engine method of SmoothQuantConfig and AWQConfig (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: SmoothingConfig):
        self.cfg, self.name = cfg, cfg.method
        self.targets: dict[str, nn.Module] = {}            # nothing is quantized here
        self.config = model.config
        self.model_type, self.family = family_of(model, cfg.method)
        self.routers = set(router_names(model))
        self.records: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self._check_something_to_smooth(model)

    # --- which mappings ---------------------------------------------------------------------
    def _wanted(self, mapping: LayerMapping, prefix: str) -> bool:
        if isinstance(self.cfg, SmoothQuantConfig) and mapping.kind == "linear" and not self.cfg.smooth_linears:
            return False
        return not any(name_matches(prefix + c, self.cfg.ignore) for c in mapping.consumers)

    def _check_something_to_smooth(self, model: nn.Module) -> None:
        """Refuse, before any layer changes, a model the table gives nothing to smooth."""
        layers_name, layers = find_decoder_layers(model)
        found = [m for i, layer in enumerate(layers) for m in resolve(layer, self.family, self.config)[0]
                 if self._wanted(m, f"{layers_name}.{i}.")]
        if not found:
            why = self.family.not_folded or "no mapping of the family's table matches its layers"
            hint = ("; set smooth_linears: true to smooth o_proj/down_proj through v_proj/up_proj"
                    if isinstance(self.cfg, SmoothQuantConfig) and not self.cfg.smooth_linears else "")
            raise ConfigError(f"{self.name}: nothing to smooth in model type {self.model_type!r}: {why}{hint}")

    def _quantized(self, full: str, module: nn.Module) -> bool:
        """Consumers the quantization pass will round (routers only take the fold)."""
        return isinstance(module, nn.Linear) and full not in self.routers

    # --- the engine's interface -------------------------------------------------------------
    def prepare_layer(self, layer: nn.Module, prefix: str, inputs: LayerInputs | None) -> None:
        if inputs is None:
            raise ConfigError(f"{self.name} needs calibration data (pass calib=...)")
        names = dict(layer.named_modules())
        mappings, skipped = resolve(layer, self.family, self.config)
        for label, why in skipped:
            if label not in self.skipped:
                self.skipped[label] = why
                log.info("%s: %s not folded: %s", self.name, label, why)
        mappings = [m for m in mappings if self._wanted(m, prefix)]
        first = _select(inputs.chunks[0], torch.tensor([0]))
        run_first = LayerInputs(layer, [first]).outputs
        norms = [m.producer for m in mappings if m.kind == "norm"]
        reference: list[torch.Tensor] = []
        readers = norm_readers(layer, norms, lambda: reference.extend(run_first()))
        for m in mappings:
            if m.kind == "norm":
                m.consumers = choose_consumers(m, readers[m.producer], layer, self.model_type, prefix)
        mappings = [m for m in mappings if m.consumers]
        offsets = {m.producer: norm_offset(names[m.producer]) for m in mappings if m.kind == "norm"}
        saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        linears = {n: m for n, m in names.items() if isinstance(getattr(m, "weight", None), torch.Tensor)
                   and m.weight.dim() == 2 and self._quantized(prefix + n, m)}
        stats = LayerInputs(layer, subsample(inputs.chunks, self.cfg.max_tokens)).observe(linears, _Inputs)
        for m in mappings:
            self._smooth(layer, prefix, m, stats, offsets.get(m.producer, 0.0), names)
        self._check_fold(layer, prefix, first, reference[0], saved)
        if isinstance(self.cfg, AWQConfig) and self.cfg.clip:
            for n, module in linears.items():
                if n.rpartition(".")[2] not in NO_CLIP:
                    self._clip(prefix + n, module, stats[n].x)

    def _smooth(self, layer: nn.Module, prefix: str, m: LayerMapping, stats: dict[str, _Inputs], offset: float,
                names: dict[str, nn.Module]) -> None:
        key = f"{prefix}{m.producer}"
        quantized = [c for c in m.consumers if c in stats]
        # The mapping's input as all its consumers read it: a non-expert consumer's (the router
        # sees every token), else the first consumer's (an expert's down_proj: its routed tokens).
        watch = next((c for c in quantized if expert_block(c, names) is None), quantized[0] if quantized else None)
        x = stats[watch].x if watch is not None else None
        if x is None or x.shape[0] == 0:
            self.records[key] = {"consumers": m.consumers, "skipped": "no calibration tokens reached it"}
            return
        weight = torch.cat([names[c].weight.detach().float() for c in quantized])      # (sum out, n)
        cfg = self.cfg
        if isinstance(cfg, SmoothQuantConfig):
            x_max = x.abs().amax(dim=0)
            if cfg.alpha is None:
                alpha, s, before, after = smoothquant.search_alpha(x, weight, x_max, cfg.alphas, cfg.scheme, m.rows)
            else:
                alpha = cfg.alpha
                s = smoothquant.smoothquant_scales(x_max, weight.abs().amax(dim=0), alpha, m.rows)
                reference = x @ weight.T
                before = smoothquant.w8a8_error(x, weight, torch.ones_like(s), cfg.scheme, reference)
                after = smoothquant.w8a8_error(x, weight, s, cfg.scheme, reference)
        else:
            quantize = awq.weight_quantizer(cfg.bits, cfg.group_size, cfg.symmetric, weight.shape[1])
            hessian = x.T @ x / x.shape[0]                                            # (n, n)
            alpha, s, before, after = awq.search_scale(x.abs().mean(dim=0), weight, hessian, quantize,
                                                       cfg.group_size, cfg.grid, m.rows)
        fold(names[m.producer], [names[c] for c in m.consumers], s, m.rows, offset)
        scaled: dict[int, torch.Tensor] = {}
        for c in quantized:                  # consumers now read x / s (each shared input scaled once)
            old = stats[c].x
            scaled.setdefault(id(old), old / s.to(old.device))
            stats[c].parts = [scaled[id(old)]]
        self.records[key] = {"consumers": m.consumers, "alpha": alpha, "loss_before": before, "loss_after": after,
                             "tokens": int(x.shape[0]), "scale_min": float(s.min()), "scale_max": float(s.max())}

    def _check_fold(self, layer: nn.Module, prefix: str, first, reference: torch.Tensor, saved: dict) -> None:
        """The float layer must compute what it computed before the folds (beyond rounding)."""
        out = LayerInputs(layer, [first]).outputs()[0]
        dtype = next(layer.parameters()).dtype
        tol = FOLD_TOLERANCE.get(dtype, FOLD_TOLERANCE_16BIT)
        change = float((out.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-12))
        if not change <= tol:
            layer.load_state_dict(saved)
            raise ConfigError(f"{self.name}: folding the scales changed the float output of {prefix.rstrip('.')} "
                              f"({self.model_type}) by {change:.2e} of its range (tolerance {tol:g}); the layer "
                              f"was restored. compress.smoothing.mappings.FAMILIES[{self.model_type!r}] does not "
                              f"describe this model; fix the mapping or skip smoothing")

    def _clip(self, full: str, module: nn.Module, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        cfg = self.cfg
        weight = module.weight.detach().float()
        quantize = awq.weight_quantizer(cfg.bits, cfg.group_size, cfg.symmetric, weight.shape[1])
        clipped, before, after = awq.search_clip(weight, x.T @ x / x.shape[0], quantize, cfg.group_size,
                                                 cfg.clip_grid, cfg.max_shrink)
        with torch.no_grad():
            module.weight.copy_(clipped.to(module.weight.dtype))
        self.records.setdefault(full, {}).update(clip_loss_before=before, clip_loss_after=after)


def smooth(model: nn.Module, cfg: SmoothingConfig, calib=None, *, device=None, batch_size: int | None = None,
           progress: bool = True) -> Records:
    """Smooth ``model`` in place with SmoothQuant or AWQ (``cfg``); needs ``calib``. Returns, per
    layer and mapping (keyed by the producer's name), the chosen alpha and the loss before/after
    (and, AWQ, each clipped linear's loss before/after); ``summary["not_folded"]``: what the
    family's layout does not allow."""
    if calib is None:
        raise ConfigError(f"{cfg.method} chooses its scales from the layers' inputs and needs calibration data: "
                          f"pass calib=compress.calibration_data(tokenizer, TEXT_FILE, samples=..., seqlen=...) "
                          f"(CLI: --calib FILE)")
    smoother = Smoother(model, cfg)
    start = time.perf_counter()
    compress_layers(model, smoother, calib, device=device, batch_size=batch_size, progress=progress)
    mapped = [r for r in smoother.records.values() if "loss_after" in r]
    log.info("%s: %d mappings smoothed in %.1f s (loss %.4g -> %.4g)", cfg.method, len(mapped),
             time.perf_counter() - start, sum(r["loss_before"] for r in mapped), sum(r["loss_after"] for r in mapped))
    return Records(smoother.records, {"not_folded": dict(smoother.skipped)} if smoother.skipped else None)


register_method(SmoothQuantConfig, smooth, area="quantize", statistics="input")
register_method(AWQConfig, smooth, area="quantize", statistics="input")

__all__ = ["Smoother", "smooth", "subsample"]
