"""GPTQ on a Qwen3-MoE-shaped model at real layer width, with random weights, on the CPU.

    python benchmarks/moe.py                        # 2 layers of Qwen3-30B-A3B's shape, routing on and off
    python benchmarks/moe.py --layers 4 --samples 32
    python benchmarks/moe.py --tiny                 # seconds (the smoke test)

Qwen3-30B-A3B's layer: hidden 2048, 128 experts of intermediate 768 (gate/up 768x2048, down 2048x768),
8 experts per token, 32 query / 4 KV heads of 128. The vocabulary is cut to --vocab (the embeddings
are not what is measured). Random weights (std 0.02), random calibration token ids: this measures
time, memory and how tokens spread over experts, not quality.

For each routing mode (the real top-k, then ``route_all_experts``: every expert observes every
token): GPTQ int4 g128 time per layer, peak resident memory of the process over that run (and
above the model's own), the float Hessians GPTQ holds at once against what one per expert per
layer would need, and tokens per expert (min / median / max) with the experts that fell back to
round-to-nearest. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import threading
import time
from pathlib import Path

import os
import resource

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import compress
import compress.quant.apply as quant_apply
from compress.data import CalibrationData
from compress.quant.config import GPTQConfig
from compress.report import machine
from compress.stats import HessianStats

ROOT = Path(__file__).resolve().parents[1]
QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     norm_topk_prob=True)
TINY = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_experts=16, num_experts_per_tok=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, norm_topk_prob=True)


def rss() -> int:
    """Resident memory of this process in bytes (Linux: /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak = self.start = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


class _CountedHessian(HessianStats):
    """HessianStats that counts the bytes of float Hessians alive at once."""

    alive = 0
    peak = 0

    def __init__(self, in_features, *args, **kwargs):
        super().__init__(in_features, *args, **kwargs)
        self._bytes = 4 * in_features * in_features
        type(self).alive += self._bytes
        type(self).peak = max(type(self).peak, type(self).alive)

    def __del__(self):
        type(self).alive -= self._bytes


def build(dims: dict, layers: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(**dims, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return model


def run(args, dims: dict, route_all: bool) -> dict:
    model = build(dims, args.layers, args.vocab)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    calib = CalibrationData(torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=gen), "random ids", 1)
    cfg = GPTQConfig(bits=4, group_size=128 if dims["hidden_size"] % 128 == 0 else 32, route_all_experts=route_all,
                     min_expert_tokens=args.min_tokens)
    _CountedHessian.alive = _CountedHessian.peak = 0
    original, quant_apply.HessianStats = quant_apply.HessianStats, _CountedHessian
    gc.collect()
    try:
        with PeakRSS() as mem:
            start = time.perf_counter()
            records = compress.quantize(model, cfg, calib, device="cpu", progress=not args.quiet)
            seconds = time.perf_counter() - start
    finally:
        quant_apply.HessianStats = original
    experts = records.summary["experts"]
    hidden, inter, n = dims["hidden_size"], dims["moe_intermediate_size"], dims["num_experts"]
    all_hessians = 4 * n * (hidden * hidden + inter * inter)          # one per expert input, one layer
    row = {"route_all_experts": route_all, "layers": args.layers, "seconds": round(seconds, 1),
           "seconds_per_layer": round(seconds / args.layers, 1), "model_bytes": model_bytes,
           "peak_rss_bytes": mem.peak, "peak_rss_above_start_bytes": mem.peak - mem.start,
           "hessian_peak_bytes": _CountedHessian.peak, "all_expert_hessians_one_layer_bytes": all_hessians,
           "tokens": args.samples * args.seqlen, "tokens_per_expert": experts,
           "quantized_linears": len(records)}
    del model, records
    gc.collect()
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'routing':<10} {'s/layer':>8} {'peak RSS':>9} {'+model':>8} {'Hessians':>9} {'(all at once)':>13} "
            f"{'tokens/expert min/med/max':>26} {'RTN':>4}")
    lines = [head, "-" * len(head)]
    gib = 1 << 30
    for r in rows:
        t = r["tokens_per_expert"]
        lines.append(f"{'all' if r['route_all_experts'] else 'top-k':<10} {r['seconds_per_layer']:>8.1f} "
                     f"{r['peak_rss_bytes'] / gib:>8.2f}G {r['peak_rss_above_start_bytes'] / gib:>7.2f}G "
                     f"{r['hessian_peak_bytes'] / (1 << 20):>8.1f}M {r['all_expert_hessians_one_layer_bytes'] / (1 << 20):>12.0f}M "
                     f"{t['min']:>8} / {t['median']:>7g} / {t['max']:>6} {t['rtn_fallback']:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (seconds), for the smoke test")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    parser.add_argument("--min-tokens", type=int, default=64, help="min_expert_tokens: fewer -> round to nearest")
    parser.add_argument("--modes", nargs="+", choices=["topk", "all"], default=["topk", "all"])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "moe-qwen3-shaped.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    dims = TINY if args.tiny else QWEN3_30B_A3B
    rows = [run(args, dims, mode == "all") for mode in args.modes]
    print(table(rows))
    result = {"benchmark": "moe", "command": "python benchmarks/moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": {**dims, "num_hidden_layers": args.layers, "vocab_size": args.vocab}, "machine": machine(),
              "samples": args.samples, "seqlen": args.seqlen, "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
