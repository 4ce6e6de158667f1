"""``compress plan``: measure sensitivity, search a plan for a device and target, write its recipe.

    compress plan MODEL --device h100 --memory-gb 6 --calib valid.txt --output plan.yaml
    compress run plan.yaml                     # executes it; the export reports planned vs written bytes
    compress bench OUT_DIR --profile h100      # measured vs predicted speed

``plan_model`` is the Python entry; ``recipe_of`` turns a Plan into the recipe ``compress run``
executes (one GPTQ pass whose ``overrides`` give each layer its format, dense layers in ``ignore``,
and a ``kv_cache`` pass when the plan quantizes the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from ..data import calibration_data
from ..errors import ConfigError
from ..formats import WeightFormat
from ..loading import load_model, resolve_dtype
from .cost import ModelShape, model_shape
from .devices import DeviceProfile, load_profile
from .planner import Plan, Target, candidate_formats, checkpoint_size, make_plan, uniform_plan
from .sensitivity import KV_OPTIONS, Sensitivity, measure_kv_sensitivity, measure_sensitivity

log = logging.getLogger(__name__)

# Tokens of each KV-sensitivity window and how many windows (from the calibration set).
KV_PROBE_WINDOWS = 4


@dataclasses.dataclass
class PlanInputs:
    """What a plan was made from, kept so callers (the benchmark) can plan again without
    re-measuring: the model's shape, the profile, the candidates and the measured sensitivity."""

    shape: ModelShape
    profile: DeviceProfile
    formats: list[WeightFormat]
    sensitivity: Sensitivity
    kv_dloss: dict[str, float]


def plan_model(source: str, target: Target, *, device: str | DeviceProfile = "h100", calib_data: str,
               calib_samples: int = 64, seqlen: int = 512, seed: int = 0, formats: list[str] | None = None,
               kv_options: list[str] | None = None, solver: str = "gptq", fisher_samples: int = 16,
               dtype: str = "auto", export_dtype: str = "bfloat16", cache: str | Path | None = None,
               progress: bool = True, model=None, tokenizer=None) -> tuple[Plan, PlanInputs]:
    """Measure (or read from the cache) what each candidate format costs each layer of ``source``,
    then search the plan that meets ``target`` on ``device``."""
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    if model is None:
        model, tokenizer = load_model(source, dtype=dtype)
    shape = model_shape(model, resolve_dtype(export_dtype))
    fmts = candidate_formats(profile, formats)
    calib = calibration_data(tokenizer, calib_data, samples=calib_samples, seqlen=seqlen, seed=seed)
    model_id = f"{source}|{dtype}|{_weights_fingerprint(model, shape)}"
    sens = measure_sensitivity(model, shape, calib, fmts, model_id=model_id, solver=solver,
                               fisher_samples=min(fisher_samples, calib_samples), cache=cache, progress=progress)
    kv_dloss: dict[str, float] = {}
    if target.context is not None:
        kv_dloss = measure_kv_sensitivity(model, calib.input_ids[:KV_PROBE_WINDOWS], list(kv_options or KV_OPTIONS),
                                          model_id=model_id, cache=cache, progress=progress)
    plan = make_plan(shape, sens, profile, target, fmts, kv_options, kv_dloss)
    return plan, PlanInputs(shape, profile, fmts, sens, kv_dloss)


def _weights_fingerprint(model, shape: ModelShape) -> str:
    """A cheap hash of a few weight rows (embedding, first and last unit), so a checkpoint changed
    in place at the same path does not reuse another model's cached sensitivity."""
    h = hashlib.sha256()
    names = [shape.units[0].members[0][0], shape.units[-1].members[0][0]]
    tensors = [model.get_input_embeddings().weight] + [model.get_submodule(n).weight for n in names]
    for t in tensors:
        if t.is_meta:
            return "unknown"
        h.update(t.detach()[:8].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _base_format(plan: Plan) -> WeightFormat | None:
    counts = Counter(f for f in plan.formats.values() if not f.dense)
    return counts.most_common(1)[0][0] if counts else None


def _pattern(layers_name: str, layers: list[int], locals_: tuple[str, ...]) -> str:
    r"""``re:^model\.layers\.(3|7)\.(self_attn\.q_proj|...)$``: these linears in these layers."""
    idx = str(layers[0]) if len(layers) == 1 else "(" + "|".join(map(str, layers)) + ")"
    names = [re.escape(n) for n in locals_]
    leaf = names[0] if len(names) == 1 else "(" + "|".join(names) + ")"
    return f"re:^{re.escape(layers_name)}\\.{idx}\\.{leaf}$"


def gptq_pass(plan: Plan, shape: ModelShape, solver: str = "gptq") -> dict[str, Any] | None:
    """The one quantization pass that gives every unit its planned format (None: all dense)."""
    base = _base_format(plan)
    if base is None:
        return None
    ignore = ["lm_head"]
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for unit in shape.units:
        fmt = plan.formats[unit.name]
        locals_ = tuple(m[0].removeprefix(f"{shape.layers_name}.{unit.layer}.") for m in unit.members)
        if fmt.dense:
            ignore.extend(m[0] for m in unit.members)
        elif fmt != base:
            groups.setdefault((fmt.name, locals_), []).append(unit.layer)
    overrides: dict[str, dict] = {}
    by_name = {f.name: f for f in plan.formats.values()}
    for (fname, locals_), layers in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        overrides[_pattern(shape.layers_name, layers, locals_)] = by_name[fname].config_fields()
    out = {"method": solver, **base.config_fields(), "ignore": ignore}
    if overrides:
        out["overrides"] = overrides
    return out


def recipe_of(plan: Plan, inputs: PlanInputs, *, source: str, calib_data: str, calib_samples: int = 64,
              seqlen: int = 512, seed: int = 0, output: str | None = None, eval_data: str | None = None,
              max_windows: int | None = None, solver: str = "gptq", export_dtype: str = "bfloat16",
              base_dir: Path | None = None) -> dict[str, Any]:
    """The recipe (a dict, as YAML holds it) that executes ``plan``. Paths are written relative to
    ``base_dir`` (the recipe's folder) when they are local files."""
    def rel(p: str | None) -> str | None:
        if p is None or base_dir is None or not Path(p).exists():
            return p
        return os.path.relpath(Path(p).resolve(), base_dir.resolve())

    passes = []
    q = gptq_pass(plan, inputs.shape, solver)
    if q is not None:
        passes.append(q)
    kv = plan.kv_config()
    if kv is not None:
        passes.append({"method": "kv_cache", "scheme": kv.scheme, **({"fp8_scale": "head"} if kv.is_fp8 else {})})
    name = f"plan-{plan.prediction.device}"
    recipe: dict[str, Any] = {"version": 1, "name": name, "model": rel(source), "dtype": export_dtype,
                              "calibration": {"data": rel(calib_data), "samples": calib_samples, "seqlen": seqlen,
                                              "seed": seed},
                              "passes": passes}
    if eval_data:
        recipe["evaluation"] = {"data": rel(eval_data), "seqlen": seqlen, "max_windows": max_windows,
                                "baseline": False}
        if kv is not None:
            recipe["evaluation"]["kv_chunk"] = 16
    recipe["export"] = {"output": _output_path(output, base_dir) or f"./out/{name}", "overwrite": True}
    recipe["plan"] = _jsonable(plan.to_dict())
    return recipe


def _output_path(output: str | None, base_dir: Path | None) -> str | None:
    """The export directory as the recipe must spell it: relative to the recipe's folder and
    starting with ./ or ../ (a bare relative name would read as a hub id)."""
    if output is None or base_dir is None or Path(output).is_absolute():
        return output
    rel = os.path.relpath(Path(output).resolve(), base_dir.resolve())
    return rel if rel.startswith(".") else f"./{rel}"


def _jsonable(data):
    return json.loads(json.dumps(data, default=str))


def write_recipe(path: str | Path, recipe: dict[str, Any], header: str) -> Path:
    """Write ``recipe`` as YAML with ``header`` as comments, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = recipe.pop("plan", None)
    body = yaml.safe_dump(recipe, sort_keys=False, width=120)
    if plan is not None:
        body += "# what `compress plan` predicted (read by `compress run` and `compress bench`):\n"
        body += yaml.safe_dump({"plan": plan}, sort_keys=False, width=120)
        recipe["plan"] = plan
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def format_plan(plan: Plan, inputs: PlanInputs, baselines: list[Plan] = ()) -> str:
    """Targets next to predictions, the format mix, and the per-layer map."""
    t, p = plan.target, plan.prediction
    mem_what = "checkpoint" if t.context is None else f"weights + KV ({t.batch} x {t.context}) + working memory"
    lines = [f"plan for {inputs.profile.description} ({inputs.profile.name}, profile {inputs.profile.source}): "
             + ("meets the target" if plan.feasible else "TARGET NOT MET"),
             "",
             f"{'':<18}{'target':>18}{'predicted':>18}",
             f"{'memory':<18}{_mib(t.memory_bytes):>18}{_mib(plan.memory_used):>18}   ({mem_what})",
             f"{'decode tok/s/seq':<18}{(f'{t.decode_tokens_per_s:g}' if t.decode_tokens_per_s else '-'):>18}"
             f"{p.decode_tokens_per_s:>18,.1f}   (batch {p.batch}, context {p.context})",
             f"{'prefill tok/s':<18}{(f'{t.prefill_tokens_per_s:g}' if t.prefill_tokens_per_s else '-'):>18}"
             f"{p.prefill_tokens_per_s:>18,.0f}",
             f"{'quality':<18}{'-':>18}{'+%.4f nats' % plan.dloss:>18}   (perplexity x{plan.predicted_ppl_ratio:.3f}"
             f" predicted, from per-layer sensitivity)",
             f"{'checkpoint':<18}{'':>18}{_mib(p.checkpoint_bytes):>18}   ({p.checkpoint_bytes:,} bytes)",
             f"{'KV cache':<18}{'':>18}{plan.kv:>18}   ({_mib(p.kv_bytes)})",
             "",
             "formats: " + ", ".join(f"{n} x{c}" for n, c in plan.counts().items()) + f" (of {len(plan.formats)} units)"]
    for b in baselines:
        name = b.formats[next(iter(b.formats))].name
        if not math.isfinite(b.dloss):
            lines.append(f"  uniform {name:<14} does not fit every layer")
            continue
        lines.append(f"  uniform {name:<14} {_mib(b.prediction.checkpoint_bytes):>14}"
                     f"  +{b.dloss:.4f} nats  {b.prediction.decode_tokens_per_s:,.1f} tok/s"
                     f"  prefill {b.prediction.prefill_tokens_per_s:,.0f} tok/s")
    if plan.notes:
        lines += ["", f"candidates on {inputs.profile.name}:"] + [f"  {n}" for n in plan.notes]
    if not plan.feasible:
        lines += ["", plan.message]
    lines += ["", _layer_map(plan, inputs.shape)]
    return "\n".join(lines)


def _layer_map(plan: Plan, shape: ModelShape) -> str:
    kinds: list[str] = []
    rows: dict[int, dict[str, str]] = {}
    for u in shape.units:
        kind = u.name.removeprefix(f"{shape.layers_name}.{u.layer}.")
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(u.layer, {})[kind] = plan.formats[u.name].name
    width = max([len(k) for k in kinds] + [len(f.name) for f in plan.formats.values()]) + 2
    out = ["layer " + "".join(f"{k:<{width}}" for k in kinds)]
    for layer in sorted(rows):
        out.append(f"{layer:<6}" + "".join(f"{rows[layer].get(k, '-'):<{width}}" for k in kinds))
    return "\n".join(out)


def add_plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="choose per-layer formats that meet a memory / speed target on a device, "
                                    "and write the recipe",
                       description="Measure how much each candidate format costs each layer (cached), then "
                                   "choose the formats with the lowest predicted quality loss that meet the "
                                   "target on the device, and write a recipe for `compress run`.")
    p.add_argument("model", help="checkpoint directory, .gguf file, package:PKG/FILE or hub id")
    p.add_argument("--device", default="h100", help="device profile name or YAML file (compress devices lists them)")
    p.add_argument("--memory-gb", type=float, help="memory budget in GB (1e9 bytes)")
    p.add_argument("--memory-mib", type=float, help="memory budget in MiB (2^20 bytes)")
    p.add_argument("--decode-tokens-per-s", type=float, help="decode speed target, new tokens/s per sequence")
    p.add_argument("--prefill-tokens-per-s", type=float,
                   help="prefill speed target, prompt tokens/s over the batch x context prefill (instead of a decode "
                        "target); on devices with native FP8 / INT8 / FP4 math this is where W8A8, W4A8 and NVFP4 "
                        "W4A4 formats pay")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--context", type=int, default=None,
                   help="tokens in the KV cache; with it the memory budget covers weights + KV cache + working "
                        "memory and the KV-cache format is chosen too (without it: the checkpoint's bytes)")
    p.add_argument("--formats", help="comma-separated candidate weight formats, e.g. bf16,int8,int4-g64,"
                                     "int3-g64-asym,nvfp4a16,w4a8-int8-g64 (default: those with kernels on the "
                                     "device, plus fp8, w8a8-int8, w4a8-int8-g128, w4a8-fp8-g128 and nvfp4 where "
                                     "its tensor cores run their activations' math; the plan lists what it left out "
                                     "and why)")
    p.add_argument("--kv-options", help=f"comma-separated KV-cache candidates among {','.join(KV_OPTIONS)}")
    p.add_argument("--calib", required=True, help="calibration text file or hub dataset NAME[:CONFIG][@SPLIT]")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fisher-samples", type=int, default=16, help="windows of the backward pass (Fisher weights)")
    p.add_argument("--solver", choices=["gptq", "rtn"], default="gptq",
                   help="how layers are quantized, in the sensitivity probe and in the recipe")
    p.add_argument("--dtype", default="auto", help="dtype the model is loaded in for measuring")
    p.add_argument("--export-dtype", default="bfloat16", help="dtype of the planned model's dense tensors")
    p.add_argument("--eval", dest="eval_data", help="add an evaluation section on this text to the recipe")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--export", dest="export_dir", help="the recipe's export directory (default ./out/plan-DEVICE)")
    p.add_argument("--cache", help="sensitivity cache folder (default ~/.cache/compress/sensitivity)")
    p.add_argument("--output", "-o", required=True, help="recipe file to write")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--sweep", type=int, metavar="N", default=None,
                   help="also plan at N checkpoint budgets from the smallest candidate's size to the dense model's "
                        "(same speed target, same measured sensitivity) and write them to OUTPUT's stem + "
                        ".sweep.json: the quality-vs-bytes Pareto frontier `compress report` draws")
    return p


def sweep_plans(inputs: PlanInputs, target: Target, points: int) -> list[Plan]:
    """Plans at ``points`` checkpoint budgets evenly spaced from the smallest uniform candidate's bytes
    to the dense (bf16) model's, the speed target kept; infeasible budgets are left out. No new
    measurement: the sensitivity ``inputs`` holds is reused."""
    if points < 2:
        raise ConfigError(f"--sweep {points}: a sweep needs at least 2 budgets")
    sizes = [checkpoint_size(inputs.shape, f.name) for f in inputs.formats]
    low, high = min(sizes), max(sizes + [checkpoint_size(inputs.shape, "bf16")])
    plans = []
    for i in range(points):
        budget = int(low + (high - low) * i / (points - 1))
        t = dataclasses.replace(target, memory_bytes=budget, context=None)
        plan = make_plan(inputs.shape, inputs.sensitivity, inputs.profile, t, inputs.formats, None, inputs.kv_dloss)
        if plan.feasible:
            plans.append(plan)
    return plans


def baseline_formats(inputs: PlanInputs) -> list[WeightFormat]:
    """The uniform plans ``compress plan`` prints beside its own: int4-g64 and int3-g64-asym when
    they are candidates, and every candidate with quantized activations that fits every unit (their
    prefill speed next to int4's is why they are candidates)."""
    out = [f for f in inputs.formats if f.name in ("int4-g64", "int3-g64-asym")]
    out += [f for f in inputs.formats if f.act_quant and all(f.fits(u.in_features) for u in inputs.shape.units)]
    return out


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def run_plan(args) -> int:
    if args.memory_gb is not None and args.memory_mib is not None:
        raise ConfigError("give the memory budget once: --memory-gb or --memory-mib")
    memory = (int(args.memory_gb * 1e9) if args.memory_gb is not None else
              int(args.memory_mib * 2**20) if args.memory_mib is not None else None)
    target = Target(memory, args.decode_tokens_per_s, args.batch, args.context, args.prefill_tokens_per_s)
    plan, inputs = plan_model(args.model, target, device=args.device, calib_data=args.calib,
                              calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed,
                              formats=_split(args.formats), kv_options=_split(args.kv_options), solver=args.solver,
                              fisher_samples=args.fisher_samples, dtype=args.dtype, export_dtype=args.export_dtype,
                              cache=args.cache, progress=not (args.quiet or args.json))
    out = Path(args.output)
    recipe = recipe_of(plan, inputs, source=args.model, calib_data=args.calib, calib_samples=args.calib_samples,
                       seqlen=args.seqlen, seed=args.seed, output=args.export_dir, eval_data=args.eval_data,
                       max_windows=args.max_windows, solver=args.solver, export_dtype=args.export_dtype,
                       base_dir=out.resolve().parent)
    baselines = [uniform_plan(inputs.shape, inputs.sensitivity, inputs.profile, target, f.name)
                 for f in baseline_formats(inputs)]
    text = format_plan(plan, inputs, baselines)
    when = datetime.date.today().isoformat()
    header = (f"Written by `compress plan` on {when}; run it with: compress run {out}\n"
              + "\n".join(text.splitlines()[:12]))
    if args.sweep is not None:
        sweep = sweep_plans(inputs, target, args.sweep)
        sweep_file = out.with_name(out.stem + ".sweep.json")
        tmp = sweep_file.with_name(f".{sweep_file.name}.tmp")
        tmp.write_text(json.dumps({"model": args.model, "device": inputs.profile.name,
                                   "points": [_jsonable(p.to_dict()) for p in sweep]}, indent=1) + "\n")
        os.replace(tmp, sweep_file)
        recipe["plan"]["sweep"] = str(sweep_file.resolve())     # absolute: `compress report` finds it from the run
    write_recipe(out, recipe, header)
    if args.sweep is not None and not args.json:
        print(f"sweep: {len(sweep)} feasible plan(s) of {args.sweep} budgets written to {sweep_file}")
    if args.json:
        print(json.dumps({**plan.to_dict(), "recipe": str(out)}))
    else:
        print(text)
        print(f"\nrecipe written to {out}" + ("" if plan.feasible else " (the closest feasible plan)"))
    return 0 if plan.feasible else 3
