"""Structured pruning on tiny Llama (GQA), Qwen2 (q/k/v biases) and OPT (fc1/fc2) models: the result is
a smaller plain checkpoint that vanilla transformers loads and decodes with its KV cache, activation
importance beats the weight-norm and random baselines, and bad requests fail before any work."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import compress
from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.pruning import structured
from compress.pruning.structured import StructuredConfig, prune_structured
from conftest import VOCAB

HIDDEN, WIDTH = 64, 160


def build(arch: str, *, layers: int = 2, heads: int = 4, kv: int = 2, seed: int = 0):
    """A tiny random model; unlike conftest's builders, the layer and head counts can be chosen."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=128)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, intermediate_size=WIDTH, num_key_value_heads=kv,
                                            tie_word_embeddings=False)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, intermediate_size=WIDTH, num_key_value_heads=kv)).eval()
    return OPTForCausalLM(OPTConfig(**common, ffn_dim=WIDTH, word_embed_proj_dim=HIDDEN)).eval()


def prune(model, calib_ids=None, **kw):
    calib = None if calib_ids is None else CalibrationData(calib_ids, "ids", 0)
    return prune_structured(model, StructuredConfig(**kw), calib, device="cpu", progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def mse(a, b) -> float:
    return float((a - b).pow(2).mean())


# (arch, model shape, config, expected config values, parameters removed)
_ATTN = 2 * (8 * 64)           # one head's q rows + o columns (head_dim 8, hidden 64)
CASES = {
    "llama-mlp": ("llama", {}, dict(target="mlp", ratio=0.25, multiple_of=8), {"intermediate_size": 120},
                  2 * 40 * 3 * HIDDEN),
    "qwen2-mlp-keep": ("qwen2", {}, dict(target="mlp", keep=96, multiple_of=16), {"intermediate_size": 96},
                       2 * 64 * 3 * HIDDEN),
    "opt-mlp": ("opt", {}, dict(target="mlp", ratio=0.5, multiple_of=8), {"ffn_dim": 80},
                2 * 80 * (2 * HIDDEN + 1)),                                       # fc1 rows + bias, fc2 columns
    "llama-heads-kv": ("llama", dict(heads=8, kv=4), dict(target="heads", ratio=0.5),
                       {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
                       2 * (4 * _ATTN + 2 * 2 * 8 * 64)),                         # 4 q/o heads, 2 k + 2 v heads
    "qwen2-heads-query": ("qwen2", dict(heads=8, kv=4), dict(target="heads", head_mode="query", keep=4),
                          {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8},
                          2 * 4 * (_ATTN + 8)),                                   # + the q bias
    "llama-layers": ("llama", dict(layers=4), dict(target="layers", ratio=0.5, protect_layers=[-1]),
                     {"num_hidden_layers": 2}, None),
    "qwen2-layers": ("qwen2", dict(layers=4), dict(target="layers", keep=3, protect_layers=[-1]),
                     {"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3}, None),
    "opt-layers": ("opt", dict(layers=4), dict(target="layers", ratio=0.25, protect_layers=[-1]),
                   {"num_hidden_layers": 3}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_result_is_a_plain_smaller_checkpoint(case, calib_ids, tmp_path):
    arch, shape, kw, expected, removed_params = CASES[case]
    model = build(arch, **shape)
    layer_params = sum(p.numel() for p in model.base_model.get_submodule("decoder.layers" if arch == "opt"
                                                                          else "layers")[0].parameters())
    records = prune(model, calib_ids, **kw)
    before, after = records["model"].params_before, records["model"].params_after
    assert after == sum(p.numel() for p in model.parameters())
    if removed_params is None:                                    # layers: whole layers went
        removed_params = len(records[next(k for k in records if k != "model")].removed) * layer_params
    assert before - after == removed_params > 0
    for key, value in expected.items():
        assert getattr(model.config, key) == value, key
    # The shapes are exactly those of a fresh model built from the rewritten config.
    fresh = type(model)(model.config)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(reloaded.eval(), calib_ids), logits(model, calib_ids))


@pytest.mark.parametrize("case", ["llama-heads-kv", "qwen2-heads-query", "llama-layers", "qwen2-layers",
                                  "opt-layers"])
def test_kv_cache_decoding_matches_full_forward(case, calib_ids):
    """Renumbered layer_idx and the new head counts: decoding token by token through the cache gives
    the logits of one full forward, and generate() gives the greedy tokens of full forwards."""
    arch, shape, kw, _, _ = CASES[case]
    model = build(arch, **shape)
    records = prune(model, calib_ids, **kw)
    if kw["target"] == "layers":             # the last layer is protected, so it moved to a new index
        assert records[next(k for k in records if k != "model")].removed[-1] < shape["layers"] - 1
    ids = calib_ids[:2, :12]
    full = logits(model, ids)
    with torch.no_grad():
        out = model(input_ids=ids[:, :6], use_cache=True)
        past, steps = out.past_key_values, [out.logits]
        for t in range(6, 12):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    greedy = ids[:1, :5]
    for _ in range(8):                       # greedy decoding by full forwards, no cache
        greedy = torch.cat([greedy, logits(model, greedy)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True), greedy)


# --- the defining property ---------------------------------------------------------------------------------

DEAD = slice(0, HIDDEN // 2)         # hidden dims the rigged norms nearly silence
LIVE = slice(HIDDEN // 2, HIDDEN)
DEAD_SCALE = 0.005                   # the norm weight of the silenced dims


@torch.no_grad()
def rig_mlp(model):
    """Decoy channels (every 4th): their gate/up rows are 4x heavier but read only the silenced dims of
    post_attention_layernorm, so they look important by weight and contribute almost nothing."""
    decoys = torch.arange(0, WIDTH, 4)
    for layer in model.model.layers:
        layer.post_attention_layernorm.weight[DEAD] = DEAD_SCALE
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[decoys, LIVE] = 0
            proj.weight[decoys] *= 4
    return decoys


@torch.no_grad()
def rig_kv_groups(model):
    """Decoy KV groups 1 and 3 (of 4): heavy value and output weights, values read only silenced dims."""
    d = model.config.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        layer.input_layernorm.weight[DEAD] = DEAD_SCALE
        for g in (1, 3):
            rows = slice(g * d, (g + 1) * d)
            attn.v_proj.weight[rows, LIVE] = 0
            attn.v_proj.weight[rows] *= 4
            attn.o_proj.weight[:, 2 * g * d:2 * (g + 1) * d] *= 4               # its 2 query heads
    return torch.tensor([1, 3])


@torch.no_grad()
def rig_query_heads(model):
    """Value coordinates 0..3 of every KV head read only silenced dims; the decoy query head of each
    group (the second) writes out only those coordinates, with 8x output weights."""
    d = model.config.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        layer.input_layernorm.weight[DEAD] = DEAD_SCALE
        for g in range(model.config.num_key_value_heads):
            attn.v_proj.weight[g * d:g * d + d // 2, LIVE] = 0
            head = 2 * g + 1
            cols = attn.o_proj.weight[:, head * d:(head + 1) * d]
            cols[:, d // 2:] = 0
            cols[:, :d // 2] *= 8
    return torch.arange(1, model.config.num_attention_heads, 2)


PROPERTY_CASES = {
    "mlp": (dict(), rig_mlp, dict(target="mlp", ratio=0.25, multiple_of=8)),
    "heads-kv": (dict(heads=8, kv=4), rig_kv_groups, dict(target="heads", ratio=0.5)),
    "heads-query": (dict(heads=8, kv=4), rig_query_heads, dict(target="heads", head_mode="query", ratio=0.5)),
}


def _bottom(scores, k):               # the negative control: keep the LEAST important units
    return torch.sort(torch.sort(scores, stable=True).indices[:k]).values


@pytest.mark.parametrize("case", list(PROPERTY_CASES))
def test_activation_importance_beats_weight_and_random(case, calib_ids, monkeypatch):
    shape, rig, kw = PROPERTY_CASES[case]
    reference_model = build("llama", **shape)
    rig(reference_model)
    reference = logits(reference_model, calib_ids)
    errors, removed = {}, {}
    for name, extra in [("activation", {}), ("weight", {}), *[(f"random{s}", {"seed": s}) for s in range(3)]]:
        model = build("llama", **shape)
        decoys = rig(model)
        records = prune(model, calib_ids, importance=name.rstrip("0123456789"), **extra, **kw)
        errors[name] = mse(logits(model, calib_ids), reference)
        removed[name] = records["model.layers.0.mlp" if case == "mlp" else "model.layers.0.self_attn"].removed
    assert removed["activation"] == decoys.tolist()                  # data sees through the decoys ...
    assert removed["weight"] != decoys.tolist()                      # ... the weights do not
    randoms = [errors[f"random{s}"] for s in range(3)]
    assert errors["activation"] < 0.1 * min(errors["weight"], *randoms), errors
    # Negative control: keeping the lowest-ranked units instead is far worse, at least as bad as any
    # random draw (with two heads per group, a draw can hit the very same set).
    monkeypatch.setattr(structured, "keep_top", _bottom)
    model = build("llama", **shape)
    rig(model)
    prune(model, calib_ids, importance="activation", **kw)
    worst = mse(logits(model, calib_ids), reference)
    assert worst > 10 * errors["activation"] and worst >= max(randoms), (worst, errors)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_near_identity_layer_is_removed_first(arch, calib_ids, monkeypatch):
    """A layer whose residual writers are scaled by 1e-3 barely turns its input: activation importance
    (1 - cos) removes it, and the output hardly moves; removing the most important layer instead does."""
    reference_model = build(arch, layers=4)

    def quiet(model):
        layer = (model.model.decoder.layers if arch == "opt" else model.model.layers)[2]
        with torch.no_grad():
            for name, module in layer.named_modules():
                if name.rpartition(".")[2] in ("o_proj", "out_proj", "down_proj", "fc2"):
                    module.weight *= 1e-3
                    if module.bias is not None:
                        module.bias *= 1e-3
        return model

    reference = logits(quiet(reference_model), calib_ids)
    baseline = mse(reference, torch.zeros_like(reference))
    records = prune(quiet(build(arch, layers=4)), calib_ids, target="layers", ratio=0.25)
    (record,) = [r for k, r in records.items() if k != "model"]
    assert record.removed == [2] and min(record.scores) == record.scores[2] < 0.01
    model = quiet(build(arch, layers=4))
    prune(model, calib_ids, target="layers", ratio=0.25)
    near = mse(logits(model, calib_ids), reference)
    monkeypatch.setattr(structured, "keep_top", _bottom)
    model = quiet(build(arch, layers=4))
    prune(model, calib_ids, target="layers", ratio=0.25)
    worst = mse(logits(model, calib_ids), reference)
    assert near < 1e-3 * worst and worst > 1e-3 * baseline


@pytest.mark.parametrize("arch,kw", [("llama", dict(target="mlp", ratio=0.5, multiple_of=8)),
                                     ("qwen2", dict(target="heads", ratio=0.5)),
                                     ("qwen2", dict(target="heads", head_mode="query", ratio=0.5))],
                         ids=["llama-mlp", "qwen2-heads-kv", "qwen2-heads-query"])
def test_units_that_write_nothing_go_without_changing_the_output(arch, kw, calib_ids):
    """Zero the output weights of half the units: activation importance removes exactly those, and the
    sliced q/k/v/o (with Qwen2's biases) or gate/up/down compute the same function."""
    model = build(arch)
    layers = model.model.layers
    with torch.no_grad():
        for layer in layers:
            if kw["target"] == "mlp":
                layer.mlp.down_proj.weight[:, 1::2] = 0                      # odd channels
            elif kw.get("head_mode") == "query":
                layer.self_attn.o_proj.weight[:, 0:16] = 0                   # head 0 (of group 0)
                layer.self_attn.o_proj.weight[:, 48:64] = 0                  # head 3 (of group 1)
            else:
                layer.self_attn.o_proj.weight[:, :32] = 0                    # KV group 0 (heads 0, 1)
    before = logits(model, calib_ids)
    records = prune(model, calib_ids, **kw)
    expected = {"mlp": list(range(1, WIDTH, 2)), "query": [0, 3], "kv_groups": [0]}
    key = "mlp" if kw["target"] == "mlp" else kw.get("head_mode", "kv_groups")
    assert records["model.layers.1." + ("mlp" if key == "mlp" else "self_attn")].removed == expected[key]
    torch.testing.assert_close(logits(model, calib_ids), before, rtol=1e-5, atol=1e-6)


def test_dtype_and_device_are_kept(calib_ids):
    model = build("qwen2").to(torch.bfloat16)
    prune(model, None, target="mlp", ratio=0.5, multiple_of=8, importance="weight")
    prune(model, None, target="heads", ratio=0.5, importance="random")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (32,)


# --- failures: before any work, saying what to do ------------------------------------------------------------

@pytest.mark.parametrize("arch,kw,message", [
    ("llama", dict(target="mlp"), r"needs calibration data: pass calib="),
    ("llama", dict(target="layers", ratio=0.9, importance="weight"), r"would remove all 2 decoder layers"),
    ("llama", dict(target="heads", ratio=0.8, importance="weight"), r"would remove all 2 KV groups"),
    ("llama", dict(target="heads", keep=3, head_mode="query", importance="weight"),
     r"keep 3 query heads breaks grouped-query attention .* needs a multiple of 2"),
    ("llama", dict(target="heads", keep=3, importance="weight"), r"breaks grouped-query attention"),
    ("llama", dict(target="mlp", keep=100, importance="weight"), r"keep 100 is not a multiple of multiple_of 128"),
    ("llama", dict(target="mlp", ratio=0.05, multiple_of=32, importance="weight"), r"removes nothing"),
    ("opt", dict(target="heads", ratio=0.5, importance="weight"),
     r"has no model\.decoder\.layers\.0\.self_attn\.o_proj; prune 'mlp' or 'layers'"),
    ("llama", dict(target="layers", keep=1, protect_layers=[0, 1], importance="weight"), r"protect fewer"),
])
def test_bad_requests_fail_before_any_work(arch, kw, message):
    model = build(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        prune(model, None, **kw)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_mha_model_refuses_query_mode_and_unsupported_mlp_is_named():
    with pytest.raises(ConfigError, match=r"one query head per KV head .* use head_mode 'kv_groups'"):
        prune(build("llama", kv=4), None, target="heads", head_mode="query", ratio=0.5, importance="weight")


def test_gpt2_conv1d_mlp_is_pruned_and_reloads_in_transformers(tmp_path):
    """GPT-2's Conv1D MLP (c_fc/c_proj, n_inner null = 4 * n_embd) is pruned as linears and written back
    in the Conv1D layout with n_inner set, so vanilla transformers builds the smaller model."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    prune(gpt2, None, target="mlp", ratio=0.5, importance="weight", multiple_of=8)
    assert gpt2.config.n_inner == 64 and gpt2.transformer.h[0].mlp.c_fc.out_features == 64
    with torch.no_grad():
        ref = gpt2(ids).logits
    out = compress.export(gpt2, None, tmp_path / "gpt2")
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_config_validation_and_recipe_round_trip():
    with pytest.raises(ConfigError, match="ratio .* or keep .*, not both"):
        StructuredConfig(ratio=0.5, keep=8)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\), got 1.0"):
        StructuredConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="protect_layers applies to target 'layers' only"):
        StructuredConfig(target="mlp", protect_layers=[0])
    with pytest.raises(ConfigError, match=r"unknown key 'ratoi' \(did you mean 'ratio'\?\)"):
        config_from_dict({"method": "structured", "ratoi": 0.5})
    with pytest.raises(ConfigError, match=r"target' must be one of \['mlp', 'heads', 'layers'\]"):
        config_from_dict({"method": "structured", "target": "neurons"})
    cfg = StructuredConfig(target="heads", head_mode="query", keep=4, importance="weight", seed=3)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert StructuredConfig().fraction == 0.25 and cfg.describe() == "heads query keep 4 weight"
