"""`dcod bench`: load a hub with Oracle-style sessions and measure what a round trip costs.

The figure that decides how many Oracle sessions one host can serve is the hub's CPU time
per round trip, so the bench measures it directly: it samples the CPU time of every dcod
process (supervisor, hub, workers) and of its own load processes at the start and at the
end of a measured window, and divides by the round trips completed in that window. It also
checks every reply (each body carries the session's audsid and a request number) and
counts what was lost, so a fast run that drops or misroutes replies does not pass.

Without ``--hub`` it starts a private ``dcod run`` (echo workers, a free port, everything
in a temporary directory) and stops it at the end. The load runs in ``--processes``
spawned processes, each a trio loop of ``dcod.client.Session`` s, because one Python
process is easily slower than the hub it measures; they start and stop on a common
schedule of ``time.monotonic()`` instants, which every process on the host shares.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import trio

from dcod import config as configuration
from dcod import log
from dcod.client import ClientError, DcoError, Session
from dcod.config import Config, ProxyConfig
from dcod.protocol import HEADER_SIZE

TAG_SIZE = 22  # b"%010d %010d " % (audsid, request number): how a reply is matched to its request
REPLY_GRACE = 5.0  # seconds after the end for outstanding replies; those still missing are lost
START_TIMEOUT = 30.0  # seconds for `dcod run` to be ready, and for a load process to connect
POLL_INTERVAL = 0.02  # the parent's clock tick: progress, end of a --count run
PROGRESS_INTERVAL = 1.0  # seconds between progress lines (4 per second on a terminal)
PUBLISH_INTERVAL = 0.05  # seconds between a load process's updates of its shared counters


class BenchError(Exception):
    """The bench could not run (no hub, a load process died): no figures to report."""


# ---------------------------------------------------------------- the target: a hub and its processes


@dataclass(frozen=True)
class Target:
    """The hub under load, the config its sessions follow, and the pids whose CPU is measured."""

    address: str
    config: Config
    pids: tuple[int, ...]
    own: bool  # started by the bench


def bench_config(base: Config, directory: Path, proxy_id: int, instances: int) -> Config:
    """``base``'s tuning with a free port, state in ``directory``, and only an echo proxy; written there."""
    address = f"127.0.0.1:{_free_port()}"
    config = dataclasses.replace(
        base,
        hub=dataclasses.replace(base.hub, listen=address, advertise=address),
        supervisor=dataclasses.replace(base.supervisor, runtime_dir=str(directory / "run"),
                                       state_dir=str(directory / "state")),
        # Only the file alert: a bench must not signal a real database when its hub stops.
        alert=dataclasses.replace(base.alert, backends=("file",), dir=str(directory / "run" / "alerts")),
        proxies=(ProxyConfig(id=proxy_id, name="echo", handler="echo", instances=instances),),
    )
    path = directory / "dcod.toml"
    path.write_text(configuration.dump(config))
    return configuration.load(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_hub(base: Config, proxy_id: int, instances: int) -> Iterator[Target]:
    """A private `dcod run`, ready (its READY=1 read from a private NOTIFY_SOCKET); SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="dcod-bench-") as tmp:
        directory = Path(tmp)
        config = bench_config(base, directory, proxy_id, instances)
        log_path = directory / "run.log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(log_path, "wb") as run_log:
            notify.bind(str(directory / "notify.sock"))
            env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify.sock")}
            run = subprocess.Popen([sys.executable, "-m", "dcod", "run", "--config", config.source], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=run_log)
            try:
                _wait_ready(notify, run, log_path)
                yield Target(config.hub.advertise, config, (run.pid,), own=True)
            finally:
                _stop(run, config.supervisor.drain_timeout + config.supervisor.stop_timeout)


def _wait_ready(notify: socket.socket, run: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(min(left, 0.2))
        try:
            if "READY=1" in notify.recv(4096).decode().split("\n"):
                return
        except TimeoutError:
            pass
        if run.poll() is not None:
            raise BenchError(f"dcod run exited with status {run.returncode}:\n{_tail(log_path)}")
    raise BenchError(f"dcod run not ready within {START_TIMEOUT:g} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(run: subprocess.Popen, timeout: float) -> None:
    run.send_signal(signal.SIGTERM)
    try:
        run.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()


def role_of(cmdline: list[str]) -> str:
    """What a process is, from its command line: "supervisor", "hub", "worker 1#0", else its program."""
    words = next((cmdline[i + 1:] for i, word in enumerate(cmdline) if os.path.basename(word) == "dcod"), [])
    command = next((w for w in words if not w.startswith("-")), None)
    if command == "run":
        return "supervisor"
    if command == "worker":
        options = dict(zip(words, words[1:]))
        return f"worker {options.get('--proxy', '?')}#{options.get('--instance', '0')}"
    if command is not None:
        return command
    return os.path.basename(cmdline[0]) if cmdline else "?"


# ---------------------------------------------------------------- CPU accounting


@dataclass
class Measured:
    """One process whose CPU time (user, system) is sampled at both ends of the window."""

    role: str
    process: psutil.Process
    before: tuple[float, float] | None = None
    after: tuple[float, float] | None = None
    rss: int | None = None

    def sample(self, end: bool) -> None:
        try:
            with self.process.oneshot():
                times = self.process.cpu_times()
                if end:
                    self.after, self.rss = (times.user, times.system), self.process.memory_info().rss
                else:
                    self.before = (times.user, times.system)
        except psutil.NoSuchProcess:
            pass  # it exited (a restart?): its figures stay unknown

    @property
    def cpu(self) -> float | None:
        """User + system seconds in the window."""
        return None if self.system is None else self.after[0] - self.before[0] + self.system

    @property
    def system(self) -> float | None:
        """System (kernel) seconds in the window: sockets and scheduling, as opposed to Python code."""
        if self.before is None or self.after is None:
            return None
        return self.after[1] - self.before[1]


def dcod_processes(pids: tuple[int, ...]) -> list[Measured]:
    """The processes with these pids and all their descendants, each once, with their roles."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            raise BenchError(f"no process {pid}") from None
    measured = []
    for p in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            measured.append(Measured(role_of(p.cmdline()), p))
    return measured


# ---------------------------------------------------------------- a load process


@dataclass(frozen=True)
class LoadPlan:
    """What one load process does: its sessions and their requests."""

    index: int
    hub: str
    proxy: int
    audsids: tuple[int, ...]
    depth: int
    size: int
    oneway: bool
    alert_file: Path
    max_pdu: int


@dataclass(frozen=True)
class Schedule:
    """When to measure and when to stop, as time.monotonic() instants shared by all processes."""

    measure_at: float
    end_at: float | None  # --duration
    quota: int | None  # --count: requests this process completes in the window, then it stops


class Tally:
    """What one load process counts: every request, and the ones completed in the window."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.sent = self.completed = self.lost = self.errors = self.mismatched = self.outstanding = 0
        self.measured = 0
        self.latencies = array("d")  # ms, of the requests measured
        self.window_closed_at = schedule.end_at
        self.stopping = trio.Event()

    def done(self, sent_at: float, latency: bool) -> None:
        """A request completed correctly now; in the window, it is measured."""
        now = time.monotonic()
        self.completed += 1
        if now < self.schedule.measure_at or self.window_closed_at is not None and now >= self.window_closed_at:
            return
        self.measured += 1
        if latency:
            self.latencies.append((now - sent_at) * 1000)
        if self.measured == self.schedule.quota:
            self.window_closed_at = now
            self.stopping.set()

    def result(self) -> dict:
        return {"sent": self.sent, "lost": self.lost + self.outstanding, "errors": self.errors,
                "mismatched": self.mismatched, "measured": self.measured, "latencies": self.latencies,
                "window_closed_at": self.window_closed_at}


def request_body(audsid: int, number: int, padding: bytes) -> bytes:
    return b"%010d %010d " % (audsid, number) + padding


async def _round_trips(session: Session, numbers: Iterator[int], plan: LoadPlan, tally: Tally) -> None:
    """One of a session's ``depth`` loops: send a request, wait for its reply, check it, again.

    The request is queued (``buffered``) and sent by read_response's flush: the session's
    other loops' requests queued meanwhile go in the same write, as PL/SQL's do on flush.
    """
    padding = b"x" * (plan.size - TAG_SIZE)
    while not tally.stopping.is_set():
        body = request_body(session.audsid, next(numbers), padding)
        tally.sent += 1
        tally.outstanding += 1
        sent_at = time.monotonic()
        try:
            session.write(body)
            rseq = await session.send_request(plan.proxy, buffered=True)
            reply = await session.read_response(rseq)
        except DcoError:
            tally.errors += 1
        except ClientError:
            tally.lost += 1  # the hub went away, or none could be reached
        else:
            if reply == body:
                tally.done(sent_at, latency=True)
            else:
                tally.mismatched += 1
        tally.outstanding -= 1  # not reached when cancelled at the end of the grace: then it is lost


async def _one_way(session: Session, numbers: Iterator[int], plan: LoadPlan, tally: Tally) -> None:
    """Send one-way requests as fast as the connection takes them (send_request waits for the flush)."""
    padding = b"x" * (plan.size - TAG_SIZE)
    while not tally.stopping.is_set():
        session.write(request_body(session.audsid, next(numbers), padding))
        tally.sent += 1
        sent_at = time.monotonic()
        try:
            await session.send_request(plan.proxy, oneway=True)
        except ClientError:
            tally.lost += 1
        else:
            tally.done(sent_at, latency=False)


async def _publish(tally: Tally, counters, index: int) -> None:
    """Copy the counts to shared memory, where the parent shows progress and sees a --count run end;
    a last time as soon as the window closes."""
    while True:
        counters[2 * index] = tally.completed
        counters[2 * index + 1] = tally.measured
        if tally.stopping.is_set():
            return
        with trio.move_on_after(PUBLISH_INTERVAL):
            await tally.stopping.wait()


async def run_load(plan: LoadPlan, pipe: multiprocessing.connection.Connection, counters) -> None:
    """Connect the sessions, say "ready", get the schedule, load the hub, send back the tally."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            sessions = [await stack.enter_async_context(
                Session(plan.hub, audsid=audsid, sid=os.getpid(), alert_file=plan.alert_file, max_pdu=plan.max_pdu))
                for audsid in plan.audsids]
        except ClientError as e:
            pipe.send(("failed", str(e)))
            return
        pipe.send(("ready", None))
        try:
            schedule = await trio.to_thread.run_sync(pipe.recv)
        except EOFError:
            return  # the parent gave up (another load process failed)
        tally = Tally(schedule)
        loop = _one_way if plan.oneway else _round_trips
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_publish, tally, counters, plan.index)
            async with trio.open_nursery() as loops:
                for session in sessions:
                    numbers = itertools.count(1)
                    for _ in range(plan.depth):
                        loops.start_soon(loop, session, numbers, plan, tally)
                if schedule.end_at is None:
                    await tally.stopping.wait()
                else:
                    with trio.move_on_after(max(0.0, schedule.end_at - time.monotonic())):
                        await tally.stopping.wait()
                    tally.stopping.set()
                loops.cancel_scope.deadline = trio.current_time() + REPLY_GRACE
    pipe.send(("result", tally.result()))


def _load_main(plan: LoadPlan, pipe: multiprocessing.connection.Connection, counters) -> None:
    """A load process's entry point (spawned: it must be importable)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    log.setup(f"bench load {plan.index}", logging.WARNING)
    trio.run(run_load, plan, pipe, counters)
    with contextlib.suppress(EOFError):
        pipe.recv()  # stay alive (measurable) until the parent has sampled CPU times and closes the pipe


# ---------------------------------------------------------------- the parent: schedule, watch, merge


@dataclass
class LoadProcess:
    """A spawned load process, and the parent's end of its pipe."""

    plan: LoadPlan
    process: multiprocessing.process.BaseProcess
    pipe: multiprocessing.connection.Connection

    def receive(self, expected: str, timeout: float):
        """The next message's payload, which must be ``expected``; BenchError if the process fails."""
        ready = multiprocessing.connection.wait([self.pipe, self.process.sentinel], timeout)
        if self.pipe in ready:
            with contextlib.suppress(EOFError):
                kind, payload = self.pipe.recv()
                if kind != expected:
                    raise BenchError(f"load process {self.plan.index}: {payload}")
                return payload
        if not ready:
            raise BenchError(f"load process {self.plan.index}: no {expected} message within {timeout:g} s")
        raise BenchError(f"load process {self.plan.index} exited with status {self.process.exitcode}")


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def start_loads(target: Target, args: argparse.Namespace, counters) -> list[LoadProcess]:
    context = multiprocessing.get_context("spawn")
    # Random audsids far from small numbers: on a production hub they must not collide with real sessions.
    audsids = iter(range(random.randrange(1 << 31, (1 << 32) - args.sessions), 1 << 32))
    loads = []
    for index, sessions in enumerate(_shares(args.sessions, args.processes)):
        plan = LoadPlan(index, target.address, args.proxy, tuple(itertools.islice(audsids, sessions)), args.depth,
                        args.size, args.oneway, target.config.alert_file, target.config.hub.max_pdu)
        ours, theirs = context.Pipe()
        process = context.Process(target=_load_main, args=(plan, theirs, counters), name=f"dcod bench load {index}",
                                  daemon=True)
        process.start()
        theirs.close()
        loads.append(LoadProcess(plan, process, ours))
    return loads


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, else one line per second."""

    def __init__(self, started: float, label: str) -> None:
        self.started = started
        self.label = label
        self.tty = sys.stderr.isatty()
        self.interval = PROGRESS_INTERVAL / 4 if self.tty else PROGRESS_INTERVAL
        self.last_at, self.last_count = started, 0

    def show(self, now: float, phase: str, count: int) -> None:
        if now - self.last_at < self.interval:
            return
        rate = (count - self.last_count) / (now - self.last_at)
        self.last_at, self.last_count = now, count
        line = f"{now - self.started:6.1f} s  {phase:<9}  {count:>10} {self.label}  {rate:>9.0f}/s"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def measure(target: Target, args: argparse.Namespace) -> dict:
    """Run the load on the target and return the report (see ``report``).

    CPU times are sampled when the window opens and when it closes: at ``--duration``'s end,
    or once the load processes have published ``--count`` measured requests (a tick later).
    """
    counters = multiprocessing.get_context("spawn").RawArray("q", 2 * args.processes)
    loads = start_loads(target, args, counters)
    try:
        for load in loads:
            load.receive("ready", START_TIMEOUT)
        watched = dcod_processes(target.pids) + [
            Measured(f"load {load.plan.index}", psutil.Process(load.process.pid)) for load in loads]
        started = time.monotonic()
        measure_at = started + args.warmup
        end_at = None if args.count else measure_at + args.duration
        quotas = _shares(args.count, args.processes) if args.count else [None] * args.processes
        for load, quota in zip(loads, quotas):
            load.pipe.send(Schedule(measure_at, end_at, quota))

        progress = Progress(started, "sent" if args.oneway else "round trips")

        def wait(phase: str, until: float | None, enough: int | None = None) -> None:
            """Show progress until ``until``, or until ``enough`` requests were measured."""
            while True:
                now = time.monotonic()
                if until is not None and now >= until or enough is not None and sum(counters[1::2]) >= enough:
                    return
                for load in loads:
                    if not load.process.is_alive() and not load.pipe.poll():  # died without its result
                        raise BenchError(f"load process {load.plan.index} exited with status {load.process.exitcode}")
                progress.show(now, phase, sum(counters[0::2]))
                time.sleep(POLL_INTERVAL if until is None else min(POLL_INTERVAL, until - now))

        try:
            wait("warmup", measure_at)
            sampled_from = time.monotonic()
            for m in watched:
                m.sample(end=False)
            wait("measuring", end_at, args.count)
            for m in watched:
                m.sample(end=True)
            sampled_to = time.monotonic()
        finally:
            progress.close()
        results = [load.receive("result", REPLY_GRACE + START_TIMEOUT) for load in loads]
    finally:
        for load in loads:
            load.pipe.close()  # a load process that is done exits
        for load in loads:
            load.process.join(1.0)
            if load.process.is_alive():
                load.process.terminate()
    window_end = end_at if end_at is not None else max(r["window_closed_at"] for r in results)
    return report(target, args, results, watched, window=window_end - measure_at, cpu_window=sampled_to - sampled_from)


# ---------------------------------------------------------------- the report


def percentile(ordered: list[float], p: float) -> float | None:
    """The nearest-rank percentile of sorted values (None for none)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def report(target: Target, args: argparse.Namespace, results: list[dict], watched: list[Measured], *,
           window: float, cpu_window: float) -> dict:
    """Every figure of a run, machine-readable: what --json prints and the table shows."""
    requests = sum(r["measured"] for r in results)

    def per_request(cpu: float | None) -> float | None:
        return None if cpu is None or not requests else cpu / requests * 1e6

    latencies = sorted(itertools.chain.from_iterable(r["latencies"] for r in results))
    processes = [{"role": m.role, "pid": m.process.pid, "cpu_s": m.cpu, "system_s": m.system,
                  "cpu_percent": None if m.cpu is None else 100 * m.cpu / cpu_window,
                  "cpu_us_per_request": per_request(m.cpu), "rss_mb": None if m.rss is None else m.rss / 2**20}
                 for m in watched]
    hub_cpu = [p["cpu_s"] for p in processes if p["role"] == "hub" and p["cpu_s"] is not None]
    load_cpu = sum(p["cpu_s"] or 0 for p in processes if p["role"].startswith("load "))
    return {
        "hub": target.address,
        "own_hub": target.own,
        "instances": args.instances if target.own else None,
        "proxy": args.proxy,
        "mode": "one-way" if args.oneway else "round trip",
        "sessions": args.sessions,
        "depth": args.depth,
        "size": args.size,
        "processes": args.processes,
        "warmup_s": args.warmup,
        "window_s": window,
        "requests": requests,
        "requests_per_s": requests / window if window > 0 else None,
        "latency_ms": None if args.oneway else {
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99), "max": latencies[-1] if latencies else None},
        "sent": sum(r["sent"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "mismatched": sum(r["mismatched"] for r in results),
        "hub_cpu_us_per_request": per_request(sum(hub_cpu)) if hub_cpu else None,
        "load_cpu_s": load_cpu,
        "load_cpu_us_per_request": per_request(load_cpu),
        "cpu_window_s": cpu_window,
        "process_cpu": processes,
    }


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def table(r: dict) -> str:
    """The report for a person."""
    what = "sent" if r["mode"] == "one-way" else "round trips"
    hub = f"private hub {r['hub']} ({_count(r['instances'], 'echo instance')})" if r["own_hub"] else f"hub {r['hub']}"
    loads = _count(r["processes"], "load process")
    lines = [
        f"dcod bench: {r['sessions']} sessions x depth {r['depth']}, {r['size']}-byte {r['mode']} requests "
        f"to proxy {r['proxy']}, {hub}, {loads}",
        f"{'window':<13} {r['window_s']:.2f} s, after {r['warmup_s']:g} s of warmup",
        f"{what:<13} {r['requests']}   {_number(r['requests_per_s'], 0)}/s",
    ]
    if r["latency_ms"] is not None:
        latency = "   ".join(f"{k} {_number(r['latency_ms'][k], 2)}" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"{'latency ms':<13} {latency}")
    else:
        lines.append(f"{'':<13} one-way requests get no reply: this is the send rate, and replies are not checked")
    lines.append(f"{'checks':<13} sent {r['sent']}   lost {r['lost']}   errors {r['errors']}   "
                 f"mismatched {r['mismatched']}")
    unit = "µs/req" if r["mode"] == "one-way" else "µs/rt"
    lines += ["", f"{'process':<12} {'pid':>8} {'CPU s':>8} {'sys s':>7} {'CPU %':>7} {unit:>8} {'RSS MB':>8}"]
    for p in r["process_cpu"]:
        lines.append(f"{p['role']:<12} {p['pid']:>8} {_number(p['cpu_s'], 2):>8} {_number(p['system_s'], 2):>7} "
                     f"{_number(p['cpu_percent']):>7} "
                     f"{_number(p['cpu_us_per_request']):>8} {_number(p['rss_mb']):>8}")
    lines += ["", f"hub CPU per {'request' if r['mode'] == 'one-way' else 'round trip'}: "
                  f"{_number(r['hub_cpu_us_per_request'])} µs   "
                  f"load generator: {_number(r['load_cpu_us_per_request'])} µs ({r['load_cpu_s']:.2f} CPU s)"]
    return "\n".join(lines)


# ---------------------------------------------------------------- `dcod bench`


def _check(args: argparse.Namespace, config: Config) -> None:
    for name in ("sessions", "depth", "processes", "instances", "count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name} must be at least 1, not {value}")
    if args.count is None and args.duration <= 0 or args.warmup < 0:
        raise BenchError("--duration must be positive and --warmup not negative")
    if args.processes > min(args.sessions, args.count or args.sessions):
        raise BenchError(f"--processes {args.processes} is more than --sessions (or --count): some would idle")
    if args.size < TAG_SIZE or args.size + HEADER_SIZE > config.hub.max_pdu:
        raise BenchError(f"--size must be from {TAG_SIZE} (the tag that identifies a reply) "
                         f"to {config.hub.max_pdu - HEADER_SIZE} (max_pdu), not {args.size}")
    if args.pid and not args.hub:
        raise BenchError("--pid goes with --hub (without it, the bench measures the hub it starts)")


def main(config: Config, args: argparse.Namespace) -> int:
    """`dcod bench`: 0 when nothing was lost, refused or misrouted, 1 otherwise, 2 if it could not run
    (130 on Ctrl-C, after stopping its processes)."""
    try:
        _check(args, config)
        with contextlib.ExitStack() as stack:
            if args.hub:
                target = Target(args.hub, config, tuple(args.pid or ()), own=False)
            else:
                target = stack.enter_context(own_hub(config, args.proxy, args.instances))
            result = measure(target, args)
    except BenchError as e:
        print(f"dcod bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcod bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["lost"] == result["errors"] == result["mismatched"] == 0 else 1
