"""A recipe's work directory: what lets an interrupted recipe restart from its last finished stage.

It sits beside the export (``<output>.work/``) and holds

- ``state.json``: for every finished pass, a fingerprint of the recipe up to and including it
  (model, dtype, calibration, evaluation and the passes so far), and the report rows so far;
- ``stage-<i>/``: the model after the last finished stage ``i``, as a checkpoint of ours (the real
  size on disk of every stage comes from these);
- ``teacher-<i>-<fingerprint>.safetensors``: the cached teacher targets of distillation pass ``i``;
- ``train-<i>-<fingerprint>.pt``: the adapter training state of LoRA / distillation pass ``i``
  (an interrupted training resumes at its last saved step).

A rerun of the same recipe finds the longest prefix of its stages whose fingerprints match,
loads that stage's checkpoint and goes on from there; a changed pass invalidates it and every
stage after it. The directory is removed once the export has been written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from torch import nn

from .checkpoint.export import export
from .checkpoint.safetensors_io import weights_bytes
from .report import StageRow

log = logging.getLogger(__name__)

STATE_VERSION = 1


def work_path(output: str | os.PathLike) -> Path:
    """The work directory of a recipe exporting to ``output``: ``<output>.work`` beside it."""
    output = Path(output).expanduser().resolve()
    return output.with_name(output.name + ".work")


def stage_fingerprints(recipe) -> list[str]:
    """fingerprints[i]: a digest of everything that determines the model after pass i (and its row)."""
    d = recipe.to_dict()
    common = {k: d.get(k) for k in ("model", "dtype", "calibration", "evaluation")}
    out = []
    h = hashlib.sha256(json.dumps(common, sort_keys=True, default=str).encode())
    for p in d["passes"]:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        out.append(h.copy().hexdigest()[:20])
    return out


@dataclasses.dataclass
class Resume:
    finished: int                 # passes done: the next pass to run is passes[finished]
    checkpoint: Path              # the model after pass finished - 1
    rows: list[StageRow]          # the report rows so far (load, teacher targets, finished passes)


class WorkDir:
    def __init__(self, path: str | os.PathLike, fingerprints: list[str]):
        self.path = Path(path)
        self.fingerprints = fingerprints

    @classmethod
    def beside(cls, output: str | os.PathLike, recipe) -> WorkDir:
        return cls(work_path(output), stage_fingerprints(recipe))

    # Both file names carry the pass's fingerprint: a file left by a run of another recipe (another
    # model, other earlier passes) is never picked up.
    def teacher_path(self, index: int) -> Path:
        return self.path / f"teacher-{index}-{self.fingerprints[index]}.safetensors"

    def train_state_path(self, index: int) -> Path:
        return self.path / f"train-{index}-{self.fingerprints[index]}.pt"

    def _read_state(self) -> dict | None:
        path = self.path / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable (%s); starting the recipe from the beginning", path, exc)
            return None
        return state if state.get("version") == STATE_VERSION else None

    def resume(self) -> Resume | None:
        """Where a rerun can start: after the longest matching prefix of finished stages."""
        state = self._read_state()
        if not state or not state.get("stages"):
            return None
        done = 0
        for stage, fp in zip(state["stages"], self.fingerprints):
            if stage != fp:
                break
            done += 1
        if done != len(state["stages"]):
            log.warning("%s: the recipe changed at pass %d since the interrupted run; starting from the "
                        "beginning", self.path, done)
            return None
        checkpoint = self.path / state["checkpoint"]
        if not (checkpoint / "config.json").is_file():
            log.warning("%s: the saved stage checkpoint is missing; starting from the beginning", checkpoint)
            return None
        rows = [StageRow(**r) for r in state["rows"]]
        for row in rows:
            row.detail["resumed"] = True
        return Resume(done, checkpoint, rows)

    def checkpoint(self, model: nn.Module, tokenizer, index: int) -> int:
        """Checkpoint the model after pass ``index`` (``stage-<index>/``); returns its bytes on disk.
        The stage counts as finished only once ``record`` has run."""
        self.path.mkdir(parents=True, exist_ok=True)
        return weights_bytes(export(model, tokenizer, self.path / f"stage-{index}", overwrite=True))

    def record(self, index: int, rows: list[StageRow]) -> None:
        """Mark pass ``index`` finished (its checkpoint written); keep the report rows so far."""
        old = self._read_state()
        name = f"stage-{index}"
        state = {"version": STATE_VERSION, "checkpoint": name, "stages": self.fingerprints[:index + 1],
                 "rows": [dataclasses.asdict(r) for r in rows]}
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
        tmp.replace(self.path / "state.json")
        if old and old.get("checkpoint") not in (None, name):
            shutil.rmtree(self.path / old["checkpoint"], ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
