"""Run every benchmark in turn and print each one's final line (the ratio or figure it measured)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_selection.py", "bench_hooks.py", "bench_generation.py", "bench_end_to_end.py"]


def main() -> int:
    finals = []
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / name), *sys.argv[1:]] if name != "bench_end_to_end.py"
                              else [sys.executable, str(HERE / name)], capture_output=True, text=True, cwd=HERE)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        finals.append(proc.stdout.strip().splitlines()[-1])
    print("\n== summary")
    print("\n".join(finals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
