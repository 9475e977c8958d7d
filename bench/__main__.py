"""``python -m bench [scenario ...]``: run benchmark scenarios, one JSON line each on stdout.

The runner starts its own influxd (Debian's 1.6.7, free loopback ports, temp dir), measures
the same-run baselines ``r_enc`` and ``r_db`` once, then runs each scenario in a fresh
Python process (so CPU time and peak RSS are the scenario's own) and stops influxd by PID.
Progress goes to stderr. ``BENCH_SECONDS`` shortens the timed parts (default 20).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

from bench.common import InfluxServer, bench_seconds, db_baseline, enc_baseline, log
from bench.scenarios import SCENARIOS


def _child(name: str) -> int:
    module = importlib.import_module(f"bench.scenarios.{name}")
    module.main()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="scenario",
        help=f"which to run (default all: {' '.join(SCENARIOS)})",
    )
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child)
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")

    seconds = bench_seconds()
    repo = Path(__file__).resolve().parents[1]
    failed = []
    with InfluxServer() as influx:
        log(f"influxd {influx.url} (pid {influx.pid}); BENCH_SECONDS={seconds:g}")
        r_enc = enc_baseline()
        log(f"r_enc = {r_enc:,.0f} lines/s")
        lines = int(min(1_000_000, max(200_000, 50_000 * seconds)))
        r_db = db_baseline(influx.url, lines)
        log(f"r_db = {r_db:,.0f} lines/s ({lines:,} lines)")
        env = dict(
            os.environ,
            BENCH_INFLUX_URL=influx.url,
            BENCH_INFLUX_PID=str(influx.pid),
            BENCH_R_ENC=repr(r_enc),
            BENCH_R_DB=repr(r_db),
        )
        for name in names:
            log(f"scenario {name}")
            proc = subprocess.run(
                [sys.executable, "-m", "bench", "--child", name],
                env=env,
                cwd=repo,
                stdout=subprocess.PIPE,
                text=True,
                check=False,
            )
            out = proc.stdout.strip()
            if out:
                print(out, flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(out + "\n")
            if proc.returncode != 0:
                log(f"scenario {name} failed with exit code {proc.returncode}")
                failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
