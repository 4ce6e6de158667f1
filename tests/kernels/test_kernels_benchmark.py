"""benchmarks/linear_kernels.py runs end to end (tiny shapes, interpreter on the CPU) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from kernel_cases import triton_device  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "linear_kernels.py"


def test_kernel_benchmark_smoke(tmp_path, triton_device):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "k.json"
    assert bench.main(["--device", triton_device, "--shapes", "96x40", "--batches", "1,5", "--repeat", "1",
                       "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["m"] for r in data["rows"]] == [1, 5]
    for row in data["rows"]:
        assert row["ours_us"] > 0 and row["bf16_us"] > 0 and row["ideal_speedup"] > 1
        assert row["speedup"] == pytest.approx(row["bf16_us"] / row["ours_us"])
    assert data["copy_bandwidth_Bps"] > 0 and "machine" in data
