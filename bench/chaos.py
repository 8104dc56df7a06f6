#!/usr/bin/env python3
"""Chaos run: a real `dcod run` under continuous load while random faults hit it.

    .venv/bin/python bench/chaos.py --duration 180 [--seed N] [--json FILE] [--keep]

What runs (all real processes, real signals):

- this script plays systemd for dco-hub.socket + dco-hub.service: it holds the listening
  socket and passes it to `dcod run` (LISTEN_FDS), reads sd_notify on a private
  NOTIFY_SOCKET, and restarts `dcod run` whenever it exits, after waiting, as KillMode=mixed
  does, for the rest of the process tree to exit on its own (SIGKILL after "TimeoutStopSec");
- proxy 1: an echo handler, 2 instances, that blocks its worker's event loop (time.sleep) for
  longer than heartbeat_timeout on a request "block"; proxy 2: a one-way counting handler, 1
  instance (its requests queue, spooled, while it restarts), that appends every request it sees
  (audsid, rseq, body, pid, time) to a file;
- as root, the state directory (the spool) on a 32 MiB tmpfs of its own;
- sync sessions (dcod.client.Session with alert_file=) calling proxy 1 back to back and
  checking every reply; one-way sessions sending numbered one-way requests to proxy 2;
- faults in *storms* separated by *calm* phases: SIGKILL, SIGSTOP(+SIGCONT) and SIGTERM of the
  hub, of worker instances and of the supervisor itself; a blocked handler ("handler block": a
  sync request "block"); the state directory full for 1-4 s ("state full", root only); a poison
  request ("handler poison": a one-way request whose handler SIGKILLs its worker);
  `dcod reload` at random times, in storms and in calm phases alike.

Invariants (exit status 1 if one is broken):

1. every sync request gets exactly one outcome: its reply, an error reply, or the connection
   broke with it in flight ("lost in flight with a dying hub"); none is left unanswered
   and no reply is wrong;
2. every abnormal outcome (error reply, lost in flight, one-way request never seen, duplicate)
   is explained by a fault injected shortly before it, of a kind that can cause it; traffic
   with no fault nearby, reloads included, sees none;
3. a blocked handler's instance is killed as hung (its request gets DCO-0003), unless the
   supervisor was itself down; a full state directory alone costs no request; each poison request
   is set aside once, after at most poison_after deliveries, and nothing else is;
4. no dcod process is left behind: after the final stop no process's command line contains
   the run's configuration path, and a killed supervisor's children leave on their own.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import trio

from dcod.bench.accounting import role_of
from dcod.bench.target import NotifySocket, socket_activated
from dcod.client import ClientError, DcoError, DcoTimeout, HubLost, HubUnavailable, Session
from dcod.net import sockets
from dcod.supervisor.process import describe_exit

SYNC_PROXY, ONEWAY_PROXY = 1, 2
# The production heartbeat_timeout: with 1.0 s a loaded machine makes the pmon kill hubs that are
# merely slow to start (see RELIABILITY.md), which this run would then report.
HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT = 0.2, 3.0
DRAIN_TIMEOUT, STOP_TIMEOUT = 3.0, 2.0
REPLY_TIMEOUT = 10.0
RESTART_SEC = 0.2  # Restart=on-failure, RestartSec=200ms as in units/dco-hub.service
TIMEOUT_STOP_SEC = DRAIN_TIMEOUT + STOP_TIMEOUT + 10.0  # before leftovers get SIGKILL
# An abnormal outcome is explained by a fault at most this long before it (or, for a one-way
# request, around its send): the longest a fault's effects last (a drain, a hung hub's
# detection, a supervisor's restart), with a margin for a loaded machine.
WINDOW = DRAIN_TIMEOUT + STOP_TIMEOUT + HEARTBEAT_TIMEOUT + 4.0
# A one-way request can also be lost by a fault after its send, while it waits in a socket buffer
# or an outbox: at most as long as a process stays SIGSTOPped before it is killed.
FORWARD = HEARTBEAT_TIMEOUT + 3.0
CLIENT_TIMEOUT = 60.0  # a sync request with no outcome after this long breaks invariant 1
RELOAD_HANG = 30.0  # a `dcod reload` takes 1-6 s here; one still running after this long is stuck

COUNTER_MODULE = '''\
"""One-way counting worker for bench/chaos.py: every request seen, one line, appended at once."""
import os
import time

_fd = os.open({path!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def handle(req):
    if req.body.startswith(b"poison"):  # dies of it: a line of its own (4 fields), then SIGKILL
        os.write(_fd, b"%s %d %d %.6f\\n" % (req.body, req.audsid, os.getpid(), time.time()))
        os.kill(os.getpid(), 9)
    os.write(_fd, b"%d %d %d %s %d %.6f\\n" % (req.audsid, req.rseq, req.sync, req.body, os.getpid(), time.time()))
    return None
'''
POISON_AFTER = 3  # hub.poison_after: deliveries a poison request kills before it is set aside
POISON_AUDSID = 840000  # + n: the session of the n-th poison request, its key in the dead letters

# Proxy 1's handler: the echo, but a request "block" blocks its worker's event loop (time.sleep, as a
# handler calling blocking code would) for longer than heartbeat_timeout: the supervisor must kill it.
BLOCK_SECONDS = HEARTBEAT_TIMEOUT + 3.0
ECHO_MODULE = f'''\
"""Echo worker for bench/chaos.py; b"block..." blocks the event loop for {BLOCK_SECONDS:g} s."""
import time


async def handle(req):
    if req.body.startswith(b"block"):
        time.sleep({BLOCK_SECONDS})
    return req.body
'''
STATE_SIZE = "32m"  # the state directory's tmpfs, which the "state full" fault fills

# kind -> weight; "<target> <signal>" signals a process, the others are what a handler or the
# disk does to the service. The weights make hub and worker faults the common ones.
FAULTS = {
    "hub SIGKILL": 3,
    "hub SIGSTOP": 3,
    "hub SIGTERM": 2,
    "worker SIGKILL": 3,
    "worker SIGSTOP": 2,
    "worker SIGTERM": 2,
    "supervisor SIGKILL": 1.5,
    "supervisor SIGSTOP": 1,
    "supervisor SIGTERM": 1,
    "handler block": 2,  # a sync request whose handler blocks its worker past heartbeat_timeout
    "state full": 2,  # the state directory's filesystem full for 1-4 s (root only: a tmpfs)
    "handler poison": 2,  # a one-way request whose handler kills its worker: set aside after POISON_AFTER
}
# Which faults can explain which abnormal outcome (STOP_UNDER_FROZEN_HUB kinds explain the
# outcomes not in EXPLAINS_ALONE only when they hit while the hub was SIGSTOPped).
HUB_GOING = {"hub SIGKILL", "hub SIGSTOP", "hub SIGTERM", "supervisor SIGKILL", "supervisor SIGTERM"}
EXPLAINS = {
    "lost": HUB_GOING,
    # A reply timeout: anything that stalls a request for reply_timeout. Not a full disk: the
    # spool holds what it cannot write in memory, and sync requests never wait for it.
    "DCO-0002": set(FAULTS) - {"state full"},
    # Workers that stop (SIGTERM, or their supervisor gone) while the hub is SIGSTOPped give up
    # waiting for it after stop_timeout; the hub, resumed, forwards its backlog to them: DCO-0003.
    # A worker SIGSTOPped past heartbeat_timeout is killed by the pmon as hung: DCO-0003 too.
    # A blocked handler's instance is killed as hung, with the requests it had.
    "DCO-0003": {
        "handler block",
        "worker 1 SIGKILL",
        "worker 1 SIGTERM",
        "worker 1 SIGSTOP",
        "supervisor SIGKILL",
        "supervisor SIGTERM",
    },
    "DCO-0005": {"hub SIGTERM", "supervisor SIGKILL", "supervisor SIGTERM"},
    # Not a worker fault: the hub sends again what an instance did not acknowledge.
    "oneway missing": HUB_GOING,
}
STOP_UNDER_FROZEN_HUB = {"worker 1 SIGTERM", "worker 2 SIGTERM", "supervisor SIGKILL", "supervisor SIGTERM"}
EXPLAINS_ALONE = {
    "worker 1 SIGTERM": set(),
    "worker 2 SIGTERM": set(),
    "supervisor SIGKILL": {"lost", "DCO-0005", "oneway missing"},
    "supervisor SIGTERM": {"lost", "DCO-0005", "oneway missing"},
}


@dataclasses.dataclass
class Fault:
    at: float  # time.monotonic()
    wall: float  # time.time(), to compare with the worker's records
    kind: str  # e.g. "hub SIGKILL", "worker 2 SIGSTOP", "supervisor SIGTERM"
    pid: int
    detail: str = ""
    until: float = 0.0  # a SIGSTOP: when its SIGCONT was due

    @property
    def general(self) -> str:
        target, _, sig = self.kind.rpartition(" ")
        return f"{target.split()[0]} {sig}"


@dataclasses.dataclass
class Sync:
    sent: float
    done: float = 0.0
    outcome: str = ""  # ok | DCO-000n | lost | unsent | no answer | mismatch | other: ...
    explained_by: str = ""


class Recorder:
    """Everything observed, and the checks at the end."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.sync: dict[tuple[int, int], Sync] = {}
        self.unexpected: list[tuple[int, int, float, bool]] = []  # (audsid, rseq, wall, error) not awaited
        self.oneway_sent: dict[bytes, float] = {}  # body -> monotonic send time
        self.oneway_unsent = 0
        self.reloads: collections.Counter[str] = collections.Counter()
        self.reload_failures: list[str] = []
        self.reload_times: list[tuple[float, float, int]] = []  # (start, end, exit status) of each `dcod reload`
        self.supervisor_starts = 0
        self.supervisor_exits: list[str] = []
        self.leftovers_killed: list[str] = []
        self.anomalies: list[str] = []
        self.hung_killed = {"hub": 0, "worker": 0}  # SIGSTOPped long enough for the pmon to kill them
        self.blocks: list[tuple[Fault, str, float]] = []  # each "handler block": its outcome and end
        self.poison: dict[int, Fault] = {}  # each poison request sent, by its session's audsid
        self.dead_letters: list[dict] = []  # `dcod dead-letters list --json` after the final stop
        self.wall_offset = time.time() - time.monotonic()
        self.started = time.monotonic()
        self.ended = float("inf")

    def fault(self, kind: str, pid: int, detail: str = "") -> Fault:
        fault = Fault(time.monotonic(), time.time(), kind, pid, detail)
        self.faults.append(fault)
        return fault

    def explanation(self, what: str, sent: float, end: float) -> Fault | None:
        """The fault that explains `what` for a request sent at `sent` and settled at `end`: the
        latest one of a kind that can cause it in [sent - WINDOW, sent], else the first in (sent, end]."""
        kinds = EXPLAINS.get(what, set())
        before = after = None
        for f in self.faults:
            if not (sent - WINDOW <= f.at <= end and (f.kind in kinds or f.general in kinds)):
                continue
            if f.kind.endswith("SIGSTOP") and what != "DCO-0002" and "pmon" not in f.detail:
                continue  # a process that was resumed lost nothing; one the pmon killed did
            if f.kind in STOP_UNDER_FROZEN_HUB and what not in EXPLAINS_ALONE[f.kind] and not self.hub_frozen(f.at):
                continue  # explains it only if the hub was SIGSTOPped meanwhile (see EXPLAINS)
            if f.at <= sent:
                before = f
            elif after is None:
                after = f
        return before or after

    def hub_frozen(self, at: float) -> bool:
        return any(g.kind == "hub SIGSTOP" and g.at <= at <= g.until for g in self.faults)

    def stop_during_reload(self, start: float, end: float) -> bool:
        """A supervisor SIGTERM/SIGKILL in [start - WINDOW, end] that hit a `dcod reload` in progress."""
        return any(
            start - WINDOW <= f.at <= end
            and f.kind in ("supervisor SIGTERM", "supervisor SIGKILL")
            and any(a <= f.at <= b for a, b, _ in self.reload_times)
            for f in self.faults
        )

    def quiet(self, start: float, end: float) -> bool:
        return not any(start - WINDOW <= f.at <= end for f in self.faults)


# ---------------------------------------------------------------- the service (systemd's part)


class Service:
    """`dcod run`, started and restarted as systemd would with the units of this repository."""

    def __init__(self, workdir: Path, config_path: Path, listener: socket.socket, rec: Recorder) -> None:
        self.workdir = workdir
        self.config_path = config_path
        self.listener = listener
        self.rec = rec
        self.proc: trio.Process | None = None
        self.ours: set[int] = set()  # pids we started (trio reaps them); the reaper leaves them alone
        self.ready = trio.Event()  # set when the current `dcod run` said READY=1
        self.stopping = False
        self.restarting = trio.Lock()  # one supervisor fault at a time
        self.notify = NotifySocket(workdir / "notify.sock")
        self.env = {**os.environ, **self.notify.env}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep `dcod run` running until stop(); started once it is first ready."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reap_orphans)
            first = True
            while True:
                self.notify.pass_over()  # the READY=1 of a reload of the previous `dcod run` is not this one's
                await self._start()
                if await self.notify.notification("READY=1", 60) is None:
                    self.rec.anomalies.append(f"dcod run (pid {self.proc.pid}) not ready within 60 s")
                else:
                    self.ready.set()
                if first:
                    task_status.started()
                    first = False
                returncode = await self.proc.wait()
                self.ready = trio.Event()
                self.rec.supervisor_exits.append(describe_exit(returncode))
                await self._wait_for_tree(f"supervisor pid {self.proc.pid} {describe_exit(returncode)}")
                if self.stopping:
                    if returncode != 0:
                        self.rec.anomalies.append(f"final stop: dcod run {describe_exit(returncode)}")
                    break
                await trio.sleep(RESTART_SEC)
            nursery.cancel_scope.cancel()
        self.notify.close()

    async def _start(self) -> None:
        argv, options = socket_activated(
            [sys.executable, "-m", "dcod", "run", "--config", str(self.config_path)], self.listener, self.env
        )
        self.rec.supervisor_starts += 1
        log = open(self.workdir / f"supervisor-{self.rec.supervisor_starts}.log", "wb")
        self.proc = await trio.lowlevel.open_process(argv, **options, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self.ours.add(self.proc.pid)

    async def _wait_for_tree(self, why: str) -> None:
        """As systemd after the main process exited (KillMode=mixed): wait until the rest of the
        tree has gone by itself, SIGKILL what is still there after TimeoutStopSec."""
        with trio.move_on_after(TIMEOUT_STOP_SEC):
            while self.leftovers():
                await trio.sleep(0.05)
            return
        for p in self.leftovers():
            try:
                self.rec.leftovers_killed.append(
                    f"{_role(p)} pid {p.pid} still there {TIMEOUT_STOP_SEC:g} s after {why}"
                )
                p.kill()
            except psutil.Error:
                pass

    async def _reap_orphans(self) -> None:
        """We are a subreaper, as systemd is: the children of a killed supervisor become ours."""
        me = psutil.Process()
        while True:
            await trio.sleep(0.1)
            for child in me.children():
                if child.pid in self.ours:
                    continue
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:
                        os.waitpid(child.pid, os.WNOHANG)
                except (psutil.Error, ChildProcessError):
                    pass

    def leftovers(self) -> list[psutil.Process]:
        """Living processes whose command line names this run's directory (the supervisor's excepted): the
        configuration there, or the copies of it in run/ that the supervisor starts its children with."""
        found = []
        needle = str(self.workdir) + os.sep
        current = self.proc.pid if self.proc is not None and self.proc.returncode is None else None
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if (
                    p.pid != current
                    and p.info["status"] != psutil.STATUS_ZOMBIE
                    and needle in " ".join(p.info["cmdline"] or ())
                    and p.pid != os.getpid()
                ):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def children(self) -> dict[str, list[psutil.Process]]:
        """The supervisor's running children by role: "hub", "worker 1#0", ..."""
        by_role = collections.defaultdict(list)
        if self.proc is None or self.proc.returncode is not None:
            return by_role
        try:
            for c in psutil.Process(self.proc.pid).children():
                role = _role(c)
                # Anything else is a child caught between its spawn and its exec (our copy, the
                # shim, a python not yet running dcod): not a target yet.
                if role == "hub" or role.startswith("worker "):
                    by_role[role].append(c)
        except psutil.Error:
            pass
        return by_role

    async def dcod(self, *args: str, timeout: float = 120.0) -> tuple[int, str]:
        with trio.move_on_after(timeout):
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "dcod", *args, "--config", str(self.config_path)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            self.ours.add(proc.pid)
            output = b""
            async with proc.stdout:
                async for chunk in proc.stdout:
                    output += chunk
            return await proc.wait(), output.decode(errors="replace")
        proc.kill()
        return -999, "timed out"


def _role(p: psutil.Process) -> str:
    """A process's role ("hub", "worker 1#0", ...); "" for one gone or still in the LISTEN_PID shim."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return ""
    return "" if not cmd or cmd[0] == "/bin/sh" else role_of(cmd)


# ---------------------------------------------------------------- faults


class Chaos:
    def __init__(
        self,
        service: Service,
        rec: Recorder,
        rng: random.Random,
        *,
        storm: float,
        calm: float,
        interval: float,
        reload_interval: float,
        kinds: dict[str, float],
        load: Load,
        state: Path | None,
        cover: bool = False,
    ) -> None:
        self.kinds = kinds
        self.load = load  # its sessions carry the "handler block" requests
        self.state = state  # the state directory on its own small filesystem, for "state full"
        self.filling = trio.Lock()
        # --cover: the first faults are every kind once, in random order, each waiting for a target
        self.cover = rng.sample(list(kinds), len(kinds)) if cover else []
        self.service = service
        self.rec = rec
        self.rng = rng
        self.storm = storm
        self.calm = calm
        self.interval = interval
        self.reload_interval = reload_interval
        self.stopped: list[psutil.Process] = []  # SIGSTOPped, to SIGCONT at the end at the latest

    async def faults(self, until: float) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self._sleep_until(min(until, time.monotonic() + self.rng.uniform(0.5, 1.5) * self.calm))
                storm_end = min(until, time.monotonic() + self.rng.uniform(0.5, 1.5) * self.storm)
                while time.monotonic() < storm_end:
                    if self.cover:
                        nursery.start_soon(self._fault, self.cover.pop(), True)
                    else:
                        kind = self.rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
                        nursery.start_soon(self._fault, kind)
                    await self._sleep_until(min(storm_end, time.monotonic() + self.rng.expovariate(1 / self.interval)))
                if time.monotonic() >= until:
                    break

    async def reloads(self, until: float) -> None:
        while True:
            await self._sleep_until(min(until, time.monotonic() + self.rng.expovariate(1 / self.reload_interval)))
            if time.monotonic() >= until:
                return
            started = time.monotonic()
            returncode, output = await self.service.dcod("reload")
            self.rec.reload_times.append((started, time.monotonic(), returncode))
            lines = output.strip().splitlines()
            last = lines[-1] if lines else ""
            if returncode == 0:
                self.rec.reloads["ok"] += 1
            elif "already running" in output:
                self.rec.reloads["refused: one at a time"] += 1
            elif returncode == 3:
                self.rec.reloads["no supervisor (being restarted)"] += 1
            else:
                self.rec.reloads["failed"] += 1
                self.rec.reload_failures.append(f"status {returncode}: {last}")

    async def _sleep_until(self, t: float) -> None:
        await trio.sleep(max(0.0, t - time.monotonic()))

    async def _fault(self, kind: str, patient: bool = False) -> None:
        """Inject one fault; if nothing is there to take it (being restarted), skip it, or with
        ``patient`` wait for a target."""
        target, sig = kind.split()
        if target == "supervisor":
            await self._supervisor_fault(sig, patient)
            return
        if kind == "handler block":
            await self._block_a_handler(patient)
            return
        if kind == "state full":
            await self._fill_the_state_directory()
            return
        if kind == "handler poison":
            await self._send_poison(patient)
            return
        with trio.move_on_after(60 if patient else 0):
            while True:
                children = self.service.children()
                roles = [r for r in children if (r == "hub") == (target == "hub")]
                if roles:
                    break
                await trio.sleep(0.1)
        if not roles:
            return
        role = self.rng.choice(sorted(roles))
        proc = self.rng.choice(children[role])
        name = "hub" if role == "hub" else f"worker {role.split()[1].split('#')[0]}"
        await self._signal(proc, f"{name} {sig}", role)

    async def _signal(self, proc: psutil.Process, kind: str, role: str) -> None:
        sig = kind.split()[-1]
        try:
            if sig == "SIGSTOP":
                pause = self.rng.uniform(0.2, HEARTBEAT_TIMEOUT + 2.0)  # hubs past heartbeat_timeout: hung
                proc.suspend()
                fault = self.rec.fault(kind, proc.pid, f"{role}, {pause:.1f} s")
                fault.until = fault.at + pause
                self.stopped.append(proc)
                await trio.sleep(pause)
                self.stopped.remove(proc)
                if not _alive(proc):
                    killed = any(f.pid == proc.pid and f.kind.endswith("SIGKILL") for f in self.rec.faults)
                    if not killed:
                        fault.detail += ", killed by the pmon as hung"
                        self.rec.hung_killed["hub" if role == "hub" else "worker"] += 1
                    else:
                        fault.detail += ", gone before its SIGCONT"
                    return
                proc.resume()
            else:
                proc.send_signal(getattr(signal, sig))
                self.rec.fault(kind, proc.pid, role)
        except psutil.NoSuchProcess:
            pass

    async def _supervisor_fault(self, sig: str, patient: bool = False) -> None:
        service = self.service
        if patient:
            with trio.move_on_after(120):
                while service.restarting.locked() or not service.ready.is_set():
                    await trio.sleep(0.1)
        if service.restarting.locked() or not service.ready.is_set():
            return  # one at a time, and only on one that is up
        async with service.restarting:
            proc = service.proc
            pid = proc.pid
            try:
                target = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return
            if sig == "SIGSTOP":
                await self._signal(target, "supervisor SIGSTOP", "supervisor")
                return
            # SIGKILL: Restart=on-failure; SIGTERM: as `systemctl restart` (a clean exit is not restarted
            # by on-failure). Either way Service.run starts a new one; wait until it is ready.
            target.send_signal(getattr(signal, sig))
            self.rec.fault(f"supervisor {sig}", pid)
            await proc.wait()
            with trio.move_on_after(TIMEOUT_STOP_SEC + 60):
                while service.proc is proc or not service.ready.is_set():
                    await trio.sleep(0.05)

    async def _block_a_handler(self, patient: bool) -> None:
        """A sync request whose handler blocks its worker's event loop past heartbeat_timeout: the
        supervisor must kill that instance as hung (the request, and any other it had, get DCO-0003)."""
        with trio.move_on_after(120 if patient else 0):
            await self.service.ready.wait()
        if not self.service.ready.is_set():
            return
        fault = self.rec.fault("handler block", 0)
        try:
            async with self.load.session(830000 + len(self.rec.faults)) as session:
                # each its own body: the hub would take the same one again for poison (DCO-0008)
                session.write(b"block %d" % len(self.rec.faults))
                rseq = await session.send_request(SYNC_PROXY)
                await session.read_response(rseq, timeout=CLIENT_TIMEOUT)
            outcome = "ok"
        except DcoError as e:
            outcome = e.text[:8]
        except HubLost:
            outcome = "lost"
        except ClientError as e:
            outcome = type(e).__name__
        self.rec.blocks.append((fault, outcome, time.monotonic()))
        fault.detail = f"answered {outcome} after {time.monotonic() - fault.at:.1f} s"

    async def _send_poison(self, patient: bool) -> None:
        """A one-way request to proxy 2 that kills every instance it reaches, on a session of its own."""
        with trio.move_on_after(120 if patient else 0):
            await self.service.ready.wait()
        if not self.service.ready.is_set():
            return
        audsid = POISON_AUDSID + len(self.rec.poison)
        try:
            async with self.load.session(audsid) as session:
                session.write(b"poison:%d" % audsid)
                await session.send_request(ONEWAY_PROXY, oneway=True)
        except ClientError as e:
            self.rec.fault("handler poison", 0, f"audsid {audsid}, not sent: {type(e).__name__}")
            return
        self.rec.poison[audsid] = self.rec.fault("handler poison", 0, f"audsid {audsid}")

    async def _fill_the_state_directory(self) -> None:
        """The state directory's filesystem full for 1-4 s; one fill at a time."""
        if self.state is None or self.filling.locked():
            return
        async with self.filling:
            filler = self.state / "chaos-filler"
            hold = self.rng.uniform(1.0, 4.0)
            await trio.to_thread.run_sync(_take_every_free_block, filler)
            self.rec.fault("state full", 0, f"{hold:.1f} s")
            try:
                await trio.sleep(hold)
            finally:
                filler.unlink()

    def resume_all(self) -> None:
        for proc in self.stopped:
            try:
                proc.resume()
            except psutil.Error:
                pass


def _take_every_free_block(path: Path) -> None:
    fs = os.statvfs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, fs.f_bavail * fs.f_frsize)
    finally:
        os.close(fd)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` mounted on ``path`` for the with block (root only)."""
    path.mkdir(mode=0o750)
    subprocess.run(["mount", "-n", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-n", "-l", str(path)])


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- load


class CountingSession(Session):
    """A dcod.client.Session that also reports replies nobody awaits (duplicates, late replies)."""

    def __init__(self, *args, rec: Recorder, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rec = rec

    def _file(self, pdu) -> None:
        length, _audsid, rseq = struct.unpack_from(">iIi", pdu)
        in_flight = getattr(self, "_in_flight", None)
        if in_flight is not None and rseq not in in_flight:
            self._rec.unexpected.append((self.audsid, rseq, time.time(), length < 0))
        super()._file(pdu)


class Load:
    def __init__(
        self,
        address: str,
        alert_file: Path,
        rec: Recorder,
        *,
        sync_sessions: int,
        oneway_sessions: int,
        oneway_pause: float,
    ) -> None:
        self.address = address
        self.alert_file = alert_file
        self.rec = rec
        self.sync_sessions = sync_sessions
        self.oneway_sessions = oneway_sessions
        self.oneway_pause = oneway_pause
        self.stopping = trio.Event()

    def session(self, audsid: int) -> Session:
        return CountingSession(
            self.address,
            audsid=audsid,
            alert_file=self.alert_file,
            rec=self.rec,
            reconnect_timeout=60.0,
            drain_timeout=30.0,
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.sync_sessions):
                nursery.start_soon(self._sync, 810000 + i)
            for i in range(self.oneway_sessions):
                nursery.start_soon(self._oneway, 820000 + i)

    async def _sessions(self, audsid: int, one_request) -> None:
        """Keep a session alive (a fresh one after the hub list failed it) and run
        ``one_request(session, body)`` until stopped; it returns False to drop the session."""
        number = 0
        while not self.stopping.is_set():
            try:
                async with self.session(audsid) as session:
                    while not self.stopping.is_set():
                        number += 1
                        if not await one_request(session, b"%d:%d" % (audsid, number), audsid, number):
                            break
            except HubUnavailable:
                await trio.sleep(0.1)

    async def _sync(self, audsid: int) -> None:
        await self._sessions(audsid, self._sync_request)

    async def _sync_request(self, session, body: bytes, audsid: int, number: int) -> bool:
        session.write(body)
        record = Sync(time.monotonic())
        try:
            rseq = await session.send_request(SYNC_PROXY)
        except HubUnavailable:
            self.rec.sync[(audsid, -number)] = record
            record.outcome, record.done = "unsent", time.monotonic()
            return False  # a fresh session: drop what this one still queues
        self.rec.sync[(audsid, rseq)] = record
        try:
            reply = await session.read_response(rseq, timeout=CLIENT_TIMEOUT)
        except DcoError as e:
            record.outcome = e.text[:8] if e.text.startswith("DCO-") else f"other: {e.text}"
        except HubLost:
            record.outcome = "lost"
        except DcoTimeout:
            record.outcome = "no answer"
        except HubUnavailable:
            record.outcome = "lost"  # lost, and then the reconnect failed too
        except ClientError as e:
            record.outcome = f"other: {e}"
        else:
            record.outcome = "ok" if reply == body else "mismatch"
        record.done = time.monotonic()
        return True

    async def _oneway(self, audsid: int) -> None:
        await self._sessions(audsid, self._oneway_request)

    async def _oneway_request(self, session, body: bytes, audsid: int, number: int) -> bool:
        session.write(body)
        sent = time.monotonic()
        try:
            await session.send_request(ONEWAY_PROXY, oneway=True)
        except HubUnavailable:
            self.rec.oneway_unsent += 1
            return False
        self.rec.oneway_sent[body] = sent
        await trio.sleep(self.oneway_pause)
        return True


# ---------------------------------------------------------------- the run


def write_config(workdir: Path, port: int) -> Path:
    (workdir / "chaoscount.py").write_text(COUNTER_MODULE.format(path=str(workdir / "oneway-seen.log")))
    (workdir / "chaosecho.py").write_text(ECHO_MODULE)
    path = workdir / "dcod-chaos.toml"
    path.write_text(
        textwrap.dedent(f"""\
        # generated by bench/chaos.py
        [hub]
        listen = "127.0.0.1:{port}"
        advertise = "127.0.0.1:{port}"
        reply_timeout = {REPLY_TIMEOUT}
        poison_after = {POISON_AFTER}

        [supervisor]
        runtime_dir = "{workdir / "run"}"
        state_dir = "{workdir / "state"}"
        heartbeat_interval = {HEARTBEAT_INTERVAL}
        heartbeat_timeout = {HEARTBEAT_TIMEOUT}
        drain_timeout = {DRAIN_TIMEOUT}
        stop_timeout = {STOP_TIMEOUT}
        # chaos kills far more often than the production budget (5 within 60 s) allows
        restart_max = 1000
        restart_window = 10.0
        ready_timeout = 15.0

        [[proxy]]
        id = {SYNC_PROXY}
        handler = "chaosecho:handle"
        handler_path = ["{workdir}"]
        instances = 2

        [[proxy]]
        id = {ONEWAY_PROXY}
        handler = "chaoscount:handle"
        handler_path = ["{workdir}"]
        # one: while it restarts, its requests queue in the hub and go to the spool
        instances = 1
        """)
    )
    return path


EXCEPTION_LINE = re.compile(r"^[\s|+-]*((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Closed|Full|Exit)): (.*)$")


def crashes_in_logs(workdir: Path) -> dict[str, int]:
    """Unhandled exceptions that dcod processes printed (their stderr is the supervisor's log)."""
    found: collections.Counter[str] = collections.Counter()
    for log in sorted(workdir.glob("supervisor-*.log")):
        in_traceback = False
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback (most recent call last)" in line:
                in_traceback = True
            elif in_traceback and (m := EXCEPTION_LINE.match(line)) and "ExceptionGroup" not in m[1]:
                found[f"{m[1]}: {m[2][:120]}"] += 1
                in_traceback = False
    return dict(found)


def poison_deliveries(workdir: Path) -> dict[int, list[float]]:
    """The wall times at which the counting worker took each poison request (and died of it), by audsid."""
    taken = collections.defaultdict(list)
    try:
        text = (workdir / "oneway-seen.log").read_bytes()
    except FileNotFoundError:
        return taken
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].startswith(b"poison"):
            taken[int(parts[1])].append(float(parts[3]))
    return taken


def seen_at_workers(workdir: Path) -> list[tuple[bytes, int, float]]:
    """(body, worker pid, wall time) of every one-way request the counting worker saw."""
    seen = []
    try:
        text = (workdir / "oneway-seen.log").read_bytes()
    except FileNotFoundError:
        return seen
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[2] == b"0":
            seen.append((parts[3], int(parts[4]), float(parts[5])))
    return seen


async def chaos(args, workdir: Path) -> dict:
    rng = random.Random(args.seed)
    rec = Recorder()
    listener = sockets.bind("127.0.0.1:0")
    port = listener.getsockname()[1]
    config_path = write_config(workdir, port)
    service = Service(workdir, config_path, listener, rec)
    alert_file = workdir / "run" / "alerts" / "Noradle-DCO-EXTHUB-QUIT"
    load = Load(
        f"127.0.0.1:{port}",
        alert_file,
        rec,
        sync_sessions=args.sessions,
        oneway_sessions=args.oneway_sessions,
        oneway_pause=args.oneway_pause,
    )
    kinds = {k: w for k, w in FAULTS.items() if not args.faults or k in args.faults}
    state = workdir / "state" if os.geteuid() == 0 else None  # on a small tmpfs: main()
    if state is None:
        kinds.pop("state full", None)
    chaos_ = Chaos(
        service,
        rec,
        rng,
        storm=args.storm,
        calm=args.calm,
        interval=args.interval,
        reload_interval=args.reload_interval,
        kinds=kinds,
        load=load,
        state=state,
        cover=args.cover,
    )
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        nursery.start_soon(load.run)
        until = time.monotonic() + args.duration
        async with trio.open_nursery() as faults:
            faults.start_soon(chaos_.faults, until)
            faults.start_soon(chaos_.reloads, until)
        chaos_.resume_all()
        # Settle: the service up again, a few seconds of calm traffic, then stop the load.
        with trio.move_on_after(TIMEOUT_STOP_SEC + 60):
            while not service.ready.is_set():
                await trio.sleep(0.05)
        await trio.sleep(2.0)
        load.stopping.set()
        ended = rec.ended = time.monotonic()
        # Every one-way request still queued reaches a worker once an instance is up: wait for it.
        with trio.move_on_after(30):
            last, stable_since = -1, time.monotonic()
            while True:
                count = len(seen_at_workers(workdir))
                if count == len(rec.oneway_sent) and count == last:
                    break
                if count != last:
                    last, stable_since = count, time.monotonic()
                elif time.monotonic() - stable_since > 5:
                    break
                await trio.sleep(0.2)
        service.stopping = True
        service.proc.send_signal(signal.SIGTERM)
    listener.close()
    returncode, output = await service.dcod("dead-letters", "list", "--json")  # no service: from the files
    if returncode == 0:
        rec.dead_letters = json.loads(output)
    else:
        rec.anomalies.append(f"dcod dead-letters list: status {returncode}: {output.strip()[-300:]}")
    left = service.leftovers()
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return report(args, rec, workdir, [f"{_role(p) or 'process'} pid {p.pid}" for p in left], ended - started)


def report(args, rec: Recorder, workdir: Path, left: list[str], elapsed: float) -> dict:
    violations: list[str] = list(rec.anomalies)
    # ---- faults
    faults = collections.Counter(f.kind for f in rec.faults)
    # ---- sync
    outcomes = collections.Counter()
    unexplained = collections.Counter()
    explained_by = collections.defaultdict(collections.Counter)
    quiet_requests = quiet_bad = 0
    samples: list[str] = []  # unexplained outcomes, to look into
    stop_during_reload = collections.Counter()
    by_fault = collections.defaultdict(list)  # (outcome, fault) -> send times relative to the fault
    faults_by_id: dict[int, Fault] = {}
    for key, r in rec.sync.items():
        outcome = r.outcome or "no answer"
        outcomes[outcome] += 1
        if outcome in ("ok", "unsent"):
            pass
        elif outcome in ("no answer", "mismatch") or outcome.startswith("other"):
            unexplained[outcome] += 1
        else:
            why = rec.explanation(outcome, r.sent, r.done or r.sent)
            if why:
                explained_by[outcome][why.kind] += 1
                by_fault[(outcome, id(why))].append(r.sent - why.at)
                faults_by_id[id(why)] = why
            elif rec.stop_during_reload(r.sent, r.done or r.sent):
                stop_during_reload[outcome] += 1
            else:
                unexplained[outcome] += 1
                samples.append(
                    f"sync {key[0]}/{key[1]} sent at {r.sent - rec.started:.3f} {outcome} at "
                    f"{(r.done or r.sent) - rec.started:.3f}"
                )
        if r.done and rec.quiet(r.sent, r.done):
            quiet_requests += 1
            quiet_bad += outcome != "ok"
    for outcome, n in unexplained.items():
        violations.append(f"sync: {n} request(s) {outcome} with no fault to explain it")
    for outcome, n in stop_during_reload.items():
        violations.append(
            f"sync: {n} request(s) {outcome} after the supervisor was stopped during a reload "
            "(the old hub generation is left unmanaged while the workers stop)"
        )
    # ---- replies nobody awaited
    late_to_lost = duplicates = duplicates_unexplained = stray = 0
    unclean = [f for f in rec.faults if f.kind == "hub SIGKILL" or (f.kind == "hub SIGSTOP" and "pmon" in f.detail)]
    worker2_killed = [f for f in rec.faults if f.kind == "worker 2 SIGKILL"]
    deliveries = poison_deliveries(workdir)
    # Each delivery of a poison request kills proxy 2's instance, as a SIGKILL would.
    worker2_killed += [Fault(0.0, wall, "handler poison", 0) for walls in deliveries.values() for wall in walls]
    for audsid, rseq, wall, _error in rec.unexpected:
        r = rec.sync.get((audsid, rseq))
        if r is None:
            stray += 1
        elif r.outcome == "lost":
            late_to_lost += 1
        else:
            duplicates += 1
            sent_wall = r.sent + rec.wall_offset
            if not any(sent_wall - 0.1 <= f.wall <= wall for f in unclean):
                duplicates_unexplained += 1
    if stray:
        violations.append(f"sync: {stray} replies for requests never sent")
    if duplicates_unexplained:
        violations.append(f"sync: {duplicates_unexplained} duplicate replies with no unclean hub death to explain them")
    # ---- one-way
    seen = seen_at_workers(workdir)
    times = collections.defaultdict(list)
    for body, _pid, wall in seen:
        times[body].append(wall)
    missing = [b for b in rec.oneway_sent if b not in times]
    missing_explained = collections.Counter()
    missing_unexplained = 0
    for body in missing:
        sent = rec.oneway_sent[body]
        why = rec.explanation("oneway missing", sent, sent + FORWARD)
        if why:
            missing_explained[why.kind] += 1
            by_fault[("one-way missing", id(why))].append(sent - why.at)
            faults_by_id[id(why)] = why
        else:
            missing_unexplained += 1
            samples.append(f"one-way {body.decode()} sent at {sent - rec.started:.3f} never seen")
    ow_duplicates = ow_dup_unexplained = 0
    for walls in times.values():
        if len(walls) > 1:
            ow_duplicates += len(walls) - 1
            first, last = min(walls), max(walls)
            # An unclean hub death replays its spool; an instance killed before its ack went out
            # gets its one-way requests sent again.
            if not any(first - 0.1 <= f.wall <= last for f in [*unclean, *worker2_killed]):
                ow_dup_unexplained += len(walls) - 1
    strangers = [b for b in times if b not in rec.oneway_sent]
    oneway_quiet_total = oneway_quiet_missing = 0
    for body, sent in rec.oneway_sent.items():
        if rec.quiet(sent, sent + FORWARD) and sent + FORWARD < rec.ended:
            oneway_quiet_total += 1
            oneway_quiet_missing += body not in times
    if missing_unexplained:
        violations.append(f"one-way: {missing_unexplained} requests never reached a worker, no fault to explain it")
    if ow_dup_unexplained:
        violations.append(
            f"one-way: {ow_dup_unexplained} duplicates with no unclean hub death or killed instance to explain them"
        )
    if strangers:
        violations.append(f"one-way: {len(strangers)} requests seen that were never sent")
    if rec.leftovers_killed:
        violations.append(
            f"processes: {len(rec.leftovers_killed)} left behind by a dead supervisor: "
            + "; ".join(rec.leftovers_killed[:5])
        )
    if left:
        violations.append(f"processes: left behind at the end: {', '.join(left)}")
    crashes = crashes_in_logs(workdir)
    for crash, n in crashes.items():
        violations.append(f"crash: {n} unhandled exception(s) in dcod processes: {crash}")
    hung = [(a, b) for a, b, _ in rec.reload_times if b - a > RELOAD_HANG]
    if hung:
        violations.append(
            f"reloads: {len(hung)} hung for more than {RELOAD_HANG:g} s (until the supervisor went "
            "away or the run's timeout): "
            + ", ".join(f"{a - rec.started:.0f}-{b - rec.started:.0f} s" for a, b in hung)
        )
    # ---- blocked handlers: each instance killed as hung, unless the supervisor was itself down
    blocks = collections.Counter(outcome for _, outcome, _ in rec.blocks)
    for fault, outcome, done in rec.blocks:
        supervisor_down = any(f.kind.startswith("supervisor") and fault.at - WINDOW <= f.at <= done for f in rec.faults)
        if outcome == "ok" and not supervisor_down:
            violations.append(
                f"handler block at {fault.at - rec.started:.2f}: answered after {done - fault.at:.1f} s, "
                "its instance not killed as hung"
            )
    # ---- poison requests: each set aside once, after POISON_AFTER deliveries; nothing else set aside
    dead = collections.Counter(d["audsid"] for d in rec.dead_letters)
    poison_missing = poison_missing_explained = 0
    for audsid, fault in rec.poison.items():
        if dead[audsid] > 1:
            violations.append(f"poison audsid {audsid}: set aside {dead[audsid]} times")
        if dead[audsid]:
            continue
        poison_missing += 1
        # Lost as any one-way request with its hub (SIGKILL before the spool had it, or while the
        # dead-letter store could not take it and it was held in memory).
        if rec.explanation("oneway missing", fault.at, rec.ended):
            poison_missing_explained += 1
        else:
            violations.append(f"poison audsid {audsid} sent at {fault.at - rec.started:.2f}: never set aside")
    innocent = [d for d in rec.dead_letters if d["audsid"] not in rec.poison]
    for d in innocent:
        # A request can meet POISON_AFTER deaths of its instance that are no fault of its own only
        # if chaos kills that instance as often (SIGKILL, or SIGSTOP until the pmon kills it).
        kills = [f for f in rec.faults if f.kind in ("worker 2 SIGKILL", "worker 2 SIGSTOP") and f.wall <= d["dead_at"]]
        if len(kills) < POISON_AFTER - 1:
            violations.append(f"dead letter of audsid {d['audsid']} (request {d['rseq']}): set aside, not poison")
    most = max((len(w) for w in deliveries.values()), default=0)
    if most > POISON_AFTER and not unclean:
        violations.append(f"a poison request delivered {most} times (poison_after {POISON_AFTER})")
    if rec.reload_failures and not faults:
        violations.append("reloads failed without any fault")
    total_faults = sum(faults.values())
    return {
        "duration": round(elapsed, 1),
        "seed": args.seed,
        "workdir": str(workdir),
        "code": code_version(),
        "faults": dict(sorted(faults.items())),
        "faults_total": total_faults,
        "hung_hubs_killed_by_pmon": rec.hung_killed["hub"],
        "hung_workers_killed_by_pmon": rec.hung_killed["worker"],
        "reloads": dict(rec.reloads),
        "reload_failures": rec.reload_failures,
        "supervisor": {
            "starts": rec.supervisor_starts,
            "exits": dict(collections.Counter(rec.supervisor_exits)),
            "leftovers_killed": rec.leftovers_killed,
            "left_at_end": left,
        },
        "sync": {
            "sent": sum(n for o, n in outcomes.items() if o != "unsent"),
            "outcomes": dict(outcomes),
            "explained_by": {k: dict(v) for k, v in explained_by.items()},
            "unexplained": dict(unexplained),
            "after_stop_during_reload": dict(stop_during_reload),
            "late_replies_to_lost": late_to_lost,
            "duplicate_replies": duplicates,
            "quiet_requests": quiet_requests,
            "quiet_not_ok": quiet_bad,
        },
        "oneway": {
            "sent": len(rec.oneway_sent),
            "unsent": rec.oneway_unsent,
            "seen": len(times),
            "missing": len(missing),
            "missing_explained_by": dict(missing_explained),
            "missing_unexplained": missing_unexplained,
            "duplicates": ow_duplicates,
            "duplicates_unexplained": ow_dup_unexplained,
            "quiet_sent": oneway_quiet_total,
            "quiet_missing": oneway_quiet_missing,
        },
        "blocked_handlers": dict(blocks),
        "poison": {
            "sent": len(rec.poison),
            "set_aside": sum(1 for a in rec.poison if dead[a]),
            "not_set_aside": poison_missing,
            "not_set_aside_explained": poison_missing_explained,
            "deliveries": dict(sorted(collections.Counter(len(w) for w in deliveries.values()).items())),
            "innocent_set_aside": len(innocent),
        },
        "crashes": crashes,
        "timeline": [
            f"{f.at - rec.started:7.2f} {time.strftime('%H:%M:%S', time.localtime(f.wall))} {f.kind} pid {f.pid}"
            + (f" ({f.detail})" if f.detail else "")
            for f in rec.faults
        ],
        "reload_times": [f"{a - rec.started:.3f}-{b - rec.started:.3f} status {rc}" for a, b, rc in rec.reload_times],
        "unexplained_samples": samples[:40],
        "by_fault": [
            f"{what}: {len(offsets)} sent {min(offsets):+.2f}..{max(offsets):+.2f} s from "
            f"{faults_by_id[fid].kind} at {faults_by_id[fid].at - rec.started:.2f} ({faults_by_id[fid].detail})"
            for (what, fid), offsets in sorted(by_fault.items(), key=lambda kv: faults_by_id[kv[0][1]].at)
        ],
        "violations": violations,
        "verdict": "FAIL" if violations else "OK",
    }


def code_version() -> str:
    """The commit of the dcod under test, and whether its working tree differs (others may be editing it)."""
    import dcod

    repo = Path(dcod.__file__).resolve().parent.parent  # may be a snapshot put first on PYTHONPATH
    if (
        repo / "COMMIT"
    ).exists():  # a snapshot: `git archive HEAD dcod | tar -x -C DIR; git rev-parse HEAD > DIR/COMMIT`
        return f"{(repo / 'COMMIT').read_text().strip()} (snapshot in {repo})"
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "dcod"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (f" + uncommitted changes to {', '.join(dirty[1::2])}" if dirty else "")


def print_report(r: dict) -> None:
    def table(title: str, rows: list[tuple]) -> None:
        print(f"\n{title}")
        width = max([len(str(a)) for a, *_ in rows] + [10])
        for name, *values in rows:
            print(f"  {str(name):<{width}}  " + "  ".join(str(v) for v in values))

    print(f"dcod chaos run: {r['duration']} s, seed {r['seed']}, {r['workdir']}")
    print(f"code under test: {r['code']}")
    fault_rows = [(k, n) for k, n in r["faults"].items()]
    fault_rows.append(("total", r["faults_total"]))
    table("faults injected", fault_rows)
    print(
        f"  (SIGSTOPped long enough for the pmon to kill them as hung: {r['hung_hubs_killed_by_pmon']} hubs, "
        f"{r['hung_workers_killed_by_pmon']} workers)"
    )
    sup = r["supervisor"]
    table(
        "supervisor (dcod run)",
        [("starts", sup["starts"])]
        + [(f"exits: {k}", n) for k, n in sup["exits"].items()]
        + [
            ("children SIGKILLed after its death", len(sup["leftovers_killed"])),
            ("processes left at the end", len(sup["left_at_end"])),
        ],
    )
    table("reloads (dcod reload)", [(k, n) for k, n in r["reloads"].items()] or [("none", 0)])
    for failure in r["reload_failures"][:10]:
        print(f"    {failure}")
    s = r["sync"]
    rows = [("sent", s["sent"])] + [(k, n) for k, n in sorted(s["outcomes"].items())]
    rows += [
        ("late replies to requests reported lost", s["late_replies_to_lost"]),
        ("duplicate replies", s["duplicate_replies"]),
        ("with no fault nearby / not ok", f"{s['quiet_requests']} / {s['quiet_not_ok']}"),
    ]
    table("sync requests (proxy 1, echo)", rows)
    for outcome, by in s["explained_by"].items():
        print(f"    {outcome} explained by: " + ", ".join(f"{k} {n}" for k, n in sorted(by.items())))
    o = r["oneway"]
    table(
        "one-way requests (proxy 2, counted at the worker)",
        [
            ("sent", o["sent"]),
            ("not sent (no hub reachable)", o["unsent"]),
            ("seen at a worker", o["seen"]),
            ("missing", o["missing"]),
            ("missing, unexplained", o["missing_unexplained"]),
            ("duplicates", o["duplicates"]),
            ("duplicates, unexplained", o["duplicates_unexplained"]),
            ("with no fault nearby / missing", f"{o['quiet_sent']} / {o['quiet_missing']}"),
        ],
    )
    if o["missing_explained_by"]:
        print(
            "    missing explained by: " + ", ".join(f"{k} {n}" for k, n in sorted(o["missing_explained_by"].items()))
        )
    p = r["poison"]
    if p["sent"]:
        table(
            "poison requests (one-way, proxy 2)",
            [
                ("sent", p["sent"]),
                ("set aside (dead letters)", p["set_aside"]),
                ("not set aside (explained)", f"{p['not_set_aside']} ({p['not_set_aside_explained']})"),
                ("deliveries: requests", ", ".join(f"{k}: {n}" for k, n in p["deliveries"].items())),
                ("other requests set aside", p["innocent_set_aside"]),
            ],
        )
    if r["blocked_handlers"]:
        table("blocked handlers (sync requests to proxy 1): answered", sorted(r["blocked_handlers"].items()))
    print()
    for v in r["violations"]:
        print(f"VIOLATION: {v}")
    print(f"verdict: {r['verdict']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--sessions", type=int, default=8, help="sync sessions (default 8)")
    parser.add_argument("--oneway-sessions", type=int, default=4, help="one-way sessions (default 4)")
    parser.add_argument("--oneway-pause", type=float, default=0.005, help="seconds between one-way sends")
    parser.add_argument("--storm", type=float, default=8.0, help="mean seconds of a storm of faults (default 8)")
    parser.add_argument("--calm", type=float, default=20.0, help="mean seconds of calm between storms (default 20)")
    parser.add_argument("--interval", type=float, default=0.8, help="mean seconds between faults in a storm")
    parser.add_argument(
        "--faults",
        type=lambda text: [k.strip() for k in text.split(",")],
        default=None,
        metavar="KIND,...",
        help="only these kinds of fault: " + ", ".join(FAULTS),
    )
    parser.add_argument("--reload-interval", type=float, default=8.0, help="mean seconds between reloads")
    parser.add_argument(
        "--cover",
        action="store_true",
        help="begin with every kind of fault once (for short runs that must exercise each)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, spool, config)")
    args = parser.parse_args(argv)
    unknown = [k for k in args.faults or () if k not in FAULTS]
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    if args.seed is None:
        args.seed = int(time.time())
    # As systemd is for its services: orphans of a killed supervisor become our children.
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    workdir = Path(tempfile.mkdtemp(prefix="dcod-chaos-"))
    with small_filesystem(workdir / "state", STATE_SIZE) if os.geteuid() == 0 else contextlib.nullcontext():
        result = trio.run(chaos, args, workdir)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["verdict"] == "OK" and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs, spool and configuration kept in {workdir}")
    return 0 if result["verdict"] == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
