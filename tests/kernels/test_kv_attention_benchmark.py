"""benchmarks/kv_attention.py runs end to end in its --smoke mode (tiny shapes, the Triton interpreter
on the CPU) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from kernel_cases import triton_device  # noqa: F401  (fixture)


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_attention.py"


def test_kv_attention_benchmark_smoke(tmp_path, triton_device):
    spec = importlib.util.spec_from_file_location("bench_kv_attention", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kv.json"
    args = ["--smoke", "--output", str(out)] + ([] if triton_device == "cpu" else ["--device", triton_device])
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["format"], r["context"]) for r in rows] == [(f, c) for c in (80, 144) for f in bench.FORMATS]
    for row in rows:
        assert row["ours_us"] > 0 and row["bf16_us"]["default"] > 0
        assert row["speedup"] == pytest.approx(row["bf16_us"]["default"] / row["ours_us"])
        assert row["ours_bytes"] < row["bf16_bytes"] and row["ideal_speedup"] > 1
        assert row["rel_err"] < 2e-2                                  # the kernel agrees with the reference
        assert row["length"] + row["residual"] == row["context"]
    assert {r["residual"] for r in rows if r["format"] == "fp8"} == {0}
    assert "machine" in data and data["command"].startswith("python benchmarks/kv_attention.py")
