"""The planner: per-unit weight formats (and a KV-cache format) that minimise the predicted loss
increase subject to a memory budget and a speed target (decode or prefill) on a device.

Each unit (``cost.Unit``) takes one of its candidate formats; a choice costs bytes, decode seconds
and predicted loss (``sensitivity``). Minimising the summed loss under a byte budget is a
multiple-choice knapsack, solved exactly by dynamic programming over bytes counted in bins (every
option's bytes are rounded *up* to a bin, so a plan the DP accepts fits the exact budget; the bin
is budget / ``BINS``). A speed target is a second budget (seconds per decode step, or seconds per
prefill of batch x context tokens: the target that makes formats rounding their activations, W8A8,
W4A8 and NVFP4 W4A4, worth that rounding on devices whose tensor cores run it), handled by a
Lagrange multiplier: the DP minimises loss + mu * seconds, and mu is bisected to the smallest value
whose plan meets the target. With a context length the KV-cache format is chosen too: the search
runs once per KV option (its bytes, seconds and loss are fixed costs) and keeps the best.

When no plan meets the targets, the closest feasible one is returned with ``feasible=False`` and a
message saying what the targets would need.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ..errors import ConfigError
from ..formats import WeightFormat
from ..kv.config import KVCacheConfig
from .cost import (ModelShape, Prediction, Workload, checkpoint_bytes, fixed_seconds, has_kernel, kernel_key,
                   math_note, missing_math, predict, specs_bytes, unit_seconds)
from .devices import DeviceProfile
from .sensitivity import KV_OPTIONS, Sensitivity, kv_option_config

log = logging.getLogger(__name__)

BINS = 100_000
# A plan this close under its memory budget is not refined further.
SLACK_BYTES = 1024
# Formats the planner considers when the user names none (each filtered by what fits the layer).
DEFAULT_FORMATS = ("bf16", "int8", "int4-g64", "int4-g64-asym", "int4-g128", "int3-g64-asym", "int3-g128-asym",
                   "int2-g64-asym", "nvfp4a16")
# Added where the device runs their math natively (FP8: sm_89+; INT8: Ampere and later); data-free.
W8A8_FORMATS = ("fp8", "w8a8-int8")
# W4A8: int4-g128's weights (the decode bytes of W4A16) with activations rounded per token to INT8 /
# FP8, added where the device has that tensor-core math (their worth is prefill speed). Group 128:
# the one vLLM's W4AFP8 kernel takes.
W4A8_FORMATS = ("w4a8-int8-g128", "w4a8-fp8-g128")
# Every format with quantized activations the defaults add where the device has their math, in the
# order they are added: NVFP4 W4A4 (FP4 tensor cores), W8A8, W4A8.
ACT_QUANT_FORMATS = ("nvfp4",) + W8A8_FORMATS + W4A8_FORMATS


@dataclasses.dataclass(frozen=True)
class Target:
    """What the plan must meet. ``memory_bytes``: with ``context`` None, the checkpoint's bytes;
    with a context, the weights plus the KV cache for ``batch`` x ``context`` tokens plus the
    prefill's working memory. ``decode_tokens_per_s``: new tokens per second per sequence."""

    memory_bytes: int | None = None
    decode_tokens_per_s: float | None = None
    batch: int = 1
    context: int | None = None
    prefill_tokens_per_s: float | None = None      # prompt tokens/s over the whole batch x context prefill

    def __post_init__(self):
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError(f"the memory budget must be positive, got {self.memory_bytes} bytes")
        if self.decode_tokens_per_s is not None and self.decode_tokens_per_s <= 0:
            raise ConfigError(f"--decode-tokens-per-s must be positive, got {self.decode_tokens_per_s}")
        if self.prefill_tokens_per_s is not None and self.prefill_tokens_per_s <= 0:
            raise ConfigError(f"--prefill-tokens-per-s must be positive, got {self.prefill_tokens_per_s}")
        if self.decode_tokens_per_s is not None and self.prefill_tokens_per_s is not None:
            raise ConfigError("give one speed target: --decode-tokens-per-s or --prefill-tokens-per-s (plan twice to "
                              "compare them)")
        if self.memory_bytes is None and self.speed_phase is None:
            raise ConfigError("give a target: a memory budget (--memory-gb / --memory-mib) and/or a speed "
                              "(--decode-tokens-per-s or --prefill-tokens-per-s)")

    @property
    def speed_phase(self) -> str | None:
        """The phase the speed target is about: "decode", "prefill" or None (memory only)."""
        if self.prefill_tokens_per_s is not None:
            return "prefill"
        return "decode" if self.decode_tokens_per_s is not None else None

    def seconds_limit(self) -> float | None:
        """The most seconds the speed target allows: per decode step, or per prefill of batch x context."""
        if self.prefill_tokens_per_s is not None:
            work = self.workload
            return work.batch * work.context / self.prefill_tokens_per_s
        return None if self.decode_tokens_per_s is None else 1.0 / self.decode_tokens_per_s

    @property
    def workload(self) -> Workload:
        return Workload(self.batch, self.context or 2048)


@dataclasses.dataclass
class Plan:
    formats: dict[str, WeightFormat]          # unit name -> format
    kv: str                                   # KV-cache option: bf16 | fp8 | int8 | int4
    prediction: Prediction
    dloss: float                              # predicted mean-NLL increase (nats)
    base_loss: float                          # float model's mean NLL on the sensitivity windows
    target: Target
    feasible: bool
    message: str
    memory_used: int                          # what the memory target counts (see Target)
    notes: list[str] = dataclasses.field(default_factory=list)   # how the device shaped the candidates

    @property
    def predicted_ppl_ratio(self) -> float:
        return math.exp(self.dloss)

    def kv_config(self) -> KVCacheConfig | None:
        return kv_option_config(self.kv)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.formats.values():
            out[f.name] = out.get(f.name, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {"device": self.prediction.device, "feasible": self.feasible, "message": self.message,
                "target": dataclasses.asdict(self.target), "kv_cache": self.kv,
                "memory_used_bytes": self.memory_used, "predicted_dloss": self.dloss,
                "predicted_ppl_ratio": self.predicted_ppl_ratio, "base_loss": self.base_loss,
                "formats": {u: f.name for u, f in self.formats.items()}, "format_counts": self.counts(),
                "format_notes": list(self.notes), "prediction": self.prediction.to_dict()}


def candidate_formats(profile: DeviceProfile, names: list[str] | None = None) -> list[WeightFormat]:
    """The formats to choose from. Named ones are taken as given (a format without a kernel on the
    device is costed on the reference path, one without its activation math at its weight-only
    twin's speed); by default, formats without a kernel are dropped on GPUs, and the formats with
    quantized activations (NVFP4 W4A4, W8A8 fp8 / w8a8-int8, W4A8 w4a8-int8-g128 / w4a8-fp8-g128)
    are added only where the device has their FP4 / FP8 / INT8 tensor-core math (their worth is
    prefill speed; the sensitivity counts their activation rounding). ``format_notes`` says why."""
    if names:
        fmts = [WeightFormat.parse(n) for n in names]
        if not any(f.dense for f in fmts):
            fmts.insert(0, WeightFormat.parse("bf16"))
        return list(dict.fromkeys(fmts))
    return [f for f in map(WeightFormat.parse, DEFAULT_FORMATS + ACT_QUANT_FORMATS) if _held_back(profile, f) is None]


def _held_back(profile: DeviceProfile, fmt: WeightFormat) -> str | None:
    """Why the default candidates leave ``fmt`` out on ``profile`` (None: they offer it)."""
    if fmt.act_quant:
        missing = missing_math(profile, fmt)
        if missing is not None:
            return missing
    if not has_kernel(profile, fmt) and (profile.kind == "gpu" or fmt.act_quant):
        return (f"no fused kernel for it on {profile.name} ({kernel_key(fmt)} is not in kernel_formats): the "
                f"reference path (dequantize the weight, then a bf16 matmul) is slower than bf16")
    return None


def format_notes(profile: DeviceProfile, formats: list[WeightFormat]) -> list[str]:
    """What the device did to the candidates, one line each, for the plan's output: every default
    format left out and why, and how every candidate with quantized activations is costed (the
    tensor-core rate of its prefill, or why it gets bf16's)."""
    have = set(formats)
    notes = []
    for fmt in map(WeightFormat.parse, DEFAULT_FORMATS + ACT_QUANT_FORMATS):
        why = None if fmt in have else _held_back(profile, fmt)
        if why is not None:
            notes.append(f"{fmt.name}: not offered: {why}")
    for fmt in formats:
        how = math_note(profile, fmt)
        if how is not None:
            notes.append(f"{fmt.name}: {how}")
    return notes


def _options(shape: ModelShape, sens: Sensitivity, fmts: list[WeightFormat], profile: DeviceProfile,
             work: Workload, phase: str = "decode") -> list[list[tuple[WeightFormat, int, float, float]]]:
    """Per unit: (format, bytes, dloss, seconds in ``phase``) of every format that fits it."""
    out = []
    for u in shape.units:
        opts = []
        for f in fmts:
            if not f.fits(u.in_features):
                continue
            if not f.dense and (f.name not in sens.dloss or u.name not in sens.dloss[f.name]):
                raise ConfigError(f"no sensitivity of {u.name} for format {f.name}; measure it (compress plan "
                                  f"measures every candidate format)")
            q = sens.cost(u.name, f)
            if not math.isfinite(q):
                continue
            opts.append((f, u.bytes(f, shape.dtype), q, unit_seconds(profile, shape, u, f, work, phase)))
        if not opts:
            raise ConfigError(f"no candidate format fits {u.name} (in_features {u.in_features})")
        out.append(opts)
    return out


def _dp(options, capacity_bytes: float | None, mu: float) -> tuple[list[int], bool]:
    """Choice per unit minimising sum(dloss + mu * seconds) with sum(bytes) <= capacity_bytes
    (None: unbounded). Returns (choices, feasible)."""
    if capacity_bytes is None:
        return [int(np.argmin([q + mu * t for _, _, q, t in opts])) for opts in options], True
    if capacity_bytes < 0:
        return [], False
    cap = BINS
    bin_bytes = max(capacity_bytes / BINS, 1e-9)
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(options), cap + 1), dtype=np.int8)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int8)
        for j, (_, b, q, t) in enumerate(opts):
            c = int(math.ceil(b / bin_bytes - 1e-9))
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = best[:cap + 1 - c] + (q + mu * t)
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best, picks[i] = new, pick
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return [], False
    choice = [0] * len(options)
    for i in range(len(options) - 1, -1, -1):
        j = int(picks[i, end])
        choice[i] = j
        b = options[i][j][1]
        end -= int(math.ceil(b / bin_bytes - 1e-9))
    return choice, True


def make_plan(shape: ModelShape, sens: Sensitivity, profile: DeviceProfile, target: Target,
              formats: list[WeightFormat] | None = None, kv_options: list[str] | None = None,
              kv_dloss: dict[str, float] | None = None) -> Plan:
    """The plan with the lowest predicted loss that meets ``target``, or the closest feasible one."""
    work = target.workload
    fmts = formats or candidate_formats(profile)
    options = _options(shape, sens, fmts, profile, work, target.speed_phase or "decode")
    if target.context is None:
        kv_names = ["bf16"]
    else:
        kv_names = list(kv_options or KV_OPTIONS)
    kv_dloss = kv_dloss or {}
    missing = [k for k in kv_names if k != "bf16" and k not in kv_dloss]
    if missing:
        raise ConfigError(f"no measured quality cost for KV-cache option(s) {missing}")
    results = []
    for kv_name in kv_names:
        # a quantized cache cannot make the model better: a negative measurement is noise
        q = max(0.0, kv_dloss.get(kv_name, 0.0))
        results.append(_plan_for_kv(shape, sens, profile, target, work, options, kv_name, q))
    feasible = [p for p in results if p.feasible]
    best = min(feasible, key=lambda p: p.dloss) if feasible else min(results, key=lambda p: _shortfall(p))
    best.notes = format_notes(profile, fmts)
    return best


def _shortfall(plan: Plan) -> float:
    """How far a plan misses its targets, as a relative excess (for choosing the closest one)."""
    t = plan.target
    miss = 0.0
    if t.memory_bytes is not None:
        miss += max(0.0, plan.memory_used / t.memory_bytes - 1)
    if t.decode_tokens_per_s is not None:
        miss += max(0.0, t.decode_tokens_per_s / plan.prediction.decode_tokens_per_s - 1)
    if t.prefill_tokens_per_s is not None:
        miss += max(0.0, t.prefill_tokens_per_s / plan.prediction.prefill_tokens_per_s - 1)
    return miss


def _plan_for_kv(shape, sens, profile, target: Target, work: Workload, options, kv_name: str, kv_q: float) -> Plan:
    kv = kv_option_config(kv_name)
    phase, limit = target.speed_phase or "decode", target.seconds_limit()
    fixed_t = sum(fixed_seconds(profile, shape, kv, work, phase).values())

    def seconds(plan: Plan) -> float:
        return plan.prediction.decode_s if phase == "decode" else plan.prediction.prefill_s

    def build(choice: list[int]) -> Plan:
        fm = {u.name: options[i][choice[i]][0] for i, u in enumerate(shape.units)}
        pred = predict(shape, fm, profile, work, kv)
        q = sum(options[i][choice[i]][2] for i in range(len(options))) + kv_q
        used = pred.checkpoint_bytes if target.context is None else pred.memory_bytes
        return Plan(fm, kv_name, pred, q, sens.base_loss, target, True, "", used)

    fixed = 0
    if target.memory_bytes is not None:
        # What the units' tensor data does not account for (other tensors, KV cache, the file
        # header, whose length depends on which tensors the formats store): the largest over probe
        # plans that give every unit its first, its smallest or its most-tensors option.
        probes = [[0] * len(options), [int(np.argmin([o[1] for o in opts])) for opts in options],
                  [max(range(len(opts)), key=lambda j: len(opts[j][0].tensors(8, 64, shape.dtype)))
                   for opts in options]]
        fixed = max(build(c).memory_used - sum(options[i][j][1] for i, j in enumerate(c)) for c in probes)

    def capacity(extra: int) -> float | None:
        return None if target.memory_bytes is None else target.memory_bytes - fixed - extra

    def solve(mu: float) -> Plan | None:
        # The fixed part is estimated conservatively (the header depends on the plan): shrink the
        # capacity when a plan overflows, grow it by the slack when it leaves bytes unused, and keep
        # the best plan that fits.
        extra, best, grow = 0, None, 64
        for _ in range(8):
            choice, ok = _dp(options, capacity(extra), mu)
            if not ok:
                break
            plan = build(choice)
            if target.memory_bytes is None:
                return plan
            over = plan.memory_used - target.memory_bytes
            if over <= 0:
                if best is None or plan.dloss < best.dloss:
                    best = plan
                if -over <= SLACK_BYTES:
                    break
                extra += over                                # use the slack
            else:
                extra += over + grow
                grow *= 4
        return best

    plan = solve(0.0)
    if plan is None:
        return _infeasible_memory(shape, profile, target, work, options, kv_name, kv_q, build)
    if limit is not None and seconds(plan) > limit:
        lo, hi = 0.0, 1.0
        fast = solve(hi)
        while fast is not None and seconds(fast) > limit and hi < 1e12:
            hi *= 10
            fast = solve(hi)
        if fast is None or seconds(fast) > limit:
            best = fast or plan
            best.feasible = False
            within = 'within the memory budget ' if target.memory_bytes else ''
            if phase == "decode":
                best.message = (f"decode {target.decode_tokens_per_s:g} tokens/s per sequence is out of reach on "
                                f"{profile.name} at batch {work.batch}, context {work.context}: the fastest plan "
                                f"{within}predicts {best.prediction.decode_tokens_per_s:.1f} tokens/s (attention, "
                                f"the output layer and launches alone take {fixed_t * 1e3:.2f} ms per step); "
                                f"this is that plan")
            else:
                best.message = (f"prefill {target.prefill_tokens_per_s:g} tokens/s is out of reach on {profile.name} "
                                f"at batch {work.batch}, context {work.context}: the fastest plan {within}predicts "
                                f"{best.prediction.prefill_tokens_per_s:,.0f} tokens/s (attention, the output layer "
                                f"and launches alone take {fixed_t * 1e3:.2f} ms per prefill); this is that plan")
            return best
        for _ in range(30):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1000
            cand = solve(mid)
            if cand is not None and seconds(cand) <= limit:
                hi, fast = mid, cand
            else:
                lo = mid
            if hi - lo <= 1e-3 * hi:
                break
        plan = fast
    plan.message = "meets the target"
    return plan


def _infeasible_memory(shape, profile, target, work, options, kv_name, kv_q, build) -> Plan:
    smallest = [int(np.argmin([b for _, b, _, _ in opts])) for opts in options]
    plan = build(smallest)
    plan.feasible = False
    what = "checkpoint" if target.context is None else (f"weights + KV cache for batch {work.batch} x "
                                                          f"{work.context} tokens + working memory")
    plan.message = (f"the memory budget of {target.memory_bytes / 2**20:.1f} MiB is out of reach: with the smallest "
                    f"candidate format for every layer, the {what} needs {plan.memory_used / 2**20:.1f} MiB "
                    f"(the tensors no plan compresses, e.g. embeddings and norms, take "
                    f"{_fixed_bytes(shape) / 2**20:.1f} MiB). The closest feasible plan is this one: ask for at "
                    f"least {plan.memory_used / 2**20:.1f} MiB"
                    + ("" if target.context is None else ", or a shorter context / smaller batch"))
    return plan


def _fixed_bytes(shape: ModelShape) -> int:
    return specs_bytes(shape.other.values())


def uniform_plan(shape: ModelShape, sens: Sensitivity, profile: DeviceProfile, target: Target, fmt: str) -> Plan:
    """Every unit in one format (the baseline a plan is compared with)."""
    f = WeightFormat.parse(fmt)
    work = target.workload
    fm = {u.name: f for u in shape.units}
    pred = predict(shape, fm, profile, work)
    q = sum(sens.cost(u.name, f) for u in shape.units)
    return Plan(fm, "bf16", pred, q, sens.base_loss, target, True, "uniform", pred.checkpoint_bytes)


def checkpoint_size(shape: ModelShape, fmt: str) -> int:
    """Bytes of the checkpoint with every unit in ``fmt`` (e.g. the 4-bit model a budget refers to)."""
    f = WeightFormat.parse(fmt)
    return checkpoint_bytes(shape, {u.name: f for u in shape.units})
