"""End to end: solutions.ipynb executed with nbclient, and the pipeline CLI with default sizes.

Targets on 2 CPU cores: notebook <= 3 minutes; CLI peak RSS <= 2 GiB.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(path: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return time.perf_counter() - start


def run_cli(extra: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of the CLI process alone (not of earlier children such as a kernel)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "refusal_helpers", "run", "--out", out, *extra], cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    if status:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), proc.args)
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--skip-notebook", action="store_true")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("cli_args", nargs="*", help="extra arguments for the CLI run (after --)")
    args = p.parse_args()
    figures = []
    if not args.skip_notebook:
        seconds = run_notebook(ROOT / "solutions.ipynb")
        print(f"solutions.ipynb executed in {seconds:.0f} s (target <= 180 s)")
        figures.append(f"notebook {seconds:.0f} s")
    if not args.skip_cli:
        seconds, peak = run_cli(args.cli_args)
        print(f"pipeline CLI (default sizes): {seconds:.0f} s, peak RSS {peak:.0f} MiB (target <= 2048 MiB)")
        figures.append(f"CLI {seconds:.0f} s, peak RSS {peak:.0f} MiB")
    print("end to end: " + "; ".join(figures))


if __name__ == "__main__":
    main()
