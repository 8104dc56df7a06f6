"""A child process of the supervisor: launched with its sockets, watched through a pidfd.

The child gets its listening sockets at fd 3, 4, ... as systemd would pass them
(LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to its own pid by a one-line shell shim),
its end of a control socketpair after them ($DCOD_CONTROL_FD), stdin from /dev/null and
the supervisor's stdout/stderr (the journal). It runs in its own process group, so a
Ctrl-C in a terminal reaches the supervisor only, which then stops children in order.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time

import trio

from dcod import sockets
from dcod.control import CONTROL_FD_VAR, Channel

FD_PARKING = 64  # fds are dup'ed above this first, so that dup2 onto 3, 4, ... never clobbers a source


class Process:
    """A running child. Someone must run ``reap()``; ``wait()`` returns the exit status
    (negative: killed by that signal)."""

    def __init__(self, name: str, pid: int, channel: Channel) -> None:
        self.name = name
        self.pid = pid
        self.channel = channel
        self.started = time.monotonic()
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._exited = trio.Event()

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

    async def wait(self) -> int:
        """The exit status, once ``reap()`` has seen the exit."""
        await self._exited.wait()
        return self.returncode

    async def stop(self, timeout: float, signum: int = signal.SIGTERM) -> int:
        """Ask the child to stop; SIGKILL it if it has not exited after ``timeout`` seconds."""
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
