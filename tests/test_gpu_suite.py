"""benchmarks/gpu_suite.py without a GPU: the dry run and its estimate, the budget, the report written
from fake results (pass / MISS against the targets), and benchmarks/gpu_sanity.py's checks under the
Triton interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module               # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = _load("gpu_suite")


def test_dry_run_lists_every_stage_and_fits_the_default_budget(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert suite.main(["--dry-run", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    listed = re.findall(r"^\s+\d+\s+(\S+)\s+(\d+)\s+(\d+)\s", text, re.M)
    assert [name for name, _, _ in listed] == list(suite.STAGE_NAMES)
    assert listed[0][0] == "sanity" and int(listed[0][1]) <= 30          # the fail-fast phase comes first
    total = int(re.search(r"total estimate (\d+) s", text).group(1))
    # 9.5 minutes: with a ~1 minute start it leaves a 15-minute lease room for one short rerun
    assert total == sum(int(est) for _, est, _ in listed) <= suite.DEFAULT_BUDGET_S <= 570
    assert "fits" in text and "would be skipped" not in text
    for stage in suite.STAGES:                                            # each command is shown
        assert " ".join(stage.command("<work>")).split(" -k ")[0] in text
    assert not out.exists()                                               # a dry run writes nothing


def test_dry_run_shows_what_a_small_budget_skips(capsys):
    est = {s.name: s.estimate_s for s in suite.STAGES}
    budget = est["sanity"] + est["linear-int4"] + est["decode"] // 2         # room for the first two only
    assert suite.main(["--dry-run", "--budget-s", str(budget), "--only", "linear-int4,decode"]) == 0
    text = capsys.readouterr().out
    names = re.findall(r"^\s+\d+\s+(\S+)", text, re.M)
    assert names == ["sanity", "linear-int4", "decode"]                   # sanity always runs
    assert re.search(rf"decode .*would be skipped: needs {est['decode']} s, {est['decode'] // 2} s left", text)
    assert "exceeds it" in text
    with pytest.raises(SystemExit, match="unknown stage.*lineal"):
        suite.main(["--dry-run", "--only", "lineal"])


def test_default_output_goes_to_OUT(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert suite.default_output() == tmp_path / "gpu-suite.json"
    monkeypatch.delenv("OUT")
    assert suite.default_output() == BENCH / "results" / "gpu-suite.json"


def _linear_rows(speedups: dict) -> dict:
    return {"rows": [{"in_features": k, "out_features": n, "m": m, "speedup": s}
                     for (k, n, m), s in speedups.items()]}


def _fake_report() -> dict:
    results = {
        "sanity": {"ok": True, "device": {"name": "NVIDIA H200", "capability": "9.0", "sms": 132}},
        "gpu-tests": suite.parse_pytest("tests/a.py::t[1] PASSED [ 50%]\ntests/a.py::t[2] FAILED [100%]\n"
                                        "===== 1 failed, 1 passed in 3.0s ====="),
        "linear-int4": _linear_rows({(4096, 14336, 1): 3.2, (14336, 4096, 1): 3.05, (4096, 14336, 16): 2.4,
                                     (14336, 4096, 16): 2.7, (4096, 14336, 64): 1.3}),
        "linear-fp8": _linear_rows({(4096, 4096, 1): 1.7, (4096, 4096, 4096): 1.62}),
        "linear-int8": _linear_rows({(4096, 28672, 1): 1.9}),
        "sparse24": {"rows": [{"in_features": 4096, "out_features": 14336, "m": 1,
                               "sp24_bf16": {"speedup": 1.6, "rel_err": 3e-3},
                               "sp24_int4": {"speedup": 3.1, "rel_err": 4e-3},
                               "int4": {"speedup": 3.3, "rel_err": 4e-3}}]},
        "kv-attention": {"rows": [{"format": "int4", "context": 32768, "batch": 8, "speedup": 2.9,
                                   "speedup_vs_best_bf16": 2.6, "rel_err": 0.05}]},
        "plan-latency": {"rows": [{"format": "bf16", "decode_error": 0.05}, {"format": "int4-g128",
                                                                             "decode_error": -0.2}]},
    }
    stages = [{"name": n, "status": "ok", "estimate_s": 10, "elapsed_s": 9.0} for n in results]
    stages += [{"name": "decode", "status": "skipped", "estimate_s": 75, "note": "needs about 75 s, 20 s left"},
               {"name": "linear-nvfp4", "status": "timed out", "estimate_s": 35, "elapsed_s": 90.0}]
    return {"command": "python benchmarks/gpu_suite.py", "started": "2026-12-05 10:00 UTC", "budget_s": 480,
            "elapsed_s": 470.0, "device": results["sanity"]["device"], "results": results, "stages": stages}


def test_report_marks_every_claim_against_its_target(tmp_path):
    out = tmp_path / "r" / "gpu-suite.json"
    suite.write_report(_fake_report(), out)
    data = json.loads(out.read_text())
    claims = {c["claim"]: c for c in data["claims"]}
    assert set(claims) == {c.name for c in suite.CLAIMS}
    expect = {"int4 g128 linear, M = 1": ("pass", 3.05), "int4 g128 linear, M = 16": ("MISS", 2.4),
              "int4 g128 linear, every M": ("pass", 1.3), "FP8 W8A8 linear, M = 1": ("pass", 1.7),
              "FP8 W8A8 linear, M = 4096": ("pass", 1.62), "2:4 bf16 linear, M = 1": ("pass", 1.6),
              "2:4 + int4 g128 linear, M = 1": ("MISS", 3.1),
              "int4 KV decode attention, 32k tokens (vs fastest bf16 SDPA)": ("pass", 2.6),
              "planner decode latency, every format": ("MISS", 0.2), "GPU tests at real shapes": ("MISS", 1),
              "benchmarked kernels vs their references": ("MISS", 0.05), "INT8 W8A8 linear, every M": ("info", 1.9)}
    for name, (status, worst) in expect.items():
        assert (claims[name]["status"], claims[name]["measured"]) == (status, pytest.approx(worst)), name
    for name in ("end-to-end decode, int4 g128 vs bf16", "NVFP4 linear, M = 1"):
        assert claims[name]["status"] == "not measured" and claims[name]["measured"] is None
    assert "skipped" in claims["end-to-end decode, int4 g128 vs bf16"]["detail"]
    assert "timed out" in claims["NVFP4 linear, M = 1"]["detail"]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# GPU suite: NVIDIA H200 (capability 9.0, 132 SMs)")
    assert "| int4 g128 linear, M = 16 | >= 2.5x bf16 | 2.40x | MISS | 4096x14336 2.40x, 14336x4096 2.70x |" in md
    assert "| planner decode latency, every format | within 15% | 20.0% | MISS | bf16 +5.0% 5.0%, " in md
    assert "| GPU tests at real shapes | 0 failures | 1 failed | MISS | 1 passed, 0 skipped |" in md
    assert "| decode | skipped | 75 | - | needs about 75 s, 20 s left |" in md


def test_a_claim_flips_with_its_measurement():
    report = _fake_report()
    stages = {s["name"]: s for s in report["stages"]}
    claim = next(c for c in suite.CLAIMS if c.name == "int4 g128 linear, M = 16")
    assert suite.evaluate(claim, report["results"], stages)["status"] == "MISS"
    report["results"]["linear-int4"]["rows"][2]["speedup"] = 2.5                 # exactly at the target
    assert suite.evaluate(claim, report["results"], stages)["status"] == "pass"


def test_parse_pytest_counts_a_run_that_was_cut_short():
    text = ("tests/k/test_a.py::test_x[1-4096] PASSED                [  1%]\n"
            "tests/k/test_a.py::test_x[16-4096] FAILED               [  2%]\n"
            "tests/k/test_b.py::test_y SKIPPED (no cuda)             [  3%]\n"
            "tests/k/test_b.py::test_z ERROR                         [  4%]\n")
    got = suite.parse_pytest(text)
    assert (got["passed"], got["failed"], got["skipped"], got["error"], got["complete"]) == (1, 1, 1, 1, False)
    assert got["failures"] == ["tests/k/test_a.py::test_x[16-4096]", "tests/k/test_b.py::test_z"]
    assert suite.parse_pytest(text + "=========== 1 failed, 1 passed in 4.20s ===========\n")["complete"]


def _py(code: str) -> tuple[str, ...]:
    return ("-c", code)


def test_run_keeps_the_budget_and_writes_what_it_has(tmp_path, monkeypatch, capsys):
    """Real child processes: a stage that writes its JSON, one killed at its cap, one skipped by its
    estimate; the JSON and the table are written with everything measured so far."""
    write = "import json, sys; json.dump({0}, open(sys.argv[1], 'w'))"
    stages = [
        suite.Stage("sanity", "fake", 1, 30, (*_py(write.format({"ok": True, "device": {"name": "fake GPU"}})),
                                              "{work}/sanity.json"), "sanity.json"),
        suite.Stage("linear-int4", "fake", 1, 30,
                    (*_py(write.format({"rows": [{"in_features": 8, "out_features": 8, "m": 1, "speedup": 3.5}]})),
                     "{work}/linear-int4.json"), "linear-int4.json"),
        suite.Stage("decode", "hangs", 1, 2, _py(f"import os, time; open({str(tmp_path / 'pid')!r}, 'w').write("
                                                 f"str(os.getpid())); print('started', flush=True); time.sleep(60)")),
        suite.Stage("plan-latency", "too big", 10_000, 10, _py("raise SystemExit('must not run')")),
        suite.Stage("linear-fp8", "fails", 1, 30, _py("import sys; print('boom'); sys.exit(3)")),
    ]
    out = tmp_path / "gpu-suite.json"
    assert suite.run_suite(stages, 60, out, "test") == 1
    data = json.loads(out.read_text())
    status = {s["name"]: (s["status"], s.get("note")) for s in data["stages"]}
    assert status["sanity"][0] == status["linear-int4"][0] == "ok"
    assert status["decode"][0] == "timed out"
    with pytest.raises(ProcessLookupError):                               # killed, not left running
        os.kill(int((tmp_path / "pid").read_text()), 0)
    assert status["plan-latency"][0] == "skipped" and "needs about 10000 s" in status["plan-latency"][1]
    assert status["linear-fp8"] == ("failed", "exit 3: boom")
    assert data["device"] == {"name": "fake GPU"} and data["elapsed_s"] < 30
    claims = {c["claim"]: c["status"] for c in data["claims"]}
    assert claims["int4 g128 linear, M = 1"] == "pass"
    assert "started" in out.with_suffix(".log").read_text()
    assert "| int4 g128 linear, M = 1 | >= 3.0x bf16 | 3.50x | pass |" in out.with_suffix(".md").read_text()


def test_a_failed_sanity_phase_stops_the_suite(tmp_path):
    stages = [suite.Stage("sanity", "fails", 1, 30, _py("import sys; sys.exit('CUDA is not visible')")),
              suite.Stage("linear-int4", "never", 1, 30, _py("raise SystemExit(1)"))]
    out = tmp_path / "gpu-suite.json"
    assert suite.run_suite(stages, 60, out, "test") == 2
    data = json.loads(out.read_text())
    assert [(s["name"], s["status"]) for s in data["stages"]] == [("sanity", "failed"), ("linear-int4", "not run")]
    assert "CUDA is not visible" in data["stages"][0]["note"]


# --------------------------------------------------------------------------- benchmarks/gpu_sanity.py

def _sanity_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return "cpu"


def test_sanity_checks_pass_and_catch_a_wrong_kernel(tmp_path, monkeypatch):
    sanity = _load("gpu_sanity")
    device = _sanity_device()
    out = tmp_path / "sanity.json"
    assert sanity.main(["--device", device, "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] and [c["check"] for c in data["checks"]] == ["device", "triton", "int4_linear"]
    assert [r["m"] for r in data["int4_linear"]] == [1, 16] and all(r["rel_err"] < 1e-2 for r in data["int4_linear"])
    # negative control: a kernel that drops the last group is caught, with the shape in the message
    real = sanity.dequant_linear

    def wrong(x, packed, scale, *args, **kw):
        return real(x, packed, scale.clone().index_fill_(1, torch.tensor([3], device=scale.device), 0), *args, **kw)
    monkeypatch.setattr(sanity, "dequant_linear", wrong)
    bad = sanity.run(torch.device(device))
    assert not bad["ok"] and re.search(r"disagrees with its reference at M=1 N=256 K=512", bad["error"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_sanity_fails_fast_without_cuda(capsys):
    sanity = _load("gpu_sanity")
    assert sanity.main([]) == 2
    assert "CUDA is not visible" in capsys.readouterr().err


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("stage", [s for s in suite.STAGES if s.args[0].endswith(".py")], ids=lambda s: s.name)
def test_every_stage_passes_arguments_its_script_accepts(stage, monkeypatch, tmp_path):
    """A misspelt flag would cost a stage of a GPU lease: parse each command with its script's parser."""
    import argparse
    module = _load(Path(stage.args[0]).stem)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)              # exits (SystemExit 2) on an unknown flag
        raise _Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        module.main(stage.command(str(tmp_path))[1:])


def test_the_gpu_test_selection_still_finds_the_gpu_tests():
    """The gpu-tests stage selects tests by file and name: each file still holds tests it selects, and
    the real-shape tests of the four linear kernels are among them (skipped here, run on a GPU)."""
    import subprocess
    stage = next(s for s in suite.STAGES if s.name == "gpu-tests")
    args = [a for a in stage.args if a not in ("-v", "--durations=5")]
    out = subprocess.run([sys.executable, *args, "--collect-only", "-q"], cwd=BENCH.parent, capture_output=True,
                         text=True, timeout=300).stdout
    collected = set(re.findall(r"^(tests/\S+?)::(\w+)", out, re.M))
    # tests/quant/test_fp4.py parametrizes a "cuda" device only where torch sees a GPU
    assert {f for f, _ in collected} == set(suite.GPU_TEST_FILES) - {"tests/quant/test_fp4.py"}
    for f in ("test_dequant_linear_triton", "test_fp4_linear_triton", "test_sparse24_linear", "test_w8a8_linear"):
        assert (f"tests/kernels/{f}.py", "test_real_llama3_8b_shapes") in collected
