"""The planner on the real SmolLM2-135M (slow: a few minutes on 2 cores): a plan under 60% of the
4-bit checkpoint's bytes is written at exactly the predicted size, within the budget, and is better
than uniform 3-bit at no more bytes. Round-to-nearest keeps it quick; benchmarks/planner.py runs the
GPTQ version of the same comparison."""

import math

import pytest
import torch

import compress
from compress.checkpoint.safetensors_io import weights_bytes
from compress.plan.command import plan_model, recipe_of
from compress.plan.cost import model_shape
from compress.plan.planner import Target, checkpoint_size
from compress.recipe import recipe_from_dict, run_recipe
from conftest import SHARED_DATA as DATA, SMOLLM2 as MODEL, require_smollm2

pytestmark = pytest.mark.slow

FORMATS = ["bf16", "int8", "int4-g64", "int3-g64-asym"]


@pytest.fixture(scope="module")
def smollm2():
    require_smollm2()
    return compress.load_model(MODEL)


def _run(plan, inputs, out):
    recipe = recipe_of(plan, inputs, source=MODEL, calib_data=str(DATA / "wikitext-2" / "valid.txt"),
                       calib_samples=16, seqlen=256, eval_data=str(DATA / "wikitext-2" / "test.txt"), max_windows=6,
                       output=str(out), solver="rtn")
    report = run_recipe(recipe_from_dict(recipe), progress=False, echo=lambda *a: None)
    return [r for r in report.rows if r.perplexity is not None][-1].perplexity


def test_a_plan_at_60_percent_of_4_bit_is_exact_in_bytes_and_beats_uniform_3_bit(smollm2, tmp_path):
    model, tok = smollm2
    budget = math.floor(0.6 * checkpoint_size(model_shape(model, torch.float32), "int4-g64"))
    plan, inputs = plan_model(MODEL, Target(memory_bytes=budget), device="cpu",
                              calib_data=str(DATA / "wikitext-2" / "valid.txt"), calib_samples=16, seqlen=256,
                              formats=FORMATS, solver="rtn", fisher_samples=4, cache=tmp_path / "cache",
                              progress=False, model=model, tokenizer=tok)
    assert plan.feasible and plan.memory_used <= budget
    assert len(plan.counts()) > 1
    ppl = _run(plan, inputs, tmp_path / "plan")
    assert weights_bytes(tmp_path / "plan") == plan.prediction.checkpoint_bytes <= budget
    uniform = plan_model(MODEL, Target(memory_bytes=checkpoint_size(inputs.shape, "int3-g64-asym")), device="cpu",
                         calib_data=str(DATA / "wikitext-2" / "valid.txt"), calib_samples=16, seqlen=256,
                         formats=["int3-g64-asym"], solver="rtn", fisher_samples=4, cache=tmp_path / "cache",
                         progress=False, model=model, tokenizer=tok)[0]
    assert set(f.name for f in uniform.formats.values()) == {"int3-g64-asym"}
    uniform_ppl = _run(uniform, inputs, tmp_path / "uniform")
    assert weights_bytes(tmp_path / "uniform") <= budget
    assert ppl < uniform_ppl, (ppl, uniform_ppl)
