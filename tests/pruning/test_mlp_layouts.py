"""Structured MLP-channel pruning across MLP layouts: Phi-3's fused gate_up_proj, GPT-NeoX (parallel and
sequential residual) and Falcon's non-gated dense_h_to_4h/dense_4h_to_h with their own config fields.
The pruned model is the original with the removed channels zeroed, activation importance beats the
weight-norm and random rankings, the export reloads in vanilla transformers, and mixture-of-experts and
unsupported MLPs are refused before any work."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM,
                          GPTJConfig, GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

import compress
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.modeling import find_decoder_layers
from compress.pruning import structured
from compress.pruning.mlp_layouts import MLP_LAYOUTS, MLPLayout, find_mlp, mlp_weight_scores
from compress.pruning.structured import StructuredConfig, prune_structured
from compress.structure import prepare_model
from conftest import VOCAB

HIDDEN, WIDTH, LAYERS = 64, 160, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

# family: (build, config field of the width, parameters one channel holds: weights of the rows and the
# column, plus the up projection's bias entry)
FAMILIES = {
    "phi3": (lambda: Phi3ForCausalLM(Phi3Config(**COMMON, intermediate_size=WIDTH, num_key_value_heads=2,
                                                pad_token_id=0)),
             "intermediate_size", 3 * HIDDEN),                             # gate row + up row + down column
    "gpt_neox-parallel": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON, intermediate_size=WIDTH,
                                                                   use_parallel_residual=True)),
                          "intermediate_size", 2 * HIDDEN + 1),
    "gpt_neox-sequential": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON, intermediate_size=WIDTH,
                                                                     use_parallel_residual=False)),
                            "intermediate_size", 2 * HIDDEN + 1),
    "falcon": (lambda: FalconForCausalLM(FalconConfig(**COMMON, ffn_hidden_size=WIDTH)),
               "ffn_hidden_size", 2 * HIDDEN),                              # Falcon's default: no biases
}
CFG = dict(target="mlp", ratio=0.25, multiple_of=8)                         # 160 -> 120 channels


def build(family: str, seed: int = 0):
    """A tiny random model whose linear biases are random too (transformers initializes them to zero, which
    would hide a bias sliced wrongly)."""
    torch.manual_seed(seed)
    model = FAMILIES[family][0]().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
    return model


def prune(model, calib_ids=None, **kw):
    calib = None if calib_ids is None else CalibrationData(calib_ids, "ids", 0)
    return prune_structured(model, StructuredConfig(**{**CFG, **kw}), calib, device="cpu", progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def mse(a, b) -> float:
    return float((a - b).pow(2).mean())


def mlps(model):
    """(decoder layer, its MLP layout) for every layer."""
    _, layers = find_decoder_layers(model)
    return [(layer, find_mlp(layer, model.config, f"layer {i}")) for i, layer in enumerate(layers)]


def test_fused_rows_are_the_channel_in_every_block():
    fused = next(layout for layout in MLP_LAYOUTS if layout.blocks == 2)
    assert fused.ups == ("mlp.gate_up_proj",) and fused.width_field == "intermediate_size"
    assert fused.rows(torch.tensor([0, 2, 3]), 5).tolist() == [0, 2, 3, 5, 7, 8]      # gate rows, then up rows
    assert MLPLayout("x", "fc2", ("fc1",), "w").rows(torch.tensor([1, 4]), 5).tolist() == [1, 4]


def test_weight_scores_read_both_halves_of_a_fused_gate_up():
    model = build("phi3")
    layer, layout = mlps(model)[0]
    gate, up = layer.mlp.gate_up_proj.weight.detach().chunk(2, dim=0)                 # (WIDTH, HIDDEN) each
    expected = layer.mlp.down_proj.weight.detach().norm(dim=0) * gate.norm(dim=1) * up.norm(dim=1)
    torch.testing.assert_close(mlp_weight_scores(layer, layout), expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_channels_go_and_the_export_reloads_in_transformers(family, calib_ids, tmp_path):
    _, field, per_channel = FAMILIES[family]
    model = build(family)
    records = prune(model, calib_ids)
    layer_records = [r for name, r in records.items() if name != "model"]
    assert len(layer_records) == LAYERS
    for record in layer_records:
        assert (record.unit, record.total, record.kept, len(record.removed)) == ("channel", WIDTH, 120, 40)
    assert getattr(model.config, field) == 120
    before, after = records["model"].params_before, records["model"].params_after
    assert before - after == LAYERS * 40 * per_channel == sum(r.params_before - r.params_after for r in layer_records)
    assert after == sum(p.numel() for p in model.parameters())
    fresh = type(model)(model.config)                # the shapes are those the rewritten config builds
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}

    path = compress.export(model, None, tmp_path / "ck")
    reloaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert getattr(reloaded.config, field) == 120
    assert torch.equal(logits(reloaded.eval(), calib_ids), logits(model, calib_ids))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_model_is_the_original_with_those_channels_zeroed(family, calib_ids):
    """Zeroing the removed channels' down-projection columns in the original gives the pruned model's
    logits: the right rows of every input projection (both halves of Phi-3's gate_up, GPT-NeoX's
    biases) went with each column. Negative control: the pruned model differs from the original."""
    model = build(family)
    records = prune(model, calib_ids)
    pruned = logits(model, calib_ids)
    original = build(family)
    dense = logits(original, calib_ids)
    with torch.no_grad():
        for i, (layer, layout) in enumerate(mlps(original)):
            (removed,) = [r.removed for name, r in records.items() if name.endswith(f".{i}.{layout.block}")]
            layer.get_submodule(layout.down).weight[:, removed] = 0
    torch.testing.assert_close(logits(original, calib_ids), pruned, rtol=1e-5, atol=1e-6)
    assert mse(pruned, dense) > 1e-4 * mse(dense, torch.zeros_like(dense))


DEAD = slice(0, HIDDEN // 2)         # hidden dims the rigged norm nearly silences
LIVE = slice(HIDDEN // 2, HIDDEN)
DEAD_SCALE = 0.005


@torch.no_grad()
def rig(model):
    """Decoy channels (every 4th): every row that computes them (both halves of a fused gate_up) is 4x
    heavier but reads only the silenced dims of the norm in front of the MLP, so they look important by
    weight and contribute almost nothing."""
    decoys = torch.arange(0, WIDTH, 4)
    for layer, layout in mlps(model):
        norm = getattr(layer, "post_attention_layernorm", None) or layer.input_layernorm   # Falcon: parallel
        norm.weight[DEAD] = DEAD_SCALE
        if getattr(norm, "bias", None) is not None:
            norm.bias[DEAD] = 0
        rows = layout.rows(decoys, WIDTH)
        for name in layout.ups:
            up = layer.get_submodule(name)
            up.weight[rows, LIVE] = 0
            up.weight[rows] *= 4
            if up.bias is not None:
                up.bias[rows] = 0
    return decoys


def _bottom(scores, k):               # the negative control: keep the LEAST important units
    return torch.sort(torch.sort(scores, stable=True).indices[:k]).values


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_importance_beats_weight_and_random(family, calib_ids, monkeypatch):
    reference_model = build(family)
    rig(reference_model)
    reference = logits(reference_model, calib_ids)
    errors, removed = {}, {}
    for name, extra in [("activation", {}), ("weight", {}), *[(f"random{s}", {"seed": s}) for s in range(3)]]:
        model = build(family)
        decoys = rig(model)
        records = prune(model, calib_ids, importance=name.rstrip("0123456789"), **extra)
        errors[name] = mse(logits(model, calib_ids), reference)
        removed[name] = next(r for k, r in records.items() if k != "model").removed
    assert removed["activation"] == decoys.tolist()                  # data sees through the decoys ...
    assert removed["weight"] != decoys.tolist()                      # ... the weights do not
    randoms = [errors[f"random{s}"] for s in range(3)]
    assert errors["activation"] < 0.1 * min(errors["weight"], *randoms), errors
    monkeypatch.setattr(structured, "keep_top", _bottom)
    model = build(family)
    rig(model)
    prune(model, calib_ids)
    worst = mse(logits(model, calib_ids), reference)
    assert worst > 10 * errors["activation"] and worst >= max(randoms), (worst, errors)


# --- refusals: before any work, saying what to do ------------------------------------------------------------

MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)
REFUSED = {
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(**COMMON, **MOE, intermediate_size=32, num_local_experts=4)),
                r"mixture-of-experts model mixtral \(model\.layers\.0\.mlp\.experts\) yet: .*config\.intermediate_size"),
    "qwen3_moe": (lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, **MOE, moe_intermediate_size=32,
                                                             num_experts=4)),
                  r"mixture-of-experts model qwen3_moe .*config\.moe_intermediate_size"),
    "qwen2_moe": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, **MOE, moe_intermediate_size=32,
                                                             shared_expert_intermediate_size=64, num_experts=4)),
                  r"mixture-of-experts model qwen2_moe .*config\.moe_intermediate_size"),
    "bloom": (lambda: BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4)),
              r"the config of bloom does not state the MLP width \(transformer\.h\.0\.mlp\.dense_4h_to_h has 256 "
              r"channels, config\.ffn_hidden_size is None.*prune 'layers' instead"),
    "gptj": (lambda: GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=8,
                                                n_positions=128, bos_token_id=1, eos_token_id=2)),
             r"no supported MLP in transformer\.h\.0 \(GPTJBlock\); looked for transformer\.h\.0\.mlp\.down_proj "
             r"with mlp\.gate_proj \+ mlp\.up_proj, .*transformer\.h\.0\.mlp\.dense_4h_to_h with mlp\.dense_h_to_4h, "
             r"transformer\.h\.0\.mlp\.c_proj"),
}


@pytest.mark.parametrize("arch", list(REFUSED))
def test_unsupported_mlps_are_refused_before_any_work(arch):
    build_model, message = REFUSED[arch]
    torch.manual_seed(0)
    model = prepare_model(build_model().eval())        # the normal form every pass starts from (MoE experts as linears)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message) as err:
        prune(model, None, importance="weight")
    if "moe" in message or arch == "mixtral":
        assert "prune experts (expert pruning) or the shared/dense MLPs instead" in str(err.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_moe_model_can_still_lose_heads(calib_ids):
    """The MoE refusal points to target 'heads': it works on a Qwen3-MoE (experts untouched)."""
    torch.manual_seed(0)
    model = REFUSED["qwen3_moe"][0]().eval()
    experts = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    prune(model, None, target="heads", ratio=0.5, importance="weight")
    assert model.config.num_key_value_heads == 1
    assert all(torch.equal(v, experts[k]) for k, v in model.state_dict().items() if k in experts)
    assert torch.isfinite(logits(model, calib_ids[:2])).all()
