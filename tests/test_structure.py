"""How compress's modules import each other: one way between packages, kernels a leaf on raw tensors,
no import hidden inside a function except optional or heavy-on-demand dependencies, and every
module importable on its own.

Imports are read with ``ast`` (every import statement, function-local and ``TYPE_CHECKING`` ones
included), so a cycle cannot hide behind an import that runs late.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "compress"
HUB = PACKAGE                      # compress/__init__.py: re-exports the public API, imported by no module

# Function-local imports that are allowed: optional (triton; lm_eval, the `eval` extra) or heavy and needed only on demand
# (datasets, for hub datasets), the lazily imported Triton kernel modules (they import triton), and
# the two transformers modules behind its attention registries (they pull in torch._dynamo and
# scipy, about 2 s, doubling `import compress`; once a model exists they are loaded anyway).
LOCAL_ALLOWED = re.compile(r"^(triton(\..*)?|datasets(\..*)?|lm_eval(\..*)?|compress\.kernels\.\w+_triton"
                           r"|transformers\.(masking_utils|modeling_utils))$")
# What compress.kernels may import from compress besides itself.
KERNELS_MAY_IMPORT = {"compress.errors"}


@dataclasses.dataclass(frozen=True)
class Import:
    source: str           # the importing module, e.g. compress.kv.cache
    target: str           # the imported module, absolute, e.g. compress.kv.config
    path: str             # the importing file, relative to the repository
    line: int
    local: bool           # inside a function body

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.source} -> {self.target}{' (function-local)' if self.local else ''}"


def module_files() -> dict[str, Path]:
    """Module name -> file for every module of the package (a package's name maps to its __init__)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _resolve(source: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The absolute module names one import statement loads (a name that is a submodule counts as it)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    targets = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        targets.append(sub if sub in MODULES else module)
    return targets


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, path: Path):
        self.source, self.path, self.depth = source, path, 0
        self.is_package = path.name == "__init__.py"
        self.imports: list[Import] = []

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _import(self, node) -> None:
        for target in _resolve(self.source, self.is_package, node):
            self.imports.append(Import(self.source, target, str(self.path.relative_to(ROOT)), node.lineno,
                                       self.depth > 0))

    visit_Import = visit_ImportFrom = _import


def all_imports() -> list[Import]:
    out = []
    for name, path in MODULES.items():
        collector = _Collector(name, path)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        out.extend(collector.imports)
    return out


IMPORTS = all_imports()


def _internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def top_unit(module: str) -> str:
    """compress.<first component>: the package or top-level module a module belongs to."""
    return ".".join(module.split(".")[:2])


def find_cycle(edges: dict[str, dict[str, Import]], node_of) -> list[Import] | None:
    """One cycle of the graph (node -> {node: an import that makes the edge}) as its imports, or
    None; ``node_of`` maps an import's source module to its node."""
    state: dict[str, int] = {}                 # 1: on the current path, 2: done
    stack: list[Import] = []

    def visit(node: str) -> list[Import] | None:
        state[node] = 1
        for nxt, imp in sorted(edges.get(node, {}).items()):
            if state.get(nxt) == 1:
                start = next((i for i, e in enumerate(stack) if node_of(e.source) == nxt), len(stack))
                return stack[start:] + [imp]
            if nxt not in state:
                stack.append(imp)
                found = visit(nxt)
                if found:
                    return found
                stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _cycle_message(what: str, cycle: list[Import]) -> str:
    return f"import cycle between {what}:\n  " + "\n  ".join(str(imp) for imp in cycle)


def test_no_import_cycle_between_packages_and_top_level_modules():
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in IMPORTS:
        if imp.source == HUB or not _internal(imp.target):
            continue
        a, b = top_unit(imp.source), top_unit(imp.target)
        if a != b:
            edges[a].setdefault(b, imp)
    cycle = find_cycle(edges, top_unit)
    assert cycle is None, _cycle_message("compress's packages and top-level modules", cycle)


def test_no_import_cycle_between_modules():
    """Within a package too; the lazily imported Triton modules (they may read their dispatcher's
    constants) are left out, since they load only after both modules are complete."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in IMPORTS:
        if imp.source == HUB or not _internal(imp.target) or imp.target == imp.source:
            continue
        if imp.local and LOCAL_ALLOWED.match(imp.target):
            continue
        edges[imp.source].setdefault(imp.target, imp)
    cycle = find_cycle(edges, lambda module: module)
    assert cycle is None, _cycle_message("modules", cycle)


def test_no_module_imports_the_package_hub():
    """compress/__init__.py imports nearly everything; a module that imports it (``from .. import
    __version__``) closes a cycle through it. Import from the defining module (``.version``)."""
    offenders = sorted({str(imp) for imp in IMPORTS if imp.target == HUB and imp.source != HUB})
    assert not offenders, "modules import the package hub compress/__init__.py:\n  " + "\n  ".join(offenders)


def test_kernels_import_nothing_from_compress_but_errors():
    offenders = sorted({str(imp) for imp in IMPORTS
                        if top_unit(imp.source) == "compress.kernels" and _internal(imp.target)
                        and top_unit(imp.target) != "compress.kernels" and imp.target not in KERNELS_MAY_IMPORT})
    assert not offenders, ("compress.kernels works on raw tensors and may import only torch, triton, the "
                           "standard library and compress.errors:\n  " + "\n  ".join(offenders))


def test_no_function_local_imports_but_optional_dependencies():
    offenders = sorted({str(imp) for imp in IMPORTS if imp.local and not LOCAL_ALLOWED.match(imp.target)})
    assert not offenders, ("import at module top; only triton, datasets, the compress.kernels.*_triton modules "
                           "and transformers' masking_utils/modeling_utils may be imported inside a function:\n  "
                           + "\n  ".join(offenders))


def test_checker_resolves_imports():
    """The checker itself: relative imports resolve to absolute modules, submodules named in a
    ``from . import`` count as those submodules, and a function body marks an import local."""
    targets = {(imp.source, imp.target, imp.local) for imp in IMPORTS}
    assert ("compress.kernels.dequant_linear", "compress.kernels.tuning", False) in targets
    assert ("compress.kernels.dequant_linear", "compress.kernels.dequant_linear_triton", True) in targets
    assert ("compress.kv.cache", "compress.kv.config", False) in targets


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    if name.endswith("_triton") and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    importlib.import_module(name)
