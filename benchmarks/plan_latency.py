"""The planner's decode-latency prediction against measurement: a Llama-3-8B-shaped model in bf16,
int8, int4 and NVFP4, each measured in our runtime and predicted by the cost model on a device profile.

    python benchmarks/plan_latency.py                          # Llama-3-8B dimensions on CUDA, profile of this GPU
    python benchmarks/plan_latency.py --cuda-graphs            # decode steps from a CUDA graph
    python benchmarks/plan_latency.py --calibrate h100         # refit the profile's efficiencies, save, predict again
    python benchmarks/plan_latency.py --tiny --device cpu      # smoke test on a CPU

Per format, the model is built from its config on the device (random bfloat16 weights, as in
benchmarks/decode.py), quantized in place with round-to-nearest (``int8``: per channel; ``int4``:
g128; ``nvfp4a16``: NVFP4 weights; lm_head stays bf16), and measured by ``compress.bench.measure``
(the code of ``compress bench``). The prediction is ``compress.bench.attach_prediction``: the same
cost model ``compress plan`` uses, for the same batch, prompt and decode steps. The target on an
H100: every format's predicted decode latency within 15% of the measured one. Prints a table and
writes JSON (default benchmarks/results/plan-latency-<device>.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

import compress
from compress.bench import BenchResult, BenchSettings, attach_prediction, calibrated_profile, measure
from compress.engine import default_device
from compress.plan.devices import load_profile, match_local_profile, save_profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import LLAMA3_8B, TINY, TINY_SETTINGS, build_model, parameter_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.plan_latency")
FORMATS = {"bf16": None, "int8": dict(bits=8, group_size=None), "int4-g128": dict(bits=4, group_size=128),
           "nvfp4a16": dict(scheme="nvfp4a16")}
TOLERANCE = 0.15


def run(args) -> dict:
    device = torch.device(args.device) if args.device else default_device()
    dims = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        dims["num_hidden_layers"] = args.layers
    if device.type != "cuda" and parameter_count(dims) > 1e9:
        raise compress.ConfigError(f"{parameter_count(dims) / 1e9:.1f}B parameters on {device}: run on a GPU, or "
                                   f"pass --tiny (or fewer --layers)")
    profile = load_profile(args.profile) if args.profile else match_local_profile(device)
    overrides = {k: getattr(args, k) for k in ("prompt_len", "new_tokens", "warmup", "repeats")
                 if getattr(args, k) is not None}
    settings = BenchSettings(**{**(TINY_SETTINGS if args.tiny else {}), **overrides}, batch_size=args.batch_size,
                             cuda_graphs=args.cuda_graphs)
    rows = []
    for name in args.formats:
        if name not in FORMATS:
            raise compress.ConfigError(f"--formats: {name!r} is not one of {sorted(FORMATS)}")
        start = time.perf_counter()
        model = build_model(dims, device, args.seed)
        if FORMATS[name] is not None:
            compress.quantize(model, compress.RTNConfig(**FORMATS[name]), device=device, progress=False)
        log.info("%s: built and quantized in %.1f s", name, time.perf_counter() - start)
        m = measure(model, settings, name)
        attach_prediction(m, model, profile, settings)
        rows.append(m)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "profile": profile.to_dict(), "model_config": dims, "settings": dataclasses.asdict(settings),
           "rows": [_row(m) for m in rows]}
    if args.calibrate:
        # fit bf16 on the bf16 row, then each quantized family on its row (BenchResult: baseline last)
        fitted = profile
        for m in sorted(rows, key=lambda m: m.name != "bf16"):
            fitted = calibrated_profile(fitted, BenchResult("plan_latency", str(device), "bfloat16", None, settings,
                                                            [m]))
        fitted = dataclasses.replace(fitted, name=args.calibrate)
        out["calibrated_profile"] = fitted.to_dict()
        out["calibrated_profile_path"] = str(save_profile(fitted))
    return out


def _row(m) -> dict:
    err = m.decode_seconds / m.predicted_decode_seconds - 1 if m.predicted_decode_seconds else None
    return {"format": m.name, "measured_decode_tokens_per_s": m.decode_tokens_per_s,
            "predicted_decode_tokens_per_s": m.decode_tokens_per_s * m.decode_ratio if m.decode_ratio else None,
            "measured_decode_seconds": m.decode_seconds, "predicted_decode_seconds": m.predicted_decode_seconds,
            "decode_error": err, "within_15_percent": None if err is None else abs(err) <= TOLERANCE,
            "measured_prefill_tokens_per_s": m.prefill_tokens_per_s,
            "predicted_prefill_tokens_per_s": m.prefill_tokens_per_s * m.prefill_ratio if m.prefill_ratio else None,
            "weight_bytes": m.weight_bytes}


def default_output(device: torch.device, tiny: bool) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return ROOT / "benchmarks" / "results" / f"plan-latency-{slug}{'-tiny' if tiny else ''}.json"


def format_rows(out: dict) -> str:
    lines = ["| format | decode tok/s measured | predicted | error | within 15% | prefill tok/s measured | predicted |",
             "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        err = "-" if r["decode_error"] is None else f"{r['decode_error']:+.1%}"
        ok = "-" if r["within_15_percent"] is None else ("yes" if r["within_15_percent"] else "no")
        lines.append(f"| {r['format']} | {r['measured_decode_tokens_per_s']:.1f} | "
                     f"{r['predicted_decode_tokens_per_s'] or 0:.1f} | {err} | {ok} | "
                     f"{r['measured_prefill_tokens_per_s']:.0f} | {r['predicted_prefill_tokens_per_s'] or 0:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model with small dimensions (smoke test)")
    p.add_argument("--layers", type=int, help="decoder layers (default 32)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), help=f"among {list(FORMATS)}")
    p.add_argument("--profile", help="device profile (default: the one matching this machine)")
    p.add_argument("--calibrate", metavar="NAME", help="refit efficiencies to these measurements, save as NAME")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run(args)
    except compress.CompressError as exc:
        print(f"plan_latency.py: error: {exc}", file=sys.stderr)
        return 2
    path = args.json_out or default_output(torch.device(out["device"]), args.tiny)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'Llama-3-8B' if not args.tiny else 'tiny Llama'} shapes on {out['gpu'] or out['device']}, profile "
          f"{out['profile']['name']} ({out['profile']['source']})")
    print(format_rows(out))
    if "calibrated_profile_path" in out:
        print(f"calibrated profile saved to {out['calibrated_profile_path']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
