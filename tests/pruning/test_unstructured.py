"""Magnitude, Wanda and SparseGPT: masks, the defining property of each method against its
baseline (on one layer with realistic, uneven input features), and whole tiny models."""

import pytest
import torch

import compress
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.pruning.config import parse_pattern
from compress.pruning.masks import check_nm, nm_mask, sparsity_of, unstructured_mask
from compress.pruning.sparsegpt import sparsegpt_solve
from compress.quant.formats import IntFormat
from compress.quant.linear import QuantLinear
from compress.stats import HessianStats
from conftest import tiny_model

METHODS = [compress.MagnitudeConfig, compress.WandaConfig, compress.SparseGPTConfig]


def _layer(rows=48, cols=64, tokens=512, seed=0):
    """A weight and inputs whose features differ in scale by ~30x, as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scales = torch.exp(torch.randn(cols, generator=g) * 0.8)
    mix = torch.eye(cols) + 1.0 * torch.randn(cols, cols, generator=g) / cols ** 0.5    # correlated features
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scales
    stats = HessianStats(cols)
    stats.add(x)
    return w, x, stats


def _error(w, w2, x):
    return float(((w - w2) @ x.T).square().sum() / (w @ x.T).square().sum())


def _prune_layer(cfg, w, stats):
    if isinstance(cfg, compress.SparseGPTConfig):
        return sparsegpt_solve(stats.hessian, w, cfg).weight
    score = w.abs() if isinstance(cfg, compress.MagnitudeConfig) else w.abs() * stats.diag.sqrt()
    keep = nm_mask(score, *cfg.nm) if cfg.nm else unstructured_mask(score, cfg.target_sparsity, cfg.comparison)
    return w * keep


# --- masks -------------------------------------------------------------------------------------
def test_row_mask_removes_exactly_the_lowest_scores_of_each_row():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    assert unstructured_mask(score, 0.5, "row").tolist() == [[True, False, True, False], [False, False, True, True]]


def test_layer_mask_lets_rows_differ():
    score = torch.tensor([[4.0, 5.0, 3.0, 6.0], [0.5, 0.1, 0.9, 0.7]])
    keep = unstructured_mask(score, 0.5, "layer")
    assert keep[0].all() and not keep[1].any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_best_of_every_m(n, m):
    score = torch.rand(16, 64)
    keep = nm_mask(score, n, m)
    assert (keep.reshape(16, -1, m).sum(-1) == n).all()
    assert check_nm(score * keep, n, m) and not check_nm(score, n, m)
    worst_kept = (score.reshape(16, -1, m) * keep.reshape(16, -1, m) + (~keep).reshape(16, -1, m) * 9).amin(-1)
    best_dropped = (score.reshape(16, -1, m) * (~keep).reshape(16, -1, m)).amax(-1)
    assert (worst_kept >= best_dropped).all()


def test_patterns_parse_and_bad_ones_are_rejected():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 4 : 8 ") == (4, 8)
    for bad in ("2/4", "4:2", "0:4", "two:four"):
        with pytest.raises(ConfigError, match="pattern"):
            parse_pattern(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, "sparsity must be in"), ({"sparsity": 0.0}, "sparsity must be in"),
    ({"pattern": "2:4", "sparsity": 0.3}, "means sparsity 0.5"), ({"pattern": "3:2"}, "0 < N < M"),
    ({"layer_sparsity": {"down_proj": 1.5}}, "layer_sparsity"), ({"pattern": "2:4", "layer_sparsity": {"q": 0.2}}, "N:M"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        compress.WandaConfig(**kwargs)


def test_configs_round_trip_through_recipe_dicts():
    for cfg in (compress.WandaConfig(pattern="2:4"), compress.SparseGPTConfig(sparsity=0.6, bits=4, group_size=64),
                compress.MagnitudeConfig(layer_sparsity={"down_proj": 0.3}, comparison="layer")):
        assert compress.config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'sparsty'"):
        compress.config_from_dict({"method": "wanda", "sparsty": 0.5})


# --- the defining properties, one layer ----------------------------------------------------------
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_wanda_beats_magnitude_and_sparsegpt_beats_wanda(pattern):
    w, x, stats = _layer()
    errors = {cls.method: _error(w, _prune_layer(cls(pattern=pattern), w, stats), x) for cls in METHODS}
    assert 0 < errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_keeps_exact_sparsity_and_zeros():
    w, x, stats = _layer()
    for cfg in (compress.SparseGPTConfig(sparsity=0.5), compress.SparseGPTConfig(pattern="2:4"),
                compress.SparseGPTConfig(sparsity=0.7, comparison="layer")):
        result = sparsegpt_solve(stats.hessian, w, cfg)
        assert sparsity_of(result.weight) == pytest.approx(cfg.target_sparsity, abs=1e-3)
        assert torch.equal(result.weight != 0, result.keep)
        if cfg.nm:
            assert check_nm(result.weight, 2, 4)
        if cfg.comparison == "row":
            assert ((result.weight == 0).sum(1) == round(cfg.target_sparsity * w.shape[1])).all()


def test_sparsegpt_reconstructs_a_fixed_mask_better_than_zeroing_it():
    w, x, stats = _layer()
    keep = nm_mask(torch.rand_like(w), 2, 4)               # a mask chosen elsewhere (here: at random)
    result = sparsegpt_solve(stats.hessian, w, compress.SparseGPTConfig(pattern="2:4"), keep=keep)
    assert torch.equal(result.keep, keep) and torch.equal(result.weight != 0, keep)
    assert _error(w, result.weight, x) < 0.9 * _error(w, w * keep, x)


def test_joint_prune_and_quantize_beats_prune_then_round():
    w, x, stats = _layer(cols=128)
    cfg = compress.SparseGPTConfig(pattern="2:4", bits=3, group_size=32)
    fmt = IntFormat(3, 32, True, "minmax", torch.float32)
    joint = sparsegpt_solve(stats.hessian, w, cfg, fmt=fmt)
    assert (joint.weight[~joint.keep] == 0).all() and check_nm(joint.weight, 2, 4)   # survivors may round to 0
    assert (joint.quant.codes[~joint.keep] == 0).all()
    pruned = sparsegpt_solve(stats.hessian, w, compress.SparseGPTConfig(pattern="2:4")).weight
    fmt2 = IntFormat(3, 32, True, "minmax", torch.float32)
    _, rounded = fmt2.quantize(pruned, fmt2.fit(pruned, None))
    assert _error(w, joint.weight, x) < _error(w, rounded, x)


def test_sparsegpt_falls_back_to_wanda_when_cholesky_fails(caplog):
    w, x, _ = _layer()
    bad = torch.full((w.shape[1], w.shape[1]), -1.0)
    result = sparsegpt_solve(bad, w, compress.SparseGPTConfig(pattern="2:4"))
    assert result.fallback and "Cholesky" in result.fallback and check_nm(result.weight, 2, 4)


# --- whole models -------------------------------------------------------------------------------
def _calib(ids):
    return CalibrationData(ids, "ids", 0)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


# every method x pattern on Llama; every architecture with Wanda (the engine path) and SparseGPT 2:4
CASES = [("llama", cls, pattern) for cls in METHODS for pattern in (None, "2:4")] + \
    [(arch, cls, "2:4") for arch in ("qwen2", "opt") for cls in (compress.WandaConfig, compress.SparseGPTConfig)]


@pytest.mark.parametrize("arch,cls,pattern", CASES, ids=lambda v: getattr(v, "method", str(v)))
def test_every_decoder_linear_gets_exactly_the_sparsity_asked(arch, calib_ids, cls, pattern):
    model = tiny_model(arch)
    head = model.lm_head.weight.detach().clone()
    records = compress.prune(model, cls(pattern=pattern), _calib(calib_ids), progress=False)
    linears = _linears(model)
    assert set(records) == set(linears)
    for name, m in linears.items():
        assert sparsity_of(m.weight) == pytest.approx(0.5, abs=0.02), name
        assert records[name].sparsity == pytest.approx(sparsity_of(m.weight))
        if pattern:
            assert check_nm(m.weight, 2, 4), name
    assert torch.equal(model.lm_head.weight, head)        # ignored by default
    report = compress.report.summarize(model)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_wanda_model_output_is_closer_than_magnitude(calib_ids):
    reference = tiny_model("llama")
    # uneven input features, as in trained models: scale some embedding dimensions up
    with torch.no_grad():
        reference.model.embed_tokens.weight[:, :8] *= 8
        ref = reference(input_ids=calib_ids).logits
    errors = {}
    for cls in METHODS:
        model = tiny_model("llama")
        model.load_state_dict(reference.state_dict())
        compress.prune(model, cls(pattern="2:4"), _calib(calib_ids), progress=False)
        with torch.no_grad():
            errors[cls.method] = float((model(input_ids=calib_ids).logits - ref).square().mean())
    assert 0 < errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_layer_sparsity_overrides_and_ignore(calib_ids):
    model = tiny_model("llama")
    cfg = compress.WandaConfig(sparsity=0.5, layer_sparsity={"mlp.down_proj": 0.25, "self_attn.o_proj": 0},
                               ignore=["lm_head", "*.layers.0.mlp.*"])
    records = compress.prune(model, cfg, _calib(calib_ids), progress=False)
    layers = model.model.layers
    assert sparsity_of(layers[1].mlp.down_proj.weight) == pytest.approx(0.25, abs=0.01)
    assert sparsity_of(layers[1].mlp.up_proj.weight) == pytest.approx(0.5, abs=0.01)
    assert sparsity_of(layers[1].self_attn.o_proj.weight) == 0
    assert sparsity_of(layers[0].mlp.gate_proj.weight) == 0
    assert "model.layers.0.mlp.up_proj" not in records


def test_joint_sparsegpt_quantization_packs_with_zeros_kept(calib_ids):
    model = tiny_model("llama")
    compress.prune(model, compress.SparseGPTConfig(pattern="2:4", bits=4, group_size=32), _calib(calib_ids),
                   progress=False)
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14
    for m in packed:
        assert check_nm(m.dequantize(torch.float32), 2, 4)


def test_data_methods_need_calibration_and_bad_shapes_are_named(calib_ids):
    with pytest.raises(ConfigError, match="wanda needs calibration data"):
        compress.prune(tiny_model("llama"), compress.WandaConfig())
    with pytest.raises(ConfigError, match="in_features 64 of model.layers.0.self_attn.q_proj is not a multiple of 3"):
        compress.prune(tiny_model("llama"), compress.MagnitudeConfig(pattern="2:3"))
    with pytest.raises(ConfigError, match="no nn.Linear layer"):
        compress.prune(tiny_model("llama"), compress.MagnitudeConfig(ignore=["*"]))
    with pytest.raises(ConfigError, match="prune\\(\\) takes a pruning config"):
        compress.prune(tiny_model("llama"), compress.RTNConfig())


def test_magnitude_needs_no_data_and_changes_the_model(calib_ids):
    model = tiny_model("llama")
    before = model(input_ids=calib_ids).logits.detach()
    compress.prune(model, compress.MagnitudeConfig(sparsity=0.3), progress=False)
    assert not torch.allclose(model(input_ids=calib_ids).logits, before)
