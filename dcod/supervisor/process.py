"""A child process of the supervisor: launched with its sockets, watched through a pidfd.

The child gets its listening sockets at fd 3, 4, ... as systemd would pass them
(LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to its own pid by a one-line shell shim),
its end of a control socketpair after them ($DCOD_CONTROL_FD), stdin from /dev/null and
the supervisor's stdout/stderr (the journal). It runs in its own process group, so a
Ctrl-C in a terminal reaches the supervisor only, which then stops children in order.

Hub generations end through one routine, drain_hubs(), whoever ends them: a rollout, the
service's stop, or a hub that was told to drain by someone else (SIGTERM from outside).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import psutil
import trio

from dcod.config import SupervisorConfig
from dcod.net import sockets
from dcod.net.channel import (
    CONTROL_FD_VAR,
    Channel,
    ChannelError,
    Command,
    Event,
    StatusCounts,
    command,
    done,
    event_of,
)

log = logging.getLogger("dcod.supervisor")

FD_PARKING = 64  # fds are dup'ed above this first, so that dup2 onto 3, 4, ... never clobbers a source
# For a dcod an isolated python does not find: the package's directory is argv[1]; its parent goes
# first on sys.path. (The argument ends in "/dcod", as `-m dcod` does, for whoever reads `ps`.)
IMPORT_FROM = (
    "import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); "
    "from dcod.cli.main import main; sys.exit(main())"
)


@functools.cache
def dcod_command() -> tuple[str, ...]:
    """How the supervisor starts its dcod children: this python, isolated (``-I``: neither the
    working directory nor PYTHON* variables nor the user's site packages on sys.path, where anyone
    who can write there, or set them, would have their modules imported as the service), running
    this very dcod.

    ``python -I -m dcod`` when that imports the dcod running here (installed, or an editable
    install); else (run from a checkout through PYTHONPATH, or another dcod is installed) the
    directory this one came from is given explicitly (IMPORT_FROM).
    """
    import dcod

    here = Path(dcod.__file__).resolve()
    try:
        found = subprocess.run(
            [sys.executable, "-I", "-c", "import dcod; print(dcod.__file__)"],
            text=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    if found and Path(found).resolve() == here:
        return (sys.executable, "-I", "-m", "dcod")
    log.info("the children import dcod from %s (an isolated python finds %s)", here.parent, found or "none")
    return (sys.executable, "-I", "-c", IMPORT_FROM, str(here.parent))


class Process:
    """A running child and its control channel.

    Someone must run ``reap()``, ``channel.writer()`` and ``listen()`` in tasks; ``wait()``
    returns the exit status (negative: killed by that signal). The child tells us when it is
    ``ready``, sends heartbeats with its counts (``counts``, its row in `dcod status`) and its own
    detail (``stats``), says when it is ``draining``, and answers commands sent with ``request()``.
    """

    def __init__(self, name: str, pid: int, channel: Channel) -> None:
        self.name = name
        self.pid = pid
        self.channel = channel
        self.started = time.monotonic()
        self.returncode: int | None = None
        self.ready = trio.Event()
        self.draining = trio.Event()
        self.last_heartbeat = self.started
        self.heartbeats = 0
        self.counts = StatusCounts()
        self.stats: dict = {}
        self.version: str | None = None  # of dcod, as its heartbeats say (none: a foreign worker)
        self.generation = 0
        self.retiring = False  # its exit is planned (rollout, stop): not a failure
        self.alerted = False  # the quit alert for its going was raised already (hubs)
        self.hung = False  # the pmon killed it: its heartbeats stopped
        self.psutil: psutil.Process | None = None
        try:
            self.psutil = psutil.Process(pid)
        except psutil.Error:
            pass
        self._pidfd = os.pidfd_open(pid)
        self._exited = trio.Event()
        self.last_request = 0  # the number of the latest command sent with request(); an image of the
        # supervisor that takes this child over goes on from it, so that no answer is taken for another's
        self._answers: dict[int, tuple[trio.Event, list[dict]]] = {}

    @classmethod
    def start(
        cls, name: str, argv: list[str], passed: dict[str, socket.socket], env: dict[str, str] | None = None
    ) -> Process:
        """Start ``argv`` with the ``passed`` sockets and ``env`` added to our environment."""
        env = {**sockets.child_environment(list(passed)), **(env or {})}
        ours, theirs = socket.socketpair()
        env[CONTROL_FD_VAR] = str(sockets.SD_LISTEN_FDS_START + len(passed))
        parked = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, FD_PARKING) for s in [*passed.values(), theirs]]
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, sockets.SD_LISTEN_FDS_START + i) for i, fd in enumerate(parked)]
        argv = sockets.LISTEN_PID_SHIM + argv
        try:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setpgroup=0)
        finally:
            for fd in parked:
                os.close(fd)
            theirs.close()
        return cls(name, pid, Channel(ours, name))

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    async def reap(self) -> None:
        """Run this in a task from start(): waits for the exit and reaps the child."""
        await trio.lowlevel.wait_readable(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)
        self._exited.set()
        for answered, answer in self._answers.values():  # nobody is left to answer them
            answer.append(done(None, f"{self.name} {describe_exit(self.returncode)}"))
            answered.set()
        self._answers.clear()

    async def listen(self) -> None:
        """Read the child's messages until its channel ends."""
        while True:
            try:
                message = await self.channel.receive()
            except ChannelError as e:
                log.warning("%s: %s", self.name, e)
                return
            if message is None:
                return
            event = event_of(message)
            if event == Event.HEARTBEAT:
                self.heartbeats += 1
                self.last_heartbeat = time.monotonic()
                self.counts = StatusCounts.of(message)
                self.stats = message.get("stats", {})
                self.version = message.get("version")
            elif event == Event.READY:
                self.ready.set()
            elif event == Event.DRAINING:
                self.draining.set()
            elif event == Event.DONE and message.get("id") in self._answers:
                answered, answer = self._answers.pop(message["id"])
                answer.append(message)
                answered.set()

    async def request(self, name: Command, **args) -> dict:
        """Send a command; wait for the child's answer (Event.DONE, with "error" if it failed), or its exit."""
        if self.returncode is not None:
            return done(None, f"{self.name} {describe_exit(self.returncode)}")
        self.last_request = number = self.last_request + 1
        answered, answer = self._answers[number] = trio.Event(), []
        self.channel.send(command(name, id=number, **args))
        await answered.wait()
        return answer[0]

    async def wait(self) -> int:
        """The exit status, once ``reap()`` has seen the exit."""
        await self._exited.wait()
        return self.returncode

    async def stop(self, timeout: float, signum: int | None = signal.SIGTERM) -> int:
        """Send ``signum`` (None: it was asked already); SIGKILL it if it has not exited after ``timeout``."""
        if signum is not None:
            self.send_signal(signum)
        with trio.move_on_after(timeout):
            return await self.wait()
        self.send_signal(signal.SIGKILL)
        return await self.wait()


async def drain_hubs(
    hubs: Iterable[Process], alert: Callable[[], Awaitable[None]], limits: SupervisorConfig, removed: Iterable[int] = ()
) -> dict[Process, int]:
    """End hub generations without losing a request; the exit status of each that was running.

    Each is told to drain (one draining already goes on as it was), and which proxies a reload
    ``removed`` (it answers the sync requests queued for them at once), and gets stop_timeout to
    close its listener and say so. Then ``alert()``, once for them all: the quit alert sends
    their sessions elsewhere, and a session that reconnects reaches only a hub that listens.
    Each then gets drain_timeout + stop_timeout to answer what it has and exit; past that, SIGKILL.
    """
    hubs = [hub for hub in hubs if hub.running]
    if not hubs:
        return {}
    for hub in hubs:
        hub.alerted = True  # from now on: neither the pmon nor its exit raises the alert again
        hub.channel.send(command(Command.DRAIN, removed=list(removed)))
    with trio.move_on_after(limits.stop_timeout):
        for hub in hubs:
            await hub.draining.wait()
    await alert()
    exits: dict[Process, int] = {}

    async def drained(hub: Process) -> None:
        exits[hub] = await hub.stop(limits.drain_timeout + limits.stop_timeout, signum=None)

    async with trio.open_nursery() as nursery:
        for hub in hubs:
            nursery.start_soon(drained, hub)
    return exits


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
