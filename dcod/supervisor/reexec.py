"""Upgrading in place (`dcod reload --upgrade`): the supervisor re-executes itself on the dcod
installed now, keeping its pid, then rolls out (docs/ARCHITECTURE.md, section 4.1).

As nginx's binary upgrade or systemd's daemon-reexec do: the supervisor is systemd's MainPID and
every child's parent, and an exec changes neither, so systemd sees a reload, not a restart, and
the children need no new parent. What the next image must take over is described in JSON (the
*hand-over*) in a memfd named by ``$DCOD_HANDOVER_FD``: the listening sockets (the hub's, each
worker instance's, the control socket, the metrics endpoint's), the directory locks, each child
(pid, its end of the channel and what was read of its next message, generation, readiness,
counters), each slot's history, the configuration in effect, and the control connection that
asked; those fds stay open across the exec. The next image adopts them (a child remains ours:
its pidfd opens and it is reaped as before), answers that connection, and runs the rollout,
which replaces the hub and every worker instance as `dcod reload` does: everything then runs
the new code.

Before it execs, the supervisor checks that the new code can take over: the exact command it is
about to exec runs with ``$DCOD_HANDOVER_CHECK`` and a copy of the hand-over, imports the
supervisor, loads the configuration and reads the hand-over, and exits. If that fails, nothing
changes and the running image goes on. It also waits until no child is between two states (a
hub draining, a process being killed, a slot restarting one, a quit alert being raised), so
that what it hands over is only running processes. A failure after the exec (which the check
makes unlikely) ends the process: the children stop when their channel ends, and systemd
restarts the service (Restart=on-failure), as after a crash.

SIGTERM, SIGINT and SIGHUP are blocked across the exec (the mask and pending signals survive it),
so that one sent meanwhile is taken by the next image, not by the default action.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from dcod import __version__
from dcod import config as configuration
from dcod.config import Config
from dcod.net.channel import Channel, StatusCounts
from dcod.net.connection import ConnectionClosed
from dcod.supervisor import control, rundir
from dcod.supervisor.process import Process, dcod_command
from dcod.supervisor.rollout import RolloutError
from dcod.supervisor.slot import LastExit, Slot

if TYPE_CHECKING:
    from dcod.supervisor.supervisor import Supervisor

log = logging.getLogger("dcod.supervisor")

HANDOVER_VAR = "DCOD_HANDOVER_FD"  # the memfd holding the hand-over, in the next image's environment
CHECK_VAR = "DCOD_HANDOVER_CHECK"  # set: only check that this dcod can take the hand-over over, then exit
FORMAT = 1  # of the hand-over; a next image that does not know it refuses in the check
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # the supervisor's: blocked across the exec
SETTLE_REPORT_INTERVAL = 1.0  # seconds between the reports of what the upgrade waits for
CHECK_OUTPUT_LINES = 5  # of a failed check's stderr, in the answer
CHECK_UNREADABLE = 4  # the check's exit status when the new dcod cannot read the hand-over


class UpgradeRefused(Exception):
    """The upgrade did not happen: the running image goes on, as it was. ``restart``: it cannot happen
    in place, but a restart would run the new code (the hub is down; the new dcod cannot read the
    hand-over)."""

    def __init__(self, message: str, *, restart: bool = False) -> None:
        super().__init__(message)
        self.restart = restart


# ---------------------------------------------------------------- the hand-over
# One set of classes for both images: the JSON is asdict() of them, read back by of(), which fails
# (in the check, before the exec) on a field missing or unknown. A field added later needs a default.


@dataclasses.dataclass(frozen=True)
class ProcessState:
    """A running child: what its Process was."""

    name: str
    pid: int
    channel: int | None  # our end of its channel (None in the check's copy)
    buffered: str  # base64: what was read of its next message
    generation: int
    started: float  # time.monotonic(), which goes on across the exec
    ready: bool
    heartbeats: int
    last_request: int
    counts: StatusCounts
    stats: dict[str, Any]
    version: str | None

    @classmethod
    def of(cls, data: dict[str, Any]) -> ProcessState:
        return cls(**{**data, "counts": StatusCounts(**data["counts"])})


@dataclasses.dataclass(frozen=True)
class SlotState:
    """A slot: how it starts its process, its history, and its process if one runs."""

    name: str
    argv: list[str]
    proxy: int | None
    instance: int | None
    passed: dict[str, int | None]  # its listening sockets, by name
    generation: int
    state: str
    restarts: int
    failures: list[float]
    last_exit: LastExit | None
    held: bool
    process: ProcessState | None

    @classmethod
    def of(cls, data: dict[str, Any]) -> SlotState:
        last_exit, process = data["last_exit"], data["process"]
        return cls(
            **{
                **data,
                "last_exit": LastExit(**last_exit) if last_exit is not None else None,
                "process": ProcessState.of(process) if process is not None else None,
            }
        )


@dataclasses.dataclass(frozen=True)
class State:
    """All the next image takes over."""

    format: int
    version: str  # of the dcod that wrote it
    config: str  # the configuration in effect, dumped
    source: str  # where it came from: the file a rollout reads again
    started: float  # the supervisor's first start, time.monotonic()
    reexecs: int
    exec_at: float  # time.monotonic() just before the exec
    control: int | None  # the listening sockets: the control socket's, the metrics endpoint's
    metrics: int | None
    locks: list[int]  # rundir.Claim
    client: int | None  # the control connection that asked for the upgrade
    last_rollout: dict[str, Any] | None
    alerts: dict[str, dict[str, Any]]
    hub: SlotState
    workers: list[SlotState]

    @classmethod
    def of(cls, data: dict[str, Any]) -> State:
        if data.get("format") != FORMAT:
            raise ValueError(f"a hand-over of format {data.get('format')!r}; this dcod reads format {FORMAT}")
        try:
            return cls(
                **{**data, "hub": SlotState.of(data["hub"]), "workers": [SlotState.of(w) for w in data["workers"]]}
            )
        except (TypeError, KeyError) as e:
            raise ValueError(f"a hand-over this dcod does not read: {e}") from None

    def fds(self) -> list[int]:
        """Every fd it names."""
        slots = [self.hub, *self.workers]
        fds = [self.control, self.metrics, self.client, *self.locks]
        fds += [fd for s in slots for fd in s.passed.values()]
        fds += [s.process.channel for s in slots if s.process is not None]
        return [fd for fd in fds if fd is not None]


# ---------------------------------------------------------------- the running image


async def upgrade(sup: Supervisor, reply: Callable[[dict], None]) -> None:
    """The control command `upgrade`: check the dcod installed now, wait until every child is
    settled, then exec it with the hand-over. Answers only if it does not happen: after the exec,
    the next image answers on the same connection."""
    client = control.current_client.get()

    def step(line: str) -> None:
        log.info("upgrade: %s", line)
        sup.notify(f"STATUS=upgrade: {line}")
        reply({"progress": line})

    try:
        if sup.stopping:
            raise UpgradeRefused("the service is stopping")
        if sup.rollout_lock.locked():
            raise UpgradeRefused("a rollout is running; try again when it is done")
        if sup.hub.state == "failed":
            raise UpgradeRefused("the hub is down (failed)", restart=True)
        async with sup.rollout_lock:  # held to the exec: no rollout starts meanwhile
            step(f"supervisor (pid {os.getpid()}, dcod {__version__}): checking the dcod installed now")
            version = await _check(sup, _handover(sup, client, fds=False))
            step(f"dcod {version} can take over; waiting until every process is settled")
            await _settle(sup, step)
            step(f"supervisor (pid {os.getpid()}) re-executing: dcod {__version__} -> {version}")
            sup.notify_reloading("WATCHDOG=1")
            try:
                await _flush(sup, client)
                if sup.stopping or _unsettled(sup):  # while it flushed
                    raise UpgradeRefused("the service changed state at the last moment; try again")
                _exec(_handover(sup, client, fds=True))  # returns only by raising: the exec failed
            finally:
                sup.notify("READY=1", f"STATUS={sup.status_line()}")
    except UpgradeRefused as e:
        log.error("upgrade refused: %s", e)
        reply({"ok": False, "error": f"{e}; nothing changed: dcod {__version__} goes on serving", "restart": e.restart})


async def _check(sup: Supervisor, handover: State) -> str:
    """The version of dcod the exec would run, once it has shown it can take ``handover`` over."""
    fd = _memfd(handover)
    try:
        with trio.move_on_after(sup.config.supervisor.ready_timeout) as timer:
            result = await trio.run_process(
                _argv(),
                env={**os.environ, CHECK_VAR: "1", HANDOVER_VAR: str(fd)},
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except OSError as e:
        raise UpgradeRefused(f"the dcod installed now cannot be started ({' '.join(_argv())}): {e}") from None
    finally:
        os.close(fd)
    if timer.cancelled_caught:
        raise UpgradeRefused(f"the dcod installed now did not answer within {sup.config.supervisor.ready_timeout:g}s")
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().splitlines()[-CHECK_OUTPUT_LINES:]
        raise UpgradeRefused(
            f"the dcod installed now cannot take over (exit status {result.returncode}): " + " / ".join(said),
            restart=result.returncode == CHECK_UNREADABLE,
        )
    return result.stdout.decode(errors="replace").strip() or "unknown"


def _unsettled(sup: Supervisor) -> list[str]:
    """What is between two states; the hand-over describes running processes only."""
    found = []
    for slot in sup.slots:
        for p in slot.alive:
            if p is not slot.process or p.retiring or p.hung or p.draining.is_set():
                found.append(f"{p.name} generation {p.generation} (pid {p.pid}) to exit")
        if slot.state == "backoff":
            found.append(f"{slot.name} to be restarted")
    if sup.alerter.sending:
        found.append("the quit alert to be raised")
    return found


async def _settle(sup: Supervisor, step: Callable[[str], None]) -> None:
    """Wait until nothing is _unsettled(), reporting what it waits for; UpgradeRefused after long
    enough for a hub to drain and a process to be stopped, or if the service is stopping."""
    limits = sup.config.supervisor
    timeout = limits.drain_timeout + 2 * limits.stop_timeout
    give_up = trio.current_time() + timeout
    report = trio.current_time() + SETTLE_REPORT_INTERVAL
    while unsettled := _unsettled(sup):
        now = trio.current_time()
        if now >= give_up:
            raise UpgradeRefused(f"still waiting after {timeout:g}s for " + ", ".join(unsettled))
        if now >= report:
            step("waiting for " + ", ".join(unsettled))
            report = now + SETTLE_REPORT_INTERVAL
        await trio.sleep(0.05)  # slots change state on several events; cheap to look
    if sup.stopping:
        raise UpgradeRefused("the service is stopping")


async def _flush(sup: Supervisor, client: Channel) -> None:
    """Every byte queued for a child, the client or systemd is written before the exec."""
    channels = [slot.process.channel for slot in sup.slots if slot.process is not None and slot.process.running]
    for channel in [*channels, client]:
        with contextlib.suppress(ConnectionClosed):  # a child exiting: its pidfd says so to the next image
            await channel.conn.flush()
    await sup.notifier.flush()


def _handover(sup: Supervisor, client: Channel, *, fds: bool) -> State:
    """What the next image takes over. With ``fds`` false, a copy for the check (no fd is passed)."""

    def fd(sock: socket.socket | None) -> int | None:
        return sock.fileno() if fds and sock is not None and sock.fileno() >= 0 else None  # -1: a client gone

    def process(p: Process | None) -> ProcessState | None:
        if p is None or not p.running:
            return None
        return ProcessState(
            name=p.name,
            pid=p.pid,
            channel=fd(p.channel.conn.sock),
            buffered=base64.b64encode(p.channel.buffered).decode(),
            generation=p.generation,
            started=p.started,
            ready=p.ready.is_set(),
            heartbeats=p.heartbeats,
            last_request=p.last_request,
            counts=p.counts,
            stats=p.stats,
            version=p.version,
        )

    def slot(s: Slot) -> SlotState:
        return SlotState(
            name=s.name,
            argv=s.argv,
            proxy=s.proxy_id,
            instance=s.instance,
            passed={name: fd(sock) for name, sock in s.passed.items()},
            generation=s.generation,
            state=s.state,
            restarts=s.restarts,
            failures=s.failures,
            last_exit=s.last_exit,
            held=s.held,
            process=process(s.process),
        )

    return State(
        format=FORMAT,
        version=__version__,
        config=configuration.dump(sup.config),
        source=sup.config.source,
        started=sup.started,
        reexecs=sup.reexecs,
        exec_at=time.monotonic(),
        control=fd(sup.control_listener),
        metrics=fd(sup.metrics_listener),
        locks=sup.claim.fds if fds and sup.claim is not None else [],
        client=fd(client.conn.sock),
        last_rollout=sup.last_rollout,
        alerts=sup.alerter.stats(),
        hub=slot(sup.hub),
        workers=[slot(s) for s in sup.workers.values()],
    )


def _argv() -> list[str]:
    """This supervisor's command line, run by the dcod installed now, as its children are."""
    return [*dcod_command(), *sys.argv[1:]]


def _memfd(handover: State) -> int:
    fd = os.memfd_create("dcod-handover")
    data = json.dumps(dataclasses.asdict(handover)).encode()
    while data:
        data = data[os.write(fd, data) :]
    return fd


def _exec(handover: State) -> None:
    """Exec the next image with ``handover``; if the exec fails, undo and raise UpgradeRefused."""
    memfd = _memfd(handover)
    passed = [*handover.fds(), memfd]
    argv = _argv()
    for fd in passed:
        os.set_inheritable(fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        os.execve(argv[0], argv, {**os.environ, HANDOVER_VAR: str(memfd)})
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        for fd in passed:
            os.set_inheritable(fd, False)
        os.close(memfd)
        raise UpgradeRefused(f"cannot execute {argv[0]}: {e.strerror}") from None


# ---------------------------------------------------------------- the next image


def unblock_signals() -> None:
    """Take the signals blocked across the exec (call once they are received: trio.open_signal_receiver)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class Handover:
    """What the previous image of this supervisor left to take over (see the module's docstring)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.took = time.monotonic() - state.exec_at  # CLOCK_MONOTONIC goes on across the exec

    @classmethod
    def received(cls) -> Handover | None:
        """The hand-over this process was exec'ed with, if it was (ValueError if it cannot be read)."""
        fd = os.environ.pop(HANDOVER_VAR, None)
        if fd is None:
            return None
        try:
            with os.fdopen(int(fd), "rb") as file:
                file.seek(0)
                return cls(State.of(json.load(file)))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the hand-over of the previous image (${HANDOVER_VAR}={fd}): {e}") from None

    def config(self, from_file: Config) -> Config:
        """The configuration the previous image ran (the rollout then reads the file again), or, if this
        dcod does not take it, the one the file says now."""
        try:
            return configuration.parse(self.state.config, self.state.source)
        except configuration.ConfigError as e:
            log.warning("the configuration in effect does not load here (%s): taking %s as it is", e, from_file.source)
            return from_file

    def hub_listener(self) -> socket.socket:
        return _socket(self.state.hub.passed["hub"])

    def control_listener(self) -> socket.socket:
        return _socket(self.state.control)

    def metrics_listener(self) -> socket.socket | None:
        return _socket(self.state.metrics) if self.state.metrics is not None else None

    def claim(self) -> rundir.Claim:
        claim = rundir.Claim()
        claim.fds = list(self.state.locks)
        return claim

    def adopt(self, sup: Supervisor) -> None:
        """The previous image's state and children, now the supervisor's (in its nursery)."""
        state = self.state
        sup.started = state.started
        sup.reexecs = state.reexecs + 1
        sup.last_reexec = time.time()
        sup.last_rollout = state.last_rollout
        sup.alerter.restore(state.alerts)
        for fd in state.fds():  # our children inherit what they are given, nothing else
            os.set_inheritable(fd, False)
        _restore(sup.hub, state.hub)
        for saved in state.workers:
            assert saved.proxy is not None and saved.instance is not None  # a worker's slot
            passed = {name: _socket(fd) for name, fd in saved.passed.items()}
            slot = Slot(sup, saved.name, saved.argv, passed, saved.proxy, saved.instance)
            sup.workers[saved.proxy, saved.instance] = slot
            _restore(slot, saved)

    async def finish(self, sup: Supervisor, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The rollout that brings the new code to the hub and the workers; its steps and outcome to
        the client that asked. Started (task_status) once it holds the rollout lock."""
        fd = self.state.client
        client = Channel(_socket(fd), "control client (upgrade)") if fd is not None else None

        def step(line: str) -> None:
            log.info("upgrade: %s", line)
            if client is not None:
                client.send({"progress": line})

        async with trio.open_nursery() as nursery:
            if client is not None:
                nursery.start_soon(client.writer)
            adopted = [
                f"{s.name} generation {s.process.generation} (pid {s.process.pid})"
                for s in sup.slots
                if s.process is not None and s.process.running
            ]
            step(
                f"supervisor (pid {os.getpid()}) runs dcod {__version__} (was {self.state.version}), "
                f"re-executed in {self.took:.2f}s; took over {', '.join(adopted) or 'no process'}"
            )
            try:
                await sup.rollout(step, task_status=task_status)
                answer: dict = {"ok": True}
            except RolloutError as e:
                log.error("upgrade: the rollout failed: %s", e)
                answer = {"ok": False, "error": f"the supervisor runs dcod {__version__}, but the rollout failed: {e}"}
            if client is not None:
                client.send(answer)
                with contextlib.suppress(ConnectionClosed):
                    await client.conn.flush()
                client.close()
            nursery.cancel_scope.cancel()


def _socket(fd: int | None) -> socket.socket:
    if fd is None:
        raise ValueError("the hand-over names no fd for a socket that must be there")
    return socket.socket(fileno=fd)


def _restore(slot: Slot, saved: SlotState) -> None:
    slot.generation = saved.generation
    slot.state = saved.state
    slot.restarts = saved.restarts
    slot.failures = list(saved.failures)
    slot.last_exit = saved.last_exit
    slot.held = saved.held
    slot.argv = saved.argv
    p = saved.process
    if p is None:  # a worker instance left down (failed): the rollout starts it again
        return
    process = Process(p.name, p.pid, Channel(_socket(p.channel), p.name, base64.b64decode(p.buffered)))
    process.generation = p.generation
    process.started = p.started
    process.heartbeats = p.heartbeats  # last_heartbeat is now: the exec's pause is not the child's silence
    process.last_request = p.last_request
    process.counts = p.counts
    process.stats = p.stats
    process.version = p.version
    if p.ready:
        process.ready.set()
    slot.adopt(process)


def check(from_file: Config) -> int:
    """`dcod run` with $DCOD_HANDOVER_CHECK: whether this dcod can take over the hand-over it is given,
    touching nothing; prints its version. The previous image execs it only if this exits 0."""
    try:
        handover = Handover.received()
    except ValueError as e:
        log.error("%s", e)
        return CHECK_UNREADABLE
    if handover is None:
        log.error("no hand-over to check ($%s)", HANDOVER_VAR)
        return CHECK_UNREADABLE
    handover.config(from_file)
    dcod_command()  # how the children will be started: it must find this dcod
    print(__version__)
    return 0
