"""Model-free quantization: a float safetensors checkpoint in, a compressed-tensors checkpoint out,
without building the model.

The data-free schemes (round-to-nearest integer weights, FP8 / INT8 W8A8 with dynamic activations,
W4A8, NVFP4A16, MXFP4) quantize each linear weight from that weight alone, so they need neither the
model's code nor its forward pass: ``quantize_model_free`` reads the checkpoint's tensors one at a
time, rounds the 2-D weights of the linears the model-based path would quantize, copies the rest,
and writes shards, ``config.json`` (with the ``quantization_config`` the model-based export writes)
and the tokenizer and generation files. Architectures transformers does not know compress the same
way, and host memory stays near one tensor (docs/model-free.md).

The output is bit for bit the model-based path's (``compress.quantize(model, RTNConfig(...))`` then
``compress.export``): the same solver (``rtn_solve``), the same packed modules (their state dicts are
the tensors written), the same config groups (``assemble_quantization_config``), the same sharding.
Which tensors are linears, heads, embeddings, routers or fused siblings is read from names and
shapes (``model_free_plan.py``).

Refused with the reason: methods that need data (GPTQ; static activation scales: nvfp4 W4A4,
fp8-static, w8a8-int8-static), checkpoints without safetensors weights (pickled ``.bin``), already
quantized checkpoints, and 3-D MoE expert tensors (the model path unfuses them; checkpoints store
experts per expert, as transformers saves them).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..configs import MethodConfig
from ..errors import CheckpointError, ConfigError, MissingPathError, ModelLoadError
from ..quant.config import GPTQConfig, RTNConfig
from ..quant.rtn import rtn_solve
from ..version import __version__
from .compressed_tensors import assemble_quantization_config, config_group
from .export import _check_destination, _move_into_place
from .model_free_plan import (Plan, Target, natural_key, plan_checkpoint, read_tensor, rename_as_transformers,
                              share_nvfp4_global_scales)
from .safetensors_io import DEFAULT_SHARD_BYTES, INDEX_NAME, SINGLE_NAME, weight_files
from .streaming import ShardWriter, TensorEntry, TensorSource

log = logging.getLogger(__name__)

# Files of a checkpoint directory that are weights in another form: never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")


def quantize_model_free(src: str | Path, dst: str | Path, config: MethodConfig, *, overwrite: bool = False,
                        dtype: str | torch.dtype = "auto", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        progress: bool = True) -> Path:
    """Quantize the safetensors checkpoint directory ``src`` with ``config`` (an ``RTNConfig`` of a
    data-free scheme) into a compressed-tensors checkpoint at ``dst``, one tensor at a time and
    without building the model. ``dtype`` is the model dtype (``"auto"``: config.json's), as
    ``load_model(src, dtype=...)`` would load it. The whole output is written to a temporary
    directory beside ``dst`` and renamed into place; an existing ``dst`` is replaced only with
    ``overwrite=True``. Returns ``dst``; see docs/model-free.md."""
    cfg = _check_config(config)
    src = Path(src).expanduser().resolve()
    dst = Path(dst).expanduser().resolve()
    model_config, files = _read_source(src)
    if dst == src or src in dst.parents:
        raise ConfigError(f"the output {dst} lies in the checkpoint being read ({src}); choose another directory")
    _check_destination(dst, overwrite)
    source = TensorSource(files)
    _check_index(src, source)
    rename_as_transformers(source, model_config)
    plan = plan_checkpoint(source, model_config, cfg, dtype)
    share_nvfp4_global_scales(plan, source)
    start = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        groups = _write_shards(plan, source, tmp, max_shard_bytes, progress)
        _write_config(model_config, plan, groups, tmp)
        _copy_side_files(src, tmp)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model-free %s: %d linears quantized, %d tensors copied, in %.1f s -> %s", cfg.method,
             len(plan.targets), len(plan.copies), time.perf_counter() - start, dst)
    return dst


# --- checks --------------------------------------------------------------------------------------
def _check_config(config: MethodConfig) -> RTNConfig:
    if isinstance(config, GPTQConfig):
        raise ConfigError("GPTQ solves each layer on the Hessian of its calibration inputs, which needs the model "
                          "run on data; model-free quantization reads the weights only. Use the model-based path: "
                          "compress.quantize(model, GPTQConfig(...), calib=...) (CLI: compress quantize MODEL "
                          "--method gptq --calib FILE, without --model-free), or RTNConfig here")
    if not isinstance(config, RTNConfig):
        raise ConfigError(f"model-free quantization runs round-to-nearest weight quantization (RTNConfig); "
                          f"{type(config).__name__} (method {config.method!r}) needs the model: use compress.apply "
                          f"on a loaded model")
    static = [c.scheme for c in config.resolved_configs() if c.weight_format.static_activations]
    if static:
        scheme = static[0]
        raise ConfigError(f"scheme {scheme!r} quantizes activations with a static scale taken from the activations' "
                          f"range on calibration data, which only running the model gives; model-free quantization "
                          f"runs data-free schemes (int, nvfp4a16, mxfp4, fp8, fp8-block, w8a8-int8, w4a8-int8, "
                          f"w4a8-fp8, w4a4-int4). Use the model-based path with --calib FILE for {scheme!r}")
    return config


def _read_source(src: Path) -> tuple[dict, list[Path]]:
    """(config.json as a dict, the safetensors files) of a float checkpoint directory."""
    if not src.exists():
        raise MissingPathError(f"no such checkpoint directory: {src}")
    if src.is_file():
        what = "a GGUF file" if src.suffix == ".gguf" else "a file"
        raise ModelLoadError(f"{src} is {what}; model-free quantization reads a checkpoint directory of safetensors "
                             f"shards. Quantize it with the model-based path (compress quantize {src} --method rtn "
                             f"..., without --model-free), or save it as safetensors first")
    path = src / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{src} has no config.json: it is not a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); repair or re-download the checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; repair or re-download the checkpoint")
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{src} is quantized already (quantization_config: quant_method {method!r}); "
                              f"model-free quantization starts from a float checkpoint")
    files = weight_files(src)                    # a missing shard of the index is an error naming it
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise CheckpointError(
                f"{src} holds PyTorch pickle weights ({', '.join(pickles[:3])}), no safetensors: model-free "
                f"quantization reads safetensors only (a pickle is loaded whole, and unpickling runs code). "
                f"Convert it once (AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(OUT) writes "
                f"safetensors), or quantize with the model-based path (compress quantize SRC --method rtn ..., "
                f"without --model-free)")
        raise CheckpointError(f"{src} has no .safetensors weight files")
    return config, files


def _check_index(src: Path, source: TensorSource) -> None:
    """The index and the shards' headers must name the same tensors."""
    index = src / INDEX_NAME
    if not index.is_file():
        return
    listed = set(json.loads(index.read_text())["weight_map"])
    found = set(source.entries)
    if listed != found:
        gone, extra = sorted(listed - found), sorted(found - listed)
        raise CheckpointError(f"{index} and the shards disagree: " + "; ".join(
            [f"{len(gone)} tensor(s) listed but in no shard, e.g. {gone[0]}"] * bool(gone)
            + [f"{len(extra)} tensor(s) in the shards but not listed, e.g. {extra[0]}"] * bool(extra))
            + "; the checkpoint is incomplete or mixed from two downloads, re-download it")


# --- writing ----------------------------------------------------------------------------------------
def _quantize(target: Target, source: TensorSource, dtype: torch.dtype) -> torch.nn.Module:
    """The packed module the model path builds for ``target`` (``IntWeightQuantizer._solve_part`` +
    ``finalize`` on one module): round to nearest, then pack."""
    weight = read_tensor(source, target.weight, dtype)
    if target.transposed:
        weight = weight.t().contiguous()                          # Conv1D (in, out) -> (out, in)
    fmt = target.cfg.weight_format
    grid = fmt.solver_grid(dtype, target.cfg.observer)
    if target.global_scale is not None:
        grid.global_scale = target.global_scale
    result = rtn_solve(weight, target.cfg, dtype, None, fmt=grid)
    if result.fallback:
        log.warning("%s: %s", target.name, result.fallback)
    return fmt.pack(result.without_weight(), bias=None, dtype=dtype, observer=target.cfg.observer, actorder=None)


def _output_specs(plan: Plan, source: TensorSource) -> dict[str, tuple[torch.dtype, tuple[int, ...], str | None]]:
    """Every output tensor: name -> (dtype, shape, the target module producing it or None for a copy)."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...], str | None]] = {}
    for name in plan.copies:
        e: TensorEntry = source.entries[name]
        specs[name] = (plan.dtype if e.floating else e.torch_dtype, e.shape, None)
    for module, t in plan.targets.items():
        for suffix, (dt, shape) in t.cfg.weight_format.tensors(t.shape[0], t.shape[1], plan.dtype).items():
            key = f"{module}.{suffix}"
            if key in specs:
                raise CheckpointError(f"{key} is both a tensor of the checkpoint and one that quantizing {module} "
                                      f"writes; the checkpoint is quantized already or inconsistent")
            specs[key] = (dt, tuple(shape), module)
    return specs


def _shards(specs: dict, max_shard_bytes: int) -> list[list[str]]:
    """The output names per shard: ``safetensors_io.write_state_dict``'s rule, so a model-based
    export of the same tensors has the same files."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(specs):
        dt, shape, _ = specs[key]
        nbytes = math.prod(shape) * dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_shards(plan: Plan, source: TensorSource, tmp: Path, max_shard_bytes: int, progress: bool
                  ) -> list[tuple[str, dict]]:
    """Write the output shards (and index) into ``tmp``, one tensor (one packed module) in memory at
    a time; returns (module, config group) of every quantized module."""
    specs = _output_specs(plan, source)
    shards = _shards(specs, max_shard_bytes)
    meta = {"format": "pt", "compress_version": __version__}
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    pending: dict[str, torch.Tensor] = {}                   # outputs of the packed module being written
    groups: list[tuple[str, dict]] = []
    bar = tqdm(total=len(plan.copies) + len(plan.targets), desc="model-free rtn",
               unit="tensor", disable=not progress)
    for file, keys in zip(names, shards):
        writer = ShardWriter(tmp / file, {k: specs[k][:2] for k in keys}, meta)
        try:
            for key in keys:
                module = specs[key][2]
                if module is None:
                    writer.write(key, read_tensor(source, key, plan.dtype))
                    bar.update()
                    continue
                if key not in pending:
                    packed = _quantize(plan.targets[module], source, plan.dtype)
                    groups.append((module, config_group(packed)))
                    pending.update({f"{module}.{k}": v for k, v in packed.state_dict().items()})
                    bar.update()
                writer.write(key, pending.pop(key))
        except BaseException:
            writer.abort()
            bar.close()
            raise
        writer.close()
    bar.close()
    if pending:
        raise RuntimeError(f"packed tensors {sorted(pending)[:3]} were produced but not planned")
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for d, s, _ in specs.values())
        weight_map = {k: f for f, keys in zip(names, shards) for k in keys}
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))
    return groups


def _write_config(config: dict, plan: Plan, groups: list[tuple[str, dict]], tmp: Path) -> None:
    """config.json: the source's, plus the quantization_config the model-based export writes for the
    same modules (config groups numbered in layer order) and the model dtype."""
    model_type = str(config.get("model_type", ""))
    groups = sorted(groups, key=lambda g: natural_key(g[0]))
    qc = assemble_quantization_config(groups, plan.dense_linears, model_type)
    out = dict(config)
    out["quantization_config"] = qc
    out["dtype"] = str(plan.dtype).removeprefix("torch.")
    if "torch_dtype" in out:
        out["torch_dtype"] = out["dtype"]
    if not out.get("architectures"):
        log.warning("config.json names no architectures; vLLM picks the model class from it, add it by hand")
    (tmp / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def _copy_side_files(src: Path, tmp: Path) -> None:
    """Tokenizer, generation config, chat template, custom code, README: every top-level file of
    ``src`` that is not config.json or weights."""
    skipped = []
    for path in sorted(src.iterdir()):
        if path.name == "config.json" or path.name.endswith(".index.json") or path.suffix in _WEIGHT_SUFFIXES:
            continue
        if path.is_file():
            shutil.copy2(path, tmp / path.name)
        else:
            skipped.append(path.name)
    if skipped:
        log.info("not copied (directories): %s", ", ".join(skipped))


__all__ = ["quantize_model_free"]
