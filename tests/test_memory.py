"""compress.memory.PeakMemory: per-stretch peaks, reset between stretches, and the polling fallback."""

import json
import threading

import pytest
import torch

from compress import memory
from compress.memory import PeakMemory

MiB = 1 << 20


def _hold(nbytes: int, seconds: float = 0.3) -> None:
    """Allocate and touch ``nbytes`` for ``seconds`` (long enough for the poller to see it)."""
    block = torch.ones(nbytes // 4, dtype=torch.float32)
    threading.Event().wait(seconds)
    del block


@pytest.mark.skipif(memory._status_kib("VmRSS") is None, reason="no /proc on this OS")
@pytest.mark.parametrize("method", ["hwm", "poll"])
def test_peak_sees_an_allocation_and_resets(monkeypatch, method):
    if method == "poll":
        monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    elif not memory._reset_hwm():
        pytest.skip("/proc/self/clear_refs is not writable here")
    with PeakMemory() as big:
        base = memory._status_kib("VmRSS") * 1024
        _hold(256 * MiB)
    assert big.host_method == method
    assert big.host_bytes >= base + 240 * MiB
    with PeakMemory() as small:                       # a fresh stretch: the old peak is not carried over
        _hold(8 * MiB)
    assert small.host_bytes < big.host_bytes - 200 * MiB


def test_no_gpu_means_no_device_peak():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with PeakMemory() as peak:
        pass
    assert peak.device_bytes is None


def test_recipe_report_has_peaks_per_pass(tmp_path, base):
    from compress.recipe import load_recipe, run_recipe
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"version: 1\nmodel: {base}\npasses:\n  - method: rtn\n    bits: 4\n"
                           f"    group_size: 32\nexport:\n  output: {tmp_path / 'out'}\n")
    report = run_recipe(load_recipe(recipe_file), progress=False, echo=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["stages"]
    assert [r["name"] for r in saved] == [r.name for r in report.rows]
    for row in saved:
        if row["name"] in ("load", "rtn", "export"):
            assert row["peak_host_bytes"] > 50 * MiB, row      # torch alone keeps more than this resident
    assert "peak RSS MiB" in report.table()
