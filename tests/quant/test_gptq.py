import logging

import pytest
import torch

from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.grid import code_range, dequantize
from compress.quant.gptq import gptq_solve
from compress.quant.rtn import rtn_solve, weighted_error


def _layer(rows=48, cols=96, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3, cols)   # correlated, uneven
    w = torch.randn(rows, cols, generator=g) * 0.1
    return w, 2 * x.T @ x / tokens


CASES = [
    dict(bits=4, group_size=32, symmetric=True, act_order=True),
    dict(bits=4, group_size=32, symmetric=True, act_order=False),
    dict(bits=4, group_size=32, symmetric=False, act_order=True, observer="minmax"),
    dict(bits=3, group_size=None, symmetric=True, act_order=True),
    dict(bits=2, group_size=16, symmetric=False, act_order=False),
    dict(bits=8, group_size=None, symmetric=True, act_order=False),
    dict(bits=4, group_size=40, symmetric=True, act_order=True, partial_groups=True),   # 96 = 2*40 + 16
    dict(bits=4, group_size=40, symmetric=False, act_order=False, partial_groups=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gptq_beats_round_to_nearest_on_the_same_layer(case):
    w, h = _layer()
    cfg = GPTQConfig(**case)
    rtn_cfg = RTNConfig(**{**{k: v for k, v in case.items() if k != "act_order"}, "observer": cfg.observer})
    gptq = gptq_solve(h, w, cfg, torch.float32)
    rtn = rtn_solve(w, rtn_cfg, torch.float32, h.diagonal())
    assert gptq.fallback is None
    assert weighted_error(w, gptq.weight, h) < 0.9 * weighted_error(w, rtn.weight, h)


@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_result_is_on_the_grid_it_claims(case):
    w, h = _layer(seed=3)
    cfg = GPTQConfig(**case)
    r = gptq_solve(h, w, cfg, torch.bfloat16)
    lo, hi = code_range(cfg.bits)
    assert r.codes.min() >= lo and r.codes.max() <= hi
    assert torch.equal(r.scale, r.scale.to(torch.bfloat16).float())          # exact in storage dtype
    assert torch.equal(dequantize(r.codes, r.scale, r.zero_point, cfg.group_size, torch.float32), r.weight)
    assert (r.zero_point is None) == cfg.symmetric


def test_dead_inputs_zero_their_columns():
    w, h = _layer()
    h[7, :] = 0
    h[:, 7] = 0
    r = gptq_solve(h, w, GPTQConfig(group_size=32), torch.float32)
    assert torch.all(r.weight[:, 7] == 0)


def test_rank_deficient_hessian_still_solves():
    w, _ = _layer(cols=64)
    x = torch.randn(16, 64)                      # 16 tokens: H has rank 16 of 64
    r = gptq_solve(2 * x.T @ x / 16, w, GPTQConfig(group_size=32), torch.float32)
    assert r.fallback is None and torch.isfinite(r.weight).all()


def test_failed_cholesky_escalates_then_falls_back(caplog):
    w, _ = _layer(cols=32)
    h = -torch.eye(32)                           # no damping makes this positive definite
    r = gptq_solve(h, w, GPTQConfig(group_size=16), torch.float32)
    assert r.fallback is not None and "round-to-nearest" in r.fallback
    rtn = rtn_solve(w, RTNConfig(group_size=16, observer="mse"), torch.float32, h.diagonal().clamp(min=0))
    assert torch.equal(r.codes, rtn.codes)


def test_damping_escalates_when_needed(caplog):
    w, h = _layer(cols=32)
    h = h - torch.eye(32) * (h.diagonal().mean() * 0.05)    # indefinite by a little: 1% damping is not enough
    with caplog.at_level(logging.INFO):
        r = gptq_solve(h, w, GPTQConfig(group_size=16, damp=0.01), torch.float32)
    assert r.fallback is None and r.damp > 0.01


def test_non_finite_hessian_is_refused():
    w, h = _layer(cols=32)
    h[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf/NaN"):
        gptq_solve(h, w, GPTQConfig(group_size=16), torch.float32)


@pytest.mark.parametrize("case", CASES[:5] + CASES[6:], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_a_fixed_mask_keeps_pruned_weights_exactly_zero_and_still_beats_rtn(case):
    from compress.pruning.masks import check_nm, nm_mask
    w, h = _layer()
    keep = nm_mask(w.abs() * h.diagonal().sqrt(), 2, 4)                 # a 2:4 model's mask
    pruned = w * keep
    cfg = GPTQConfig(**case)
    result = gptq_solve(h, pruned, cfg, torch.float32, keep=keep)
    assert torch.equal(result.weight[~keep], torch.zeros(int((~keep).sum())))
    assert check_nm(result.weight, 2, 4)
    # The codes of the pruned weights dequantize to zero through the stored scales and zero points.
    deq = dequantize(result.codes, result.scale, result.zero_point, cfg.group_size, torch.float32)
    assert torch.equal(deq[~keep], torch.zeros(int((~keep).sum())))
    rtn_cfg = RTNConfig(**{**{k: v for k, v in case.items() if k != "act_order"}, "observer": cfg.observer})
    rtn = rtn_solve(pruned, rtn_cfg, torch.float32, h.diagonal())         # RTN keeps zeros by itself
    # Half the positions are pinned to zero, so less is left to compensate with than in a dense layer.
    assert weighted_error(pruned, result.weight, h) < 0.97 * weighted_error(pruned, rtn.weight, h)
    # Negative control: without the mask the error feedback fills pruned positions in (on the coarse
    # 2- and 3-bit grids, what it puts there may all round back to zero).
    free = gptq_solve(h, pruned, cfg, torch.float32)
    assert (free.weight[~keep] != 0).any() or case["bits"] < 4


def test_gptq_pass_keeps_a_pruned_models_2of4_unless_told_not_to():
    import copy

    import compress
    from compress.data import CalibrationData
    from compress.modeling import find_decoder_layers
    from compress.pruning.masks import check_nm
    from conftest import tiny_model
    model = tiny_model("llama")
    calib = CalibrationData(torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1)),
                            "random", 0)
    compress.prune(model, compress.WandaConfig(pattern="2:4"), calib, progress=False)
    for keep, expect in ((True, True), (False, False)):
        q = copy.deepcopy(model)
        compress.quantize(q, GPTQConfig(bits=4, group_size=32, keep_sparsity=keep), calib, progress=False)
        linears = [m for m in find_decoder_layers(q)[1].modules() if hasattr(m, "dequantize")]
        assert linears and all(check_nm(m.dequantize(torch.float32), 2, 4) for m in linears) is expect
