"""Structured pruning: remove MLP channels, attention heads or whole decoder layers, so the result is
a genuinely smaller dense model that any transformers install loads as a plain checkpoint.

Every unit (MLP channel, attention head or KV group, decoder layer) gets an importance score; the
lowest-scored units go. With calibration data ("activation") a channel's or head's score is the
mean, over calibration tokens, of the L2 norm of what that unit adds to the layer's output:

    MLP channel i:  s_i = mean_t |a_t,i| * ||W_down[:, i]||_2      a = act(gate(x)) * up(x) (Llama,
                                                                     Qwen2, Phi-3), act(fc1(x)) (OPT,
                                                                     GPT-NeoX): the input of the down
                                                                     projection (mlp_layouts.py)
    head unit u:    s_u = mean_t ||W_o[:, u] z_t,u||_2              z = the input of o_proj; u = one
                                                                     query head, or one KV group's
                                                                     query heads together

(the MLP product is the same quantity: a channel's contribution W_down[:, i] * a_t,i has norm
|a_t,i| * ||W_down[:, i]||), as in Minitron and LLM-Pruner. A decoder layer's score is the
ShortGPT/Minitron block importance 1 - cos(x_t, layer(x_t)) averaged over tokens: a layer that
barely turns its input is the first to go.

Importance is measured on the dense model in one walk of the shared calibration engine; each layer
is shrunk in ``finalize`` once its statistics are complete. The engine cannot shrink a module
mid-forward (the pre-hook that hands over the statistics runs right before the module computes on a
full-width input), so the layer outputs fed to the next layer are those of the dense layer: every
layer is ranked on dense activations, as Minitron does, not on its pruned predecessors' outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import MethodConfig, register_method
from ..engine import LayerMethod, compress_layers, default_device, run_layerwise
from ..errors import ConfigError
from ..structure import prepare_model
from ..modeling import find_decoder_layers, onloaded
from .mlp_layouts import MLP_WRITERS, MLPLayout, check_linear, find_mlp, mlp_weight_scores, slice_linear, slice_mlp

log = logging.getLogger(__name__)

ATTENTION = "self_attn"
HEAD_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Linears that write into the residual stream: the "weight" importance of a whole layer.
RESIDUAL_WRITERS = ("o_proj", "out_proj", *MLP_WRITERS)
TARGETS = ("mlp", "heads", "layers")
IMPORTANCES = ("activation", "weight", "random")
HEAD_MODES = ("kv_groups", "query")


@dataclasses.dataclass
class StructuredConfig(MethodConfig):
    """Structured pruning: make the model smaller by removing whole units. One target per pass
    (chain passes in a recipe to prune several).

    target:         "mlp": intermediate channels of every MLP (every layer keeps the same count,
                    which the family's config field, intermediate_size / ffn_dim / ffn_hidden_size,
                    must express; each layer ranks its own; layouts in mlp_layouts.py);
                    "heads": attention heads of every layer (same count per layer; config
                    num_attention_heads / num_key_value_heads change, head_dim is written out);
                    "layers": whole decoder layers (config.num_hidden_layers, layer_types).
    ratio:          fraction of the target's units to remove, in (0, 1); default 0.25 when `keep`
                    is not given. Rounded to whole units: MLP width to a multiple of `multiple_of`,
                    heads to whole KV groups ("kv_groups") or to the same count in every group
                    ("query"), layers to whole layers.
    keep:           alternative to ratio: how many units stay, exactly: the MLP width (a multiple
                    of `multiple_of`), the number of query heads (a multiple of the query heads per
                    KV group for "kv_groups", of the KV heads for "query"), or the number of layers.
    importance:     how units are ranked: "activation" (needs calibration data; see the module
                    docstring for the formulas), "weight" (no data: MLP channel = ||W_down[:, i]||
                    times the norms of the rows that compute it: gate and up (both halves of a fused
                    gate_up), or fc1; head unit = ||W_o[:, u]||_F times ||W_v||_F of its KV group;
                    layer = sum of the Frobenius norms of o_proj and the MLP's down projection, the
                    linears that write into the residual stream), or "random"
                    (seeded: the baseline any score must beat).
    head_mode:      grouped-query attention, target "heads": "kv_groups" (default) removes whole KV
                    groups (a KV head with all its query heads): the KV cache shrinks too, and it is
                    the only mode for plain multi-head attention (one query head per KV head).
                    "query" removes the same number of query heads from every group, keeping the
                    KV heads (finer steps for models with few KV heads; the cache stays as is).
    multiple_of:    target "mlp": the kept width is rounded to a multiple of this (default 128, so
                    the pruned down_proj still takes int4 group_size 128 and tiles cleanly on
                    tensor cores; use 8 or 1 for tiny models).
    protect_layers: target "layers": decoder-layer indices never removed (negative counts from the
                    end, e.g. [0, -1] keeps the first and the last layer).
    seed:           seed of importance "random".
    """

    method = "structured"
    target: Literal["mlp", "heads", "layers"] = "mlp"
    ratio: float | None = None
    keep: int | None = None
    importance: Literal["activation", "weight", "random"] = "activation"
    head_mode: Literal["kv_groups", "query"] = "kv_groups"
    multiple_of: int = 128
    protect_layers: list[int] = dataclasses.field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        for field, value, options in (("target", self.target, TARGETS), ("importance", self.importance, IMPORTANCES),
                                      ("head_mode", self.head_mode, HEAD_MODES)):
            if value not in options:
                raise ConfigError(f"{field} must be one of {list(options)}, got {value!r}")
        if self.ratio is not None and self.keep is not None:
            raise ConfigError(f"give ratio ({self.ratio}) or keep ({self.keep}), not both")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"ratio is the fraction of {self.target} units removed and must be in (0, 1), "
                              f"got {self.ratio}")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"keep is the number of {self.target} units left and must be at least 1, got {self.keep}")
        if self.multiple_of < 1:
            raise ConfigError(f"multiple_of must be a positive integer (1: no rounding), got {self.multiple_of}")
        if self.protect_layers and self.target != "layers":
            raise ConfigError("protect_layers applies to target 'layers' only: mlp and heads prune every layer to "
                              "the same width, which a plain checkpoint's config requires")

    @property
    def fraction(self) -> float | None:
        """The ratio to remove, or None when an absolute `keep` was given."""
        return None if self.keep is not None else (0.25 if self.ratio is None else self.ratio)

    @property
    def amount(self) -> str:
        """The asked amount, as messages quote it: "ratio 0.25" or "keep 96"."""
        return f"keep {self.keep}" if self.keep is not None else f"ratio {self.fraction:g}"

    def describe(self) -> str:
        amount = f"keep {self.keep}" if self.keep is not None else f"-{100 * self.fraction:g}%"
        mode = f" {self.head_mode}" if self.target == "heads" else ""
        return f"{self.target}{mode} {amount} {self.importance}"


@dataclasses.dataclass
class StructuredRecord:
    """What one pass removed from one module (or, under the key "model", the whole model's counts:
    unit "parameter", total/kept = parameters before/after)."""

    name: str               # the module pruned: "model.layers.3.mlp", "model.layers.3.self_attn", "model.layers"
    unit: str               # "channel", "head", "kv_group", "layer" or "parameter"
    total: int              # units before
    kept: int               # units after
    removed: list[int]      # indices of the removed units, numbered as before the pass
    scores: list[float]     # importance of every unit before the pass (higher = kept first)
    params_before: int
    params_after: int


# --- pure helpers --------------------------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in increasing index order (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _unit_columns(units: torch.Tensor, width: int) -> torch.Tensor:
    """Feature indices of whole units of ``width`` features each: [u*width, (u+1)*width) for u in units."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).reshape(-1)


# --- statistics ----------------------------------------------------------------------------------------

class AbsSumStats:
    """Per input feature of down_proj / fc2: the sum of |x| over the calibration tokens."""

    REDUCE = {"abs_sum": "sum", "tokens": "sum"}

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features)                                   # (tokens, in)
        self.abs_sum += x.float().abs().sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class UnitOutputStats:
    """Per unit u of o_proj's input (``width`` consecutive features: one head or one KV group): the sum
    over tokens of ||W_o[:, u] z_u||_2, the norm of what that unit adds to the attention output."""

    REDUCE = {"norm_sum": "sum", "tokens": "sum"}
    # Elements of the (tokens, units, hidden) block of per-unit outputs held at once (64 MiB float32).
    BLOCK_ELEMENTS = 1 << 24

    def __init__(self, o_proj: nn.Linear, width: int):
        hidden, features = o_proj.weight.shape
        self.units, self.width = features // width, width
        self.weight = o_proj.weight.detach().float().reshape(hidden, self.units, width)   # (hidden, U, s)
        self.norm_sum = torch.zeros(self.units, dtype=torch.float32, device=o_proj.weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.units, self.width).float()                   # (tokens, U, s)
        rows = max(1, self.BLOCK_ELEMENTS // (self.units * self.weight.shape[0]))
        for block in x.split(rows):
            out = torch.einsum("tus,hus->tuh", block, self.weight)           # (t, U, hidden)
            self.norm_sum += out.norm(dim=-1).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.norm_sum / max(self.tokens, 1)


# --- where the units live ------------------------------------------------------------------------------

def _find_attention(model: nn.Module, layer: nn.Module, where: str) -> nn.Module:
    attn = getattr(layer, ATTENTION, None)
    missing = [p for p in HEAD_PROJS if not isinstance(getattr(attn, p, None), nn.Module)]
    if attn is None or missing or not hasattr(attn, "head_dim"):
        miss = f"{where}.{ATTENTION}" + (f".{missing[0]}" if attn is not None and missing else "")
        raise ConfigError(f"structured pruning of 'heads' needs Llama-style attention ({where}.{ATTENTION} with "
                          f"{'/'.join(HEAD_PROJS)} and a head_dim the config can store), but {type(model).__name__} "
                          f"has no {miss}; prune 'mlp' or 'layers' instead")
    for p in HEAD_PROJS:
        check_linear(getattr(attn, p), f"{where}.{ATTENTION}.{p}")
    return attn


def _one_mlp_layout(config, layers: nn.ModuleList, wheres: list[str]) -> MLPLayout:
    """The MLP layout every decoder layer shares (one config field gives one width to all of them)."""
    layouts = [find_mlp(layer, config, where) for layer, where in zip(layers, wheres)]
    for layout, where in zip(layouts, wheres):
        if layout != layouts[0]:
            raise ConfigError(f"{where} has a {layout.family} MLP but {wheres[0]} a {layouts[0].family} one; "
                              f"structured pruning of 'mlp' needs one MLP layout in every layer")
    return layouts[0]


def _head_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) from the config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


# --- how many units stay -------------------------------------------------------------------------------

def _mlp_keep(cfg: StructuredConfig, width: int) -> int:
    m = cfg.multiple_of
    if cfg.keep is not None:
        keep = cfg.keep
        if keep % m:
            raise ConfigError(f"keep {keep} is not a multiple of multiple_of {m}; pass a multiple of {m} or "
                              f"multiple_of=1 to keep exactly {keep} channels")
    else:
        keep = max(m, _round_half_up(width * (1 - cfg.fraction) / m) * m)
    if keep >= width:
        raise ConfigError(f"{cfg.amount} of MLP width {width}, rounded to a multiple of {m}, keeps {keep} channels "
                          f"and removes nothing; pass a larger ratio, a smaller keep, or a smaller multiple_of "
                          f"(e.g. 8)")
    return keep


def _heads_keep(cfg: StructuredConfig, heads: int, kv: int) -> int:
    """Units kept per layer: KV groups ("kv_groups") or query heads per group ("query")."""
    group = heads // kv
    if cfg.head_mode == "kv_groups":
        total, unit, step = kv, "KV groups", group
    else:
        if group == 1:
            raise ConfigError(f"head_mode 'query' removes query heads within each KV group, but the model has one "
                              f"query head per KV head ({heads} heads); use head_mode 'kv_groups'")
        total, unit, step = group, "query heads per KV group", kv
    if cfg.keep is not None:
        if cfg.keep % step:
            raise ConfigError(f"keep {cfg.keep} query heads breaks grouped-query attention ({heads} query heads over "
                              f"{kv} KV heads): head_mode {cfg.head_mode!r} needs a multiple of {step}")
        keep = cfg.keep // step
    else:
        keep = total - _round_half_up(cfg.fraction * total)
    if keep <= 0:
        other = "; try head_mode 'query'" if cfg.head_mode == "kv_groups" and group > 1 else ""
        raise ConfigError(f"{cfg.amount} would remove all {total} {unit} of every layer; "
                          f"pass a smaller ratio{other}")
    if keep >= total:
        raise ConfigError(f"{cfg.amount} removes none of the {total} {unit} "
                          f"({heads} query heads, {kv} KV heads); pass a larger ratio")
    return keep


def _layers_remove(cfg: StructuredConfig, n_layers: int) -> int:
    remove = n_layers - cfg.keep if cfg.keep is not None else _round_half_up(cfg.fraction * n_layers)
    if remove >= n_layers:
        raise ConfigError(f"{cfg.amount} would remove all {n_layers} decoder layers; "
                          f"pass a smaller ratio or keep >= 1")
    if remove <= 0:
        raise ConfigError(f"{cfg.amount} removes none of the {n_layers} decoder layers; "
                          f"pass a larger ratio or a smaller keep")
    return remove


# --- the pruner: scores each layer's units and slices them -------------------------------------------

class StructuredPruner(LayerMethod):
    """Target "mlp" or "heads": the engine method. With importance "activation" it observes the
    input of each layer's down_proj / o_proj; each layer is ranked and sliced in ``finalize``."""

    def __init__(self, model: nn.Module, cfg: StructuredConfig):
        self.cfg = cfg
        self.name = f"structured {cfg.target}"
        self.config = model.config
        self.layers_name, self.layers = find_decoder_layers(model)
        self.records: dict[str, StructuredRecord] = {}
        self._stats: dict[str, AbsSumStats | UnitOutputStats] = {}
        self._random = torch.Generator().manual_seed(cfg.seed)
        wheres = [f"{self.layers_name}.{i}" for i in range(len(self.layers))]
        # Every layer is checked for the parts it needs before any work (layers differ in hybrid models).
        if cfg.target == "mlp":
            self.mlp = _one_mlp_layout(self.config, self.layers, wheres)
            self.keep = _mlp_keep(cfg, self.mlp.width(self.config))
            self.local_target = self.mlp.down
        else:
            for layer, where in zip(self.layers, wheres):
                _find_attention(model, layer, where)
            self.heads, self.kv, self.head_dim = _head_geometry(model)
            if self.heads % self.kv:
                raise ConfigError(f"{self.heads} query heads do not split over {self.kv} KV heads")
            self.group = self.heads // self.kv
            self.keep = _heads_keep(cfg, self.heads, self.kv)
            self.local_target = f"{ATTENTION}.o_proj"

    # --- the engine's interface (activation importance) -----------------------------------------
    def is_target(self, name: str, module: nn.Module) -> bool:
        prefix, _, local = name.partition(self.layers_name + ".")
        return not prefix and local.partition(".")[2] == self.local_target

    def new_stats(self, module: nn.Linear) -> AbsSumStats | UnitOutputStats:
        if self.cfg.target == "mlp":
            return AbsSumStats(module.in_features, device=module.weight.device)
        width = self.head_dim * (self.group if self.cfg.head_mode == "kv_groups" else 1)
        return UnitOutputStats(module, width)

    def solve(self, names: list[str], modules: list[nn.Module], stats) -> None:
        # Observe only: the layer must finish its forward at full width (see the module docstring).
        if self.cfg.importance != "activation":
            return                                  # weight / random scores need no statistics
        if stats is None or stats.tokens == 0:
            raise RuntimeError(f"{names[0]} received no calibration input; cannot rank its units")
        self._stats[names[0]] = stats

    def finalize(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        self.prune_layer(root, prefix.rstrip("."))

    # --- scores and slicing -----------------------------------------------------------------------
    def prune_layer(self, layer: nn.Module, where: str) -> None:
        before = _param_count(layer)
        if self.cfg.target == "mlp":
            scores = self._mlp_scores(layer, where)
            kept = keep_top(scores, self.keep)
            slice_mlp(layer, self.mlp, kept)
            unit, name = "channel", f"{where}.{self.mlp.block}".rstrip(".")
        else:
            scores = self._head_scores(layer, where)
            kept = self._keep_heads(scores)
            self._slice_heads(getattr(layer, ATTENTION), kept)
            unit, name = ("kv_group" if self.cfg.head_mode == "kv_groups" else "head"), f"{where}.{ATTENTION}"
        removed = sorted(set(range(scores.numel())) - set(kept.tolist()))
        self.records[name] = StructuredRecord(name, unit, scores.numel(), kept.numel(), removed,
                                              scores.tolist(), before, _param_count(layer))

    def _mlp_scores(self, layer: nn.Module, where: str) -> torch.Tensor:
        if self.cfg.importance == "weight":
            return mlp_weight_scores(layer, self.mlp)
        col_norm = layer.get_submodule(self.mlp.down).weight.detach().float().norm(dim=0)     # (width,)
        if self.cfg.importance == "activation":
            return self._stats.pop(f"{where}.{self.mlp.down}").mean.to(col_norm.device) * col_norm
        return torch.rand(col_norm.numel(), generator=self._random)

    def _head_scores(self, layer: nn.Module, where: str) -> torch.Tensor:
        """One score per unit: per KV group ("kv_groups", U = kv) or per query head ("query", U = heads)."""
        attn = getattr(layer, ATTENTION)
        units = self.kv if self.cfg.head_mode == "kv_groups" else self.heads
        if self.cfg.importance == "activation":
            return self._stats.pop(f"{where}.{self.local_target}").mean
        if self.cfg.importance == "weight":
            hidden = attn.o_proj.weight.shape[0]
            o_norm = attn.o_proj.weight.detach().float().reshape(hidden, units, -1).norm(dim=(0, 2))   # (U,)
            v_norm = attn.v_proj.weight.detach().float().reshape(self.kv, -1).norm(dim=1)              # (kv,)
            return o_norm * v_norm.repeat_interleave(units // self.kv)
        return torch.rand(units, generator=self._random)

    def _keep_heads(self, scores: torch.Tensor) -> torch.Tensor:
        if self.cfg.head_mode == "kv_groups":
            return keep_top(scores, self.keep)                                # kept KV groups
        per_group = scores.reshape(self.kv, self.group)                       # (kv, heads per group)
        return torch.cat([keep_top(row, self.keep) + g * self.group for g, row in enumerate(per_group)])

    def _slice_heads(self, attn: nn.Module, kept: torch.Tensor) -> None:
        d = self.head_dim
        if self.cfg.head_mode == "kv_groups":
            q_rows = _unit_columns(kept, self.group * d)                      # the kept groups' query heads
            kv_rows = _unit_columns(kept, d)                                  # and their KV heads
            slice_linear(attn.k_proj, kv_rows, dim=0)
            slice_linear(attn.v_proj, kv_rows, dim=0)
            kv = kept.numel()
        else:
            q_rows = _unit_columns(kept, d)                                   # k/v stay: every group survives
            kv = self.kv
        slice_linear(attn.q_proj, q_rows, dim=0)
        slice_linear(attn.o_proj, q_rows, dim=1)
        heads = q_rows.numel() // d
        attn.num_key_value_groups = heads // kv                               # read by repeat_kv in forward
        for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if isinstance(getattr(attn, attr, None), int):                    # older / other attention classes
                setattr(attn, attr, value)

    def update_config(self) -> None:
        if self.cfg.target == "mlp":
            setattr(self.config, self.mlp.width_field, self.keep)
            return
        kv = self.keep if self.cfg.head_mode == "kv_groups" else self.kv
        heads = kv * (self.group if self.cfg.head_mode == "kv_groups" else self.keep)
        self.config.num_attention_heads = heads
        self.config.num_key_value_heads = kv
        self.config.head_dim = self.head_dim        # hidden_size / heads no longer gives it


# --- layers --------------------------------------------------------------------------------------------

def _layer_scores(model: nn.Module, cfg: StructuredConfig, calib, device, batch_size, progress) -> torch.Tensor:
    layers_name, layers = find_decoder_layers(model)
    if cfg.importance == "random":
        return torch.rand(len(layers), generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.importance == "weight":
        scores = []
        for i, layer in enumerate(layers):
            writers = [m for n, m in layer.named_modules() if n.rpartition(".")[2] in RESIDUAL_WRITERS
                       and isinstance(m, nn.Linear)]
            if not writers:
                raise ConfigError(f"importance 'weight' for layers found none of {'/'.join(RESIDUAL_WRITERS)} in "
                                  f"{layers_name}.{i}; use importance 'activation' or 'random'")
            with onloaded(layer, device):
                scores.append(sum(float(m.weight.detach().float().norm()) for m in writers))
        return torch.tensor(scores)
    # 1 - cos(input, output) per token, summed over the calibration tokens. The engine walks the layers
    # with no target linears (so it never traces or solves), and these forward hooks see each layer's
    # full input and output exactly once per chunk.
    turned = torch.zeros(len(layers), dtype=torch.float64)
    tokens = torch.zeros(len(layers), dtype=torch.float64)

    def observe(module, args, kwargs, output, i):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, (tuple, list)) else output
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)              # (batch, seq)
        turned[i] += float((1 - cos).sum())
        tokens[i] += cos.numel()

    handles = [layer.register_forward_hook(lambda m, a, k, o, i=i: observe(m, a, k, o, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        run_layerwise(model, calib, _NoTargets(), device=device, batch_size=batch_size, progress=progress)
    finally:
        for h in handles:
            h.remove()
    return (turned / tokens.clamp(min=1)).float()


class _NoTargets(LayerMethod):
    """An engine method that targets nothing: the walk alone, for the layer hooks above."""

    name = "structured layers"

    def is_target(self, name: str, module: nn.Module) -> bool:
        return False


def _remove_layers(model: nn.Module, remove: list[int]) -> None:
    """Delete decoder layers and renumber the rest, so their KV-cache slots and the config agree."""
    _, layers = find_decoder_layers(model)
    old = len(layers)
    for i in sorted(remove, reverse=True):
        del layers[i]                                                         # ModuleList renumbers its keys
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):          # self_attn.layer_idx: cache slot
                module.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(layers)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == old:
        gone = set(remove)
        cfg.layer_types = [t for i, t in enumerate(types) if i not in gone]


def _prune_layers(model: nn.Module, cfg: StructuredConfig, calib, device, batch_size,
                  progress) -> dict[str, StructuredRecord]:
    layers_name, layers = find_decoder_layers(model)
    n = len(layers)
    protected = set()
    for i in cfg.protect_layers:
        if not -n <= i < n:
            raise ConfigError(f"protect_layers entry {i} is out of range for {n} decoder layers")
        protected.add(i % n)
    remove = _layers_remove(cfg, n)
    if remove > n - len(protected):
        raise ConfigError(f"removing {remove} of {n} layers is impossible with protect_layers {cfg.protect_layers}; "
                          f"protect fewer layers or remove fewer")
    before = _param_count(layers)
    scores = _layer_scores(model, cfg, calib, device, batch_size, progress)
    ranked = scores.clone()
    ranked[list(protected)] = float("inf")
    kept = keep_top(ranked, n - remove)
    removed = sorted(set(range(n)) - set(kept.tolist()))
    _remove_layers(model, removed)
    log.info("structured layers: removed %s of %d (scores %s)", removed, n,
             ", ".join(f"{s:.4g}" for s in scores.tolist()))
    return {layers_name: StructuredRecord(layers_name, "layer", n, n - remove, removed, scores.tolist(), before,
                                          _param_count(layers))}


# --- the entry ------------------------------------------------------------------------------------------

def prune_structured(model: nn.Module, cfg: StructuredConfig, calib=None, *, device=None,
                     batch_size: int | None = None, progress: bool = True) -> dict[str, StructuredRecord]:
    """Remove ``cfg.target`` units from ``model`` in place and update ``model.config`` so that
    ``save_pretrained`` writes a plain, smaller checkpoint. Importance "activation" walks the decoder
    layers with ``calib`` on ``device`` (default: CUDA when available, else CPU).

    Returns one record per pruned module (what was removed, scores, parameters before/after) and, under
    "model", the whole model's parameter counts.
    """
    prepare_model(model)                 # Conv1D (GPT-2) as linears, MoE experts as per-expert linears
    if cfg.importance == "activation" and calib is None:
        raise ConfigError(f"structured pruning of {cfg.target!r} with importance 'activation' needs calibration "
                          f"data: pass calib=compress.calibration_data(tokenizer, TEXT_FILE, samples=..., "
                          f"seqlen=...) (recipe: a 'calibration' section), or use importance 'weight' or 'random'")
    if getattr(model, "config", None) is None:
        raise ConfigError(f"{type(model).__name__} has no config; structured pruning rewrites a transformers config")
    start = time.perf_counter()
    params_before = _param_count(model)
    device = torch.device(device) if device is not None else default_device()
    if cfg.target == "layers":
        records = _prune_layers(model, cfg, calib, device, batch_size, progress)
    else:
        pruner = StructuredPruner(model, cfg)
        compress_layers(model, pruner, calib if cfg.importance == "activation" else None, device=device,
                        batch_size=batch_size, progress=progress)
        if len(pruner.records) != len(pruner.layers):
            raise RuntimeError(f"structured pruning reached {len(pruner.records)} of {len(pruner.layers)} layers")
        pruner.update_config()
        records = pruner.records
    params_after = _param_count(model)
    records["model"] = StructuredRecord("model", "parameter", params_before, params_after, [], [],
                                        params_before, params_after)
    log.info("%s: %d -> %d parameters (%.1f%% removed) in %.1f s", cfg.method + " " + cfg.describe(),
             params_before, params_after, 100 * (1 - params_after / params_before), time.perf_counter() - start)
    return records


__all__ = ["StructuredConfig", "StructuredRecord", "prune_structured", "keep_top"]


register_method(StructuredConfig, prune_structured, area="prune",
                needs_data=lambda cfg: cfg.importance == "activation", statistics="activation")
