"""The search: exact against brute force, budgets met, speed targets, infeasibility, uniform baselines."""

import dataclasses
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig

from compress.errors import ConfigError
from compress.formats import WeightFormat
from compress.plan.cost import model_shape, predict, shape_from_config
from compress.plan.devices import load_profile
from compress.plan.planner import Target, candidate_formats, checkpoint_size, make_plan, uniform_plan
from compress.plan.sensitivity import Sensitivity
from conftest import tiny_model

FORMATS = ["int8", "int4-g32", "int3-g32-asym", "int2-g32-asym"]
BITS = {"int8": 8, "int4-g32": 4, "int3-g32-asym": 3, "int2-g32-asym": 2}


def _sens(shape, seed=0):
    """A synthetic sensitivity: each unit's cost grows as bits shrink, by a unit-specific weight."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(len(shape.units), generator=g) * 10 + 0.1
    dloss = {f: {u.name: float(weight[i]) * 4.0 ** (-BITS[f]) for i, u in enumerate(shape.units)} for f in FORMATS}
    return Sensitivity(dloss, base_loss=3.0, solver="test", key={})


@pytest.fixture
def setup():
    shape = model_shape(tiny_model("llama", intermediate_size=128), torch.bfloat16)
    fmts = [WeightFormat.parse(f) for f in ["bf16"] + FORMATS]
    return shape, _sens(shape), load_profile("cpu"), fmts


def test_the_dp_is_exact_against_brute_force(setup):
    shape, sens, cpu, fmts = setup
    shape = dataclasses.replace(shape, units=shape.units[:4])          # 5^4 plans to enumerate
    budget = checkpoint_size(shape, "int4-g32") - 2000
    plan = make_plan(shape, sens, cpu, Target(memory_bytes=budget), fmts)
    assert plan.feasible and plan.memory_used <= budget
    best = math.inf
    fixed_fmts = [f for f in fmts if not f.dense]
    for combo in itertools.product(fixed_fmts + [fmts[0]], repeat=len(shape.units)):
        fm = {u.name: f for u, f in zip(shape.units, combo)}
        if predict(shape, fm, cpu, Target(memory_bytes=budget).workload).checkpoint_bytes <= budget:
            best = min(best, sum(sens.cost(u.name, f) for u, f in zip(shape.units, combo)))
    # bins round bytes up, so the DP can miss the optimum only by what one bin per unit could buy
    assert plan.dloss == pytest.approx(best, rel=1e-3) or plan.dloss >= best
    assert plan.dloss <= best * 1.02


def test_a_bigger_budget_never_predicts_worse_and_budgets_are_met_exactly(setup):
    shape, sens, cpu, fmts = setup
    lo, hi = checkpoint_size(shape, "int2-g32-asym"), checkpoint_size(shape, "int8")
    last = math.inf
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = int(lo + frac * (hi - lo))
        plan = make_plan(shape, sens, cpu, Target(memory_bytes=budget), fmts)
        assert plan.feasible and plan.memory_used <= budget
        assert plan.prediction.checkpoint_bytes == plan.memory_used
        assert plan.dloss <= last + 1e-12
        last = plan.dloss


def test_mixed_plan_beats_the_uniform_format_of_the_same_size(setup):
    shape, sens, cpu, fmts = setup
    uniform = uniform_plan(shape, sens, cpu, Target(memory_bytes=1), "int3-g32-asym")
    plan = make_plan(shape, sens, cpu, Target(memory_bytes=uniform.prediction.checkpoint_bytes), fmts)
    assert plan.memory_used <= uniform.prediction.checkpoint_bytes
    assert plan.dloss < uniform.dloss
    assert len(plan.counts()) > 1                       # it really mixes formats


def test_an_unreachable_memory_budget_returns_the_smallest_plan_and_says_so(setup):
    shape, sens, cpu, fmts = setup
    plan = make_plan(shape, sens, cpu, Target(memory_bytes=10_000), fmts)
    assert not plan.feasible
    assert "out of reach" in plan.message and "embeddings" in plan.message
    assert plan.memory_used == checkpoint_size(shape, "int2-g32-asym")


def test_a_decode_target_on_a_gpu_buys_speed_with_smaller_formats():
    h100 = load_profile("h100")
    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4))
    fmts = [WeightFormat.parse(f) for f in ("bf16", "int8", "int4-g128")]
    weight = {u.name: 1.0 + i for i, u in enumerate(shape.units)}
    sens = Sensitivity({"int8": {k: 1e-4 * v for k, v in weight.items()},
                        "int4-g128": {k: 1e-2 * v for k, v in weight.items()}}, 2.0, "test", {})
    free = make_plan(shape, sens, h100, Target(decode_tokens_per_s=1.0), fmts)
    assert set(f.name for f in free.formats.values()) == {"bf16"}          # no pressure: keep bf16
    bf16_speed = free.prediction.decode_tokens_per_s
    int4 = uniform_plan(shape, sens, h100, Target(decode_tokens_per_s=1.0), "int4-g128")
    goal = (bf16_speed + int4.prediction.decode_tokens_per_s) / 2
    plan = make_plan(shape, sens, h100, Target(decode_tokens_per_s=goal), fmts)
    assert plan.feasible and plan.prediction.decode_tokens_per_s >= goal
    assert plan.dloss < int4.dloss                                         # not everything went to int4
    too_fast = make_plan(shape, sens, h100, Target(decode_tokens_per_s=int4.prediction.decode_tokens_per_s * 3), fmts)
    assert not too_fast.feasible and "out of reach" in too_fast.message
    assert too_fast.prediction.decode_tokens_per_s == pytest.approx(int4.prediction.decode_tokens_per_s, rel=1e-6)


def test_a_prefill_target_on_h100_chooses_fp8():
    """FP8 W8A8 halves the prefill GEMMs' time on Hopper (native FP8 math); int4 (dequantized to bf16
    inside the kernel) does not speed prefill up, so a prefill target buys FP8, never int4."""
    h100 = load_profile("h100")
    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4))
    fmts = [WeightFormat.parse(f) for f in ("bf16", "int4-g128", "fp8")]
    sens = Sensitivity({"int4-g128": {u.name: 1e-2 for u in shape.units},
                        "fp8": {u.name: 1e-3 for u in shape.units}}, 2.0, "test", {})
    work = dict(batch=4, context=4096)
    bf16 = make_plan(shape, sens, h100, Target(prefill_tokens_per_s=1.0, **work), fmts, kv_options=["bf16"])
    assert set(f.name for f in bf16.formats.values()) == {"bf16"}           # no pressure: keep bf16
    fp8 = uniform_plan(shape, sens, h100, Target(prefill_tokens_per_s=1.0, **work), "fp8")
    assert fp8.prediction.prefill_tokens_per_s > 1.3 * bf16.prediction.prefill_tokens_per_s
    goal = (bf16.prediction.prefill_tokens_per_s + fp8.prediction.prefill_tokens_per_s) / 2
    plan = make_plan(shape, sens, h100, Target(prefill_tokens_per_s=goal, **work), fmts, kv_options=["bf16"])
    assert plan.feasible and plan.prediction.prefill_tokens_per_s >= goal
    assert "fp8" in plan.counts() and "int4-g128" not in plan.counts()      # int4 dequantizes: no faster prefill
    int4 = uniform_plan(shape, sens, h100, Target(decode_tokens_per_s=1.0, **work), "int4-g128")
    decode_goal = (bf16.prediction.decode_tokens_per_s + int4.prediction.decode_tokens_per_s) / 2
    decode = make_plan(shape, sens, h100, Target(decode_tokens_per_s=decode_goal, **work), fmts,
                       kv_options=["bf16"])
    assert decode.feasible and decode.prediction.decode_tokens_per_s >= decode_goal   # FP8's halved bytes count here too
    too_fast = make_plan(shape, sens, h100, Target(prefill_tokens_per_s=fp8.prediction.prefill_tokens_per_s * 3,
                                                   **work), fmts, kv_options=["bf16"])
    assert not too_fast.feasible and "prefill" in too_fast.message and "out of reach" in too_fast.message


def test_with_a_context_the_kv_cache_format_is_chosen_to_fit():
    h100 = load_profile("h100")
    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4))
    fmts = [WeightFormat.parse(f) for f in ("bf16", "int4-g128")]
    sens = Sensitivity({"int4-g128": {u.name: 1e-3 for u in shape.units}}, 2.0, "test", {})
    kv_cost = {"bf16": 0.0, "fp8": 0.001, "int8": 0.0005, "int4": 0.003}
    loose = make_plan(shape, sens, h100, Target(memory_bytes=int(40e9), batch=8, context=8192), fmts,
                      kv_dloss=kv_cost)
    assert loose.kv == "bf16" and loose.feasible
    tight_bytes = loose.memory_used - loose.prediction.kv_bytes // 2
    tight = make_plan(shape, sens, h100, Target(memory_bytes=tight_bytes, batch=8, context=8192), fmts,
                      kv_dloss=kv_cost)
    assert tight.feasible and tight.kv != "bf16" and tight.memory_used <= tight_bytes
    with pytest.raises(ConfigError, match="KV-cache"):
        make_plan(shape, sens, h100, Target(memory_bytes=tight_bytes, batch=8, context=8192), fmts, kv_dloss={})


def test_targets_are_validated():
    with pytest.raises(ConfigError, match="give a target"):
        Target()
    with pytest.raises(ConfigError, match="positive"):
        Target(memory_bytes=-1)
    with pytest.raises(ConfigError, match="positive"):
        Target(prefill_tokens_per_s=0)
    with pytest.raises(ConfigError, match="one speed target"):
        Target(decode_tokens_per_s=10, prefill_tokens_per_s=1000)


def test_default_candidates_follow_the_device():
    h100 = [f.name for f in candidate_formats(load_profile("h100"))]
    b200 = [f.name for f in candidate_formats(load_profile("b200"))]
    cpu = [f.name for f in candidate_formats(load_profile("cpu"))]
    assert "int3-g64-asym" not in h100 and "int3-g64-asym" in cpu        # no 3-bit kernel on GPUs
    assert "nvfp4" in b200 and "nvfp4" not in h100                       # W4A4 only where FP4 math is native
    a100 = [f.name for f in candidate_formats(load_profile("a100"))]
    assert {"fp8", "w8a8-int8"} <= set(h100)                             # W8A8 where its math is native
    assert "w8a8-int8" in a100 and "fp8" not in a100                     # Ampere: INT8 tensor cores, no FP8
    assert "fp8" not in cpu and "w8a8-int8" not in cpu
    named = candidate_formats(load_profile("h100"), ["int3-g64-asym"])
    assert [f.name for f in named] == ["bf16", "int3-g64-asym"]


def test_a_unit_missing_from_the_sensitivity_is_an_error(setup):
    shape, sens, cpu, fmts = setup
    del sens.dloss["int8"][shape.units[0].name]
    with pytest.raises(ConfigError, match="no sensitivity"):
        make_plan(shape, sens, cpu, Target(memory_bytes=10**7), fmts)


def test_plan_dict_is_json_ready(setup):
    import json
    shape, sens, cpu, fmts = setup
    plan = make_plan(shape, sens, cpu, Target(memory_bytes=checkpoint_size(shape, "int4-g32")), fmts)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["prediction"]["checkpoint_bytes"] == plan.memory_used
    assert sum(data["format_counts"].values()) == len(shape.units)
    assert dataclasses.asdict(plan.target)["memory_bytes"] == data["target"]["memory_bytes"]
