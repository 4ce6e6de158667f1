"""Sensitivity: Fisher weights, per-unit costs that order formats and predict the real loss change, the cache."""

import copy

import pytest
import torch

import compress
from compress.data import CalibrationData
from compress.evaluation import perplexity_through_cache
from compress.formats import WeightFormat
from compress.plan import sensitivity as sens_module
from compress.plan.cost import model_shape
from compress.plan.sensitivity import fisher_diagonals, kv_option_config, measure_kv_sensitivity, measure_sensitivity
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ["int8", "int4-g32", "int3-g32-asym", "int2-g32-asym"]


@pytest.fixture
def trained():
    """A tiny Llama whose weights carry structure (a few steps on repeated text) so that
    quantization changes its loss measurably."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(0, 64, (16, 32))
    ids = torch.cat([ids, ids], dim=1)                      # a copy task: the model can learn something
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, CalibrationData(ids, "ids", 0)


def _nll(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_fisher_is_positive_and_matches_a_manual_gradient(trained):
    model, calib = trained
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    flags = [p.requires_grad for p in model.parameters()]
    fisher, base = fisher_diagonals(model, calib.input_ids[:2], names, progress=False)
    assert fisher[names[0]].shape == (64,) and (fisher[names[0]] > 0).all()
    assert base == pytest.approx(_nll(model, calib.input_ids[:2]), rel=1e-4)
    # by hand: the gradient of the summed NLL w.r.t. the down_proj output, one window
    out = {}
    h = model.get_submodule(names[0]).register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    try:
        ids = calib.input_ids[:1]
        with torch.enable_grad():
            logits = model(input_ids=ids).logits
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            (g,) = torch.autograd.grad(nll, out["y"])
    finally:
        h.remove()
    one, _ = fisher_diagonals(model, calib.input_ids[:1], names[:1], progress=False)
    torch.testing.assert_close(one[names[0]], g[0].pow(2).sum(0) / (ids.shape[1] - 1), rtol=1e-4, atol=1e-12)
    assert [p.requires_grad for p in model.parameters()] == flags        # flags restored


def test_fewer_bits_cost_more_for_every_unit_and_predict_the_real_change(trained, tmp_path):
    model, calib = trained
    shape = model_shape(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure_sensitivity(model, shape, calib, FORMATS, model_id="tiny", cache=tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the probe changes nothing
    for unit in shape.units:
        costs = [sens.dloss[f][unit.name] for f in FORMATS]
        assert costs == sorted(costs), (unit.name, costs)
        assert costs[-1] > 0
    # the most and least sensitive units at 2 bits: quantizing each alone moves the real loss in that order
    ranked = sorted(shape.units, key=lambda u: sens.dloss["int2-g32-asym"][u.name])
    base = _nll(model, calib.input_ids)
    real = {}
    for unit in (ranked[0], ranked[-1]):
        m = copy.deepcopy(model)
        cfg = compress.GPTQConfig(bits=2, group_size=32, symmetric=False,
                                  ignore=["re:^(?!" + "|".join(n for n, *_ in unit.members).replace(".", "\\.") + "$)"])
        compress.quantize(m, cfg, calib=calib, progress=False)
        real[unit.name] = _nll(m, calib.input_ids) - base
    assert real[ranked[-1].name] > real[ranked[0].name]
    total = sum(sens.dloss["int2-g32-asym"].values())
    assert total > 0 and sens.base_loss == pytest.approx(_nll(model, calib.input_ids[:16]), rel=1e-3)


def test_the_cache_serves_known_formats_and_measures_only_new_ones(trained, tmp_path, monkeypatch):
    model, calib = trained
    shape = model_shape(model)
    first = measure_sensitivity(model, shape, calib, ["int4-g32"], model_id="tiny", cache=tmp_path, progress=False)
    calls = []
    real = sens_module.run_layerwise
    monkeypatch.setattr(sens_module, "run_layerwise", lambda *a, **k: (calls.append(a[2].formats), real(*a, **k)))
    again = measure_sensitivity(model, shape, calib, ["int4-g32"], model_id="tiny", cache=tmp_path, progress=False)
    assert calls == [] and again.dloss == first.dloss
    both = measure_sensitivity(model, shape, calib, ["int4-g32", "int8"], model_id="tiny", cache=tmp_path,
                               progress=False)
    assert [[f.name for f in c] for c in calls] == [["int8"]]
    assert both.dloss["int4-g32"] == first.dloss["int4-g32"]
    # another model id (or data) is another cache entry
    measure_sensitivity(model, shape, calib, ["int4-g32"], model_id="other", cache=tmp_path, progress=False)
    assert len(calls) == 2


def test_a_format_that_does_not_fit_a_layer_is_infinite_there(trained, tmp_path):
    model, calib = trained
    shape = model_shape(model)
    sens = measure_sensitivity(model, shape, calib, ["int4-g64"], model_id="tiny", cache=tmp_path, progress=False)
    down = [u.name for u in shape.units if u.name.endswith("down_proj")]
    assert all(sens.dloss["int4-g64"][d] == float("inf") for d in down)    # in_features 160
    assert all(sens.dloss["int4-g64"][u.name] < float("inf") for u in shape.units if u.name not in down)
    assert sens.cost(down[0], WeightFormat.parse("bf16")) == 0.0


def test_kv_sensitivity_measures_decoding_through_each_cache(trained, tmp_path, monkeypatch):
    model, _ = trained
    ids = torch.randint(0, 64, (2, 320), generator=torch.Generator().manual_seed(3))   # past the 128-token window
    kv = measure_kv_sensitivity(model, ids, ["bf16", "int8", "int2"], model_id="tiny", chunk=32,
                                cache=tmp_path, progress=False)
    assert kv["bf16"] == 0.0
    assert abs(kv["int2"]) > 10 * abs(kv["int8"]) > 0          # 2-bit keys and values move the loss far more
    base, n = perplexity_through_cache(model, ids, None, chunk=32, progress=False)
    nll, _ = perplexity_through_cache(model, ids, kv_option_config("int2"), chunk=32, progress=False)
    assert kv["int2"] == pytest.approx((nll - base) / n)
    monkeypatch.setattr(sens_module, "perplexity_through_cache", None)     # cached: nothing recomputed
    assert measure_kv_sensitivity(model, ids, ["int8", "int2"], model_id="tiny", chunk=32, cache=tmp_path,
                                  progress=False) == {"int8": kv["int8"], "int2": kv["int2"]}
