"""The benchmark scripts run (on a tiny model) and end with their machine-readable line."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script, args, final", [
    ("bench_hooks.py", ["--repeats", "2", "--batch-size", "4"], "ablation forward overhead:"),
    ("bench_generation.py", ["--repeats", "1", "--batch-size", "2", "--max-new-tokens", "4"],
     "ablated/plain generation throughput:"),
    ("bench_selection.py", ["--n-train", "4", "--n-val", "3", "--kl-threshold", "1e9"], "selection speedup:"),
])
def test_benchmark_runs_and_prints_its_figure(script, args, final):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--model", "tiny-llama", *args],
                          capture_output=True, text=True, cwd=BENCH, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(final), last
    if script == "bench_selection.py":
        assert last.endswith("same choice: True"), last


def test_end_to_end_benchmark_compares_the_cli_with_loading_alone(tiny_folder):
    # 3 layers: int(0.8 * 3) = 2 layers kept, layer 0 (always zero) and layer 1
    cli = ["--model", str(tiny_folder), "--n-train", "4", "--n-val", "2", "--n-test", "2", "--max-new-tokens", "2",
           "--kl-threshold", "1e6", "--induce-threshold=-1e6", "--device", "cpu", "--no-filter-train", "--no-filter-val"]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_end_to_end.py"), "--skip-notebook", "--", *cli],
                          capture_output=True, text=True, cwd=BENCH, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("end to end: load alone") and "x load), peak RSS" in last, last
