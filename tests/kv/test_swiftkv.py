"""SwiftKV: SingleInputKV / AcrossKV conversion, FLOP and KV-byte accounting, distillation recovery."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM

from compress.distillation.config import DistillConfig
from compress.distillation.apply import distill
from compress.errors import ConfigError
from compress.kv.swiftkv import (ModelShape, SingleInputKVAttention, SwiftKVConfig, kv_bytes_per_token,
                                 prefill_flops, qkv_targets, scored_nll, swiftkv)
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layers=4, arch="llama"):
    if arch == "qwen2":                                       # the conftest builder fixes 2 layers
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=layers, num_attention_heads=4,
                                            num_key_value_heads=2)).eval()
    return tiny_model(arch, num_hidden_layers=layers)


def _ids(n=2, t=24, seed=0):
    return torch.randint(0, 384, (n, t), generator=torch.Generator().manual_seed(seed))


def test_split_num_layers_is_identity():
    model = _model()
    ids = _ids()
    ref = model(ids).logits
    swiftkv(model, SwiftKVConfig(split=4))
    assert not any(isinstance(m, SingleInputKVAttention) for m in model.modules())
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("arch,split,layers", [("llama", 2, 4), ("qwen2", 1, 3)])
def test_single_input_kv_projects_split_output(arch, split, layers):
    model = _model(layers, arch=arch)
    ids = _ids()
    ref = copy.deepcopy(model)
    swiftkv(model, SwiftKVConfig(split=split))
    keys = {}
    later = range(split, layers)
    layers = model.model.layers
    for i in later:
        layers[i].self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i, out))
    out = model(ids, output_hidden_states=True)
    x = out.hidden_states[split]                              # output of layer split - 1
    for i in later:
        norm = ref.model.layers[i].input_layernorm
        assert torch.allclose(keys[i], ref.model.layers[i].self_attn.k_proj(norm(x)), atol=1e-6)
    # layers before the split are untouched; layers after it (not the split layer itself, whose
    # input is x_(s-1) anyway) really changed the outputs
    ref_out = ref(ids, output_hidden_states=True)
    assert torch.equal(out.hidden_states[split], ref_out.hidden_states[split])
    assert (out.logits - ref_out.logits).abs().max() > 1e-3


def test_state_dict_keys_kept_and_followers_dropped():
    model = _model()
    keys = set(model.state_dict())
    swiftkv(model, SwiftKVConfig(split=2, across_group=2))
    new = set(model.state_dict())
    dropped = {f"model.layers.3.self_attn.{p}_proj.weight" for p in "kv"}
    assert new == keys - dropped


def test_across_kv_shares_one_cache_per_group():
    model = _model(layers=6)
    swiftkv(model, SwiftKVConfig(split=2, across_group=2))
    ids = _ids(1, 10)
    model(ids)
    layers = model.model.layers
    for owner, follower in ((2, 3), (4, 5)):
        k_o, v_o = layers[owner].self_attn.kv_input()
        k_f, v_f = layers[follower].self_attn.kv_input()
        assert torch.equal(k_o, k_f) and torch.equal(v_o, v_f)
    assert not torch.equal(layers[2].self_attn.kv_input()[0], layers[4].self_attn.kv_input()[0])
    shape = ModelShape.of(model.config)
    plain = kv_bytes_per_token(shape, SwiftKVConfig(split=2))
    across = kv_bytes_per_token(shape, SwiftKVConfig(split=2, across_group=2))
    assert plain["swiftkv"] == plain["original"]                          # SingleInputKV alone keeps every cache
    assert across["caches"] == 2 + 2
    # the converted layers' KV bytes halve at group 2
    assert across["original"] - across["swiftkv"] == (plain["swiftkv"] - 2 * plain["per_layer"]) // 2


def test_decode_with_cache_matches_full_forward():
    """Prefill + token-by-token decode through a cache gives the full forward's logits."""
    model = swiftkv(_model(), SwiftKVConfig(split=2, across_group=2))
    ids = _ids(1, 16)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :12], use_cache=True)
    cache, steps = out.past_key_values, [out.logits[:, -1]]
    for t in range(12, 15):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 11:15], atol=1e-5)


def test_prefill_flops_hand_count():
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=10, head_dim=4)
    shape = ModelShape.of(cfg)
    P = 3
    # per token and layer: q 2*8*8=128, k 2*8*4=64, v 64, o 128, mlp 3*2*8*16=768 -> 1152
    # attention for the token at t: 4 * 8 * (t+1) = 32 (t+1); tokens 0..2 -> 32+64+96 = 192
    per_layer = 3 * 1152 + 192
    logits = 2 * 8 * 10
    r = prefill_flops(shape, P, SwiftKVConfig(split=1))
    assert r["original"] == 2 * per_layer + logits
    # layer 1 converted: tokens 0, 1 skip q, o, mlp (1024 each) and attention (32 + 64)
    assert r["saved"] == 2 * 1024 + 96
    r2 = prefill_flops(shape, P, SwiftKVConfig(split=1, across_group=2))
    assert r2["saved"] == r["saved"]                     # one converted layer: it owns its group
    cfg.num_hidden_layers = 3
    r3 = prefill_flops(ModelShape.of(cfg), P, SwiftKVConfig(split=1, across_group=2))
    assert r3["saved"] == 2 * (2 * 1024 + 96) + 2 * 128     # the follower skips k, v for tokens 0, 1


def test_bad_configs():
    with pytest.raises(ConfigError, match="split 5 is out of range"):
        swiftkv(_model(), SwiftKVConfig(split=5))
    with pytest.raises(ConfigError, match="split 0 is out of range"):
        swiftkv(_model(), SwiftKVConfig(split=0))
    with pytest.raises(ConfigError, match="across_group"):
        swiftkv(_model(), SwiftKVConfig(split=2, across_group=0))
    with pytest.raises(ConfigError, match="supports the Llama-style families.*'opt'"):
        swiftkv(tiny_model("opt"), SwiftKVConfig(split=1))
    model = swiftkv(_model(), SwiftKVConfig(split=2))
    with pytest.raises(ConfigError, match="already converted"):
        swiftkv(model, SwiftKVConfig(split=2))
    with pytest.raises(ConfigError, match="prompt_len"):
        scored_nll(model, _ids(), prompt_len=24)


def test_fraction_picks_later_half():
    assert SwiftKVConfig(fraction=0.5).resolve(30) == 15
    assert SwiftKVConfig(fraction=0.0).resolve(30) == 30


def test_distillation_of_qkv_recovers():
    teacher = _model()
    student = swiftkv(copy.deepcopy(teacher), SwiftKVConfig(split=2))
    train = _ids(8, 32, seed=1)
    held = _ids(4, 32, seed=2)
    ref_nll, _ = scored_nll(teacher, held, 24)
    before, _ = scored_nll(student, held, 24)
    assert before != pytest.approx(ref_nll, rel=1e-3)         # the conversion changes the scored logits
    targets = qkv_targets(student)
    assert targets == [f"model.layers.{i}.self_attn.{p}_proj" for i in (2, 3) for p in "qkv"]
    cfg = DistillConfig(steps=30, batch_size=4, rank=4, lm=0.0, kl=1.0, top_k=None, teacher="model",
                        targets=targets, train_norms=False, learning_rate=1e-2, warmup_steps=0)
    frozen = {n: p.clone() for n, p in student.named_parameters() if "layers.0" in n or "mlp" in n}
    result = distill(student, cfg, train, teacher=teacher, device="cpu", progress=False)
    assert result.last_loss < result.first_loss
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n                 # only the later layers' q/k/v moved
    after, _ = scored_nll(student, held, 24)
    assert abs(after - ref_nll) < abs(before - ref_nll)
