"""Fuzz the shift-file reader and the metadata parser for a fixed time (not part of CI).

    python scripts/fuzz_shift_files.py --minutes 10

Runs the property of ``devtools/fuzzing.py`` (refused with a message naming the
file, or accepted and then usable by every consumer) on its three input families in
turn, in batches of hypothesis examples with fresh random seeds, until the time is
up. Every example runs under a 30 s alarm, so a hang is a failure too. Prints a JSON
summary (examples per family, refused / accepted, seconds) and exits 1 on the first
failure, after hypothesis has shrunk the failing input ("Falsifying example").
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with tests/ and benchmarks/)

from devtools.extension import import_extension  # noqa: E402

import_extension()

from hypothesis import HealthCheck, given, settings  # noqa: E402

from devtools import fuzzing  # noqa: E402

FAMILIES = {"mutated": fuzzing.mutated_files, "structured": fuzzing.structured_files, "metadata": fuzzing.metadata_files}
ALARM_SECONDS = 30


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"one input took more than {ALARM_SECONDS} s")


def run_batch(strategy, examples: int, counts: Counter, workdir: Path) -> None:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy())
    def batch(data: bytes) -> None:
        signal.alarm(ALARM_SECONDS)
        try:
            counts[fuzzing.check_file_bytes(data, workdir)] += 1
        finally:
            signal.alarm(0)

    batch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    parser.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    logging.getLogger("svdiff").setLevel(logging.ERROR)  # accepted files log notes; thousands per second
    started = time.monotonic()
    deadline = started + args.minutes * 60
    counts = {name: Counter() for name in FAMILIES}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        while time.monotonic() < deadline:
            for name, strategy in FAMILIES.items():
                run_batch(strategy, args.batch, counts[name], workdir)
            done = sum(sum(c.values()) for c in counts.values())
            print(f"{time.monotonic() - started:7.0f} s  {done:,} inputs", file=sys.stderr, flush=True)
    summary = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds": round(time.monotonic() - started),
        "inputs": sum(sum(c.values()) for c in counts.values()),
        "families": {name: dict(c) for name, c in counts.items()},
        "failures": 0,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
