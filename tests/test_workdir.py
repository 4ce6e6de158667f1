"""Composed recipes (prune -> distil -> quantize -> export) and resuming an interrupted recipe."""

import importlib
import json

import pytest
import torch
import yaml

import compress.recipe as recipe_module
from compress.loading import load_model
from compress.modeling import find_decoder_layers
from compress.pruning.masks import check_nm
from compress.recipe import load_recipe, run_recipe
from compress.workdir import stage_fingerprints
from conftest import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(tmp_path, tokenizer, text_file, passes=None, **export):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "model": "./base",
        "calibration": {"data": str(text_file), "samples": 8, "seqlen": 32},
        "passes": passes or [
            {"method": "wanda", "pattern": "2:4"},
            {"method": "distill", "steps": 4, "batch_size": 2, "samples": 8, "top_k": 8, "warmup_steps": 0,
             "checkpoint_every": 1},
            {"method": "gptq", "bits": 4, "group_size": 32},
        ],
        "evaluation": {"data": str(text_file), "seqlen": 32, "max_windows": 3},
        "export": {"output": "./out", **export},
    }))
    return path


def _is_2of4(model) -> bool:
    _, layers = find_decoder_layers(model)
    weights = [m.dequantize(torch.float32) if hasattr(m, "dequantize") else m.weight for m in layers.modules()
               if isinstance(m, torch.nn.Linear) or hasattr(m, "dequantize")]
    return bool(weights) and all(check_nm(w, 2, 4) for w in weights)


def test_composed_recipe_reports_every_stage_and_keeps_2of4(tmp_path, tokenizer, text_file):
    lines = []
    report = run_recipe(load_recipe(_recipe(tmp_path, tokenizer, text_file, layout="compact")), progress=False,
                        echo=lines.append)
    names = [r.name for r in report.rows]
    assert names[0] == "load" and names[1] == "teacher targets (1)" and names[-1] == "export"
    assert names[2].startswith("wanda") and names[3].startswith("distill") and names[4].startswith("gptq")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in saved["stages"]] == names
    wanda, distill, gptq = saved["stages"][2:5]
    assert distill["detail"]["result"]["max_mask_deviation"] == 0.0 and distill["detail"]["result"]["steps"] == 4
    assert distill["perplexity"] != wanda["perplexity"]                      # training changed the model
    assert gptq["bits"] == "int4" and gptq["sparsity"] >= 0.5 - 1e-6          # GPTQ kept the 2:4 zeros
    assert all(s["disk_bytes"] for s in saved["stages"][2:])                   # real size on disk per stage
    assert gptq["disk_bytes"] < wanda["disk_bytes"] / 2                        # int4 codes instead of float32
    model, _ = load_model(tmp_path / "out")
    assert _is_2of4(model)
    assert not (tmp_path / "out.work").exists()
    assert "perplexity" in lines[-1].splitlines()[0]                           # the printed table


def test_an_interrupted_recipe_resumes_after_its_last_finished_stage(tmp_path, tokenizer, text_file, monkeypatch):
    path = _recipe(tmp_path, tokenizer, text_file)
    calls = []
    real_apply = recipe_module.apply

    def failing_apply(model, cfg, calib, **kw):
        calls.append(cfg.method)
        if cfg.method == "gptq" and len(calls) == 3:
            raise KeyboardInterrupt                                      # the user stops the first run
        return real_apply(model, cfg, calib, **kw)

    monkeypatch.setattr(recipe_module, "apply", failing_apply)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path), progress=False, echo=lambda *_: None)
    work = tmp_path / "out.work"
    state = json.loads((work / "state.json").read_text())
    assert state["checkpoint"] == "stage-1" and len(state["stages"]) == 2
    assert not (tmp_path / "out").exists()                                  # nothing half-exported
    lines = []
    report = run_recipe(load_recipe(path), progress=False, echo=lines.append)
    assert calls == ["wanda", "distill", "gptq", "gptq"]                    # only the unfinished pass ran again
    assert any(line.startswith("[resume] 2 of 3 passes") for line in lines)
    assert [r.detail.get("resumed", False) for r in report.rows] == [True] * 4 + [False, False]

    # The same recipe run in one go gives the same model.
    monkeypatch.setattr(recipe_module, "apply", real_apply)
    once = run_recipe(load_recipe(path), output=tmp_path / "once", progress=False, echo=lambda *_: None)
    assert once.rows[-2].perplexity == pytest.approx(report.rows[-2].perplexity, rel=1e-5)


def test_a_changed_pass_or_restart_starts_from_the_beginning(tmp_path, tokenizer, text_file, monkeypatch):
    path = _recipe(tmp_path, tokenizer, text_file)
    recipe = load_recipe(path)
    real_apply = recipe_module.apply

    def stop_at_gptq(model, cfg, calib, **kw):
        if cfg.method == "gptq":
            raise KeyboardInterrupt
        return real_apply(model, cfg, calib, **kw)

    monkeypatch.setattr(recipe_module, "apply", stop_at_gptq)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, progress=False, echo=lambda *_: None)
    changed = load_recipe(path)
    changed.passes[0].pattern = "4:8"                                        # the first pass differs now
    assert stage_fingerprints(changed)[0] != stage_fingerprints(recipe)[0]
    assert stage_fingerprints(changed)[1:] != stage_fingerprints(recipe)[1:]  # and so does everything after it
    calls = []
    monkeypatch.setattr(recipe_module, "apply", lambda m, cfg, c, **kw: calls.append(cfg.method) or real_apply(m, cfg, c, **kw))
    run_recipe(changed, progress=False, echo=lambda *_: None)
    assert calls == ["wanda", "distill", "gptq"]
    # --restart ignores a matching work directory too.
    monkeypatch.setattr(recipe_module, "apply", stop_at_gptq)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "again", progress=False, echo=lambda *_: None)
    calls.clear()
    monkeypatch.setattr(recipe_module, "apply", lambda m, cfg, c, **kw: calls.append(cfg.method) or real_apply(m, cfg, c, **kw))
    run_recipe(recipe, output=tmp_path / "again", progress=False, echo=lambda *_: None, resume=False)
    assert calls == ["wanda", "distill", "gptq"]


def test_an_interrupted_distillation_resumes_mid_training(tmp_path, tokenizer, text_file, monkeypatch):
    """The training state in the work directory lets a killed distillation go on at its last saved step."""
    path = _recipe(tmp_path, tokenizer, text_file)
    distill_module = importlib.import_module("compress.distillation.apply")   # compress.distill is also the function
    real_loss = distill_module.distillation_loss
    calls = []

    def dying_loss(*args, **kw):
        calls.append(1)
        if len(calls) == 3:                       # batch_size 2, micro-batch 2: one call per step
            raise KeyboardInterrupt
        return real_loss(*args, **kw)

    monkeypatch.setattr(distill_module, "distillation_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path), progress=False, echo=lambda *_: None)
    states = list((tmp_path / "out.work").glob("train-1-*.pt"))
    assert len(states) == 1 and torch.load(states[0], weights_only=False)["step"] == 2
    calls.clear()
    monkeypatch.setattr(distill_module, "distillation_loss", lambda *a, **k: calls.append(1) or real_loss(*a, **k))
    report = run_recipe(load_recipe(path), progress=False, echo=lambda *_: None)
    assert len(calls) == 2                        # steps 3 and 4 only
    assert report.rows[3].detail["result"]["steps"] == 4
