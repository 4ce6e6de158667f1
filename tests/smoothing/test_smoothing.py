"""The defining properties of SmoothQuant and AWQ, the engine paths, configs and recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress
from compress.configs import config_from_dict
from compress.errors import ConfigError
from compress.quant.config import RTNConfig
from compress.recipe import load_recipe
from compress.smoothing import AWQConfig, SmoothQuantConfig
from compress.smoothing import awq, smoothquant
from compress.structure import prepare_model
from test_families import IDS, build, calib

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _outlier_layer(seed=0, tokens=512, n=64, out=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, :4] *= 40.0                                   # a few systematic outlier channels (as in LLMs)
    w = torch.randn(out, n, generator=g) * 0.05
    return x, w


def _outlier_model(family="mistral", seed=0):
    model = build(family, seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :4] *= 30.0
    prepare_model(model)
    return model


def test_smoothquant_lowers_the_w8a8_error_and_the_outlier_ratio():
    x, w = _outlier_layer()
    s = smoothquant.smoothquant_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    plain = smoothquant.w8a8_error(x, w, torch.ones(64), "w8a8-int8")
    smoothed = smoothquant.w8a8_error(x, w, s, "w8a8-int8")
    assert smoothed < 0.5 * plain
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).median())      # noqa: E731
    assert ratio(x / s) < 0.25 * ratio(x)
    # alpha = 0 with equal weight ranges is no smoothing at all: the same error (negative control)
    flat = smoothquant.smoothquant_scales(x.abs().amax(0), torch.ones(64), 0.0)
    assert smoothquant.w8a8_error(x, w, flat, "w8a8-int8") == pytest.approx(plain)
    assert smoothquant.w8a8_error(x, w, s, "fp8") < smoothquant.w8a8_error(x, w, torch.ones(64), "fp8")


def test_awq_search_includes_s_equal_1_and_never_does_worse():
    x, w = _outlier_layer(tokens=256)
    h = x.T @ x / x.shape[0]
    q = awq.weight_quantizer(4, 32, True, 64)
    a, s, before, after = awq.search_scale(x.abs().mean(0), w, h, q, 32, grid=20)
    assert after <= before and a is not None and not torch.equal(s, torch.ones(64))
    # the Hessian shortcut is the mean squared output error over the tokens
    direct = float(((x / s) @ (q(w * s)).T - x @ w.T).pow(2).mean())
    assert after == pytest.approx(direct, rel=1e-3)
    # a 0-point grid can only return s = 1
    a0, s0, b0, l0 = awq.search_scale(x.abs().mean(0), w, h, q, 32, grid=0)
    assert a0 is None and l0 == b0 and torch.equal(s0, torch.ones(64))


def test_awq_clipping_lowers_the_per_group_error():
    x, w = _outlier_layer(tokens=256)
    w[0, 5] = 2.0                                       # one large weight: clipping pays off around it
    q = awq.weight_quantizer(4, 32, True, 64)
    clipped, before, after = awq.search_clip(w, x.T @ x / 256, q, 32, grid=20, max_shrink=0.5)
    assert after < before and clipped.abs().max() <= w.abs().max()


def _logit_error(model, ref):
    with torch.no_grad():
        return float((model(IDS).logits - ref).pow(2).mean())


def test_awq_then_rtn_int4_beats_rtn_int4_on_a_model_with_outlier_channels():
    ref_model = _outlier_model()
    with torch.no_grad():
        ref = ref_model(IDS).logits
    rtn = _outlier_model()
    compress.quantize(rtn, RTNConfig(bits=4, group_size=32), progress=False)
    smoothed = _outlier_model()
    records = compress.quantize(smoothed, AWQConfig(group_size=32), calib(8), progress=False)
    scaled = [r for r in records.values() if "loss_after" in r]
    assert scaled and all(r["loss_after"] <= r["loss_before"] for r in scaled)
    assert any(r["alpha"] is not None for r in scaled)
    clipped = [r for r in records.values() if "clip_loss_after" in r]
    assert clipped and not any(n.endswith(("q_proj", "k_proj")) for n, r in records.items() if "clip_loss_after" in r)
    compress.quantize(smoothed, RTNConfig(bits=4, group_size=32), progress=False)
    assert _logit_error(smoothed, ref) < _logit_error(rtn, ref)


def test_smoothquant_search_records_an_alpha_from_the_grid_per_layer_and_mapping():
    model = _outlier_model("qwen3_moe")
    records = compress.quantize(model, SmoothQuantConfig(alpha=None, alphas=[0.3, 0.6, 0.9]), calib(8),
                                progress=False)
    norms = {n: r for n, r in records.items() if "loss_after" in r}
    assert set(norms) == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("input_layernorm",
                                                                          "post_attention_layernorm")}
    for r in norms.values():
        assert r["alpha"] in (0.3, 0.6, 0.9) and r["loss_after"] <= r["loss_before"]
    mlp = norms["model.layers.0.post_attention_layernorm"]["consumers"]
    assert "mlp.gate" in mlp and "mlp.experts.7.up_proj" in mlp       # router and every expert take the fold


def test_one_pass_and_chunked_engine_paths_agree():
    a, b = _outlier_model(), _outlier_model()
    compress.quantize(a, AWQConfig(group_size=32), calib(8), progress=False)
    compress.quantize(b, AWQConfig(group_size=32), calib(8), batch_size=3, progress=False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_configs_validate_and_round_trip():
    for cfg in (SmoothQuantConfig(alpha=None, smooth_linears=True), AWQConfig(bits=3, group_size=64)):
        assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="max_shrink"):
        AWQConfig(max_shrink=1.0)
    with pytest.raises(ConfigError, match="unknown key 'alpah'"):
        config_from_dict({"method": "smoothquant", "alpah": 0.5})
    with pytest.raises(ConfigError, match="calibration data"):
        compress.quantize(build("mistral"), AWQConfig(), progress=False)


@pytest.mark.parametrize("name, methods", [("smollm2-w8a8-int8-sq-gptq.yaml", ["smoothquant", "gptq"]),
                                           ("smollm2-w4g64-awq-gptq.yaml", ["awq", "gptq"])])
def test_the_recipes_parse(name, methods):
    try:
        recipe = load_recipe(RECIPES / name)
    except ConfigError as exc:          # the W8A8 schemes land with part 1 of issue 18
        if "w8a8-int8" in name and "scheme" in str(exc):
            pytest.skip(f"GPTQ has no scheme w8a8-int8 yet: {exc}")
        raise
    assert [p.method for p in recipe.passes] == methods


@pytest.mark.parametrize("spelling, args", [("int4-g32", (4, 32, True)), ("int3-g32-asym", (3, 32, False)),
                                            ("int8", (8, None, True))])
def test_the_search_quantizer_is_the_formats_grid(spelling, args):
    from compress.formats import WeightFormat
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    grid = WeightFormat.parse(spelling).solver_grid(torch.float32, "minmax")
    assert torch.equal(awq.weight_quantizer(*args, 96)(w), grid.quantize(w, grid.fit(w, None))[1])
