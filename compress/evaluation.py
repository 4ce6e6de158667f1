"""Perplexity over non-overlapping windows, and a short greedy generation for a sanity look.

Perplexity = exp(mean negative log-likelihood) over every predicted token: each window of
``seqlen`` tokens contributes ``seqlen - 1`` predictions (its first token has no context), and
windows do not see each other. ``tokens`` in the result counts those predictions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import windows
from .engine import check_seqlen
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
        logits = logits[:, :-1].float()
        target = batch[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       target.reshape(-1), reduction="sum"))
        count += target.numel()
        bar.update(batch.shape[0])
    bar.close()
    return nll, count


def evaluate(model: nn.Module, tokenizer, data: str | os.PathLike, *, seqlen: int = 512,
             max_windows: int | None = None, batch_size: int = 4, split: str = "test", text_field: str = "text",
             sample_prompt: str | None = None, sample_tokens: int = 32, progress: bool = True) -> EvalResult:
    """Perplexity of ``model`` on the first ``max_windows`` windows of ``data`` (all if None)."""
    start = time.perf_counter()
    check_seqlen(model, seqlen)
    ids = windows(tokenizer, data, seqlen, split=split, text_field=text_field)
    if max_windows is not None:
        ids = ids[:max_windows]
    was_training = model.training
    model.eval()
    try:
        nll, count = perplexity_of_windows(model, ids, batch_size=batch_size, progress=progress)
        sample = generate(model, tokenizer, sample_prompt, sample_tokens) if sample_prompt else None
    finally:
        model.train(was_training)
    mean = nll / count
    return EvalResult(perplexity=math.exp(mean), nll=mean, tokens=count, windows=ids.shape[0], seqlen=seqlen,
                      seconds=time.perf_counter() - start, source=str(data), sample=sample)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    device = _input_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
