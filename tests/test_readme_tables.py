"""README.md's result tables equal what benchmarks/readme_tables.py renders from benchmarks/results/*.json."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("benchmarks_readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_equal_the_benchmark_jsons(capsys):
    rt = _script()
    status = rt.main(["--check"])
    out = capsys.readouterr()
    assert status == 0, f"README.md's tables differ from benchmarks/results/*.json (fix the JSON or run " \
                        f"`python benchmarks/readme_tables.py --write`):\n{out.out}{out.err}"
    assert rt.unmarked(ROOT.joinpath("README.md").read_text()) == []       # every rendered table is marked


def test_a_changed_number_fails_the_check_and_write_restores_it(tmp_path, capsys):
    rt = _script()
    readme = tmp_path / "README.md"
    text = ROOT.joinpath("README.md").read_text()
    assert "| **GPTQ int4 g64 sym** | **27.652** |" in text
    readme.write_text(text.replace("| **GPTQ int4 g64 sym** | **27.652** |", "| **GPTQ int4 g64 sym** | **27.000** |"))
    assert rt.main(["--check", "--readme", str(readme)]) == 1
    diff = capsys.readouterr().out
    assert "-| **GPTQ int4 g64 sym** | **27.000** |" in diff and "+| **GPTQ int4 g64 sym** | **27.652** |" in diff
    assert rt.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_a_changed_json_fails_the_check(tmp_path, capsys):
    rt = _script()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    path = results / "planner-smollm2.json"
    data = json.loads(path.read_text())
    data["rows"]["plan-60"]["perplexity"] = 30.0
    path.write_text(json.dumps(data))
    assert rt.main(["--check", "--results", str(results)]) == 1
    assert "+| **`compress plan --memory` 60%" in capsys.readouterr().out
    data["rows"]["plan-60"]["written_bytes"] += 8                  # the column says predicted = written
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="predicted 103905136 != written 103905144"):
        rt.main(["--check", "--results", str(results)])


def test_unknown_markers_and_missing_rows_are_named(tmp_path):
    rt = _script()
    with pytest.raises(SystemExit, match=r"marks table\(s\) \['nosuch'\]"):
        rt.render("<!-- table:nosuch -->\n\n| a |\n\n<!-- /table -->\n")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    path = results / "quantization-smollm2.json"
    data = json.loads(path.read_text())
    data["rows"] = [r for r in data["rows"] if r["setting"] != "gptq-w3g64-asym"]
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="quantization-smollm2.json has no row 'gptq-w3g64-asym'"):
        rt.quantization(results)
