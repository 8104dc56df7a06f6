"""`dcod bench`: load a hub with Oracle-style sessions and measure what a round trip costs.

The figure that decides how many Oracle sessions one host can serve is the hub's CPU time
per round trip, so the bench measures it directly: it samples the CPU time of every dcod
process (supervisor, hub, workers) and of its own load processes at the start and at the
end of a measured window, and divides by the round trips completed in that window; and how
often each process slept and was woken, the size of its batches, which decides much of that
cost on a machine whose cores are shared. It also
checks every reply (each body carries the session's audsid and a request number) and
counts what was lost, so a fast run that drops or misroutes replies does not pass.

Without ``--hub`` it starts a private ``dcod run`` (echo workers, a free port, everything
in a temporary directory) and stops it at the end. The load runs in ``--processes``
spawned processes, each a trio loop of ``dcod.client.Session`` s, because one Python
process is easily slower than the hub it measures; they start and stop on a common
schedule of ``time.monotonic()`` instants, which every process on the host shares.

Scenarios on the private hub, each adding its figures to the report: ``--reload-at S`` runs
the real ``dcod reload`` S seconds into the window and compares the latency of requests sent
during it with the rest; ``--kill-hub-at S`` SIGKILLs the hub and times the quit alert (an
inotify watch on its file) and the first reply from the hub that replaces it;
``--idle-sessions N`` connects N sessions that only say hello and weighs them in hub RSS;
``--spool`` points the proxy at a port where nothing listens, so that every (one-way)
request goes to the hub's durable spool. The private ``dcod run`` keeps its runtime dir
(sockets, the quit alert) on a tmpfs when there is one, as /run/dcod is in production, and
its state dir (the spool) in the temporary directory, on disk as /var/lib/dcod is.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import trio

from dcod import config as configuration
from dcod import log, protocol
from dcod.supervisor import control
from dcod.supervisor.alert import read_counter
from dcod.client import ClientError, DcoError, Session
from dcod.config import Config, ProxyConfig
from dcod.net.connection import parse_address
from dcod.protocol import HEADER_SIZE
from dcod.hub.spool import RECORD_HEADER

TAG_SIZE = 22  # b"%010d %010d " % (audsid, request number): how a reply is matched to its request
REPLY_GRACE = 5.0  # seconds after the end for outstanding replies; those still missing are lost
START_TIMEOUT = 30.0  # seconds for `dcod run` to be ready, for a load process to connect, for idle sessions
POLL_INTERVAL = 0.02  # the parent's clock tick: progress, end of a --count run
PROGRESS_INTERVAL = 1.0  # seconds between progress lines (4 per second on a terminal)
PUBLISH_INTERVAL = 0.05  # seconds between a load process's updates of its shared counters
DISRUPTION_TIMEOUT = 300.0  # seconds after the window for a disruption (`dcod reload`) to be done
ALERT_TIMEOUT = 10.0  # seconds after the hub's SIGKILL for the quit alert
SPOOL_READY_TIMEOUT = 1.0  # a --spool hub reaches no worker, so never says "ready": READY=1 comes after this
TMPFS = Path("/dev/shm")  # where the private runtime dir goes when it is a tmpfs, like /run in production


class BenchError(Exception):
    """The bench could not run (no hub, a load process died): no figures to report."""


# ---------------------------------------------------------------- the target: a hub and its processes


@dataclass(frozen=True)
class Target:
    """The hub under load, the config its sessions follow, and the pids whose CPU is measured."""

    address: str
    config: Config
    pids: tuple[int, ...]  # with own: (the supervisor,)
    own: bool  # started by the bench


def bench_config(base: Config, directory: Path, runtime: Path, proxy_id: int, instances: int, *,
                 spool: bool = False) -> Config:
    """``base``'s tuning with a free port, runtime files in ``runtime``, state in ``directory``, and only
    the proxy under load; written to ``directory``. The alert dir exists from the start, to be watched."""
    address = f"127.0.0.1:{free_port()}"
    supervisor = dataclasses.replace(base.supervisor, runtime_dir=str(runtime), state_dir=str(directory / "state"))
    if spool:
        supervisor = dataclasses.replace(supervisor, ready_timeout=SPOOL_READY_TIMEOUT)
    config = dataclasses.replace(
        base,
        hub=dataclasses.replace(base.hub, listen=address, advertise=address),
        supervisor=supervisor,
        # Only the file alert: a bench must not signal a real database when its hub stops.
        alert=dataclasses.replace(base.alert, backends=("file",), dir=str(runtime / "alerts")),
        proxies=(bench_proxy(proxy_id, instances, spool),),
    )
    path = directory / "dcod.toml"
    path.write_text(configuration.dump(config))
    config = configuration.load(path)
    config.alert_dir.mkdir(parents=True, exist_ok=True)
    return config


def bench_proxy(proxy_id: int, instances: int, spool: bool) -> ProxyConfig:
    """Echo workers; for --spool an external proxy on a port just found free, where nothing listens."""
    if spool:
        return ProxyConfig(id=proxy_id, name="nowhere", address=f"127.0.0.1:{free_port()}")
    return ProxyConfig(id=proxy_id, name="echo", handler="echo", instances=instances)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_build() -> str:
    """The Python that ran the bench and the private hub: how it was built changes the hub's
    figures by a fifth (BENCHMARKS.md), so a report says which one it was."""
    return f"{platform.python_version()} ({sys.executable}), trio {trio.__version__}"


def filesystem(path: Path) -> str:
    """The type of the filesystem that holds ``path`` ("tmpfs", "ext4", ...), "?" if unknown."""
    real = os.path.realpath(path)
    mounts = [p for p in psutil.disk_partitions(all=True)
              if real == p.mountpoint or real.startswith(p.mountpoint.rstrip("/") + "/")]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype if mounts else "?"


def _runtime_parent() -> str | None:
    """A tmpfs for the runtime dir if there is one (the alert's fsync is free there, as on /run), else None."""
    return str(TMPFS) if filesystem(TMPFS) == "tmpfs" and os.access(TMPFS, os.W_OK) else None


@contextlib.contextmanager
def own_hub(base: Config, proxy_id: int, instances: int, *, spool: bool = False) -> Iterator[Target]:
    """A private `dcod run`, ready (its READY=1 read from a private NOTIFY_SOCKET); SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="dcod-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="dcod-bench-run-", dir=_runtime_parent()) as runtime:
        directory = Path(tmp)
        config = bench_config(base, directory, Path(runtime), proxy_id, instances, spool=spool)
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


# ---------------------------------------------------------------- CPU and memory accounting


@dataclass
class Measured:
    """One process whose CPU time (user, system) and wake-ups are sampled at both ends of the
    window, and its RSS when idle (before any load) and at the end of the window (under load)."""

    role: str
    process: psutil.Process
    before: tuple[float, float, int] | None = None  # user s, system s, wake-ups
    after: tuple[float, float, int] | None = None
    rss: int | None = None
    rss_idle: int | None = None
    note: str = ""  # "new": started during the window (a restart); "exited": gone before its end

    def sample(self, end: bool) -> None:
        try:
            with self.process.oneshot():
                times = self.process.cpu_times()
                # A voluntary context switch is the process going to sleep: once per wake-up.
                sample = (times.user, times.system, self.process.num_ctx_switches().voluntary)
                if end:
                    self.after, self.rss = sample, self.process.memory_info().rss
                else:
                    self.before = sample
        except psutil.NoSuchProcess:
            self.note = "exited"  # a restart: its figures stay unknown

    def sample_idle(self) -> None:
        self.rss_idle = self.current_rss()

    def current_rss(self) -> int | None:
        try:
            return self.process.memory_info().rss
        except psutil.NoSuchProcess:
            return None

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

    @property
    def wakeups(self) -> int | None:
        """Times the process slept and was woken in the window: the fewer per request, the bigger
        its batches (each wake-up costs a context switch and caches filled by other processes)."""
        if self.before is None or self.after is None:
            return None
        return self.after[2] - self.before[2]


def _process_tree(pids: tuple[int, ...]) -> dict[int, psutil.Process]:
    """The processes with these pids and all their descendants, by pid."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            raise BenchError(f"no process {pid}") from None
    return found


def _measured(processes, **fields) -> list[Measured]:
    measured = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            measured.append(Measured(role_of(p.cmdline()), p, **fields))
    return measured


def dcod_processes(pids: tuple[int, ...]) -> list[Measured]:
    """The processes with these pids and all their descendants, each once, with their roles."""
    return _measured(_process_tree(pids).values())


def newcomers(pids: tuple[int, ...], known: list[Measured]) -> list[Measured]:
    """Processes of the tree started since ``known`` was listed (a reload, a restart): all their CPU
    time and wake-ups are in the window."""
    pids_known = {m.process.pid for m in known}
    started = [p for pid, p in _process_tree(pids).items() if pid not in pids_known]
    return _measured(started, before=(0.0, 0.0, 0), note="new")


def the_hub(supervisor_pid: int) -> psutil.Process:
    """The hub process of a `dcod run`: its one child with the role "hub"."""
    hubs = [m.process for m in dcod_processes((supervisor_pid,)) if m.role == "hub"]
    if len(hubs) != 1:
        raise BenchError(f"`dcod run` (pid {supervisor_pid}) has {len(hubs)} hub processes, not one")
    return hubs[0]


def hub_stats(config: Config) -> dict:
    """The hub's counters as `dcod status` shows them (from its last heartbeat)."""
    answer = next(control.request(config.control_socket, {"command": "status"}, timeout=10), {})
    return answer.get("status", {}).get("hub") or {}  # null before the first hub starts


def spool_bytes(config: Config, proxy_id: int) -> int:
    """The size of a proxy's spool files (``proxy-<id>.spool``, or one ``proxy-<id>.<hub pid>.spool`` per hub)."""
    directory = config.state_dir / "spool"
    total = 0
    for path in [*directory.glob(f"proxy-{proxy_id}.spool"), *directory.glob(f"proxy-{proxy_id}.*.spool")]:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


# ---------------------------------------------------------------- idle sessions


@contextlib.contextmanager
def idle_sessions(address: str, audsids: Iterator[int], count: int) -> Iterator[None]:
    """``count`` sessions that connect and send their handshake, then nothing, until the end of the block."""
    family, addr = parse_address(address)
    sockets = []
    try:
        for audsid in itertools.islice(audsids, count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(addr)
            sock.sendall(protocol.oracle_handshake(os.getpid(), 0, audsid))
        yield
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_sessions(config: Config, count: int) -> None:
    """Until the hub counts ``count`` sessions (it says so in its heartbeats)."""
    deadline = time.monotonic() + START_TIMEOUT
    while (seen := hub_stats(config).get("sessions", 0)) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"the hub counts {seen} sessions, not {count}, after {START_TIMEOUT:g} s")
        time.sleep(0.1)


def weigh_idle_sessions(stack: contextlib.ExitStack, target: Target, hub: Measured, audsids: Iterator[int],
                        count: int, progress: Progress) -> dict:
    """Connect ``count`` idle sessions, which stay until ``stack`` closes; the hub RSS they cost."""
    without = hub.current_rss()
    progress.note(f"idle sessions: connecting {count}")
    stack.enter_context(idle_sessions(target.address, audsids, count))
    _wait_for_sessions(target.config, count)
    with_them = hub.current_rss()
    delta = with_them - without
    progress.note(f"idle sessions: {count} cost the hub {delta / 2**20:.1f} MB of RSS")
    return {"count": count, "hub_rss_without_mb": without / 2**20, "hub_rss_with_mb": with_them / 2**20,
            "delta_mb": delta / 2**20, "kb_per_session": delta / 1024 / count}


def _raise_fd_limit() -> None:
    """Open files up to the hard limit, for us (idle sessions) and, before `dcod run`, its children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------- disruptions: reload, hub kill


class AlertWatch:
    """The quit alert's file, watched with inotify: ``wait`` returns when it is replaced by a higher counter.

    The file is replaced by a rename in its directory, so the directory is watched (it must exist).
    """

    IN_CLOSE_WRITE, IN_MOVED_TO = 0x8, 0x80
    EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

    def __init__(self, path: Path) -> None:
        self.path = path
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(path.parent), self.IN_CLOSE_WRITE | self.IN_MOVED_TO) < 0:
            errno = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(errno, f"cannot watch {path.parent}")
        self.counter = read_counter(path)  # read once the watch is set: no alert falls in between

    def __enter__(self) -> AlertWatch:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)

    def wait(self, timeout: float) -> tuple[float, int] | None:
        """(time.monotonic() when seen, counter) of the next alert, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return None
            seen_at = time.monotonic()
            if self.path.name in self._names(os.read(self.fd, 65536)):
                counter = read_counter(self.path)
                if counter > self.counter:
                    return seen_at, counter
        return None

    def _names(self, data: bytes) -> set[str]:
        names, offset = set(), 0
        while offset < len(data):
            _, _, _, length = self.EVENT.unpack_from(data, offset)
            offset += self.EVENT.size
            names.add(os.fsdecode(data[offset:offset + length].rstrip(b"\0")))
            offset += length
        return names


def reload_run(target: Target, note: Callable[[str], None]) -> dict:
    """Run the real `dcod reload` against the private `dcod run`, its lines as progress notes."""
    started = time.monotonic()
    reload = subprocess.Popen([sys.executable, "-m", "dcod", "reload", "--config", target.config.source],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    with reload.stdout:
        for line in reload.stdout:
            output.append(line.rstrip())
            note(output[-1])
    status = reload.wait()
    ended = time.monotonic()
    note(f"`dcod reload` exited with status {status} after {ended - started:.2f} s")
    return {"started": started, "ended": ended, "exit_status": status, "output": output}


def kill_hub(target: Target, note: Callable[[str], None]) -> dict:
    """SIGKILL the hub of the private `dcod run`; when, and when the quit alert followed."""
    hub = the_hub(target.pids[0])
    with AlertWatch(target.config.alert_file) as watch:
        killed_at = time.monotonic()
        hub.send_signal(signal.SIGKILL)
        seen_at, counter = watch.wait(ALERT_TIMEOUT) or (None, None)
    note(f"hub (pid {hub.pid}) killed; " + (f"no quit alert within {ALERT_TIMEOUT:g} s" if seen_at is None else
                                           f"quit alert after {(seen_at - killed_at) * 1000:.1f} ms"))
    return {"hub_pid": hub.pid, "killed_at": killed_at, "alerted_at": seen_at, "counter_before": watch.counter,
            "counter": counter}


class Disruption:
    """Something done to the private `dcod run` at an instant of the window, in a thread of the parent."""

    def __init__(self, kind: str, at: float, action: Callable[[], dict]) -> None:
        self.kind = kind
        self.at = at
        self.action = action
        self.result: dict | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name=f"bench {kind}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        time.sleep(max(0.0, self.at - time.monotonic()))
        try:
            self.result = self.action()
        except Exception as e:  # reported by outcome(), in the main thread
            self.error = e

    def outcome(self, timeout: float) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise BenchError(f"{self.kind}: not done {timeout:g} s after the window")
        if self.error is not None:
            raise BenchError(f"{self.kind}: {self.error}") from self.error
        return self.result


def plan_disruption(target: Target, args: argparse.Namespace, measure_at: float,
                    progress: Progress) -> Disruption | None:
    """The --reload-at or --kill-hub-at of this run, started (it waits for its instant), or None."""
    if args.reload_at is not None:
        return Disruption("reload", measure_at + args.reload_at, lambda: reload_run(target, progress.note))
    if args.kill_hub_at is not None:
        return Disruption("hub kill", measure_at + args.kill_hub_at, lambda: kill_hub(target, progress.note))
    return None


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
        self.sent_at = array("d")  # their time.monotonic() when sent: who was sent during a reload, after a kill
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
            self.sent_at.append(sent_at)
        if self.measured == self.schedule.quota:
            self.window_closed_at = now
            self.stopping.set()

    def result(self) -> dict:
        return {"sent": self.sent, "lost": self.lost + self.outstanding, "errors": self.errors,
                "mismatched": self.mismatched, "measured": self.measured, "latencies": self.latencies,
                "sent_at": self.sent_at, "window_closed_at": self.window_closed_at}


def request_tag(audsid: int, number: int) -> bytes:
    """The start of a request's body, unique to it; padding makes up the rest."""
    return b"%010d %010d " % (audsid, number)


def _echoes(reply: bytes, tag: bytes, padding: bytes) -> bool:
    """Whether ``reply`` is tag + padding, without building that (a body may be megabytes)."""
    return len(reply) == len(tag) + len(padding) and reply.startswith(tag) and reply.endswith(padding)


async def _round_trips(session: Session, plan: LoadPlan, tally: Tally) -> None:
    """One Oracle session as PL/SQL drives it: a single thread of control keeping ``depth``
    requests outstanding with the dco package's calls.

    New requests are queued (``buffered``) and sent together by one flush; then the session
    waits for its oldest reply and takes every later one that has arrived meanwhile, in
    order, before it queues as many new requests. Tag and padding are written apart: the
    session joins them, the only copy of a big body here.
    """
    padding = b"x" * (plan.size - TAG_SIZE)
    numbers = itertools.count(1)
    window: collections.deque[tuple[int, bytes, float]] = collections.deque()  # rseq, tag, sent at
    while window or not tally.stopping.is_set():
        while len(window) < plan.depth and not tally.stopping.is_set():
            tag = request_tag(session.audsid, next(numbers))
            session.write(tag)
            session.write(padding)
            window.append((await session.send_request(plan.proxy, buffered=True), tag, time.monotonic()))
            tally.sent += 1
            tally.outstanding += 1
        with contextlib.suppress(ClientError):  # no hub reachable: each read_response says so
            await session.flush()
        await _read_reply(session, *window.popleft(), padding, tally)
        while window and session.has_reply(window[0][0]):
            await _read_reply(session, *window.popleft(), padding, tally)


async def _read_reply(session: Session, rseq: int, tag: bytes, sent_at: float, padding: bytes, tally: Tally) -> None:
    try:
        reply = await session.read_response(rseq)
    except DcoError:
        tally.errors += 1
    except ClientError:
        tally.lost += 1  # the hub went away, or none could be reached
    else:
        if _echoes(reply, tag, padding):
            tally.done(sent_at, latency=True)
        else:
            tally.mismatched += 1
    tally.outstanding -= 1  # not reached when cancelled at the end of the grace: then it is lost


async def _one_way(session: Session, numbers: Iterator[int], plan: LoadPlan, tally: Tally) -> None:
    """Send one-way requests as fast as the connection takes them (send_request waits for the flush)."""
    padding = b"x" * (plan.size - TAG_SIZE)
    while not tally.stopping.is_set():
        session.write(request_tag(session.audsid, next(numbers)))
        session.write(padding)
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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_publish, tally, counters, plan.index)
            async with trio.open_nursery() as loops:
                for session in sessions:
                    if plan.oneway:
                        numbers = itertools.count(1)
                        for _ in range(plan.depth):
                            loops.start_soon(_one_way, session, numbers, plan, tally)
                    else:
                        loops.start_soon(_round_trips, session, plan, tally)
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


def _audsids(count: int) -> Iterator[int]:
    """Random audsids far from small numbers: on a production hub they must not collide with real sessions."""
    return iter(range(random.randrange(1 << 31, (1 << 32) - count), 1 << 32))


def start_loads(target: Target, args: argparse.Namespace, counters, audsids: Iterator[int]) -> list[LoadProcess]:
    context = multiprocessing.get_context("spawn")
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


def stop_loads(loads: list[LoadProcess]) -> None:
    for load in loads:
        load.pipe.close()  # a load process that is done exits
    for load in loads:
        load.process.join(1.0)
        if load.process.is_alive():
            load.process.terminate()


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


def _follow(loads: list[LoadProcess], counters, progress: Progress, phase: str, until: float | None,
            enough: int | None = None) -> None:
    """Show progress until ``until`` (a monotonic instant), or until ``enough`` requests were measured;
    BenchError if a load process dies meanwhile."""
    while True:
        now = time.monotonic()
        if until is not None and now >= until or enough is not None and sum(counters[1::2]) >= enough:
            return
        for load in loads:
            if not load.process.is_alive() and not load.pipe.poll():  # died without its result
                raise BenchError(f"load process {load.plan.index} exited with status {load.process.exitcode}")
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
    audsids = _audsids(args.sessions + (args.idle_sessions or 0))
    dcod = dcod_processes(target.pids)
    for m in dcod:
        m.sample_idle()
    counters = multiprocessing.get_context("spawn").RawArray("q", 2 * args.processes)
    with contextlib.ExitStack() as stack:
        stack.callback(progress.close)
        idle = None
        if args.idle_sessions:
            hub = next(m for m in dcod if m.role == "hub")
            idle = weigh_idle_sessions(stack, target, hub, audsids, args.idle_sessions, progress)
        loads = start_loads(target, args, counters, audsids)
        stack.callback(stop_loads, loads)
        for load in loads:
            load.receive("ready", START_TIMEOUT)
        watched = dcod + [Measured(f"load {load.plan.index}", psutil.Process(load.process.pid)) for load in loads]
        measure_at = time.monotonic() + args.warmup
        end_at = None if args.count else measure_at + args.duration
        quotas = _shares(args.count, args.processes) if args.count else [None] * args.processes
        for load, quota in zip(loads, quotas):
            load.pipe.send(Schedule(measure_at, end_at, quota))
        disruption = plan_disruption(target, args, measure_at, progress)

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
    return Run(results, watched, measure_at, window_end - measure_at, sampled_to - sampled_from, outcome, idle,
               spooled if args.spool else None)


# ---------------------------------------------------------------- the report


def percentile(ordered: list[float], p: float) -> float | None:
    """The nearest-rank percentile of sorted values (None for none)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_summary(ordered: list[float]) -> dict:
    return {"p50": percentile(ordered, 50), "p90": percentile(ordered, 90), "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else None}


def _sends(results: list[dict]) -> Iterator[tuple[float, float]]:
    """(sent at, latency ms) of every round trip measured."""
    for r in results:
        yield from zip(r["sent_at"], r["latencies"])


def reload_figures(outcome: dict, results: list[dict], measure_at: float) -> dict:
    """The reload's duration and status; latency of the requests sent while it ran against the others'."""
    started, ended = outcome["started"], outcome["ended"]
    during, steady = [], []
    for sent_at, latency in _sends(results):
        (during if started <= sent_at <= ended else steady).append(latency)
    return {"at_s": started - measure_at, "duration_s": ended - started, "exit_status": outcome["exit_status"],
            "output": outcome["output"],
            "requests_during": len(during), "latency_during_ms": latency_summary(sorted(during)),
            "requests_steady": len(steady), "latency_steady_ms": latency_summary(sorted(steady))}


def kill_figures(outcome: dict, results: list[dict], measure_at: float, lost_limit: int) -> dict:
    """From the hub's SIGKILL to the quit alert, and to the first reply to a request sent after it."""
    killed_at, alerted_at = outcome["killed_at"], outcome["alerted_at"]
    served_at = min((sent_at + latency / 1000 for sent_at, latency in _sends(results) if sent_at > killed_at),
                    default=None)
    return {"at_s": killed_at - measure_at, "hub_pid": outcome["hub_pid"],
            "alert_ms": None if alerted_at is None else (alerted_at - killed_at) * 1000,
            "alert_counter_before": outcome["counter_before"], "alert_counter": outcome["counter"],
            "serving_again_ms": None if served_at is None else (served_at - killed_at) * 1000,
            "lost_limit": lost_limit}


def spool_figures(spooled_bytes: int, size: int, seconds: float, hub_cpu: float | None, config: Config) -> dict:
    """What the hub wrote to the spool: one record per request, none taken out (no worker)."""
    requests = spooled_bytes // (RECORD_HEADER.size + HEADER_SIZE + size)
    return {"requests": requests, "requests_per_s": requests / seconds, "mb_per_s": spooled_bytes / seconds / 1e6,
            "hub_cpu_us_per_request": hub_cpu / requests * 1e6 if hub_cpu is not None and requests else None,
            "fsync_interval_s": config.hub.spool_fsync_interval}


def report(target: Target, args: argparse.Namespace, run: Run) -> dict:
    """Every figure of a run, machine-readable: what --json prints and the table shows."""
    results = run.results
    requests = sum(r["measured"] for r in results)

    def per_request(cpu: float | None) -> float | None:
        return None if cpu is None or not requests else cpu / requests * 1e6

    def per_wakeup(wakeups: int | None) -> float | None:
        return None if not wakeups else requests / wakeups

    def mb(n: int | None) -> float | None:
        return None if n is None else n / 2**20

    latencies = sorted(itertools.chain.from_iterable(r["latencies"] for r in results))
    processes = [{"role": m.role, "pid": m.process.pid, "cpu_s": m.cpu, "system_s": m.system,
                  "cpu_percent": None if m.cpu is None else 100 * m.cpu / run.cpu_window,
                  "cpu_us_per_request": per_request(m.cpu), "wakeups": m.wakeups,
                  "requests_per_wakeup": per_wakeup(m.wakeups), "rss_idle_mb": mb(m.rss_idle), "rss_mb": mb(m.rss),
                  "note": m.note}
                 for m in run.watched]
    hubs = [p["cpu_s"] for p in processes if p["role"] == "hub"]
    hub_cpu = sum(hubs) if hubs and None not in hubs else None  # unknown when a hub exited in the window
    load_cpu = sum(p["cpu_s"] or 0 for p in processes if p["role"].startswith("load "))
    kind, outcome = run.disruption or (None, None)
    return {
        "hub": target.address,
        "own_hub": target.own,
        "instances": args.instances if target.own and not args.spool else None,
        "proxy": args.proxy,
        "mode": "one-way" if args.oneway else "round trip",
        "sessions": args.sessions,
        "depth": args.depth,
        "size": args.size,
        "processes": args.processes,
        "warmup_s": args.warmup,
        "window_s": run.window,
        "requests": requests,
        "requests_per_s": requests / run.window if run.window > 0 else None,
        "mb_per_s": requests * args.size / run.window / 1e6 if run.window > 0 else None,
        "latency_ms": None if args.oneway else latency_summary(latencies),
        "sent": sum(r["sent"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "mismatched": sum(r["mismatched"] for r in results),
        "hub_cpu_us_per_request": per_request(hub_cpu),
        "load_cpu_s": load_cpu,
        "load_cpu_us_per_request": per_request(load_cpu),
        "cpu_window_s": run.cpu_window,
        "process_cpu": processes,
        "filesystems": {"runtime": filesystem(target.config.runtime_dir),
                        "state": filesystem(target.config.state_dir)} if target.own else None,
        "python": python_build(),
        "reload": reload_figures(outcome, results, run.measure_at) if kind == "reload" else None,
        "hub_kill": kill_figures(outcome, results, run.measure_at, args.sessions * args.depth)
        if kind == "hub kill" else None,
        "idle_sessions": run.idle_sessions,
        "spool": None if run.spooled_bytes is None else
        spool_figures(run.spooled_bytes, args.size, run.cpu_window, hub_cpu, target.config),
    }


def problems(r: dict) -> list[str]:
    """What makes a run fail: losses (beyond a hub kill's in-flight requests), errors, a failed reload..."""
    found = []
    if r["errors"] or r["mismatched"]:
        found.append(f"{r['errors']} error replies and {r['mismatched']} wrong replies")
    kill = r["hub_kill"]
    limit = kill["lost_limit"] if kill else 0
    if r["lost"] > limit:
        found.append(f"{r['lost']} requests lost" + (f", more than the {limit} in flight" if kill else ""))
    if r["reload"] and r["reload"]["exit_status"] != 0:
        found.append(f"`dcod reload` exited with status {r['reload']['exit_status']}")
    if kill and kill["alert_ms"] is None:
        found.append(f"no quit alert within {ALERT_TIMEOUT:g} s of the hub's SIGKILL")
    if kill and kill["serving_again_ms"] is None:
        found.append("no reply from a new hub before the end of the window")
    return found


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _latencies(summary: dict, keys=("p50", "p90", "p99", "max")) -> str:
    return "   ".join(f"{k} {_number(summary[k], 2)}" for k in keys)


def table(r: dict) -> str:
    """The report for a person."""
    what = "sent" if r["mode"] == "one-way" else "round trips"
    if not r["own_hub"]:
        hub = f"hub {r['hub']}"
    elif r["spool"]:
        hub = f"private hub {r['hub']} (no worker: every request is spooled)"
    else:
        hub = f"private hub {r['hub']} ({_count(r['instances'], 'echo instance')})"
    loads = _count(r["processes"], "load process")
    lines = [
        f"dcod bench: {r['sessions']} sessions x depth {r['depth']}, {r['size']}-byte {r['mode']} requests "
        f"to proxy {r['proxy']}, {hub}, {loads}",
        f"{'window':<13} {r['window_s']:.2f} s, after {r['warmup_s']:g} s of warmup",
        f"{what:<13} {r['requests']}   {_number(r['requests_per_s'], 0)}/s   "
        f"{_number(r['mb_per_s'], 1)} MB/s of request bodies" + ("" if r["mode"] == "one-way" else " (as much back)"),
    ]
    if r["latency_ms"] is not None:
        lines.append(f"{'latency ms':<13} {_latencies(r['latency_ms'])}")
    else:
        lines.append(f"{'':<13} one-way requests get no reply: this is the send rate, and replies are not checked")
    lines.append(f"{'checks':<13} sent {r['sent']}   lost {r['lost']}   errors {r['errors']}   "
                 f"mismatched {r['mismatched']}")
    lines += _scenario_lines(r)
    # What one unit of work is: a one-way request, or a round trip.
    item, short = ("request", "req") if r["mode"] == "one-way" else ("round trip", "rt")
    unit, per_wake = f"µs/{short}", f"{short}/wake"
    lines += ["", f"{'process':<12} {'pid':>8} {'CPU s':>8} {'sys s':>7} {'CPU %':>7} {unit:>8} {per_wake:>8} "
                  f"{'RSS idle':>9} {'RSS load':>9}"]
    for p in r["process_cpu"]:
        lines.append(f"{p['role']:<12} {p['pid']:>8} {_number(p['cpu_s'], 2):>8} {_number(p['system_s'], 2):>7} "
                     f"{_number(p['cpu_percent']):>7} {_number(p['cpu_us_per_request']):>8} "
                     f"{_number(p['requests_per_wakeup']):>8} "
                     f"{_number(p['rss_idle_mb']):>9} {_number(p['rss_mb']):>9}  {p['note']}".rstrip())
    lines += [f"{per_wake}: {item}s per time the process slept and was woken (its batch size)",
              "RSS in MB: idle before any session connected, load at the end of the window",
              "", f"hub CPU per {item}: "
                  f"{_number(r['hub_cpu_us_per_request'])} µs   "
                  f"load generator: {_number(r['load_cpu_us_per_request'])} µs ({r['load_cpu_s']:.2f} CPU s)"]
    if r["filesystems"]:
        lines.append(f"runtime dir (quit alert, sockets) on {r['filesystems']['runtime']}, "
                     f"state dir (spool) on {r['filesystems']['state']}")
    lines.append(f"python {r['python']}")
    return "\n".join(lines)


def _scenario_lines(r: dict) -> list[str]:
    """The lines of --reload-at, --kill-hub-at, --idle-sessions and --spool."""
    lines = []
    if reload := r["reload"]:
        lines += [f"{'reload':<13} `dcod reload` at {reload['at_s']:.2f} s took {reload['duration_s']:.2f} s, "
                  f"exit status {reload['exit_status']}",
                  f"{'  during it':<13} {reload['requests_during']:>8} round trips, ms: "
                  f"{_latencies(reload['latency_during_ms'], ('p50', 'p99', 'max'))}",
                  f"{'  steady':<13} {reload['requests_steady']:>8} round trips, ms: "
                  f"{_latencies(reload['latency_steady_ms'], ('p50', 'p99', 'max'))}"]
    if kill := r["hub_kill"]:
        lines += [f"{'hub kill':<13} SIGKILL of the hub (pid {kill['hub_pid']}) at {kill['at_s']:.2f} s: "
                  f"quit alert after {_number(kill['alert_ms'], 2)} ms, "
                  f"a new hub replying after {_number(kill['serving_again_ms'], 1)} ms",
                  f"{'':<13} lost {r['lost']} (at most {kill['lost_limit']} expected: sessions x depth in flight)"]
    if idle := r["idle_sessions"]:
        lines.append(f"{'idle sessions':<13} {idle['count']}: hub RSS {idle['hub_rss_without_mb']:.1f} -> "
                     f"{idle['hub_rss_with_mb']:.1f} MB, +{idle['delta_mb']:.1f} MB "
                     f"({idle['kb_per_session']:.1f} KB per session)")
    if spool := r["spool"]:
        lines.append(f"{'spool':<13} {spool['requests']} requests spooled, {spool['requests_per_s']:.0f}/s, "
                     f"{spool['mb_per_s']:.1f} MB/s; hub CPU {_number(spool['hub_cpu_us_per_request'])} µs "
                     f"per request; fsync every {spool['fsync_interval_s']:g} s")
    return lines


# ---------------------------------------------------------------- `dcod bench`


def _check(args: argparse.Namespace, config: Config) -> None:
    for name in ("sessions", "depth", "processes", "instances", "count", "idle_sessions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.count is None and args.duration <= 0 or args.warmup < 0:
        raise BenchError("--duration must be positive and --warmup not negative")
    if args.processes > min(args.sessions, args.count or args.sessions):
        raise BenchError(f"--processes {args.processes} is more than --sessions (or --count): some would idle")
    if args.size < TAG_SIZE or args.size + HEADER_SIZE > config.hub.max_pdu:
        raise BenchError(f"--size must be from {TAG_SIZE} (the tag that identifies a reply) "
                         f"to {config.hub.max_pdu - HEADER_SIZE} (max_pdu), not {args.size}")
    if args.pid and not args.hub:
        raise BenchError("--pid goes with --hub (without it, the bench measures the hub it starts)")
    scenarios = {"--reload-at": args.reload_at is not None, "--kill-hub-at": args.kill_hub_at is not None,
                 "--idle-sessions": bool(args.idle_sessions), "--spool": args.spool}
    if args.hub and any(scenarios.values()):
        raise BenchError(f"{', '.join(k for k, on in scenarios.items() if on)}: only on the bench's own hub "
                         "(without --hub)")
    for option, at in (("--reload-at", args.reload_at), ("--kill-hub-at", args.kill_hub_at)):
        if at is not None and (args.count or args.oneway):
            raise BenchError(f"{option} goes with --duration and round trips (its figures are reply latencies)")
        if at is not None and not 0 <= at < args.duration:
            raise BenchError(f"{option} must fall in the window, from 0 to --duration {args.duration:g}, not {at:g}")


def main(config: Config, args: argparse.Namespace) -> int:
    """`dcod bench`: 0 when nothing was lost (beyond a killed hub's requests in flight), refused or misrouted
    and a reload succeeded, 1 otherwise, 2 if it could not run (130 on Ctrl-C, after stopping its processes)."""
    args.oneway = args.oneway or args.spool  # nothing would ever answer a spooled request
    try:
        _check(args, config)
        if args.idle_sessions:
            _raise_fd_limit()  # before `dcod run`, whose hub inherits it
        with contextlib.ExitStack() as stack:
            if args.hub:
                target = Target(args.hub, config, tuple(args.pid or ()), own=False)
            else:
                target = stack.enter_context(own_hub(config, args.proxy, args.instances, spool=args.spool))
            result = report(target, args, measure(target, args))
    except BenchError as e:
        print(f"dcod bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcod bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if args.json else table(result))
    failed = problems(result)
    for problem in failed:
        print(f"dcod bench: {problem}", file=sys.stderr)
    return 1 if failed else 0
