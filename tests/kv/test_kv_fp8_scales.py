"""Integer KV caches with fp8 (E4M3) scales and minima (``KVCacheConfig.scale_dtype: fp8``): the
bytes they save, the error they add against fp16 scales, saturation, the refusals, and the cache
reading them (the decode-attention kernel's case is in tests/kernels/test_decode_attention.py)."""

from __future__ import annotations

import pytest
import torch

from compress.errors import ConfigError
from compress.kv import kv_cache
from compress.kv import quant as kq
from compress.kv.config import KVCacheConfig, dense_bytes_per_token
from conftest import tiny_model


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _keys(seed=0, t=256, d=64):
    gen = torch.Generator().manual_seed(seed)
    chan = 1 + 6 * (torch.rand(d, generator=gen) < 0.1).float()             # outlier channels, offsets
    return torch.randn(1, 3, t, d, generator=gen) * chan + torch.randn(d, generator=gen)


def test_fp8_scales_bring_int2_g32_past_6x_where_fp16_scales_do_not():
    heads, dim = 3, 64                                                       # SmolLM2's KV heads
    dense = dense_bytes_per_token(heads, dim)
    fp16 = KVCacheConfig("int2", group_size=32).bytes_per_token(heads, dim)
    fp8 = KVCacheConfig("int2", group_size=32, scale_dtype="fp8").bytes_per_token(heads, dim)
    assert dense / fp16 == pytest.approx(16 / 3) and dense / fp8 == pytest.approx(6.4)
    # per element: 2 bits of code + (scale + min) / 32 elements, 16 + 16 or 8 + 8 bits
    assert fp8 == 2 * heads * dim * (2 + 16 / 32) / 8


@pytest.mark.parametrize("bits", [2, 4])
def test_fp8_scales_cost_little_accuracy_against_fp16(bits):
    k = _keys()
    errs = {}
    for name, dtype in kq.SCALE_DTYPES.items():
        codes, scale, lo = kq.quantize_key_blocks(k, bits, 32, dtype)
        assert scale.dtype == dtype and lo.dtype == dtype
        kd = kq.dequantize_keys(codes, scale, lo, bits, 32, torch.float32)
        v_codes, v_scale, v_lo = kq.quantize_values(k, bits, 32, dtype)
        vd = kq.dequantize_values(v_codes, v_scale, v_lo, bits, torch.float32)
        errs[name] = ((kd - k).norm() / k.norm()).item(), ((vd - k).norm() / k.norm()).item()
    for which in (0, 1):                                                     # keys, values
        fp16, fp8 = errs["fp16"][which], errs["fp8"][which]
        assert fp8 != fp16                                                   # the scales really were rounded
        if bits == 2:        # 4 levels: the code error dominates; fp8 scales move it by a few percent either way
            assert abs(fp8 - fp16) < 0.05 * fp16, errs
        else:                # 16 levels: the scales' 3-bit mantissa shows, within a bound
            assert fp16 < fp8 < 1.6 * fp16, errs


def test_fp8_scales_saturate_instead_of_overflowing():
    k = _keys() * 1e3                                                        # ranges past E4M3's 448
    codes, scale, lo = kq.quantize_key_blocks(k, 2, 32, torch.float8_e4m3fn)
    assert torch.isfinite(scale.float()).all() and torch.isfinite(lo.float()).all()
    assert scale.float().abs().max() <= kq.FP8_MAX and lo.float().abs().max() <= kq.FP8_MAX


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="int2", scale_dtype="bf16"), "scale_dtype must be one of fp16, fp8"),
    (dict(scheme="fp8", scale_dtype="fp8"), "scale_dtype is for the integer schemes"),
])
def test_bad_scale_dtypes_are_refused_by_name(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig(**kwargs)


def test_a_cache_with_fp8_scales_stores_them_and_decodes_close_to_fp16_scales():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    logits, caches = {}, {}
    with torch.no_grad():
        dense = model(ids).logits
        for sd in ("fp16", "fp8"):
            caches[sd] = kv_cache(model, KVCacheConfig("int4", group_size=16, residual_length=0, scale_dtype=sd))
            out = []
            for i in range(0, ids.shape[1], 8):                             # decode 8 tokens at a time
                out.append(model(ids[:, i:i + 8], past_key_values=caches[sd], use_cache=True).logits)
            logits[sd] = torch.cat(out, dim=1)
    layer = caches["fp8"].layers[0]
    assert layer.store["k_scale"].dtype == torch.float8_e4m3fn and layer.store["v_min"].dtype == torch.float8_e4m3fn
    assert caches["fp8"].layers[0].memory()["quantized"] < caches["fp16"].layers[0].memory()["quantized"]
    e16, e8 = (rel_err(logits[sd], dense) for sd in ("fp16", "fp8"))
    assert 0 < e16 < e8 < 2 * e16 + 1e-3, (e16, e8)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float8_e4m3fn])
def test_mse_clip_lowers_the_rounding_error_of_every_group(scale_dtype):
    k = _keys(3)
    plain = kq.quantize_values(k, 2, 32, scale_dtype)
    mse = kq.quantize_values(k, 2, 32, scale_dtype, clip="mse")

    def group_err(q):
        d = kq.dequantize_values(*q, 2, torch.float32) - k
        return d.reshape(*d.shape[:-1], 2, 32).square().sum(-1)
    e_plain, e_mse = group_err(plain), group_err(mse)
    assert (e_mse <= e_plain + 1e-6).all()                                  # never worse in any group
    assert e_mse.sum() < 0.8 * e_plain.sum()                                 # and clearly better overall
    keys_plain = kq.quantize_key_blocks(k, 2, 32, scale_dtype)
    keys_mse = kq.quantize_key_blocks(k, 2, 32, scale_dtype, clip="mse")
    err = [(kq.dequantize_keys(*q, 2, 32, torch.float32) - k).norm() for q in (keys_plain, keys_mse)]
    assert err[1] < 0.9 * err[0]


def test_clip_is_refused_for_fp8_caches_and_unknown_names():
    with pytest.raises(ConfigError, match="clip is for the integer schemes"):
        KVCacheConfig("fp8", clip="mse")
    with pytest.raises(ConfigError, match="clip must be 'minmax' or 'mse'"):
        KVCacheConfig("int2", clip="percentile")
    assert KVCacheConfig("int2", clip="mse", scale_dtype="fp8").describe() == \
        "int2 g64 window 128, fp8 scales, mse clip"


def test_sink_tokens_stay_in_full_precision_and_attention_reads_them_first():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(2))
    base = dict(scheme="int2", group_size=16, residual_length=16)
    with torch.no_grad():
        dense = model(ids).logits
        out = {}
        for sink in (0, 4):
            cache = kv_cache(model, KVCacheConfig(**base, sink_tokens=sink))
            steps = [model(ids[:, i:i + 8], past_key_values=cache, use_cache=True).logits for i in range(0, 80, 8)]
            out[sink] = torch.cat(steps, dim=1), cache
    layer = out[4][1].layers[0]
    assert layer.sink_keys.shape[2] == 4 and layer.get_seq_length() == 80
    assert layer.length + layer.keys.shape[2] == 76                           # the rest: quantized + window
    view = layer.view()
    keys, _ = view.dequantize()
    assert keys.shape[2] == 80 and torch.equal(keys[:, :, :4], layer.sink_keys)
    # full-precision sinks bring the 2-bit cache closer to float on the same tokens
    assert rel_err(out[4][0], dense) < rel_err(out[0][0], dense)
    assert out[4][1].layers[0].memory()["window"] > out[0][1].layers[0].memory()["window"]
    assert KVCacheConfig(**base, sink_tokens=4).describe() == "int2 g16 window 16, 4 sink tokens"
    with pytest.raises(ConfigError, match="sink_tokens must be >= 0"):
        KVCacheConfig(**base, sink_tokens=-1)
