"""safetensors files read and written one tensor at a time.

``TensorSource`` reads single tensors out of a checkpoint's safetensors files with plain file reads
(no memory map: a file's pages read through a map stay counted in the process's resident memory
while it is open, so reading a 5 GiB shard tensor by tensor would still grow it by 5 GiB).

``ShardWriter`` writes one safetensors file whose tensors are known in advance (name, dtype,
shape): the header is written first, then each tensor at its own offset as it is produced, in any
order, so a writer holds no more than the tensor it is handed. The layout is the one the
safetensors library writes: tensors ordered by dtype (widest first, in the library's own dtype
order) then by name, so every tensor is aligned to its element size, the header padded with spaces
to a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_io import read_header

# safetensors dtype names <-> torch dtypes.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# The safetensors library's Dtype enum order (it writes the widest first: descending order).
_ST_RANK = {"BOOL": 0, "U8": 4, "I8": 5, "F8_E5M2": 6, "F8_E4M3": 7, "I16": 9, "U16": 10, "F16": 11, "BF16": 12,
            "I32": 13, "U32": 14, "F32": 15, "F64": 17, "I64": 18, "U64": 19}


class TensorEntry:
    """Where one tensor lies: its file, dtype name, shape and byte range in the data section."""

    __slots__ = ("name", "path", "dtype", "shape", "start", "end", "data_offset")

    def __init__(self, name: str, path: Path, info: dict, data_offset: int):
        self.name, self.path, self.data_offset = name, path, data_offset
        self.dtype, self.shape = info["dtype"], tuple(info["shape"])
        self.start, self.end = info["data_offsets"]

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} has dtype {self.dtype}, which torch cannot "
                                  f"hold; compress reads {', '.join(ST_DTYPES)}")
        return ST_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def floating(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


class TensorSource:
    """Every tensor of a list of safetensors files, by name, read on demand (``get``)."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            header = read_header(path)                      # integrity checks, errors naming the file
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.entries:
                    raise CheckpointError(f"tensor {name!r} appears in both {self.entries[name].path.name} and "
                                          f"{path.name}; the checkpoint is inconsistent, re-download or re-save it")
                self.entries[name] = TensorEntry(name, path, info, 8 + header_len)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its file into memory of its own."""
        e = self.entries[name]
        data = bytearray(e.end - e.start)          # read into it directly (no second copy of the bytes)
        with open(e.path, "rb", buffering=0) as fh:
            fh.seek(e.data_offset + e.start)
            view, got = memoryview(data), 0
            while got < len(data):
                n = fh.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != e.end - e.start:
            raise CheckpointError(f"{e.path} is truncated: tensor {name!r} is cut short; re-download it")
        if not data:
            return torch.empty(e.shape, dtype=e.torch_dtype)
        return torch.frombuffer(data, dtype=e.torch_dtype).reshape(e.shape)


class ShardWriter:
    """One safetensors file with the tensors ``plan`` names ({name: (torch dtype, shape)}), filled by
    ``write(name, tensor)`` in any order; ``close()`` checks that every tensor was written."""

    def __init__(self, path: Path, plan: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        order = sorted(plan, key=lambda k: (-_ST_RANK[TORCH_TO_ST[plan[k][0]]], k))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name in order:
            dtype, shape = plan[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.slots[name] = (offset, nbytes, dtype, tuple(shape))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.data_start = 8 + len(text)
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)
        self._fh.truncate(self.data_start + offset)
        self._pending = set(self.slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes, dtype, shape = self.slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{name}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        if name not in self._pending:
            raise RuntimeError(f"{name} written twice to {self.path.name}")
        self._fh.seek(self.data_start + offset)
        if nbytes:
            self._fh.write(memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self._pending.discard(name)

    def abort(self) -> None:
        """Close the file without the completeness check (the caller is failing anyway)."""
        self._fh.close()

    def close(self) -> None:
        self._fh.close()
        if self._pending:
            raise RuntimeError(f"{self.path.name}: {len(self._pending)} tensor(s) never written, e.g. "
                               f"{sorted(self._pending)[0]}")


__all__ = ["ST_DTYPES", "ShardWriter", "TensorEntry", "TensorSource"]
