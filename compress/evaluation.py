"""Perplexity over non-overlapping windows, and a short greedy generation for a sanity look.

Perplexity = exp(mean negative log-likelihood) over every predicted token: each window of
``seqlen`` tokens contributes ``seqlen - 1`` predictions (its first token has no context), and
windows do not see each other. ``tokens`` in the result counts those predictions.

With a quantized KV cache the windows are fed through the cache ``kv_chunk`` tokens at a time
(1 = decoding token by token), so every prediction attends to the quantized past exactly as in
generation; a single full forward pass would attend to full-precision keys and measure nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from .data import windows
from .engine import check_seqlen
from .errors import ConfigError
from .guards import check_finite
# Aliased: evaluate() and generate() take a ``kv_cache`` argument.
from .kv.attention import kv_cache as quantized_cache
from .kv.config import KVCacheConfig
from .kv.model import kv_config_of
from .modeling import module_device


@dataclasses.dataclass
class EvalResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    source: str
    sample: str | None = None
    kv_cache: str | None = None          # the quantized KV cache the windows were decoded through
    kv_chunk: int | None = None          # tokens per forward step through that cache

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(emb) if emb is not None else module_device(model)
    return torch.device("cpu") if device.type == "meta" else device


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4,
                          progress: bool = True) -> tuple[float, int]:
    """Total NLL and number of predicted tokens over windows ``ids`` (n, seqlen)."""
    device = _input_device(model)
    nll, count = 0.0, 0
    bar = tqdm(total=ids.shape[0], desc="perplexity", unit="window", disable=not progress)
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits           # (B, T, vocab)
        nll += _summed_nll(logits[:, :-1], batch[:, 1:])
        count += batch[:, 1:].numel()
        bar.update(batch.shape[0])
    bar.close()
    return nll, count


def _summed_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Summed cross-entropy of logits (B, T, V) against target ids (B, T), in float32."""
    logits = logits.float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   reduction="sum"))


@torch.no_grad()
def perplexity_through_cache(model: nn.Module, ids: torch.Tensor, kv: KVCacheConfig | None, *, chunk: int = 1,
                             batch_size: int = 8, backend: str = "auto", progress: bool = True) -> tuple[float, int]:
    """Total NLL and predicted tokens over windows ``ids`` (n, seqlen), each batch fed through a
    fresh quantized cache ``chunk`` tokens per forward (kv None: transformers' full-precision
    DynamicCache, the control that must reproduce the plain forward's perplexity)."""
    if chunk < 1:
        raise ConfigError(f"kv_chunk must be >= 1, got {chunk}")
    device = _input_device(model)
    nll, count = 0.0, 0
    steps = -(-(ids.shape[1] - 1) // chunk)
    bar = tqdm(total=ids.shape[0] * steps, desc=f"perplexity ({kv.scheme if kv else 'float'} kv, chunk {chunk})", unit="step",
               disable=not progress)
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        cache = quantized_cache(model, kv, backend=backend) if kv is not None else DynamicCache(config=model.config)
        for start in range(0, batch.shape[1] - 1, chunk):
            piece = batch[:, start:start + chunk]
            logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits  # (B, c, V)
            target = batch[:, start + 1:start + 1 + piece.shape[1]]          # the last window token has none
            nll += _summed_nll(logits[:, :target.shape[1]], target)
            count += target.numel()
            bar.update(batch.shape[0])
    bar.close()
    return nll, count


def evaluate(model: nn.Module, tokenizer, data: str | os.PathLike, *, seqlen: int = 512,
             max_windows: int | None = None, batch_size: int = 4, split: str = "test", text_field: str = "text",
             sample_prompt: str | None = None, sample_tokens: int = 32, progress: bool = True,
             kv_cache: KVCacheConfig | bool | None = None, kv_chunk: int = 1, backend: str = "auto") -> EvalResult:
    """Perplexity of ``model`` on the first ``max_windows`` windows of ``data`` (all if None).

    ``kv_cache``: a KVCacheConfig decodes the windows through that quantized cache, ``kv_chunk``
    tokens per step; None uses the config the model carries (after a ``kv_cache`` pass) if any;
    False forces the plain full-sequence forward. Refuses a ``max_windows`` or ``batch_size`` below 1
    and NaN/inf weights (ConfigError, CheckpointError) before reading the data."""
    start = time.perf_counter()
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be at least 1, got {max_windows}; leave it unset (None) to "
                          f"evaluate every window")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1 (windows per forward), got {batch_size}")
    check_seqlen(model, seqlen)
    check_finite(model)
    kv = kv_config_of(model) if kv_cache is None else (kv_cache or None)
    ids = windows(tokenizer, data, seqlen, split=split, text_field=text_field)
    if max_windows is not None:
        ids = ids[:max_windows]
    was_training = model.training
    model.eval()
    try:
        if kv is None:
            nll, count = perplexity_of_windows(model, ids, batch_size=batch_size, progress=progress)
        else:
            nll, count = perplexity_through_cache(model, ids, kv, chunk=kv_chunk, batch_size=batch_size,
                                                  backend=backend, progress=progress)
        sample = generate(model, tokenizer, sample_prompt, sample_tokens, kv_cache=kv) if sample_prompt else None
    finally:
        model.train(was_training)
    mean = nll / count
    return EvalResult(perplexity=math.exp(mean), nll=mean, tokens=count, windows=ids.shape[0], seqlen=seqlen,
                      seconds=time.perf_counter() - start, source=str(data), sample=sample,
                      kv_cache=kv.describe() if kv else None, kv_chunk=kv_chunk if kv else None)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32,
             kv_cache: KVCacheConfig | None = None) -> str:
    """Greedy continuation of ``prompt`` (the new text only), through a quantized KV cache if given."""
    device = _input_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = {}
    if kv_cache is not None:
        extra["past_key_values"] = quantized_cache(model, kv_cache)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@dataclasses.dataclass
class AgreementResult:
    """Greedy generation through a quantized KV cache against the full-precision cache."""

    kv_cache: str
    prompts: int
    prompt_tokens: int
    new_tokens: int
    teacher_forced: float        # fraction of steps whose argmax matches the float continuation, fed its history
    free_running: float          # fraction of positions where the two free-running continuations agree
    first_divergence: list[int]  # per prompt: the first step where the free-running continuations differ
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def _greedy(model: nn.Module, prompt: torch.Tensor, cache, steps: int,
            forced: torch.Tensor | None = None) -> torch.Tensor:
    """(B, steps) argmax tokens decoded one at a time after a prefill of ``prompt``; with
    ``forced`` (B, steps) the forced tokens are fed instead of the model's own choices."""
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    out = []
    for i in range(steps):
        choice = logits.argmax(-1)                                            # (B,)
        out.append(choice)
        if i + 1 < steps:
            nxt = forced[:, i] if forced is not None else choice
            logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1)


@torch.no_grad()
def float_continuation(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, new_tokens) greedy tokens through transformers' full-precision DynamicCache."""
    return _greedy(model, prompts.to(_input_device(model)), DynamicCache(config=model.config), new_tokens)


def generation_agreement(model: nn.Module, prompts: torch.Tensor, kv: KVCacheConfig, *, new_tokens: int = 1000,
                         reference: torch.Tensor | None = None, backend: str = "auto",
                         progress: bool = True) -> AgreementResult:
    """Long greedy generation with ``kv`` against transformers' full-precision cache, from the
    same ``prompts`` (B, P): teacher-forced top-1 agreement (the quantized model predicts each
    next token of the float continuation from the float history: no compounding), and the
    free-running continuations' agreement and first divergence. ``reference``: the float
    continuation (``float_continuation``) when comparing several caches."""
    start = time.perf_counter()
    prompts = prompts.to(_input_device(model))
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=3, desc=f"agreement ({kv.describe()})", unit="run", disable=not progress)
        ref = float_continuation(model, prompts, new_tokens) if reference is None else reference.to(prompts.device)
        if ref.shape != (prompts.shape[0], new_tokens):
            raise ConfigError(f"reference continuation has shape {tuple(ref.shape)}, expected "
                              f"{(prompts.shape[0], new_tokens)}")
        bar.update()
        forced = _greedy(model, prompts, quantized_cache(model, kv, backend=backend), new_tokens, forced=ref)
        bar.update()
        free = _greedy(model, prompts, quantized_cache(model, kv, backend=backend), new_tokens)
        bar.update()
        bar.close()
    finally:
        model.train(was_training)
    differ = free != ref
    first = [int(row.nonzero()[0]) if row.any() else new_tokens for row in differ]
    return AgreementResult(kv_cache=kv.describe(), prompts=prompts.shape[0], prompt_tokens=prompts.shape[1],
                           new_tokens=new_tokens, teacher_forced=float((forced == ref).float().mean()),
                           free_running=float((~differ).float().mean()), first_divergence=first,
                           seconds=time.perf_counter() - start)
