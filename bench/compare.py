#!/usr/bin/env python3
"""dcod's hub against the Node.js reference, alternated round by round: the hub goal's one command.

    .venv/bin/python bench/compare.py                          # 3 rounds of 8 s runs, the venv's Python
    PYTHONPATH=. /usr/bin/python3 bench/compare.py --rounds 5  # Debian's Python, as the .deb runs
    .venv/bin/python bench/compare.py --json

The machine's speed moves by half within an hour (BENCHMARKS.md), so a figure for dcod means
something only beside the reference measured at the same time. Each round runs, one after the
other: `dcod bench --instances 1` (one worker connection, as Noradle's hub has), the Node.js
hub that behaves as Noradle's (`bench/noradle_hub.py`), `dcod bench --instances 2`, and the
Node.js hub with Noradle's default logging of every PDU (`--log-pdus`), each for --duration
seconds with 16 sessions x 4 outstanding 100-byte requests. It prints each one's hub CPU per
round trip, round trips per second and p99 (median and range over the rounds), how many
times as much as dcod's hub each reference cost, round by round, and, before the first round
and after the last, what a TCP write that wakes its reader cost (`bench/wakeup.py`): the
figure that moves most when the machine is busy. Every other argument goes to
every `dcod bench` run (`--sessions 8` changes the load). Exit status 1 as soon as a run fails,
which `dcod bench` does when a request is lost or answered wrongly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import wakeup

HERE = Path(__file__).resolve().parent

LOAD = ["--sessions", "16", "--depth", "4", "--size", "100"]
VARIANTS = {  # name: the command after the Python, without the load and --json
    "dcod, 1 instance": ["-m", "dcod", "bench", "--instances", "1"],
    "Node.js reference": [str(HERE / "noradle_hub.py")],
    "dcod, 2 instances": ["-m", "dcod", "bench", "--instances", "2"],
    "Node.js reference, logging": [str(HERE / "noradle_hub.py"), "--log-pdus"],
}
WAKEUPS = 5000  # exchanges timed by bench/wakeup.py before and after the rounds
DCOD = [name for name in VARIANTS if name.startswith("dcod")]
REFERENCES = [name for name in VARIANTS if name not in DCOD]


def run(variant: str, duration: float, extra: list[str]) -> dict:
    """One bench run; its report with the hub's CPU per round trip under "hub_us"."""
    argv = [sys.executable, *VARIANTS[variant], *LOAD, "--duration", str(duration), *extra, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: exit status {done.returncode}\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    # The Node.js hub is not dcod's: its figure is its process's, under the role "node".
    hub_us = report["hub_cpu_us_per_request"]
    if hub_us is None:
        hub_us = next(p["cpu_us_per_request"] for p in report["process_cpu"] if p["role"] == "node")
    report["hub_us"] = hub_us
    return report


def summary(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: dict[str, list[dict]]) -> str:
    lines = [f"{'':<28} {'hub µs/rt, median (range)':>26} {'round trips/s':>16} {'p99 ms':>14}"]
    for variant, reports in results.items():
        rates = [r["requests_per_s"] for r in reports]
        p99s = [r["latency_ms"]["p99"] for r in reports]
        lines.append(
            f"{variant:<28} {summary([r['hub_us'] for r in reports]):>26} "
            f"{min(rates):>7.0f}-{max(rates):<8.0f} {min(p99s):>6.2f}-{max(p99s):<6.2f}"
        )
    lines.append("")
    for ours in DCOD:
        for reference in REFERENCES:
            lines.append(f"the {reference} cost {summary(ratios(results, ours, reference), 2)} times as much as {ours}")
    return "\n".join(lines)


def ratios(results: dict[str, list[dict]], ours: str, reference: str) -> list[float]:
    """The reference's cost over ours, round by round (each pair measured minutes apart)."""
    return [theirs["hub_us"] / mine["hub_us"] for mine, theirs in zip(results[ours], results[reference])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per run (default 8)")
    parser.add_argument("--json", action="store_true", help="print every run's report as JSON")
    args, extra = parser.parse_known_args(argv)
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    machine = [wakeup.ping_pong("tcp", WAKEUPS, None)]
    for round_ in range(1, args.rounds + 1):
        for variant in VARIANTS:
            print(f"compare: round {round_}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            try:
                report = run(variant, args.duration, extra)
            except RuntimeError as e:
                print(f"compare: {e}", file=sys.stderr)
                return 1
            print(
                f"compare: {report['hub_us']:.1f} µs per round trip, {report['requests_per_s']:.0f}/s",
                file=sys.stderr,
                flush=True,
            )
            results[variant].append(report)
    machine.append(wakeup.ping_pong("tcp", WAKEUPS, None))
    if args.json:
        print(json.dumps({"runs": results, "wakeup_before": machine[0], "wakeup_after": machine[1]}, indent=2))
    else:
        first = results[DCOD[0]][0]
        print(
            f"{args.rounds} rounds of {args.duration:g} s, {first['sessions']} sessions x {first['depth']} "
            f"outstanding, {first['size']}-byte bodies; python {first['python']}"
        )
        print(table(results))
        print(f"\nwake-ups before: {machine[0]}\nwake-ups after:  {machine[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
