"""A child process of the supervisor: launched with its sockets, watched through a pidfd.

The child gets its listening sockets at fd 3, 4, ... as systemd would pass them
(LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to its own pid by a one-line shell shim),
its end of a control socketpair after them ($DCOD_CONTROL_FD), stdin from /dev/null and
the supervisor's stdout/stderr (the journal). It runs in its own process group, so a
Ctrl-C in a terminal reaches the supervisor only, which then stops children in order.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import trio

from dcod.net import sockets
from dcod.net.channel import CONTROL_FD_VAR, Channel, ChannelError

log = logging.getLogger("dcod.supervisor")

FD_PARKING = 64  # fds are dup'ed above this first, so that dup2 onto 3, 4, ... never clobbers a source
# For a dcod an isolated python does not find: the package's directory is argv[1]; its parent goes
# first on sys.path. (The argument ends in "/dcod", as `-m dcod` does, for whoever reads `ps`.)
IMPORT_FROM = ("import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); "
               "from dcod.cli.main import main; sys.exit(main())")


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
        found = subprocess.run([sys.executable, "-I", "-c", "import dcod; print(dcod.__file__)"], text=True,
                               capture_output=True, stdin=subprocess.DEVNULL, timeout=60).stdout.strip()
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
    ``ready``, sends heartbeats with its counters, says when it is ``draining``, and answers
    commands sent with ``request()``.
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
        self.stats: dict = {}
        self.generation = 0
        self.retiring = False  # its exit is planned (rollout, stop): not a failure
        self.alerted = False  # the quit alert for its going was raised already (hubs)
        self.psutil: psutil.Process | None = None
        try:
            self.psutil = psutil.Process(pid)
        except psutil.Error:
            pass
        self._pidfd = os.pidfd_open(pid)
        self._exited = trio.Event()
        self._requests = itertools.count(1)
        self._answers: dict[int, tuple[trio.Event, list[dict]]] = {}

    @classmethod
    def start(cls, name: str, argv: list[str], passed: dict[str, socket.socket]) -> Process:
        env = sockets.child_environment(list(passed))
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
        for done, answer in self._answers.values():  # nobody is left to answer them
            answer.append({"event": "done", "error": f"{self.name} {describe_exit(self.returncode)}"})
            done.set()
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
            event = message.get("event")
            if event == "heartbeat":
                self.heartbeats += 1
                self.last_heartbeat = time.monotonic()
                self.stats = message.get("stats", {})
            elif event == "ready":
                self.ready.set()
            elif event == "draining":
                self.draining.set()
            elif event == "done" and message.get("id") in self._answers:
                done, answer = self._answers.pop(message["id"])
                answer.append(message)
                done.set()

    async def request(self, command: str, **args) -> dict:
        """Send a command; wait for the child's answer ({"event": "done", ...}), or its exit."""
        if self.returncode is not None:
            return {"event": "done", "error": f"{self.name} {describe_exit(self.returncode)}"}
        number = next(self._requests)
        done, answer = self._answers[number] = trio.Event(), []
        self.channel.send({"command": command, "id": number, **args})
        await done.wait()
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


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
