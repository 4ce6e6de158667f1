"""benchmarks/sparse24.py runs end to end in its --smoke mode (tiny shapes, the Triton interpreter on
the CPU), checks every variant against its reference, and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from kernel_cases import triton_device  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse24.py"


def test_sparse24_benchmark_smoke(tmp_path, triton_device):
    spec = importlib.util.spec_from_file_location("bench_sparse24", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sp24.json"
    args = ["--smoke", "--output", str(out)] + ([] if triton_device == "cpu" else ["--device", triton_device])
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["in_features"], r["out_features"], r["m"]) for r in rows] == [(64, 40, 1), (64, 40, 3),
                                                                           (136, 24, 1), (136, 24, 3)]
    for row in rows:
        for v in bench.VARIANTS:
            assert row[v]["us"] > 0 and row[v]["rel_err"] < bench.SMOKE_TOL
        for v in bench.VARIANTS[1:]:
            assert row[v]["speedup"] == pytest.approx(row["bf16"]["us"] / row[v]["us"])
            assert row[v]["weight_bytes"] < row["bf16"]["weight_bytes"] and row[v]["ideal_speedup"] > 1
        # bytes: 2:4 bf16 = values + meta = 9/16 of dense; 2:4 int4 below the dense int4.
        assert row["sp24_bf16"]["weight_bytes"] == row["bf16"]["weight_bytes"] * 9 // 16
        assert row["sp24_int4"]["weight_bytes"] < row["int4"]["weight_bytes"]
        assert (row["sp24_bf16"]["target"] == 1.5) == (row["m"] == 1)
    assert "machine" in data and data["command"].startswith("python benchmarks/sparse24.py")
