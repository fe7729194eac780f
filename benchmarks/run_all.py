"""Run every benchmark script: ``forward.py``, ``decompositions.py``, then ``real_model.py``.

``real_model.py`` prints a note and exits 0 when the ``real`` extra (the pretrained model) is
not installed.

Each runs in its own interpreter (a crash or a leak in one does not affect the other) and prints
its own tables; ``--quick`` is passed on. Exits non-zero if any script failed.

Usage: ``python benchmarks/run_all.py [--quick]`` (``make bench BENCH_ARGS=--quick``)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("forward.py", "decompositions.py", "real_model.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a representative subset of each")
    args = parser.parse_args()
    failed = []
    for name in SCRIPTS:
        script = HERE / name
        if not script.exists():
            print(f"## {name}: not present, skipped\n", flush=True)
            continue
        print(f"## {name}\n", flush=True)
        started = time.perf_counter()
        command = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        code = subprocess.run(command).returncode
        print(f"\n## {name}: exit {code} after {time.perf_counter() - started:.0f} s\n", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
