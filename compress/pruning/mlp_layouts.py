"""How each model family lays out its MLP, for structured pruning of MLP channels.

An MLP channel i is one intermediate feature. It lives in column i of the output projection (the
channels are its input features) and in the rows that compute it in the input projections:

    separate gate/up (Llama, Qwen2, Mistral, Gemma):  gate_proj row i, up_proj row i, down_proj column i
    fused gate_up (Phi-3):                           gate_up_proj rows i and I + i (its 2*I rows are
                                                     I gate rows, then I up rows), down_proj column i
    non-gated (OPT fc1/fc2, GPT-NeoX and Falcon       the up projection's row i (with its bias entry),
    dense_h_to_4h/dense_4h_to_h):                     the down projection's column i

Removing a channel removes exactly those, and the family's config field of the width
(``intermediate_size``, ``ffn_dim``, ``ffn_hidden_size``) is set to the new width, so that transformers
builds the smaller model from the config alone. A layout matches a decoder layer when its modules exist
and its config field equals the width they have: GPT-NeoX and Falcon share module names, and only the
config field tells them apart (Falcon's ``ffn_hidden_size`` comes first).

Not supported, with a message saying why: routed mixture-of-experts MLPs (3D expert parameters in
transformers, or compress.moe's per-expert linears under ``mlp.experts``: narrowing them would need every
expert of every layer cut to the one width ``moe_intermediate_size`` / Mixtral's ``intermediate_size``
gives, which is not done yet), models whose config does not state the MLP width (BLOOM: 4 * hidden)
. GPT-2's ``Conv1D`` MLP is pruned once ``prepare_model`` has made it a linear.

The two slicing primitives (``check_linear``, ``slice_linear``) are shared with attention-head pruning.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MLPLayout:
    """Where one family's MLP channels live, relative to a decoder layer."""

    family: str                 # the models that use it, for messages
    down: str                   # output projection: its input features are the channels
    ups: tuple[str, ...]        # input projections: their output rows (and bias entries) compute the channels
    width_field: str            # config field of the width, rewritten after pruning
    blocks: int = 1             # channel blocks stacked in each input projection's rows (fused gate_up: 2)
    default_width: int | None = None  # a null width field means this many times hidden_size (GPT-2's n_inner)
    refusal: str | None = None  # a recognised layout that cannot be pruned: why, and what to do instead

    def width(self, config) -> int | None:
        """The MLP width ``config`` gives (``default_width`` x hidden_size when the field is null)."""
        width = getattr(config, self.width_field, None)
        if width is None and self.default_width:
            width = self.default_width * config.hidden_size
        return width

    @property
    def block(self) -> str:
        """The MLP module, relative to the decoder layer ("mlp"; "" for OPT, whose fc1/fc2 sit in the layer)."""
        return self.down.rpartition(".")[0]

    def rows(self, channels: torch.Tensor, width: int) -> torch.Tensor:
        """Rows of each input projection that compute ``channels`` of a ``width``-channel MLP: the
        channels themselves, then (fused) the same channels in each further block of ``width`` rows."""
        offsets = torch.arange(self.blocks, device=channels.device) * width
        return (offsets[:, None] + channels[None, :]).reshape(-1)             # (blocks * channels,)


# First match wins; see the module docstring for the order of the two dense_h_to_4h layouts.
MLP_LAYOUTS = (
    MLPLayout("Llama, Qwen2, Mistral, Gemma", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), "intermediate_size"),
    MLPLayout("Phi-3", "mlp.down_proj", ("mlp.gate_up_proj",), "intermediate_size", blocks=2),
    MLPLayout("OPT", "fc2", ("fc1",), "ffn_dim"),
    MLPLayout("Falcon", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), "ffn_hidden_size"),
    MLPLayout("GPT-NeoX", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), "intermediate_size"),
    # Conv1D layers reach here as compress.conv1d.TransposedLinear (prepare_model); n_inner may be null,
    # meaning 4 * n_embd, and is written out after pruning.
    MLPLayout("GPT-2", "mlp.c_proj", ("mlp.c_fc",), "n_inner", default_width=4),
)

# Linears that write an MLP's output into the residual stream (the "weight" importance of a layer).
MLP_WRITERS = tuple(dict.fromkeys(layout.down.rpartition(".")[2] for layout in MLP_LAYOUTS if not layout.refusal))

# nn.Linear subclasses that only reorder forward's arithmetic or mark a checkpoint layout: sliced like
# nn.Linear (transformers' FalconLinear; compress.conv1d's TransposedLinear, GPT-2's Conv1D as a linear).
PLAIN_LINEAR_SUBCLASSES = frozenset({"FalconLinear", "TransposedLinear"})


def check_linear(module: nn.Module, name: str) -> None:
    """Refuse what ``slice_linear`` cannot slice: anything but a float nn.Linear (e.g. a quantized layer)."""
    cls = type(module)
    if cls is nn.Linear or (cls.__name__ in PLAIN_LINEAR_SUBCLASSES
                            and cls.__module__.startswith(("transformers.", "compress."))):
        return
    raise ConfigError(f"{name} is a {cls.__name__}; structured pruning slices float nn.Linear layers, "
                      f"so prune before quantizing")


def slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep the rows (dim 0: outputs, with their bias) or columns (dim 1: inputs) ``idx`` of ``linear``,
    in place: the module object, its hooks, dtype and device stay."""
    weight = linear.weight
    idx = idx.to(weight.device)
    linear.weight = nn.Parameter(weight.detach().index_select(dim, idx).clone(), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, idx).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = idx.numel()
    else:
        linear.in_features = idx.numel()


def _moe_module(names: dict[str, nn.Module]) -> str | None:
    """The first module of a decoder layer that holds routed experts ("mlp.experts", "block_sparse_moe")."""
    for name in names:
        leaf = name.rpartition(".")[2].lower()
        if leaf == "experts" or "moe" in leaf:
            return name
    return None


def find_mlp(layer: nn.Module, config, where: str) -> MLPLayout:
    """The layout of ``layer``'s MLP (``where``: the layer's full name, for messages), checked against
    ``config``: its modules are float nn.Linear and its config field gives their width."""
    names = dict(layer.named_modules())
    model_type = getattr(config, "model_type", None) or type(layer).__name__
    experts = _moe_module(names)
    if experts is not None:
        field = "moe_intermediate_size" if isinstance(getattr(config, "moe_intermediate_size", None), int) \
            else "intermediate_size"
        raise ConfigError(f"structured pruning of 'mlp' does not support mixture-of-experts model {model_type} "
                          f"({where}.{experts}) yet: it does not narrow routed experts, which transformers "
                          f"reloads only at the one width config.{field} gives to all of them; prune experts "
                          f"(expert pruning) or the shared/dense MLPs instead, or use target 'heads' or 'layers'")
    mismatched = []
    for layout in MLP_LAYOUTS:
        if not all(n in names for n in (layout.down, *layout.ups)):
            continue
        if layout.refusal:
            raise ConfigError(f"structured pruning of 'mlp' does not support {layout.family} ({model_type}, "
                              f"{where}): {layout.refusal}")
        for n in (layout.down, *layout.ups):
            check_linear(names[n], f"{where}.{n}")
        width = layout.width(config)
        down = names[layout.down]
        if isinstance(width, int) and not isinstance(width, bool) and width == down.in_features and \
                all(names[n].out_features == layout.blocks * width for n in layout.ups):
            return layout
        mismatched.append(f"{where}.{layout.down} has {down.in_features} channels, config.{layout.width_field} "
                          f"is {width!r}")
    if mismatched:
        raise ConfigError(f"the config of {model_type} does not state the MLP width ({'; '.join(mismatched)}): "
                          f"structured pruning writes the pruned width into the config, so it prunes only an MLP "
                          f"whose width one config field gives for every layer; prune 'layers' instead")
    tried = ", ".join(dict.fromkeys(f"{where}.{layout.down} with {' + '.join(layout.ups)}" for layout in MLP_LAYOUTS))
    raise ConfigError(f"structured pruning of 'mlp' found no supported MLP in {where} ({type(layer).__name__}); "
                      f"looked for {tried}")


def mlp_weight_scores(layer: nn.Module, layout: MLPLayout) -> torch.Tensor:
    """Importance "weight" of each channel: ||W_down[:, i]|| times the norms of every input-projection row
    that computes it (gate and up rows; both halves of a fused gate_up; fc1's row)."""
    scores = layer.get_submodule(layout.down).weight.detach().float().norm(dim=0)      # (width,)
    for name in layout.ups:
        row_norms = layer.get_submodule(name).weight.detach().float().norm(dim=1)     # (blocks * width,)
        scores = scores * row_norms.reshape(layout.blocks, -1).prod(dim=0)
    return scores


def slice_mlp(layer: nn.Module, layout: MLPLayout, kept: torch.Tensor) -> None:
    """Keep only the channels ``kept`` (increasing indices) of ``layer``'s MLP, in place."""
    down = layer.get_submodule(layout.down)
    rows = layout.rows(kept, down.in_features)
    for name in layout.ups:
        slice_linear(layer.get_submodule(name), rows, dim=0)
    slice_linear(down, kept, dim=1)
    parent = layer.get_submodule(layout.block)
    if isinstance(getattr(parent, layout.width_field, None), int):          # LlamaMLP.intermediate_size
        setattr(parent, layout.width_field, kept.numel())


__all__ = ["MLPLayout", "MLP_LAYOUTS", "MLP_WRITERS", "check_linear", "slice_linear", "find_mlp",
           "mlp_weight_scores", "slice_mlp"]
