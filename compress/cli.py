"""The ``compress`` command line: quantize, prune, eval, run, inspect, bench, plan, devices, report,
export.

``compress quantize`` builds a one-pass recipe from its flags and runs it like ``compress run``,
so both print the same per-stage table and write the same report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
import yaml

from .version import __version__
from .api import apply
from .bench import BenchSettings, benchmark, calibrated_profile
from .configs import config_from_dict, method_of, methods
from .data import calibration_data
from .checkpoint.inspect import format_inspection, inspect_checkpoint
from .errors import CompressError, ConfigError
from .evaluation import evaluate
from .kernels.dequant_linear import BACKENDS
from .checkpoint.model_free import quantize_model_free
from .streamed import quantize_streaming
from .loading import _load_tokenizer, load_model, resolve_source
from .harness import default_task_data, run_tasks, task_manager
from .plan.command import add_plan_parser, run_plan
from .plan.devices import add_devices_parser, load_profile, match_local_profile, run_devices, save_profile
from .report_html import add_report_parser, run_report
from .checkpoint.gguf_export import add_export_parser, export_gguf
from .formats import SCHEMES, WeightFormat
from .guards import check_device
from .kv.config import KV_SCHEMES, KVCacheConfig
from .recipe import CalibrationSection, EvaluationSection, ExportSection, Recipe, load_recipe, run_recipe
from .workdir import work_path
from .distributed import init_from_env, launched_world, spawn
from .engine import engine_context

log = logging.getLogger("compress")



def _method_names(area: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The registered methods a subcommand offers (``--method``), read from the registry."""
    return [m.name for m in methods(area) if m.name not in exclude]


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (a config field and a YAML value), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"--set {key}: {value!r} is not a YAML value ({exc})") from None


def _method_config(method: str, flags: dict, settings: list[tuple[str, object]], where: str):
    """The config of ``method`` from the subcommand's flags that are fields of its config (the others
    do not apply to it) and the ``--set KEY=VALUE`` settings (any field; unknown keys are refused by
    name). A flag the user did not give is left out of ``flags`` by the caller (None can be a real
    value: ``--group-size channel``)."""
    fields = {f.name for f in dataclasses.fields(method_of(method).config)}
    spec = {"method": method, **{k: v for k, v in flags.items() if k in fields}}
    spec.update(dict(settings))
    return config_from_dict(spec, where)


def _missing_data(command: str, passes) -> int | None:
    """Exit code 2 with a message when a pass needs calibration data and --calib is missing."""
    names = [p.method for p in passes if method_of(p).needs_data(p)]
    if not names:
        return None
    print(f"compress {command}: error: {' and '.join(names)} need(s) --calib FILE (calibration text)", file=sys.stderr)
    return 2


def _group_size(text: str) -> int | None:
    """'channel' (or 'none'): one scale per output channel; else an integer, checked in
    ``_check_arguments`` (0 and -1 are refused there with a one-line message, not read as 'channel')."""
    if text.lower() in ("channel", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size takes an integer or 'channel', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Compress Hugging Face causal LMs.")
    p.add_argument("--version", action="version", version=f"compress {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's weights and export a checkpoint")
    q.add_argument("model", help="checkpoint directory, .gguf file, package:PKG/FILE or hub id")
    q.add_argument("--method", choices=_method_names("quantize", exclude=(KVCacheConfig.method,)) + ["none"],
                   default=None, help="weight quantizer (any registered quantization method; default gptq, rtn with "
                   "--model-free); 'none' leaves the weights alone (with --kv-cache: only the KV cache)")
    q.add_argument("--model-free", action="store_true",
                   help="quantize a safetensors checkpoint directory tensor by tensor without building the model "
                        "(rtn with a data-free scheme; bit for bit the model-based result; docs/model-free.md)")
    q.add_argument("--stream", action="store_true",
                   help="quantize a safetensors checkpoint directory one decoder layer in memory at a time, for "
                        "models larger than host memory (rtn/gptq; bit for bit the in-memory result; "
                        "docs/streaming.md)")
    q.add_argument("--set", dest="settings", metavar="KEY=VALUE", type=_setting, action="append", default=[],
                   help="any field of the method's config (repeatable), e.g. --set damp=0.05")
    q.add_argument("--scheme", choices=list(SCHEMES), default="int",
                   help="weight format: int (--bits/--group-size grid), nvfp4a16 (FP4 weights, FP8 scale per 16), "
                        "nvfp4 (W4A4: nvfp4a16 + activations, needs --calib), mxfp4 (FP4, E8M0 scale per 32); "
                        "W8A8 (8-bit weights and activations): fp8 (per channel, activations per token), "
                        "fp8-block (128x128 blocks, activations per 1x128), fp8-static (per tensor, needs --calib), "
                        "w8a8-int8 (INT8 per channel, activations per token), w8a8-int8-static (needs --calib)")
    q.add_argument("--bits", type=int, default=4)
    # SUPPRESS: left out of args unless given, so the config's default applies and an FP4 scheme
    # (which fixes its own block) can tell a --group-size the user gave from the default.
    q.add_argument("--group-size", type=_group_size, default=argparse.SUPPRESS,
                   help="columns per scale, or 'channel' (default 128; the FP4 schemes fix their own block)")
    q.add_argument("--asymmetric", action="store_true", help="integer zero point per group")
    q.add_argument("--observer", choices=["minmax", "mse"], help="scale choice (default: gptq mse, rtn minmax)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ: natural column order")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian damping (fraction of mean diagonal)")
    q.add_argument("--partial-groups", action="store_true",
                   help="allow a narrower last group when group size does not divide in_features")
    q.add_argument("--ignore", nargs="*", default=["lm_head"], help="module name patterns left dense")
    q.add_argument("--calib", help="calibration text file or hub dataset NAME[:CONFIG][@SPLIT] (GPTQ)")
    q.add_argument("--calib-samples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, help="calibration samples per forward chunk (default: fit memory)")
    q.add_argument("--eval", dest="eval_data", help="evaluate perplexity on this text before and after")
    q.add_argument("--max-windows", type=int, default=None)
    q.add_argument("--dtype", default="auto")
    q.add_argument("--device", default=None, help="compute device for calibration (default: cuda if present)")
    q.add_argument("--backend", choices=BACKENDS, default="auto", help=_BACKEND_HELP + " (for --eval)")
    _kv_arguments(q, eval_flags=False)
    q.add_argument("--output", "-o", required=True)
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    _parallel_arguments(q)

    _prune_parser(sub)

    e = sub.add_parser("eval", help="perplexity of a model or checkpoint on a text, and/or lm-eval tasks")
    e.add_argument("model")
    e.add_argument("--data", help="perplexity on this text file or hub dataset NAME[:CONFIG][@SPLIT]")
    e.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: the local wikitext_cloze and "
                                   "wikitext_nextsent (built from --task-data), or any lm-eval task name")
    e.add_argument("--task-data", help="text the local tasks are built from (default: $COMPRESS_TASK_DATA, else "
                                       "../shared/data/wikitext-2/test.txt if present)")
    e.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    e.add_argument("--num-fewshot", type=int, default=None, help="in-context examples per task (default: the task's)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--device", default=None)
    e.add_argument("--sample", metavar="PROMPT", help="also print a short greedy continuation of PROMPT")
    e.add_argument("--backend", choices=BACKENDS, default="auto", help=_BACKEND_HELP)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _kv_arguments(e, eval_flags=True)

    r = sub.add_parser("run", help="run a YAML recipe")
    r.add_argument("recipe")
    r.add_argument("--output", "-o", help="export directory (overrides the recipe's export.output)")
    r.add_argument("--overwrite", action="store_true", default=None)
    r.add_argument("--backend", choices=BACKENDS, default=None,
                   help=_BACKEND_HELP + " (overrides the recipe's backend)")
    r.add_argument("--restart", action="store_true",
                   help="ignore the work directory of an interrupted run (OUTPUT.work) and start from the first pass")
    _parallel_arguments(r)

    _bench_parser(sub)
    add_plan_parser(sub)
    add_devices_parser(sub)
    add_report_parser(sub)
    add_export_parser(sub)

    i = sub.add_parser("inspect", help="what a checkpoint holds: format, bits, groups, size")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    return p


def _parallel_arguments(parser) -> None:
    g = parser.add_argument_group("data-parallel calibration (docs/distributed.md)")
    g.add_argument("--workers", type=int, default=None,
                   help="spread the calibration samples over N local processes (torch.distributed: gloo on CPU, NCCL "
                        "on GPUs, one GPU each); the checkpoint equals --workers 1 bit for bit. Under torchrun, omit it")
    g.add_argument("--shards", type=int, default=None,
                   help="calibration shards of the fixed reduction layout (default: a multiple of 8 and of the "
                        "workers); any worker count dividing it gives the same checkpoint")


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (unstructured, N:M or structured), retrain it, export it",
                       description="Prune with magnitude, Wanda or SparseGPT (weights set to zero) or structured "
                                   "pruning (MLP channels, attention heads, layers removed), optionally retrain "
                                   "with mask-preserving LoRA, and export. See docs/pruning.md.")
    p.add_argument("model", help="checkpoint directory, .gguf file, package:PKG/FILE or hub id")
    p.add_argument("--method", choices=_method_names("prune"), default="wanda", help="pruning method")
    p.add_argument("--set", dest="settings", metavar="KEY=VALUE", type=_setting, action="append", default=[],
                   help="any field of the method's config (repeatable), e.g. --set layer_sparsity='{lm_head: 0}'")
    p.add_argument("--sparsity", type=float, help="fraction of weights set to zero (default 0.5)")
    p.add_argument("--pattern", help="N:M pattern, e.g. 2:4 (keep N of every M consecutive inputs)")
    p.add_argument("--comparison", choices=["row", "layer"], default="row", help="unstructured: per row or per layer")
    p.add_argument("--bits", type=int, help="sparsegpt: also quantize the survivors to this many bits (joint solve)")
    p.add_argument("--group-size", type=_group_size, default=128, help="sparsegpt --bits: columns per scale")
    p.add_argument("--target", choices=["mlp", "heads", "layers"], default="mlp", help="structured: what to remove")
    p.add_argument("--ratio", type=float, default=0.25, help="structured: fraction of channels/heads/layers removed")
    p.add_argument("--importance", choices=["activation", "weight", "random"], default="activation",
                   help="structured: ranking")
    p.add_argument("--ignore", nargs="*", default=["lm_head"], help="module name patterns left dense")
    p.add_argument("--lora-steps", type=int, default=0, help="retrain with mask-preserving LoRA for this many steps "
                   "(0: no retraining)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate (default: the LoRAConfig's)")
    p.add_argument("--lora-minutes", type=float, default=None, help="stop retraining after this many minutes")
    p.add_argument("--train-samples", type=int, default=None,
                   help="LoRA training windows from --calib (default: --calib-samples)")
    p.add_argument("--calib", help="calibration text file or hub dataset NAME[:CONFIG][@SPLIT]")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration samples per forward chunk (default: fit memory)")
    p.add_argument("--eval", dest="eval_data", help="evaluate perplexity on this text before and after each stage")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="compute device (default: cuda if present)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=_BACKEND_HELP + " (for --eval)")
    p.add_argument("--layout", choices=["dense", "compact"], default="dense",
                   help="dense: zeros kept, loads anywhere; compact: our 2:4 layout (values + 2-bit positions)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    _parallel_arguments(p)


def _prune_passes(args) -> list:
    fields = {f.name for f in dataclasses.fields(method_of(args.method).config)}
    if args.bits is not None and "bits" not in fields:
        raise ConfigError(f"--bits (joint pruning + quantization) needs --method sparsegpt; --method "
                          f"{args.method} has no bits")
    flags = {"target": args.target, "ratio": args.ratio, "importance": args.importance, "pattern": args.pattern,
             "comparison": args.comparison, "ignore": list(args.ignore)}
    if args.sparsity is not None:
        flags["sparsity"] = args.sparsity
    if args.bits is not None:
        flags.update(bits=args.bits, group_size=args.group_size)
    passes = [_method_config(args.method, flags, args.settings, "command line")]
    if args.lora_steps:
        lora = {"method": "lora", "steps": args.lora_steps, "rank": args.lora_rank}
        if args.lora_lr is not None:
            lora["learning_rate"] = args.lora_lr
        if args.lora_minutes is not None:
            lora["max_minutes"] = args.lora_minutes
        if args.train_samples is not None:
            lora["samples"] = args.train_samples
        passes.append(config_from_dict(lora, "command line (LoRA)"))
    return passes


def _prune(args) -> int:
    passes = _prune_passes(args)
    if not args.calib and (code := _missing_data("prune", passes)) is not None:
        return code
    recipe = Recipe(model=args.model, dtype=args.dtype, device=args.device, backend=args.backend, passes=passes,
                    calibration=CalibrationSection(args.calib, args.calib_samples, args.seqlen, args.seed,
                                                   batch_size=args.batch_size) if args.calib else None,
                    evaluation=EvaluationSection(args.eval_data, args.seqlen, args.max_windows)
                    if args.eval_data else None,
                    export=ExportSection(args.output, overwrite=args.overwrite, layout=args.layout))
    run_recipe(recipe, progress=not args.quiet)
    return 0


def _kv_arguments(p: argparse.ArgumentParser, eval_flags: bool) -> None:
    d = KVCacheConfig()
    g = p.add_argument_group("KV cache", "quantize the keys and values stored while generating (docs/kv-cache.md)")
    g.add_argument("--kv-cache", choices=KV_SCHEMES,
                   help="int8/int4/int2: KIVI integers (keys per channel, values per token); fp8: E4M3 with "
                        "calibrated scales, exported for vLLM" + ("" if eval_flags else " (needs --calib)"))
    g.add_argument("--kv-group-size", type=int, default=d.group_size, help="tokens per key block, channels per "
                   "value group (integer schemes)")
    g.add_argument("--kv-residual", type=int, default=None,
                   help="recent tokens kept in full precision (default 128 for integers, 0 for fp8)")
    g.add_argument("--kv-fp8-scale", choices=["tensor", "head"], default=d.fp8_scale, help="fp8 scale granularity")
    g.add_argument("--kv-rotate", action="store_true", help="Hadamard-rotate keys before quantizing (integers)")
    g.add_argument("--kv-scale-dtype", choices=["fp16", "fp8"], default=d.scale_dtype,
                   help="storage of the integer schemes' scales and minima (fp8: one byte each)")
    g.add_argument("--kv-sink", type=int, default=d.sink_tokens, metavar="N",
                   help="keep each sequence's first N tokens in full precision (attention sinks)")
    g.add_argument("--kv-h2o", type=_h2o_budget, default=None, metavar="BUDGET",
                   help="H2O eviction: keep BUDGET tokens per layer and KV head (a fraction like 0.2 of the "
                        "context, or an integer token count); without --kv-cache the kept tokens stay 16-bit")
    g.add_argument("--kv-h2o-recent", type=float, default=d.h2o_recent, metavar="SHARE",
                   help="share of the H2O budget for the most recent tokens (rest: heavy hitters; 1 = recent only)")
    if eval_flags:
        g.add_argument("--kv-chunk", type=int, default=1,
                       help="tokens per forward through the cache (1 = decode token by token)")
        g.add_argument("--calib", help="calibration text for fp8 scales (default: scales from the first chunk)")


def _h2o_budget(text: str) -> int | float:
    """--kv-h2o: '64' is a token count, '0.2' a fraction of the context."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a fraction like 0.2 or a token count like 64, got {text!r}")


def _kv_config(args) -> KVCacheConfig | None:
    h2o = getattr(args, "kv_h2o", None)
    if not args.kv_cache and h2o is None:
        return None
    return KVCacheConfig(scheme=args.kv_cache or "none", group_size=args.kv_group_size,
                         residual_length=args.kv_residual, fp8_scale=args.kv_fp8_scale, rotate_keys=args.kv_rotate,
                         scale_dtype=args.kv_scale_dtype, sink_tokens=args.kv_sink, h2o_budget=h2o,
                         h2o_recent=getattr(args, "kv_h2o_recent", 0.5))


_BACKEND_HELP = "kernels of the packed layers: auto (Triton on CUDA, PyTorch on CPU), torch or triton"


def _bench_parser(sub) -> None:
    d = BenchSettings()
    b = sub.add_parser("bench", help="prefill and decode tokens/s and peak memory of a checkpoint vs dense",
                       description="Measure a compressed checkpoint in our runtime against a dense baseline: "
                                   "prefill tokens/s, decode tokens/s, peak memory, weight bytes.")
    b.add_argument("checkpoint", help="directory written by compress export (or compress quantize/run)")
    base = b.add_mutually_exclusive_group()
    base.add_argument("--baseline", metavar="PATH",
                      help="dense original to compare with (default: the checkpoint dequantized to --dtype)")
    base.add_argument("--no-baseline", action="store_true", help="measure the checkpoint only")
    b.add_argument("--backend", choices=BACKENDS, default="auto", help=_BACKEND_HELP)
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    b.add_argument("--dtype", default="bfloat16", help="activation and dense-weight dtype (default bfloat16)")
    b.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens per sequence")
    b.add_argument("--new-tokens", type=int, default=d.new_tokens, help="timed decode steps")
    b.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward")
    b.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs before the timed ones")
    b.add_argument("--repeats", type=int, default=d.repeats, help="timed runs (the median is reported)")
    b.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompt token ids")
    b.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps from a CUDA graph (both models; falls back to eager on failure)")
    b.add_argument("--profile", default="auto",
                   help="device profile whose cost-model prediction is shown next to the measurement "
                        "(auto: the one matching this machine; none: no prediction)")
    b.add_argument("--calibrate", nargs="?", const="", metavar="NAME",
                   help="refit the profile's kernel efficiencies to these measurements and save it "
                        "(as NAME, default the profile's name) in the user profile folder")
    b.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    parallel = getattr(args, "workers", None) is not None or launched_world() > 1
    if getattr(args, "workers", None) is not None and launched_world() == 1 and args.workers != 1:
        try:
            if args.workers < 1:
                raise ConfigError(f"--workers {args.workers}: pass at least 1")
            return spawn(_without_workers(argv), args.workers, args.shards)
        except CompressError as exc:
            print(f"compress {args.command}: error: {exc}", file=sys.stderr)
            return 2
    rank = int(os.environ.get("RANK", "0")) if launched_world() > 1 else 0
    if rank:                                   # another rank: rank 0 speaks for the run
        args.quiet = True
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=(f"[rank {rank}] " if launched_world() > 1 else "") + "%(levelname)s %(name)s: %(message)s")
    out, before = None, None
    try:
        out = _output_dir(args)
        before = _snapshot(out)
        _check_arguments(args)
        if not parallel:
            return _COMMANDS[args.command](args)
        dp = init_from_env(args.shards)
        try:
            with engine_context(parallel=dp):
                return _COMMANDS[args.command](args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except CompressError as exc:
        print(f"compress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Exports are written to a temporary folder and moved into place, so an interrupt leaves the
        # output as it was; say so in one line instead of a traceback. 130 = 128 + SIGINT, as shells do.
        print(f"compress {args.command}: {_interrupted(out, before)}", file=sys.stderr)
        return 130


def _without_workers(argv: list[str]) -> list[str]:
    """``argv`` less its ``--workers N`` / ``--workers=N`` (what each spawned rank runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


# Flags that count something and must be at least 1, with what to do instead.
_AT_LEAST_ONE = {"max_windows": "omit --max-windows to evaluate every window",
                 "limit": "omit --limit to evaluate every document",
                 "batch_size": "omit --batch-size for the default"}
# The subcommands whose --device is a torch device (plan's names a device profile).
_DEVICE_COMMANDS = ("quantize", "prune", "eval", "bench")


def _check_arguments(args) -> None:
    """Refuse flag values that cannot work before any model is loaded (ConfigError: one line, exit 2)."""
    group_size = getattr(args, "group_size", None)
    if group_size is not None and group_size <= 0:
        raise ConfigError(f"--group-size {group_size}: a group size is a positive number of input columns per "
                          f"scale; for one scale per output channel (what -1 means in other GPTQ tools) pass "
                          f"--group-size channel")
    for name, fix in _AT_LEAST_ONE.items():
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be at least 1; {fix}")
    if args.command in _DEVICE_COMMANDS:
        check_device(args.device, "--device")
    if args.command == "quantize" and args.scheme != "int" and "group_size" in args:
        block = WeightFormat.from_scheme(args.scheme).group_size
        if args.group_size != block:
            given = "channel" if args.group_size is None else args.group_size
            fixed = f"its block is fixed at {block} inputs" if block else "its scales are fixed per channel or tensor"
            raise ConfigError(f"--group-size {given} does not apply to --scheme {args.scheme}: {fixed}; drop "
                              f"--group-size (or use --scheme int for integer groups)")


def _output_dir(args) -> Path | None:
    """The directory the command exports to (None: it writes none), as the run will resolve it."""
    if args.command in ("quantize", "prune"):
        return Path(args.output)
    if args.command != "run":
        return None
    if args.output:
        return Path(args.output)
    recipe = load_recipe(args.recipe)           # read again by _run; cheap, and errors surface the same
    return Path(recipe.path(recipe.export.output)) if recipe.export else None


def _snapshot(path: Path | None) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``, None when it does not exist: tells whether an export replaced it."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _interrupted(out: Path | None, before: tuple[int, int] | None) -> str:
    """The one line a Ctrl-C gets: what became of the output directory, and how to resume."""
    if out is None:
        return "interrupted"
    now = _snapshot(out)
    if now is None and before is None:
        line = f"interrupted; nothing was written to {out}"
    elif now == before:
        line = f"interrupted; {out} was left as it was"
    else:
        line = f"interrupted while {out} was being written; check it, or rerun with --overwrite"
    work = work_path(out)
    if work.is_dir():
        line += f" (finished passes are kept in {work}: rerun the same command to resume)"
    return line


def _quantize(args) -> int:
    if args.method is None:
        args.method = "rtn" if args.model_free else "gptq"
    if args.model_free and args.stream:
        raise ConfigError("--model-free and --stream are two ways to quantize without loading the whole model; "
                          "pick one (--model-free: rtn, no model built; --stream: rtn or gptq, one layer at a time)")
    if args.model_free:
        return _quantize_model_free(args)
    if args.stream:
        return _quantize_streamed(args)
    kv = _kv_config(args)
    passes = [kv] if kv is not None else []
    if kv is not None and kv.is_fp8 and not args.calib:
        print("compress quantize: error: --kv-cache fp8 calibrates its scales: add --calib FILE", file=sys.stderr)
        return 2
    if args.method == "none":
        if kv is None:
            print("compress quantize: error: --method none quantizes nothing; add --kv-cache SCHEME", file=sys.stderr)
            return 2
        return _run_passes(args, passes)
    cfg = _method_config(args.method, _weight_flags(args), args.settings, "command line")
    if not args.calib and method_of(cfg).needs_data(cfg):
        # Smoothing passes have no weight format; their data need is the method's own.
        static = getattr(getattr(cfg, "weight_format", None), "static_activations", False)
        what = (f"--method {args.method}" if args.method == "gptq" or not static
                else f"--scheme {args.scheme} ({'W4A4' if args.scheme == 'nvfp4' else 'W8A8 static'} activation "
                     f"scales)")
        print(f"compress quantize: error: {what} needs --calib FILE (calibration text)", file=sys.stderr)
        return 2
    return _run_passes(args, [cfg] + passes)


def _weight_flags(args) -> dict:
    """The weight-quantization config fields ``compress quantize``'s flags give."""
    flags = dict(bits=args.bits, symmetric=not args.asymmetric,
                 partial_groups=args.partial_groups, ignore=list(args.ignore), scheme=args.scheme,
                 act_order=not args.no_act_order, damp=args.damp)
    if "group_size" in args:
        flags["group_size"] = args.group_size
    if args.observer:
        flags["observer"] = args.observer
    return flags


def _quantize_model_free(args) -> int:
    """``compress quantize SRC --model-free``: no model is built, loaded or run (docs/model-free.md)."""
    given = [flag for flag, value in (("--calib", args.calib), ("--eval", args.eval_data),
                                      ("--kv-cache", args.kv_cache), ("--device", args.device)) if value]
    if given:
        raise ConfigError(f"{', '.join(given)} do(es) not apply to --model-free, which reads and writes weights "
                          f"without running the model; drop {'it' if len(given) == 1 else 'them'}, or quantize "
                          f"without --model-free")
    if args.method == "none":
        raise ConfigError("--method none quantizes nothing; --model-free takes --method rtn")
    cfg = _method_config(args.method, _weight_flags(args), args.settings, "command line")
    start = time.perf_counter()
    out = quantize_model_free(resolve_source(args.model), args.output, cfg, overwrite=args.overwrite,
                              dtype=args.dtype, progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 2**20:.1f} MiB of weights, {cfg.weight_format} round-to-nearest, model-free) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _quantize_streamed(args) -> int:
    """``compress quantize SRC --stream``: one decoder layer in host memory at a time (docs/streaming.md)."""
    given = [flag for flag, value in (("--eval", args.eval_data), ("--kv-cache", args.kv_cache)) if value]
    if given:
        raise ConfigError(f"{', '.join(given)} do(es) not apply to --stream, which never holds the whole model; "
                          f"evaluate the written checkpoint with compress eval, or quantize without --stream")
    if args.method == "none":
        raise ConfigError("--method none quantizes nothing; --stream takes --method rtn or gptq")
    cfg = _method_config(args.method, _weight_flags(args), args.settings, "command line")
    if not args.calib and method_of(cfg).needs_data(cfg):
        raise ConfigError(f"--method {args.method} --scheme {args.scheme} needs --calib FILE (calibration text)")
    calib = None
    if args.calib:
        source = resolve_source(args.model)
        calib = calibration_data(_load_tokenizer(source), args.calib, args.calib_samples, args.seqlen,
                                 seed=args.seed)
    start = time.perf_counter()
    out = quantize_streaming(args.model, cfg, args.output, calib, dtype=args.dtype, device=args.device,
                             batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 2**20:.1f} MiB of weights, {cfg.method} {cfg.weight_format}, streamed) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _run_passes(args, passes) -> int:
    recipe = Recipe(model=args.model, dtype=args.dtype, device=args.device, backend=args.backend, passes=passes,
                    calibration=CalibrationSection(args.calib, args.calib_samples, args.seqlen, args.seed,
                                                   batch_size=args.batch_size) if args.calib else None,
                    evaluation=EvaluationSection(args.eval_data, args.seqlen, args.max_windows)
                    if args.eval_data else None,
                    export=ExportSection(args.output, overwrite=args.overwrite))
    run_recipe(recipe, progress=not args.quiet)
    return 0


def _eval(args) -> int:
    if not args.data and not args.tasks:
        raise ConfigError("compress eval needs --data TEXT (perplexity) or --tasks NAMES (lm-eval tasks, e.g. "
                          "--tasks wikitext_cloze,wikitext_nextsent), or both")
    if args.tasks:
        return _eval_tasks(args)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    kv = _kv_config(args)
    if kv is not None and kv.is_fp8 and args.calib:
        apply(model, kv, calibration_data(tok, args.calib, samples=32, seqlen=args.seqlen),
              progress=not (args.quiet or args.json))
    result = evaluate(model, tok, args.data, seqlen=args.seqlen, max_windows=args.max_windows,
                      batch_size=args.batch_size, sample_prompt=args.sample, progress=not (args.quiet or args.json),
                      kv_cache=kv, kv_chunk=args.kv_chunk, backend=args.backend)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens in {result.windows} windows "
              f"of {result.seqlen} ({result.seconds:.1f} s) on {result.source}"
              + (f", decoded through a {result.kv_cache} KV cache, {result.kv_chunk} token(s) per step"
                 if result.kv_cache else ""))
        if result.sample is not None:
            print(f"sample: {args.sample!r} -> {result.sample!r}")
    return 0


def _eval_tasks(args) -> int:
    """``compress eval --tasks``: lm-eval tasks (and perplexity too when --data is given)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if _kv_config(args) is not None:
        raise ConfigError("--kv-cache/--kv-h2o apply to --data perplexity only: lm-eval tasks run the model's "
                          "plain forward; drop them or --tasks")
    task_data = args.task_data or default_task_data()
    registry = task_manager(tasks, task_data=task_data)   # unknown names, missing data: fail before loading
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    ppl = evaluate(model, tok, args.data, seqlen=args.seqlen, max_windows=args.max_windows,
                   batch_size=args.batch_size, progress=not (args.quiet or args.json)) if args.data else None
    result = run_tasks(model, tok, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, device=args.device, registry=registry)
    if args.json:
        print(json.dumps({**result.to_dict(), "perplexity": ppl.to_dict() if ppl else None}))
        return 0
    if ppl is not None:
        print(f"perplexity {ppl.perplexity:.4f} over {ppl.tokens} tokens in {ppl.windows} windows of {ppl.seqlen} "
              f"on {ppl.source}")
    shots = "the tasks' default" if args.num_fewshot is None else args.num_fewshot
    print(f"{args.model}: lm-eval {result.lm_eval_version}, {args.limit or 'all'} documents per task, "
          f"few-shot {shots} ({result.seconds:.1f} s)")
    print(result.table())
    return 0


def _export(args) -> int:
    """``compress export SOURCE --format gguf -o FILE``."""
    model, tok = load_model(args.source, tokenizer=args.tokenizer)
    report = export_gguf(model, tok, args.output, allow_requant=args.allow_requant, overwrite=args.overwrite,
                         embedding_type=args.embedding_type, pre_tokenizer=args.pre_tokenizer)
    s = report.summary()
    if args.json:
        print(json.dumps(s))
    else:
        types = ", ".join(f"{n} {k}" for k, n in sorted(s["types"].items()))
        exact = ("exact: every quantized tensor decodes to our weights" if s["exact"] else
                 f"{s['inexact_tensors']} of {s['quantized_tensors']} quantized tensors differ by up to "
                 f"{s['max_abs_error']:.3g} (fp16 block scales)")
        print(f"wrote {s['path']} ({s['file_bytes'] / 2**20:.1f} MiB): {types}; {exact}"
              + (f"; re-rounded: {len(s['requantized'])} tensors" if s["requantized"] else ""))
    return 0


def _run(args) -> int:
    recipe = load_recipe(args.recipe)
    if args.backend is not None:
        recipe.backend = args.backend
    run_recipe(recipe, output=Path(args.output) if args.output else None, overwrite=args.overwrite,
               progress=not args.quiet, resume=not args.restart)
    return 0


def _inspect(args) -> int:
    info = inspect_checkpoint(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _bench(args) -> int:
    settings = BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch_size=args.batch_size,
                             warmup=args.warmup, repeats=args.repeats, cuda_graphs=args.cuda_graphs, seed=args.seed)
    baseline = None if args.no_baseline else (args.baseline or "dequantized")
    profile = _bench_profile(args)
    result = benchmark(args.checkpoint, baseline=baseline, backend=args.backend, device=args.device,
                       dtype=args.dtype, settings=settings, profile=profile)
    if args.calibrate is not None:
        if profile is None:
            raise ConfigError("--calibrate needs a device profile to refit; drop --profile none")
        fitted = calibrated_profile(profile, result)
        if args.calibrate:
            fitted = dataclasses.replace(fitted, name=args.calibrate)
        path = save_profile(fitted)
        log.info("calibrated profile %s saved to %s", fitted.name, path)
        if not args.json:
            print(f"calibrated profile {fitted.name!r} saved to {path}: {fitted.notes}")
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    s = result.settings
    print(f"{result.checkpoint} on {result.device}, {result.dtype}: prefill {s.batch_size} x {s.prompt_len} tokens, "
          f"decode {s.new_tokens} steps at batch {s.batch_size}{' (CUDA graphs)' if s.cuda_graphs else ''}; "
          f"median of {s.repeats} runs after {s.warmup} warm-up")
    print(result.table())
    return 0


def _bench_profile(args):
    """The profile `compress bench` predicts with: named, matched to this machine, or none."""
    if args.profile == "none":
        return None
    if args.profile != "auto":
        return load_profile(args.profile)
    try:
        return match_local_profile(args.device)
    except ConfigError as exc:
        log.warning("no prediction: %s", exc)
        return None


_COMMANDS = {"quantize": _quantize, "prune": _prune, "eval": _eval, "run": _run, "inspect": _inspect, "bench": _bench,
             "plan": run_plan, "devices": run_devices, "report": run_report,
             "export": _export}


if __name__ == "__main__":
    sys.exit(main())
