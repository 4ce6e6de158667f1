import json
import logging
from pathlib import Path

import pytest
import torch

import compress
from compress.data import read_text, tokenize, windows
from compress.errors import DataError, MissingPathError


def test_calibration_windows_are_seeded_distinct_slices_of_the_text(tokenizer, text_file):
    calib = compress.calibration_data(tokenizer, text_file, samples=6, seqlen=16, seed=3)
    again = compress.calibration_data(tokenizer, text_file, samples=6, seqlen=16, seed=3)
    other = compress.calibration_data(tokenizer, text_file, samples=6, seqlen=16, seed=4)
    assert calib.input_ids.shape == (6, 16) and torch.equal(calib.input_ids, again.input_ids)
    assert not torch.equal(calib.input_ids, other.input_ids)
    stream = tokenize(tokenizer, text_file.read_text())
    starts = []
    for row in calib.input_ids:                      # every sample is a window-aligned slice
        hits = [i for i in range(0, stream.numel() - 15, 16) if torch.equal(stream[i:i + 16], row)]
        assert hits
        starts.append(hits[0])
    assert len(set(starts)) == 6


def test_too_few_windows_says_how_many_there_are(tokenizer, text_file):
    n = windows(tokenizer, text_file, 64).shape[0]
    with pytest.raises(DataError, match=f"holds {n} windows of 64 tokens"):
        compress.calibration_data(tokenizer, text_file, samples=n + 1, seqlen=64)


def test_text_shorter_than_one_window(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words")
    with pytest.raises(DataError, match="fewer than one window"):
        windows(tokenizer, path, 512)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MissingPathError, match="no such file"):
        read_text(tmp_path / "valid.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_binary_and_non_utf8_files_are_refused_by_name(tmp_path, caplog):
    rng = torch.Generator().manual_seed(0)
    cases = {
        "ls.txt": Path("/bin/ls").read_bytes() if Path("/bin/ls").is_file() else b"\x7fELF\x02\x01\x00" * 64,
        "random.txt": bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()),
        "records.jsonl": b'{"text": "a"}\n\x00\x01\x02',
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name} is a binary file, not text \(\d+ NUL bytes.*UTF-8 text file"):
            read_text(tmp_path / name)
    (tmp_path / "latin.txt").write_bytes(bytes(range(0x80, 0x100)) * 8)           # no NULs, none decodes
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8 text \(1024 of its 1024 characters"):
        read_text(tmp_path / "latin.txt")
    (tmp_path / "utf16.txt").write_text("some text", encoding="utf-16")
    with pytest.raises(DataError, match="utf16.txt is UTF-16 text; convert it to UTF-8"):
        read_text(tmp_path / "utf16.txt")
    # Negative control: real text with one stray Latin-1 byte (and a real U+FFFD) is read, with a warning.
    (tmp_path / "mostly.txt").write_bytes("caf\ufffd ol\u00e9 ".encode() * 50 + b"na\xefve")
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        text = read_text(tmp_path / "mostly.txt")
    assert text.endswith("na\ufffdve") and text.count("\ufffd") == 51
    assert "1 character(s) not UTF-8, replaced by U+FFFD" in caplog.text


def test_json_and_jsonl_records(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    assert read_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "b.json").write_text(json.dumps([{"body": "x"}]))
    assert read_text(tmp_path / "b.json", text_field="body") == "x"
    with pytest.raises(DataError, match="no field 'text'"):
        read_text(tmp_path / "b.json")


def test_hub_dataset_failure_is_explained(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hub dataset 'wikitext'.*config 'wikitext-2-raw-v1'.*split 'test'"):
        read_text("wikitext:wikitext-2-raw-v1@test")


def test_hub_dataset_text_is_joined(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split: datasets.Dataset.from_dict({"text": ["a", "", "b"]}))
    assert read_text("somebody/corpus") == "a\n\nb"
