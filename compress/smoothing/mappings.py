"""Which module produces the input of which linears, per model family: the one table smoothing
(SmoothQuant, AWQ) folds its scales through.

A ``Mapping`` says: the input channels of ``consumers`` are the output channels of ``producer``.

- norm mappings: the producer is a RMSNorm/LayerNorm whose output the consumers read directly
  (q/k/v after the input norm; gate/up after the post-attention norm; in parallel-attention families
  one norm feeds q/k/v *and* the MLP's input projections, so they all share one scale). A scale on
  the consumers' columns is divided out of the norm's weight (and bias).
- linear mappings: the producer is a linear whose output rows, after an elementwise step that
  commutes with a per-channel scale, are the consumer's inputs. ``rows(config, producer, consumer)``
  gives, for every input channel of the consumer, the producer row it comes from:
  up_proj -> down_proj (down reads act(gate) * up: scaling up's row j scales down's input j; a
  non-gated MLP, fc1 -> act -> fc2, has no such row because the activation does not commute), and
  v_proj -> o_proj (o reads the attention-weighted values: channel (head h, dim d) is v's row
  (kv head h // (heads / kv_heads), d)). Under GQA several consumer channels share one producer
  row, so their scale must be equal: the methods choose one scale per producer row.

Consumers are *candidates*: a family's entry lists the union of its variants (Cohere's, StableLM's
and Falcon's parallel attention+MLP read the input norm from the MLP too; MoE layers add the router,
each expert's gate/up and shared experts). Which candidates really read a norm's output is found by
tracing one calibration sample (``norm_readers``); a linear that reads it but is not listed makes
the table wrong for that model and is refused. "*" in a name stands for an expert index
(compress.moe's ``LinearExperts``, after ``compress.structure.prepare_model``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..moe import LinearExperts

RowMap = Callable[[object, nn.Module, nn.Module], "torch.Tensor | str"]


@dataclasses.dataclass(frozen=True)
class Mapping:
    """``producer`` -> ``consumers`` (names relative to the decoder layer; "*" = expert index).
    ``rows``: None for a norm producer; for a linear producer, a function giving the producer row of
    every consumer input channel (a LongTensor (consumer in_features,)) or a string saying why the
    layout does not allow a fold."""

    producer: str
    consumers: tuple[str, ...]
    rows: RowMap | None = None

    @property
    def kind(self) -> str:
        return "norm" if self.rows is None else "linear"


@dataclasses.dataclass
class LayerMapping:
    """One mapping resolved in one decoder layer: concrete module names (relative to the layer)."""

    producer: str
    consumers: list[str]
    rows: torch.Tensor | None          # (consumer in_features,) producer row per channel; None: norm

    @property
    def kind(self) -> str:
        return "norm" if self.rows is None else "linear"

    @property
    def label(self) -> str:
        leaves = list(dict.fromkeys(re.sub(r"experts\.\d+\.", "experts.*.", c) for c in self.consumers))
        return f"{self.producer} -> {', '.join(leaves)}"


# --- consumer channel -> producer row ---------------------------------------------------------
def _heads(config) -> int:
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))


def up_rows(block: int = 0) -> RowMap:
    """up -> down: down's input j is the up projection's row ``block * width + j`` (Phi-3's fused
    gate_up_proj holds the gate rows first, so its up rows are block 1)."""
    def rows(config, producer, consumer):
        width = consumer.in_features
        return block * width + torch.arange(width)
    return rows


def v_rows(layout: str) -> RowMap:
    """v -> o for the attention layouts: "separate" (v_proj: kv_heads x head_dim rows), "phi3"
    (qkv_proj: q rows, k rows, then v rows), "gpt2" (c_attn: q, k, v blocks of hidden rows, MHA),
    "neox" (query_key_value: per head [q, k, v], MHA), "falcon" (query_key_value of the new
    decoder architecture: per kv head [q_1..q_g, k, v])."""
    def rows(config, producer, consumer):
        heads = _heads(config)
        hd = consumer.in_features // heads
        h = torch.arange(heads).repeat_interleave(hd)              # (heads * hd,) query head per channel
        d = torch.arange(hd).repeat(heads)                         # (heads * hd,) dim within the head
        if layout in ("gpt2", "neox"):
            kv = heads
        elif layout == "separate":
            kv = producer.out_features // hd
        else:                                                       # phi3, falcon: q + k + v rows
            kv = (producer.out_features // hd - heads) // 2
        if layout == "falcon" and not getattr(config, "new_decoder_architecture", False):
            return "Falcon's original (multi-query) query_key_value layout is not folded; o stays as it is"
        if kv <= 0 or heads % kv:
            return f"{heads} heads do not split evenly over {kv} kv heads"
        g = h // (heads // kv)                                      # kv head of each channel
        if layout == "separate":
            return g * hd + d
        if layout == "phi3":
            return (heads + kv) * hd + g * hd + d
        if layout == "gpt2":
            return 2 * heads * hd + g * hd + d
        if layout == "neox":
            return g * 3 * hd + 2 * hd + d
        per = heads // kv + 2                                       # falcon: q_1..q_g, k, v per kv head
        return g * per * hd + (per - 1) * hd + d
    return rows


def _norm(producer: str, *consumers: str) -> Mapping:
    return Mapping(producer, consumers)


# --- the table --------------------------------------------------------------------------------
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# What a post-attention norm feeds in dense and MoE layers: the MLP, or the router (its columns are
# scaled so routing is unchanged; it stays dense), every expert's gate/up and the shared experts.
MLP_IN = GATE_UP + ("mlp.gate", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.w1",
                    "mlp.experts.*.w3", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                    "mlp.shared_expert_gate", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
UP_DOWN = (Mapping("mlp.up_proj", ("mlp.down_proj",), up_rows()),
           Mapping("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), up_rows()),
           Mapping("mlp.experts.*.w3", ("mlp.experts.*.w2",), up_rows()),
           Mapping("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), up_rows()),
           Mapping("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",), up_rows()))
V_O = Mapping("self_attn.v_proj", ("self_attn.o_proj",), v_rows("separate"))
# Llama-style pre-norm decoders; the input norm's candidates include the MLP for the parallel
# variants (Cohere; StableLM with use_parallel_residual).
LLAMA = (_norm("input_layernorm", *QKV, *GATE_UP), V_O, _norm("post_attention_layernorm", *MLP_IN), *UP_DOWN)
GEMMA = (_norm("input_layernorm", *QKV), V_O, _norm("pre_feedforward_layernorm", *GATE_UP), *UP_DOWN)
NON_GATED = "non-gated MLP (up -> activation -> down): a scale on the down projection's inputs cannot pass the activation"


@dataclasses.dataclass(frozen=True)
class Family:
    mappings: tuple[Mapping, ...]
    not_folded: str = ""        # what the family's layout does not allow, for logs and docs


FAMILIES: dict[str, Family] = {
    **{t: Family(LLAMA) for t in ("llama", "mistral", "qwen2", "qwen3", "cohere", "cohere2", "stablelm", "olmo",
                                  "granite", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "phimoe")},
    **{t: Family(GEMMA) for t in ("gemma2", "gemma3_text")},
    "gemma": Family(LLAMA),
    "phi3": Family((_norm("input_layernorm", "self_attn.qkv_proj"),
                    Mapping("self_attn.qkv_proj", ("self_attn.o_proj",), v_rows("phi3")),
                    _norm("post_attention_layernorm", "mlp.gate_up_proj"),
                    Mapping("mlp.gate_up_proj", ("mlp.down_proj",), up_rows(block=1)))),
    "olmo2": Family((V_O, *UP_DOWN), "post-norm: OLMo2 normalizes the outputs of attention and the MLP, so no "
                                      "norm precedes q/k/v or gate/up (only v -> o and up -> down are folded)"),
    "opt": Family((_norm("self_attn_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   Mapping("self_attn.v_proj", ("self_attn.out_proj",), v_rows("separate")),
                   _norm("final_layer_norm", "fc1")), NON_GATED + " (fc1 -> fc2)"),
    "gpt2": Family((_norm("ln_1", "attn.c_attn"), Mapping("attn.c_attn", ("attn.c_proj",), v_rows("gpt2")),
                    _norm("ln_2", "mlp.c_fc")), NON_GATED + " (c_fc -> c_proj)"),
    "gpt_neox": Family((_norm("input_layernorm", "attention.query_key_value", "mlp.dense_h_to_4h"),
                        Mapping("attention.query_key_value", ("attention.dense",), v_rows("neox")),
                        _norm("post_attention_layernorm", "mlp.dense_h_to_4h")), NON_GATED),
    "falcon": Family((_norm("ln_attn", "self_attention.query_key_value"), _norm("ln_mlp", "mlp.dense_h_to_4h"),
                      _norm("input_layernorm", "self_attention.query_key_value", "mlp.dense_h_to_4h"),
                      _norm("post_attention_layernorm", "mlp.dense_h_to_4h"),
                      Mapping("self_attention.query_key_value", ("self_attention.dense",), v_rows("falcon"))),
                     NON_GATED),
    "deepseek_v3": Family((_norm("input_layernorm", "self_attn.q_a_proj", "self_attn.q_proj",
                                 "self_attn.kv_a_proj_with_mqa"),
                           _norm("self_attn.q_a_layernorm", "self_attn.q_b_proj"),
                           _norm("self_attn.kv_a_layernorm", "self_attn.kv_b_proj"),
                           _norm("post_attention_layernorm", *MLP_IN), *UP_DOWN),
                          "multi-head latent attention: o_proj reads heads expanded from the latent by kv_b_proj, "
                          "whose rows are not folded"),
}


def family_of(model: nn.Module, method: str) -> tuple[str, Family]:
    """The model's entry in FAMILIES; ConfigError naming the model type and what is missing."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"{method} does not know model type {model_type!r} ({type(model).__name__}): no entry in "
                          f"compress.smoothing.mappings.FAMILIES says which norm or linear produces the inputs of "
                          f"which linears; known: {', '.join(sorted(FAMILIES))}. Add the family's mappings there "
                          f"(and a case to tests/smoothing/test_fold.py)")
    return model_type, FAMILIES[model_type]


def _expand(pattern: str, names: dict[str, nn.Module]) -> list[str]:
    if "*" not in pattern:
        return [pattern] if pattern in names else []
    regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    found = [(int(m.group(1)), n) for n in names if (m := regex.match(n))]
    return [n for _, n in sorted(found)]


def resolve(layer: nn.Module, family: Family, config) -> tuple[list[LayerMapping], list[tuple[str, str]]]:
    """The mappings of ``family`` present in ``layer``: (resolved, [(label, why not folded)]). A
    mapping whose producer or consumers are absent belongs to another variant and is dropped."""
    names = dict(layer.named_modules())
    out: list[LayerMapping] = []
    skipped: list[tuple[str, str]] = []
    for mapping in family.mappings:
        if "*" in mapping.producer:             # one mapping per expert
            pairs = [(p, [c.replace("*", p.split(".")[-2]) for c in mapping.consumers])
                     for p in _expand(mapping.producer, names)]
        else:
            pairs = [(mapping.producer, [n for c in mapping.consumers for n in _expand(c, names)])]
        for producer, consumers in pairs:
            consumers = [c for c in consumers if c in names]
            if producer not in names or not consumers:
                continue
            found = LayerMapping(producer, consumers, None)
            weight = getattr(names[producer], "weight", None)
            if mapping.rows is None:
                if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
                    skipped.append((found.label, f"{type(names[producer]).__name__} has no per-channel weight "
                                                 f"to fold a scale into"))
                    continue
            else:
                rows = mapping.rows(config, names[producer], names[consumers[0]])
                if isinstance(rows, str):
                    skipped.append((found.label, rows))
                    continue
                out_features = names[producer].weight.shape[0]
                if len(rows) != names[consumers[0]].weight.shape[1] or int(rows.max()) >= out_features:
                    raise ConfigError(f"{getattr(config, 'model_type', None)}: the rows the table gives for "
                                      f"{found.label} do not fit {producer} ({out_features} outputs) and "
                                      f"{consumers[0]} ({names[consumers[0]].weight.shape[1]} inputs); fix the "
                                      f"family's entry in compress.smoothing.mappings.FAMILIES")
                found.rows = rows
            out.append(found)
    return out, skipped


def expert_block(name: str, names: dict[str, nn.Module]) -> str | None:
    """The LinearExperts block above module ``name`` (relative names), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if isinstance(names.get(".".join(parts[:i])), LinearExperts):
            return ".".join(parts[:i])
    return None


def norm_readers(layer: nn.Module, norms: list[str], run: Callable[[], object]) -> dict[str, set[str]]:
    """Which weight modules (linears, routers) and expert blocks of ``layer`` read the output of each
    norm in ``norms``, found by running ``run()`` (one sample through the layer) with hooks: a module
    reads it when its input shares the norm output's storage (a view of it, as a router's
    ``view(-1, hidden)``). The outputs are held until the end, so no storage is reused meanwhile."""
    names = dict(layer.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    inputs: list[tuple[str, torch.Tensor]] = []

    def readers_hook(module, args, kwargs, name):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor):
            inputs.append((name, x))

    watched = {n: m for n, m in names.items() if n and (isinstance(m, LinearExperts) or (
        isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
        and expert_block(n, names) is None))}
    handles = [names[n].register_forward_hook(lambda m, a, out, n=n: outputs.setdefault(n, out)) for n in norms]
    handles += [m.register_forward_pre_hook(lambda m, a, k, n=n: readers_hook(m, a, k, n), with_kwargs=True)
                for n, m in watched.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    storage = {n: out.untyped_storage().data_ptr() for n, out in outputs.items() if isinstance(out, torch.Tensor)}
    found: dict[str, set[str]] = {n: set() for n in norms}
    for name, x in inputs:
        for norm, ptr in storage.items():
            if x.untyped_storage().data_ptr() == ptr:
                found[norm].add(name)
    return found


def choose_consumers(mapping: LayerMapping, readers: set[str], layer: nn.Module, model_type: str,
                     where: str) -> list[str]:
    """The candidate consumers that really read the norm's output (an expert's linears count when
    its expert block does); ConfigError when a weight module reads it that the table does not list
    (folding would silently change that module's output)."""
    names = dict(layer.named_modules())
    chosen = [c for c in mapping.consumers if c in readers or expert_block(c, names) in readers]
    covered = set(chosen) | {expert_block(c, names) for c in chosen}
    unlisted = sorted(readers - covered)
    if unlisted:
        raise ConfigError(f"{model_type}: {where}{mapping.producer} also feeds {', '.join(unlisted)}, which "
                          f"compress.smoothing.mappings.FAMILIES[{model_type!r}] does not list among its consumers; "
                          f"folding a scale into the norm would change that module's output. Add it to the "
                          f"family's mapping (or use a quantization pass without smoothing)")
    return chosen


__all__ = ["Mapping", "LayerMapping", "Family", "FAMILIES", "family_of", "resolve", "norm_readers",
           "choose_consumers", "expert_block", "up_rows", "v_rows"]
