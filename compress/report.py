"""Per-stage measurements of a model as a recipe transforms it, printed as a table and kept as JSON.

Every stage row has the same columns, so later passes (pruning, distillation) only add rows:
perplexity (when the recipe evaluates), bytes (tensor bytes as a checkpoint would store them;
the export row gives the real size on disk), parameters, sparsity (fraction of exactly-zero
weights in the decoder linears, as the model computes with them), bits (nominal weight bits of the
decoder linears), bits_per_weight (codes plus scales and zero points, per linear weight) and the
peak host (resident set) and GPU memory of the stage's own work (not its evaluation; memory.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

from .modeling import find_decoder_layers
from .quant.packed import PackedLinear


@dataclasses.dataclass
class StageRow:
    name: str
    seconds: float
    perplexity: float | None = None
    bytes: int | None = None
    parameters: int | None = None
    sparsity: float | None = None
    bits: str | None = None
    bits_per_weight: float | None = None
    disk_bytes: int | None = None       # the stage's checkpoint on disk (recipes with an export write one)
    peak_host_bytes: int | None = None  # resident-set peak of the process during the stage's work (memory.py)
    peak_device_bytes: int | None = None    # GPU bytes held by tensors at the stage's peak (None without a GPU)
    detail: dict = dataclasses.field(default_factory=dict)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def summarize(model: nn.Module) -> dict:
    """bytes, parameters, sparsity, bits and bits_per_weight of ``model`` as it stands."""
    seen: set[tuple] = set()
    total_bytes = 0
    params = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen or t.is_meta:
            continue
        seen.add(key)
        if name.endswith(".weight_shape") or not _is_persistent(model, name):
            continue
        total_bytes += _tensor_bytes(t)
        # float8 tensors are W8A8 codes, counted with their packed module below
        if (t.is_floating_point() and t.dtype != torch.float8_e4m3fn
                and not name.endswith((".weight_scale", "_global_scale", ".input_scale"))):
            params += t.numel()
    _, layers = find_decoder_layers(model)
    zeros = weights = 0
    linear_bytes = 0
    bits: set[str] = set()
    for module in layers.modules():
        if isinstance(module, PackedLinear):
            params += module.in_features * module.out_features
            w = module.dequantize(torch.float32)
            linear_bytes += sum(_tensor_bytes(t) for name, t in module.named_buffers(recurse=False)
                                if name != "weight_shape")
            bits.add(module.label if getattr(module, "sparse_layout", False) else module.label.split()[0])
        elif isinstance(module, nn.Linear):
            w = module.weight
            linear_bytes += _tensor_bytes(w)
            bits.add(str(w.dtype).removeprefix("torch."))
        else:
            continue
        zeros += int((w == 0).sum())
        weights += w.numel()
    return {
        "bytes": total_bytes,
        "parameters": params,
        "sparsity": zeros / weights if weights else 0.0,
        "bits": "+".join(sorted(bits)),
        "bits_per_weight": 8 * linear_bytes / weights if weights else None,
    }


def _is_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, buffer = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer not in getattr(module, "_non_persistent_buffers_set", set())


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@dataclasses.dataclass
class Report:
    rows: list[StageRow] = dataclasses.field(default_factory=list)
    meta: dict = dataclasses.field(default_factory=dict)

    def add(self, row: StageRow) -> StageRow:
        self.rows.append(row)
        return row

    def to_dict(self) -> dict:
        return {**self.meta, "machine": machine(), "stages": [dataclasses.asdict(r) for r in self.rows]}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def table(self) -> str:
        w = max([22] + [len(r.name) + 2 for r in self.rows])
        bw = max([16] + [len(r.bits or "") + 2 for r in self.rows])      # a per-layer mix lists every format
        gpu = any(r.peak_device_bytes is not None for r in self.rows)
        head = f"{'stage':<{w}}{'perplexity':>11}{'size MiB':>10}{'params':>10}{'sparsity':>10}" \
               f"{'bits':>{bw}}{'bits/w':>8}{'seconds':>9}{'peak RSS MiB':>14}" + (f"{'peak GPU MiB':>14}" if gpu else "")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name:<{w}}{_fmt(r.perplexity, '.3f'):>11}{_fmt(_size(r) and _size(r) / 2**20, '.1f'):>10}"
                f"{_fmt(r.parameters and r.parameters / 1e6, '.1f', 'M'):>10}"
                f"{_fmt(r.sparsity and 100 * r.sparsity, '.2f', '%'):>10}{r.bits or '-':>{bw}}"
                f"{_fmt(r.bits_per_weight, '.2f'):>8}{r.seconds:>9.1f}"
                f"{_fmt(r.peak_host_bytes and r.peak_host_bytes / 2**20, '.0f'):>14}"
                + (f"{_fmt(r.peak_device_bytes and r.peak_device_bytes / 2**20, '.0f'):>14}" if gpu else ""))
        return "\n".join(lines)


def _size(row: StageRow) -> int | None:
    """Bytes on disk when the stage was written, else the tensor bytes a checkpoint would hold."""
    return row.disk_bytes if row.disk_bytes is not None else row.bytes


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"
