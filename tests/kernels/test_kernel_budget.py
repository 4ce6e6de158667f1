"""Compile-time budgets (benchmarks/kernel_budget.py): every Triton decode kernel compiled for sm_90 on
the CPU must not spill, and its issue-bound speed-up over bf16 on an H100 must reach its target.

The kernels are compiled in a subprocess: this process runs under ``TRITON_INTERPRET=1`` (set by
conftest before torch is imported), and an interpreted kernel cannot be compiled. About 30 s on two
cores; nothing is cached between runs (the script uses a fresh Triton cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_budget.py"

_spec = importlib.util.spec_from_file_location("kernel_budget", SCRIPT)
kb = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kernel_budget", kb)          # dataclasses look their module up by name
_spec.loader.exec_module(kb)

# Kernels still under their target (issue 19, part 3, not done for them yet). Strict: once a kernel
# clears its target the test fails until it is taken off this list.
BELOW_TARGET = {
    "sparse24_int4_4096x4096": "2:4 + int4 M=1 loop about 0.46 warp-instructions/byte (select tree + decode)",
    "sparse24_int4_14336x4096": "2:4 + int4 M=1 loop about 0.46 warp-instructions/byte (select tree + decode)",
}


def _tools_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    missing = [t for t in ("ptxas", "cuobjdump") if not kb.tool(t).exists()]
    return f"Triton's {', '.join(missing)} not found under {kb.tool('').parent}" if missing else None


@pytest.fixture(scope="module")
def budget(tmp_path_factory) -> dict:
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("budget") / "kernel-budget.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json-out", str(out), "--label", "ci"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), f"kernel_budget.py wrote no JSON (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return {row["name"]: row for row in json.loads(out.read_text())["ci"]} | {"_table": proc.stdout}


def _row(budget: dict, case: str) -> dict:
    made = kb.cases()[case]()                           # the case's full name (shape in it)
    return budget[made.name]


@pytest.mark.parametrize("case", list(kb.cases()))
def test_decode_kernel_meets_its_budget(case, budget, request):
    if case in BELOW_TARGET:
        request.applymarker(pytest.mark.xfail(reason=BELOW_TARGET[case], strict=True))
    row = _row(budget, case)
    assert not row["spills"], f"{row['name']} spills: stack {row['stack_bytes']} B, {row['local_instructions']} LDL/STL"
    assert row["H100"]["issue_speedup"] >= row["target"], (
        f"{row['name']}: issue-bound {row['H100']['issue_speedup']:.2f}x < target {row['target']}x on H100 "
        f"({row['instructions_per_byte']:.3f} warp-instructions per byte, loop of {row['loop_instructions']}; "
        f"mix {row['loop_mix']})\n{budget['_table']}")


def test_the_model_arithmetic(budget):
    """The speed-ups follow the documented formula from the row's own counts."""
    row = _row(budget, "int4_4096x4096")
    g = kb.GPUS["H100"]
    total = row["loop_instructions"] * row["num_warps"] * row["iterations"] + \
        row["outside_instructions"] * row["num_warps"] * row["ctas"]
    assert row["warp_instructions"] == total
    t_issue = total / (g["sms"] * kb.SCHEDULERS_PER_SM * g["clock_hz"])
    t_bf16, t_bytes = row["bf16_bytes"] / g["hbm_Bps"], row["format_bytes"] / g["hbm_Bps"]
    assert row["H100"]["issue_speedup"] == pytest.approx(t_bf16 / max(t_bytes, t_issue))
    assert row["byte_speedup"] == pytest.approx(3.879, abs=1e-3)        # 2 / (0.5 + 2/128) bytes per weight


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FADD R1, R1, R2 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0050*/                   FMUL R1, R1, R1 ;
        /*0060*/                   SHFL.BFLY PT, R5, R1, 0x1, 0x1f ;
        /*0070*/                   FADD R1, R1, R5 ;
        /*0080*/              @!P1 BRA 0x40 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_main_loop_is_the_largest_loop_with_global_loads():
    """A larger loop without global loads (a reduction) is not the main loop; the self-branch at the
    end is no loop; a predicated branch is read through its predicate."""
    sass = kb.parse_sass(SASS)
    assert len(sass) == 11 and kb.opcode(sass[3][1]) == "BRA" and kb.opcode(sass[6][1]) == "SHFL"
    assert kb.main_loop(sass) == (0x10, 0x30)
    with pytest.raises(RuntimeError, match="no loop"):
        kb.main_loop([(a, i) for a, i in sass if not i.startswith("LDG")])
