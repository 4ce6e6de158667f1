"""Peak host and device memory of a stretch of work (one recipe pass), for the run report.

Host: the process's resident-set high-water mark (``VmHWM``), reset at the start of the stretch by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so each pass gets its own peak rather than
the process's. Where that file cannot be written (another OS, a locked-down container) a thread samples
the resident set every ``POLL_SECONDS`` instead, which can miss a spike shorter than that; the result
says which way it was measured. Device: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, summed over the visible GPUs (bytes held by tensors, not the allocator's
reserved cache).
"""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

POLL_SECONDS = 0.02


@dataclasses.dataclass
class PeakMemory:
    """Use as ``with PeakMemory() as peak: ...``; afterwards ``peak.host_bytes``, ``peak.device_bytes``
    (None without a GPU) and ``peak.host_method`` ("hwm" or "poll")."""

    host_bytes: int | None = None
    device_bytes: int | None = None
    host_method: str | None = None
    _poller: threading.Thread | None = dataclasses.field(default=None, repr=False)
    _stop: threading.Event | None = dataclasses.field(default=None, repr=False)
    _polled: int = dataclasses.field(default=0, repr=False)

    def __enter__(self) -> PeakMemory:
        if _reset_hwm():
            self.host_method = "hwm"
        elif _status_kib("VmRSS") is not None:
            self.host_method = "poll"
            self._stop = threading.Event()
            self._polled = _status_kib("VmRSS") * 1024
            self._poller = threading.Thread(target=self._poll, name="compress-peak-memory", daemon=True)
            self._poller.start()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        return self

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            rss = _status_kib("VmRSS")
            if rss is not None:
                self._polled = max(self._polled, rss * 1024)

    def __exit__(self, *exc) -> None:
        if self.host_method == "hwm":
            self.host_bytes = _status_kib("VmHWM") * 1024
        elif self.host_method == "poll":
            self._stop.set()
            self._poller.join()
            rss = _status_kib("VmRSS")
            self.host_bytes = max(self._polled, rss * 1024 if rss is not None else 0)
        if torch.cuda.is_available():
            self.device_bytes = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def _reset_hwm() -> bool:
    """Reset this process's resident-set high-water mark; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where there is no procfs."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
