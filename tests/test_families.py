"""Every decoder family people compress, through the same steps: GPTQ int4 -> export -> reload (ours and
transformers + compressed-tensors), Wanda 2:4, an int4 KV-cache evaluation and structured MLP pruning.
Tiny random models built from configs; each step asserts its defining property."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress import KVCacheConfig
from compress.checkpoint.load import load_compressed
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.pruning.config import WandaConfig
from compress.pruning.structured import StructuredConfig
from compress.quant.config import GPTQConfig
from compress.quant.packed import PackedLinear
from compress.structure import prepare_model
from conftest import VOCAB

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model_type -> extra config fields
FAMILIES = {
    "mistral": {},
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=16),
    "gemma3_text": dict(head_dim=16, sliding_window=16),
    "phi3": dict(pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": {},
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "stablelm": {},
    "olmo2": {},
    "cohere": {},
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=64, head_dim=16, **MOE),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=64, shared_expert_intermediate_size=64, **MOE),
    "mixtral": dict(num_local_experts=8, intermediate_size=64, **MOE),
    "olmoe": dict(num_experts=8, intermediate_size=64, **MOE),
    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=64, first_k_dense_replace=1, n_group=1, topk_group=1,
                        kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        rope_scaling=None, **MOE),
}
MOE_FAMILIES = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"}
# transformers builds GPT-2 with Conv1D, which compressed-tensors does not quantize: a quantized GPT-2
# export loads in compress (and vLLM), not in transformers (docs/checkpoint-format.md).
NO_TRANSFORMERS_RELOAD = {"gpt2"}
# DeepSeek's multi-head latent attention caches a latent, not per-head keys and values: refused.
LATENT_ATTENTION = {"deepseek_v3"}
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})).eval()
    with torch.no_grad():                  # transformers leaves 3D expert tensors uninitialised
        for name, p in model.named_parameters():
            if p.dim() == 3:
                p.normal_(0, 0.05)
    return model


def calib(samples: int = 16) -> CalibrationData:
    return CalibrationData(torch.randint(0, VOCAB, (samples, 32), generator=torch.Generator().manual_seed(1)), "ids", 1)


def linear_targets(model) -> set[str]:
    """Names of the linears a weight pass must compress: all but lm_head and the MoE routers."""
    from compress.moe import router_names
    prepare_model(model)
    routers = set(router_names(model))
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in routers
            and not n.endswith("lm_head")}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def test_gptq_int4_quantizes_every_linear_and_the_export_reloads(family, tmp_path):
    model = build(family)
    targets = linear_targets(model)
    compress.quantize(model, GPTQConfig(bits=4, group_size=32), calib(), progress=False)
    packed = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert packed == targets and packed
    with torch.no_grad():
        ref = model(IDS).logits
        assert not torch.equal(ref, build(family)(IDS).logits)          # negative control: it did change
    out = compress.export(model, None, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(IDS).logits, ref)
        if family not in NO_TRANSFORMERS_RELOAD:
            theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
            torch.testing.assert_close(theirs(IDS).logits, ref, atol=1e-5, rtol=1e-5)


def test_wanda_2of4_prunes_every_linear(family):
    model = build(family)
    targets = linear_targets(model)
    records = compress.prune(model, WandaConfig(pattern="2:4", min_expert_tokens=0), calib(), progress=False)
    assert set(records) == targets
    for name in targets:
        w = model.get_submodule(name).weight.detach().reshape(-1, 4)
        assert torch.all((w == 0).sum(-1) >= 2), name


def test_int4_kv_cache_evaluation_stays_close_to_the_float_cache(family, tokenizer, text_file):
    model = build(family)
    kv = KVCacheConfig("int4", group_size=16, residual_length=0)
    if family in LATENT_ATTENTION:
        with pytest.raises(ConfigError, match="multi-head latent attention"):
            compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, progress=False, kv_cache=kv)
        return
    plain = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, progress=False)
    int4 = compress.evaluate(model, tokenizer, text_file, seqlen=48, max_windows=2, progress=False,
                             kv_cache=kv, kv_chunk=8)
    assert int4.perplexity != plain.perplexity and int4.tokens == plain.tokens
    assert abs(int4.perplexity / plain.perplexity - 1) < 0.05


def test_structured_mlp_pruning_removes_channels_or_refuses_moe_before_any_work(family):
    model = build(family)
    cfg = StructuredConfig(target="mlp", ratio=0.25, multiple_of=8)
    if family in MOE_FAMILIES:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConfigError, match="expert"):
            compress.prune(model, cfg, calib(), progress=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
        return
    params = sum(p.numel() for p in model.parameters())
    compress.prune(model, cfg, calib(), progress=False)
    assert sum(p.numel() for p in model.parameters()) < params
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
