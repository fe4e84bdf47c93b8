"""End to end: solutions.ipynb executed with nbclient, and the pipeline CLI with default sizes.

Targets on 2 CPU cores: notebook <= 2 minutes; CLI peak RSS <= 2 GiB. Measured in the same run for
scale: a process that only loads the same model (its time and peak RSS are the floor for both).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def run_notebook(path: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return time.perf_counter() - start


def measured_process(command: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of one child process alone (not of earlier children such as a kernel)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), proc.args)
    return seconds, usage.ru_maxrss / 1024


def run_cli(extra: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of the pipeline CLI with `extra` arguments, into a temporary folder."""
    with tempfile.TemporaryDirectory() as out:
        return measured_process([sys.executable, "-m", "refusal_helpers", "run", "--out", out, *extra])


def load_only(extra: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of a process that only loads the model the CLI run would use (read with
    the CLI's own parser: the same model, device and dtype)."""
    from refusal_helpers.__main__ import build_parser

    cli = vars(build_parser().parse_args(["run", *extra]))
    where = {k: cli[k] for k in ("device", "dtype") if k in cli}
    code = f"from refusal_helpers.loading import load_model; load_model({cli['model']!r}, **{where!r})"
    return measured_process([sys.executable, "-c", code])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--skip-notebook", action="store_true")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--save", action="store_true", help=f"keep the measurement in {RESULTS}/end_to_end.json")
    p.add_argument("cli_args", nargs="*", help="extra arguments for the CLI run (after --)")
    args = p.parse_args()
    load_seconds, load_peak = load_only(args.cli_args)
    print(f"loading the model alone: {load_seconds:.1f} s, peak RSS {load_peak:.0f} MiB")
    figures = [f"load alone {load_seconds:.1f} s, {load_peak:.0f} MiB"]
    result = {"load_s": load_seconds, "load_peak_mib": load_peak, "cli_args": args.cli_args}
    if not args.skip_notebook:
        seconds = run_notebook(ROOT / "solutions.ipynb")
        print(f"solutions.ipynb executed in {seconds:.0f} s (target <= 120 s), {seconds / load_seconds:.1f}x loading alone")
        figures.append(f"notebook {seconds:.0f} s ({seconds / load_seconds:.1f}x load)")
        result["notebook_s"] = seconds
    if not args.skip_cli:
        seconds, peak = run_cli(args.cli_args)
        print(f"pipeline CLI (default sizes): {seconds:.0f} s, {seconds / load_seconds:.1f}x loading alone; "
              f"peak RSS {peak:.0f} MiB (target <= 2048 MiB), {peak / load_peak:.2f}x loading alone")
        figures.append(f"CLI {seconds:.0f} s ({seconds / load_seconds:.1f}x load), "
                       f"peak RSS {peak:.0f} MiB ({peak / load_peak:.2f}x load)")
        result.update(cli_s=seconds, cli_peak_mib=peak)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "end_to_end.json").write_text(json.dumps(result, indent=1) + "\n")
    print("end to end: " + "; ".join(figures))


if __name__ == "__main__":
    main()
