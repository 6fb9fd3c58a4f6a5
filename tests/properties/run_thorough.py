"""Run every property under the ``thorough`` profile, one pytest process each, and time them.

    python tests/properties/run_thorough.py [-k SUBSTRING] [--out thorough.md]

One process per property so each gets its own time and a crash or failure stops only its row;
the table (property, result, seconds, commit) is what docs/testing.md quotes. The properties
are collected, not listed here, so a newly registered pass is timed too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The property tests: @given tests and state machines (the example-based tests beside them
#: do not depend on the profile).
PROPERTIES = ("test_matcher_finds_", "test_registered_pass_properties", "Machine::runTest")


def collect(substring: str | None) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/properties", "--collect-only", "-q",
         "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, check=True)
    ids = [line for line in done.stdout.splitlines()
           if "::" in line and any(p in line for p in PROPERTIES)]
    return [i for i in ids if substring is None or substring in i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-k", dest="substring", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "?"
    rows = ["| property | result | seconds |", "|---|---|---:|"]
    env = {**os.environ, "HYPOTHESIS_PROFILE": "thorough"}
    for test_id in collect(args.substring):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", test_id, "-q", "-p",
                               "no:cacheprovider"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        result = "holds" if done.returncode == 0 else f"FAILS (exit {done.returncode})"
        rows.append(f"| `{test_id.split('::', 1)[1]}` | {result} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + f"\n\nCommit {commit}, profile `thorough` (2000 examples each).\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
