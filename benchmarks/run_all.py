"""Run every benchmark in turn, showing its output as it runs, then print each one's final line (the ratio
or figure it measured). Arguments are passed to every benchmark but bench_end_to_end, which gets only --save
(``make bench`` passes it: the measurements are kept in benchmarks/results/ for benchmarks/RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_selection.py", "bench_hooks.py", "bench_generation.py", "bench_end_to_end.py"]


def main() -> int:
    finals = []
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        args = sys.argv[1:] if name != "bench_end_to_end.py" else [a for a in sys.argv[1:] if a == "--save"]
        command = [sys.executable, str(HERE / name), *args]
        lines = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE) as proc:  # stderr (bars) passes through
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line.strip())
        if proc.returncode != 0:
            return proc.returncode
        finals.append([line for line in lines if line][-1])
    print("\n== summary")
    print("\n".join(finals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
