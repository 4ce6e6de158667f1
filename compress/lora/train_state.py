"""Saving and restoring the state of an adapter training run, so that an interrupted LoRA retraining
or distillation resumes at the step where it stopped instead of starting again.

One file (``torch.save``; written to a temporary name and renamed, so a crash while saving leaves
the previous state intact) holds: every trained tensor by name (adapters, norms, biases, and the
float32 masters of low-precision ones), the optimizer state, the step reached, the losses so far,
the seconds spent (a ``max_minutes`` budget counts them), the RNG state and a signature of the run
(config, data, trained tensors). A state whose signature differs from the current run's is
ignored with a warning: resuming someone else's run would silently train the wrong thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Config fields that may change between an interrupted run and its resumption.
_FREE_FIELDS = ("max_minutes", "checkpoint_every", "samples")


def run_signature(cfg, ids: torch.Tensor, named: dict[str, nn.Parameter]) -> str:
    """A digest of what determines the run: the config (less the free fields), the training
    windows and the names, shapes and dtypes of the trained tensors."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in _FREE_FIELDS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    for name, p in named.items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    return h.hexdigest()[:20]


@dataclasses.dataclass
class Resumed:
    step: int                    # optimizer steps already done
    losses: list[float]
    seconds: float               # training time already spent
    stopped: str | None


class TrainingCheckpoint:
    """The state file of one training run. ``every``: save after every that many steps (and at
    the end); 0 saves only at the end."""

    def __init__(self, path: str | os.PathLike, every: int, signature: str):
        self.path, self.every, self.signature = Path(path), every, signature

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def load(self, named: dict[str, nn.Parameter], masters: dict[str, nn.Parameter],
             optimizer: torch.optim.Optimizer) -> Resumed | None:
        """Restore the trained tensors and the optimizer in place; None when there is no usable state."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:                               # a damaged file must not stop the run
            log.warning("%s: cannot read the training state (%s); starting from step 0", self.path, exc)
            return None
        if state.get("version") != STATE_VERSION or state.get("signature") != self.signature:
            log.warning("%s: the saved training state belongs to another run (config, data or model "
                        "differ); starting from step 0 and replacing it", self.path)
            return None
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state["tensors"][name])
            for name, m in masters.items():
                m.copy_(state["masters"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        log.info("%s: resuming at step %d", self.path, state["step"])
        return Resumed(state["step"], list(state["losses"]), float(state["seconds"]), state.get("stopped"))

    def save(self, step: int, losses: list[float], seconds: float, stopped: str | None,
             named: dict[str, nn.Parameter], masters: dict[str, nn.Parameter],
             optimizer: torch.optim.Optimizer) -> None:
        state = {
            "version": STATE_VERSION, "signature": self.signature, "step": step, "losses": losses,
            "seconds": seconds, "stopped": stopped, "rng": torch.get_rng_state(),
            "tensors": {n: p.detach().cpu().clone() for n, p in named.items()},
            "masters": {n: m.detach().cpu().clone() for n, m in masters.items()},
            "optimizer": optimizer.state_dict(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
