import json
from pathlib import Path

import pytest
import yaml

from compress.errors import ConfigError, MissingPathError
from compress.quant.config import GPTQConfig, RTNConfig
from compress.recipe import load_recipe, recipe_from_dict, run_recipe
from conftest import tiny_model

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse_and_round_trip(path):
    recipe = load_recipe(path)
    assert recipe.passes and recipe.export is not None
    again = recipe_from_dict(recipe.to_dict(), base_dir=recipe.base_dir)
    assert again == recipe
    data = Path(recipe.path(recipe.evaluation.data))
    assert data.name == "test.txt" and data.parent.name == "wikitext-2"   # resolved against the recipe file


def test_shipped_recipe_names():
    names = {p.name for p in RECIPES}
    assert {"smollm2-w4g64-gptq.yaml", "smollm2-w8-rtn.yaml"} <= names


def test_passes_map_onto_config_classes():
    recipe = recipe_from_dict({"version": 1, "model": "m", "calibration": {"data": "x.txt"},
                               "passes": [{"method": "gptq", "bits": 3, "group_size": 64},
                                          {"method": "rtn", "bits": 8, "group_size": None}]})
    assert recipe.passes == [GPTQConfig(bits=3, group_size=64), RTNConfig(bits=8, group_size=None)]


@pytest.mark.parametrize("bad, message", [
    ({"version": 1, "model": "m", "pases": []}, r"unknown key 'pases' \(did you mean 'passes'\?\)"),
    ({"version": 1, "model": "m", "calibration": {"data": "x", "sample": 4}}, "calibration: unknown key 'sample'"),
    ({"version": 1, "model": "m", "passes": [{"method": "rtn", "group": 64}]}, r"passes\[0\] \(rtn\): unknown key 'group'"),
    ({"version": 1, "model": "m", "passes": [{"bits": 4}]}, r"passes\[0\]: missing 'method'"),
    ({"version": 1, "model": "m", "passes": [{"method": "gptq"}]}, "need calibration data"),
    ({"model": "m"}, "missing 'version'"),
    ({"version": 7, "model": "m"}, "recipe version 7 is not supported"),
    ({"version": 1}, r"missing required key\(s\) \['model'\]"),
    ({"version": 1, "model": "m", "evaluation": {"seqlen": 8}}, r"evaluation: missing required key\(s\) \['data'\]"),
    ({"version": 1, "model": "m", "export": {"output": 5}}, "field 'output' must be a string"),
])
def test_bad_recipes_name_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(bad)


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(MissingPathError):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("version: 1\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_run_writes_report_with_a_row_per_stage(tmp_path, tokenizer, text_file):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    recipe_path = tmp_path / "recipes" / "tiny.yaml"
    recipe_path.parent.mkdir()
    recipe_path.write_text(yaml.safe_dump({
        "version": 1, "model": "../base",
        "calibration": {"data": str(text_file), "samples": 4, "seqlen": 32},
        "passes": [{"method": "gptq", "bits": 4, "group_size": 32}],
        "evaluation": {"data": str(text_file), "seqlen": 32, "max_windows": 3},
        "export": {"output": "../out", "verify": True},
    }))
    lines = []
    report = run_recipe(load_recipe(recipe_path), progress=False, echo=lines.append)
    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in saved["stages"]]
    assert names == ["load", "gptq w4g32", "export", "reload"]
    load, gptq, export, reload = saved["stages"]
    assert gptq["bits"] == "int4" and load["bits"] == "float32"
    assert gptq["bytes"] < 0.5 * load["bytes"] and export["disk_bytes"] == (out / "model.safetensors").stat().st_size
    assert gptq["disk_bytes"] == export["disk_bytes"]           # the stage checkpoint: the same tensors
    assert not (tmp_path / "out.work").exists()                 # the work directory goes after the export
    assert reload["perplexity"] == pytest.approx(gptq["perplexity"], rel=1e-6)
    assert gptq["parameters"] == load["parameters"] and 0 <= gptq["sparsity"] < 0.2
    assert all(s["seconds"] >= 0 for s in saved["stages"]) and "machine" in saved
    assert "stage" in lines[-1] and "gptq w4g32" in lines[-1]           # the printed table
    assert report.rows[1].perplexity == gptq["perplexity"]


def test_backend_key_round_trips_and_is_checked():
    recipe = recipe_from_dict({"version": 1, "model": "m", "backend": "torch"})
    assert recipe.backend == "torch" and recipe.to_dict()["backend"] == "torch"
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe_from_dict({"version": 1, "model": "m"}).backend == "auto"
    with pytest.raises(ConfigError, match="kernel backend must be one of auto, torch, triton; got 'cuda'"):
        recipe_from_dict({"version": 1, "model": "m", "backend": "cuda"})


@pytest.mark.parametrize("key,value,match", [
    ("max_windows", 0, r"evaluation: max_windows must be at least 1, got 0; leave it out"),
    ("batch_size", 0, r"evaluation: batch_size must be at least 1, got 0"),
    ("kv_chunk", -1, r"evaluation: kv_chunk must be at least 1, got -1"),
])
def test_evaluation_counts_below_one_are_refused_when_the_recipe_is_read(key, value, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"version": 1, "model": "m", "evaluation": {"data": "x.txt", key: value}})
    assert recipe_from_dict({"version": 1, "model": "m", "evaluation": {"data": "x.txt", key: 1}})


def test_a_recipe_device_this_machine_lacks_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    recipe = recipe_from_dict({"version": 1, "model": str(tmp_path / "missing"), "device": "cuda"})
    with pytest.raises(ConfigError, match=r"^device cuda: torch sees no CUDA device on this machine"):
        run_recipe(recipe, progress=False, echo=lambda *a: None)      # the missing model is never reached
