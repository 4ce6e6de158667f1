"""Writing a checkpoint: all or nothing.

Everything is written into a fresh temporary directory beside the destination, then renamed into
place. An interrupted export leaves at most a ``.tmp-*`` directory behind and never touches an
existing checkpoint; replacing one needs ``overwrite=True`` and happens by two renames, so the
old checkpoint is intact until the new one is complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate.utils.modeling import get_state_dict_offloaded_model
from torch import nn

from ..conv1d import checkpoint_layout, warn_quantized_conv1d
from ..errors import CheckpointError
from ..moe import to_checkpoint_name
from ..quant.grid import num_groups
from ..quant.linear import QuantLinear
from ..modeling import fused_groups
from ..quant.packed import PackedLinear
from ..quant.w8a8_linear import W8A8Linear
from ..structure import prepare_model
from ..version import __version__
from .adapter import CONFIG_KEY as ADAPTER_KEY
from .adapter import adapter_replacements, write_adapters
from .compressed_tensors import quantization_config
from .safetensors_io import DEFAULT_SHARD_BYTES, write_state_dict
from .transforms import check_exportable, transform_config, transform_tensors, warn_transformers
from .sparse_layout import CONFIG_KEY as SPARSITY_KEY
from .sparse_layout import check_layout, compact_replacements, dense_replacements, sparsity_config, swapped

log = logging.getLogger(__name__)


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to write: the model's state dict without the duplicate of tied weights."""
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):                 # accelerate-offloaded: onload module by module
        state = get_state_dict_offloaded_model(model)
    seen: dict[tuple, str] = {}
    out = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if tensor.numel() and ident in seen:
            continue                                   # tied: stored once, re-tied at load
        seen[ident] = key
        out[key] = tensor
    meta = [k for k, t in out.items() if t.is_meta]
    if meta:
        raise CheckpointError(f"cannot export: {meta[:3]} have no data (meta device); the model was loaded "
                              f"without these weights")
    return out


def _check_destination(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is a file; choose another output directory")
    if any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{path} already exists and is not empty; pass overwrite=True "
                                  f"(--overwrite) to replace it, or choose another output directory")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not empty and holds no config.json, so it is not a checkpoint; "
                                  f"refusing to replace it, choose another output directory")


def export(model: nn.Module, tokenizer, path: str | Path, *, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
           layout: str = "dense") -> Path:
    """Write ``model`` (and ``tokenizer``) as a checkpoint directory at ``path``.

    Quantized models are written in the compressed-tensors pack-quantized format, which
    transformers (with compressed-tensors installed) and vLLM load without compress; dense models
    as a plain transformers checkpoint. Pruned models keep their zeros (``layout="dense"``), or
    with ``layout="compact"`` store their 2:4 linears in our compact layout (kept values + 2-bit
    positions, docs/sparse-format.md), which only compress loads.

    LoRALinear modules (low-rank corrections) leave their base module in the checkpoint and their
    adapters in ``adapter/`` as a PEFT LoRA adapter; dense bases trained under their sparsity mask
    are merged instead (docs/checkpoint-format.md, "Low-rank correction").
    """
    check_layout(layout)
    prepare_model(model)          # 3D MoE experts are written per expert, as the family's checkpoints are
    # Unwrap the adapters first: the layouts below then see the base modules they know.
    unwrapped, adapters = adapter_replacements(model)
    with swapped(model, unwrapped):
        replacements = compact_replacements(model) if layout == "compact" else dense_replacements(model)
        with swapped(model, replacements):
            return _export(model, tokenizer, path, overwrite, max_shard_bytes, metadata, adapters)


def _export(model: nn.Module, tokenizer, path, overwrite: bool, max_shard_bytes: int,
            metadata: dict[str, str] | None, adapters: dict[str, nn.Module]) -> Path:
    path = Path(path).expanduser().resolve()
    _check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _warn_partial_groups(model)
    _warn_fp8_blocks(model)
    _warn_int4_activations(model)
    check_exportable(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = checkpoint_tensors(model, checkpoint_state_dict(model))
        state.update(transform_tensors(model))                       # the rotation's online matrices
        meta = {"compress_version": __version__, **(metadata or {})}
        write_state_dict(state, tmp, metadata=meta, max_shard_bytes=max_shard_bytes)
        write_config_files(model, tokenizer, tmp, meta, adapters)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warn_transformers(model, path)
    log.info("exported %s", path)
    return path


def checkpoint_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (any part of ``model``'s state dict, names as the model spells them) as the checkpoint
    stores it: GPT-2's dense Conv1D weights (in, out), names as the family's checkpoints spell them
    (Mixtral's experts). Shared by the export and streamed compression (``streamed.py``)."""
    model_type = getattr(model.config, "model_type", "")
    state = checkpoint_layout(model, state)      # GPT-2's dense Conv1D weights: (in, out)
    return {to_checkpoint_name(model_type, k): v for k, v in state.items()}


def write_config_files(model: nn.Module, tokenizer, tmp: Path, meta: dict[str, str],
                       adapters: dict[str, nn.Module]) -> None:
    """config.json (with the quantization / sparsity / adapter configs of ``model``'s modules), the
    adapters, the generation config and the tokenizer, into ``tmp``. Reads the modules' types and
    attributes only, not their tensors (streamed compression calls it with the layers freed)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]    # vLLM picks the model class from this
    qc = quantization_config(model)
    if qc is not None:
        qc["transform_config"] = transform_config(model)
        config["quantization_config"] = qc
        warn_quantized_conv1d(model, _packed_decoder_modules(model))
    config.pop(SPARSITY_KEY, None)
    sparse = sparsity_config(model)
    if sparse is not None:
        config[SPARSITY_KEY] = sparse
    config.pop(ADAPTER_KEY, None)
    if adapters:
        config[ADAPTER_KEY] = write_adapters(adapters, tmp, metadata=meta)
    config["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        tmp.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)                               # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _packed_decoder_modules(model: nn.Module) -> list[str]:
    """The compressed-tensors packed modules of ``model`` but its output head (which transformers
    always builds as nn.Linear); our compact 2:4 modules are not compressed-tensors ones."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, PackedLinear) and m is not head
            and not getattr(m, "sparse_layout", False)]


def _warn_partial_groups(model: nn.Module) -> None:
    partial = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.group_size
               and m.in_features % m.group_size]
    if partial:
        m = model.get_submodule(partial[0])
        log.warning("%d layers (e.g. %s: in_features %d, group_size %d, %d groups) end in a partial group: "
                    "compress loads this checkpoint; compressed-tensors 0.20 / transformers refuse it",
                    len(partial), partial[0], m.in_features, m.group_size, num_groups(m.in_features, m.group_size))


def _warn_fp8_blocks(model: nn.Module) -> None:
    """fp8-block layers vLLM refuses or may refuse (compress and transformers load them): in_features
    not a multiple of 128 (compressed-tensors notes vLLM's block kernels need it; tensor parallelism
    checks it), and a fused q/k/v or gate/up shard other than the last whose out_features is not a
    multiple of 128 (vLLM's ``validate_fp8_block_shape`` raises). See compressed_tensors.py."""
    blocks = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear) and m.block]
    if not blocks:
        return
    narrow = [n for n in blocks if model.get_submodule(n).in_features % 128]
    fused_rows = [n for group in fused_groups(blocks) for n in group[:-1]
                  if len(group) > 1 and model.get_submodule(n).out_features % 128]
    if narrow:
        log.warning("%d fp8-block layers have in_features not a multiple of 128 (%s, ...: %d): their last "
                    "block is narrower; compress and transformers load this checkpoint, vLLM's block FP8 "
                    "kernels need in_features divisible by 128. Ignore those layers or use scheme fp8 for vLLM",
                    len(narrow), ", ".join(narrow[:3]), model.get_submodule(narrow[0]).in_features)
    if fused_rows:
        log.warning("%d fp8-block layers are fused in vLLM (q/k/v, gate/up) with out_features not a multiple "
                    "of 128 (%s, ...: %d): vLLM refuses them (validate_fp8_block_shape); compress and "
                    "transformers load this checkpoint. Use scheme fp8 for vLLM", len(fused_rows),
                    ", ".join(fused_rows[:3]), model.get_submodule(fused_rows[0]).out_features)


def _warn_int4_activations(model: nn.Module) -> None:
    """W4A4 int4 layers (act_dtype "int4"): transformers + compressed-tensors 0.20.1 load the checkpoint
    but round activations with scale max|x| / 7.5 (its ``calculate_qparams``: half the code range
    [-8, 7]) where compress, like QuaRot, uses max|x| / 7; at 4 bits that changes the outputs by about
    as much as the activation rounding itself (docs/w8a8.md, "W4A4 int4")."""
    int4 = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.act_dtype == "int4"]
    if int4:
        log.warning("%d W4A4 int4 layers (%s, ...): compress reloads this checkpoint exactly; transformers + "
                    "compressed-tensors load it but scale int4 activations by max|x| / 7.5 instead of "
                    "max|x| / 7, so their outputs differ (see docs/w8a8.md, 'W4A4 int4'); vLLM's "
                    "CompressedTensorsWNA4Int reads this layout (not run here)", len(int4), int4[0])
