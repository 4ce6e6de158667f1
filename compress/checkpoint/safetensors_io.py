"""Reading and writing safetensors checkpoints, with the integrity checks a user needs.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. ``check_file`` validates that structure before any
tensor is read, so a truncated download or a corrupt file is reported by file and tensor name
instead of as an opaque deserialization error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 << 30

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking it against the file's size."""
    size = path.stat().st_size
    fix = f"re-download or re-export {path.name}"
    if size < 8:
        raise CheckpointError(f"{path} is {size} bytes long: too short to be a safetensors file; {fix}")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or corrupt: its header claims {header_len} bytes but "
                                  f"the file has {size - 8} after the length field; {fix}")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object; {fix}")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt: entry for tensor {name!r} is malformed; {fix}") from None
        if end > data_len:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section "
                                  f"but only {data_len} bytes are present; {fix}")
        if width is not None and end - start != numel * width:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} has {end - start} bytes for shape "
                                  f"{info['shape']} of {info['dtype']}; {fix}")
    return header


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index when there is one)."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is corrupt ({exc!r}); re-export the checkpoint") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists {missing} but they are not in {directory}; the checkpoint is "
                                  f"incomplete, copy or download the missing shards")
        return files
    return sorted(directory.glob("*.safetensors"))


def check_directory(directory: Path) -> list[Path]:
    """Validate every safetensors file of a checkpoint directory; return them."""
    files = weight_files(directory)
    for f in files:
        read_header(f)
    return files


def read_state_dict(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    files = check_directory(directory)
    if not files:
        raise CheckpointError(f"{directory} has no .safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                if key in state:
                    raise CheckpointError(f"tensor {key!r} appears in more than one file of {directory}")
                state[key] = fh.get_tensor(key)
    return state


def write_state_dict(state: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str] | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``state`` as one file, or as shards plus an index when it exceeds ``max_shard_bytes``."""
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_NAME), metadata=metadata)
        return [directory / SINGLE_NAME]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        paths.append(directory / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True))
    return paths


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def weights_bytes(directory: Path) -> int:
    """Bytes of the checkpoint's weight files, a low-rank correction's adapter/ included."""
    directory = Path(directory)
    adapter = directory / "adapter" / "adapter_model.safetensors"
    return sum(os.path.getsize(f) for f in weight_files(directory)) + (adapter.stat().st_size if adapter.is_file() else 0)
