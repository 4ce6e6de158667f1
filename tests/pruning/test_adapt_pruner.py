"""Adapt-Pruner on tiny random Llama and Qwen2: per-layer ratios follow layer importance (a planted
near-identity layer loses the most), the overall channel target is met exactly, the padded result
reloads in vanilla transformers with identical logits, interleaved training lowers the loss against
the same pruning without training, and bad configs fail with messages that say what to do."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.lora.train import causal_lm_loss
from compress.pruning.adapt import AdaptConfig, adaptive_ratios, allocate_keeps, prune_adaptive
from conftest import VOCAB

LAYERS, WIDTH = 4, 160


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def quiet_layer(model, index: int, scale: float = 0.02):
    """Make one layer nearly the identity: its writes into the residual stream become tiny."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(scale)
        layer.mlp.down_proj.weight.mul_(scale)
    return model


def run(model, ids, **kw):
    return prune_adaptive(model, AdaptConfig(**kw), CalibrationData(ids, "ids", 0), device="cpu", progress=False)


def test_ratios_follow_importance_and_average_to_the_target():
    imp = torch.tensor([0.30, 0.05, 0.20, 0.25])
    r = adaptive_ratios(imp, 0.25, 0.1)
    assert int(r.argmax()) == 1 and int(r.argmin()) == 0                  # least important loses the most
    assert float(r.mean()) == pytest.approx(0.25, abs=1e-12)
    assert float(r.max() - r.min()) == pytest.approx(0.2)                   # the span is 2 * amplitude
    assert torch.equal(adaptive_ratios(imp, 0.25, 0.0), torch.full((4,), 0.25, dtype=torch.float64))


def test_allocation_is_exact_within_caps():
    desired = torch.tensor([100.7, 30.2, 150.9, 60.1], dtype=torch.float64)
    keeps = allocate_keeps(desired, 340, [160, 160, 140, 160], multiple_of=4)
    assert sum(keeps) == 340 and all(k % 4 == 0 for k in keeps) and keeps[2] == 140
    with pytest.raises(ConfigError, match="cannot keep 700 channels"):
        allocate_keeps(desired, 700, [160] * 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_planted_unimportant_layer_gets_the_largest_ratio_and_target_is_exact(arch, calib_ids, tmp_path):
    model = quiet_layer(build(arch), 2)
    before = sum(p.numel() for p in model.parameters())
    records = run(model, calib_ids, ratio=0.25, amplitude=0.15, step=0.1)
    history = records["increments"]
    assert len(history) == 3                                                # ceil(0.25 / 0.1)
    for h in history:
        assert max(range(LAYERS), key=lambda i: h.ratios[i]) == 2           # the quiet layer loses the most
        assert min(range(LAYERS), key=lambda i: h.importance[i]) == 2
    widths = history[-1].widths
    assert sum(widths) == round(0.75 * LAYERS * WIDTH) == 480               # exactly the overall target
    assert min(widths) == widths[2] and len(set(widths)) > 1                # adaptive, not uniform
    assert [records[f"model.layers.{i}.mlp"].kept for i in range(LAYERS)] == widths
    assert records["model"].params_after == before - (LAYERS * WIDTH - 480) * 3 * 64
    # Padded to the widest layer: exactly inert channels, a plain checkpoint vanilla transformers reloads.
    assert model.config.intermediate_size == max(widths)
    with torch.no_grad():
        out = model(input_ids=calib_ids).logits
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=calib_ids).logits, out)
    down = model.model.layers[2].mlp.down_proj.weight
    assert down[:, widths[2]:].abs().sum() == 0 and down[:, :widths[2]].abs().sum() > 0


def test_amplitude_zero_is_uniform(calib_ids):
    model = quiet_layer(build("llama"), 2)
    records = run(model, calib_ids, ratio=0.25, amplitude=0.0, step=1.0)
    assert records["increments"][-1].widths == [120] * LAYERS


def test_interleaved_training_lowers_the_loss(calib_ids):
    train = {"method": "lora", "steps": 2, "batch_size": 2, "learning_rate": 5e-3, "warmup_steps": 0}
    losses = {}
    for name, kw in {"none": {}, "trained": {"train": train}}.items():
        model = build("llama")
        records = run(model, calib_ids, ratio=0.25, step=0.125, **kw)
        with torch.no_grad():
            losses[name] = float(causal_lm_loss(model, calib_ids))
        if name == "trained":
            assert all(h.train is not None and h.train["steps"] == 2 for h in records["increments"])
    assert losses["trained"] < losses["none"] - 0.05


def test_config_and_recipe():
    cfg = AdaptConfig(ratio=0.3, amplitude=0.05, step=0.05, train={"method": "lora", "steps": 4})
    assert cfg.increments == 6 and config_from_dict(cfg.to_dict()) == cfg
    assert AdaptConfig(ratio=0.25, step=1.0).increments == 1


@pytest.mark.parametrize("kw,message", [
    (dict(target="heads"), r"adapt prunes target 'mlp' only"),
    (dict(ratio=1.0), r"ratio is the fraction of MLP channels removed, in \(0, 1\)"),
    (dict(amplitude=-0.1), r"amplitude spreads the per-layer ratios"),
    (dict(step=0), r"step is the fraction of channels removed per increment"),
    (dict(train={"method": "gptq"}), r"train must be a pass with method one of \['lora', 'distill'\]"),
    (dict(train={"method": "lora", "stpes": 3}), r"unknown key 'stpes'"),
])
def test_bad_configs_fail_with_clear_messages(kw, message):
    with pytest.raises(ConfigError, match=message):
        AdaptConfig(**kw)


def test_bad_requests_fail_before_any_work(calib_ids):
    model = build("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="adapt needs calibration data"):
        prune_adaptive(model, AdaptConfig(), None, device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"train \{method: distill\} needs teacher="):
        run(model, calib_ids, train={"method": "distill", "steps": 1})
    with pytest.raises(ConfigError, match=r"ratio 0.0005 removes none of the 640 MLP channels"):
        run(model, calib_ids, ratio=0.0005)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_recipe_adapt_pass_exports_a_reloadable_checkpoint(tmp_path, tokenizer, text_file):
    import yaml

    from compress.recipe import load_recipe, run_recipe
    from conftest import tiny_model
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "version": 1, "model": str(tmp_path / "base"),
        "calibration": {"data": str(text_file), "samples": 4, "seqlen": 32},
        "passes": [{"method": "adapt", "ratio": 0.25, "step": 0.125, "importance_samples": 2,
                    "train": {"method": "lora", "steps": 1, "batch_size": 2}}],
        "evaluation": {"data": str(text_file), "seqlen": 32, "max_windows": 2},
        "export": {"output": str(tmp_path / "out"), "verify": True},
    }))
    run_recipe(load_recipe(recipe_path), progress=False, echo=lambda *a: None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.intermediate_size <= 160
