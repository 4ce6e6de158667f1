"""Text for calibration and evaluation: files or hub datasets, tokenized into fixed windows.

A source is either a local file (plain text; ``.json``/``.jsonl`` take the ``text_field`` of
each record) or a hub dataset written ``NAME[:CONFIG][@SPLIT]``, e.g.
``wikitext:wikitext-2-raw-v1@test`` (needs the network or a local datasets cache). Documents are
joined with a blank line and tokenized once without special tokens; windows are consecutive,
non-overlapping slices of that token stream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from .errors import DataError, MissingPathError

log = logging.getLogger(__name__)

_FILE_SUFFIXES = {".txt", ".text", ".raw", ".md", ".json", ".jsonl", ".tokens"}
# A file is refused as not text when more than this share of its characters fail to decode as UTF-8
# (a few stray Latin-1 bytes in real text are replaced and logged instead).
_MAX_UNDECODABLE = 0.05


@dataclasses.dataclass
class CalibrationData:
    """``input_ids`` (samples, seqlen): windows drawn without replacement from the source."""

    input_ids: torch.Tensor
    source: str
    seed: int

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def __repr__(self) -> str:
        return f"CalibrationData(samples={self.samples}, seqlen={self.seqlen}, source={self.source!r}, seed={self.seed})"


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in _FILE_SUFFIXES


def read_text(source: str | os.PathLike, split: str = "test", text_field: str = "text") -> str:
    """All text of a file or hub dataset as one string (documents joined by a blank line)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in (".json", ".jsonl"):
            return _read_json_text(path, text_field)
        text = _read_file_text(path)
        if not text.strip():
            raise DataError(f"{path} is empty; give a file with text in it")
        return text
    if path.exists():
        raise DataError(f"{path} is a directory; give a text file or a hub dataset NAME[:CONFIG][@SPLIT]")
    if _looks_like_path(str(source)):
        raise MissingPathError(f"no such file: {path} (give an existing text file, or a hub dataset "
                               f"written NAME[:CONFIG][@SPLIT])")
    return _read_hub_text(str(source), split, text_field)


def _read_file_text(path: Path) -> str:
    """The file's text, decoded as UTF-8; DataError naming the file when it is binary (NUL bytes:
    an executable, an archive, a tensor file, UTF-16 text) or mostly not UTF-8."""
    raw = path.read_bytes()
    fix = "give a UTF-8 text file (or .json/.jsonl records, or a hub dataset NAME[:CONFIG][@SPLIT])"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; convert it to UTF-8 (iconv -f UTF-16 -t UTF-8) or {fix}")
    nul = raw.count(0)
    if nul:
        raise DataError(f"{path} is a binary file, not text ({nul} NUL bytes in {len(raw)} bytes); {fix}")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())        # replacements decoding made
    if bad > _MAX_UNDECODABLE * len(text):
        raise DataError(f"{path} is not UTF-8 text ({bad} of its {len(text)} characters do not decode); {fix}")
    if bad:
        log.warning("%s: %d character(s) not UTF-8, replaced by U+FFFD", path, bad)
    return text.replace("\r\n", "\n").replace("\r", "\n")       # universal newlines, as text mode reads


def _read_json_text(path: Path, text_field: str) -> str:
    raw = _read_file_text(path)
    try:
        records = ([json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(raw))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(records, dict):
        records = [records]
    texts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}: record {i} has no field {text_field!r}; pass text_field=<name>")
        texts.append(str(record[text_field]))
    return "\n\n".join(texts)


def _read_hub_text(spec: str, split: str, text_field: str) -> str:
    name, _, split_part = spec.partition("@")
    name, _, config = name.partition(":")
    split = split_part or split
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DataError(f"{spec!r} is not a local file, and loading it as hub dataset {name!r} "
                        f"(config {config or None!r}, split {split!r}) failed: {exc}. Give a path to a "
                        f"text file, or a dataset reachable from here") from None
    if text_field not in ds.column_names:
        raise DataError(f"hub dataset {name!r} has no column {text_field!r} (columns: {ds.column_names}); "
                        f"pass text_field=<name>")
    return "\n\n".join(t for t in ds[text_field] if t)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D token stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokenizer, source: str | os.PathLike, seqlen: int, *, split: str = "test",
            text_field: str = "text") -> torch.Tensor:
    """All complete non-overlapping windows, (n, seqlen), in text order."""
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    ids = tokenize(tokenizer, read_text(source, split, text_field))
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"{source} holds {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        f"use a smaller seqlen or more text")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_data(tokenizer, source: str | os.PathLike, samples: int = 128, seqlen: int = 512, *,
                     seed: int = 0, split: str = "train", text_field: str = "text") -> CalibrationData:
    """``samples`` windows of ``seqlen`` tokens drawn without replacement (seeded) from the source."""
    if samples < 1:
        raise DataError(f"samples must be at least 1, got {samples}")
    all_windows = windows(tokenizer, source, seqlen, split=split, text_field=text_field)
    if samples > all_windows.shape[0]:
        raise DataError(f"{source} holds {all_windows.shape[0]} windows of {seqlen} tokens, fewer than the "
                        f"{samples} samples asked for; ask for fewer samples or a shorter seqlen")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(all_windows.shape[0], generator=gen)[:samples].sort().values
    return CalibrationData(all_windows[pick].clone(), str(source), seed)
