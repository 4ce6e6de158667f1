"""The teacher's side of distillation: targets cached once, or a model run beside the student.

``TeacherTargets`` holds, for every training window, what the losses need from the teacher:
its top-k logits with their token ids and the logsumexp of all its logits at the distillation
temperature (so the top-k loss knows the mass outside the k), and the outputs of the chosen
decoder layers. It is computed in one no-grad pass before the model is compressed and saved as
one safetensors file, so a recipe never holds teacher and student at once and a resumed recipe
does not need the teacher again.

``LiveTeacher`` runs a teacher model at each step instead (full-vocabulary and reverse KL need
the whole distribution). On a GPU the teacher stays in CPU memory and accelerate streams its
layers onto the device one at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_submodules
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError
from ..modeling import find_decoder_layers, module_device, onloaded

log = logging.getLogger(__name__)

CACHE_VERSION = 1
HIDDEN_DTYPE = torch.bfloat16        # cached hidden states: 2 bytes per value, the range of float32


@dataclasses.dataclass
class TeacherBatch:
    """The teacher's targets for one micro-batch of B windows of T tokens."""

    logits: torch.Tensor | None = None        # (B, T, V) live teacher, full vocabulary
    values: torch.Tensor | None = None        # (B, T, k) top-k logits
    indices: torch.Tensor | None = None       # (B, T, k) their token ids
    logsumexp: torch.Tensor | None = None     # (B, T) logsumexp(logits / T) over the vocabulary
    hidden: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)   # layer -> (B, T, H)


def resolve_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """Decoder-layer indices (negative from the end; None = all) as sorted non-negative ints."""
    if layers is None:
        return list(range(num_layers))
    out = []
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ConfigError(f"hidden_layers entry {i} is out of range for a model with {num_layers} decoder layers")
        out.append(j)
    return sorted(set(out))


def _teacher_forward(model: nn.Module, ids: torch.Tensor, layers: list[int], grad: bool = False):
    """(logits (B, T, V), {layer: output (B, T, H)}) of ``model`` on ids (B, T)."""
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, use_cache=False, output_hidden_states=bool(layers))
    # hidden_states[0] is the embedding output; hidden_states[i + 1] the output of layer i.
    hidden = {i: out.hidden_states[i + 1] for i in layers} if layers else {}
    return out.logits, hidden


def top_k_targets(logits: torch.Tensor, k: int, temperature: float):
    """(values (.., k), indices (.., k) int32, logsumexp(logits / T) (..)) of float32 logits."""
    logits = logits.float()
    values, indices = logits.topk(k, dim=-1)
    return values, indices.to(torch.int32), torch.logsumexp(logits / temperature, dim=-1)


def windows_key(ids: torch.Tensor) -> str:
    """A digest of the training windows (S, T) that cached targets belong to."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())        # the same tokens cut into other windows differ
    h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:20]


@dataclasses.dataclass
class TeacherTargets:
    """Cached targets for ``samples`` windows (see the module docstring)."""

    key: str
    values: torch.Tensor | None               # (S, T, k) float32
    indices: torch.Tensor | None              # (S, T, k) int32
    logsumexp: torch.Tensor | None            # (S, T) float32
    hidden: dict[int, torch.Tensor]           # layer -> (S, T, H) bfloat16
    temperature: float
    k: int | None = None                      # serve only the first k of the cached logits

    def check(self, cfg, ids: torch.Tensor, layers: list[int]) -> None:
        """Raise unless these targets serve ``cfg`` on windows ``ids``: the same windows and
        temperature, at least top_k logits per token, and every hidden layer asked for."""
        problems = []
        if self.key != windows_key(ids):
            problems.append("they were computed on other training windows")
        if (cfg.kl or cfg.reverse_kl) and not cfg.top_k:
            problems.append("they hold the teacher's top-k logits only, and the config asks for the whole "
                            "distribution (top_k null; use teacher: model)")
        if cfg.kl and cfg.top_k:
            have = 0 if self.values is None else self.values.shape[-1]
            if have < cfg.top_k:
                problems.append(f"they hold {have} logits per token, top_k is {cfg.top_k}")
            if self.temperature != cfg.temperature:
                problems.append(f"their temperature is {self.temperature:g}, the config's {cfg.temperature:g}")
        missing = sorted(set(layers) - set(self.hidden))
        if missing:
            problems.append(f"they hold no hidden states of layers {missing}")
        if problems:
            raise ConfigError(f"the cached teacher targets do not fit this distillation: {'; '.join(problems)}; "
                              f"compute them again with compute_targets(teacher, ids, cfg) (recipes: delete "
                              f"the teacher file in the work directory)")

    def batch(self, index: torch.Tensor, ids: torch.Tensor) -> TeacherBatch:
        """The targets of windows ``index`` (B,), on the device of the student's ids (B, T)."""
        device = ids.device

        def pick(t, k=None):
            return None if t is None else (t[index] if k is None else t[index, ..., :k]).to(device)
        # topk sorts: the first k of the cached values are the top k.
        return TeacherBatch(values=pick(self.values, self.k), indices=pick(self.indices, self.k),
                            logsumexp=pick(self.logsumexp),
                            hidden={i: pick(h) for i, h in self.hidden.items()})

    @property
    def nbytes(self) -> int:
        tensors = [self.values, self.indices, self.logsumexp, *self.hidden.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file, written to a temporary name and renamed."""
        path = Path(path)
        tensors = {name: t.contiguous() for name, t in (("values", self.values), ("indices", self.indices),
                                                       ("logsumexp", self.logsumexp)) if t is not None}
        tensors.update({f"hidden.{i}": h.contiguous() for i, h in self.hidden.items()})
        meta = {"format": "compress-teacher-cache", "version": str(CACHE_VERSION), "key": self.key,
                "temperature": repr(self.temperature)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherTargets:
        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable teacher cache ({exc}); delete it to recompute") from None
        if meta.get("format") != "compress-teacher-cache" or meta.get("version") != str(CACHE_VERSION):
            raise CheckpointError(f"{path}: not a teacher cache of version {CACHE_VERSION} (metadata {meta}); "
                                  f"delete it to recompute")
        t = load_file(str(path))
        hidden = {int(n.split(".", 1)[1]): v for n, v in t.items() if n.startswith("hidden.")}
        return cls(meta["key"], t.get("values"), t.get("indices"), t.get("logsumexp"), hidden,
                   float(meta["temperature"]))


@torch.no_grad()
def compute_targets(teacher: nn.Module, ids: torch.Tensor, cfg, *, device: torch.device,
                    batch_size: int = 4, progress: bool = True) -> TeacherTargets:
    """Run ``teacher`` over ids (S, T) once and keep what ``cfg`` (a DistillConfig) needs."""
    _, layers_list = find_decoder_layers(teacher)
    layers = resolve_layers(cfg.hidden_layers, len(layers_list)) if cfg.hidden else []
    samples, seqlen = ids.shape
    values = indices = lse = None
    hidden: dict[int, torch.Tensor] = {}
    was_training = teacher.training
    teacher.eval()
    try:
        with onloaded(teacher, device):
            for start in tqdm(range(0, samples, batch_size), desc="teacher targets", unit="batch",
                              disable=not progress):
                chunk = ids[start:start + batch_size].to(device)                      # (B, T)
                logits, hs = _teacher_forward(teacher, chunk, layers)
                rows = slice(start, start + chunk.shape[0])
                if cfg.kl and cfg.top_k:
                    v, i, z = top_k_targets(logits, cfg.top_k, cfg.temperature)
                    if values is None:
                        k = v.shape[-1]
                        values = torch.empty(samples, seqlen, k, dtype=torch.float32)
                        indices = torch.empty(samples, seqlen, k, dtype=torch.int32)
                        lse = torch.empty(samples, seqlen, dtype=torch.float32)
                    values[rows], indices[rows], lse[rows] = v.cpu(), i.cpu(), z.cpu()
                for layer, h in hs.items():
                    if layer not in hidden:
                        hidden[layer] = torch.empty(samples, seqlen, h.shape[-1], dtype=HIDDEN_DTYPE)
                    hidden[layer][rows] = h.to(HIDDEN_DTYPE).cpu()
    finally:
        teacher.train(was_training)
    targets = TeacherTargets(windows_key(ids), values, indices, lse, hidden, cfg.temperature)
    log.info("teacher targets for %d windows: %.1f MiB", samples, targets.nbytes / 2**20)
    return targets


class LiveTeacher:
    """A frozen teacher model run on every micro-batch. On CUDA it is kept in CPU memory and
    streamed onto the device layer by layer (accelerate's cpu_offload); call ``close`` after."""

    def __init__(self, model: nn.Module, cfg, device: torch.device):
        self.model, self.cfg, self.device = model.eval(), cfg, device
        for p in model.parameters():
            p.requires_grad_(False)
        _, layers = find_decoder_layers(model)
        self.layers = resolve_layers(cfg.hidden_layers, len(layers)) if cfg.hidden else []
        self._hooked = False
        if device.type != "cpu" and module_device(model) != device:
            cpu_offload(model, execution_device=device)
            self._hooked = True

    @torch.no_grad()
    def batch(self, index: torch.Tensor, ids: torch.Tensor) -> TeacherBatch:
        logits, hidden = _teacher_forward(self.model, ids.to(self.device), self.layers)
        if self.cfg.top_k and not self.cfg.reverse_kl:
            v, i, z = top_k_targets(logits, self.cfg.top_k, self.cfg.temperature)
            return TeacherBatch(values=v, indices=i, logsumexp=z, hidden=hidden)
        return TeacherBatch(logits=logits, hidden=hidden)

    def close(self) -> None:
        if self._hooked:
            remove_hook_from_submodules(self.model)
            self._hooked = False
