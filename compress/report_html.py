"""``compress report DIR``: one self-contained HTML page about a finished run.

DIR is the export directory of ``compress run`` / ``compress quantize`` / ``compress prune`` (it
holds the ``report.json`` they write). The page has, each part omitted with a note when its data
is missing:

- the run's table of numbers (every stage row of report.json; each cell carries the raw value in
  ``data-value``);
- perplexity against size, one point per evaluated stage;
- for a planned run (report.json's ``recipe.plan``): the plan against what was written, the
  per-layer format map, and the sensitivity heatmap when per-unit sensitivity is at hand (the plan's
  ``sensitivity`` key, or a ``sensitivity.json`` next to report.json in the planner's cache format);
- the quality-vs-bytes Pareto frontier of a ``compress plan --sweep`` output (``sweep.json`` next
  to report.json, or ``--sweep FILE``);
- a few greedy generations of the float model and the compressed one side by side, made at report
  time (``--no-generate`` skips them).

Charts are inline SVG (``report_charts.py``); the page fetches nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import re
from html import escape
from pathlib import Path

from .errors import CompressError, ConfigError, MissingPathError
from .evaluation import generate
from .kv.model import kv_config_of
from .loading import load_model
from .report_charts import PALETTE, Series, heatmap, pareto_front, xy_chart

log = logging.getLogger(__name__)

PROMPTS = ("The history of the city", "In mathematics, a prime number is", "The best way to learn a language is")
NEW_TOKENS = 32
_UNIT = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<kind>.+)$")


@dataclasses.dataclass
class Run:
    path: Path                 # the run (export) directory
    report: dict               # its report.json

    @property
    def stages(self) -> list[dict]:
        return self.report["stages"]

    @property
    def recipe(self) -> dict:
        return self.report.get("recipe") or {}

    @property
    def plan(self) -> dict | None:
        return self.recipe.get("plan")


def load_run(path: str | os.PathLike) -> Run:
    """The run at ``path``; a clear error when it is not a run directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"{path}: no such directory; give the export directory of a `compress run` "
                               f"(the one holding report.json)")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; give the export directory of a run (the folder holding report.json)")
    file = path / "report.json"
    if not file.is_file():
        hint = (" It is the work directory of an unfinished run: rerun `compress run` to finish it."
                if (path / "state.json").is_file() else
                " `compress run RECIPE` (and `compress quantize` / `prune`) write report.json into the export "
                "directory; give that directory.")
        raise ConfigError(f"{path} is not a run directory: it has no report.json.{hint}")
    try:
        report = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: not readable JSON ({exc}); rerun the recipe to write it again") from None
    if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
        raise ConfigError(f"{file}: has no 'stages' list, so it is not a compress run report")
    return Run(path.resolve(), report)


# ----------------------------------------------------------------------------------------- data

def stage_size(stage: dict) -> int | None:
    """Bytes on disk when the stage was written, else the tensor bytes a checkpoint would hold."""
    return stage.get("disk_bytes") if stage.get("disk_bytes") is not None else stage.get("bytes")


def size_quality_points(stages: list[dict]) -> list[tuple[str, float, float]]:
    """(stage name, size in MiB, perplexity) of every stage with both, in run order."""
    out = []
    for s in stages:
        size, ppl = stage_size(s), s.get("perplexity")
        if size is not None and ppl is not None and math.isfinite(ppl):
            out.append((s["name"], size / 2**20, ppl))
    return out


def format_map(formats: dict[str, str]) -> tuple[list[str], dict[int, dict[str, str]]]:
    """Unit -> format as (kinds in first-seen order, layer -> kind -> format). A unit name is the
    layers' prefix, the layer index and the unit's path in the layer (``model.layers.3.mlp.gate+up``)."""
    kinds: list[str] = []
    rows: dict[int, dict[str, str]] = {}
    for unit, fmt in formats.items():
        m = _UNIT.match(unit)
        layer, kind = (int(m["layer"]), m["kind"]) if m else (-1, unit)
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(layer, {})[kind] = fmt
    return kinds, dict(sorted(rows.items()))


def read_sensitivity(run: Run, override: str | os.PathLike | None = None) -> tuple[dict | None, str]:
    """format -> unit -> predicted loss increase (nats), and where it came from (or why it is absent)."""
    plan = run.plan or {}
    if override is None and isinstance(plan.get("sensitivity"), dict):
        data, where = plan["sensitivity"], "the plan in report.json"
    else:
        file = Path(override) if override is not None else run.path / "sensitivity.json"
        if not file.is_file():
            if override is not None:
                raise MissingPathError(f"--sensitivity {file}: no such file")
            return None, ("no per-unit sensitivity next to the run: copy the planner's cache file "
                          "(~/.cache/compress/sensitivity/sensitivity-*.json) to sensitivity.json beside report.json, "
                          "or pass --sensitivity FILE")
        data, where = _read_json(file, "--sensitivity" if override is not None else "sensitivity.json"), str(file)
    dloss = data.get("dloss", data) if isinstance(data, dict) else None
    if not isinstance(dloss, dict) or not all(isinstance(v, dict) for v in dloss.values()):
        raise ConfigError(f"{where}: sensitivity must map format -> unit -> loss increase (the planner's "
                          f"'dloss' table)")
    return dloss, where


def _read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {file}: not readable JSON ({exc})") from None


def _get(d: dict, *paths: str):
    """The first of ``paths`` ("a.b" for nested keys) that ``d`` has, else None."""
    for p in paths:
        v = d
        for k in p.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


def sweep_points(data) -> list[tuple[float, float, str]]:
    """(bytes, predicted perplexity ratio, label) of every plan of a ``compress plan --sweep`` output:
    a list of plans, or {"points" | "plans" | "rows": [...]}; each plan as ``Plan.to_dict()`` writes it
    (``prediction.checkpoint_bytes``, ``predicted_ppl_ratio`` or ``predicted_dloss``) or flat
    (``checkpoint_bytes`` / ``bytes``, ``ppl_ratio`` / ``dloss``)."""
    if isinstance(data, dict):
        data = next((data[k] for k in ("points", "plans", "rows", "sweep") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise ConfigError("a sweep holds a list of plans (or {'points': [...]}), each with its bytes and predicted "
                          "quality")
    out = []
    for i, p in enumerate(data):
        if not isinstance(p, dict):
            raise ConfigError(f"sweep point {i}: expected a mapping, got {type(p).__name__}")
        size = _get(p, "prediction.checkpoint_bytes", "checkpoint_bytes", "bytes", "memory_used_bytes")
        ratio = _get(p, "predicted_ppl_ratio", "ppl_ratio")
        if ratio is None:
            dloss = _get(p, "predicted_dloss", "dloss")
            ratio = math.exp(dloss) if dloss is not None else None
        if size is None or ratio is None:
            raise ConfigError(f"sweep point {i}: needs its bytes (prediction.checkpoint_bytes) and predicted quality "
                              f"(predicted_ppl_ratio or predicted_dloss); it has {sorted(p)}")
        label = p.get("label") or p.get("name") or ""
        out.append((float(size), float(ratio), str(label)))
    return out


def float_source(run: Run) -> str | None:
    """The model the run started from, as load_model takes it. A relative path in the recipe is
    relative to the recipe's folder, which report.json does not keep: it is looked for above the run."""
    model = run.recipe.get("model")
    if not model or model.startswith("package:") or Path(model).is_absolute():
        return model
    output = (run.recipe.get("export") or {}).get("output")
    bases: list[Path] = []
    if output and not Path(output).is_absolute() and ".." not in Path(output).parts:
        depth = len([p for p in Path(output).parts if p != "."])
        bases.append(run.path.parents[depth - 1] if depth else run.path)
    bases += list(run.path.parents)[:4] + [Path.cwd()]
    for base in bases:
        if (base / model).exists():
            return str(base / model)
    return model        # a hub id, or a path that is gone: load_model says which


def generations(run: Run, *, float_model: str | None = None, prompts=PROMPTS, new_tokens: int = NEW_TOKENS,
                backend: str = "auto") -> tuple[list[dict] | None, str]:
    """Greedy continuations of ``prompts`` by the float model and the run's compressed model."""
    source = float_model or float_source(run)
    if source is None:
        return None, "report.json names no source model (recipe.model); pass --float-model"
    rows = []
    try:
        models = {}
        for key, where in (("float", source), ("compressed", run.path)):
            model, tok = load_model(where, dtype="auto" if key == "compressed" else run.recipe.get("dtype", "auto"),
                                    backend=backend)
            models[key] = (model, tok)
        for prompt in prompts:
            row = {"prompt": prompt}
            for key, (model, tok) in models.items():
                row[key] = generate(model, tok, prompt, new_tokens, kv_cache=kv_config_of(model))
            rows.append(row)
    except (CompressError, OSError, RuntimeError, ValueError) as exc:
        log.warning("generations skipped: %s", exc)
        return None, f"generations skipped: {exc} (pass --float-model MODEL, or --no-generate)"
    return rows, f"greedy, {new_tokens} new tokens; float model {source}, compressed model {run.path}"


# ----------------------------------------------------------------------------------------- HTML

_COLUMNS = (  # key in report.json, header, how the cell shows it
    ("perplexity", "perplexity", lambda v: f"{v:.3f}"),
    ("size", "size MiB", lambda v: f"{v / 2**20:.2f}"),
    ("disk_bytes", "bytes on disk", lambda v: f"{v:,}"),
    ("bytes", "tensor bytes", lambda v: f"{v:,}"),
    ("parameters", "parameters", lambda v: f"{v:,}"),
    ("sparsity", "sparsity %", lambda v: f"{100 * v:.2f}"),
    ("bits", "bits", str),
    ("bits_per_weight", "bits / weight", lambda v: f"{v:.3f}"),
    ("seconds", "seconds", lambda v: f"{v:.1f}"),
    ("peak_host_bytes", "peak RSS MiB", lambda v: f"{v / 2**20:.0f}"),
    ("peak_device_bytes", "peak GPU MiB", lambda v: f"{v / 2**20:.0f}"),
)

_CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #8a5a00; background: #fff8e5; padding: 6px 10px; border-left: 3px solid #e6a700; font-size: 13px; }
.meta { color: #555; font-size: 13px; } .gen td { vertical-align: top; max-width: 420px; white-space: pre-wrap; }
.fmt { font-size: 11px; text-align: center; }
"""


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _numbers_table(stages: list[dict]) -> str:
    used = [c for c in _COLUMNS if c[0] == "size" or any(s.get(c[0]) is not None for s in stages)]
    head = "".join(f"<th>{escape(h)}</th>" for _, h, _ in used)
    lines = [f'<table id="numbers"><tr><th>stage</th>{head}</tr>']
    for s in stages:
        cells = []
        for key, _, show in used:
            v = stage_size(s) if key == "size" else s.get(key)
            text = "-" if v is None else show(v)
            cells.append(f'<td class="num" data-key="{key}" data-value="{escape(json.dumps(v))}">{escape(text)}</td>')
        lines.append(f'<tr data-stage="{escape(s["name"])}"><td>{escape(s["name"])}</td>{"".join(cells)}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _size_chart(stages: list[dict]) -> str:
    pts = size_quality_points(stages)
    if not pts:
        return _note("no stage was evaluated (the recipe has no evaluation section), so there is no perplexity "
                     "to chart")
    series = Series("stages, in run order", [(x, y) for _, x, y in pts], names=[n for n, _, _ in pts])
    return xy_chart([series], title="Perplexity vs size, per stage", x_label="size (MiB; on disk where written)",
                    y_label="perplexity", chart_id="size-chart")


def _format_colors(formats: list[str]) -> dict[str, str]:
    return {f: ("#f5f5f5" if f in ("bf16", "fp16", "fp32") else PALETTE[i % len(PALETTE)])
            for i, f in enumerate(sorted(set(formats)))}


def _plan_section(run: Run, sensitivity: str | os.PathLike | None) -> str:
    plan = run.plan
    if not plan:
        return _note("this run was not planned (report.json's recipe has no plan), so there is no format map or "
                     "sensitivity heatmap; `compress plan` writes planned recipes")
    parts = []
    pred = plan.get("prediction") or {}
    export = next((s for s in reversed(run.stages) if s["name"] == "export"), None)
    load = next((s for s in run.stages if s["name"] == "load"), None)
    rows = [("device", plan.get("device"), None),
            ("checkpoint bytes", _int(pred.get("checkpoint_bytes")), _int(export and export.get("disk_bytes"))),
            ("perplexity ratio", _ratio(plan.get("predicted_ppl_ratio")),
             _ratio(_measured_ratio(run.stages, load))),
            ("KV cache", plan.get("kv_cache"), None),
            ("target met", plan.get("feasible"), None)]
    parts.append('<table id="plan"><tr><th></th><th>planned</th><th>measured</th></tr>'
                 + "".join(f"<tr><td>{escape(k)}</td><td class=\"num\">{escape(str(p if p is not None else '-'))}"
                           f"</td><td class=\"num\">{escape(str(m if m is not None else '-'))}</td></tr>"
                           for k, p, m in rows) + "</table>")
    formats = plan.get("formats") or {}
    if formats:
        kinds, layers = format_map(formats)
        colors = _format_colors(list(formats.values()))
        head = "".join(f"<th>{escape(k)}</th>" for k in kinds)
        body = "".join(f"<tr><td>{layer}</td>" + "".join(
            f'<td class="fmt" data-unit-kind="{escape(k)}" style="{_cell_style(colors.get(row.get(k), "#ffffff"))}">'
            f'{escape(row.get(k, "-"))}</td>' for k in kinds) + "</tr>" for layer, row in layers.items())
        legend = " ".join(f'<span class="fmt" style="{_cell_style(c)};padding:1px 6px">{escape(f)}</span>'
                          for f, c in colors.items())
        parts.append(f"<h3>Format per layer</h3><p>{legend}</p><table id=\"format-map\"><tr><th>layer</th>{head}</tr>"
                     f"{body}</table>")
    else:
        parts.append(_note("the plan lists no per-unit formats"))
    dloss, where = read_sensitivity(run, sensitivity)
    if dloss:
        units = list(formats) or sorted({u for d in dloss.values() for u in d})
        groups, last = [], None
        for u in units:
            m = _UNIT.match(u)
            layer = m["layer"] if m else ""
            if layer != last:
                groups.append([layer, 0])
                last = layer
            groups[-1][1] += 1
        labelled = [(g if i % 2 == 0 else "", n) for i, (g, n) in enumerate(groups)]
        parts.append("<h3>Sensitivity: predicted loss increase of each unit in each format</h3>"
                     + heatmap({f: dloss[f] for f in dloss}, units, title="sensitivity (nats), units by layer",
                               chosen=formats, column_groups=labelled, chart_id="sensitivity")
                     + f'<p class="meta">from {escape(where)}</p>')
    else:
        parts.append(_note(where))
    return "\n".join(parts)


def _cell_style(color: str) -> str:
    """Background ``color`` (#rrggbb) with black or white text, whichever reads better on it."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    text = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"
    return f"background:{color};color:{text}"


def _int(v) -> str | None:
    return None if v is None else f"{v:,}"


def _ratio(v) -> str | None:
    return None if v is None else f"{v:.4f}"


def _measured_ratio(stages: list[dict], load: dict | None) -> float | None:
    """Last evaluated stage's perplexity over the float (load) perplexity."""
    base = load and load.get("perplexity")
    last = next((s.get("perplexity") for s in reversed(stages) if s.get("perplexity") is not None and s is not load),
                None)
    return last / base if base and last else None


def _pareto_section(run: Run, sweep: str | os.PathLike | None) -> str:
    planned = (run.recipe.get("plan") or {}).get("sweep")        # written by `compress plan --sweep`
    file = (Path(sweep) if sweep is not None else run.path / "sweep.json" if (run.path / "sweep.json").is_file()
            else Path(planned) if planned else run.path / "sweep.json")
    if not file.is_file():
        if sweep is not None:
            raise MissingPathError(f"--sweep {file}: no such file")
        return _note("no plan sweep next to the run (sweep.json, the output of `compress plan --sweep`, or "
                     "--sweep FILE), so there is no Pareto frontier")
    pts = sweep_points(_read_json(file, "--sweep" if sweep is not None else "sweep.json"))
    if not pts:
        return _note(f"{file} holds no plans")
    mib = [(b / 2**20, r) for b, r, _ in pts]
    front = pareto_front(mib)
    series = [Series("swept plans", mib, line=False, color=PALETTE[8], marker_size=3),
              Series("Pareto frontier", front, color=PALETTE[0])]
    pred = (run.plan or {}).get("prediction") or {}
    if pred.get("checkpoint_bytes") and (run.plan or {}).get("predicted_ppl_ratio"):
        series.append(Series("this run's plan", [(pred["checkpoint_bytes"] / 2**20, run.plan["predicted_ppl_ratio"])],
                             line=False, color=PALETTE[3], marker_size=6))
    return (xy_chart(series, title="Plans: predicted quality vs size", x_label="checkpoint (MiB)",
                     y_label="predicted perplexity ratio", chart_id="pareto-chart")
            + f'<p class="meta">{len(pts)} plans from {escape(str(file))}; {len(front)} on the frontier</p>')


def _generation_section(rows: list[dict] | None, note: str) -> str:
    if not rows:
        return _note(note)
    body = "".join("<tr>" + "".join(f'<td data-gen="{k}">{escape(r[k])}</td>' for k in ("prompt", "float", "compressed"))
                   + "</tr>" for r in rows)
    return (f'<table class="gen" id="generations"><tr><th>prompt</th><th>float</th><th>compressed</th></tr>{body}'
            f'</table><p class="meta">{escape(note)}</p>')


def render_html(run: Run, *, gens: tuple[list[dict] | None, str], sweep=None, sensitivity=None) -> str:
    r, rec = run.report, run.recipe
    title = rec.get("name") or run.path.name
    machine = r.get("machine") or {}
    passes = ", ".join(p.get("method", "?") for p in rec.get("passes") or []) or "none"
    meta = (f"model {rec.get('model', '?')}; passes: {passes}; compress {r.get('compress_version', '?')}; "
            f"measured on {machine.get('gpu') or machine.get('platform', '?')} ({machine.get('cpu_count', '?')} CPUs, "
            f"torch {machine.get('torch', '?')}); report made {datetime.date.today().isoformat()}")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>compress report: {escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>compress report: {escape(title)}</h1>", f'<p class="meta">{escape(str(run.path))}<br>{escape(meta)}</p>',
        "<h2>Numbers</h2>", _numbers_table(run.stages),
        "<h2>Perplexity vs size</h2>", _size_chart(run.stages),
        "<h2>Plan</h2>", _plan_section(run, sensitivity),
        "<h2>Pareto frontier of the plan sweep</h2>", _pareto_section(run, sweep),
        "<h2>Generations, float vs compressed</h2>", _generation_section(*gens),
        "</body></html>", ""])


def write_report(path: str | os.PathLike, *, out: str | os.PathLike | None = None, generate: bool = True,
                 float_model: str | None = None, sweep=None, sensitivity=None, new_tokens: int = NEW_TOKENS) -> Path:
    """Write the HTML report of the run at ``path`` (default ``<path>/report.html``); returns its path."""
    run = load_run(path)
    gens = (generations(run, float_model=float_model, new_tokens=new_tokens) if generate
            else (None, "generations not made (--no-generate)"))
    html = render_html(run, gens=gens, sweep=sweep, sensitivity=sensitivity)
    target = Path(out) if out is not None else run.path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(html)
    os.replace(tmp, target)
    return target


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="write an HTML report of a finished run (charts, plan, generations)",
                       description="Write DIR/report.html from the report.json of a run's export directory: the "
                                   "numbers, perplexity vs size, the plan's format map and sensitivity, a plan "
                                   "sweep's Pareto frontier and greedy generations float vs compressed.")
    p.add_argument("dir", help="a run's export directory (holding report.json)")
    p.add_argument("--out", help="HTML file to write (default DIR/report.html)")
    p.add_argument("--no-generate", action="store_true", help="skip the float vs compressed generations")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens each generation adds")
    p.add_argument("--float-model", help="the uncompressed model, when report.json's recipe.model cannot be found")
    p.add_argument("--sweep", help="a `compress plan --sweep` output (default DIR/sweep.json when present)")
    p.add_argument("--sensitivity", help="the planner's per-unit sensitivity JSON (default DIR/sensitivity.json)")


def run_report(args) -> int:
    if args.new_tokens < 1:
        raise ConfigError(f"--new-tokens {args.new_tokens}: must be at least 1 (or --no-generate)")
    out = write_report(args.dir, out=args.out, generate=not args.no_generate, float_model=args.float_model,
                       sweep=args.sweep, sensitivity=args.sensitivity, new_tokens=args.new_tokens)
    print(f"wrote {out}")
    return 0
