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
