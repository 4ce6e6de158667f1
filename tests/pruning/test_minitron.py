"""Minitron width pruning on tiny random Llama (GQA, untied) and Qwen2 (tied embeddings, q/k/v biases):
config and every tensor agree with a fresh model built from the rewritten config, the model runs, saves
and reloads in vanilla transformers with identical logits, the parameter count lands within the stated
tolerance of the target, the kept channels are the top ones by an independently computed importance,
planted dead channels go, and bad requests fail before any work."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.pruning.minitron import MinitronConfig, prune_width
from compress.pruning.structured import StructuredConfig, prune_structured
from conftest import VOCAB, tiny_model

TOL = 0.05          # the tests' tolerance on target_params: the tiny models' grid of multiples of 8 is coarse


def build(arch: str, *, heads: int = 4, kv: int = 2, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()


def calib(ids):
    return CalibrationData(ids, "ids", 0)


def run(model, ids=None, **kw):
    kw = {"hidden_multiple": 8, "mlp_multiple": 8, "tolerance": TOL, **kw}
    return prune_width(model, MinitronConfig(**kw), None if ids is None else calib(ids), device="cpu", progress=False)


def nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = {
    "llama-hidden-mlp": ("llama", {}, dict(target_params=0.7), None),
    "qwen2-hidden-mlp": ("qwen2", {}, dict(target_params=0.7), None),
    "llama-all-axes-kv": ("llama", dict(heads=8, kv=4), dict(target_params=0.6, axes=["hidden", "mlp", "heads"]),
                          None),
    "qwen2-explicit-query": ("qwen2", dict(heads=8, kv=4),
                             dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, head_mode="query"),
                             {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                              "num_key_value_heads": 4}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_every_tensor_agree_and_reload(case, calib_ids, tmp_path):
    arch, shape, kw, expected = CASES[case]
    model = build(arch, **shape)
    before = nparams(model)
    if isinstance(kw.get("target_params"), float):
        kw = {**kw, "target_params": kw["target_params"] * before}
    records = run(model, calib_ids, **kw)
    after = nparams(model)
    assert records["model"].params_before == before and records["model"].params_after == after
    if "target_params" in kw:
        assert abs(after - kw["target_params"]) <= TOL * kw["target_params"]
    for key, value in (expected or {}).items():
        assert getattr(model.config, key) == value
    assert model.config.head_dim == 16 if shape.get("heads") == 4 or not shape else True
    assert model.config.hidden_size < 64                      # the hidden size really shrank
    # A fresh model from the rewritten config has exactly these tensor shapes and this parameter count.
    fresh = AutoModelForCausalLM.from_config(model.config)
    theirs = {k: v.shape for k, v in fresh.state_dict().items()}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == theirs and nparams(fresh) == after
    if arch == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight       # still tied
    out = logits(model, calib_ids)
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert torch.equal(logits(reloaded.eval(), calib_ids), out)
    # Decoding through the KV cache agrees with the full forward (head_dim and GQA groups are consistent).
    ids = calib_ids[:1, :10]
    with torch.no_grad():
        past = model(input_ids=ids[:, :6], use_cache=True).past_key_values
        step = model(input_ids=ids[:, 6:], past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(step, logits(model, ids)[:, 6:], rtol=1e-4, atol=1e-5)


def _independent_scores(model, ids):
    """Hidden and MLP importance computed here, from a plain full forward (not the engine walk)."""
    hidden = model.config.hidden_size
    norm_sums, tokens, mlp = {}, ids.numel(), {}
    hooks = []
    norms = [(f"{i}.{n}", getattr(layer, n)) for i, layer in enumerate(model.model.layers)
             for n in ("input_layernorm", "post_attention_layernorm")] + [("final", model.model.norm)]
    for key, norm in norms:
        hooks.append(norm.register_forward_hook(
            lambda m, a, o, key=key: norm_sums.__setitem__(key, o.reshape(-1, hidden).abs().sum(0))))
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: mlp.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).abs().mean(0) * m.weight.norm(dim=0))))
    logits(model, ids)
    for h in hooks:
        h.remove()
    return sum(norm_sums.values()) / tokens, mlp


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kept_channels_are_the_top_by_importance(arch, calib_ids):
    model = build(arch)
    hidden_scores, mlp_scores = _independent_scores(model, calib_ids)
    records = run(model, calib_ids, hidden_size=40, intermediate_size=96)
    torch.testing.assert_close(torch.tensor(records["model.hidden"].scores), hidden_scores, rtol=1e-4, atol=1e-6)
    kept_hidden = set(range(64)) - set(records["model.hidden"].removed)
    assert kept_hidden == set(torch.topk(hidden_scores, 40).indices.tolist())
    for i in range(2):
        rec = records[f"model.layers.{i}.mlp"]
        assert set(range(160)) - set(rec.removed) == set(torch.topk(mlp_scores[i], 96).indices.tolist())
    # Negative control: a random ranking keeps a different hidden set.
    other = build(arch)
    rand = run(other, None, hidden_size=40, intermediate_size=96, importance="random")
    assert set(rand["model.hidden"].removed) != set(records["model.hidden"].removed)


def _plant_dead_channels(model, j: int, c: int):
    """Hidden channel j: zero in the embeddings and in every write into the residual stream, so every
    norm outputs 0 there. MLP channel c of layer 0: a zero gate row, so its activation is silu(0) * up = 0."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, j] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[j] = 0
            layer.mlp.down_proj.weight[j] = 0
        model.model.layers[0].mlp.gate_proj.weight[c] = 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_planted_zero_importance_channels_are_removed(arch, calib_ids):
    j, c = 17, 33
    model = build(arch)
    _plant_dead_channels(model, j, c)
    records = run(model, calib_ids, hidden_size=56, intermediate_size=152)
    assert records["model.hidden"].scores[j] == 0 and j in records["model.hidden"].removed
    assert c in records["model.layers.0.mlp"].removed
    # Negative control: at least one random ranking keeps the dead hidden channel.
    kept_by_some = False
    for seed in range(4):
        other = build(arch)
        _plant_dead_channels(other, j, c)
        rec = run(other, None, hidden_size=56, intermediate_size=152, importance="random", seed=seed)
        kept_by_some |= j not in rec["model.hidden"].removed
    assert kept_by_some


def test_heads_keep_the_kv_groups_whole(calib_ids):
    model = build("llama", heads=8, kv=4)
    records = run(model, calib_ids, num_attention_heads=4, hidden_size=48)          # kv_groups: 2 of 4 groups
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 8)
    rec = records["model.layers.0.self_attn"]
    assert rec.unit == "kv_group" and rec.total == 4 and rec.kept == 2 and len(rec.removed) == 2
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 48) and attn.k_proj.weight.shape == (16, 48)
    assert attn.o_proj.weight.shape == (48, 32) and attn.num_key_value_groups == 2


def test_minitron_keeps_more_than_random_on_planted_channels(calib_ids):
    """Activation importance beats a random ranking at the same widths (the logits stay closer)."""
    ref_model = build("llama")
    reference = logits(ref_model, calib_ids)
    errors = {}
    for name, kw in {"activation": {}, "random0": dict(importance="random", seed=0),
                     "random1": dict(importance="random", seed=1)}.items():
        model = build("llama")
        run(model, None if name != "activation" else calib_ids, hidden_size=48, intermediate_size=120, **kw)
        errors[name] = float((logits(model, calib_ids) - reference).pow(2).mean())
    assert errors["activation"] < min(errors["random0"], errors["random1"])


@pytest.mark.parametrize("kw,message", [
    (dict(), r"needs target_params .* or at least one of hidden_size"),
    (dict(target_params=5e4, axes=["depth"]), r"axes must be a non-empty list of \['hidden', 'mlp', 'heads'\]"),
    (dict(target_params=-1), r"target_params is the parameter count after pruning and must be positive"),
    (dict(target_params=5e4, tolerance=1.5), r"tolerance is a relative distance"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
])
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        MinitronConfig(**kw)


@pytest.mark.parametrize("kw,message", [
    (dict(target_params=5e4), r"needs calibration data: pass calib="),
    (dict(target_params=1.0, importance="random"), r"no hidden\+mlp widths reach 1 parameters within tolerance"),
    (dict(target_params=1e9, importance="random"), r"removes nothing"),
    (dict(num_attention_heads=3, importance="random"), r"num_attention_heads 3 breaks grouped-query attention"),
    (dict(hidden_size=60, importance="random"), r"hidden_size 60 must be a multiple of hidden_multiple 8"),
    (dict(target_params=5e4, hidden_size=40, intermediate_size=80, importance="random"),
     r"leaves nothing to search"),
])
def test_bad_requests_fail_before_any_work(kw, message):
    model = build("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        run(model, None, **kw)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_families_are_named():
    with pytest.raises(ConfigError, match=r"supports Llama-style decoders .* not opt; use method 'structured'"):
        run(tiny_model("opt"), None, target_params=5e4, importance="random")


def test_recipe_round_trip():
    cfg = MinitronConfig(target_params=100e6, axes=["hidden", "mlp", "heads"], head_mode="query", seed=2)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown key 'target_param'"):
        config_from_dict({"method": "minitron", "target_param": 1e8})


def test_hidden_pruning_composes_with_structured_passes(calib_ids, tmp_path):
    """A structured pass after minitron sees the new geometry (head_dim written out) and the export reloads."""
    model = build("qwen2")
    run(model, calib_ids, hidden_size=48, intermediate_size=128)
    prune_structured(model, StructuredConfig(target="mlp", keep=96, multiple_of=8), calib(calib_ids),
                     device="cpu", progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 96 and reloaded.config.hidden_size == 48
    assert torch.equal(logits(reloaded, calib_ids), logits(model, calib_ids))


def test_recipe_minitron_then_distill_exports_a_reloadable_checkpoint(tmp_path, tokenizer, text_file):
    import json

    import yaml

    from compress.recipe import load_recipe, run_recipe
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "version": 1, "model": str(tmp_path / "base"),
        "calibration": {"data": str(text_file), "samples": 4, "seqlen": 32},
        "passes": [{"method": "minitron", "hidden_size": 48, "intermediate_size": 128, "hidden_multiple": 8,
                    "mlp_multiple": 8},
                   {"method": "distill", "steps": 1, "batch_size": 2, "samples": 4, "top_k": 8}],
        "evaluation": {"data": str(text_file), "seqlen": 32, "max_windows": 2},
        "export": {"output": str(tmp_path / "out"), "verify": True},
    }))
    run_recipe(load_recipe(recipe_path), progress=False, echo=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    stages = {s["name"].split()[0]: s for s in saved["stages"]}
    assert stages["minitron"]["parameters"] < stages["load"]["parameters"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.hidden_size == 48 and reloaded.config.intermediate_size == 128


@pytest.mark.slow
def test_smollm2_to_100m_keeps_head_dim_and_reloads(tmp_path):
    """SmolLM2-135M -> ~100M (the recipe's widths) on 2 short windows: the shapes and the count, and a
    vanilla reload that computes the same logits."""
    import compress
    from conftest import SHARED_DATA, SMOLLM2, require_smollm2
    require_smollm2()
    model, tok = compress.load_model(SMOLLM2)
    data = compress.calibration_data(tok, SHARED_DATA / "wikitext-2" / "valid.txt", samples=2, seqlen=128)
    records = compress.prune(model, MinitronConfig(target_params=100e6, hidden_multiple=48), calib=data,
                             progress=False)
    c = model.config
    assert c.head_dim == 64 and c.hidden_size % c.num_attention_heads == 0
    assert (c.hidden_size, c.intermediate_size) == (432, 1472)              # the hidden size did shrink
    assert records["model"].params_after == nparams(model)
    assert abs(nparams(model) - 100e6) <= 0.02 * 100e6
    ids = data.input_ids[:1, :32]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
