"""Formats that round their activations too, in the planner: W4A8 (w4a8-int8, w4a8-fp8) and NVFP4
W4A4 (nvfp4). Where the device has their tensor-core math (INT8: Ampere and later; FP8: Ada, Hopper,
Blackwell; FP4: Blackwell) prefill runs at that rate while decode reads the same weight bytes as the
weight-only twin (int4, nvfp4a16); elsewhere they are not offered, and when named they cost their
twin's speed. The plan says which, and why."""

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig

import compress
from compress.data import CalibrationData
from compress.checkpoint.safetensors_io import weights_bytes
from compress.formats import WeightFormat
from compress.plan import sensitivity as sens_module
from compress.plan.command import PlanInputs, baseline_formats, format_plan, plan_model, recipe_of
from compress.plan.cost import (ModelShape, Workload, formats_of, linear_seconds, math_note, model_shape,
                                native_math, predict, shape_from_config, weight_only_twin)
from compress.plan.devices import load_profile
from compress.plan.planner import Target, candidate_formats, checkpoint_size, format_notes, make_plan, uniform_plan
from compress.plan.sensitivity import Sensitivity, measure_sensitivity
from compress.recipe import recipe_from_dict, run_recipe
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False)
SMALL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4)
LONG = Workload(1, 8192)                          # a long prompt: every linear's prefill is compute-bound


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return shape_from_config(LlamaConfig(**LLAMA3_8B))


def _ideal(profile):
    """The profile with every efficiency 1 and no launch overhead: the bare roofline."""
    eff = {ph: {k: 1.0 for k in v} for ph, v in profile.efficiency.items()}
    return dataclasses.replace(profile, efficiency=eff, overhead_us=0.0)


def _uniform(shape, name, profile, work):
    return predict(shape, {u.name: WeightFormat.parse(name) for u in shape.units}, profile, work)


def _names(profile):
    return [f.name for f in candidate_formats(profile)]


# ------------------------------------------------------------------------------- cost model

@pytest.mark.parametrize("w4a8", ["w4a8-int8-g128", "w4a8-fp8-g128"])
@pytest.mark.parametrize("device", ["h100", "h200", "b200"])
def test_w4a8_decodes_as_int4_and_prefills_at_the_8bit_rate(llama8b, device, w4a8):
    profile = load_profile(device)
    int4 = {w: _uniform(llama8b, "int4-g128", profile, w) for w in (Workload(1, 2048), LONG)}
    fast = {w: _uniform(llama8b, w4a8, profile, w) for w in (Workload(1, 2048), LONG)}
    # decode is memory-bound: the same int4 g128 bytes, the same time
    assert fast[LONG].weight_bytes == int4[LONG].weight_bytes
    assert fast[Workload(1, 2048)].decode_s == pytest.approx(int4[Workload(1, 2048)].decode_s, rel=1e-12)
    # against int4 g64, decode differs only by the scale bytes it does not read (one bf16 per 64 vs 128)
    g64 = _uniform(llama8b, "int4-g64", profile, Workload(1, 2048))
    scale_bytes = g64.weight_bytes - fast[LONG].weight_bytes
    assert scale_bytes == sum(2 * o * i // 128 for u in llama8b.units for _, o, i, _ in u.members)
    eff = profile.efficiency["decode"]["int"]
    assert g64.decode_s - fast[Workload(1, 2048)].decode_s == pytest.approx(
        scale_bytes / (profile.bandwidth_gbs * 1e9) / eff, rel=1e-3)
    # prefill of a long prompt: the linears run at the 8-bit rate, twice bf16's, so well ahead of int4
    assert fast[LONG].prefill_s < 0.7 * int4[LONG].prefill_s
    bf16 = _uniform(llama8b, "bf16", profile, LONG)
    assert fast[LONG].prefill_s < bf16.prefill_s               # int4 alone is slower than bf16 there


@pytest.mark.parametrize("name,key", [("w4a8-int8-g128", "int8"), ("w4a8-fp8-g128", "fp8"), ("nvfp4", "fp4"),
                                      ("fp8", "fp8")])
def test_a_compute_bound_linear_runs_at_the_tensor_core_rate_by_hand(name, key):
    """At efficiency 1, a 4096 x 4096 linear over 8192 tokens takes its FLOPs over the rate of its
    activations' math: the W4A8 / W4A4 / W8A8 formats on B200, where all three are native."""
    b200 = _ideal(load_profile("b200"))
    fmt = WeightFormat.parse(name)
    assert native_math(b200, fmt) == key
    flops = 2.0 * 8192 * 4096 * 4096
    assert linear_seconds(b200, "prefill", fmt, 4096, 4096, 8192, torch.bfloat16) == pytest.approx(
        flops / (b200.tflops[key] * 1e12), rel=1e-9)
    twin = weight_only_twin(fmt)
    if twin != fmt:                                            # its weight-only twin multiplies in bf16
        assert native_math(b200, twin) is None
        assert linear_seconds(b200, "prefill", twin, 4096, 4096, 8192, torch.bfloat16) == pytest.approx(
            flops / (b200.tflops["bf16"] * 1e12), rel=1e-9)


def test_on_a100_w4a8_int8_is_offered_and_w4a8_fp8_is_not(llama8b):
    a100 = load_profile("a100")
    names = _names(a100)
    assert "w4a8-int8-g128" in names and "w4a8-fp8-g128" not in names
    notes = format_notes(a100, candidate_formats(a100))
    assert any(n.startswith("w4a8-fp8-g128: not offered: a100 has no FP8 tensor cores") for n in notes)
    assert any(n.startswith("w4a8-int8-g128: decode reads int4-g128's weights") and "624 TOPS" in n for n in notes)
    # INT8 math (624 TOPS, twice bf16's 312) makes its prefill faster than int4's
    int4 = _uniform(llama8b, "int4-g128", a100, LONG)
    assert _uniform(llama8b, "w4a8-int8-g128", a100, LONG).prefill_s < 0.7 * int4.prefill_s
    # named anyway, w4a8-fp8 costs exactly int4's weight-only speed, and its note says so
    named = _uniform(llama8b, "w4a8-fp8-g128", a100, LONG)
    assert (named.prefill_s, named.decode_s) == pytest.approx((int4.prefill_s, int4.decode_s), rel=1e-12)
    note = math_note(a100, WeightFormat.parse("w4a8-fp8-g128"))
    assert "no FP8 tensor cores" in note and "int4-g128's weight-only speed" in note


def test_on_b200_nvfp4_w4a4_prefills_at_the_fp4_rate_and_beats_nvfp4a16(llama8b):
    b200 = load_profile("b200")
    assert "nvfp4" in _names(b200)
    w4a4 = _uniform(llama8b, "nvfp4", b200, LONG)
    w4a16 = _uniform(llama8b, "nvfp4a16", b200, LONG)
    assert w4a4.prefill_s < 0.5 * w4a16.prefill_s            # FP4 math is 4x bf16's on B200
    # decode: the same weights plus one float32 input scale per linear
    linears = sum(len(u.members) for u in llama8b.units)
    assert w4a4.weight_bytes - w4a16.weight_bytes == 4 * linears
    assert w4a4.decode_s == pytest.approx(w4a16.decode_s, rel=1e-6)
    assert any(n.startswith("nvfp4: decode reads nvfp4a16's weights") and "9000 TFLOPS" in n
               for n in format_notes(b200, candidate_formats(b200)))


@pytest.mark.parametrize("device", ["h100", "h200", "a100", "l40s", "rtx4090"])
def test_without_fp4_tensor_cores_nvfp4_is_not_offered_and_costs_nvfp4a16s_speed_when_named(llama8b, device):
    profile = load_profile(device)
    assert "nvfp4" not in _names(profile) and "nvfp4a16" in _names(profile)
    notes = format_notes(profile, candidate_formats(profile))
    assert f"nvfp4: not offered: {device} has no FP4 (NVFP4) tensor cores (no tflops.fp4, no nvfp4 in " \
           f"native_formats)" in notes
    w4a4 = _uniform(llama8b, "nvfp4", profile, LONG)
    w4a16 = _uniform(llama8b, "nvfp4a16", profile, LONG)
    assert w4a4.prefill_s == pytest.approx(w4a16.prefill_s, rel=1e-6)
    assert w4a4.decode_s == pytest.approx(w4a16.decode_s, rel=1e-6)
    assert "nvfp4a16's weight-only speed" in math_note(profile, WeightFormat.parse("nvfp4"))


@pytest.mark.parametrize("device,offered", [
    ("h100", {"w4a8-int8-g128", "w4a8-fp8-g128"}), ("h200", {"w4a8-int8-g128", "w4a8-fp8-g128"}),
    ("b200", {"w4a8-int8-g128", "w4a8-fp8-g128", "nvfp4"}), ("a100", {"w4a8-int8-g128"}),
    ("l40s", {"w4a8-int8-g128", "w4a8-fp8-g128"}), ("rtx4090", {"w4a8-int8-g128", "w4a8-fp8-g128"}),
    ("cpu", set())])
def test_which_device_gets_which_activation_format(device, offered):
    """The table in docs/planner.md: W4A8 where the 8-bit tensor cores are, W4A4 where FP4 ones are,
    and a note for each one left out."""
    profile = load_profile(device)
    names = set(_names(profile))
    candidates = {"w4a8-int8-g128", "w4a8-fp8-g128", "nvfp4"}
    assert names & candidates == offered
    notes = format_notes(profile, candidate_formats(profile))
    for name in candidates - offered:
        assert any(n.startswith(f"{name}: not offered: {device} has no ") for n in notes), (name, notes)


def test_on_the_cpu_nothing_rounds_activations_and_named_w4a8_costs_int4s_reference_path(llama8b):
    cpu = load_profile("cpu")
    assert not any(WeightFormat.parse(n).act_quant for n in _names(cpu))
    notes = format_notes(cpu, candidate_formats(cpu))
    assert "w8a8-int8: not offered: cpu has no INT8 tensor cores (no tflops.int8, no int8 in native_formats)" in notes
    w4a8 = _uniform(llama8b, "w4a8-int8-g128", cpu, Workload(1, 256))
    int4 = _uniform(llama8b, "int4-g128", cpu, Workload(1, 256))
    assert (w4a8.prefill_s, w4a8.decode_s) == (int4.prefill_s, int4.decode_s)
    # a CPU that did list INT8 math would get its rate (a measured profile, say): the rule is the data
    vnni = dataclasses.replace(cpu, tflops={**cpu.tflops, "int8": 2.0}, native_formats=["bf16", "int8"])
    assert native_math(vnni, WeightFormat.parse("w4a8-int8-g128")) == "int8"
    assert "w4a8-int8-g128" not in _names(vnni)               # ... but no fused int4 kernel there: not offered
    assert any(n.startswith("w4a8-int8-g128: not offered: no fused kernel") for n in format_notes(vnni, []))


def test_half_a_capability_is_none_and_the_note_says_which_half():
    """FP8 in tflops but not in native_formats (or the reverse) is not FP8 math: a profile must say both."""
    h100 = load_profile("h100")
    no_native = dataclasses.replace(h100, native_formats=["bf16", "int8"])
    no_rate = dataclasses.replace(h100, tflops={k: v for k, v in h100.tflops.items() if k != "fp8"})
    for profile, why in ((no_native, "(no fp8 in native_formats)"), (no_rate, "(no tflops.fp8)")):
        assert "w4a8-fp8-g128" not in _names(profile) and "w4a8-int8-g128" in _names(profile)
        assert f"w4a8-fp8-g128: not offered: h100 has no FP8 tensor cores {why}" in format_notes(profile, [])


# ---------------------------------------------------------------------------------- search

def _small():
    return shape_from_config(LlamaConfig(**SMALL))


def test_a_prefill_target_under_a_4bit_budget_buys_w4a8_on_h100_and_a_decode_target_does_not():
    """Within int4's bytes, W4A8 is the only way to a faster prefill; it costs a little more quality
    (its activation rounding), so it is bought only for prefill speed, never for decode."""
    h100 = load_profile("h100")
    shape = _small()
    fmts = [WeightFormat.parse(f) for f in ("bf16", "int4-g128", "w4a8-int8-g128", "fp8")]
    sens = Sensitivity({"int4-g128": {u.name: 1e-2 for u in shape.units},
                        "w4a8-int8-g128": {u.name: 1.2e-2 for u in shape.units},
                        "fp8": {u.name: 1e-3 for u in shape.units}}, 2.0, "test", {})
    work = dict(batch=8)                          # prompts of 2048 tokens; the budget is the checkpoint's bytes
    budget = checkpoint_size(shape, "int4-g128") + 2**17   # the DP's bins round up; fp8 needs MBs more
    quiet = make_plan(shape, sens, h100, Target(memory_bytes=budget, **work), fmts, kv_options=["bf16"])
    assert quiet.counts() == {"int4-g128": len(shape.units)}            # no speed target: the better quality
    int4 = uniform_plan(shape, sens, h100, Target(memory_bytes=budget, **work), "int4-g128")
    w4a8 = uniform_plan(shape, sens, h100, Target(memory_bytes=budget, **work), "w4a8-int8-g128")
    assert w4a8.prediction.prefill_tokens_per_s > 1.4 * int4.prediction.prefill_tokens_per_s
    goal = (int4.prediction.prefill_tokens_per_s + w4a8.prediction.prefill_tokens_per_s) / 2
    plan = make_plan(shape, sens, h100, Target(memory_bytes=budget, prefill_tokens_per_s=goal, **work), fmts,
                     kv_options=["bf16"])
    assert plan.feasible and plan.memory_used <= budget and plan.prediction.prefill_tokens_per_s >= goal
    assert "w4a8-int8-g128" in plan.counts() and "fp8" not in plan.counts()          # fp8 does not fit the bytes
    assert plan.dloss < w4a8.dloss                                                   # only as many as needed
    # a decode target just above int4's is out of reach: W4A8 reads the same bytes, so it cannot help
    decode_goal = int4.prediction.decode_tokens_per_s * 1.01
    decode = make_plan(shape, sens, h100, Target(memory_bytes=budget, decode_tokens_per_s=decode_goal, **work),
                       fmts, kv_options=["bf16"])
    assert not decode.feasible and decode.counts() == {"int4-g128": len(shape.units)}
    # negative control: on a device without 8-bit math the same target is out of reach within the budget
    no8 = dataclasses.replace(h100, native_formats=["bf16"], tflops={"fp32": 67, "bf16": 989.4})
    miss = make_plan(shape, sens, no8, Target(memory_bytes=budget, prefill_tokens_per_s=goal, **work), fmts,
                     kv_options=["bf16"])
    assert not miss.feasible and "out of reach" in miss.message


def test_a_prefill_target_on_b200_buys_nvfp4_over_nvfp4a16():
    b200 = load_profile("b200")
    shape = _small()
    fmts = [WeightFormat.parse(f) for f in ("bf16", "nvfp4a16", "nvfp4")]
    sens = Sensitivity({"nvfp4a16": {u.name: 1e-2 for u in shape.units},
                        "nvfp4": {u.name: 3e-2 for u in shape.units}}, 2.0, "test", {})
    work = dict(batch=8)
    budget = checkpoint_size(shape, "nvfp4") + 2**17
    w4a16 = uniform_plan(shape, sens, b200, Target(memory_bytes=budget, **work), "nvfp4a16")
    w4a4 = uniform_plan(shape, sens, b200, Target(memory_bytes=budget, **work), "nvfp4")
    goal = (w4a16.prediction.prefill_tokens_per_s + w4a4.prediction.prefill_tokens_per_s) / 2
    plan = make_plan(shape, sens, b200, Target(memory_bytes=budget, prefill_tokens_per_s=goal, **work), fmts,
                     kv_options=["bf16"])
    assert plan.feasible and "nvfp4" in plan.counts() and plan.prediction.prefill_tokens_per_s >= goal
    h100 = load_profile("h100")                   # named on Hopper: no faster than nvfp4a16, so no help
    hopper16 = uniform_plan(shape, sens, h100, Target(memory_bytes=budget, **work), "nvfp4a16")
    hopper = make_plan(shape, sens, h100, Target(memory_bytes=budget, **work,
                                                 prefill_tokens_per_s=1.05 * hopper16.prediction.prefill_tokens_per_s),
                       fmts, kv_options=["bf16"])
    assert not hopper.feasible and "nvfp4" not in hopper.counts()
    assert any(n.startswith("nvfp4: h100 has no FP4 (NVFP4) tensor cores") for n in hopper.notes)


def test_the_plan_output_says_how_the_device_shaped_the_candidates():
    a100 = load_profile("a100")
    shape = _small()
    fmts = candidate_formats(a100)
    sens = Sensitivity({f.name: {u.name: 1e-3 for u in shape.units} for f in fmts if not f.dense}, 2.0, "test", {})
    plan = make_plan(shape, sens, a100, Target(memory_bytes=checkpoint_size(shape, "int8")), fmts)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["format_notes"] == plan.notes == format_notes(a100, fmts)
    inputs = PlanInputs(shape, a100, fmts, sens, {})
    baselines = [uniform_plan(shape, sens, a100, plan.target, f.name) for f in baseline_formats(inputs)]
    assert [b.formats[shape.units[0].name].name for b in baselines] == ["int4-g64", "w8a8-int8", "w4a8-int8-g128"]
    text = format_plan(plan, inputs, baselines)
    assert "candidates on a100:" in text
    assert "  w4a8-fp8-g128: not offered: a100 has no FP8 tensor cores" in text
    assert "  fp8: not offered: a100 has no FP8 tensor cores" in text
    assert "uniform w4a8-int8-g128" in text and "prefill" in text.split("uniform w4a8-int8-g128")[1].splitlines()[0]


# ----------------------------------------------------------------------------- sensitivity

@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained a few steps on a copy task, so that rounding moves its loss."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(0, 64, (16, 32))
    ids = torch.cat([ids, ids], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, CalibrationData(ids, "ids", 0)


ACT_PAIRS = (("int4-g32", "w4a8-int8-g32"), ("int4-g32", "w4a8-fp8-g32"), ("nvfp4a16", "nvfp4"))


def test_rounding_the_activations_costs_more_than_the_weight_only_twin(trained, tmp_path):
    """W4A8 and W4A4 solve the same weights as int4 / nvfp4a16 (same codes), so their extra cost is the
    activation term alone: positive for every unit, and far larger for 4-bit activations than for 8-bit."""
    model, calib = trained
    shape = model_shape(model)
    names = sorted({n for pair in ACT_PAIRS for n in pair} | {"w4a8-int8-g64"})
    sens = measure_sensitivity(model, shape, calib, names, model_id="tiny", cache=tmp_path, progress=False,
                               solver="rtn")
    extra = {}
    for twin, fmt in ACT_PAIRS:
        assert weight_only_twin(WeightFormat.parse(fmt)).name == twin
        for u in shape.units:
            assert sens.dloss[fmt][u.name] > sens.dloss[twin][u.name], (fmt, u.name)
        extra[fmt] = sum(sens.dloss[fmt][u.name] - sens.dloss[twin][u.name] for u in shape.units)
    assert extra["nvfp4"] > 5 * max(extra["w4a8-int8-g32"], extra["w4a8-fp8-g32"])
    down = [u.name for u in shape.units if u.name.endswith("down_proj")]             # in_features 160
    assert all(sens.dloss["w4a8-int8-g64"][d] == float("inf") for d in down)


def test_cached_w4a8_and_w4a4_costs_without_the_activation_term_are_measured_again(trained, tmp_path, monkeypatch):
    model, calib = trained
    shape = model_shape(model)
    first = measure_sensitivity(model, shape, calib, ["int4-g32", "w4a8-int8-g32", "fp8"], model_id="tiny",
                                cache=tmp_path, progress=False, solver="rtn")
    (path,) = tmp_path.glob("sensitivity-*.json")
    stored = json.loads(path.read_text())
    assert stored["act_terms"] == sens_module.ACT_TERMS
    del stored["act_terms"]                                     # as written before W4A8 had its activation term
    stored["dloss"]["w4a8-int8-g32"] = stored["dloss"]["int4-g32"]
    path.write_text(json.dumps(stored))
    calls = []
    real = sens_module.run_layerwise
    monkeypatch.setattr(sens_module, "run_layerwise", lambda *a, **k: (calls.append(a[2].formats), real(*a, **k)))
    again = measure_sensitivity(model, shape, calib, ["int4-g32", "w4a8-int8-g32", "fp8"], model_id="tiny",
                                cache=tmp_path, progress=False, solver="rtn")
    assert [[f.name for f in c] for c in calls] == [["w4a8-int8-g32"]]               # int4 and W8A8 stay cached
    assert again.dloss == first.dloss


# -------------------------------------------------------------------------------- end to end

def test_a_w4a8_plan_runs_and_writes_the_planned_bytes(base, text_file, tmp_path, monkeypatch):
    """A prefill target within int4's bytes buys w4a8-int8 on an A100; the recipe runs and the
    checkpoint holds exactly the planned bytes, with W4A8 layers where the plan put them. (The tiny
    model's linears are too narrow to be compute-bound on a real A100, so its bandwidth is raised
    to make them so; FP8 stays absent.)"""
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    a100 = dataclasses.replace(load_profile("a100"), bandwidth_gbs=1e8, overhead_us=0.0)
    plan, inputs = plan_model(str(base), Target(memory_bytes=10**9), device=a100, calib_data=str(text_file),
                              calib_samples=8, seqlen=32, fisher_samples=4, solver="rtn", progress=False,
                              formats=["bf16", "int4-g32", "w4a8-int8-g32", "w4a8-fp8-g32"])
    assert any(n.startswith("w4a8-fp8-g32: a100 has no FP8 tensor cores") for n in plan.notes)
    budget = checkpoint_size(inputs.shape, "int4-g32") + 1024     # the DP's bins round up; bf16 needs KBs more
    work = dict(batch=64, context=None)
    speed = {f: uniform_plan(inputs.shape, inputs.sensitivity, a100, Target(budget, **work), f)
             .prediction.prefill_tokens_per_s for f in ("int4-g32", "w4a8-int8-g32", "w4a8-fp8-g32")}
    assert speed["w4a8-int8-g32"] > 1.1 * speed["int4-g32"] and speed["w4a8-fp8-g32"] == speed["int4-g32"]
    goal = (speed["int4-g32"] + speed["w4a8-int8-g32"]) / 2
    plan = make_plan(inputs.shape, inputs.sensitivity, a100, Target(budget, prefill_tokens_per_s=goal, **work),
                     inputs.formats)
    assert plan.feasible and "w4a8-int8-g32" in plan.counts() and "w4a8-fp8-g32" not in plan.counts()
    recipe = recipe_of(plan, inputs, source=str(base), calib_data=str(text_file), calib_samples=8, seqlen=32,
                       output=str(tmp_path / "out"), solver="rtn")
    run_recipe(recipe_from_dict(recipe))
    assert weights_bytes(tmp_path / "out") == plan.prediction.checkpoint_bytes
    model, _ = compress.load_model(tmp_path / "out")
    got = formats_of(model, inputs.shape)
    assert {u: f.name for u, f in got.items()} == {u: f.name for u, f in plan.formats.items()}
