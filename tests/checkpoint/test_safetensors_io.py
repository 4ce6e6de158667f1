import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from compress.checkpoint.safetensors_io import check_directory, read_header, read_state_dict, write_state_dict
from compress.errors import CheckpointError


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(64, 64), "b.bias": torch.randn(64)}, str(path))
    return path


def test_truncated_file_names_file_and_tensor(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as info:
        read_header(good_file)
    assert "model.safetensors" in str(info.value) and "truncated" in str(info.value)
    assert "'a.weight'" in str(info.value) or "'b.bias'" in str(info.value)


def test_garbage_header_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 50)
    with pytest.raises(CheckpointError, match="corrupt.*not valid JSON"):
        read_header(path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_header(path)


def test_tiny_file_is_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(path)


def test_index_naming_a_missing_shard(tmp_path, good_file):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model.safetensors", "c": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        check_directory(tmp_path)


def test_shards_and_index_round_trip(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(32, 32) for i in range(6)}
    files = write_state_dict(state, tmp_path, max_shard_bytes=3 * 32 * 32 * 4)
    assert len(files) == 2 and (tmp_path / "model.safetensors.index.json").exists()
    back = read_state_dict(tmp_path)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
