"""`patchbay test` over every template, timed: each template is initialised into a temporary folder and
its tests run through the real CLI in a fresh process, as a user (or CI) runs them.

    .venv/bin/python bench/flowtest.py [--reps 3] [--no-bytecode]

Prints one line per template (tests, wall time of the whole `patchbay test` process, the time the
tests themselves took) and the total; the target is every template in under 5 s on this machine.

An installed package has its bytecode (pip writes it at install); a process started with
PYTHONDONTWRITEBYTECODE=1 (set on this machine) compiles every patchbay module again on each start.
The children here may write bytecode, and one warm-up run of `patchbay test` precedes the timed ones,
as on a user's machine; `--no-bytecode` measures the recompiling case instead.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 5.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="Runs per template; the median is reported.")
    parser.add_argument(
        "--no-bytecode", action="store_true", help="Keep PYTHONDONTWRITEBYTECODE: every run recompiles."
    )
    args = parser.parse_args()
    env = dict(os.environ)
    if not args.no_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    from patchbay.scaffold import TEMPLATES, create_project

    rows = []
    with tempfile.TemporaryDirectory(prefix="pb-flowtest-") as tmp:
        for name in TEMPLATES:
            root = Path(tmp) / name
            create_project(root, template=name)
            cmd = [sys.executable, "-m", "patchbay", "test", "."]
            subprocess.run(cmd, capture_output=True, cwd=root, env=env)  # warm-up, not timed
            walls, inner, summary = [], [], ""
            for _ in range(args.reps):
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
                walls.append(time.perf_counter() - t0)
                summary = res.stdout.strip().splitlines()[-1]
                if res.returncode != 0:
                    print(res.stdout, res.stderr, sep="\n")
                    return 1
                m = re.search(r"in ([0-9.]+)s", summary)
                inner.append(float(m.group(1)) if m else 0.0)
            rows.append(
                (
                    name,
                    summary.split(" in ")[0],
                    statistics.median(walls),
                    statistics.median(inner),
                    min(walls),
                )
            )
    load = os.getloadavg()[0]
    print(f"bytecode: {'recompiled each run' if args.no_bytecode else 'cached'}; load average {load:.1f}")
    print(f"{'TEMPLATE':<22} {'TESTS':<20} {'PROCESS (s)':>11} {'FASTEST (s)':>11} {'TESTS (s)':>10}")
    for name, tests, wall, t, fastest in rows:
        print(f"{name:<22} {tests:<20} {wall:>11.2f} {fastest:>11.2f} {t:>10.3f}")
    total = sum(r[2] for r in rows)
    n_tests = sum(int(r[1].split()[0]) for r in rows)
    print(
        f"{'all ' + str(len(rows)):<22} {str(n_tests) + ' tests':<20} {total:>11.2f}"
        f" {sum(r[4] for r in rows):>11.2f} {sum(r[3] for r in rows):>10.3f}"
    )
    verdict = "within" if total < TARGET_S else "OVER"
    print(
        f"{verdict} the target: every template's tests in under {TARGET_S:g} s (median of {args.reps} runs each)"
    )
    return 0 if total < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
