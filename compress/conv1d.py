"""transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT) as the ``nn.Linear`` every method selects.

``Conv1D`` computes ``y = x @ W + b`` with ``W`` stored (in_features, out_features), the transpose of
``nn.Linear``'s (out_features, in_features). ``conv1d_to_linear`` replaces each one by a
``TransposedLinear`` holding ``W.T``: the same computation, and then RTN, GPTQ, the FP4 grids, pruning
and LoRA cover GPT-2 with no per-method code.

``TransposedLinear`` is an ``nn.Linear`` that remembers one fact: its family's checkpoints store
its weight transposed. ``checkpoint_layout`` applies that fact to a state dict, on export (dense
weights written as Conv1D stores them, so vanilla transformers and vLLM load the file) and on load
(read back into the linear). A quantized TransposedLinear becomes a packed module like any other
linear and is written pack-quantized, (out, in), which is what vLLM's GPT-2 loader expects: it
transposes only tensors named ``.weight``.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ModelLoadError
from .modeling import has_offloaded_params

log = logging.getLogger(__name__)


class TransposedLinear(nn.Linear):
    """An ``nn.Linear`` whose family's checkpoints store the weight as (in_features, out_features)
    (it replaced a transformers ``Conv1D``). Same constructor and forward as ``nn.Linear``."""

    @classmethod
    def from_conv1d(cls, conv: Conv1D) -> TransposedLinear:
        """The linear computing what ``conv`` computes: weight ``conv.weight.T`` (out, in), the same
        bias, dtype, device and ``requires_grad``; a meta ``conv`` gives a meta linear."""
        in_features, out_features = conv.weight.shape            # Conv1D stores (nx, nf) = (in, out)
        if out_features != conv.nf:
            raise ValueError(f"Conv1D weight has shape {tuple(conv.weight.shape)} but nf={conv.nf}; expected "
                             f"(in_features, nf)")
        weight = conv.weight.detach()
        # Built on meta (no initialisation, no memory), then given the Conv1D's tensors.
        linear = cls(in_features, out_features, bias=conv.bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.t() if weight.is_meta else weight.t().contiguous(),
                                     requires_grad=conv.weight.requires_grad)   # (out, in)
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=conv.bias.requires_grad)
        return linear


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every ``Conv1D`` of ``model`` by the equivalent ``TransposedLinear``, in place (meta
    tensors stay on meta). Returns how many were replaced; idempotent (a second call finds none)."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, Conv1D)]
    if found and any(has_offloaded_params(m) for m in model.modules()):
        # accelerate's hooks restore offloaded weights by name into the module's tensors, so they would
        # put the (in, out) Conv1D weight into the (out, in) linear (silently, for a square one).
        raise ModelLoadError(f"{type(model).__name__} has Conv1D layers (e.g. {found[0][0]}) and weights offloaded "
                             f"by accelerate (device_map); compress turns Conv1D layers into linears and cannot do "
                             f"so for offloaded weights. Load the model without offloading (no device_map, or "
                             f"one that fits in memory); nothing was changed")
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, TransposedLinear.from_conv1d(module))
    if found:
        log.info("%d Conv1D layers (e.g. %s) seen as linears; their dense weights are written back in Conv1D's "
                 "(in, out) layout", len(found), found[0][0])
    return len(found)


def transposed_weights(model: nn.Module) -> list[str]:
    """The weight names (``<module>.weight``) of the dense ``TransposedLinear`` modules of ``model``:
    the tensors its family's checkpoints store transposed."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, TransposedLinear)]


def checkpoint_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (names as ``model`` spells them) with the weight of every dense TransposedLinear of
    ``model`` transposed, as a new dict: (out, in) -> (in, out) when writing a checkpoint, (in, out)
    -> (out, in) when reading one (the transpose is its own inverse). Packed modules (QuantLinear,
    ...) are not TransposedLinear and keep their (out, in) tensors. Written tensors are contiguous,
    as safetensors needs."""
    out = dict(state)
    for key in transposed_weights(model):
        if key in out:
            out[key] = out[key].t().contiguous()
    return out


def builds_conv1d(model: nn.Module) -> bool:
    """Whether transformers builds ``model``'s class with ``Conv1D`` layers (its modeling module uses
    Conv1D: GPT-2, OpenAI GPT, ImageGPT, Decision Transformer). A family property: it stays true after
    ``conv1d_to_linear`` and after quantization has replaced the TransposedLinear modules."""
    return any(getattr(sys.modules.get(cls.__module__), "Conv1D", None) is Conv1D for cls in type(model).__mro__)


def warn_quantized_conv1d(model: nn.Module, packed: list[str]) -> bool:
    """Warn, once per export, that transformers cannot load the quantized ``packed`` modules of a
    Conv1D family (docs/checkpoint-format.md, "Families"); returns whether it warned.

    transformers builds these layers as ``Conv1D``. compressed-tensors 0.20 quantizes only
    ``nn.Linear``/``nn.Embedding`` (a ``Linear`` target never matches a Conv1D; a target naming one
    raises "Quantization of module type Conv1D is not supported"), and transformers converts Conv1D
    to linear only for bitsandbytes, not for compressed-tensors. So ``from_pretrained`` reports the
    packed tensors unexpected and the Conv1D weights missing (randomly initialised, wrong outputs),
    and with ``dequantize=True`` fails on the (out, in) weights it decompresses for (in, out) Conv1D
    parameters. vLLM's GPT-2 builds linear layers and transposes only tensors named ``.weight``."""
    if not packed or not builds_conv1d(model):
        return False
    log.warning("%d quantized layers (e.g. %s) are Conv1D layers in transformers' %s, which transformers + "
                "compressed-tensors cannot load quantized (compressed-tensors quantizes only nn.Linear, and "
                "transformers has no Conv1D-to-Linear conversion for it): from_pretrained would leave them "
                "randomly initialised. compress.load_model loads this checkpoint (vLLM's GPT-2 loader, by its "
                "source, reads the pack-quantized tensors); for transformers, export the model unquantized",
                len(packed), packed[0], type(model).__name__)
    return True


__all__ = ["TransposedLinear", "builds_conv1d", "checkpoint_layout", "conv1d_to_linear", "transposed_weights",
           "warn_quantized_conv1d"]
