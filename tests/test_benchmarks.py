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
