"""Start-up time of the command line: ``mmeff --help`` and ``mmeff presets``, median of 5 fresh processes.

    python benchmarks/cli_startup.py      # prints one line per command (target: under 1 s each)

Each run is a new interpreter (what a user waits for), so the import cost is measured, not cached.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(repeats: int = 5) -> None:
    path = os.pathsep.join([str(REPO), str(REPO / "lab"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    for args in (["--help"], ["presets"]):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mmeff_lab.cli", *args], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
        print(f"mmeff {' '.join(args)}: median {statistics.median(times):.2f} s over {repeats} processes "
              f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
