"""Build ``exercise.ipynb`` from ``solutions.ipynb``, the single source of the notebook.

In solution code, each exercise's answer is fenced::

    # BEGIN SOLUTION: compute the difference of means
    ...answer...
    # END SOLUTION

``build`` replaces each fenced block with ``raise NotImplementedError("<the text after the colon>")``
at the same indentation, and strips every output and execution count. ``check`` fails when the
committed exercise notebook differs from what ``build`` would write.

    python -m refusal_helpers.notebooks execute  # run solutions.ipynb in place, saving its outputs
    python -m refusal_helpers.notebooks build    # write exercise.ipynb
    python -m refusal_helpers.notebooks check    # exit 1 if exercise.ipynb is stale
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions.ipynb"
EXERCISE = ROOT / "exercise.ipynb"
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION(?::\s*(?P<hint>.*))?$")
END = re.compile(r"^[ \t]*# END SOLUTION\s*$")
DEFAULT_HINT = "Your code here: replace this line with your solution."


class MarkerError(ValueError):
    """Unbalanced or nested solution markers."""


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every fenced solution block of a cell's source with a NotImplementedError stub."""
    out, inside = [], False
    for number, line in enumerate(source.splitlines(), start=1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if inside:
                raise MarkerError(f"{where}, line {number}: nested '# BEGIN SOLUTION'.")
            inside = True
            hint = (begin.group("hint") or DEFAULT_HINT).strip()
            out.append(f"{begin.group('indent')}raise NotImplementedError({hint!r})")
        elif end:
            if not inside:
                raise MarkerError(f"{where}, line {number}: '# END SOLUTION' without a BEGIN.")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: '# BEGIN SOLUTION' is never closed.")
    return "\n".join(out)


def exercise_notebook(solutions: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The exercise version of a solutions notebook: answers stubbed, outputs and saved widget state stripped."""
    nb = copy.deepcopy(solutions)
    nb.metadata.pop("widgets", None)
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, where=f"cell {index}")
            cell.outputs = []
            cell.execution_count = None
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """The notebook as the exact text written to disk (so that `is_current` can compare bytes)."""
    return nbformat.writes(nb) + "\n"


def build(solutions: Path = SOLUTIONS, exercise: Path = EXERCISE) -> Path:
    """Write the exercise notebook generated from `solutions`; return its path."""
    nb = nbformat.read(solutions, as_version=4)
    exercise.write_text(render(exercise_notebook(nb)), encoding="utf-8")
    return exercise


def is_current(solutions: Path = SOLUTIONS, exercise: Path = EXERCISE) -> bool:
    """Whether `exercise` is exactly what `build` would write from `solutions`."""
    expected = render(exercise_notebook(nbformat.read(solutions, as_version=4)))
    return exercise.is_file() and exercise.read_text(encoding="utf-8") == expected


def execute(path: Path = SOLUTIONS, timeout: int = 600) -> float:
    """Run every cell of the notebook at `path` in a fresh kernel (from the repository root, as a learner
    would) and save it with its outputs and widget state; return the seconds it took."""
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(tqdm(nb.cells, desc=f"executing {path.name}", unit="cell")):
            if cell.cell_type == "code":
                client.execute_cell(cell, index)
        client.set_widgets_metadata()
    seconds = time.perf_counter() - start
    path.write_text(render(nb), encoding="utf-8")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command line: `execute` runs solutions.ipynb; `build` writes exercise.ipynb; `check` exits 1 if it is stale."""
    parser = argparse.ArgumentParser(prog="python -m refusal_helpers.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("execute", "build", "check"))
    parser.add_argument("--solutions", type=Path, default=SOLUTIONS)
    parser.add_argument("--exercise", type=Path, default=EXERCISE)
    args = parser.parse_args(argv)
    if args.command == "execute":
        seconds = execute(args.solutions)
        print(f"executed {args.solutions} in {seconds:.0f} s ({args.solutions.stat().st_size / 2**20:.2f} MiB)")
        return 0
    if args.command == "build":
        print(f"wrote {build(args.solutions, args.exercise)}")
        return 0
    if is_current(args.solutions, args.exercise):
        print(f"{args.exercise} is up to date")
        return 0
    print(f"{args.exercise} is stale: run `python -m refusal_helpers.notebooks build`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
