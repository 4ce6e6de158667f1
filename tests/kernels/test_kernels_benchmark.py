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


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_kernel_benchmark_w8a8_smoke(tmp_path, triton_device, fmt):
    """--format fp8 | int8: the W8A8 layer (activation quantization timed) against bf16."""
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "w8a8.json"
    assert bench.main(["--device", triton_device, "--format", fmt, "--shapes", "96x48", "--batches", "1,20",
                       "--repeat", "1", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["m"], r["format"], r["bits"]) for r in rows] == [(1, fmt, 8), (20, fmt, 8)]
    assert rows[1]["ideal_speedup"] == 2.0 and rows[0]["ideal_speedup"] > 1
    assert all(r["ours_us"] > 0 and r["target"] == (1.6 if fmt == "fp8" and r["m"] == 1 else 1.0) for r in rows)
