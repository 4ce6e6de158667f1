"""Two small lm-evaluation-harness tasks built offline from a WikiText-style text file.

Nothing here needs lm-eval: this module turns the text into examples and writes them, with the
task YAMLs that point at them, into a cache directory; ``compress.harness`` hands that directory
to lm-eval's ``TaskManager(include_path=...)``.

- ``wikitext_cloze`` (LAMBADA-like): a paragraph cut just before the last word of one of its
  sentences; the word must be a content word (letters only, 3+ characters, not a stop word) that
  already appeared earlier in the context, so a model that follows the passage can recover it.
  Loglikelihood task: ``acc`` is 1 when the greedy continuation is exactly the word.
- ``wikitext_nextsent``: the first sentences of a paragraph, and four candidate next sentences:
  the true one and three of similar length (2/3x to 3/2x its words) from other articles.
  Multiple choice: ``acc`` (summed log-likelihood) and ``acc_norm`` (per byte).

WikiText's tokenized text (`` @-@ ``, `` , ``) is detokenized first. Construction is deterministic
(one ``random.Random(seed)``), takes at most one example per paragraph, and shuffles the examples
so that lm-eval's ``--limit N`` (the first N documents) is a sample of the whole file, not its
first article. The cache key is a hash of the text, the seed and ``BUILD_VERSION``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path

import yaml

from .data import read_text
from .errors import DataError

BUILD_VERSION = 1                      # bump when the construction changes: it is part of the cache key
LOCAL_TASKS = ("wikitext_cloze", "wikitext_nextsent")
CHOICES = 4                            # wikitext_nextsent: the true sentence and three distractors
_CONTEXT_WORDS = 200                   # at most this many (tokenized) words of context
_CLOZE_MIN_CONTEXT = 40                # a cloze context has at least this many words
_SENTENCE_WORDS = (5, 60)              # candidate sentences for wikitext_nextsent, in words
_STOP = frozenset("""the and for are but not you all any can had her was one our out has him his how its may
new now old see two way who did get let say she too use from have that this with they been were when what
which will their there than then them these those would could should into also more most some such only other
over after before about under while where being each very same both during between through against among
upon because without within many much""".split())
_END = {".", "?", "!"}


@dataclasses.dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]      # WikiText tokens, the final punctuation included
    article: int                # index of the article (`` = Title = `` heading) it belongs to


def detokenize(text: str) -> str:
    """WikiText's tokenized text as ordinary prose (lm-eval's wikitext detokenizer, in short)."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", "), (" 's", "'s"), ("s ' ", "s' ")):
        text = text.replace(a, b)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r" ([.,;:!?])$", r"\1", text)
    return text.strip()


def paragraphs(text: str) -> list[list[Sentence]]:
    """The text's paragraphs (lines that are not headings), each split into sentences."""
    out, article = [], -1
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("=") and stripped.endswith("="):
            if not stripped.startswith("= ="):          # `` = Title = `` opens an article, `` = = `` a section
                article += 1
            continue
        words, sentences = stripped.split(), []
        start = 0
        for i, w in enumerate(words):
            if w in _END and (i + 1 == len(words) or words[i + 1][:1].isupper() or words[i + 1] == '"'):
                sentences.append(Sentence(tuple(words[start:i + 1]), max(article, 0)))
                start = i + 1
        if start < len(words):
            sentences.append(Sentence(tuple(words[start:]), max(article, 0)))
        out.append(sentences)
    return out


def _context(sentences: list[Sentence], k: int) -> list[str]:
    """Words of the whole sentences before ``sentences[k]``, at most _CONTEXT_WORDS, whole sentences only."""
    words: list[str] = []
    for s in reversed(sentences[:k]):
        if len(words) + len(s.words) > _CONTEXT_WORDS:
            break
        words = list(s.words) + words
    return words


def _is_content_word(w: str) -> bool:
    return w.isalpha() and len(w) >= 3 and w.lower() not in _STOP


def cloze_examples(paras: list[list[Sentence]], seed: int = 0) -> list[dict]:
    """At most one example per paragraph: ``{"context", "target"}`` (see the module docstring)."""
    rng = random.Random(seed)
    out = []
    for sentences in paras:
        candidates = []
        for k, s in enumerate(sentences):
            if len(s.words) < 3 or s.words[-1] not in _END:
                continue
            target = s.words[-2]
            before = _context(sentences, k) + list(s.words[:-2])
            if len(before) >= _CLOZE_MIN_CONTEXT and _is_content_word(target) and target in before:
                candidates.append((before, target))
        if candidates:
            before, target = rng.choice(candidates)
            out.append({"context": detokenize(" ".join(before)), "target": target})
    rng.shuffle(out)
    return out


def nextsent_examples(paras: list[list[Sentence]], seed: int = 0) -> list[dict]:
    """At most one example per paragraph: ``{"context", "choices", "label"}`` (see the module docstring)."""
    rng = random.Random(seed)
    lo, hi = _SENTENCE_WORDS
    pool = [s for sentences in paras for s in sentences if lo <= len(s.words) <= hi]
    out = []
    for sentences in paras:
        ks = [k for k in range(1, len(sentences)) if lo <= len(sentences[k].words) <= hi]
        if not ks:
            continue
        k = rng.choice(ks)
        true, context = sentences[k], _context(sentences, k)
        if not context:
            continue
        n = len(true.words)
        distractors: list[Sentence] = []
        for _ in range(10_000):           # rejection sampling; ~10 draws per distractor on WikiText-2
            s = pool[rng.randrange(len(pool))]
            if s.article != true.article and 2 * n <= 3 * len(s.words) <= 9 * n / 2 and s not in distractors:
                distractors.append(s)
                if len(distractors) == CHOICES - 1:
                    break
        if len(distractors) < CHOICES - 1:
            continue
        options = [true] + distractors
        rng.shuffle(options)
        out.append({"context": detokenize(" ".join(context)),
                    "choices": [detokenize(" ".join(s.words)) for s in options], "label": options.index(true)})
    rng.shuffle(out)
    return out


def _yaml(name: str, data_file: Path, meta: dict) -> dict:
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
              "test_split": "test", "fewshot_split": "test", "metadata": {"version": float(BUILD_VERSION), **meta}}
    if name == "wikitext_cloze":
        # Like lambada_openai: the target carries its leading space, so no extra delimiter.
        return {**common, "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                "doc_to_target": "{{' ' + target}}", "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}
    return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress" / "lm_eval_tasks"


def build_tasks(source: str | os.PathLike, *, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                min_examples: int = 20) -> Path:
    """Build both local tasks from the text at ``source`` (file or hub spec, as ``compress eval --data``)
    into ``cache_dir/<key>/`` (reused when it exists) and return that directory: one ``.jsonl`` and one
    lm-eval task ``.yaml`` per task. DataError when the text yields fewer than ``min_examples`` of either."""
    text = read_text(source)
    key = hashlib.sha256(f"{BUILD_VERSION}:{seed}:".encode() + text.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / key
    if all((out / f"{name}.yaml").is_file() for name in LOCAL_TASKS):
        return out
    paras = paragraphs(text)
    examples = {"wikitext_cloze": cloze_examples(paras, seed), "wikitext_nextsent": nextsent_examples(paras, seed)}
    for name, rows in examples.items():
        if len(rows) < min_examples:
            raise DataError(f"{source}: only {len(rows)} {name} examples could be built (need {min_examples}); "
                            f"give a longer WikiText-style text (paragraphs of several sentences, one per line)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    meta = {"source": str(source), "seed": seed}
    for name, rows in examples.items():
        data_file = out / f"{name}.jsonl"                           # the path it will have after the rename
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(_yaml(name, data_file, {**meta, "examples": len(rows)}),
                                                         sort_keys=False))
    try:
        tmp.rename(out)                                             # atomic: a reader never sees half a build
    except OSError:                                                 # built by someone else meanwhile
        if not all((out / f"{name}.yaml").is_file() for name in LOCAL_TASKS):
            raise
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return out


def load_examples(task_dir: str | os.PathLike, name: str) -> list[dict]:
    """The examples of local task ``name`` in a directory made by ``build_tasks``."""
    with open(Path(task_dir) / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
