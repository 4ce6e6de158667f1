"""Speed of a quantized checkpoint against its dense original: prefill and decode tokens/s, memory.

For each model (one model resident on the device at a time):

- **prefill**: one forward over ``batch_size x prompt_len`` random token ids, computing the logits
  of the last position only (as generation does); tokens/s = batch_size * prompt_len / the median
  seconds of ``repeats`` timed runs after ``warmup`` untimed ones.
- **decode**: the prompt is prefilled into a static KV cache (untimed), then ``new_tokens`` greedy
  single-token steps run; tokens/s = batch_size * new_tokens / the median seconds of the step
  loop. One step is forward of (batch, 1) ids + argmax, writing the next ids in place, so the
  loop never waits on the host. With ``cuda_graphs`` the step is captured once in a CUDA graph
  and replayed (launch overhead gone, the same for both models); otherwise it runs eagerly.
- **peak memory**: ``torch.cuda.max_memory_allocated`` over that model's measurements (weights,
  activations, KV cache), reset before each model; None on CPU, where only weight bytes are given.
- **weight bytes**: the bytes of the model's parameters and buffers as it runs.

CUDA work is synchronized before every clock read. The default baseline is the checkpoint itself
with every packed layer replaced by an ``nn.Linear`` holding its dequantized weight in the bench
dtype: the architecture, and so the speed, of the dense original, without needing it on disk.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import StaticCache

from .engine import default_device
from .errors import ConfigError, ModelLoadError
from .kernels.dequant_linear import check_backend
from .loading import load_model, resolve_dtype, resolve_source
from .modeling import set_module
from .plan.cost import Workload, efficiency_family, formats_of, model_shape, predict
from .plan.devices import load_profile
from .quant.packed import PackedLinear
from .report import machine

log = logging.getLogger(__name__)

# Config fields that must agree between a checkpoint and a --baseline for the comparison to mean anything.
_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")
# Untimed decode steps run before a CUDA graph capture (allocator warm-up, Triton autotuning).
_CAPTURE_WARMUP_STEPS = 3


@dataclasses.dataclass
class BenchSettings:
    prompt_len: int = 512          # tokens per sequence in the prefill (and in the decode prompt)
    new_tokens: int = 128          # timed decode steps, one new token per sequence each
    batch_size: int = 1            # sequences per forward
    warmup: int = 2                # untimed runs before the timed ones
    repeats: int = 5               # timed runs; the median is reported
    cuda_graphs: bool = False      # replay decode steps from a CUDA graph (CUDA only)
    seed: int = 0                  # of the random prompt token ids

    def __post_init__(self):
        for name, low in (("prompt_len", 1), ("new_tokens", 1), ("batch_size", 1), ("warmup", 0), ("repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass
class Measurement:
    name: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_seconds: float             # median seconds of one (batch_size, prompt_len) forward
    decode_seconds: float              # median seconds of new_tokens decode steps
    peak_memory_bytes: int | None      # CUDA max_memory_allocated while measuring; None on CPU
    weight_bytes: int                  # parameter + buffer bytes of the model as it runs
    backend: str | None = None         # kernel backend of the packed layers; None for a dense model
    cuda_graphs: bool = False          # decode steps were replayed from a CUDA graph
    # the planner's cost model for the same work on the device profile (compress/plan/cost.py)
    predicted_prefill_seconds: float | None = None
    predicted_decode_seconds: float | None = None     # all new_tokens steps
    # per phase: the dominant kernel family and the split of the predicted seconds into the part
    # that family's efficiency divides (``a``, at efficiency 1) and the rest (``r``): what
    # `compress bench --calibrate` fits the family's efficiency with
    calibration: dict | None = None

    @property
    def decode_ratio(self) -> float | None:
        """measured / predicted decode seconds (1.0 = the cost model was exact)."""
        return None if not self.predicted_decode_seconds else self.decode_seconds / self.predicted_decode_seconds

    @property
    def prefill_ratio(self) -> float | None:
        return None if not self.predicted_prefill_seconds else self.prefill_seconds / self.predicted_prefill_seconds


@dataclasses.dataclass
class BenchResult:
    checkpoint: str
    device: str
    dtype: str
    baseline: str | None               # "dequantized", the path of the original, or None
    settings: BenchSettings
    models: list[Measurement]          # the checkpoint first, then the baseline if any
    machine: dict = dataclasses.field(default_factory=machine)
    profile: str | None = None         # the device profile predictions were made with

    def speedup(self, metric: str = "decode") -> float | None:
        """tokens/s of the checkpoint over the baseline's for ``metric`` in (prefill, decode)."""
        if len(self.models) < 2:
            return None
        key = f"{metric}_tokens_per_s"
        return getattr(self.models[0], key) / getattr(self.models[1], key)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["speedup_prefill"], out["speedup_decode"] = self.speedup("prefill"), self.speedup("decode")
        for m, d in zip(self.models, out["models"]):
            d["decode_ratio"], d["prefill_ratio"] = m.decode_ratio, m.prefill_ratio
        return out

    def table(self) -> str:
        return format_table(self.models)


def format_table(models: list[Measurement]) -> str:
    """One row per model; speed-ups are against the last row (the baseline)."""
    width = max([34] + [len(m.name) + 2 for m in models])
    head = (f"{'model':<{width}}{'weights MiB':>12}{'peak MiB':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
            f"{'prefill x':>11}{'decode x':>10}")
    lines = [head, "-" * len(head)]
    base = models[-1] if len(models) > 1 else None
    for m in models:
        peak = "-" if m.peak_memory_bytes is None else f"{m.peak_memory_bytes / 2**20:.0f}"
        px = "-" if base is None else f"{m.prefill_tokens_per_s / base.prefill_tokens_per_s:.2f}"
        dx = "-" if base is None else f"{m.decode_tokens_per_s / base.decode_tokens_per_s:.2f}"
        lines.append(f"{m.name:<{width}}{m.weight_bytes / 2**20:>12.1f}{peak:>10}{m.prefill_tokens_per_s:>15.1f}"
                     f"{m.decode_tokens_per_s:>14.1f}{px:>11}{dx:>10}")
    if any(m.predicted_decode_seconds for m in models):
        lines += ["", f"{'predicted (cost model)':<{width}}{'prefill tok/s':>15}{'measured/pred':>15}"
                      f"{'decode tok/s':>14}{'measured/pred':>15}"]
        for m in models:
            if not m.predicted_decode_seconds:
                continue
            pp = m.prefill_tokens_per_s * m.prefill_ratio
            pd = m.decode_tokens_per_s * m.decode_ratio
            lines.append(f"{m.name:<{width}}{pp:>15.1f}{1 / m.prefill_ratio:>15.2f}{pd:>14.1f}{1 / m.decode_ratio:>15.2f}")
    return "\n".join(lines)


# --- models ------------------------------------------------------------------------------------

def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every packed layer of ``model``, in place, by an ``nn.Linear`` holding its dequantized
    weight in ``dtype`` (default: the layer's own dtype). Returns how many were replaced."""
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, PackedLinear):
            continue
        weight = module.dequantize(dtype or module.dtype)                      # (out, in)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
        set_module(model, name, dense)
        count += 1
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model``, each shared tensor once."""
    seen: set[tuple] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen and not t.is_meta:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def scheme_label(model: nn.Module) -> str:
    """e.g. ``int4 g128`` for the packed layers of ``model`` (``dense`` when it has none)."""
    schemes = sorted({m.label for m in model.modules() if isinstance(m, PackedLinear)})
    return "+".join(schemes) or "dense"


def check_lengths(config, settings: BenchSettings, where: str) -> None:
    """Refuse a prompt plus decode steps longer than the model's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(config, dict):
        limit = config.get("max_position_embeddings")
    total = settings.prompt_len + settings.new_tokens
    if limit is not None and total > limit:
        raise ConfigError(f"{where}: prompt_len {settings.prompt_len} + new_tokens {settings.new_tokens} = {total} "
                          f"tokens exceed the model's max_position_embeddings {limit}; lower --prompt-len or "
                          f"--new-tokens")


def check_same_architecture(config_a, config_b, where_a: str, where_b: str) -> None:
    """Refuse a baseline whose architecture differs from the checkpoint's (configs or dicts)."""
    a = config_a if isinstance(config_a, dict) else config_a.to_dict()
    b = config_b if isinstance(config_b, dict) else config_b.to_dict()
    diff = [f"{k} {a[k]!r} vs {b[k]!r}" for k in _ARCH_KEYS if k in a and k in b and a[k] != b[k]]
    if diff:
        raise ModelLoadError(f"baseline {where_b} is not the architecture of {where_a} ({'; '.join(diff)}); pass "
                             f"the dense model the checkpoint was quantized from, or drop --baseline to compare "
                             f"with the checkpoint dequantized")


# --- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_logits_only(model: nn.Module) -> dict:
    """Forward kwargs that keep only the last position's logits, where the model takes them."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def random_prompt(model: nn.Module, settings: BenchSettings) -> torch.Tensor:
    """(batch_size, prompt_len) int64 token ids, uniform over the vocabulary, seeded."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, vocab, (settings.batch_size, settings.prompt_len), generator=g)
    return ids.to(model_device(model))


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor, *, warmup: int, repeats: int) -> float:
    """Median seconds of one forward over ``ids`` (batch, prompt_len), no KV cache kept."""
    device, extra = ids.device, _last_logits_only(model)
    times = []
    for run in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, **extra)
        _sync(device)
        if run >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class StaticDecoder:
    """Greedy decoding with a static KV cache. A step reads ``next_ids`` (batch, 1), runs the model
    and writes the argmax back into ``next_ids``: every tensor it touches keeps its address, which
    is what lets one step be captured in a CUDA graph and replayed."""

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.next_ids: torch.Tensor | None = None           # (batch, 1) int64
        self.graph = None
        self._extra = _last_logits_only(model)

    def prefill(self, prompt_ids: torch.Tensor) -> None:
        """Reset the cache, run the prompt (batch, prompt_len) and set ``next_ids`` to its argmax."""
        self.cache.reset()
        logits = self.model(input_ids=prompt_ids, past_key_values=self.cache, use_cache=True,
                            **self._extra).logits                 # (batch, 1, vocab)
        first = logits[:, -1].argmax(-1, keepdim=True)
        if self.next_ids is None:
            self.next_ids = first
        else:
            self.next_ids.copy_(first)

    def _step(self) -> None:
        logits = self.model(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True).logits
        self.next_ids.copy_(logits[:, -1].argmax(-1, keepdim=True))   # (batch, 1)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def generate(self, prompt_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Prefill, then ``steps`` steps: the (batch, steps + 1) greedy ids, the prefill's first."""
        self.prefill(prompt_ids)
        out = [self.next_ids.clone()]
        for _ in range(steps):
            self.step()
            out.append(self.next_ids.clone())
        return torch.cat(out, dim=1)

    def capture(self, prompt_ids: torch.Tensor) -> bool:
        """Capture one step in a CUDA graph and check that replaying it decodes the same ids as eager
        steps; False (with a warning) when either fails, leaving eager steps."""
        try:
            self.prefill(prompt_ids)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):                       # warm-up on a side stream, as capture needs
                for _ in range(_CAPTURE_WARMUP_STEPS):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: measure eagerly instead
            log.warning("CUDA graph capture of the decode step failed (%s: %s); decoding eagerly",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return False
        eager = self.generate(prompt_ids, _CAPTURE_WARMUP_STEPS)
        self.graph = graph
        if not torch.equal(self.generate(prompt_ids, _CAPTURE_WARMUP_STEPS), eager):
            log.warning("replaying the CUDA graph of the decode step gives other ids than eager steps; "
                        "decoding eagerly")
            self.graph = None
            return False
        return True


@torch.inference_mode()
def decode_seconds(model: nn.Module, prompt_ids: torch.Tensor, settings: BenchSettings) -> tuple[float, bool]:
    """Median seconds of ``settings.new_tokens`` greedy decode steps after prefilling ``prompt_ids``
    (batch, prompt_len); and whether the steps ran from a CUDA graph."""
    device = prompt_ids.device
    decoder = StaticDecoder(model, prompt_ids.shape[1] + max(settings.new_tokens, _CAPTURE_WARMUP_STEPS))
    graphed = settings.cuda_graphs and device.type == "cuda" and decoder.capture(prompt_ids)
    times = []
    for run in range(settings.warmup + settings.repeats):
        decoder.prefill(prompt_ids)
        _sync(device)
        start = time.perf_counter()
        for _ in range(settings.new_tokens):
            decoder.step()
        _sync(device)
        if run >= settings.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), graphed


@torch.inference_mode()
def greedy_tokens(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The (batch, new_tokens) ids the decode loop produces (the first one from the prefill)."""
    return StaticDecoder(model, prompt_ids.shape[1] + new_tokens).generate(prompt_ids, new_tokens - 1)


def measure(model: nn.Module, settings: BenchSettings, name: str) -> Measurement:
    """Prefill and decode tokens/s, peak memory and weight bytes of ``model`` on its own device."""
    device = model_device(model)
    if settings.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"cuda_graphs (--cuda-graphs) needs a model on a CUDA device; {name} is on {device}")
    model.eval()
    check_lengths(model.config, settings, name)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ids = random_prompt(model, settings)
    log.info("%s: prefill %d x %d tokens, %d + %d runs", name, *ids.shape, settings.warmup, settings.repeats)
    prefill = prefill_seconds(model, ids, warmup=settings.warmup, repeats=settings.repeats)
    log.info("%s: decode %d steps at batch %d%s", name, settings.new_tokens, settings.batch_size,
             " (CUDA graph)" if settings.cuda_graphs else "")
    decode, graphed = decode_seconds(model, ids, settings)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    tokens = settings.batch_size
    return Measurement(name=name, prefill_tokens_per_s=tokens * settings.prompt_len / prefill,
                       decode_tokens_per_s=tokens * settings.new_tokens / decode, prefill_seconds=prefill,
                       decode_seconds=decode, peak_memory_bytes=peak, weight_bytes=weight_bytes(model),
                       backend=packed[0].backend if packed else None, cuda_graphs=bool(graphed))


# --- the entry call ----------------------------------------------------------------------------

def _local_config(source) -> dict | None:
    """config.json of a local checkpoint directory, to check settings before loading; else None."""
    try:
        path = resolve_source(source)
    except Exception:  # noqa: BLE001 - loading reports a bad source properly later
        return None
    if isinstance(path, Path) and (path / "config.json").is_file():
        try:
            return json.loads((path / "config.json").read_text())
        except json.JSONDecodeError:
            return None
    return None


def _check_device(device: torch.device, settings: BenchSettings) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA GPU; pass --device cpu")
    if settings.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"cuda_graphs (--cuda-graphs) needs a CUDA device, got {device}; drop --cuda-graphs")


def attach_prediction(m: Measurement, model: nn.Module, profile, settings: BenchSettings) -> None:
    """Fill ``m``'s predicted seconds from the planner's cost model for ``model`` on ``profile``
    (a DeviceProfile): prefill of batch x prompt_len, and new_tokens decode steps at the mean
    context they see. Models the cost model does not cover are skipped with a warning."""
    try:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        shape = model_shape(model, dtype)
        fm = formats_of(model, shape)
    except ConfigError as exc:
        log.warning("no prediction for %s: %s", m.name, exc)
        return
    ctx = settings.prompt_len + settings.new_tokens // 2
    works = {"decode": (Workload(settings.batch_size, ctx), settings.new_tokens),
             "prefill": (Workload(settings.batch_size, settings.prompt_len), 1)}

    def seconds(prof, phase: str) -> float:
        work, times = works[phase]
        pred = predict(shape, fm, prof, work)
        return (pred.decode_s if phase == "decode" else pred.prefill_s) * times

    m.predicted_decode_seconds = seconds(profile, "decode")
    m.predicted_prefill_seconds = seconds(profile, "prefill")
    weight = {}
    for unit in shape.units:
        fam = efficiency_family(profile.efficiency["decode"], fm[unit.name].family)
        weight[fam] = weight.get(fam, 0) + unit.params
    family = max(weight, key=weight.get)
    m.calibration = {}
    for phase in works:
        at = {}
        for eff in (1.0, 0.5):
            eff_table = {ph: dict(v) for ph, v in profile.efficiency.items()}
            eff_table[phase][family] = eff
            at[eff] = seconds(dataclasses.replace(profile, efficiency=eff_table), phase)
        a = at[0.5] - at[1.0]
        m.calibration[phase] = {"family": family, "a": a, "r": at[1.0] - a}


def benchmark(checkpoint: str | os.PathLike, *, baseline: str | os.PathLike | None = "dequantized",
              backend: str = "auto", device: str | torch.device | None = None, dtype: str = "bfloat16",
              settings: BenchSettings | None = None, profile=None) -> BenchResult:
    """Measure a compressed checkpoint (our runtime, kernel ``backend``) and a dense baseline.

    ``baseline``: ``"dequantized"`` (the checkpoint with its packed layers dequantized to ``dtype``:
    the original's architecture and speed), a path or hub id of the dense original, or None.
    ``profile``: a DeviceProfile (or its name) to predict each measurement with the planner's cost
    model, shown next to it; None: no prediction.
    """
    if isinstance(profile, str):
        profile = load_profile(profile)
    settings = settings or BenchSettings()
    check_backend(backend)
    torch_dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else default_device()
    _check_device(device, settings)
    config = _local_config(checkpoint)
    if config is not None:
        check_lengths(config, settings, str(checkpoint))
    if baseline not in (None, "dequantized") and config is not None and _local_config(baseline) is not None:
        check_same_architecture(config, _local_config(baseline), str(checkpoint), str(baseline))

    model, _ = load_model(checkpoint, dtype=torch_dtype, device=device, backend=backend)
    label = scheme_label(model)
    if baseline == "dequantized" and label == "dense":
        raise ConfigError(f"{checkpoint} has no packed quantized layers, so it has no dequantized baseline; bench "
                          f"a checkpoint written by compress export, or pass --baseline PATH or --no-baseline")
    ours = measure(model, settings, f"compress {label} ({backend})")
    if profile is not None:
        attach_prediction(ours, model, profile, settings)
    models = [ours]
    if baseline == "dequantized":
        dequantize_model(model, None if torch_dtype == "auto" else torch_dtype)   # ours is measured: reuse it
        dense_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        models.append(measure(model, settings, f"{dense_dtype} (dequantized)"))
        if profile is not None:
            attach_prediction(models[-1], model, profile, settings)
    elif baseline is not None:
        arch = model.config
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dense, _ = load_model(baseline, dtype=torch_dtype, device=device)
        check_same_architecture(arch, dense.config, str(checkpoint), str(baseline))
        models.append(measure(dense, settings, f"{Path(str(baseline)).name} (baseline)"))
        if profile is not None:
            attach_prediction(models[-1], dense, profile, settings)
    return BenchResult(checkpoint=str(checkpoint), device=str(device), dtype=str(dtype),
                       baseline=None if baseline is None else str(baseline), settings=settings, models=models,
                       profile=None if profile is None else profile.name)


def calibrated_profile(profile, result: BenchResult):
    """``profile`` with the efficiency of each measured model's dominant kernel family (per phase)
    refitted so that the cost model reproduces the measured seconds: eff = a / (measured - r).
    The dense baseline fits ``bf16`` first; the checkpoint then fits its own family."""
    table = {ph: dict(v) for ph, v in profile.efficiency.items()}
    fitted = []
    for m in reversed(result.models):                       # the baseline (bf16) first
        if not m.calibration:
            continue
        for phase, measured in (("decode", m.decode_seconds), ("prefill", m.prefill_seconds)):
            c = m.calibration[phase]
            if measured <= c["r"] or c["a"] <= 0:
                log.warning("%s %s: measured %.4g s is below what the rest of the model is predicted to take "
                            "(%.4g s); %s efficiency left at %.3g", m.name, phase, measured, c["r"], c["family"],
                            table[phase][c["family"]])
                continue
            table[phase][c["family"]] = min(1.0, max(0.005, c["a"] / (measured - c["r"])))
            fitted.append(f"{phase} {c['family']} {table[phase][c['family']]:.3g}")
    note = (f"{profile.notes} | " if profile.notes else "") + \
        f"efficiency fitted by compress bench on {result.checkpoint} ({', '.join(fitted) or 'nothing fitted'})"
    return dataclasses.replace(profile, efficiency=table, source="calibrated", notes=note)
