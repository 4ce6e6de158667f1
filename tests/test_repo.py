"""Promises the repository makes: CI runs the README's test command; the README's recipe exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    setup = _bash_blocks(readme)[:2]
    assert len(setup) == 2 and all("\n" not in cmd for cmd in setup)
    install_and_run, run_tests = setup
    assert "pytest" in run_tests and "compress run" in install_and_run
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert run_tests in ci_lines


def test_readme_main_job_recipe_exists():
    install_and_run = _bash_blocks((ROOT / "README.md").read_text())[0]
    recipe = re.search(r"compress run (\S+)", install_and_run).group(1)
    assert (ROOT / recipe).is_file()
