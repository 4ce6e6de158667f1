"""lm-evaluation-harness tasks on any model compress loads (our packed runtime included).

``run_tasks(model, tokenizer, ["wikitext_cloze", "hellaswag"], ...)`` wraps the loaded model in
lm-eval's ``HFLM`` (the model object is passed as ``pretrained``, so nothing is reloaded and the
packed ``QuantLinear`` layers run as they are) and calls ``lm_eval.simple_evaluate``. The two local
tasks of ``compress.eval_tasks`` are built from a text file and registered with
``TaskManager(include_path=...)``; any other lm-eval task name works when its data can be fetched.

lm-eval is optional (``pip install 'compress[eval]'``) and imported only when a task runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

from torch import nn

from .errors import ConfigError
from .eval_tasks import LOCAL_TASKS, build_tasks

log = logging.getLogger(__name__)

# The metrics reported per task, in this order, when lm-eval returns them.
_METRICS = ("acc", "acc_norm", "perplexity", "exact_match", "f1", "word_perplexity")


@dataclasses.dataclass
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float | None        # lm-eval's standard error of the mean (None: not computed, e.g. perplexity)
    samples: int                # documents evaluated (after --limit)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class HarnessResult:
    scores: list[TaskScore]
    tasks: list[str]
    limit: int | None
    num_fewshot: int | None
    batch_size: int
    seconds: float
    task_dir: str | None        # where the local tasks were built (None: none requested)
    lm_eval_version: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def score(self, task: str, metric: str = "acc") -> TaskScore:
        for s in self.scores:
            if s.task == task and s.metric == metric:
                return s
        raise KeyError(f"no {metric} for task {task!r}; have {[(s.task, s.metric) for s in self.scores]}")

    def table(self) -> str:
        rows = [("task", "metric", "value", "± stderr", "n")]
        for s in self.scores:
            rows.append((s.task, s.metric, f"{s.value:.4f}", "" if s.stderr is None else f"{s.stderr:.4f}",
                         str(s.samples)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(f"--tasks needs lm-evaluation-harness, which is not installed ({exc}); "
                          f"pip install 'compress[eval]' (or pip install 'lm-eval>=0.4')") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], *, task_data: str | os.PathLike | None = None, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None):
    """lm-eval's TaskManager with our local tasks registered (built from ``task_data`` when any is
    requested), and the task directory (None when none was). Unknown names: ConfigError listing the
    local tasks. lm-eval's own ~10k task files are indexed only when a non-local name is asked for."""
    _, _, TaskManager = _import_lm_eval()
    if not tasks:
        raise ConfigError(f"--tasks is empty; name one or more tasks, e.g. --tasks {','.join(LOCAL_TASKS)}")
    local = [t for t in tasks if t in LOCAL_TASKS]
    task_dir = None
    if local:
        if task_data is None:
            raise ConfigError(f"the local tasks {', '.join(local)} are built from a WikiText-style text: pass "
                              f"--task-data PATH (e.g. wikitext-2/test.txt)")
        task_dir = build_tasks(task_data, seed=seed, cache_dir=cache_dir)
    others = [t for t in tasks if t not in LOCAL_TASKS]
    manager = TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=bool(others))
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(map(repr, unknown))}: the local tasks are "
                          f"{', '.join(LOCAL_TASKS)} (built offline from --task-data); other names must be "
                          f"lm-eval tasks (`lm-eval ls tasks` lists them; their data needs the network)")
    return manager, task_dir


def _scores(results: dict, tasks: list[str]) -> list[TaskScore]:
    out = []
    for task in tasks:
        metrics = results["results"].get(task, {})
        n = results.get("n-samples", {}).get(task, {})
        samples = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else 0
        for metric in _METRICS:
            key = f"{metric},none"
            if key not in metrics:
                continue
            stderr = metrics.get(f"{metric}_stderr,none")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            out.append(TaskScore(task, metric, float(metrics[key]), stderr, samples))
    return out


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], *, task_data: str | os.PathLike | None = None,
              limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
              device: str | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None,
              bootstrap_iters: int = 1000, registry: tuple | None = None) -> HarnessResult:
    """Run lm-eval ``tasks`` on ``model`` (see the module docstring). ``limit``: the first N documents
    of each task (the local tasks are shuffled at build time, so these are a sample of the text);
    ``device``: where HFLM puts its inputs (default: the model's own device); ``bootstrap_iters`` is
    lm-eval's resampling for the stderr of metrics without a closed form (not acc: that is binomial);
    ``registry``: what ``task_manager`` returned for these tasks (else it is built here)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1; omit it to evaluate every document")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot}: must be 0 or more")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    lm_eval, HFLM, _ = _import_lm_eval()
    manager, task_dir = registry or task_manager(tasks, task_data=task_data, seed=seed, cache_dir=cache_dir)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  **({"device": str(device)} if device is not None else {}))
        with contextlib.redirect_stdout(sys.stderr):       # lm-eval prints progress notes; --json owns stdout
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, bootstrap_iters=bootstrap_iters,
                                              log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                              torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    return HarnessResult(scores=_scores(results, list(tasks)), tasks=list(tasks), limit=limit,
                         num_fewshot=num_fewshot, batch_size=batch_size, seconds=time.perf_counter() - start,
                         task_dir=str(task_dir) if task_dir else None, lm_eval_version=lm_eval.__version__)


def default_task_data() -> Path | None:
    """``$COMPRESS_TASK_DATA``, else ``../shared/data/wikitext-2/test.txt`` from the working directory if
    it exists (this project's layout), else None."""
    env = os.environ.get("COMPRESS_TASK_DATA")
    if env:
        return Path(env)
    guess = Path("..") / "shared" / "data" / "wikitext-2" / "test.txt"
    return guess if guess.is_file() else None
