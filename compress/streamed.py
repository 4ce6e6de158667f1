"""Streamed compression: quantize a safetensors checkpoint larger than host memory, one decoder
layer in memory at a time.

The model is built on the meta device; the tensors outside the decoder layers (embeddings, final
norm, lm_head) are read from the shards; the engine then walks the decoder layers as it always does
(compress/engine.py), and ``LayerStreamer``, entered around each layer's turn through the engine's
``layer_scope`` hook, reads that layer's weights from the shards on entry and, on exit, writes the
finished (packed) layer's tensors straight into the output shards and puts the layer back on the
meta device. Host memory stays near one layer plus the calibration activations.

The output is the checkpoint ``load_model`` -> ``quantize`` -> ``export`` writes, bit for bit: the
same engine and method run on the same weights; every output tensor's name, dtype and shape is
planned before the walk (packed modules' from ``WeightFormat.empty_module``, the loader's own
description of the format), so the shards are cut by ``write_state_dict``'s rule and written with
``ShardWriter`` (tensors in any order, one at a time); config.json and the side files come from the
export's own ``write_config_files``. Written into a temporary directory and renamed into place.

Supported: the engine's weight quantizers (RTNConfig, GPTQConfig: int, FP8, NVFP4, ... schemes,
static activation scales with calibration). Refused: any other method (pruning, rotation,
smoothing, KV cache: run them on a loaded model), sources that are not a safetensors checkpoint
directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from .api import quantize

from .conv1d import transposed_weights
from .engine import engine_context
from .guards import _non_finite, check_finite
from .errors import CheckpointError, ConfigError, ModelLoadError
from .loading import _load_tokenizer, resolve_dtype, resolve_source
from .modeling import find_decoder_layers
from .moe import to_checkpoint_name
from .quant.apply import IntWeightQuantizer, _actorder
from .quant.config import IntWeightConfig
from .structure import prepare_model
from .version import __version__
from .checkpoint.export import (_check_destination, _move_into_place, _warn_fp8_blocks, _warn_int4_activations,
                     _warn_partial_groups, checkpoint_tensors, write_config_files)
from .checkpoint.model_free import _check_index, _shards
from .checkpoint.safetensors_io import DEFAULT_SHARD_BYTES, INDEX_NAME, SINGLE_NAME, weight_files
from .checkpoint.streaming import ShardWriter, TensorSource
from .checkpoint.transforms import warn_transformers

log = logging.getLogger(__name__)

Spec = dict[str, tuple[torch.dtype, tuple[int, ...], None]]


def quantize_streaming(src: str | Path, cfg: IntWeightConfig, out: str | Path, calib=None, *,
                       dtype: str | torch.dtype = "auto", device=None, batch_size: int | None = None,
                       overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       progress: bool = True) -> Path:
    """Quantize the safetensors checkpoint directory ``src`` with ``cfg`` (RTNConfig / GPTQConfig)
    into a compressed-tensors checkpoint at ``out``, holding one decoder layer in host memory at a
    time. ``calib``: calibration data (``compress.calibration_data`` with ``src``'s tokenizer) for
    GPTQ and static activation scales. ``dtype``: the model dtype (``"auto"``: config.json's), as
    ``load_model(src, dtype=...)`` loads it. Writes what ``load_model`` -> ``quantize`` -> ``export``
    writes; returns ``out`` (docs/streaming.md)."""
    if not isinstance(cfg, IntWeightConfig):
        raise ConfigError(f"streamed compression runs the weight quantizers (RTNConfig, GPTQConfig); "
                          f"{type(cfg).__name__} (method {cfg.method!r}) is not one: load the model and use "
                          f"compress.apply")
    src = _resolve(src)
    _return_freed_memory()
    out = Path(out).expanduser().resolve()
    if out == src or src in out.parents:
        raise ConfigError(f"the output {out} lies in the checkpoint being read ({src}); choose another directory")
    _check_destination(out, overwrite)
    source = _read_source(src)
    model = build_empty(src, source, dtype)
    tokenizer = _load_tokenizer(src)
    streamer = LayerStreamer(model, source, cfg)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        streamer.open(tmp, max_shard_bytes)
        streamer.load_outside(calibrated=calib is not None)
        # compress.quantize, not the handler: the same checks (finite weights, ...) as the in-memory path.
        with engine_context(layer_scope=streamer):
            quantize(model, cfg, calib, device=device, batch_size=batch_size, progress=progress)
        _warn_partial_groups(model)
        _warn_fp8_blocks(model)
        _warn_int4_activations(model)
        streamer.write_outside()
        streamer.close()
        write_config_files(model, tokenizer, tmp, streamer.metadata, {})
        _move_into_place(tmp, out)
    except BaseException:
        streamer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warn_transformers(model, out)
    log.info("streamed %s: %d layers, at most %.1f MiB of layer weights resident, in %.1f s -> %s", cfg.method,
             streamer.layers_done, streamer.peak_layer_bytes / 2**20, time.perf_counter() - start, out)
    return out


def _return_freed_memory() -> None:
    """Make glibc hand freed blocks of 1 MiB and more back to the system (M_MMAP_THRESHOLD).

    By default the threshold rises to 32 MiB after the first large free, so a layer's worth of
    row blocks and packing buffers is recycled inside the heap and the resident size ratchets up
    layer after layer (measured: +370 MiB per 8B-width layer). Process-wide and harmless for the
    rest of the run (a few more mmap calls); a no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)                    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# --- the source ----------------------------------------------------------------------------------
def _resolve(src: str | Path) -> Path:
    resolved = resolve_source(src)
    if isinstance(resolved, str):                       # a hub id: download its safetensors snapshot
        try:
            resolved = Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                        "*.model", "*.tiktoken", "*.jinja"]))
        except Exception as exc:                        # offline, unknown repo, gated, ...
            raise ModelLoadError(f"{src!r} is not a local directory and downloading it from the Hugging Face hub "
                                 f"failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                 f"streamed compression reads a local safetensors checkpoint directory") from exc
    resolved = resolved.resolve()
    if resolved.is_file():
        what = "a GGUF file" if resolved.suffix == ".gguf" else "a file"
        raise ModelLoadError(f"{resolved} is {what}; streamed compression reads a checkpoint directory of "
                             f"safetensors shards. Quantize it in memory (compress quantize {resolved} without "
                             f"--stream), or save it as safetensors first")
    return resolved


def _read_source(src: Path) -> TensorSource:
    config = src / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{src} has no config.json: it is not a Hugging Face checkpoint directory")
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config} is not a JSON object ({exc}); repair or re-download the checkpoint") from None
    if qc:
        raise CheckpointError(f"{src} is quantized already (quantization_config); streamed compression starts "
                              f"from a float checkpoint")
    files = weight_files(src)                           # a shard the index lists but is missing: named
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" (it holds PyTorch pickle weights: {', '.join(pickles[:3])}; convert once with "
                f"AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(OUT))") if pickles else ""
        raise CheckpointError(f"{src} has no .safetensors weight files{hint}; streamed compression reads "
                              f"safetensors only")
    source = TensorSource(files)
    _check_index(src, source)
    return source


def build_empty(src: Path, source: TensorSource, dtype: str | torch.dtype = "auto") -> nn.Module:
    """``src``'s model on the meta device (buffers computed at init, such as rotary frequencies,
    are real), in ``dtype`` as ``load_model`` would choose it, in the normal form (prepare_model)."""

    config = AutoConfig.from_pretrained(str(src))
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or next(
            (e.torch_dtype for e in source.entries.values() if e.floating), torch.float32)
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{src}: transformers cannot build a causal LM from its config.json ({exc}); "
                                 f"compress works on decoder-only causal LMs (Llama, Qwen2, Mistral, OPT, ...)") from exc
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(src))
    model.tie_weights()                 # from_config under init_empty_weights leaves them untied
    model.eval()
    prepare_model(model)
    return model


# --- the layer scope -----------------------------------------------------------------------------
class LayerStreamer:
    """The engine's ``layer_scope``: ``streamer(index, prefix, layer)`` is a context manager that reads
    the layer's weights on entry and writes and frees the finished layer on exit. Also loads and
    writes the tensors outside the decoder layers, and owns the output shards."""

    def __init__(self, model: nn.Module, source: TensorSource, cfg: IntWeightConfig):
        self.model, self.source = model, source
        self.model_type = getattr(model.config, "model_type", "")
        self.layers_name, self.layers = find_decoder_layers(model)
        self.transposed = set(transposed_weights(model))
        self.specs = self._plan(cfg)
        self.metadata = {"compress_version": __version__}
        self.writers: dict[str, ShardWriter] = {}            # output tensor name -> its shard
        self._open: list[ShardWriter] = []
        self.peak_layer_bytes = 0                            # layer tensors resident at once, at most
        self.layers_done = 0
        missing = sorted(to_checkpoint_name(self.model_type, k) for k in self._state(model)
                         if to_checkpoint_name(self.model_type, k) not in source)
        if missing:
            raise ModelLoadError(f"the checkpoint lacks {len(missing)} weight(s) that {type(model).__name__} needs "
                                 f"({', '.join(missing[:3])}, ...): it is incomplete, or not a causal language "
                                 f"model checkpoint")

    # The persistent tensors of ``module`` (full names), a tied weight once: what a checkpoint holds.
    def _state(self, module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        out, seen = {}, set()
        for key, t in module.state_dict(prefix=prefix, keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                out[key] = t
        return out

    def _plan(self, cfg: IntWeightConfig) -> Spec:
        """Every output tensor (checkpoint name -> dtype, shape): the dense model's state with each
        target linear replaced by the packed module its format builds."""
        planner = IntWeightQuantizer(self.model, cfg)         # the method's own target selection
        self.outside_targets = {n for n in planner.targets if not n.startswith(self.layers_name + ".")}
        state = self._state(self.model)
        for name, module in planner.targets.items():
            c = planner.module_cfgs[name]
            for key in [k for k in state if k.rpartition(".")[0] == name]:
                del state[key]
            packed = c.weight_format.empty_module(module.in_features, module.out_features,
                                                  bias=module.bias is not None, dtype=module.weight.dtype,
                                                  observer=c.observer, actorder=_actorder(c))
            state.update({f"{name}.{k}": t for k, t in packed.state_dict().items()})
        state = checkpoint_tensors(self.model, {k: t.to("meta") for k, t in state.items()})
        return {k: (t.dtype, tuple(t.shape), None) for k, t in state.items()}

    def open(self, tmp: Path, max_shard_bytes: int) -> None:
        """Create the output shards (cut as ``write_state_dict`` cuts them) in ``tmp``."""
        self.tmp = tmp
        self.shards = _shards(self.specs, max_shard_bytes)
        self.files = [SINGLE_NAME] if len(self.shards) == 1 else \
            [f"model-{i:05d}-of-{len(self.shards):05d}.safetensors" for i in range(1, len(self.shards) + 1)]
        for file, keys in zip(self.files, self.shards):
            writer = ShardWriter(tmp / file, {k: self.specs[k][:2] for k in keys}, {"format": "pt", **self.metadata})
            self._open.append(writer)
            self.writers.update({k: writer for k in keys})

    def _read(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The tensor ``key`` (full model name) from the checkpoint, as the model holds it (Conv1D
        weights transposed, floats in the model's dtype; ``like``: the model's tensor)."""
        tensor = self.source.get(to_checkpoint_name(self.model_type, key))
        if key in self.transposed:
            tensor = tensor.t().contiguous()            # Conv1D (in, out) -> (out, in)
        if tuple(tensor.shape) != tuple(like.shape):
            raise CheckpointError(f"{key}: the checkpoint holds shape {tuple(tensor.shape)}, the model built "
                                  f"from config.json expects {tuple(like.shape)}; the checkpoint does not match "
                                  f"its config.json")
        return tensor.to(like.dtype) if tensor.is_floating_point() else tensor

    def _load(self, keys) -> int:
        """Read the tensors ``keys`` (full model names) from the checkpoint into the model, in place;
        returns their bytes."""
        total = 0
        for key in keys:
            owner, _, attr = key.rpartition(".")
            sub = self.model.get_submodule(owner)
            old = getattr(sub, attr)
            tensor = self._read(key, old)
            if attr in sub._parameters:
                sub._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                sub._buffers[attr] = tensor
            total += tensor.numel() * tensor.element_size()
        return total

    def _write(self, state: dict[str, torch.Tensor]) -> None:
        for key, tensor in checkpoint_tensors(self.model, state).items():
            writer = self.writers.get(key)
            if writer is None:
                raise RuntimeError(f"{key} was produced but not planned; streamed compression cannot write "
                                   f"this model's checkpoint, quantize it in memory")
            writer.write(key, tensor)

    def _outside(self) -> dict[str, torch.Tensor]:
        layers = self.layers_name + "."
        return {k: t for k, t in self._state(self.model).items() if not k.startswith(layers)}

    def load_outside(self, calibrated: bool) -> None:
        """The tensors outside the decoder layers that the run needs, then re-tie: all of them when
        calibration samples go through the embeddings (the rest are freed when the first layer's turn
        comes: the engine has captured that layer's inputs by then), else only those of targets
        outside the layers (an untied lm_head quantized too). The others are copied from the source
        to the output one at a time at the end (``write_outside``): an 8B model's embeddings and
        lm_head are 1 GB in bf16, more than a layer."""
        outside = self._outside()
        keys = list(outside) if calibrated else [k for k in outside if k.rpartition(".")[0] in self.outside_targets]
        for key in [k for k in outside if k not in keys]:
            # Not kept, but checked now as a loaded model's would be (not after an hour of layers).
            bad = _non_finite(self._read(key, outside[key]))
            if bad:
                raise CheckpointError(f"{key} has {bad} NaN/inf value{'s' if bad != 1 else ''}; the checkpoint "
                                      f"is corrupt or was saved from a diverged run: re-download or re-export it")
        self._load(keys)
        self.model.tie_weights()

    def _free_outside(self) -> None:
        """Put the outside tensors no target needs back on the meta device (ties kept)."""
        free = {id(t) for k, t in self._outside().items()
                if not t.is_meta and k.rpartition(".")[0] not in self.outside_targets}
        if free:
            _to_meta(self.model, only=free)

    def write_outside(self) -> None:
        """Write the outside tensors: those in memory as they are, the others read from the source
        one at a time."""
        for key, tensor in self._outside().items():
            self._write({key: self._read(key, tensor) if tensor.is_meta else tensor})

    @contextlib.contextmanager
    def __call__(self, index: int, prefix: str, layer: nn.Module):
        self._free_outside()            # the first layer's inputs are captured: the embeddings are done
        loaded = self._load(list(self._state(layer, prefix)))
        try:
            check_finite(layer)        # what compress.apply checks on a loaded model, where the layers were meta
        except CheckpointError as exc:
            raise CheckpointError(f"{prefix.rstrip('.')}: {exc}") from None
        self.peak_layer_bytes = max(self.peak_layer_bytes, self.resident_layer_bytes())
        log.debug("%s: %.1f MiB read", prefix.rstrip("."), loaded / 2**20)
        yield layer
        # The layer is finished (its targets are packed modules now): write it out, then free it.
        self._write({prefix + k: t for k, t in layer.state_dict().items()})
        _to_meta(layer)
        self.layers_done += 1

    def resident_layer_bytes(self) -> int:
        """Bytes of decoder-layer tensors that hold data (not meta) right now."""
        return sum(t.numel() * t.element_size() for t in [*self.layers.parameters(), *self.layers.buffers()]
                   if not t.is_meta)

    def close(self) -> None:
        for writer in self._open:
            writer.close()                               # raises if a planned tensor was never written
        self._open = []
        if len(self.shards) > 1:
            total = sum(math.prod(s) * d.itemsize for d, s, _ in self.specs.values())
            weight_map = {k: f for f, keys in zip(self.files, self.shards) for k in keys}
            (self.tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                           "weight_map": weight_map}, indent=2, sort_keys=True))

    def abort(self) -> None:
        for writer in self._open:
            writer.abort()
        self._open = []


def _to_meta(module: nn.Module, only: set[int] | None = None) -> None:
    """Replace every parameter and buffer of ``module`` (``only``: those whose id is in it) by a meta
    tensor of its dtype and shape; a tensor shared by several modules (tied) stays shared."""
    done: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and (only is None or id(p) in only):
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                sub._parameters[attr] = done[id(p)]
        for attr, b in list(sub._buffers.items()):
            if b is not None and (only is None or id(b) in only):
                if id(b) not in done:
                    done[id(b)] = b.to("meta")
                sub._buffers[attr] = done[id(b)]


__all__ = ["LayerStreamer", "build_empty", "quantize_streaming"]
