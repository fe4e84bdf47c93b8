"""Run every benchmark in turn, showing its output as it runs, then print each one's final line (the ratio
or figure it measured). Arguments are passed to the benchmarks that take a model (not bench_end_to_end)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_selection.py", "bench_hooks.py", "bench_generation.py", "bench_end_to_end.py"]


def main() -> int:
    finals = []
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        command = [sys.executable, str(HERE / name), *(sys.argv[1:] if name != "bench_end_to_end.py" else [])]
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
