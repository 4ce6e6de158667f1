"""Loading a checkpoint written by ``compress.export``: the model is built from its config on the meta
device, the packed modules its config.json names are swapped in (compressed-tensors
``quantization_config``, ``compress_sparsity``, the fp8 KV-cache scales), the checkpoint's tensors
are checked against them and assigned, then the LoRA adapter ``compress_adapter`` names is attached.

``compress.load_model`` calls ``load_compressed`` for such a directory; export and load are the two
halves of one format and live side by side here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..conv1d import checkpoint_layout
from ..errors import CheckpointError, ModelLoadError
from ..kv.cache import attention_geometry
from ..kv.config import KVCacheConfig
from ..kv.model import CONFIG_KEY as KV_CONFIG_KEY
from ..kv.model import attention_modules
from ..moe import from_checkpoint_name
from ..pruning.sparse_linear import Sparse24Linear
from ..quant.linear import QuantLinear
from ..structure import prepare_model
from .adapter import CONFIG_KEY as ADAPTER_KEY
from .adapter import install_adapters
from .compressed_tensors import install_quant_linears, parse_kv_cache_scheme
from .safetensors_io import read_state_dict
from .sparse_layout import CONFIG_KEY as SPARSITY_KEY
from .sparse_layout import install_sparse_linears
from .transforms import install_transforms


def unsupported_model(source, exc: Exception) -> ModelLoadError:
    """The error for a checkpoint transformers cannot build as a causal LM (``exc`` is its error)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"{source}: transformers cannot load this as a causal language model ({first}). "
                          f"compress works on decoder-only causal LMs (Llama, Qwen2, Mistral, OPT, ...); "
                          f"upgrade transformers if the architecture is newer than it")


def load_compressed(directory: Path, dtype="auto") -> nn.Module:
    """Build the model from its config on the meta device, swap in packed modules where the
    compressed-tensors config says, assign the checkpoint tensors, then wrap the modules that
    ``compress_adapter`` names in LoRALinear with the adapter's weights (from ``adapter/``)."""
    config = AutoConfig.from_pretrained(str(directory))
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    sparse = getattr(config, SPARSITY_KEY, None)
    if hasattr(config, SPARSITY_KEY):
        delattr(config, SPARSITY_KEY)
    adapter = getattr(config, ADAPTER_KEY, None)
    if hasattr(config, ADAPTER_KEY):
        delattr(config, ADAPTER_KEY)           # the LoRALinear modules carry it from here on
    state = read_state_dict(directory)
    float_dtypes = {t.dtype for k, t in state.items() if t.is_floating_point()}
    model_dtype = dtype if dtype != "auto" else (
        getattr(config, "dtype", None) or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32))
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    except (ValueError, KeyError) as exc:
        raise unsupported_model(directory, exc) from exc
    prepare_model(model)                       # per-expert linears, as the checkpoint stores them
    model_type = getattr(config, "model_type", "")
    state = {from_checkpoint_name(model_type, k): v for k, v in state.items()}
    if qc:
        qc = checkpoint_names_to_model(qc, model_type)
        install_quant_linears(model, qc, f"{directory}/config.json")
    if sparse:
        install_sparse_linears(model, sparse, f"{directory}/config.json")
    if qc.get("kv_cache_scheme"):
        install_kv_scales(model, qc["kv_cache_scheme"], f"{directory}/config.json")
    if qc.get("transform_config"):                                 # the rotation's online transforms
        install_transforms(model, qc["transform_config"], state, f"{directory}/config.json")
    state = checkpoint_layout(model, state)    # the dense linears that were Conv1D: stored (in, out)
    expected = model.state_dict()
    tied = _tied_keys(model, config)
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: checkpoint tensors do not match its config: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}; the export is incomplete or from "
                              f"another model")
    for key, tensor in state.items():
        if key.endswith((".k_scale", ".v_scale")) and tensor.numel() == expected[key].numel():
            state[key] = tensor = tensor.reshape(expected[key].shape)     # () or (1,) per tensor, (H,) or (H,1,1) per head
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{directory}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                                  f"implies {tuple(expected[key].shape)}")
        want = expected[key].dtype           # the model dtype, or a packed layer's own (uint8, fp8, fp32)
        if tensor.dtype != want and (tensor.is_floating_point() or key.endswith(".weight_g_idx")):
            state[key] = tensor.to(want)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            module.check_g_idx(f"{directory}: {name}")
        elif isinstance(module, Sparse24Linear):
            module.check_meta(f"{directory}: {name}")
    if adapter:
        # After the main state: the adapter's tensors live in adapter/, not in the checked state.
        install_adapters(model, adapter, directory, f"{directory}/config.json")
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{directory}: no data for {still_meta[:5]}; the checkpoint is incomplete")
    return model.eval()


def checkpoint_names_to_model(qc: dict, model_type: str) -> dict:
    """``qc`` with its module names (config group targets, ignore) spelled as the model names them."""
    def rename(names):
        return [from_checkpoint_name(model_type, n) for n in names]
    groups = {k: {**g, "targets": rename(g.get("targets") or [])} for k, g in (qc.get("config_groups") or {}).items()}
    return {**qc, "config_groups": groups, "ignore": rename(qc.get("ignore") or [])}


def install_kv_scales(model: nn.Module, kv_scheme: dict, where: str) -> None:
    """Empty fp8 ``k_scale``/``v_scale`` buffers on every attention module for the checkpoint's
    tensors to fill, and the model's KV-cache config (kept from an export of ours, or derived
    from ``kv_cache_scheme`` for checkpoints written by other tools)."""
    granularity = parse_kv_cache_scheme(kv_scheme, where)
    _, kv_heads, _ = attention_geometry(model.config)
    shape = (kv_heads, 1, 1) if granularity == "head" else (1,)
    for module in attention_modules(model):
        for name in ("k_scale", "v_scale"):
            module.register_buffer(name, torch.empty(shape, dtype=torch.float32, device="meta"))
    if not getattr(model.config, KV_CONFIG_KEY, None):
        setattr(model.config, KV_CONFIG_KEY, KVCacheConfig("fp8", fp8_scale=granularity).to_dict())


def _tied_keys(model: nn.Module, config) -> set[str]:
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is out:
            return {f"{name}.weight"}
    return set()
