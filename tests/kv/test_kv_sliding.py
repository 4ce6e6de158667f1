"""The quantized KV cache on models with sliding-window layers (tiny Gemma 2 / Gemma 3): sliding
layers keep only their window, quantized like the full layers, and attention, evaluation and
generation agree with transformers' own (float, sliding) cache."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

import compress
from compress.errors import ConfigError
from compress.evaluation import generation_agreement, perplexity_of_windows, perplexity_through_cache
from compress.kv import kv_cache
from compress.kv.cache import QuantizedKVLayer, QuantizedSlidingWindowLayer
from compress.kv.config import KVCacheConfig
from conftest import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
ARCHS = ["gemma2", "gemma3"]
# group_size 4 < WINDOW - 1: sliding layers really store quantized blocks (with 16, an unfinished
# key block would hold their whole window in full precision)
INT4 = KVCacheConfig("int4", group_size=4, residual_length=0)


def tiny_sliding(arch: str, seed: int = 0, **kw):
    """Gemma 2 (eager attention, logit softcapping) or Gemma 3 text (SDPA), 4 layers, window 8."""
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=MIXED,
                  max_position_embeddings=512)
    config.update(kw)
    torch.manual_seed(seed)
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**config)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**config)).eval()


def _ids(batch=2, length=48, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _chunked_logits(model, ids, cache, chunk):
    return torch.cat([model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits
                      for s in range(0, ids.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_layers_follow_the_models_layer_types(arch):
    cache = kv_cache(tiny_sliding(arch), INT4)
    assert cache.is_sliding == [True, False, True, False]
    assert [layer.get_max_length() for layer in cache.layers] == [WINDOW, -1, WINDOW, -1]


@pytest.mark.parametrize("chunk", [1, 5, 48])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_residual_longer_than_the_text_is_exactly_the_float_forward(arch, chunk):
    """Nothing quantized: what is left is the window bookkeeping, which must match transformers'
    sliding mask exactly on a text six windows long, fed in any chunk size."""
    model = tiny_sliding(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    cache = kv_cache(model, KVCacheConfig("int2", group_size=16, residual_length=256))
    assert torch.allclose(_chunked_logits(model, ids, cache, chunk), ref, atol=1e-5)
    assert [layer.keys.shape[2] for layer in cache.layers] == [WINDOW - 1, 48, WINDOW - 1, 48]
    assert cache.get_seq_length() == 48 and all(layer.length == 0 for layer in cache.layers)


def test_sliding_layers_hold_only_their_window_and_reuse_their_buffers():
    model = tiny_sliding("gemma3")
    cache = kv_cache(model, INT4)
    sliding, full = cache.layers[0], cache.layers[1]
    assert isinstance(sliding, QuantizedSlidingWindowLayer) and not isinstance(full, QuantizedSlidingWindowLayer)
    g = INT4.group_size
    with torch.no_grad():
        for n in range(1, 301):                                   # past the first 256-token allocation
            model(input_ids=_ids(1, 1, seed=n), past_key_values=cache, use_cache=True)
            kept = sliding.view().total_length
            assert sliding.get_seq_length() == n == cache.get_seq_length()
            assert min(n, WINDOW - 1) <= kept <= WINDOW - 1 + g - 1
            assert sliding.get_mask_sizes(1) == (min(n, WINDOW - 1) + 1, max(n - WINDOW + 1, 0))
    assert sliding.length - sliding.start > 0                    # the sliding layer really stores quantized tokens
    assert sliding.capacity == 256 < full.capacity               # compacted in place, never grown
    assert cache.memory()["quantized"] > 0
    mem = sliding.memory()
    assert mem["quantized"] == INT4.bytes_per_token(2, 16) * (sliding.length - sliding.start)


@pytest.mark.parametrize("cfg", [INT4, KVCacheConfig("int2", group_size=4, residual_length=4),
                                 KVCacheConfig("fp8", residual_length=2)], ids=lambda c: c.describe())
def test_a_sliding_layer_returns_the_last_window_of_a_full_layer(cfg):
    """Token by token, a full layer and a sliding one flush the same blocks, so what the sliding layer
    returns is exactly the end of what the full one returns, through evictions and compactions."""
    scales = (torch.tensor([0.02]), torch.tensor([0.03])) if cfg.is_fp8 else (None, None)
    full, sliding = QuantizedKVLayer(cfg, *scales), QuantizedSlidingWindowLayer(cfg, WINDOW, *scales)
    g = torch.Generator().manual_seed(0)
    for n in range(1, 301):                                       # past the first 256-token allocation
        k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
        visible, offset = sliding.get_mask_sizes(1)
        assert (visible, offset) == (min(n - 1, WINDOW - 1) + 1, max(n - WINDOW, 0))
        fk, fv = full.update(k, v)
        sk, sv = sliding.update(k, v)
        assert sk.shape[2] == visible and torch.equal(sk, fk[:, :, -visible:]) and torch.equal(sv, fv[:, :, -visible:])
    assert sliding.capacity == 256 and full.capacity == 512 and sliding.get_seq_length() == 300


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_past_changes_the_logits_in_order_of_bits(arch):
    model = tiny_sliding(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for scheme in ("int8", "int4", "int2"):
        cache = kv_cache(model, KVCacheConfig(scheme, group_size=4, residual_length=0))
        errors[scheme] = (_chunked_logits(model, ids, cache, 5) - ref).abs().max().item()
    assert 0 < errors["int8"] < errors["int4"] < errors["int2"]
    assert errors["int8"] < 0.01                                  # int8 is close to float over 6 windows


def test_sliding_layers_are_quantized_too():
    """All layers sliding: whatever the cache changes, it changes in the sliding layers."""
    model = tiny_sliding("gemma3", layer_types=["sliding_attention"] * 4)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    int8 = (_chunked_logits(model, ids, kv_cache(model, KVCacheConfig("int8", group_size=4, residual_length=0)), 4)
            - ref).abs().max()
    int4 = (_chunked_logits(model, ids, kv_cache(model, INT4), 4) - ref).abs().max()
    assert 1e-3 < int4 and 0 < int8 < 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluate_through_an_int4_cache_is_close_to_float(arch, tokenizer, text_file):
    model = tiny_sliding(arch)
    plain = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, progress=False)
    through = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, kv_cache=INT4, kv_chunk=4,
                                progress=False)
    assert through.kv_cache == "int4 g4 window 0" and through.tokens == plain.tokens
    assert through.perplexity != plain.perplexity                               # the cache acted
    assert abs(through.perplexity - plain.perplexity) / plain.perplexity < 0.01
    ids = _ids(2, 40)                                      # transformers' float sliding cache through the same loop
    nll, count = perplexity_through_cache(model, ids, None, chunk=3, progress=False)
    assert (nll, count) == pytest.approx(perplexity_of_windows(model, ids, progress=False), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_past_the_window_matches_the_float_cache(arch):
    model = tiny_sliding(arch)
    prompts = _ids(2, 12, seed=3)                            # 12 + 20 tokens: four windows
    int8 = generation_agreement(model, prompts, KVCacheConfig("int8", group_size=4, residual_length=0),
                                new_tokens=20, progress=False)
    assert int8.teacher_forced == 1.0 and int8.first_divergence == [20, 20]
    int2 = generation_agreement(model, prompts, KVCacheConfig("int2", group_size=4, residual_length=0),
                                new_tokens=20, progress=False)
    assert int2.teacher_forced < 1.0                                            # negative control
    out = model.generate(prompts[:1], past_key_values=kv_cache(model, INT4), max_new_tokens=16, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 28)


def test_fp8_calibrates_and_decodes_on_a_sliding_model(calib_ids):
    model = tiny_sliding("gemma3")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    compress.quantize(model, KVCacheConfig("fp8", fp8_scale="head"), calib=calib_ids, progress=False)
    cache = kv_cache(model)
    err = (_chunked_logits(model, ids, cache, 5) - ref).abs().max()
    assert 0 < err < 0.05
    assert torch.equal(cache.layers[0].k_scale_fp8, model.model.layers[0].self_attn.k_scale.flatten())


def test_triton_decode_steps_on_a_sliding_model_match_the_reference_path():
    """Full layers hand decode steps to the kernel (the interpreter on CPU); sliding layers stay on SDPA."""
    model = tiny_sliding("gemma3", sliding_window=16)
    cfg = KVCacheConfig("int4", group_size=16, residual_length=16)
    ids = _ids(2, 40)
    logits = {}
    for backend in ("torch", "triton"):
        cache = kv_cache(model, cfg, backend=backend)
        assert [layer.fused for layer in cache.layers] == [False, backend == "triton"] * 2
        with torch.no_grad():
            model(ids[:, :20], past_key_values=cache, use_cache=True)
            logits[backend] = _chunked_logits(model, ids[:, 20:], cache, 1)
    assert torch.allclose(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


def test_logit_softcapping_keeps_decoding_off_the_kernel():
    model = tiny_sliding("gemma2")                                 # attn_logit_softcapping 50
    with pytest.raises(ConfigError, match="attn_logit_softcapping=50.0.*use backend='torch'"):
        kv_cache(model, KVCacheConfig("int4", group_size=16), backend="triton")
    assert not any(layer.fused for layer in kv_cache(model, KVCacheConfig("int4", group_size=16)).layers)
