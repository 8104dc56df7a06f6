"""A bench run from the parent: start the load processes on a schedule, sample the processes at both ends
of the window, run the scenarios, follow progress, and collect what the load processes counted."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import threading
import time
from dataclasses import dataclass

import psutil

from dcod.bench.accounting import Measured, dcod_processes, newcomers, spool_bytes
from dcod.bench.load import REPLY_GRACE, LoadProcess, Schedule, random_audsids, shares, start_loads, stop_loads
from dcod.bench.scenarios import DISRUPTION_TIMEOUT, plan_disruption, weigh_idle_sessions
from dcod.bench.target import START_TIMEOUT, Target

POLL_INTERVAL = 0.02  # the parent's clock tick: progress, end of a --count run
PROGRESS_INTERVAL = 1.0  # seconds between progress lines (4 per second on a terminal)


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, else one line per second; and notes
    (what a reload says, a kill), each on a line of its own, from any thread."""

    def __init__(self, started: float, label: str) -> None:
        self.started = started
        self.label = label
        self.tty = sys.stderr.isatty()
        self.interval = PROGRESS_INTERVAL / 4 if self.tty else PROGRESS_INTERVAL
        self.last_at, self.last_count = started, 0
        self.lock = threading.Lock()

    def show(self, now: float, phase: str, count: int) -> None:
        if now - self.last_at < self.interval:
            return
        rate = (count - self.last_count) / (now - self.last_at)
        self.last_at, self.last_count = now, count
        line = f"{now - self.started:6.1f} s  {phase:<9}  {count:>10} {self.label}  {rate:>9.0f}/s"
        with self.lock:
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f} s  {text}"
        with self.lock:
            print(f"\r\x1b[K{line}" if self.tty else line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _follow(
    loads: list[LoadProcess], counters, progress: Progress, phase: str, until: float | None, enough: int | None = None
) -> None:
    """Show progress until ``until`` (a monotonic instant), or until ``enough`` requests were measured;
    BenchError if a load process dies meanwhile."""
    while True:
        now = time.monotonic()
        if until is not None and now >= until or enough is not None and sum(counters[1::2]) >= enough:
            return
        for load in loads:
            if not load.process.is_alive() and not load.pipe.poll():  # died without its result
                raise load.exited()
        progress.show(now, phase, sum(counters[0::2]))
        time.sleep(POLL_INTERVAL if until is None else min(POLL_INTERVAL, until - now))


@dataclass
class Run:
    """What ``measure`` collected, for ``report``."""

    results: list[dict]  # one per load process
    watched: list[Measured]
    measure_at: float  # when the window opened (time.monotonic())
    window: float  # its length
    cpu_window: float  # the time between the CPU samples at its ends
    disruption: tuple[str, dict] | None = None  # ("reload" | "hub kill", what the action returned)
    idle_sessions: dict | None = None
    spooled_bytes: int | None = None  # by the hub in the CPU window (--spool)


def measure(target: Target, args: argparse.Namespace) -> Run:
    """Run the load on the target, with the scenarios ``args`` ask for.

    RSS is sampled before any session connects (idle) and at the end of the window (under
    load). CPU times are sampled when the window opens and when it closes: at ``--duration``'s
    end, or once the load processes have published ``--count`` measured requests (a tick later).
    """
    progress = Progress(time.monotonic(), "sent" if args.oneway else "round trips")
    audsids = random_audsids(args.sessions + (args.idle_sessions or 0))
    dcod = dcod_processes(target.pids)
    for m in dcod:
        m.sample_idle()
    counters = multiprocessing.get_context("spawn").RawArray("q", 2 * args.processes)
    with contextlib.ExitStack() as stack:
        stack.callback(progress.close)
        idle = None
        if args.idle_sessions:
            hub = next(m for m in dcod if m.role == "hub")
            idle = weigh_idle_sessions(stack, target, hub, audsids, args.idle_sessions, progress.note)
        loads = start_loads(target, args, counters, audsids)
        stack.callback(stop_loads, loads)
        for load in loads:
            load.receive("ready", START_TIMEOUT)
        watched = dcod + [Measured(f"load {load.plan.index}", psutil.Process(load.process.pid)) for load in loads]
        measure_at = time.monotonic() + args.warmup
        end_at = None if args.count else measure_at + args.duration
        quotas = shares(args.count, args.processes) if args.count else [None] * args.processes
        for load, quota in zip(loads, quotas):
            load.pipe.send(Schedule(measure_at, end_at, quota))
        disruption = plan_disruption(target, args, measure_at, progress.note)

        _follow(loads, counters, progress, "warmup", measure_at)
        sampled_from = time.monotonic()
        for m in watched:
            m.sample(end=False)
        spooled_from = spool_bytes(target.config, args.proxy)
        _follow(loads, counters, progress, "measuring", end_at, args.count)
        watched += newcomers(target.pids, watched)
        for m in watched:
            m.sample(end=True)
        spooled = spool_bytes(target.config, args.proxy) - spooled_from
        sampled_to = time.monotonic()
        results = [load.receive("result", REPLY_GRACE + START_TIMEOUT) for load in loads]
        outcome = (disruption.kind, disruption.outcome(DISRUPTION_TIMEOUT)) if disruption else None
    window_end = end_at if end_at is not None else max(r["window_closed_at"] for r in results)
    return Run(
        results,
        watched,
        measure_at,
        window_end - measure_at,
        sampled_to - sampled_from,
        outcome,
        idle,
        spooled if args.spool else None,
    )
