"""Every GPU claim of the project measured by one command, inside a wall-clock budget.

    python benchmarks/gpu_suite.py --dry-run                  # any machine: the stages, their estimates, the total
    python benchmarks/gpu_suite.py                            # on the GPU: 9.5-minute budget, results under $OUT
    python benchmarks/gpu_suite.py --budget-s 300 --only linear-int4,decode   # a second, shorter call

A GPU is lent for about 15 minutes in all, machine start included, so the proof is one prepared
call (docs/kernels.md, "Measuring on a GPU"). The suite runs, in order of importance:

1. ``sanity`` (benchmarks/gpu_sanity.py, ~20 s): CUDA visible, Triton compiles a tiny kernel, our
   int4 linear matches its reference. If it fails nothing else runs: the message says why.
2. ``gpu-tests``: pytest on the tests that run only on a GPU (Llama-3-8B layer shapes) and the CUDA
   cases of the kernel tests, capped in time.
3. The benchmarks at reduced but representative shapes, each the existing script run as its own
   process with smaller arguments (a crashed kernel cannot poison the next stage's CUDA context):
   int4 linear, end-to-end decode, NVFP4 linear, 2:4, KV attention, FP8 and INT8 W8A8, planner.

Each stage has an estimated cost (seconds on an H100/H200 with a cold Triton cache, process start,
compilation and autotuning included; first guesses, to be replaced by the measured ``elapsed_s``).
A stage whose estimate no longer fits the budget left is skipped with a note; a running stage is
killed at its cap or when the budget runs out. After every stage the results so far are written:
one JSON (every stage's own JSON inside it, the claims measured against their targets, the
autotuned configs), a markdown table of the claims next to it (``.md``) and the stages' output
(``.log``). Default location: ``$OUT/gpu-suite.json`` when ``OUT`` is set (the device machine's
folder that comes back), else ``benchmarks/results/gpu-suite.json``. The exit status says whether
the suite ran (0), a stage failed or timed out (1), or the sanity phase failed (2); targets missed
are in the table, not in the status.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 570
LINEAR = "benchmarks/linear_kernels.py"
MLP = "4096x14336,14336x4096"                 # Llama-3-8B gate/up and down (in x out)
REF_TOL = 2e-2                                # bf16 ||y - ref|| / ||ref|| the benchmarks' own checks allow

# The tests that run only on a GPU (skipped elsewhere: real layer shapes, the "cuda" device cases)
# and the cheap GPU cases of the kernel tests that exercise hardware paths the interpreter cannot
# (FP8 conversion and dots on sm_89+, the dispatch to torch._scaled_mm / _int_mm).
GPU_TEST_FILES = ("tests/kernels/test_dequant_linear_triton.py", "tests/kernels/test_fp4_linear_triton.py",
                  "tests/kernels/test_sparse24_linear.py", "tests/kernels/test_w8a8_linear.py",
                  "tests/kernels/test_act_quant.py", "tests/quant/test_fp4.py", "tests/quant/test_linear.py",
                  "tests/pruning/test_sparse_linear.py", "tests/kernels/test_tuning.py")
GPU_TEST_FILTER = ("real_llama3_8b_shapes or cuda or dispatch_triton_matches_reference or triton_half_inputs "
                   "or ties_signed_zero or triton_backend_matches_torch_backend")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    estimate_s: int                 # expected wall-clock seconds on an H100/H200 (see the module docstring)
    cap_s: int                      # killed after this long, and never past the budget
    args: tuple[str, ...]           # after `python`, in the repo root; {work} is the suite's work folder
    result: str | None = None       # the JSON file the stage writes in {work}
    env: tuple[tuple[str, str], ...] = ()

    def command(self, work: str) -> list[str]:
        return [a.replace("{work}", work) for a in self.args]


def _out(name: str) -> str:
    return "{work}/" + name


STAGES = (
    Stage("sanity", "CUDA visible, Triton compiles a tiny kernel, int4 linear matches its float64 reference",
          20, 90, ("benchmarks/gpu_sanity.py", "--json-out", _out("sanity.json")), "sanity.json"),
    Stage("gpu-tests", "pytest: GPU-only tests at Llama-3-8B layer shapes and the CUDA kernel cases "
          "(heuristic configs: COMPRESS_AUTOTUNE=0)", 85, 150,
          ("-m", "pytest", "-v", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--durations=5",
           *GPU_TEST_FILES, "-k", GPU_TEST_FILTER), None,
          # TRITON_INTERPRET=0: tests/conftest.py turns the interpreter on when /dev/nvidiactl is missing
          (("COMPRESS_AUTOTUNE", "0"), ("TRITON_INTERPRET", "0"))),
    Stage("linear-int4", "int4 g128 linear vs bf16, Llama-3-8B gate/up and down, M = 1, 16, 64", 95, 180,
          (LINEAR, "--shapes", MLP, "--batches", "1,16,64", "--json-out", _out("linear-int4.json")),
          "linear-int4.json"),
    Stage("decode", "end-to-end batch-1 decode, random Llama-3-8B (32 layers), bf16 vs int4 g128, CUDA graphs, "
          "prompt 128, 64 steps", 60, 180,
          ("benchmarks/decode.py", "--prompt-len", "128", "--new-tokens", "64", "--warmup", "1", "--repeats", "3",
           "--cuda-graphs", "--json-out", _out("decode.json")), "decode.json"),
    Stage("gemv-sweep", "every one-token int4 g128 config timed (plain vs cp.async-pipelined loads, 1/2/4-group "
          "tiles), gate/up and down: the data behind tuning's shortlist", 60, 120,
          ("benchmarks/gemv_sweep.py", "--formats", "int4", "--json-out", _out("gemv-sweep.json")),
          "gemv-sweep.json"),
    Stage("linear-nvfp4", "NVFP4 W4A16 linear vs bf16, gate/up and down, M = 1, 16", 60, 120,
          (LINEAR, "--format", "nvfp4", "--shapes", MLP, "--batches", "1,16", "--json-out",
           _out("linear-nvfp4.json")), "linear-nvfp4.json"),
    Stage("sparse24", "2:4 bf16 and 2:4 + int4 g128 (and dense int4) vs dense bf16, gate/up and down, M = 1",
          35, 120, ("benchmarks/sparse24.py", "--batches", "1", "--output", _out("sparse24.json")), "sparse24.json"),
    Stage("kv-attention", "decode attention on int4 / int8 / fp8 KV caches vs bf16 SDPA, Llama-3-8B heads, "
          "batch 8, 8k and 32k tokens", 40, 120,
          ("benchmarks/kv_attention.py", "--contexts", "8192,32768", "--formats", "int4,int8,fp8", "--output",
           _out("kv-attention.json")), "kv-attention.json"),
    Stage("linear-fp8", "FP8 W8A8 layer (activation quantization timed) vs bf16, o 4096x4096 and gate_up "
          "4096x28672, M = 1, 4096", 35, 90,
          (LINEAR, "--format", "fp8", "--shapes", "4096x4096,4096x28672", "--batches", "1,4096", "--json-out",
           _out("linear-fp8.json")), "linear-fp8.json"),
    Stage("linear-int8", "INT8 W8A8 layer vs bf16, gate_up 4096x28672, M = 1, 4096", 25, 90,
          (LINEAR, "--format", "int8", "--shapes", "4096x28672", "--batches", "1,4096", "--json-out",
           _out("linear-int8.json")), "linear-int8.json"),
    Stage("plan-latency", "planner's predicted decode latency vs measured, bf16 / int8 / int4 g128 / NVFP4, "
          "8-layer Llama-3-8B, CUDA graphs; the refit profile is kept in the JSON", 50, 200,
          ("benchmarks/plan_latency.py", "--layers", "8", "--prompt-len", "128", "--new-tokens", "64", "--warmup",
           "1", "--repeats", "3", "--cuda-graphs", "--calibrate", "gpu-suite", "--json-out", _out("plan-latency.json")),
          "plan-latency.json"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# --------------------------------------------------------------------------- claims and targets

def _linear(m: int | None):
    """(label, speed-up) of linear_kernels.py rows at batch ``m`` (every row for None)."""
    def pick(d: dict) -> list[tuple[str, float]]:
        return [(f"{r['in_features']}x{r['out_features']}" + ("" if m else f" M={r['m']}"), r["speedup"])
                for r in d["rows"] if m is None or r["m"] == m]
    return pick


def _sparse24(variant: str):
    def pick(d: dict) -> list[tuple[str, float]]:
        return [(f"{r['in_features']}x{r['out_features']}", r[variant]["speedup"]) for r in d["rows"] if r["m"] == 1]
    return pick


def _kv_int4_32k(d: dict) -> list[tuple[str, float]]:
    return [(f"B={r['batch']}, vs SDPA default {r['speedup']:.2f}x", r["speedup_vs_best_bf16"])
            for r in d["rows"] if r["format"] == "int4" and r["context"] == 32768]


def _decode(d: dict) -> list[tuple[str, float]]:
    graphs = all(m.get("cuda_graphs") for m in d["models"])
    tps = ", ".join(f"{m['decode_tokens_per_s']:.0f}" for m in d["models"])
    return [(f"{tps} tok/s{'' if graphs else ', eager (graph capture failed)'}", d["speedup_decode"])]


def _planner(d: dict) -> list[tuple[str, float]]:
    return [(f"{r['format']} {r['decode_error']:+.1%}", abs(r["decode_error"])) for r in d["rows"]
            if r["decode_error"] is not None]


def _gpu_tests(d: dict) -> list[tuple[str, float]]:
    if not d["passed"] and not d["failed"] and not d["error"]:
        return []                                        # everything skipped: not on a GPU
    done = "" if d["complete"] else ", cut short"
    return [(f"{d['passed']} passed, {d['skipped']} skipped{done}", d["failed"] + d["error"])]


def _ref_errors(results: dict) -> list[tuple[str, float]]:
    """The kernels' own agreement with their references while benchmarked (sparse24, KV)."""
    out = []
    for r in (results.get("sparse24") or {}).get("rows", []):
        out += [(f"2:4 {v} {r['in_features']}x{r['out_features']}", r[v]["rel_err"])
                for v in ("sp24_bf16", "sp24_int4", "int4")]
    kv = (results.get("kv-attention") or {}).get("rows", [])
    out += [(f"KV {r['format']} {r['context']}", r["rel_err"]) for r in kv]
    return out


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str
    stage: str                      # the stage whose result it reads ("*": all results)
    target: float | None            # None: reported, no target
    higher_is_better: bool
    kind: str                       # "speedup", "error" (a fraction), "count" or "rel_err"
    source: str
    pick: object                    # result dict -> [(label, value)]

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return {"speedup": f">= {self.target:.1f}x bf16", "error": f"within {self.target:.0%}",
                "count": f"{self.target:.0f} failures", "rel_err": f"<= {self.target:.0e}"}[self.kind]


CLAIMS = (
    Claim("int4 g128 linear, M = 1", "linear-int4", 3.0, True, "speedup", "kernels issue", _linear(1)),
    Claim("int4 g128 linear, M = 16", "linear-int4", 2.5, True, "speedup", "kernels issue", _linear(16)),
    Claim("int4 g128 linear, every M", "linear-int4", 1.0, True, "speedup", "kernels issue (never slower)",
          _linear(None)),
    Claim("end-to-end decode, int4 g128 vs bf16", "decode", 2.5, True, "speedup", "kernels issue", _decode),
    Claim("NVFP4 linear, M = 1", "linear-nvfp4", 2.8, True, "speedup", "NVFP4 issue", _linear(1)),
    Claim("NVFP4 linear, every M", "linear-nvfp4", 1.0, True, "speedup", "NVFP4 issue (never slower)",
          _linear(None)),
    Claim("2:4 bf16 linear, M = 1", "sparse24", 1.5, True, "speedup", "2:4 issue", _sparse24("sp24_bf16")),
    Claim("2:4 + int4 g128 linear, M = 1", "sparse24", 4.0, True, "speedup", "2:4 issue", _sparse24("sp24_int4")),
    Claim("int4 KV decode attention, 32k tokens (vs fastest bf16 SDPA)", "kv-attention", 2.5, True, "speedup",
          "KV-cache issue", _kv_int4_32k),
    Claim("FP8 W8A8 linear, M = 1", "linear-fp8", 1.6, True, "speedup", "issue 18", _linear(1)),
    Claim("FP8 W8A8 linear, M = 4096", "linear-fp8", 1.6, True, "speedup", "issue 18", _linear(4096)),
    Claim("INT8 W8A8 linear, every M", "linear-int8", None, True, "speedup", "issue 18 (no target)", _linear(None)),
    Claim("planner decode latency, every format", "plan-latency", 0.15, False, "error", "planner issue", _planner),
    Claim("GPU tests at real shapes", "gpu-tests", 0, False, "count", "issue 19", _gpu_tests),
    Claim("benchmarked kernels vs their references", "*", REF_TOL, False, "rel_err", "issue 19", _ref_errors),
)


def _value_text(kind: str, v: float) -> str:
    return {"speedup": f"{v:.2f}x", "error": f"{v:.1%}", "count": f"{v:.0f} failed", "rel_err": f"{v:.1e}"}[kind]


def evaluate(claim: Claim, results: dict, stages: dict) -> dict:
    """One row of the table: the worst measured value over the claim's rows against its target."""
    row = {"claim": claim.name, "target": claim.target_text(), "stage": claim.stage, "source": claim.source}
    data = results if claim.stage == "*" else results.get(claim.stage)
    picked = [] if data is None else claim.pick(data)
    if not picked:
        why = [f"{n}: {stages[n]['status']}" for n in (("sparse24", "kv-attention") if claim.stage == "*"
                                                         else (claim.stage,)) if n in stages]
        return {**row, "status": "not measured", "measured": None, "detail": "; ".join(why) or "stage not run"}
    values = [v for _, v in picked]
    worst = min(values) if claim.higher_is_better else max(values)
    if claim.target is None:
        status = "info"
    elif claim.higher_is_better:
        status = "pass" if worst >= claim.target else "MISS"
    else:
        status = "pass" if worst <= claim.target else "MISS"
    detail = ", ".join(f"{label} {_value_text(claim.kind, v)}" if claim.kind != "count" else label
                       for label, v in picked)
    return {**row, "status": status, "measured": worst, "measured_text": _value_text(claim.kind, worst),
            "detail": detail}


# --------------------------------------------------------------------------- the report

def markdown(report: dict) -> str:
    d = report.get("device") or {}
    head = (f"{d.get('name', 'no GPU')} (capability {d.get('capability', '-')}, {d.get('sms', '-')} SMs), "
            f"torch {d.get('torch', '-')}, Triton {d.get('triton', '-')}, CUDA {d.get('torch_cuda', '-')}, "
            f"driver {d.get('driver') or '-'}")
    lines = [f"# GPU suite: {head}", "",
             f"{report['started']}, budget {report['budget_s']:.0f} s, {report['elapsed_s']:.0f} s used: "
             f"`{report['command']}`", "",
             "| claim | target | measured (worst) | status | rows |", "|---|---|---|---|---|"]
    for c in report["claims"]:
        lines.append(f"| {c['claim']} | {c['target']} | {c.get('measured_text') or '-'} | {c['status']} | "
                     f"{c['detail']} |")
    lines += ["", "| stage | status | estimate s | elapsed s | note |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        el = "-" if s.get("elapsed_s") is None else f"{s['elapsed_s']:.0f}"
        lines.append(f"| {s['name']} | {s['status']} | {s['estimate_s']} | {el} | {s.get('note') or ''} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, path: Path) -> None:
    """The JSON and its markdown table (same name, .md), each replaced atomically."""
    report["claims"] = [evaluate(c, report["results"], {s["name"]: s for s in report["stages"]}) for c in CLAIMS]
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, json.dumps(report, indent=2) + "\n"), (path.with_suffix(".md"), markdown(report))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)


def parse_pytest(output: str) -> dict:
    """Counts from ``pytest -v`` lines (complete or cut short)."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "failures": []}
    for test, outcome in re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M):
        key = {"XFAIL": "skipped", "XPASS": "passed"}.get(outcome, outcome.lower())
        counts[key] += 1
        if key in ("failed", "error"):
            counts["failures"].append(test)
    counts["complete"] = re.search(r"^=+ .*\d+ (passed|failed|skipped|deselected|error).* in [\d.]+s", output,
                                   re.M) is not None
    return counts


# --------------------------------------------------------------------------- running

def fits(stage: Stage, used_s: float, budget_s: float) -> bool:
    return used_s + stage.estimate_s <= budget_s


def select(only: str | None, skip: str | None) -> list[Stage]:
    def names(text):
        got = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in got if n not in STAGE_NAMES]
        if bad:
            raise SystemExit(f"gpu_suite.py: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGE_NAMES)}")
        return set(got)
    keep = names(only) | {"sanity"} if only else set(STAGE_NAMES)
    drop = names(skip) - {"sanity"} if skip else set()
    return [s for s in STAGES if s.name in keep and s.name not in drop]


def dry_run(stages: list[Stage], budget_s: float, output: Path) -> str:
    lines = [f"benchmarks/gpu_suite.py --dry-run: {len(stages)} stages, budget {budget_s:.0f} s",
             f"  {'#':>2}  {'stage':<13} {'est s':>5} {'cap s':>5}  what"]
    used, total = 0.0, 0
    for i, s in enumerate(stages, 1):
        total += s.estimate_s
        note = ""
        if fits(s, used, budget_s):
            used += s.estimate_s
        else:
            note = f"  [would be skipped: needs {s.estimate_s} s, {budget_s - used:.0f} s left]"
        lines.append(f"  {i:>2}  {s.name:<13} {s.estimate_s:>5} {s.cap_s:>5}  {s.what}{note}")
        env = " ".join(f"{k}={v}" for k, v in s.env)
        lines.append(f"      $ {env + ' ' if env else ''}python {' '.join(_quote(a) for a in s.command('<work>'))}")
    verdict = "fits" if total <= budget_s else f"exceeds it: stages past {used:.0f} s are skipped"
    lines += [f"total estimate {total} s ({total / 60:.1f} min) for a budget of {budget_s:.0f} s: {verdict}",
              "every stage: cwd = the repo root, PYTHONPATH = the repo root, COMPRESS_CACHE_DIR = <work>/cache "
              "(autotuned configs shared by the stages)",
              f"results: {output} and {output.with_suffix('.md').name}, stage output in "
              f"{output.with_suffix('.log').name}"]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def stage_env(stage: Stage, work: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONUNBUFFERED="1", COMPRESS_CACHE_DIR=str(work / "cache"), **dict(stage.env))
    return env


class Runner:
    """Runs stages as child processes (one at a time), keeps their output, kills one on timeout."""

    def __init__(self, work: Path, log: Path):
        self.work, self.log, self.proc = work, log, None

    def run(self, stage: Stage, timeout_s: float) -> dict:
        out_path = self.work / f"{stage.name}.out"
        cmd = [sys.executable, *stage.command(str(self.work))]
        start = time.monotonic()
        with open(out_path, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(stage, self.work), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc, timed_out = self.proc.wait(timeout=max(1.0, timeout_s)), False
            except subprocess.TimeoutExpired:
                self.kill()
                rc, timed_out = None, True
            self.proc = None
        elapsed = time.monotonic() - start
        text = out_path.read_text(errors="replace")
        with open(self.log, "a") as log:
            log.write(f"\n===== {stage.name}: {' '.join(cmd)}\n{text}\n===== {stage.name}: "
                      f"{'timed out' if timed_out else f'exit {rc}'} after {elapsed:.1f} s\n")
        return {"returncode": rc, "timed_out": timed_out, "elapsed_s": elapsed, "output": text}

    def kill(self) -> None:
        """End the running stage and everything it started (its own process group)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def read_result(stage: Stage, work: Path, output: str) -> dict | None:
    if stage.name == "gpu-tests":
        return parse_pytest(output)
    path = work / stage.result if stage.result else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def run_stage(stage: Stage, runner: Runner, timeout_s: float, report: dict) -> dict:
    got = runner.run(stage, timeout_s)
    result = read_result(stage, runner.work, got["output"])
    if result is not None:
        report["results"][stage.name] = result
    if got["timed_out"]:
        status, note = "timed out", f"killed after {got['elapsed_s']:.0f} s"
    elif got["returncode"] != 0:
        last = [ln for ln in got["output"].strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        status, note = "failed", f"exit {got['returncode']}: {last[0][:200]}"
    else:
        status, note = "ok", None
    return {"status": status, "note": note, "returncode": got["returncode"], "elapsed_s": got["elapsed_s"],
            "output_tail": got["output"][-4000:]}


def new_report(stages: list[Stage], budget_s: float, command: str, work: Path) -> dict:
    return {"suite": "benchmarks/gpu_suite.py", "version": 1, "command": command,
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "budget_s": budget_s, "elapsed_s": 0.0, "work_dir": str(work), "device": None, "results": {},
            "stages": [{"name": s.name, "what": s.what, "command": "python " + " ".join(s.command("<work>")),
                        "estimate_s": s.estimate_s, "status": "pending"} for s in stages], "autotune": {}}


def run_suite(stages: list[Stage], budget_s: float, output: Path, command: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    log = output.with_suffix(".log")
    output.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    runner = Runner(work, log)
    start = time.monotonic()
    report = new_report(stages, budget_s, command, work)

    def save():
        report["elapsed_s"] = time.monotonic() - start
        report["autotune"] = _autotune_tables(work / "cache")
        write_report(report, output)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        for entry, stage in zip(report["stages"], stages):
            used = time.monotonic() - start
            if status == 2:
                entry.update(status="not run", note="the sanity phase failed")
                continue
            if not fits(stage, used, budget_s):
                entry.update(status="skipped", note=f"needs about {stage.estimate_s} s, "
                                                    f"{budget_s - used:.0f} s of the budget left")
                print(f"gpu_suite: {stage.name}: skipped ({entry['note']})", flush=True)
                continue
            print(f"gpu_suite: {stage.name}: running (estimate {stage.estimate_s} s, {budget_s - used:.0f} s "
                  f"left) ...", flush=True)
            entry["status"] = "running"
            save()
            entry.update(run_stage(stage, runner, min(stage.cap_s, budget_s - used), report))
            print(f"gpu_suite: {stage.name}: {entry['status']} in {entry['elapsed_s']:.0f} s"
                  f"{': ' + entry['note'] if entry['note'] else ''}", flush=True)
            if stage.name == "sanity":
                report["device"] = (report["results"].get("sanity") or {}).get("device")
                if entry["status"] != "ok":
                    status = 2
                    print(f"gpu_suite: the sanity phase failed, nothing else runs:\n{entry['output_tail'][-1500:]}",
                          file=sys.stderr, flush=True)
            elif entry["status"] != "ok":
                status = max(status, 1)
            save()
    except KeyboardInterrupt as exc:
        runner.kill()
        for entry in report["stages"]:
            if entry["status"] in ("pending", "running"):
                entry.update(status="not run", note=f"interrupted ({exc})")
        status = max(status, 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        save()
    print(markdown(report), flush=True)
    print(f"wrote {output}, {output.with_suffix('.md').name}, {log.name}", flush=True)
    return status


def _autotune_tables(cache: Path) -> dict:
    out = {}
    for f in sorted(cache.glob("autotune-*.json")) if cache.is_dir() else []:
        try:
            out[f.name] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return out


def default_output() -> Path:
    out = os.environ.get("OUT")
    return (Path(out) if out else ROOT / "benchmarks" / "results") / "gpu-suite.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget in seconds (default {DEFAULT_BUDGET_S}); stages that would not fit "
                        f"are skipped")
    p.add_argument("--only", help=f"comma-separated stages to run (sanity always runs): {', '.join(STAGE_NAMES)}")
    p.add_argument("--skip", help="comma-separated stages to leave out")
    p.add_argument("--output", type=Path, default=None,
                   help="the JSON (default $OUT/gpu-suite.json when OUT is set, else benchmarks/results/"
                        "gpu-suite.json); the .md table and the .log go next to it")
    p.add_argument("--dry-run", action="store_true", help="list the stages, their estimates and the total; run nothing")
    args = p.parse_args(argv)
    stages = select(args.only, args.skip)
    output = (args.output or default_output()).resolve()
    if args.dry_run:
        print(dry_run(stages, args.budget_s, output))
        return 0
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_suite(stages, args.budget_s, output, command.strip())


if __name__ == "__main__":
    sys.exit(main())
