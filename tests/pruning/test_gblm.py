"""GBLM-Pruner: the hook-accumulated gradient norms equal a direct per-window computation, the
mask has the requested sparsity / N:M pattern, gradient_weight 0 is Wanda, bad configs."""

import pytest
import torch

import compress
from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.pruning.gblm import GBLMConfig, gradient_norms
from compress.pruning.masks import check_nm, sparsity_of
from conftest import tiny_model


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gradient_norms_match_a_direct_computation(arch, calib_ids):
    model = tiny_model(arch)
    names = list(_linears(model))
    got = gradient_norms(model, CalibrationData(calib_ids, "ids", 0), names)
    weights = [dict(model.named_modules())[n].weight for n in names]
    expected = [torch.zeros_like(w) for w in weights]
    for window in calib_ids:
        loss = model(input_ids=window[None], labels=window[None]).loss
        for e, g in zip(expected, torch.autograd.grad(loss, weights)):
            e += g.square()
    for name, e in zip(names, expected):
        assert torch.allclose(got[name], e.sqrt(), rtol=1e-4, atol=1e-7), name
        assert got[name].abs().sum() > 0
    # hooks gone, no .grad left, requires_grad restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(not w._post_accumulate_grad_hooks for w in weights)


@pytest.mark.parametrize("arch,sparsity,pattern", [("llama", 0.5, None), ("qwen2", None, "2:4")])
def test_mask_has_the_requested_sparsity_and_differs_from_wanda(arch, sparsity, pattern, calib_ids):
    calib = CalibrationData(calib_ids, "ids", 0)
    models = {}
    for cfg in (compress.WandaConfig(sparsity=sparsity, pattern=pattern),
                GBLMConfig(sparsity=sparsity, pattern=pattern),
                GBLMConfig(sparsity=sparsity, pattern=pattern, gradient_weight=0)):
        model = tiny_model(arch)
        compress.prune(model, cfg, calib, progress=False)
        models[(cfg.method, cfg.gradient_weight if cfg.method == "gblm" else None)] = _linears(model)
    gblm, wanda, zero = models[("gblm", 100.0)], models[("wanda", None)], models[("gblm", 0)]
    target = 0.5 if pattern else sparsity
    differs = 0
    for name, m in gblm.items():
        assert sparsity_of(m.weight) == pytest.approx(target, abs=0.02), name
        if pattern:
            assert check_nm(m.weight, 2, 4), name
        assert torch.equal(zero[name].weight, wanda[name].weight), name       # alpha 0 is Wanda
        differs += not torch.equal(m.weight == 0, wanda[name].weight == 0)
    assert differs > 0                                                        # the gradient term matters


@pytest.mark.parametrize("bad,field", [({"gradient_weight": -1}, "gradient_weight"),
                                       ({"gradient_weight": "big"}, "gradient_weight"),
                                       ({"pattern": "4:2"}, "pattern"), ({"alpha": 100}, "alpha")])
def test_bad_configs_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"method": "gblm", **bad})


def test_needs_calibration_data():
    with pytest.raises(ConfigError, match="calibration data"):
        compress.prune(tiny_model("llama"), GBLMConfig(), None, progress=False)


def test_recipe_round_trip():
    cfg = config_from_dict({"method": "gblm", "pattern": "2:4", "gradient_weight": 10.0})
    assert isinstance(cfg, GBLMConfig) and config_from_dict(cfg.to_dict()) == cfg
