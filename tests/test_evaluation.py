import math

import pytest
import torch

import compress
from compress.data import windows
from compress.errors import CheckpointError, ConfigError
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


def test_max_windows_and_batch_size_below_one_are_refused(tokenizer, text_file):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"max_windows must be at least 1, got 0; leave it unset \(None\)"):
        compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=0, progress=False)
    with pytest.raises(ConfigError, match=r"batch_size must be at least 1 \(windows per forward\), got 0"):
        compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=1, batch_size=0, progress=False)
    assert compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=1, batch_size=1,
                             progress=False).windows == 1


def test_non_finite_weights_are_refused_by_name(tokenizer, text_file):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :3] = float("nan")
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight has 3 NaN/inf values; the "
                                              r"checkpoint is corrupt or was overflowed in float16"):
        compress.evaluate(model, tokenizer, text_file, seqlen=32, max_windows=1, progress=False)
