"""Sensitivity: what each candidate format costs each unit in loss, measured on calibration data.

For a unit (linears reading one input) quantized to format f, the loss increase is estimated to
second order with the diagonal Fisher of its outputs:

    dL(unit, f) ~= 1/2 * sum_r F_r * E_t[dy_{t,r}^2],   dy_t = (Q_f - W) x_t

- ``F_r`` = E_t[(d NLL / d y_{t,r})^2]: the mean squared gradient of the summed token losses with
  respect to output channel r of that linear, from one backward pass over a few calibration
  windows (``fisher_diagonals``).
- ``E_t[dy_{t,r}^2]`` = e_r H e_r^T / 2 with e_r the row's weight error and H = 2/n sum_t x_t x_t^T
  the GPTQ Hessian of the unit's input, collected by the shared calibration engine on the float
  model. ``Q_f`` is what the recipe will run: GPTQ (default) or round-to-nearest onto f.
- Formats that round the activations too (W8A8 fp8 / w8a8-int8, W4A8 w4a8-int8 / w4a8-fp8, NVFP4
  W4A4 nvfp4): dy_t = Q_f x~_t - W x_t, whose second moment adds sum_j Q_rj^2 E_t[(x~_t - x_t)_j^2]
  (rounding errors taken as uncorrelated across channels and with the weight error). The
  per-channel mean squared rounding error is measured on the same calibration inputs; a static
  per-tensor scale is taken as the dynamic per-token one, and NVFP4's static global scale as each
  calibration batch's own (both come from the whole calibration set, so they are known only after
  the pass; NVFP4's global scale only bounds its E4M3 block scales).

Units are measured one at a time on the float model, and the planner adds their costs; the sum
predicts the model's loss increase (reported next to the measurement after ``compress run``).

Results are cached (JSON, keyed on the model, the data and the settings); asking for a new format
later measures only that format. The Fisher diagonals are cached beside them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..engine import run_layerwise
from ..errors import ConfigError
from ..kernels.act_quant import fake_quantize_activations
from ..evaluation import perplexity_through_cache
from ..formats import WeightFormat
from ..kv.config import KVCacheConfig
from ..quant.config import GPTQConfig, RTNConfig
from ..quant.fp4 import nvfp4_fake_quantize_activations, nvfp4_global_scale
from ..quant.gptq import gptq_solve
from ..quant.rtn import rtn_solve
from ..stats import HessianStats
from .cost import ModelShape

log = logging.getLogger(__name__)

SENSITIVITY_VERSION = 1
# Cached costs of W4A8 and NVFP4 W4A4 formats written before their activation rounding was counted
# (files without this key) are measured again; the other formats' entries stay valid.
ACT_TERMS = 2
KV_OPTIONS = ("bf16", "fp8", "int8", "int4")         # int2 is accepted when named (--kv-options)


@dataclasses.dataclass
class Sensitivity:
    """dloss[format][unit]: predicted increase of the mean token NLL (nats) when only that unit
    takes that format. ``base_loss`` is the float model's mean NLL on the Fisher windows."""

    dloss: dict[str, dict[str, float]]
    base_loss: float
    solver: str
    key: dict

    def cost(self, unit: str, fmt: WeightFormat) -> float:
        if fmt.dense:
            return 0.0
        return self.dloss[fmt.name][unit]

    def to_dict(self) -> dict:
        return {"version": SENSITIVITY_VERSION, "act_terms": ACT_TERMS, "key": self.key, "solver": self.solver,
                "base_loss": self.base_loss, "dloss": self.dloss}


def cache_dir() -> Path:
    home = os.environ.get("COMPRESS_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "compress") / "sensitivity"


def fisher_diagonals(model: nn.Module, ids: torch.Tensor, names: list[str], *, progress: bool = True
                     ) -> tuple[dict[str, torch.Tensor], float]:
    """Mean squared gradient of the summed token NLL w.r.t. each output channel of the named
    linears, over windows ``ids`` (n, seqlen), one window per backward; and the mean NLL."""
    device = next(model.parameters()).device
    sums = {n: None for n in names}
    tokens = 0
    total_nll = 0.0
    handles = []

    def on_output(name):
        def hook(module, args, out):
            def grad_hook(g):
                sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)   # (out,)
                sums[name] = sq if sums[name] is None else sums[name] + sq
            out.register_hook(grad_hook)
        return hook

    def need_grad(module, args, out):
        return out.requires_grad_(True)

    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(on_output(n)))
        handles.append(model.get_input_embeddings().register_forward_hook(need_grad))
        for window in tqdm(ids, desc="fisher", unit="window", disable=not progress):
            batch = window.unsqueeze(0).to(device)
            with torch.enable_grad():
                logits = model(input_ids=batch, use_cache=False).logits.float()     # (1, T, V)
                nll = nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
                nll.backward()
            total_nll += float(nll.detach())
            tokens += batch.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}: are they used by the forward pass?")
    return {n: (s / tokens).cpu() for n, s in sums.items()}, total_nll / tokens


class _Probe:
    """A calibration-engine method that solves each unit for every candidate format, measures the
    Fisher-weighted output error, and leaves the float weights in place."""

    name = "sensitivity"

    def __init__(self, shape: ModelShape, formats: list[WeightFormat], fisher: dict[str, torch.Tensor],
                 solver: str, base_cfg: dict):
        self.formats, self.fisher, self.solver, self.base_cfg = formats, fisher, solver, base_cfg
        self.unit_of = {m[0]: u.name for u in shape.units for m in u.members}
        self.dloss: dict[str, dict[str, float]] = {f.name: {} for f in formats}

    def is_target(self, name: str, module: nn.Module) -> bool:
        return name in self.unit_of

    def new_stats(self, module: nn.Linear) -> HessianStats:
        acts = {_act_key(f) for f in self.formats if f.act_quant and f.fits(module.in_features)}
        return _ProbeStats(module.in_features, sorted(acts), device=module.weight.device)

    def _config(self, fmt: WeightFormat):
        cls = GPTQConfig if self.solver == "gptq" else RTNConfig
        return cls(**{**self.base_cfg, **fmt.config_fields(), "ignore": []})

    def solve(self, names: list[str], modules: list[nn.Linear], stats: HessianStats) -> None:
        weight = torch.cat([m.weight.detach() for m in modules], dim=0).float()     # (rows, in)
        h = stats.hessian
        fisher = torch.cat([self.fisher[n].to(weight.device) for n in names])      # (rows,)
        for fmt in self.formats:
            if not fmt.fits(weight.shape[1]):
                for n in names:
                    self.dloss[fmt.name][self.unit_of[n]] = math.inf
                continue
            cfg = self._config(fmt)
            if self.solver == "gptq":
                result = gptq_solve(h, weight, cfg, scale_dtype=modules[0].weight.dtype)
            else:
                result = rtn_solve(weight, cfg, modules[0].weight.dtype, h.diagonal())
            err = result.weight.float() - weight                                     # (rows, in)
            out_mse = ((err @ h) * err).sum(1) / 2                                   # E_t[dy_r^2], (rows,)
            if fmt.act_quant:
                # the activations' rounding: sum_j Q_rj^2 E_t[dx_j^2]
                out_mse = out_mse + result.weight.float().square() @ stats.act_mse(_act_key(fmt))
            per_row = 0.5 * fisher * out_mse
            row = 0
            for n, m in zip(names, modules):
                unit = self.unit_of[n]
                part = float(per_row[row:row + m.out_features].sum())
                self.dloss[fmt.name][unit] = self.dloss[fmt.name].get(unit, 0.0) + part
                row += m.out_features

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        pass


def _act_key(fmt: WeightFormat) -> tuple[str, str]:
    """(activation codes, dynamic strategy) of a format that rounds its activations: W8A8 and W4A8
    ("int8" / "fp8", per token or per 1x128 group; static per tensor is measured as per token) or
    NVFP4 W4A4 ("nvfp4", per 16-block)."""
    if fmt.act_codes == "nvfp4":
        return ("nvfp4", "block")
    return (fmt.act_codes, "group" if fmt.act_strategy == "group" else "token")


def _round_activations(x: torch.Tensor, kind: str, strategy: str) -> torch.Tensor:
    """``x`` (tokens, in) float32 rounded as format kind/strategy rounds it at run time. NVFP4 takes
    its global scale from this batch's max |x| (the export's comes from all calibration batches)."""
    if kind == "nvfp4":
        return nvfp4_fake_quantize_activations(x, nvfp4_global_scale(x.abs().amax()))
    return fake_quantize_activations(x, kind, strategy)


class _ProbeStats(HessianStats):
    """The Hessian, plus per input channel the summed squared activation rounding error of each
    activation scheme ``acts`` ((codes, strategy) pairs of ``_act_key``)."""

    REDUCE = {**HessianStats.REDUCE, "act_sq": "sum"}

    def __init__(self, in_features: int, acts: list[tuple[str, str]], device):
        super().__init__(in_features, device=device)
        self.act_sq = {a: torch.zeros(in_features, dtype=torch.float32, device=device) for a in acts}

    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        xf = x.reshape(-1, self.in_features).float()                     # (tokens, in)
        for (kind, strategy), acc in self.act_sq.items():
            acc += (_round_activations(xf, kind, strategy) - xf).square().sum(0)

    def act_mse(self, key: tuple[str, str]) -> torch.Tensor:
        """(in,) E_t[(x~ - x)_j^2]."""
        return self.act_sq[key] / max(self.tokens, 1)


def _stale_act_term(name: str) -> bool:
    """Whether a cached entry for format ``name`` predates ACT_TERMS: W4A8 and NVFP4 W4A4 costs
    were measured without their activation rounding then (W8A8's had it already)."""
    try:
        fmt = WeightFormat.parse(name)
    except ConfigError:
        return True                                   # a spelling this version does not read: measure again
    return fmt.act_quant and not fmt.w8a8


def _fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure_sensitivity(model: nn.Module, shape: ModelShape, calib, formats: list[str | WeightFormat], *,
                        model_id: str, solver: str = "gptq", fisher_samples: int = 16,
                        base_cfg: dict | None = None, cache: Path | str | None = None, device=None,
                        progress: bool = True) -> Sensitivity:
    """dloss per unit for each of ``formats`` on ``model`` (float weights, left unchanged).
    ``calib`` gives the Hessian windows (all of them) and the Fisher windows (the first
    ``fisher_samples``). ``model_id`` names the model in the cache key (a path or hub id plus
    anything that changes its weights)."""
    fmts = [f if isinstance(f, WeightFormat) else WeightFormat.parse(f) for f in formats]
    quantized = [f for f in fmts if not f.dense]
    base_cfg = dict(base_cfg or {})
    key = {"model": model_id, "units": [u.name for u in shape.units], "dtype": str(shape.dtype),
           "calib": {"samples": calib.samples, "seqlen": calib.seqlen,
                     "ids": hashlib.sha256(calib.input_ids.numpy().tobytes()).hexdigest()[:16]},
           "fisher_samples": fisher_samples, "solver": solver, "base_cfg": base_cfg, "version": SENSITIVITY_VERSION}
    folder = Path(cache) if cache is not None else cache_dir()
    stem = f"sensitivity-{_fingerprint(key)}"
    path, fisher_path = folder / f"{stem}.json", folder / f"{stem}.fisher.safetensors"
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored is not None and stored.get("key") != key:
        stored = None
    dloss: dict[str, dict[str, float]] = dict(stored["dloss"]) if stored else {}
    if stored and stored.get("act_terms", 1) < ACT_TERMS:
        dloss = {name: d for name, d in dloss.items() if not _stale_act_term(name)}
    todo = [f for f in quantized if f.name not in dloss]
    base_loss = stored["base_loss"] if stored else None
    if todo or base_loss is None:
        names = [m[0] for u in shape.units for m in u.members]
        start = time.perf_counter()
        if fisher_path.is_file() and base_loss is not None:
            fisher = load_file(str(fisher_path))
        else:
            fisher, base_loss = fisher_diagonals(model, calib.input_ids[:fisher_samples], names, progress=progress)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in fisher.items()}, str(fisher_path))
        log.info("fisher diagonals of %d linears in %.1f s", len(names), time.perf_counter() - start)
        if todo:
            start = time.perf_counter()
            probe = _Probe(shape, todo, fisher, solver, base_cfg)
            run_layerwise(model, calib, probe, device=device, progress=progress)
            dloss.update(probe.dloss)
            log.info("sensitivity of %d units x %d formats in %.1f s", len(shape.units), len(todo),
                     time.perf_counter() - start)
        result = Sensitivity(dloss, base_loss, solver, key)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result.to_dict(), indent=1))
        os.replace(tmp, path)
    else:
        log.info("sensitivity read from the cache %s", path)
    return Sensitivity({f.name: dloss[f.name] for f in quantized}, base_loss, solver, key)


def kv_option_config(name: str) -> KVCacheConfig | None:
    """The KV-cache config of a KV option name (``KV_OPTIONS``, or int2); "bf16" is the unquantized cache."""
    if name == "bf16":
        return None
    if name == "fp8":
        return KVCacheConfig(scheme="fp8", fp8_scale="head")
    return KVCacheConfig(scheme=name)


def measure_kv_sensitivity(model: nn.Module, ids: torch.Tensor, options: list[str], *, model_id: str,
                           chunk: int = 16, cache: Path | str | None = None, progress: bool = True
                           ) -> dict[str, float]:
    """Mean-NLL increase of decoding through each KV-cache option (``KV_OPTIONS`` names),
    against the full-precision cache, on windows ``ids`` fed ``chunk`` tokens per forward so that
    every prediction after the first chunk attends to quantized keys and values. fp8 takes its
    scales from the first chunk here (an exported fp8 plan calibrates static ones)."""
    key = {"model": model_id, "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16], "chunk": chunk,
           "version": SENSITIVITY_VERSION}
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"kv-{_fingerprint(key)}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {"key": key, "dloss": {}}
    todo = [o for o in options if o != "bf16" and o not in stored["dloss"]]
    if todo:
        base, n = perplexity_through_cache(model, ids, None, chunk=chunk, progress=progress)
        for option in todo:
            nll, _ = perplexity_through_cache(model, ids, kv_option_config(option), chunk=chunk, progress=progress)
            stored["dloss"][option] = (nll - base) / n
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, path)
    return {o: (0.0 if o == "bf16" else stored["dloss"][o]) for o in options}
