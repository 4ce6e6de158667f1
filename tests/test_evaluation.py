import math

import torch

import compress
from compress.data import windows
from conftest import tiny_model


def test_perplexity_matches_the_models_own_loss(tokenizer, text_file):
    model = tiny_model("llama")
    result = compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=5, batch_size=2, progress=False)
    ids = windows(tokenizer, text_file, 32)[:5]
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    assert result.windows == 5 and result.tokens == 5 * 31
    assert math.isclose(result.perplexity, math.exp(sum(losses) / 5), rel_tol=1e-5)
    assert result.seconds > 0


def test_all_windows_by_default_and_a_sample(tokenizer, text_file):
    model = tiny_model("qwen2")
    result = compress.evaluate(model, tokenizer, text_file, seqlen=64, sample_prompt="The quick", sample_tokens=5,
                               progress=False)
    assert result.windows == windows(tokenizer, text_file, 64).shape[0]
    assert isinstance(result.sample, str)
    assert set(result.to_dict()) >= {"perplexity", "tokens", "seconds", "windows"}


def test_quantization_shows_up_in_perplexity(tokenizer, text_file):
    model = tiny_model("llama")
    before = compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=4, progress=False).perplexity
    compress.quantize(model, compress.RTNConfig(bits=2, group_size=32), progress=False)
    after = compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=4, progress=False).perplexity
    assert after != before
