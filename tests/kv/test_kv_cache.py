"""The quantized KV cache: storage primitives, flush semantics, memory accounting, and that
attention really reads the quantized past (tiny Llama / Qwen2 / OPT)."""

import pytest
import torch

from compress.errors import ConfigError
from compress.evaluation import generation_agreement, perplexity_of_windows, perplexity_through_cache
from compress.kernels.hadamard import rotate
from compress.kv import kv_cache
from compress.kv import quant as kq
from compress.kv.cache import QuantizedKVCache
from compress.kv.config import KVCacheConfig, dense_bytes_per_token
from conftest import VOCAB, tiny_model


def _ids(batch=2, length=96, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _chunked_logits(model, ids, cache, chunk):
    return torch.cat([model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits
                      for s in range(0, ids.shape[1], chunk)], dim=1)


# --- primitives -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_is_exact_and_little_endian(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), generator=torch.Generator().manual_seed(bits))
    packed = kq.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == kq.packed_width(64, bits)
    assert torch.equal(kq.unpack_codes(packed, bits), codes.to(torch.int32))
    if bits == 4:
        assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rounding_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 64, 32, generator=g) * torch.linspace(0.1, 20, 32)      # channels of very different range
    v = torch.randn(2, 3, 64, 32, generator=g)
    codes, scale, lo = kq.quantize_key_blocks(k, bits, 16)
    assert scale.shape == (2, 3, 4, 32)                                            # per channel per 16-token block
    err = (kq.dequantize_keys(codes, scale, lo, bits, 16, torch.float32) - k).abs()
    step = scale.float().repeat_interleave(16, dim=2)
    assert (err <= step / 2 + 1e-3 * k.abs() + 1e-4).all()
    codes, scale, lo = kq.quantize_values(v, bits, 16)
    assert scale.shape == (2, 3, 64, 2)                                            # per token per 16 channels
    err = (kq.dequantize_values(codes, scale, lo, bits, torch.float32) - v).abs()
    assert (err <= scale.float().repeat_interleave(16, dim=-1) / 2 + 1e-3).all()


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    """KIVI's reason for quantizing keys per channel: a few channels carry large magnitudes."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 64, generator=g)
    k[..., :4] *= 30                                                               # outlier channels
    codes, scale, lo = kq.quantize_key_blocks(k, 4, 64)
    per_channel = (kq.dequantize_keys(codes, scale, lo, 4, 64, torch.float32) - k)[..., 4:].pow(2).mean()
    codes, scale, lo = kq.quantize_values(k, 4, 64)                                # the per-token grid
    per_token = (kq.dequantize_values(codes, scale, lo, 4, torch.float32) - k)[..., 4:].pow(2).mean()
    assert per_channel < 0.05 * per_token           # the ordinary channels keep their precision


def test_fp8_saturates_instead_of_overflowing():
    x = torch.tensor([1.0, -1000.0, 3.0]).view(1, 1, 1, 3)
    codes = kq.quantize_fp8(x, torch.tensor([1.0]))
    assert codes.dtype == torch.float8_e4m3fn
    assert kq.dequantize_fp8(codes, torch.tensor([1.0]), torch.float32).flatten().tolist() == [1.0, -448.0, 3.0]


# --- config and memory ----------------------------------------------------------------------

def test_bytes_per_token_meets_the_memory_targets():
    for heads, dim in ((3, 64), (8, 128)):                                          # SmolLM2, Llama-3-8B
        dense = dense_bytes_per_token(heads, dim)
        assert dense / KVCacheConfig("int4").bytes_per_token(heads, dim) >= 3.5
        assert dense / KVCacheConfig("int2").bytes_per_token(heads, dim) >= 6.0
        assert dense / KVCacheConfig("fp8").bytes_per_token(heads, dim) == 2.0
    # SmolLM2 int4 g64: 64 codes * 0.5 B + (scale+min fp16) per channel per 64 tokens + per token per head
    assert KVCacheConfig("int4").bytes_per_token(1, 64) == 32 + 64 * 4 / 64 + 32 + 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="int3"), "one of fp8, int8, int4, int2"),
    (dict(group_size=48), "power of two"),
    (dict(residual_length=100), "multiple of group_size 64"),
    (dict(residual_length=-1), ">= 0"),
    (dict(scheme="fp8", rotate_keys=True), "rotate_keys is for the integer schemes"),
])
def test_bad_configs_are_refused_by_name(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig(**kwargs)


def test_model_the_cache_cannot_hold_is_refused():
    model = tiny_model("llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)     # head_dim 12
    with pytest.raises(ConfigError, match="power-of-two head_dim"):
        QuantizedKVCache(model.config, KVCacheConfig("int4", group_size=4, rotate_keys=True))
    with pytest.raises(ConfigError, match="does not divide head_dim 12"):
        QuantizedKVCache(model.config, KVCacheConfig("int4", group_size=8))


# --- the cache in a model -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_a_window_longer_than_the_text_is_exactly_the_float_cache(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    cache = kv_cache(model, KVCacheConfig("int2", group_size=16, residual_length=256))
    assert torch.allclose(_chunked_logits(model, ids, cache, 7), ref, atol=1e-5)
    assert cache.layers[0].length == 0                                      # nothing was quantized


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_quantized_past_changes_the_logits_in_order_of_bits(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for scheme in ("int8", "int4", "int2"):
        cache = kv_cache(model, KVCacheConfig(scheme, group_size=16, residual_length=16))
        errors[scheme] = (_chunked_logits(model, ids, cache, 5) - ref).abs().max().item()
    assert 0 < errors["int8"] < errors["int4"] < errors["int2"]
    assert errors["int8"] < 0.01


def test_prefill_attends_to_the_quantized_cache_too():
    """transformers' QuantizedCache returns the full-precision prompt; ours returns what it stores,
    so one prefill forward with no window is already quantized (and is what decoding sees)."""
    model = tiny_model("llama")
    ids = _ids(length=64)
    with torch.no_grad():
        ref = model(ids).logits
        one = model(ids, past_key_values=kv_cache(model, KVCacheConfig("int4", group_size=16, residual_length=0)),
                    use_cache=True).logits
    assert (one - ref)[:, 20:].abs().max() > 1e-3
    assert not torch.allclose(one[:, :1], ref[:, :1], atol=1e-5)   # 64 tokens = 4 whole blocks: all stored quantized


def test_flush_moves_whole_key_blocks_and_keeps_the_window():
    model = tiny_model("llama")
    cfg = KVCacheConfig("int4", group_size=16, residual_length=32)
    cache = kv_cache(model, cfg)
    layer = cache.layers[0]
    with torch.no_grad():
        for n in range(1, 101):
            model(input_ids=_ids(1, 1, seed=n), past_key_values=cache, use_cache=True)
            over = n - 32
            want = over // 16 * 16 if over >= 16 else 0
            assert layer.length == want and layer.keys.shape[2] == n - want and cache.get_seq_length() == n
    mem = cache.memory()
    # 64 quantized tokens, 1 sequence, 2 KV heads of 16 dims: bytes_per_token * 64 per layer
    assert mem["quantized"] == 2 * 64 * cfg.bytes_per_token(2, 16)
    assert mem["window"] == 2 * 2 * 36 * 2 * 16 * 4                  # layers * (k,v) * tokens * heads * dims * fp32
    assert mem["ratio_vs_16bit"] == dense_bytes_per_token(2, 16) / cfg.bytes_per_token(2, 16)


def test_growing_storage_keeps_earlier_tokens():
    model = tiny_model("llama")
    ids = _ids(1, 600)                                                   # past the first 256-token allocation
    cfg = KVCacheConfig("int8", group_size=16, residual_length=0)
    whole = kv_cache(model, cfg)
    with torch.no_grad():
        a = model(ids, past_key_values=whole, use_cache=True).logits[:, -1]
        stepped = kv_cache(model, cfg)
        b = _chunked_logits(model, ids, stepped, 16)[:, -1]
    assert whole.layers[0].capacity >= 592 and stepped.layers[0].capacity >= 592
    k1, _ = whole.layers[0].view().dequantize()
    k2, _ = stepped.layers[0].view().dequantize()
    assert torch.equal(k1, k2) and torch.allclose(a, b, atol=1e-4)


def test_rotated_keys_with_a_long_window_change_nothing():
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    cache = kv_cache(model, KVCacheConfig("int4", group_size=16, residual_length=256, rotate_keys=True))
    assert torch.allclose(_chunked_logits(model, ids, cache, 8), ref, atol=1e-4)
    plain = kv_cache(model, KVCacheConfig("int4", group_size=16, residual_length=256))
    _chunked_logits(model, ids, plain, 8)
    stored, unrotated = cache.layers[0].keys, plain.layers[0].keys             # the windows: stored rotated
    assert not torch.allclose(stored, unrotated, atol=1e-3)
    assert torch.allclose(stored, rotate(unrotated), atol=1e-5)


def test_generate_and_beam_search_run_on_the_cache():
    model = tiny_model("llama")
    prompt = _ids(1, 24)
    cfg = KVCacheConfig("int4", group_size=16, residual_length=16)
    greedy = model.generate(prompt, past_key_values=kv_cache(model, cfg), max_new_tokens=40, do_sample=False,
                            pad_token_id=0)
    assert greedy.shape == (1, 64)
    beams = model.generate(prompt, past_key_values=kv_cache(model, cfg), max_new_tokens=10, num_beams=2,
                           do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 34)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        kv_cache(model, cfg).layers[0].crop(-1)


def test_chunked_attention_models_are_refused():
    """Sliding-window layers are held (tests/kv/test_kv_sliding.py); chunked ones (Llama 4) are not."""
    from transformers import Llama4TextConfig
    cfg = Llama4TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, attention_chunk_size=16)
    with pytest.raises(ConfigError, match=r"full_attention and sliding_attention layers only.*'chunked_attention'"):
        QuantizedKVCache(cfg, KVCacheConfig("int4", group_size=16))


# --- evaluation through the cache -----------------------------------------------------------

def test_float_cache_decoding_reproduces_the_plain_perplexity():
    model = tiny_model("llama")
    ids = _ids(3, 40)
    plain = perplexity_of_windows(model, ids, progress=False)
    for chunk in (1, 7):
        nll, count = perplexity_through_cache(model, ids, None, chunk=chunk, progress=False)
        assert count == plain[1] == 3 * 39 and abs(nll - plain[0]) < 1e-3


def test_quantized_decoding_costs_perplexity_and_chunking_barely_matters():
    model = tiny_model("llama")
    ids = _ids(2, 80)
    plain, count = perplexity_of_windows(model, ids, progress=False)
    cfg = KVCacheConfig("int2", group_size=16, residual_length=0)
    one, _ = perplexity_through_cache(model, ids, cfg, chunk=1, progress=False)
    four, _ = perplexity_through_cache(model, ids, cfg, chunk=4, progress=False)
    assert one != plain and abs(one - four) / count < 0.05


def test_generation_agreement():
    model = tiny_model("llama")
    prompts = _ids(2, 16)
    exact = generation_agreement(model, prompts, KVCacheConfig("int2", group_size=16, residual_length=64),
                                 new_tokens=30, progress=False)
    assert exact.teacher_forced == 1.0 and exact.free_running == 1.0 and exact.first_divergence == [30, 30]
    lossy = generation_agreement(model, prompts, KVCacheConfig("int2", group_size=16, residual_length=0),
                                 new_tokens=30, progress=False)
    assert lossy.teacher_forced < 1.0 and lossy.prompts == 2 and lossy.new_tokens == 30


def test_the_cache_is_a_transformers_cache():
    from transformers import Cache
    assert isinstance(kv_cache(tiny_model("llama"), KVCacheConfig("int4", group_size=16)), Cache)
