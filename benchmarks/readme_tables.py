"""Render README.md's result tables from the benchmark JSONs in benchmarks/results/.

Each rendered table sits in README.md between two marker lines:

    <!-- table:quantization -->

    | setting | perplexity | ... |
    ...

    <!-- /table -->

`python benchmarks/readme_tables.py --check` renders every table and exits 1 with a unified diff when
README.md differs (tests/test_readme_tables.py runs it); `--write` rewrites the marked blocks in place.
Every number comes from a JSON; the labels, which cells are bold and how many digits a column shows
are this script's (README presentation). A table whose JSON row is missing fails loudly, naming the
file and the setting.

Not rendered here (no JSON, or numbers assembled from several kinds of run): the GPU claims table
(`benchmarks/results/gpu-suite-h200.*` plus the graph-tuned reruns) and the prose figures.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- table:(?P<name>[a-z0-9_-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


# ------------------------------------------------------------------------------------- inputs

def load(name: str, results: Path = RESULTS) -> dict:
    path = results / name
    if not path.is_file():
        raise SystemExit(f"readme_tables: {path} is missing; rerun the benchmark that writes it")
    return json.loads(path.read_text())


def by_key(rows: list[dict], where: str, key: str = "setting") -> dict[str, dict]:
    """Rows of a results list keyed on ``key``; a lookup of an absent row names the file."""
    return _Rows({r[key]: r for r in rows}, where)


class _Rows(dict):
    def __init__(self, data: dict, where: str):
        super().__init__(data)
        self.where = where

    def __missing__(self, key):
        raise SystemExit(f"readme_tables: {self.where} has no row {key!r} (it has {sorted(self)})")


# ------------------------------------------------------------------------------------- cells

def ppl(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def secs(v: float, digits: int = 1) -> str:
    return f"{v:.{digits}f}"


def bold(text: str) -> str:
    return f"**{text}**"


def pct(v: float, base: float, digits: int = 1) -> str:
    """Relative change of ``v`` over ``base`` in percent, signed."""
    return f"{100 * (v / base - 1):+.{digits}f}%"


def delta(v: float, base: float, digits: int) -> str:
    return f"{v - base:+.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["|" + "|".join(f" {c} " if c else " " for c in r) + "|" for r in rows]      # an empty cell is "| |"
    return "\n".join(out)


# ------------------------------------------------------------------------------------- tables

def quantization(results: Path) -> str:
    """Integer RTN / GPTQ (`benchmarks/quantization.py --verify`)."""
    r = by_key(load("quantization-smollm2.json", results)["rows"], "quantization-smollm2.json")
    rows = []
    for setting, label, strong in [("float", "float32", False), ("rtn-w4g64-sym", "RTN int4 g64 sym", False),
                                   ("gptq-w4g64-sym", "GPTQ int4 g64 sym", True),
                                   ("rtn-w4g64-asym", "RTN int4 g64 asym", False),
                                   ("gptq-w4g64-asym", "GPTQ int4 g64 asym", False),
                                   ("rtn-w3g64-asym", "RTN int3 g64 asym", False),
                                   ("gptq-w3g64-asym", "GPTQ int3 g64 asym", False),
                                   ("rtn-w8-channel", "RTN int8 per channel", False),
                                   ("gptq-w8-channel", "GPTQ int8 per channel", False)]:
        s = r[setting]
        b = bold if strong else str
        q = secs(s["quantize_seconds"]) if "quantize_seconds" in s else "-"
        rows.append([b(label), b(ppl(s["perplexity"])), b(q) if q != "-" else q, mib(s["checkpoint_bytes"]),
                     f"{s['size_over_ideal']:.4f}", _opt(s, "reload_perplexity"), _opt(s, "transformers_perplexity")])
    return table(["setting", "perplexity", "quantize s", "checkpoint MiB", "size / ideal", "reloaded (compress)",
                  "reloaded (transformers)"], rows)


def _opt(s: dict, key: str, missing: str = "-") -> str:
    return ppl(s[key]) if s.get(key) is not None else missing


def fp4(results: Path) -> str:
    """NVFP4 / MXFP4 (`--fp4 --verify`); eval seconds from the quiet rerun."""
    r = by_key(load("quantization-smollm2-fp4.json", results)["rows"], "quantization-smollm2-fp4.json")
    quiet = by_key(load("quantization-smollm2-fp4-evaltime.json", results)["rows"],
                   "quantization-smollm2-fp4-evaltime.json")
    rows = []
    for setting, label, strong in [("nvfp4a16-rtn", "NVFP4A16 RTN", False),
                                   ("nvfp4a16-gptq", "**NVFP4A16 GPTQ** (mse block scales)", True),
                                   ("nvfp4-rtn", "NVFP4 W4A4 RTN", False), ("nvfp4-gptq", "NVFP4 W4A4 GPTQ", False),
                                   ("mxfp4-rtn", "MXFP4 RTN", False), ("mxfp4-gptq", "MXFP4 GPTQ", False)]:
        s = r[setting]
        p = ppl(s["perplexity"])
        rows.append([label, bold(p) if strong else p,
                     secs(quiet[setting]["eval_seconds"]) if setting in quiet else "-", mib(s["checkpoint_bytes"]),
                     ppl(s["reload_perplexity"]), ppl(s["reload_bf16_perplexity"]), ppl(s["transformers_perplexity"])])
    return table(["setting", "perplexity", "eval s (quiet)", "checkpoint MiB", "reloaded (compress)", "compress, bf16",
                  "transformers, bf16"], rows)


def w8a8(results: Path) -> str:
    """W8A8 and smoothing (several `--only` runs). ``*``: quantize time on cores shared with other jobs."""
    r = by_key(load("quantization-smollm2-w8a8.json", results)["rows"], "quantization-smollm2-w8a8.json")
    rtn_alone = by_key(load("quantization-smollm2.json", results)["rows"], "quantization-smollm2.json")
    base = r["float"]["perplexity"]
    spec = [  # setting, label, bold cells, vs-float digits (None: blank), perplexity digits, shared cores
        ("float", "float32", False, None, 3, False),
        ("fp8-rtn", "FP8 W8A8 dynamic (`fp8`), RTN", False, 1, 3, False),
        ("fp8-gptq", "**FP8 W8A8 dynamic (`fp8`), GPTQ**", True, 1, 2, True),
        ("fp8-block-rtn", "FP8 W8A8 block (`fp8-block`), RTN", False, 1, 3, False),
        ("fp8-static-rtn", "FP8 W8A8 static (`fp8-static`), RTN", False, 1, 3, True),
        ("int8-w8a8-rtn", "INT8 W8A8 dynamic (`w8a8-int8`), RTN", False, 1, 3, False),
        ("sq-int8-w8a8-rtn", "SmoothQuant (alpha 0.8) + INT8 W8A8 RTN", True, 1, 3, False),
        ("sq-int8-w8a8-gptq", "SmoothQuant (alpha 0.8) + INT8 W8A8 GPTQ", False, 1, 3, False),
        ("sq-int8-w8a8-gptq-minmax", "**SmoothQuant (alpha 0.8) + INT8 W8A8 GPTQ, `observer: minmax`** "
                                     "(`recipes/smollm2-w8a8-int8-sq-gptq.yaml`)", True, 2, 3, True),
        ("gptq-w4g64-sym", "GPTQ int4 g64 sym (alone, same run)", False, None, 3, False),
        ("awq-w4g64-rtn", "AWQ int4 g64 + RTN", True, None, 3, True),
        ("awq-w4g64-gptq", "AWQ (scales and clipping) + GPTQ int4 g64", False, None, 3, False),
        ("awq-noclip-w4g64-gptq", "**AWQ (scales only) + GPTQ int4 g64** (`recipes/smollm2-w4g64-awq-gptq.yaml`)",
         True, None, 3, False),
    ]
    rows = []
    for setting, label, strong, vs_digits, digits, shared in spec:
        s = r[setting]
        b = bold if strong else str
        p = b(ppl(s["perplexity"], digits))
        if setting == "awq-w4g64-rtn":           # next to what RTN alone gives
            p += f" (RTN alone {ppl(rtn_alone['rtn-w4g64-sym']['perplexity'])})"
        vs = "-" if setting == "float" else "" if vs_digits is None else b(pct(s["perplexity"], base, vs_digits))
        if setting == "float":
            q = "-"
        else:
            q = f"{s['quantize_seconds']:.0f}" if s["quantize_seconds"] >= 1000 else secs(s["quantize_seconds"])
            q += "*" if shared else ""
        missing = "-" if setting == "float" else "not run"
        reload_ = ppl(s["reload_perplexity"], digits) if s.get("reload_perplexity") is not None else missing
        tf = ppl(s["transformers_perplexity"], digits) if s.get("transformers_perplexity") is not None else missing
        if "transformers_error" in s:
            tf = "fails (partial blocks)"
        rows.append([label, p, vs, q, mib(s["checkpoint_bytes"]), reload_, tf])
    return table(["setting", "perplexity", "vs float", "quantize s", "checkpoint MiB", "reloaded (compress)",
                  "reloaded (transformers)"], rows)


def kv_cache(results: Path) -> str:
    """KV-cache perplexity decoded 8 tokens per forward; each row against its own run's float row."""
    spec = [  # file, name, label, vs float as (kind, digits), bold
        ("kv-cache-smollm2.json", "float", "float", None, False),
        ("kv-cache-smollm2.json", "fp8-head", "fp8 E4M3, per-head scales (exported for vLLM)", ("%", 2), False),
        ("kv-cache-smollm2.json", "int8-w0", "int8 g64 (keys per channel, values per token)", ("%", 2), False),
        ("kv-cache-smollm2.json", "int4-w128", "int4 g64, 128-token window", ("+", 3), False),
        ("kv-cache-smollm2.json", "int2-w128-rot", "int2 g64, 128-token window, rotated keys", ("+", 2), False),
        ("kv-cache-smollm2-sink-g64.json", "int4-w128-sink4",
         "int4 g64, 128-token window, values rotated, 4 sink tokens", ("+", 3), False),
        ("kv-cache-smollm2-sink-g64.json", "int2-w128-rot-sink4",
         "int2 g64, 128-token window, rotated keys and values, 4 sink tokens", ("+", 2), False),
        ("kv-cache-smollm2-int2-sink.json", "int2-g32-w128-rot-s8-sink4",
         "int2 g32, 128-token window, rotated keys and values, fp8 scales, 4 sink tokens", ("+", 2), True),
    ]
    rows = []
    for file, name, label, vs, strong in spec:
        r = by_key(load(file, results)["results"], file, key="name")
        s, base = r[name], r["float"]["perplexity"]
        b = bold if strong else str
        if vs is None:
            change = "-"
        else:
            change = pct(s["perplexity"], base, vs[1]) if vs[0] == "%" else delta(s["perplexity"], base, vs[1])
        ratio = "1x" if s["ratio"] == 1 else f"{s['ratio']:.2f}x"
        rows.append([b(label), b(ppl(s["perplexity"])), b(change) if vs else change, b(ratio)])
    return table(["cache", "perplexity", "vs float", "bytes per token vs bf16 (scales included)"], rows)


def pruning(results: Path) -> str:
    """One-shot pruning, LoRA retraining, structured width (`benchmarks/pruning.py`, `--lora`, `--structured`)."""
    one = by_key(load("pruning-smollm2.json", results)["rows"], "pruning-smollm2.json")
    lora = by_key(load("pruning-smollm2-lora.json", results)["rows"], "pruning-smollm2-lora.json")
    struct = by_key(load("pruning-smollm2-structured.json", results)["rows"], "pruning-smollm2-structured.json")

    def last(row: dict) -> dict:
        return row["stages"][-1]

    def params(row: dict) -> str:
        return f"{last(row)['parameters'] / 1e6:.1f}M"

    def sparsity(row: dict) -> str:
        return f"{100 * last(row)['sparsity']:.2f}%"

    rows = [["float", ppl(last(one["float"])["perplexity"]), "-", params(one["float"])]]
    for method, label, strong in [("wanda", "Wanda", False), ("sparsegpt", "SparseGPT", True)]:
        half, nm = one[f"{method}-50"], one[f"{method}-2of4"]
        assert sparsity(half) == sparsity(nm), (method, sparsity(half), sparsity(nm))
        text = f"{label} 50% / 2:4"
        value = f"{ppl(last(half)['perplexity'])} / {ppl(last(nm)['perplexity'])}"
        rows.append([bold(text) if strong else text, bold(value) if strong else value, sparsity(half), params(half)])
    w = lora["wanda-2of4+lora"]
    minutes = w["passes"][-1]["max_minutes"]
    rows.append([f"Wanda 2:4 + {minutes:.0f} min LoRA (merged under the mask)", bold(ppl(last(w)["perplexity"])),
                 sparsity(w) + (", still 2:4" if last(w)["is_2of4"] else ""), params(w)])
    m = struct["mlp25-activation+lora"]
    passes = m["passes"]
    rows.append([f"{100 * passes[0]['ratio']:.0f}% MLP width by {passes[0]['importance']}, + "
                 f"{passes[1]['max_minutes']:.0f} min LoRA",
                 f"{ppl(m['stages'][0]['perplexity'])} -> {ppl(last(m)['perplexity'])}", "-", params(m)])
    return table(["setting", "perplexity", "sparsity (measured)", "parameters"], rows)


def distillation(results: Path) -> str:
    """The two composed distillation recipes as shipped (`benchmarks/distill.py`)."""
    recipes = {(r["recipe"], r["variant"]): r for r in load("distill-smollm2.json", results)["recipes"]}
    rows = []
    for recipe, text, disk_note, minutes_note in [
            ("recipes/smollm2-2of4-distill-w4.yaml",
             "`compress run recipes/smollm2-2of4-distill-w4.yaml`: Wanda 2:4 -> distil (80 steps) -> GPTQ int4, "
             "still 2:4", " (compact 2:4 + int4)", ""),
            ("recipes/smollm2-w3-distill.yaml",
             "`compress run recipes/smollm2-w3-distill.yaml`: GPTQ 3-bit -> distilled rank-8 correction (PEFT "
             "adapter)", "", " (shared cores)")]:
        key = (recipe, "as shipped")
        if key not in recipes:
            raise SystemExit(f"readme_tables: distill-smollm2.json has no run of {recipe} as shipped")
        r = recipes[key]
        evaluated = [s["perplexity"] for s in r["stages"] if s["perplexity"] is not None and s["name"] != "load"]
        chain = " -> ".join(ppl(p) for p in evaluated[:-1]) + f" -> {bold(ppl(evaluated[-1]))}"
        export = next(s for s in r["stages"] if s["name"] == "export")
        minutes = f"{r['seconds'] / 60:.1f}"
        rows.append([text, chain, f"{mib(export['disk_bytes'])} MiB{disk_note}",
                     (minutes + minutes_note) if minutes_note else bold(minutes)])
    return table(["one command", "perplexity per stage", "on disk", "minutes"], rows)


def planner(results: Path) -> str:
    """The planner's memory target (`benchmarks/planner.py`)."""
    r = by_key([{"setting": k, **v} for k, v in load("planner-smollm2.json", results)["rows"].items()],
               "planner-smollm2.json")
    rows = []
    for setting, label, strong in [
            ("plan-60", "**`compress plan --memory` 60% of the 4-bit checkpoint** (int3/int4/NVFP4/int8/int2 per "
                        "layer)", True),
            ("plan-int3size", "`compress plan` at exactly uniform 3-bit's bytes", False),
            ("uniform-int3", "uniform GPTQ int3 g64 asym", False), ("uniform-int4", "uniform GPTQ int4 g64", False)]:
        s = r[setting]
        if s["predicted_checkpoint_bytes"] != s["written_bytes"]:
            raise SystemExit(f"readme_tables: planner-smollm2.json {setting}: predicted {s['predicted_checkpoint_bytes']}"
                             f" != written {s['written_bytes']} bytes; the README column says they are equal")
        rows.append([label, f"{s['written_bytes']:,}", bold(ppl(s["perplexity"])) if strong else ppl(s["perplexity"])])
    return table(["setting", "checkpoint bytes (predicted = written)", "perplexity"], rows)


def families(results: Path) -> str:
    """Other families and MoE (`benchmarks/families.py --max-windows 20 --samples 32`)."""
    fams = {f["family"]: by_key(f["rows"], f"families-smollm2.json {f['family']}")
            for f in load("families-smollm2.json", results)["results"]}
    rows = []
    for family, label in [("qwen2", "Qwen2 (SmolLM2 weights)"), ("mixtral-upcycled", "Mixtral, 4 upcycled experts, top-2")]:
        r = fams[family] if family in fams else _missing_family(family, fams)
        gptq = r["gptq int4 g64"]
        route_all = r.get("gptq int4 g64 route-all")
        rows.append([label, ppl(r["float"]["perplexity"]), ppl(r["rtn int4 g64"]["perplexity"]),
                     f"{bold(ppl(gptq['perplexity']))} ({gptq['seconds']:.0f} s)",
                     f"{ppl(route_all['perplexity'])} ({route_all['seconds']:.0f} s)" if route_all else "-"])
    return table(["model", "float", "RTN int4", "GPTQ int4", "GPTQ, every expert sees every token"], rows)


def _missing_family(family: str, fams: dict):
    raise SystemExit(f"readme_tables: families-smollm2.json has no family {family!r} (it has {sorted(fams)})")


TABLES = {"quantization": quantization, "fp4": fp4, "w8a8": w8a8, "kv-cache": kv_cache, "pruning": pruning,
          "distillation": distillation, "planner": planner, "families": families}


# ------------------------------------------------------------------------------------- README

def render(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with every marked table block replaced by its rendering."""
    found = [m["name"] for m in MARKER.finditer(readme)]
    unknown = sorted(set(found) - set(TABLES))
    if unknown:
        raise SystemExit(f"readme_tables: README.md marks table(s) {unknown} this script does not render "
                         f"(it renders {sorted(TABLES)})")
    dupes = sorted({n for n in found if found.count(n) > 1})
    if dupes:
        raise SystemExit(f"readme_tables: README.md marks table(s) {dupes} more than once")

    def block(m: re.Match) -> str:
        return f"<!-- table:{m['name']} -->\n\n{TABLES[m['name']](results)}\n\n<!-- /table -->"

    return MARKER.sub(block, readme)


def unmarked(readme: str) -> list[str]:
    """The tables this script renders that README.md does not mark."""
    found = {m["name"] for m in MARKER.finditer(readme)}
    return [n for n in TABLES if n not in found]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when README.md differs")
    mode.add_argument("--write", action="store_true", help="rewrite the marked tables in README.md")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    old = args.readme.read_text()
    new = render(old, args.results)
    missing = unmarked(old)
    if args.write:
        if new != old:
            args.readme.write_text(new)
        print(f"{args.readme}: {'rewritten' if new != old else 'already up to date'}"
              + (f"; not marked: {', '.join(missing)}" if missing else ""))
        return 0
    if missing:
        print(f"{args.readme}: table(s) {', '.join(missing)} are not marked (<!-- table:NAME --> ... "
              f"<!-- /table -->)", file=sys.stderr)
    if new != old:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                   f"{args.readme} (as it is)", f"{args.readme} (from the JSONs)"))
        return 1
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
