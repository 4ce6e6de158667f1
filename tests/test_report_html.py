"""`compress report DIR`: the HTML page of a run, its chart data, its notes and errors, and a real render.

The runs are tiny random Llamas through real recipes (one plain, one written by the planner from a
made-up sensitivity table), so report.json is what `compress run` writes."""

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
import yaml

from compress.cli import main
from compress.evaluation import generate
from compress.loading import load_model
from compress.plan.command import PlanInputs, recipe_of, write_recipe
from compress.plan.cost import model_shape
from compress.plan.devices import load_profile
from compress.plan.planner import Target, candidate_formats, make_plan
from compress.plan.sensitivity import Sensitivity
from compress.recipe import load_recipe, run_recipe
from compress.report_charts import nice_ticks, pareto_front
from compress.report_html import format_map, size_quality_points, sweep_points, write_report
from conftest import TEXT, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _Page(HTMLParser):
    """Every element's tag and attributes, in order, and the text of each table cell."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.cells: list[tuple[dict, str]] = []
        self._cell = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "td":
            self._cell = (dict(attrs), [])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell[0], "".join(self._cell[1])))
            self._cell = None

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v
                                                                for k, v in attrs.items())]


def _base(root, tokenizer):
    tiny_model("llama").save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "text.txt").write_text(TEXT)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer):
    """A two-pass recipe (Wanda 50%, GPTQ int4 g32) with evaluation: a run directory."""
    root = tmp_path_factory.mktemp("plain")
    _base(root, tokenizer)
    (root / "r.yaml").write_text(yaml.safe_dump({
        "version": 1, "name": "tiny", "model": "./base", "calibration": {"data": "text.txt", "samples": 4, "seqlen": 32},
        "passes": [{"method": "wanda", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 32}],
        "evaluation": {"data": "text.txt", "seqlen": 32, "max_windows": 2}, "export": {"output": "./out"}}))
    run_recipe(load_recipe(root / "r.yaml"), progress=False, echo=lambda *a: None)
    return root / "out"


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory, tokenizer):
    """A recipe written by the planner (from a made-up sensitivity table), run; its sensitivity and a
    sweep of plans at several budgets beside report.json."""
    root = tmp_path_factory.mktemp("planned")
    _base(root, tokenizer)
    model = tiny_model("llama")
    shape, profile = model_shape(model, torch.bfloat16), load_profile("cpu")
    fmts = candidate_formats(profile, ["bf16", "int8", "int4-g32", "int3-g32-asym"])
    rng = torch.Generator().manual_seed(0)
    dloss = {f.name: {u.name: float(torch.rand(1, generator=rng)) * 0.1 * (2 ** -f.bits) for u in shape.units}
             for f in fmts if not f.dense}
    sens = Sensitivity(dloss, 5.0, "gptq", {})
    inputs = PlanInputs(shape, profile, fmts, sens, {})
    plans = [make_plan(shape, sens, profile, Target(memory_bytes=b), fmts) for b in range(160_000, 300_001, 20_000)]
    plan = plans[2]
    recipe = recipe_of(plan, inputs, source=str(root / "base"), calib_data=str(root / "text.txt"), calib_samples=4,
                       seqlen=32, output=str(root / "out"), eval_data=str(root / "text.txt"), max_windows=2,
                       base_dir=root)
    write_recipe(root / "plan.yaml", recipe, "test plan")
    run_recipe(load_recipe(root / "plan.yaml"), progress=False, echo=lambda *a: None)
    out = root / "out"
    (out / "sensitivity.json").write_text(json.dumps(sens.to_dict()))
    (out / "sweep.json").write_text(json.dumps({"points": [p.to_dict() for p in plans]}))
    return out


# ------------------------------------------------------------------------------ chart data (unit)

def test_size_quality_points_take_evaluated_stages_and_their_size_on_disk():
    stages = [{"name": "load", "perplexity": 20.0, "bytes": 4 * 2**20, "disk_bytes": None},
              {"name": "gptq", "perplexity": 21.5, "bytes": 2 * 2**20, "disk_bytes": 3 * 2**20},
              {"name": "export", "perplexity": None, "bytes": 2 * 2**20, "disk_bytes": 3 * 2**20},
              {"name": "broken", "perplexity": float("nan"), "bytes": 1}]
    assert size_quality_points(stages) == [("load", 4.0, 20.0), ("gptq", 3.0, 21.5)]


def test_pareto_front_keeps_only_undominated_points():
    pts = [(3, 1.1), (1, 1.5), (2, 1.2), (2, 1.4), (4, 1.2), (5, 1.0)]
    assert pareto_front(pts) == [(1, 1.5), (2, 1.2), (3, 1.1), (5, 1.0)]
    assert pareto_front([]) == []


def test_sweep_points_read_plan_dicts_and_flat_rows_and_refuse_others():
    plan = {"prediction": {"checkpoint_bytes": 1000}, "predicted_ppl_ratio": 1.25}
    flat = {"bytes": 500, "dloss": math.log(1.5), "label": "int3"}
    assert sweep_points({"points": [plan, flat]}) == [(1000.0, 1.25, ""), (500.0, pytest.approx(1.5), "int3")]
    assert sweep_points([plan]) == [(1000.0, 1.25, "")]
    with pytest.raises(ValueError, match="sweep point 0: needs its bytes"):
        sweep_points([{"predicted_ppl_ratio": 1.1}])
    with pytest.raises(ValueError, match="list of plans"):
        sweep_points({"what": 1})


def test_format_map_groups_units_by_layer_and_kind():
    kinds, rows = format_map({"model.layers.1.mlp.gate+up": "int4-g64", "model.layers.0.mlp.gate+up": "bf16",
                              "model.layers.0.self_attn.q+k+v": "int8"})
    assert kinds == ["mlp.gate+up", "self_attn.q+k+v"]
    assert rows == {0: {"mlp.gate+up": "bf16", "self_attn.q+k+v": "int8"}, 1: {"mlp.gate+up": "int4-g64"}}


@pytest.mark.parametrize("lo,hi", [(383.7, 385.1), (0.24, 0.52), (1.0, 1.0), (-3.0, 7.0), (1e-4, 3e-4)])
def test_nice_ticks_cover_the_range_with_equal_steps(lo, hi):
    t = nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 12
    steps = {round(b - a, 12) for a, b in zip(t, t[1:])}
    assert len(steps) == 1


# ------------------------------------------------------------------------------ the page

def test_page_numbers_and_chart_equal_report_json(plain_run, tmp_path):
    out = write_report(plain_run, out=tmp_path / "r.html", generate=False)
    page = _Page(out.read_text())
    report = json.loads((plain_run / "report.json").read_text())
    cells = [(a, text) for a, text in page.cells if "data-key" in a]
    rows = page.find("tr")
    assert [r["data-stage"] for r in rows if "data-stage" in r] == [s["name"] for s in report["stages"]]
    per_stage = len(cells) // len(report["stages"])
    for i, stage in enumerate(report["stages"]):
        for attrs, text in cells[i * per_stage:(i + 1) * per_stage]:
            key = attrs["data-key"]
            want = stage["disk_bytes"] if key == "size" and stage["disk_bytes"] is not None else \
                stage["bytes"] if key == "size" else stage[key]
            assert json.loads(attrs["data-value"]) == want, (stage["name"], key)
            if key == "perplexity" and want is not None:
                assert float(text) == round(want, 3)
            if key in ("disk_bytes", "bytes", "parameters") and want is not None:
                assert int(text.replace(",", "")) == want
    assert {a["data-key"] for a, _ in cells} >= {"perplexity", "size", "parameters", "sparsity", "bits"}
    points = page.find("circle", data_series="stages, in run order")
    assert [(p["data-name"], float(p["data-x"]), float(p["data-y"])) for p in points] == \
        size_quality_points(report["stages"])
    assert len(points) == 3                                   # load, wanda, gptq (export is not evaluated)


def test_missing_parts_are_notes_not_errors(plain_run, tmp_path):
    html = write_report(plain_run, out=tmp_path / "r.html", generate=False).read_text()
    assert "this run was not planned" in html and "no plan sweep next to the run" in html
    assert "generations not made (--no-generate)" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "<script" not in html


def test_generations_are_greedy_float_and_compressed(plain_run, tmp_path):
    assert main(["-q", "report", str(plain_run), "--out", str(tmp_path / "g.html"), "--new-tokens", "8"]) == 0
    page = _Page((tmp_path / "g.html").read_text())
    gen = [text for a, text in page.cells if "data-gen" in a]
    assert len(gen) == 9                                       # 3 prompts x (prompt, float, compressed)
    prompt, float_text, compressed_text = gen[:3]
    model, tok = load_model(plain_run.parent / "base")
    assert float_text == generate(model, tok, prompt, 8)
    packed, tok2 = load_model(plain_run)
    assert compressed_text == generate(packed, tok2, prompt, 8)


def test_generations_without_the_float_model_are_a_note(plain_run, tmp_path):
    html = write_report(plain_run, out=tmp_path / "r.html", float_model=str(tmp_path / "gone"),
                        new_tokens=2).read_text()
    assert "generations skipped" in html and "gone" in html


def test_planned_run_shows_format_map_sensitivity_and_pareto(planned_run, tmp_path):
    out = write_report(planned_run, out=tmp_path / "p.html", generate=False)
    page = _Page(out.read_text())
    plan = json.loads((planned_run / "report.json").read_text())["recipe"]["plan"]
    fmts = [text for a, text in page.cells if "data-unit-kind" in a]
    kinds, layers = format_map(plan["formats"])
    assert fmts == [layers[layer].get(k, "-") for layer in layers for k in kinds]
    assert len(set(fmts)) > 1                                 # a real mix, not one format everywhere
    sens = json.loads((planned_run / "sensitivity.json").read_text())["dloss"]
    cells = page.find("rect", **{"class": "cell"})
    assert len(cells) == sum(len(v) for v in sens.values())
    assert all(float(c["data-value"]) == sens[c["data-row"]][c["data-col"]] for c in cells)
    chosen = page.find("rect", **{"class": "chosen"})
    assert len(chosen) == sum(1 for f in plan["formats"].values() if f in sens)
    sweep = json.loads((planned_run / "sweep.json").read_text())["points"]
    swept = page.find("circle", data_series="swept plans")
    assert sorted(float(p["data-x"]) for p in swept) == \
        sorted(p["prediction"]["checkpoint_bytes"] / 2**20 for p in sweep)
    front = [(float(p["data-x"]), float(p["data-y"])) for p in page.find("circle", data_series="Pareto frontier")]
    assert front == pareto_front([(float(p["data-x"]), float(p["data-y"])) for p in swept])
    assert page.find("circle", data_series="this run's plan")


def test_not_a_run_directory_is_a_clear_error(plain_run, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["report", str(plain_run / "report.json")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory: it has no report.json" in capsys.readouterr().err
    (tmp_path / "state.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert "work directory of an unfinished run" in capsys.readouterr().err
    (tmp_path / "report.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    (tmp_path / "report.json").write_text("[]")
    assert main(["report", str(tmp_path)]) == 2
    assert "no 'stages' list" in capsys.readouterr().err
    assert main(["report", str(plain_run), "--no-generate", "--sweep", str(tmp_path / "none.json")]) == 2
    assert "--sweep" in capsys.readouterr().err
    assert main(["report", str(plain_run), "--new-tokens", "0"]) == 2
    assert "--new-tokens 0: must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ rendered in a browser

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _screenshot(browser: str, html, png, width: int = 1200, height: int = 1600):
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={width},{height}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = pytest.importorskip("PIL.Image").open(png).convert("L")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()     # (height * width,) grey
    return float((pixels < 250).float().mean()), float(pixels.std())


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install -y "
                                                "chromium); the page is checked without a browser by the tests above")
def test_page_renders_in_headless_chromium(planned_run, tmp_path):
    pytest.importorskip("PIL", reason="reading the screenshot needs Pillow (the test extra)")
    browser = _chromium()
    html = write_report(planned_run, out=tmp_path / "page.html", generate=False)
    inked, spread = _screenshot(browser, html, tmp_path / "page.png")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_inked, blank_spread = _screenshot(browser, blank, tmp_path / "blank.png")
    assert blank_inked < 0.001 and blank_spread < 1.0        # negative control: what blank measures as
    assert inked > 0.03 and spread > 20.0, (inked, spread)
