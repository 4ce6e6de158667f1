"""DSnoT: the swaps lower the layer reconstruction error of the Wanda mask they start from, with
exactly the same sparsity per row and the same N:M pattern; whole tiny models; bad configs."""

import pytest
import torch

import compress
from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.pruning.dsnot import DSnoTConfig, MomentStats, dsnot_refine
from compress.pruning.masks import check_nm, nm_mask, unstructured_mask
from conftest import tiny_model

SETTINGS = [(0.6, None), (0.7, None), (0.5, (2, 4))]


def _layer(rows=48, cols=128, tokens=1024, seed=0):
    """Features of uneven scale and nonzero mean, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scales = torch.exp(torch.randn(cols, generator=g) * 0.8)
    x = (torch.randn(tokens, cols, generator=g) + torch.randn(cols, generator=g)) * scales
    stats = MomentStats(cols)
    stats.add(x)
    return w, x, stats


def _error(w, keep, x):
    return float(((w * ~keep) @ x.T).square().sum() / (w @ x.T).square().sum())


def _wanda_mask(w, stats, sparsity, nm):
    score = w.abs() * stats.diag.sqrt()
    return nm_mask(score, *nm) if nm else unstructured_mask(score, sparsity)


def test_moment_stats_match_direct_mean_and_variance():
    _, x, stats = _layer()
    stats2 = MomentStats(x.shape[1])
    for chunk in x.split(100):
        stats2.add(chunk)
    assert torch.allclose(stats2.mean, x.mean(0), atol=1e-4)
    assert torch.allclose(stats2.var, x.var(0, unbiased=False), rtol=1e-3, atol=1e-4)
    assert torch.allclose(stats2.diag, 2 * x.square().mean(0), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity,nm", SETTINGS)
def test_swaps_lower_reconstruction_error_of_the_wanda_mask(sparsity, nm, seed):
    w, x, stats = _layer(seed=seed)
    wanda = _wanda_mask(w, stats, sparsity, nm)
    keep, swaps = dsnot_refine(w, wanda, stats.mean, stats.var, stats.diag / 2, nm=nm)
    assert swaps > 0 and not torch.equal(keep, wanda)                       # it really changed the mask
    assert _error(w, keep, x) < 0.95 * _error(w, wanda, x)
    assert torch.equal(keep.sum(1), wanda.sum(1))                           # same sparsity per row
    if nm:
        groups = keep.reshape(keep.shape[0], -1, nm[1]).sum(2)
        assert (groups == nm[0]).all() and check_nm(w * keep, *nm)


def test_no_cycles_is_the_initial_mask():
    w, _, stats = _layer()
    wanda = _wanda_mask(w, stats, 0.6, None)
    keep, swaps = dsnot_refine(w, wanda, stats.mean, stats.var, stats.diag / 2, max_cycles=0)
    assert swaps == 0 and torch.equal(keep, wanda)


@pytest.mark.parametrize("arch,pattern", [("llama", None), ("llama", "2:4"), ("qwen2", "2:4"), ("opt", None)])
def test_model_keeps_wandas_sparsity_and_lowers_first_layer_error(arch, pattern, calib_ids):
    reference = tiny_model(arch)
    with torch.no_grad():                                   # uneven features with nonzero means
        emb = reference.get_input_embeddings().weight
        emb[:, :8] = emb[:, :8] * 8 + 2
    inputs = {}
    first = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n}

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])         # (tokens, in)
        return hook
    hooks = [m.register_forward_pre_hook(keep_input(n)) for n, m in first.items()]
    with torch.no_grad():
        reference(input_ids=calib_ids)
    for h in hooks:
        h.remove()
    calib = CalibrationData(calib_ids, "ids", 0)
    pruned = {}
    for cfg in (compress.WandaConfig(sparsity=0.6 if pattern is None else None, pattern=pattern),
                DSnoTConfig(sparsity=0.6 if pattern is None else None, pattern=pattern, update_threshold=0.0)):
        model = tiny_model(arch)
        model.load_state_dict(reference.state_dict())
        compress.prune(model, cfg, calib, progress=False)
        pruned[cfg.method] = dict(model.named_modules())
    changed, errors = 0, {"wanda": 0.0, "dsnot": 0.0}
    for name, module in reference.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        wd, ws = pruned["wanda"][name].weight, pruned["dsnot"][name].weight
        assert torch.equal((wd == 0).sum(1), (ws == 0).sum(1)), name    # same zeros per row
        if pattern:
            assert check_nm(ws, 2, 4), name
        changed += not torch.equal(wd == 0, ws == 0)
        if name in inputs and "self_attn" in name and "o_proj" not in name and "out_proj" not in name:
            x = inputs[name]                                    # layer 0's attention input: same for both
            for method, w in (("wanda", wd), ("dsnot", ws)):
                errors[method] += float(((module.weight.detach() - w.detach()) @ x.T).square().sum())
    assert changed > 0
    assert errors["dsnot"] < errors["wanda"], errors


@pytest.mark.parametrize("bad,field", [({"initial": "sparsegpt"}, "initial"), ({"max_cycles": -1}, "max_cycles"),
                                       ({"update_threshold": -0.1}, "update_threshold"),
                                       ({"sparsity": 1.2}, "sparsity"), ({"cycles": 3}, "cycles")])
def test_bad_configs_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"method": "dsnot", **bad})


def test_needs_calibration_data():
    with pytest.raises(ConfigError, match="calibration data"):
        compress.prune(tiny_model("llama"), DSnoTConfig(), None, progress=False)


def test_recipe_round_trip():
    cfg = config_from_dict({"method": "dsnot", "pattern": "2:4", "initial": "magnitude", "max_cycles": 10})
    assert isinstance(cfg, DSnoTConfig) and cfg.initial == "magnitude" and cfg.max_cycles == 10
    assert config_from_dict(cfg.to_dict()) == cfg
