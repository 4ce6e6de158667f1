"""Batch-1 decode speed of a Llama-3-8B-shaped model: bfloat16 against RTN int4 g128 in our runtime.

    python benchmarks/decode.py                      # Llama-3-8B dimensions, random weights, on CUDA
    python benchmarks/decode.py --cuda-graphs        # decode steps replayed from a CUDA graph, both sides
    python benchmarks/decode.py --layers 4           # a quicker look at the same layer shapes
    python benchmarks/decode.py --tiny --device cpu  # smoke test: a few seconds on a CPU

The model is built from its config directly on the device in bfloat16 with the transformers
initialization (normal, std 0.02): no download, and speed does not depend on the values. bfloat16 is
measured first; then the same model is quantized in place with
``compress.quantize(model, RTNConfig(bits=4, group_size=128))`` (lm_head stays bfloat16, as in a
compress export), so only one copy of the weights is resident at a time; then ours is measured with
the chosen kernel backend. Both sides are measured by ``compress.bench.measure``, the code behind
``compress bench``: prefill tokens/s over batch x prompt_len tokens and greedy decode tokens/s with
a static KV cache (see docs/runtime.md). Prints a table and writes JSON (default
benchmarks/results/decode-<device>.json; other dimensions than Llama-3-8B add a tag to the name).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

import compress
from compress.bench import BenchResult, BenchSettings, measure, scheme_label
from compress.engine import default_device
from compress.kernels import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.decode")

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
# Every in_features a multiple of 128, so group size 128 applies as on the real model.
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, rope_theta=500000.0, max_position_embeddings=8192)
TINY_SETTINGS = dict(prompt_len=16, new_tokens=8, warmup=1, repeats=2)


def model_dims(args) -> dict:
    dims = dict(TINY if args.tiny else LLAMA3_8B)
    for key, flag in (("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("intermediate_size", "intermediate"),
                      ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab")):
        if getattr(args, flag) is not None:
            dims[key] = getattr(args, flag)
    return dims


def parameter_count(dims: dict) -> int:
    """Weights of a Llama with ``dims``: embeddings, head and final norm, then per layer q/o, k/v, the
    MLP and two norms."""
    h, kv = dims["hidden_size"], dims["hidden_size"] // dims["num_attention_heads"] * dims["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * dims["intermediate_size"] + 2 * h
    return 2 * dims["vocab_size"] * h + h + dims["num_hidden_layers"] * per_layer


def build_model(dims: dict, device: torch.device, seed: int) -> torch.nn.Module:
    """A LlamaForCausalLM with ``dims``, random weights, created directly on ``device`` in bfloat16."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    dims = dict(dims)
    config = LlamaConfig(**{k: v for k, v in dims.items() if k != "rope_theta"}, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": dims["rope_theta"]})
    torch.manual_seed(seed)
    with torch.device(device):                    # no float32 copy on the host: init runs on the device
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def default_output(dims: dict, device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    tag = "" if dims == LLAMA3_8B else f"-l{dims['num_hidden_layers']}-h{dims['hidden_size']}"
    return ROOT / "benchmarks" / "results" / f"decode-{slug}{tag}.json"


def run(args) -> dict:
    device = torch.device(args.device) if args.device else default_device()
    dims = model_dims(args)
    overrides = {k: getattr(args, k) for k in ("prompt_len", "new_tokens", "warmup", "repeats")
                 if getattr(args, k) is not None}
    settings = BenchSettings(**{**(TINY_SETTINGS if args.tiny else {}), **overrides},
                             batch_size=args.batch_size, cuda_graphs=args.cuda_graphs, seed=args.seed)
    cfg = compress.RTNConfig(bits=args.bits, group_size=args.group_size)
    if args.cuda_graphs and device.type != "cuda":
        raise compress.ConfigError(f"--cuda-graphs needs a CUDA device, got {device}; drop --cuda-graphs")
    if device.type != "cuda" and parameter_count(dims) > 1e9:
        raise compress.ConfigError(f"{parameter_count(dims) / 1e9:.1f}B parameters on {device} would take many "
                                   f"GB and minutes per token; run on a GPU, or pass --tiny (or fewer --layers)")

    start = time.perf_counter()
    model = build_model(dims, device, args.seed)
    log.info("built %d-layer Llama (hidden %d) on %s in %.1f s", dims["num_hidden_layers"], dims["hidden_size"],
             device, time.perf_counter() - start)
    dense = measure(model, settings, "bfloat16")

    start = time.perf_counter()
    compress.quantize(model, cfg, device=device, progress=False)          # in place: the bf16 weights go
    quantize_seconds = time.perf_counter() - start
    compress.set_backend(model, args.backend)
    ours = measure(model, settings, f"compress {scheme_label(model)} ({args.backend})")

    result = BenchResult(checkpoint=f"random Llama {dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}",
                         device=str(device), dtype="bfloat16", baseline="bfloat16 (the same weights before RTN)",
                         settings=settings, models=[ours, dense])
    return {**result.to_dict(), "model_config": dims, "quantization": cfg.to_dict(),
            "quantize_seconds": quantize_seconds, "table": result.table()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model with small dimensions (smoke test)")
    p.add_argument("--layers", type=int, help="decoder layers (default 32)")
    p.add_argument("--hidden", type=int, help="hidden size (default 4096)")
    p.add_argument("--intermediate", type=int, help="MLP size (default 14336)")
    p.add_argument("--heads", type=int, help="attention heads (default 32)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default 8)")
    p.add_argument("--vocab", type=int, help="vocabulary (default 128256)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--prompt-len", type=int, help="default 512 (--tiny: 16)")
    p.add_argument("--new-tokens", type=int, help="timed decode steps, default 128 (--tiny: 8)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, help="default 2 (--tiny: 1)")
    p.add_argument("--repeats", type=int, help="default 5 (--tiny: 2)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from a CUDA graph (both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, help="default benchmarks/results/decode-<device>.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run(args)
    except compress.CompressError as exc:
        print(f"decode.py: error: {exc}", file=sys.stderr)
        return 2
    path = args.json_out or default_output(out["model_config"], torch.device(out["device"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=2) + "\n")
    s = out["settings"]
    print(f"{out['checkpoint']} on {out['device']}: prefill {s['batch_size']} x {s['prompt_len']} tokens, decode "
          f"{s['new_tokens']} steps{' (CUDA graphs)' if s['cuda_graphs'] else ''}; quantized in "
          f"{out['quantize_seconds']:.1f} s")
    print(out["table"])
    print(f"decode speed-up {out['speedup_decode']:.2f}x, prefill {out['speedup_prefill']:.2f}x; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
