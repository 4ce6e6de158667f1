"""The local lm-eval tasks (compress.eval_tasks) and `compress eval --tasks` (compress.harness).

Construction tests need no lm-eval; the evaluation tests skip when it is not installed
(``pip install 'compress[eval]'``)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from compress.cli import main
from compress.errors import ConfigError, DataError
from compress.eval_tasks import (CHOICES, LOCAL_TASKS, build_tasks, cloze_examples, detokenize, load_examples,
                                 nextsent_examples, paragraphs)

from conftest import SHARED_DATA, SMOLLM2, require_smollm2, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Articles on distinct topics: sentences of one article share its topic words, so the true next
# sentence overlaps its context more than a sentence drawn from another article does.
_TOPICS = [["ship", "harbour", "captain", "sail", "navy", "crew", "storm", "anchor"],
           ["song", "album", "singer", "chart", "guitar", "record", "tour", "band"],
           ["river", "valley", "bridge", "flood", "bank", "water", "mill", "stone"],
           ["king", "throne", "castle", "army", "crown", "battle", "knight", "court"],
           ["comet", "orbit", "planet", "telescope", "moon", "star", "light", "dust"],
           ["church", "bishop", "choir", "altar", "prayer", "monk", "abbey", "bell"]]
_FILLER = ["the", "a", "of", "in", "was", "and", "to", "by", "with", "from"]


def wikitext_like(articles: int = 24, seed: int = 0) -> str:
    """A WikiText-shaped text: `` = Title = `` headings, sections, one paragraph of tokenized sentences a line."""
    rng = random.Random(seed)
    lines = [" "]
    for a in range(articles):
        topic = _TOPICS[a % len(_TOPICS)]
        lines += [f" = Article {a} = ", " "]
        for p in range(4):
            if p == 2:
                lines += [" = = Section = = ", " "]
            sentences = []
            for _ in range(rng.randint(4, 8)):
                words = [rng.choice(topic if rng.random() < 0.5 else _FILLER) for _ in range(rng.randint(8, 16))]
                words[0] = words[0].capitalize()
                sentences.append(" ".join(words) + " , 1 @,@ 000 " + rng.choice(topic) + " .")
            lines.append(" " + " ".join(sentences) + " ")
        lines.append(" ")
    return "\n".join(lines) + "\n"


@pytest.fixture
def task_text(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(wikitext_like())
    return path


# ---- construction (no lm-eval) -------------------------------------------------------------------

def test_detokenize_undoes_wikitext_tokenization():
    assert detokenize(' He said " yes " , 1 @,@ 000 well @-@ known ( x ) 3 @.@ 5 .') == \
        'He said "yes", 1,000 well-known (x) 3.5.'


def test_paragraphs_split_sentences_and_articles():
    paras = paragraphs(wikitext_like(articles=3))
    assert len(paras) == 3 * 4
    assert {s.article for p in paras for s in p} == {0, 1, 2}
    assert all(s.words[-1] == "." for p in paras for s in p)


def test_cloze_examples_are_lambada_like():
    examples = cloze_examples(paragraphs(wikitext_like()), seed=0)
    assert len(examples) > 40
    for e in examples:
        assert set(e) == {"context", "target"}
        assert e["target"].isalpha() and len(e["target"]) >= 3
        # the word to predict appeared earlier in the passage (the LAMBADA-like construction)
        assert re.search(rf"\b{e['target']}\b", e["context"])
        assert len(e["context"].split()) >= 30


def test_nextsent_examples_structure_and_balanced_labels():
    paras = paragraphs(wikitext_like())
    examples = nextsent_examples(paras, seed=0)
    assert len(examples) > 40
    sentences = {detokenize(" ".join(s.words)): s.article for p in paras for s in p}
    for e in examples:
        assert len(e["choices"]) == CHOICES == len(set(e["choices"]))
        assert 0 <= e["label"] < CHOICES
        articles = [sentences[c] for c in e["choices"]]
        true = articles[e["label"]]
        # the distractors come from other articles than the true sentence
        assert all(a != true for i, a in enumerate(articles) if i != e["label"])
    counts = [sum(e["label"] == k for e in examples) for k in range(CHOICES)]
    assert min(counts) > len(examples) / CHOICES / 2          # the answer's position is shuffled


def _overlap(a: str, b: str) -> int:
    return len(set(re.findall(r"[a-z]+", a.lower())) & set(re.findall(r"[a-z]+", b.lower())))


def test_nextsent_is_learnable_word_overlap_oracle_beats_chance():
    """The true next sentence shares more words with its context than the distractors do: an oracle
    that picks the choice with the largest word overlap is far above chance. (A build that mislabels
    the answer, or draws distractors from the same article, fails this.)"""
    examples = nextsent_examples(paragraphs(wikitext_like()), seed=0)
    hits = [max(range(CHOICES), key=lambda k: _overlap(e["context"], e["choices"][k])) == e["label"]
            for e in examples]
    assert sum(hits) / len(hits) > 0.6 > 1 / CHOICES


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2" / "test.txt").is_file(), reason="WikiText-2 not installed")
def test_nextsent_overlap_oracle_beats_chance_on_wikitext(tmp_path):
    text = (SHARED_DATA / "wikitext-2" / "test.txt").read_text().splitlines()[:800]
    examples = nextsent_examples(paragraphs("\n".join(text)), seed=0)
    hits = [max(range(CHOICES), key=lambda k: _overlap(e["context"], e["choices"][k])) == e["label"]
            for e in examples]
    assert len(examples) > 100 and sum(hits) / len(hits) > 0.4


def test_build_is_deterministic_and_cached(task_text, tmp_path):
    a = build_tasks(task_text, seed=0, cache_dir=tmp_path / "a")
    b = build_tasks(task_text, seed=0, cache_dir=tmp_path / "b")
    assert a.name == b.name
    for name in LOCAL_TASKS:
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
        assert json.loads((a / f"{name}.jsonl").read_text().splitlines()[0])
    assert build_tasks(task_text, seed=0, cache_dir=tmp_path / "a") == a                 # reused
    other = build_tasks(task_text, seed=1, cache_dir=tmp_path / "a")
    assert other != a and load_examples(other, "wikitext_cloze") != load_examples(a, "wikitext_cloze")


def test_build_refuses_a_text_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(" = A = \n The ship sailed . The ship sank .\n")
    with pytest.raises(DataError, match="examples could be built"):
        build_tasks(path, cache_dir=tmp_path / "c")


# ---- evaluation through lm-eval ------------------------------------------------------------------

def _harness():
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'compress[eval]')")
    from compress import harness
    return harness


@pytest.fixture
def local_only(monkeypatch, tmp_path):
    """The harness with lm-eval's own ~10k task files left unindexed (that takes most of a minute here):
    an unknown name is then refused exactly as after the full index, which does not list it either."""
    harness = _harness()
    lm_eval, HFLM, TaskManager = harness._import_lm_eval()

    def manager(include_path=None, include_defaults=True):
        return TaskManager(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(harness, "_import_lm_eval", lambda: (lm_eval, HFLM, manager))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return harness


def test_unknown_task_is_refused_naming_the_local_ones(local_only, task_text, tmp_path):
    with pytest.raises(ConfigError, match="wikitext_cloze, wikitext_nextsent"):
        local_only.task_manager(["wikitext_cloze", "no_such_task_xyz"], task_data=task_text, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="--task-data"):
        local_only.task_manager(["wikitext_cloze"], task_data=None)
    names, task_dir = local_only.task_manager(list(LOCAL_TASKS), task_data=task_text, cache_dir=tmp_path)
    assert set(LOCAL_TASKS) <= set(names.all_tasks)


def test_cli_refuses_unknown_tasks_and_bad_flags(local_only, base, task_text, capsys):
    assert main(["eval", str(base), "--tasks", "wikitext_cloze,hellaswagg", "--task-data", str(task_text)]) == 2
    err = capsys.readouterr().err
    assert "'hellaswagg'" in err and "wikitext_cloze, wikitext_nextsent" in err
    assert main(["eval", str(base)]) == 2
    assert "--data TEXT (perplexity) or --tasks" in capsys.readouterr().err
    assert main(["eval", str(base), "--tasks", "wikitext_cloze", "--limit", "0", "--task-data", str(task_text)]) == 2
    assert "--limit 0" in capsys.readouterr().err
    assert main(["eval", str(base), "--tasks", "wikitext_cloze", "--kv-cache", "int4",
                 "--task-data", str(task_text)]) == 2
    assert "--kv-cache/--kv-h2o apply to --data" in capsys.readouterr().err


def test_cli_json_has_accuracy_and_stderr(local_only, base, task_text, capsys):
    assert main(["eval", str(base), "--tasks", ",".join(LOCAL_TASKS), "--task-data", str(task_text),
                 "--limit", "4", "--batch-size", "4", "--json", "--data", str(task_text), "--max-windows", "1",
                 "--seqlen", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    accs = [s for s in out["scores"] if s["metric"] == "acc"]
    assert {s["task"] for s in accs} == set(LOCAL_TASKS) and out["limit"] == 4
    assert all(0 <= s["value"] <= 1 and 0 <= s["stderr"] <= 1 and s["samples"] == 4 for s in accs)
    assert out["perplexity"]["windows"] == 1


class _Oracle:
    """An lm-eval LM that knows the answers: log-likelihood 0 for the gold continuation, -10 for any other
    (``flip``: the other way round). Through our task YAMLs it scores acc 1 (0): the YAMLs hand lm-eval
    the right context, continuation and label."""

    def __new__(cls, gold: dict[str, str], flip: bool = False):
        from lm_eval.api.model import LM

        class Oracle(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                out = []
                for r in requests:
                    ctx, cont = r.args
                    right = (gold[ctx] == cont) != flip
                    out.append((0.0 if right else -10.0, right))
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Oracle()


@pytest.mark.parametrize("flip", [False, True])
def test_task_yamls_wire_the_gold_answer(local_only, task_text, tmp_path, flip):
    import lm_eval
    registry = local_only.task_manager(list(LOCAL_TASKS), task_data=task_text, cache_dir=tmp_path)
    gold = {e["context"]: " " + e["target"] for e in load_examples(registry[1], "wikitext_cloze")}
    gold |= {e["context"]: " " + e["choices"][e["label"]] for e in load_examples(registry[1], "wikitext_nextsent")}
    results = lm_eval.simple_evaluate(model=_Oracle(gold, flip), tasks=list(LOCAL_TASKS), limit=20,
                                      task_manager=registry[0], bootstrap_iters=10, log_samples=False)
    scores = {(s.task, s.metric): s.value for s in local_only._scores(results, list(LOCAL_TASKS))}
    want = 0.0 if flip else 1.0
    assert scores[("wikitext_cloze", "acc")] == want
    assert scores[("wikitext_nextsent", "acc")] == want


def test_packed_runtime_runs_through_hflm(local_only, tokenizer, task_text, tmp_path):
    import compress
    from compress.quant.linear import QuantLinear
    model = tiny_model("llama")
    compress.quantize(model, compress.RTNConfig(bits=4, group_size=32), progress=False)
    compress.export(model, tokenizer, tmp_path / "q4")
    packed, tok = compress.load_model(tmp_path / "q4")
    assert any(isinstance(m, QuantLinear) for m in packed.modules())
    result = local_only.run_tasks(packed, tok, ["wikitext_nextsent"], task_data=task_text, limit=4, batch_size=4,
                                  cache_dir=tmp_path, bootstrap_iters=10)
    acc = result.score("wikitext_nextsent", "acc")
    assert 0 <= acc.value <= 1 and 0 <= acc.stderr <= 1 and acc.samples == 4


def test_tiny_llama_end_to_end(local_only, task_text, tmp_path, tokenizer):
    result = local_only.run_tasks(tiny_model("llama"), tokenizer, list(LOCAL_TASKS), task_data=task_text, limit=8,
                               batch_size=4, cache_dir=tmp_path, bootstrap_iters=10)
    assert {(s.task, s.metric) for s in result.scores} >= {("wikitext_cloze", "acc"), ("wikitext_nextsent", "acc"),
                                                           ("wikitext_nextsent", "acc_norm")}
    for s in result.scores:
        assert s.samples == 8
        if s.metric.startswith("acc"):
            assert 0 <= s.value <= 1 and s.stderr is not None and 0 <= s.stderr <= 1
    assert "± stderr" in result.table() and "wikitext_nextsent" in result.table()


def test_benchmark_script_writes_scores_and_drops(local_only, base, task_text, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_tasks.py"
    spec = importlib.util.spec_from_file_location("benchmarks_lm_eval_tasks", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--model", f"float={base}", "--model", f"copy={base}", "--data", str(task_text),
                       "--tasks", "wikitext_nextsent", "--limit", "3", "--batch-size", "4", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [m["label"] for m in data["models"]] == ["float", "copy"] and data["limit"] == 3
    # the same weights twice: no drop
    assert [(d["model"], d["metric"], d["drop"]) for d in data["drops"]] == [("copy", "acc", 0.0),
                                                                             ("copy", "acc_norm", 0.0)]


@pytest.mark.slow
def test_smollm2_above_chance_on_the_local_tasks(tmp_path):
    """SmolLM2-135M (float) on 30 documents of each local task: next-sentence accuracy (per byte) is
    above the 1-in-4 chance by more than two standard errors, and the cloze's greedy last word is often
    right (on 50 documents: acc_norm 0.68 +- 0.07, cloze acc 0.44 +- 0.07)."""
    require_smollm2()
    harness = _harness()
    import compress
    model, tok = compress.load_model(SMOLLM2)
    result = harness.run_tasks(model, tok, list(LOCAL_TASKS), task_data=SHARED_DATA / "wikitext-2" / "test.txt",
                               limit=30, batch_size=16, cache_dir=tmp_path, bootstrap_iters=10)
    nextsent = result.score("wikitext_nextsent", "acc_norm")
    assert nextsent.value > 1 / CHOICES + 2 * nextsent.stderr
    assert result.score("wikitext_cloze", "acc").value > 0.1
