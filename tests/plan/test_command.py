"""`compress plan` end to end: plan -> recipe -> `compress run` -> a checkpoint of exactly the planned
bytes within the budget; KV-cache plans; errors; `compress bench` predictions and calibration."""

import json

import pytest
import torch
import yaml

import compress
from compress.bench import BenchSettings, benchmark, calibrated_profile
from compress.checkpoint.safetensors_io import weights_bytes
from compress.cli import main
from compress.plan.cost import formats_of, model_shape
from compress.plan.devices import load_profile
from compress.quant.fp4_linear import FP4Linear
from compress.quant.linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--calib-samples", "8", "--seqlen", "32", "--fisher-samples", "4"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _plan(base, text_file, out, *extra):
    return main(["-q", "plan", str(base), "--device", "cpu", "--calib", str(text_file), *COMMON,
                 "--output", str(out), *extra])


def test_plan_then_run_writes_the_planned_bytes_within_the_budget(base, text_file, tmp_path, home, capsys):
    recipe = tmp_path / "plan.yaml"
    budget_mib = 0.17
    assert _plan(base, text_file, recipe, "--memory-mib", str(budget_mib), "--eval", str(text_file),
                 "--export", str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "meets the target" in printed and "layer" in printed
    data = yaml.safe_load(recipe.read_text())
    assert recipe.read_text().startswith("# Written by `compress plan`")
    plan = data["plan"]
    assert plan["prediction"]["checkpoint_bytes"] <= budget_mib * 2**20
    assert main(["-q", "run", str(recipe)]) == 0
    out = tmp_path / "out"
    assert weights_bytes(out) == plan["prediction"]["checkpoint_bytes"]        # exact, not approximate
    model, _ = compress.load_model(out)
    shape = model_shape(model, torch.bfloat16)
    got = {u: f.name for u, f in formats_of(model, shape).items()}
    assert got == plan["formats"]
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["plan"]["formats"] == plan["formats"]


def test_a_smaller_budget_gives_fewer_bits(base, text_file, tmp_path, home):
    sizes = {}
    for mib in (0.15, 0.25):
        recipe = tmp_path / f"plan-{mib}.yaml"
        assert _plan(base, text_file, recipe, "--memory-mib", str(mib)) == 0
        sizes[mib] = yaml.safe_load(recipe.read_text())["plan"]
    assert sizes[0.15]["prediction"]["checkpoint_bytes"] < sizes[0.25]["prediction"]["checkpoint_bytes"]
    assert sizes[0.15]["predicted_dloss"] >= sizes[0.25]["predicted_dloss"]


def test_an_infeasible_budget_exits_3_and_writes_the_closest_plan(base, text_file, tmp_path, home, capsys):
    recipe = tmp_path / "plan.yaml"
    assert _plan(base, text_file, recipe, "--memory-mib", "0.01") == 3
    printed = capsys.readouterr().out
    assert "TARGET NOT MET" in printed and "out of reach" in printed and "closest feasible" in printed
    assert yaml.safe_load(recipe.read_text())["plan"]["feasible"] is False


def test_a_context_plans_the_kv_cache_too(base, text_file, tmp_path, home):
    recipe = tmp_path / "plan.yaml"
    ctx = ["--batch", "1", "--context", "2048", "--kv-options", "bf16,int8,int4"]
    assert _plan(base, text_file, recipe, "--memory-mib", "100", *ctx) == 0
    loose = yaml.safe_load(recipe.read_text())["plan"]
    assert loose["kv_cache"] == "bf16"                                   # no pressure: a full-precision cache
    smallest = loose["memory_used_bytes"] - loose["prediction"]["weight_bytes"] + 140_000   # ~2-bit weights
    budget = (smallest - loose["prediction"]["kv_bytes"] // 2) / 2**20   # bf16 KV no longer fits
    assert _plan(base, text_file, recipe, "--memory-mib", f"{budget:.4f}", *ctx) == 0
    data = yaml.safe_load(recipe.read_text())
    assert data["plan"]["kv_cache"] in ("int8", "int4")
    assert any(p["method"] == "kv_cache" for p in data["passes"])
    assert data["plan"]["memory_used_bytes"] <= budget * 2**20
    compress.recipe.recipe_from_dict(data, base_dir=tmp_path)            # a valid recipe


@pytest.mark.parametrize("args,message", [
    ([], "give a target"),
    (["--memory-gb", "1", "--memory-mib", "5"], "once"),
    (["--memory-gb", "1", "--device", "tpu9"], "tpu9"),
    (["--memory-gb", "1", "--formats", "int4-g64,int9"], "int9"),
])
def test_bad_plan_arguments_are_named(base, text_file, tmp_path, home, capsys, args, message):
    code = main(["-q", "plan", str(base), "--calib", str(text_file), *COMMON, "--output", str(tmp_path / "p.yaml"),
                 "--device", "cpu", *args] if "--device" not in args else
                ["-q", "plan", str(base), "--calib", str(text_file), *COMMON, "--output", str(tmp_path / "p.yaml"),
                 *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_bench_predicts_next_to_the_measurement_and_calibration_reproduces_it(base, tmp_path, home):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--output", str(out)]) == 0
    settings = BenchSettings(prompt_len=32, new_tokens=4, warmup=0, repeats=1)
    cpu = load_profile("cpu")
    result = benchmark(out, device="cpu", settings=settings, profile=cpu)
    ours, dense = result.models
    assert ours.predicted_decode_seconds > 0 and dense.predicted_prefill_seconds > 0
    assert result.to_dict()["models"][0]["decode_ratio"] == pytest.approx(ours.decode_seconds /
                                                                         ours.predicted_decode_seconds)
    fitted = calibrated_profile(cpu, result)
    assert fitted.source == "calibrated" and fitted.efficiency != cpu.efficiency
    # the refitted profile predicts what was measured (within the clamp of the efficiency to (0, 1])
    again = benchmark(out, device="cpu", settings=settings, profile=fitted)
    checked = 0
    for phase in ("decode", "prefill"):
        c = dense.calibration[phase]
        meas = dense.decode_seconds if phase == "decode" else dense.prefill_seconds
        eff = fitted.efficiency[phase][c["family"]]
        if meas > c["r"] and 0.005 < eff < 1.0:       # a fit that the (0, 1] range did not clamp
            checked += 1
            pred = again.models[1].predicted_decode_seconds if phase == "decode" else \
                again.models[1].predicted_prefill_seconds
            assert pred == pytest.approx(meas, rel=1e-6)
    for phase in ("decode", "prefill"):                  # what could not be fitted keeps its value
        c = dense.calibration[phase]
        meas = dense.decode_seconds if phase == "decode" else dense.prefill_seconds
        if meas <= c["r"]:
            assert fitted.efficiency[phase][c["family"]] == cpu.efficiency[phase][c["family"]]


def test_bench_cli_shows_predictions_and_saves_a_calibrated_profile(base, tmp_path, home, capsys):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--bits", "8", "--group-size", "channel",
                 "--output", str(out)]) == 0
    assert main(["-q", "bench", str(out), "--device", "cpu", "--prompt-len", "32", "--new-tokens", "4",
                 "--warmup", "0", "--repeats", "1", "--profile", "cpu", "--calibrate", "cpu-fitted"]) == 0
    printed = capsys.readouterr().out
    assert "predicted (cost model)" in printed and "cpu-fitted" in printed
    fitted = load_profile("cpu-fitted")
    assert fitted.source == "calibrated"
    assert (home / "devices" / "cpu-fitted.yaml").is_file()


def test_a_plan_with_fp4_units_exports_them(base, text_file, tmp_path, home):
    recipe = tmp_path / "plan.yaml"
    assert _plan(base, text_file, recipe, "--memory-mib", "0.2", "--formats", "bf16,nvfp4a16",
                 "--export", str(tmp_path / "out")) == 0
    assert main(["-q", "run", str(recipe)]) == 0
    model, _ = compress.load_model(tmp_path / "out")
    assert any(isinstance(m, FP4Linear) for m in model.modules())
    plan = yaml.safe_load(recipe.read_text())["plan"]
    assert weights_bytes(tmp_path / "out") == plan["prediction"]["checkpoint_bytes"]


def test_calibration_fits_the_efficiency_that_reproduces_a_measurement():
    from compress.bench import BenchResult, Measurement, attach_prediction
    from conftest import tiny_model
    model = tiny_model("llama").to(torch.bfloat16)
    settings = BenchSettings(prompt_len=32, new_tokens=4)
    cpu = load_profile("cpu")
    m = Measurement("dense", 1.0, 1.0, prefill_seconds=0.0, decode_seconds=0.0, peak_memory_bytes=None, weight_bytes=1)
    attach_prediction(m, model, cpu, settings)
    m.decode_seconds, m.prefill_seconds = 1.2 * m.predicted_decode_seconds, 1.5 * m.predicted_prefill_seconds
    fitted = calibrated_profile(cpu, BenchResult("x", "cpu", "bfloat16", None, settings, [m]))
    assert fitted.efficiency["decode"]["bf16"] < cpu.efficiency["decode"]["bf16"]
    again = Measurement("dense", 1.0, 1.0, prefill_seconds=0.0, decode_seconds=0.0, peak_memory_bytes=None,
                        weight_bytes=1)
    attach_prediction(again, model, fitted, settings)
    assert again.predicted_decode_seconds == pytest.approx(m.decode_seconds, rel=1e-9)
    assert again.predicted_prefill_seconds == pytest.approx(m.prefill_seconds, rel=1e-9)
    assert fitted.efficiency["decode"]["int"] == cpu.efficiency["decode"]["int"]      # only what was measured


def test_relative_paths_in_the_written_recipe_work_from_any_directory(base, text_file, tmp_path, home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans").mkdir()
    assert main(["-q", "plan", "base", "--device", "cpu", "--calib", "text.txt", *COMMON, "--memory-mib", "0.2",
                 "--export", "out/x", "--output", "plans/p.yaml"]) == 0
    data = yaml.safe_load((tmp_path / "plans" / "p.yaml").read_text())
    assert data["export"]["output"] == "../out/x" and data["model"] == "../base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["-q", "run", str(tmp_path / "plans" / "p.yaml")]) == 0
    assert (tmp_path / "out" / "x" / "model.safetensors").is_file()


def test_a_sweep_traces_a_monotone_frontier_and_the_report_finds_it(base, text_file, tmp_path, home):
    """--sweep N: plans at N budgets from the smallest candidate to the dense size; more bytes never
    predict more loss among the undominated plans, and `compress report` draws them from the recipe."""
    recipe = tmp_path / "plan.yaml"
    assert _plan(base, text_file, recipe, "--memory-mib", "0.2", "--sweep", "6") == 0
    sweep_file = tmp_path / "plan.sweep.json"
    points = json.loads(sweep_file.read_text())["points"]
    assert 2 <= len(points) <= 6 and all(p["feasible"] for p in points)
    sizes = [p["prediction"]["checkpoint_bytes"] for p in points]
    losses = [p["predicted_dloss"] for p in points]
    assert sizes == sorted(sizes) and len(set(sizes)) > 1
    assert all(later <= earlier + 1e-12 for earlier, later in zip(losses, losses[1:]))   # a bigger budget never loses
    assert yaml.safe_load(recipe.read_text())["plan"]["sweep"] == str(sweep_file.resolve())
    from compress.report_html import Run, _pareto_section
    run = Run(tmp_path / "nowhere", {"recipe": {"plan": {"sweep": str(sweep_file)}}, "stages": []})
    assert "Pareto frontier" in _pareto_section(run, None)
    assert _plan(base, text_file, tmp_path / "bad.yaml", "--memory-mib", "0.2", "--sweep", "1") == 2
