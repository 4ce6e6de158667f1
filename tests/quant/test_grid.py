import pytest
import torch

from compress.errors import ConfigError
from compress.formats import check_group_size
from compress.quant.grid import code_range, compute_qparams, dequantize, quantize


def _roundtrip(w, bits, group_size, symmetric, observer="minmax", dtype=torch.float32, col_weight=None):
    scale, zp = compute_qparams(w, bits, group_size, symmetric, dtype, observer, col_weight)
    q = quantize(w, scale, zp, bits, group_size)
    return q, scale, zp, dequantize(q, scale, None if symmetric else zp, group_size, torch.float32)


def test_symmetric_maps_amax_onto_the_top_code():
    w = torch.tensor([[0.5, -1.4, 0.7, 0.0]])
    q, scale, zp, deq = _roundtrip(w, 4, None, True)
    assert scale.item() == pytest.approx(1.4 / 7)
    assert q.tolist() == [[2, -7, 4, 0]] and zp.item() == 0


def test_asymmetric_covers_min_and_max_exactly():
    w = torch.tensor([[0.2, 1.7, 0.9, 0.4]])          # min clamps to 0: the grid must include zero
    q, scale, zp, deq = _roundtrip(w, 4, None, False)
    lo, hi = code_range(4)
    assert q.min() >= lo and q.max() <= hi
    assert deq[0, 1].item() == pytest.approx(1.7, rel=1e-6)
    assert (deq - w).abs().max() <= scale.item() / 2 + 1e-7


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_gives_zero_codes_not_nan(symmetric):
    w = torch.zeros(3, 8)
    w[0, :4] = torch.tensor([1.0, -2.0, 0.5, 0.25])
    q, scale, zp, deq = _roundtrip(w, 4, 4, symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(deq[1:], torch.zeros(2, 8)) and torch.equal(deq[0, 4:], torch.zeros(4))


def test_partial_last_group():
    w = torch.randn(4, 10)
    q, scale, zp, deq = _roundtrip(w, 4, 4, True)
    assert scale.shape == (4, 3) and q.shape == (4, 10)
    # The last group (columns 8, 9) has its own scale, fitted to those two columns only.
    assert torch.allclose(scale[:, 2], w[:, 8:].abs().amax(dim=1) / 7)


def test_scales_are_exact_in_the_storage_dtype():
    w = torch.randn(16, 64)
    scale, _ = compute_qparams(w, 4, 32, True, torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_never_loses_to_minmax(symmetric):
    w = torch.randn(64, 128) * torch.rand(64, 1)
    w[:, 5] *= 8                                          # outliers make clipping worthwhile
    err = {obs: (_roundtrip(w, 3, 32, symmetric, obs)[3] - w).pow(2).sum() for obs in ("minmax", "mse")}
    assert err["mse"] < err["minmax"]


def test_mse_observer_uses_column_weights():
    w = torch.randn(32, 64)
    cw = torch.ones(64)
    cw[:8] = 100.0                                        # the first columns matter most
    plain = _roundtrip(w, 3, 64, True, "mse")[3]
    weighted = _roundtrip(w, 3, 64, True, "mse", col_weight=cw)[3]
    def werr(d): return ((d - w).pow(2) * cw).sum()
    assert werr(weighted) <= werr(plain)


def test_indivisible_group_size_error_names_layer_and_fixes():
    with pytest.raises(ConfigError) as info:
        check_group_size("model.layers.0.mlp.down_proj", 576, 128, partial_groups=False)
    msg = str(info.value)
    assert "576" in msg and "model.layers.0.mlp.down_proj" in msg and "group_size=64" in msg
    assert "partial_groups" in msg
    check_group_size("x", 576, 128, partial_groups=True)  # allowed when asked for
    check_group_size("x", 576, 64, partial_groups=False)
