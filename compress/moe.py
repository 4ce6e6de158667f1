"""Mixture-of-experts layers as the engine sees them: one ``nn.Linear`` per expert projection.

transformers 5 stores a layer's experts as two 3D parameters, ``experts.gate_up_proj`` of shape
(experts, 2 * intermediate, hidden) (gate rows, then up rows) and ``experts.down_proj`` of shape
(experts, hidden, intermediate), which no linear-layer method sees. ``unfuse_experts`` replaces such a
module by ``LinearExperts``: the same computation (same routing, same expert order, same weighted
sum), with every expert a small gated MLP of three ``nn.Linear`` named as the family's original
checkpoints name them. Every pass that targets linears (RTN, GPTQ, the FP4 grids, pruning, LoRA)
then covers the experts with no per-method code, each expert's statistics come from the tokens
routed to it (its linears see only those), and an export writes the per-expert tensor names that
transformers' loader and vLLM's MoE loaders read.

The only per-family code is ``LAYOUTS``: how a family names its experts in a checkpoint.
A family whose experts are laid out otherwise (gpt-oss: transposed, interleaved gate/up with biases;
Llama 4: batched expert matmuls) is refused by ``check_supported`` before any work.

Calibration options live on the module, set by the methods for the duration of a layer:
``route_all`` runs every expert on every token (its linears observe all tokens) while the layer's
output still uses the real routing.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import statistics

import torch
from torch import nn

from .errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How one family's original checkpoints name an expert's projections, and the module path
    under which they store the expert block when it differs from transformers 5's (``mlp``)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    checkpoint_block: str | None = None        # e.g. "block_sparse_moe" (Mixtral) for "mlp"


_QWEN_STYLE = ExpertLayout()
_MIXTRAL_STYLE = ExpertLayout("w1", "w3", "w2", checkpoint_block="block_sparse_moe")

# model_type -> layout of its 3D experts. Families not listed but with the same module layout
# (3D gate_up_proj/down_proj and forward(hidden_states, top_k_index, top_k_weights)) get the
# Qwen-style names with a warning.
LAYOUTS: dict[str, ExpertLayout] = {
    **{t: _QWEN_STYLE for t in ("qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo", "deepseek_v2",
                                "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe", "hunyuan_v1_moe",
                                "exaone_moe", "cohere2_moe")},
    **{t: _MIXTRAL_STYLE for t in ("mixtral", "minimax")},
}

# Families whose experts transformers builds in a layout LinearExperts does not reproduce.
UNSUPPORTED = {
    "gpt_oss": "its experts are transposed with interleaved gate/up rows, biases and a clamped activation",
    "llama4_text": "its experts run as one batched matmul over pre-dispatched tokens",
    "llama4": "its experts run as one batched matmul over pre-dispatched tokens",
}


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears named by the family's layout."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module, layout: ExpertLayout):
        super().__init__()
        self.names = (layout.gate, layout.up, layout.down)
        for name, linear in zip(self.names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LinearExperts(nn.Module):
    """A layer's experts as children ``"0"`` .. ``"E-1"`` (not a ModuleList, which would look like a
    stack of decoder layers), computing what transformers' 3D experts module computes."""

    def __init__(self, experts: list[Expert], layout: ExpertLayout):
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)
        self.layout = layout
        self.route_all = False          # calibration: every expert observes every token

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self.num_experts))

    def __getitem__(self, i: int) -> Expert:
        return getattr(self, str(i))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (T, hidden); top_k_index / top_k_weights (T, k)
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index).tolist() if not self.route_all else range(self.num_experts)
        for e in hit:
            if e >= self.num_experts:            # expert-parallel padding index
                continue
            token, slot = torch.where(top_k_index == e)
            if self.route_all:
                y = self[e](hidden_states)[token]                    # observe all, keep the routed rows
            elif token.numel():
                y = self[e](hidden_states[token])
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def layout_of(model_type: str) -> ExpertLayout:
    return LAYOUTS.get(model_type, _QWEN_STYLE)


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3)


def _has_standard_layout(module: nn.Module) -> bool:
    """(E, 2I, H) gate_up, (E, H, I) down, no biases, forward(hidden_states, top_k_index, top_k_weights)."""
    e, two_i, h = module.gate_up_proj.shape
    params = list(inspect.signature(module.forward).parameters)
    biased = any(n.endswith("_bias") for n, _ in module.named_parameters(recurse=False))
    return (tuple(module.down_proj.shape) == (e, h, two_i // 2) and not biased
            and params[:3] == ["hidden_states", "top_k_index", "top_k_weights"] and hasattr(module, "act_fn"))


def check_supported(model: nn.Module) -> None:
    """Refuse, before any work, a model whose experts compress cannot see as linears."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for name, module in model.named_modules():
        if _is_fused_experts(module) and (model_type in UNSUPPORTED or not _has_standard_layout(module)):
            why = UNSUPPORTED.get(model_type, f"{type(module).__name__} does not store gate_up_proj as (experts, "
                                              f"2*intermediate, hidden) and down_proj as (experts, hidden, "
                                              f"intermediate) with the forward(hidden_states, top_k_index, "
                                              f"top_k_weights) of Qwen3-MoE / Mixtral")
            raise ModelLoadError(f"model type {model_type!r}: the mixture-of-experts weights at {name} cannot be "
                                 f"compressed by compress ({why}); nothing was changed. Supported MoE families: "
                                 f"{', '.join(sorted(LAYOUTS))}")


def unfuse_experts(model: nn.Module) -> int:
    """Replace every 3D experts module of ``model`` by an equivalent ``LinearExperts``, in place (meta
    tensors stay on meta). Returns how many were replaced; idempotent."""
    check_supported(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    layout = layout_of(model_type)
    # Names only: holding the 3D modules while converting would keep every block's weights twice.
    fused = [n for n, m in model.named_modules() if _is_fused_experts(m)]
    if fused and model_type not in LAYOUTS:
        log.warning("model type %r is not in compress's MoE table; its experts have the Qwen3-MoE layout and are "
                    "exported with Qwen-style names (experts.N.gate_proj/up_proj/down_proj)", model_type)
    experts = 0
    for name in fused:                       # one block at a time: its 3D tensors are freed as it is replaced
        new = _linear_experts(model.get_submodule(name), layout)
        set_submodule(model, name, new)
        experts = new.num_experts
    if fused:
        log.info("%d expert blocks (%d experts each) seen as per-expert linears", len(fused), experts)
    return len(fused)


def _linear_experts(module: nn.Module, layout: ExpertLayout) -> LinearExperts:
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()     # (E, 2I, H), (E, H, I)
    n_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    experts = []
    for e in range(n_experts):
        gate, up, dn = (nn.Linear(i, o, bias=False, device=gate_up.device, dtype=gate_up.dtype)
                        for i, o in ((hidden, inter), (hidden, inter), (inter, hidden)))
        if not gate_up.is_meta:
            gate.weight.data.copy_(gate_up[e, :inter])
            up.weight.data.copy_(gate_up[e, inter:])
            dn.weight.data.copy_(down[e])
        experts.append(Expert(gate, up, dn, module.act_fn, layout))
    return LinearExperts(experts, layout)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def expert_fields(config) -> list[str]:
    """The config fields that hold the number of routed experts per layer (one name per family:
    ``num_experts``, ``num_local_experts``, ``n_routed_experts``)."""
    fields = config.to_dict()
    return [f for f in ("num_experts", "num_local_experts", "n_routed_experts") if isinstance(fields.get(f), int)]


def expert_share(config) -> float:
    """The share of tokens one routed expert sees on average: num_experts_per_tok / experts."""
    fields = expert_fields(config)
    experts = getattr(config, fields[0]) if fields else 0
    return min(1.0, getattr(config, "num_experts_per_tok", 1) / experts) if experts else 1.0


# --- names in the checkpoint -------------------------------------------------------------------
def _block_rename(model_type: str) -> tuple[str, str] | None:
    block = layout_of(model_type).checkpoint_block if model_type in LAYOUTS else None
    return (".mlp.", f".{block}.") if block else None


def has_linear_experts(model: nn.Module) -> bool:
    return any(isinstance(m, LinearExperts) for m in model.modules())


def to_checkpoint_name(model_type: str, name: str) -> str:
    """A module or tensor name as the family's original checkpoints spell it (Mixtral's experts and
    router live under ``block_sparse_moe``, transformers 5 calls that block ``mlp``)."""
    rename = _block_rename(model_type)
    return name.replace(*rename) if rename else name


def from_checkpoint_name(model_type: str, name: str) -> str:
    rename = _block_rename(model_type)
    return name.replace(rename[1], rename[0]) if rename else name


def router_names(model: nn.Module) -> list[str]:
    """The routers (``gate`` beside ``experts``; Qwen2-MoE's ``shared_expert_gate``): left dense."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LinearExperts) or _is_fused_experts(module):
            parent = name.rpartition(".")[0]
            block = model.get_submodule(parent) if parent else model
            for leaf in ("gate", "shared_expert_gate"):
                if isinstance(getattr(block, leaf, None), nn.Module):
                    out.append(f"{parent}.{leaf}" if parent else leaf)
    return out


# --- calibration -------------------------------------------------------------------------------
class _RoutingCounter:
    REDUCE = {"counts": "sum"}

    def __init__(self, num_experts: int):
        self.counts = torch.zeros(num_experts, dtype=torch.long)

    def add(self, top_k_index: torch.Tensor) -> None:
        index = top_k_index.reshape(-1)
        index = index[index < len(self.counts)]
        self.counts += torch.bincount(index.cpu(), minlength=len(self.counts))


def _top_k_index(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[1] if len(args) > 1 else kwargs["top_k_index"]


def routed_tokens(blocks: dict[str, LinearExperts], inputs) -> dict[str, int]:
    """Tokens the router sends to each expert of ``blocks`` (full name -> block) over a layer's
    calibration ``inputs`` (the engine's ``LayerInputs``), as full expert name -> count."""
    stats = inputs.observe(blocks, lambda m: _RoutingCounter(m.num_experts), select=_top_k_index)
    return {f"{name}.{e}": int(n) for name, counter in stats.items() for e, n in enumerate(counter.counts.tolist())}


def expert_blocks(layer: nn.Module, prefix: str) -> dict[str, LinearExperts]:
    """The expert blocks under ``layer``, by full name (``prefix`` + name)."""
    return {prefix + n: m for n, m in layer.named_modules() if isinstance(m, LinearExperts)}


def prepare_experts(layer: nn.Module, prefix: str, inputs, route_all: bool) -> dict[str, int]:
    """What a weight method does to a layer's experts before observing it (its ``prepare_layer``):
    count the tokens routed to each expert over ``inputs`` and switch all-expert observation on if
    asked. Returns expert name -> routed tokens (empty for a dense layer or without data)."""
    blocks = expert_blocks(layer, prefix)
    if not blocks or inputs is None:
        return {}
    counts = routed_tokens(blocks, inputs)
    set_route_all(layer, route_all)
    return counts


def set_route_all(layer: nn.Module, on: bool) -> list[str]:
    """Switch all-expert observation on or off for the expert blocks under ``layer``; their names."""
    names = []
    for name, module in layer.named_modules():
        if isinstance(module, LinearExperts):
            module.route_all = on
            names.append(name)
    return names


# --- calibration summary -----------------------------------------------------------------------
def expert_of(name: str) -> tuple[str, int] | None:
    """("model.layers.3.mlp.experts", 7) for a name inside expert 7 of that block, else None."""
    head, sep, tail = name.partition(".experts.")
    index = tail.split(".", 1)[0]
    return (head + ".experts", int(index)) if sep and index.isdigit() else None


def token_summary(tokens: dict[str, int]) -> dict[str, float] | None:
    """Experts counted, and min / median / max / zero-count of their tokens, from counts keyed by
    expert name (``...experts.7``) or by module name inside an expert (its largest count is kept);
    None when there is no expert."""
    per_expert: dict[tuple[str, int], int] = {}
    for name, n in tokens.items():
        key = expert_of(name + ".")
        if key is not None:
            per_expert[key] = max(per_expert.get(key, 0), n)
    if not per_expert:
        return None
    counts = sorted(per_expert.values())
    return {"experts": len(counts), "min": counts[0], "median": float(statistics.median(counts)), "max": counts[-1],
            "zero": sum(c == 0 for c in counts)}


def describe_tokens(summary: dict[str, float]) -> str:
    return (f"tokens per expert over {summary['experts']} experts: min {summary['min']}, median "
            f"{summary['median']:g}, max {summary['max']}" + (f"; {summary['zero']} got none" if summary['zero'] else ""))


__all__ = ["expert_fields", "expert_share", "LinearExperts", "Expert", "ExpertLayout", "LAYOUTS", "unfuse_experts", "check_supported",
           "to_checkpoint_name", "from_checkpoint_name", "router_names", "token_summary", "describe_tokens", "expert_of",
           "routed_tokens", "set_route_all", "expert_blocks", "prepare_experts"]
