"""H2O eviction (compress.kv.h2o): a budget that holds everything is exactly the plain cache; a
budget keeps at most that many tokens, the recent window and the heavy hitters (the argmax of the
accumulated attention, checked against a direct simulation); heavy hitters beat a recent-only
window; it composes with int4; bad configs are refused."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from compress.cli import _kv_config, _parser
from compress.errors import ConfigError
from compress.kv import kv_cache
from compress.kv.config import KVCacheConfig
from compress.kv.h2o import H2OCache, H2OLayer, eager_attention
from conftest import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "qwen2"]
INT4 = dict(scheme="int4", group_size=4, residual_length=0)


def _ids(batch=2, length=40, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, cache, chunk=1, after_step=None):
    out = []
    for s in range(0, ids.shape[1], chunk):
        out.append(model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits)
        if after_step:
            after_step(cache)
    return torch.cat(out, dim=1)


def _eager(arch):
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("budget", [1.0, 1000])
@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_budget_holding_everything_is_exactly_the_plain_cache(arch, chunk, budget):
    model, ids = _eager(arch), _ids()
    ref = _logits(model, ids, DynamicCache(config=model.config), chunk)
    cache = kv_cache(model, KVCacheConfig("none", h2o_budget=budget))
    assert isinstance(cache, H2OCache)
    assert torch.equal(_logits(model, ids, cache, chunk), ref)
    assert cache.layers[0].keys.shape[2] == ids.shape[1]
    # negative control: a real budget changes the logits
    small = _logits(model, ids, kv_cache(model, KVCacheConfig("none", h2o_budget=8)), chunk)
    assert not torch.allclose(small, ref, atol=1e-3)


@pytest.mark.parametrize("budget,recent", [(8, 0.5), (0.25, 0.5), (6, 1.0), (5, 0.0)])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_cache_never_holds_more_than_the_budget_and_keeps_the_recent_window(arch, chunk, budget, recent):
    model, ids = tiny_model(arch), _ids(length=30)
    cfg = KVCacheConfig("none", h2o_budget=budget, h2o_recent=recent)
    steps = []

    def check(cache):
        for layer in cache.layers:
            heavy, rec = cfg.h2o_kept(layer.seen)
            b, h, n, _ = layer.keys.shape
            assert n <= heavy + rec
            assert n == min(layer.seen, heavy + rec)
            newest = torch.arange(layer.seen - rec, layer.seen).expand(b, h, rec)
            assert torch.equal(layer.pos[:, :, n - rec:], newest)               # the recent window is kept
            assert bool((layer.pos[:, :, 1:] > layer.pos[:, :, :-1]).all())     # in position order
        steps.append(cache.layers[0].keys.shape[2])

    _logits(model, ids, kv_cache(model, cfg), chunk, after_step=check)
    assert max(steps) < ids.shape[1]                                            # something was evicted


def _simulate(queries, keys, values, heavy, recent, scaling):
    """Direct H2O on one head, token by token, in plain Python sets: the kept positions after each step."""
    kept, score, history = [], {}, []
    for t in range(keys.shape[0]):
        kept.append(t)
        score[t] = 0.0
        probs = torch.softmax((keys[kept] @ queries[t]).float() * scaling, dim=0)
        for p, pr in zip(kept, probs.tolist()):
            score[p] += pr
        while len(kept) > heavy + recent:
            old = kept[:len(kept) - recent]
            kept.remove(min(old, key=lambda p: score[p]))                     # evict the lowest accumulated
        history.append(sorted(kept))
    return history


def test_heavy_hitters_kept_are_the_argmax_of_accumulated_attention():
    torch.manual_seed(0)
    t, d = 40, 16
    q, k, v = (torch.randn(1, 1, t, d, dtype=torch.float64) * 2 for _ in range(3))
    cfg = KVCacheConfig("none", h2o_budget=10, h2o_recent=0.3)
    heavy, recent = cfg.h2o_kept(t)
    assert (heavy, recent) == (7, 3)
    expected = _simulate(q[0, 0], k[0, 0], v[0, 0], heavy, recent, d ** -0.5)
    layer = H2OLayer(cfg)
    for i in range(t):
        view, _ = layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
        _, probs = eager_attention(q[:, :, i:i + 1], view.keys, view.values, None, d ** -0.5)
        layer.observe(probs)
        assert layer.pos[0, 0].tolist() == expected[i]
    # and the scores kept are the accumulated attention of those tokens
    assert torch.all(layer.score[0, 0, :heavy] >= 0)


def test_gqa_scores_sum_over_the_query_heads_of_a_group():
    layer = H2OLayer(KVCacheConfig("none", h2o_budget=100))
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, k)
    probs = torch.rand(1, 4, 5, 5)                                       # (B, Hq, q, N), 2 query heads per KV head
    layer.observe(probs)
    expected = probs.sum(2).reshape(1, 2, 2, 5).sum(2)
    assert torch.allclose(layer.score, expected)


def _needle(t=48, d=16, seed=0):
    """Token 0 is a heavy hitter: every query attends to it strongly and its value is what the
    outputs are made of; the other keys are noise."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, t, d, generator=g) * 0.3
    v = torch.randn(1, 1, t, d, generator=g) * 0.1
    q = torch.randn(1, 1, t, d, generator=g) * 0.3
    k[..., 0, :] = 3.0
    q += 0.5                                       # q . k0 ~ 24, scaled 6: token 0 takes most of the attention
    v[..., 0, :] = 5.0
    return q, k, v


def _decode_error(cfg, q, k, v):
    layer, err = H2OLayer(cfg), 0.0
    d = q.shape[-1]
    for i in range(q.shape[2]):
        view, _ = layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
        out, probs = eager_attention(q[:, :, i:i + 1], view.keys, view.values, None, d ** -0.5)
        full, _ = eager_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], None, d ** -0.5)
        layer.observe(probs)
        err += float((out - full).pow(2).sum())
    return err


def test_h2o_beats_a_recent_window_of_the_same_budget_when_a_heavy_hitter_matters():
    q, k, v = _needle()
    h2o = _decode_error(KVCacheConfig("none", h2o_budget=8), q, k, v)
    recent = _decode_error(KVCacheConfig("none", h2o_budget=8, h2o_recent=1.0), q, k, v)
    assert h2o < 0.1 * recent


@pytest.mark.parametrize("arch", ARCHS)
def test_h2o_is_closer_to_the_full_cache_than_a_recent_window_on_a_tiny_model(arch):
    model, ids = _eager(arch), _ids(length=48)
    ref = _logits(model, ids, DynamicCache(config=model.config))
    err = {}
    for recent in (0.5, 1.0):
        out = _logits(model, ids, kv_cache(model, KVCacheConfig("none", h2o_budget=0.25, h2o_recent=recent)))
        err[recent] = float((out - ref).pow(2).mean())
    assert err[0.5] < err[1.0]


@pytest.mark.parametrize("arch", ARCHS)
def test_composes_with_int4(arch):
    model, ids = _eager(arch), _ids()
    # everything kept: H2O on int4 is the int4 cache (dequantize + SDPA vs eager: rounding only)
    full = _logits(model, ids, kv_cache(model, KVCacheConfig(**INT4), backend="torch"))
    h2o = kv_cache(model, KVCacheConfig(**INT4, h2o_budget=1.0))
    assert torch.allclose(_logits(model, ids, h2o), full, atol=1e-4)
    # a budget: kept tokens are quantized (all but the unfinished key block), bytes shrink with the budget
    small = kv_cache(model, KVCacheConfig(**INT4, h2o_budget=0.25))
    small_fp = kv_cache(model, KVCacheConfig("none", h2o_budget=0.25))
    out = _logits(model, ids, small)
    fp = _logits(model, ids, small_fp)
    assert not torch.allclose(out, fp, atol=1e-4)                             # really quantized
    layer = small.layers[0]
    assert layer.keys.shape[2] == 10
    assert int(layer.quantized.sum()) > 0
    # bytes: per kept quantized token its codes (2 x 16 x 4 bits) and value scales (4 groups x fp16 scale
    # + min), per key block still holding a kept token 16 channels x (scale + min), arrivals waiting in bf16
    kept_blocks = sum(len({int(p) // 4 for p, q in zip(layer.pos[b, h], layer.quantized[b, h]) if q})
                      for b in range(2) for h in range(2))
    assert layer.memory()["quantized"] == int(layer.quantized.sum()) * (16 + 16) + kept_blocks * 16 * 4
    assert layer.memory()["window"] == 2 * layer.stage_k.numel() * 2
    plain = kv_cache(model, KVCacheConfig(**INT4), backend="torch")
    _logits(model, ids, plain)
    held = small.memory()["quantized"] + small.memory()["window"]
    assert held < plain.memory()["quantized"] + plain.memory()["window"]
    assert small_fp.memory()["bytes_per_token_per_layer"] == pytest.approx(0.25 * 2 * 2 * 16 * 2, rel=0.01)


@pytest.mark.parametrize("bad,match", [
    (dict(h2o_budget=0), ">= 1 token"),
    (dict(h2o_budget=0.0), r"in \(0, 1\]"),
    (dict(h2o_budget=-0.2), r"in \(0, 1\]"),
    (dict(h2o_budget=1.5), "give an integer"),
    (dict(h2o_budget=0.2, h2o_recent=1.5), "h2o_recent"),
    (dict(h2o_budget=0.2, h2o_recent=-0.1), "h2o_recent"),
    (dict(h2o_budget=True), "fraction"),
    (dict(scheme="none"), "set h2o_budget"),
    (dict(h2o_budget=0.2, sink_tokens=4), "sink_tokens"),
    (dict(h2o_budget=0.2, scheme="fp8"), "fp8"),
])
def test_bad_configs_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        KVCacheConfig(**{"scheme": "int4", **bad})


def test_recipe_keys_round_trip_and_reject_bad_values():
    cfg = KVCacheConfig.from_dict({"scheme": "int4", "residual_length": 0, "h2o_budget": 0.2, "h2o_recent": 0.5})
    assert KVCacheConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(KVCacheConfig.from_dict({"scheme": "none", "h2o_budget": 64}).h2o_budget, int)
    with pytest.raises(ConfigError, match="h2o_budget"):
        KVCacheConfig.from_dict({"scheme": "none", "h2o_budget": 2.5})


def test_without_the_h2o_attention_the_cache_refuses_to_run_blind():
    model = tiny_model("llama")
    cache = H2OCache(model.config, KVCacheConfig("none", h2o_budget=4))      # not via kv_cache: attention unchanged
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        with pytest.raises(ConfigError, match="compress_h2o"):
            _logits(model, _ids(length=3), cache)


def test_sliding_window_models_are_refused():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    if "sliding_attention" not in (model.config.layer_types or []):
        pytest.skip("this transformers builds no sliding layers for Qwen2")
    with pytest.raises(ConfigError, match="full_attention layers only"):
        kv_cache(model, KVCacheConfig("none", h2o_budget=0.2))


def test_cli_flags_build_the_config():

    args = _parser().parse_args(["eval", "m", "--data", "x.txt", "--kv-h2o", "0.2", "--kv-h2o-recent", "1"])
    cfg = _kv_config(args)
    assert cfg.scheme == "none" and cfg.h2o_budget == 0.2 and cfg.h2o_recent == 1.0
    args = _parser().parse_args(["eval", "m", "--data", "x.txt", "--kv-cache", "int4", "--kv-h2o", "64"])
    cfg = _kv_config(args)
    assert cfg.scheme == "int4" and cfg.h2o_budget == 64 and isinstance(cfg.h2o_budget, int)
