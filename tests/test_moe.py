"""Mixture-of-experts models: experts seen as per-expert linears, compressed whole, exported in the
per-expert layout the families' checkpoints use, reloaded by us and by transformers."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress.checkpoint.inspect import inspect_checkpoint
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from compress.errors import ModelLoadError
from compress.moe import LinearExperts, token_summary, unfuse_experts
from compress.pruning.config import WandaConfig
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.linear import QuantLinear
from compress.stats import HessianStats

VOCAB = 384
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
# model_type -> config fields of a tiny model with 8 experts, 2 per token
FAMILIES = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=64, pad_token_id=0, eos_token_id=1),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1,
                        n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None),
}
# (checkpoint name of layer 1's expert 3 gate projection, of its router)
NAMES = {"qwen3_moe": ("model.layers.1.mlp.experts.3.gate_proj", "model.layers.1.mlp.gate"),
         "mixtral": ("model.layers.1.block_sparse_moe.experts.3.w1", "model.layers.1.block_sparse_moe.gate")}


def tiny_moe(model_type: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**BASE, **FAMILIES[model_type], **kw})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():                    # transformers leaves 3D expert tensors uninitialised here
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def calib(samples: int = 16, seqlen: int = 32, seed: int = 1) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    return CalibrationData(torch.randint(0, VOCAB, (samples, seqlen), generator=g), "ids", seed)


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def n_experts(model) -> int:
    return sum(m.num_experts for m in model.modules() if isinstance(m, LinearExperts))


def test_linear_experts_compute_what_the_3d_experts_compute(family):
    model = tiny_moe(family)
    with torch.no_grad():
        ref = model(IDS).logits
        assert unfuse_experts(model) > 0 and unfuse_experts(model) == 0          # idempotent
        out = model(IDS).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        block = next(m for m in model.modules() if isinstance(m, LinearExperts))
        for expert in block:                                 # negative control: the experts are what runs
            next(iter(expert.parameters())).mul_(3)
        assert (model(IDS).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("model_type,extra", [
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     layer_types=["sliding_attention", "full_attention"])),
    ("llama4_text", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128, head_dim=16)),
])
def test_families_whose_experts_cannot_be_linears_are_refused_before_any_work(model_type, extra):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **extra})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelLoadError, match=f"model type '{model_type}'.*nothing was changed"):
        compress.quantize(model, RTNConfig(bits=4, group_size=32))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_rtn_quantizes_every_expert_and_leaves_the_routers_dense(family, caplog):
    model = tiny_moe(family)
    with caplog.at_level(logging.WARNING, logger="compress"):
        records = compress.quantize(model, RTNConfig(bits=4, group_size=32), progress=False)
    packed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = {n for n in packed if ".experts." in n}
    assert len(experts) == 3 * n_experts(model) and experts <= set(records)
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in packed)
    assert "were not quantized" not in caplog.text       # nothing shaped like a target was skipped


def _expert_inputs(model, layer: int) -> dict[int, torch.Tensor]:
    """Inputs of each expert of decoder layer ``layer`` over the calibration ids (float model)."""
    block = next(m for n, m in model.named_modules() if isinstance(m, LinearExperts) and f"layers.{layer}." in n)
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [expert.register_forward_pre_hook(lambda m, a, e=e: seen.setdefault(e, []).append(a[0]))
             for e, expert in enumerate(block)]
    with torch.no_grad():
        model(calib().input_ids)
    for h in hooks:
        h.remove()
    return {e: torch.cat(xs) for e, xs in seen.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gptq_beats_rtn_per_expert_on_its_routed_tokens(family):
    """Attention stays dense, so layer 0's experts see exactly the float model's routed tokens."""
    model = tiny_moe(family)
    unfuse_experts(model)
    inputs = _expert_inputs(model, 0)
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    ignore = ["lm_head", "re:self_attn"]
    compress.quantize(rtn, RTNConfig(bits=3, group_size=32, ignore=ignore), progress=False)
    records = compress.quantize(gptq, GPTQConfig(bits=3, group_size=32, ignore=ignore, min_expert_tokens=32),
                                calib(), progress=False)
    block = lambda m: next(x for n, x in m.named_modules() if isinstance(x, LinearExperts) and "layers.0." in n)
    solved = fell_back = 0
    for e, (w, r, g) in enumerate(zip(block(model), block(rtn), block(gptq))):
        x = inputs.get(e, torch.zeros(0, 64))
        lin = w.names[0]                                     # the gate projection reads the routed tokens
        name = f"model.layers.0.mlp.experts.{e}.{lin}"
        assert records[name].tokens == x.shape[0]            # its statistics saw exactly the routed tokens
        err = lambda q: float(((getattr(q, lin).dequantize() - getattr(w, lin).weight.detach()) @ x.T).square().sum())
        if x.shape[0] >= 32:
            assert err(g) < err(r), f"expert {e}"
            solved += 1
        else:                                                # too few tokens: round to nearest, said so
            assert "round-to-nearest" in records[name].fallback
            assert torch.equal(getattr(g, lin).dequantize(), getattr(r, lin).dequantize())
            fell_back += 1
    assert solved >= 4
    summary = records.summary["experts"]
    assert summary["experts"] == 2 * 8 and summary["rtn_fallback"] >= fell_back
    assert summary["min"] <= summary["median"] <= summary["max"]


def test_routing_all_tokens_lets_every_expert_observe_every_token():
    data = calib(samples=4)
    model = tiny_moe("qwen3_moe")
    records = compress.quantize(model, GPTQConfig(bits=4, group_size=32, route_all_experts=True), data,
                                progress=False)
    tokens = data.samples * data.seqlen
    expert_records = [r for n, r in records.items() if ".experts." in n]
    assert expert_records and all(r.tokens == tokens and r.fallback is None for r in expert_records)
    # the routed counts are still reported, and are the real routing's (k = 2 per token)
    summary = records.summary["experts"]
    assert summary["max"] < tokens and summary["rtn_fallback"] == 0
    # the layer output used the real routing: the result differs from plain GPTQ only through the Hessians
    plain = tiny_moe("qwen3_moe")
    compress.quantize(plain, GPTQConfig(bits=4, group_size=32, min_expert_tokens=0), data, progress=False)
    with torch.no_grad():
        a, b, ref = model(IDS).logits, plain(IDS).logits, tiny_moe("qwen3_moe")(IDS).logits
    assert not torch.equal(a, b)
    assert (a - ref).abs().mean() < 3 * (b - ref).abs().mean()


def test_only_one_expert_hessian_is_alive_at_a_time(monkeypatch):
    """Experts are solved as their statistics complete, one group at a time: no layer-wide set of
    float Hessians is materialised."""
    alive, peak = [0], [0]

    class Counted(HessianStats):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def __del__(self):
            alive[0] -= 1

    monkeypatch.setattr("compress.quant.apply.HessianStats", Counted)
    model = tiny_moe("qwen3_moe")
    compress.quantize(model, GPTQConfig(bits=4, group_size=32, min_expert_tokens=0), calib(samples=4),
                      progress=False)
    assert peak[0] <= 2


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_export_uses_the_family_checkpoint_names_and_reloads_in_compress_and_transformers(family, tmp_path):
    model = tiny_moe(family)
    compress.quantize(model, GPTQConfig(bits=4, group_size=32), calib(), progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    out = compress.export(model, None, tmp_path / "q")
    expert, router = NAMES[family]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{expert}.weight_packed" in keys and f"{router}.weight" in keys
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert router in qc["ignore"]
    ours = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref)
        theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        torch.testing.assert_close(theirs(IDS).logits, ref, atol=1e-5, rtol=1e-5)


def test_inspect_counts_all_but_embeddings_routers_and_head_as_quantized(tmp_path):
    model = tiny_moe("qwen3_moe", num_experts=32, vocab_size=128)
    compress.quantize(model, RTNConfig(bits=4, group_size=32), progress=False)
    info = inspect_checkpoint(compress.export(model, None, tmp_path / "q"))
    dense = sum(p.numel() for n, p in model.named_parameters()
                if "embed_tokens" in n or "lm_head" in n or n.endswith("mlp.gate.weight") or p.dim() == 1)
    assert info["quantized_parameters"] == info["parameters"] - dense
    assert info["quantized_parameters"] / info["parameters"] >= 0.95


def test_wanda_prunes_every_expert_2_of_4():
    model = tiny_moe("mixtral")
    records = compress.prune(model, WandaConfig(pattern="2:4", min_expert_tokens=16), calib(), progress=False)
    experts = [n for n in records if ".experts." in n]
    assert len(experts) == 3 * n_experts(model)
    for name in experts:
        w = model.get_submodule(name).weight.reshape(-1, 4)
        assert torch.all((w == 0).sum(-1) >= 2), name
    assert records.summary["experts"]["experts"] == 16


def test_a_weight_no_pass_can_reach_is_warned_about_with_its_share(caplog):
    from conftest import tiny_model
    model = tiny_model("llama")
    model.model.layers[0].mlp.register_parameter("extra", torch.nn.Parameter(torch.randn(64, 64)))
    with caplog.at_level(logging.WARNING, logger="compress"):
        compress.quantize(model, RTNConfig(bits=4, group_size=32), progress=False)
    assert "model.layers.0.mlp.extra" in caplog.text
    assert "were not quantized although no ignore pattern" in caplog.text
    total = sum(p.numel() for p in model.parameters())
    assert f"{100 * 64 * 64 / total:.1f}%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress"):           # left dense on purpose: no warning
        compress.prune(tiny_model("llama"), compress.MagnitudeConfig(sparsity=0.5, layer_sparsity={"q_proj": 0}),
                       progress=False)
    assert "were not pruned" not in caplog.text


def test_token_summary():
    counts = {"m.layers.0.mlp.experts.0": 5, "m.layers.0.mlp.experts.1": 0, "m.layers.0.mlp.experts.2": 9}
    assert token_summary(counts) == {"experts": 3, "min": 0, "median": 5.0, "max": 9, "zero": 1}
    assert token_summary({"m.layers.0.mlp.up_proj": 5}) is None


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_expert_pruning_drops_the_least_routed_experts_and_transformers_loads_the_smaller_model(family, tmp_path):
    from compress.pruning.experts import ExpertPruneConfig
    model = tiny_moe(family)
    data = calib()
    records = compress.prune(model, ExpertPruneConfig(keep=6), data, progress=False)
    assert records and all(len(r.kept) == 6 and len(r.dropped) == 2 for r in records.values())
    for r in records.values():              # the dropped experts are the lowest-scoring ones
        assert max(r.scores[e] for e in r.dropped) <= min(r.scores[e] for e in r.kept)
    assert n_experts(model) == 6 * len(records)
    with torch.no_grad():
        ref = model(IDS).logits
    out = compress.export(model, None, tmp_path / "pruned")
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert sum(p.numel() for p in theirs.parameters()) < sum(p.numel() for p in tiny_moe(family).parameters())
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ref, atol=1e-5, rtol=1e-5)


def test_expert_pruning_by_routing_weight_beats_dropping_the_most_used_experts():
    """Negative control: dropping the experts the router uses most costs more than dropping the least used."""
    from compress.pruning.experts import ExpertPruneConfig, _keep_experts
    data = calib(samples=16)
    ref_model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        ref = ref_model(data.input_ids).logits.log_softmax(-1)
    good = tiny_moe("qwen3_moe")
    records = compress.prune(good, ExpertPruneConfig(keep=4), data, progress=False)
    bad = tiny_moe("qwen3_moe")
    unfuse_experts(bad)
    for name, r in records.items():
        worst = sorted(sorted(range(8), key=lambda e: r.scores[e])[:4])
        _keep_experts(bad, name, bad.get_submodule(name), worst)
    bad.config.num_experts = 4
    kl = lambda m: float(torch.nn.functional.kl_div(m(data.input_ids).logits.log_softmax(-1), ref, log_target=True,
                                                    reduction="batchmean"))
    with torch.no_grad():
        assert kl(good) < kl(bad)


def test_expert_pruning_refuses_dense_models_and_too_few_experts():
    from conftest import tiny_model
    from compress.errors import ConfigError
    from compress.pruning.experts import ExpertPruneConfig
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        compress.prune(tiny_model("llama"), ExpertPruneConfig(keep=2), calib(), progress=False)
    with pytest.raises(ConfigError, match="keep at least num_experts_per_tok=2"):
        compress.prune(tiny_moe("qwen3_moe"), ExpertPruneConfig(keep=1), calib(), progress=False)
    with pytest.raises(ConfigError, match="fraction must be in"):
        ExpertPruneConfig(fraction=1.5)


def test_chunked_calibration_observes_an_expert_block_in_waves_and_matches_one_pass():
    """Several chunks: the experts of a block are observed together (a few passes per layer, not two per
    expert), and the result equals the one-pass path's up to float summation order."""
    data = calib(samples=8)
    one, chunked = tiny_moe("qwen3_moe"), tiny_moe("qwen3_moe")
    cfg = GPTQConfig(bits=4, group_size=32, min_expert_tokens=0)
    compress.quantize(one, cfg, data, progress=False)
    unfuse_experts(chunked)
    block = chunked.model.layers[0].mlp.experts
    calls = [0]
    block.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    compress.quantize(chunked, cfg, data, batch_size=2, progress=False)          # 4 chunks
    assert calls[0] < 8 * 4                                   # not one pass per expert group and chunk
    with torch.no_grad():
        a, b = one(IDS).logits, chunked(IDS).logits
        ref = tiny_moe("qwen3_moe")(IDS).logits
    assert (a - b).abs().max() < 0.05 * (a - ref).abs().max()


def test_experts_calibration_never_reaches_are_rounded_to_nearest_and_summed_not_warned_one_by_one(caplog):
    model = tiny_moe("qwen3_moe", num_experts=16)
    with caplog.at_level(logging.WARNING, logger="compress"):
        records = compress.quantize(model, GPTQConfig(bits=4, group_size=32), calib(samples=1, seqlen=4),
                                    progress=False)
    unreached = [r for n, r in records.items() if ".experts." in n and r.tokens == 0]
    assert unreached and all("observed 0 calibration tokens" in r.fallback for r in unreached)
    assert "received no calibration input" not in caplog.text
    assert records.summary["experts"]["zero"] > 0
