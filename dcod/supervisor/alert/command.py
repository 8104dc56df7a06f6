"""The command backend: runs ``alert.command + [name, message]``; a non-zero exit or a timeout fails."""

from __future__ import annotations

import contextlib
import logging
import os
import signal as signals
import subprocess
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from dcod.config import Config
from dcod.supervisor.alert.base import AlertFailed, Backend, invalid

log = logging.getLogger("dcod.supervisor.alert")

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for an alert command past its timeout
OUTPUT_LINES_MAX = 100  # lines of an alert command's output logged per stream and run
OUTPUT_LINE_MAX = 1000  # characters logged of one line


class CommandBackend(Backend):
    """Runs ``command + [name, message]``; output goes to the log, a non-zero exit or a timeout fails.

    The command runs in a session (process group) of its own: past the timeout the whole
    group gets SIGTERM, then SIGKILL after KILL_GRACE seconds.
    """

    kind = "command"

    def __init__(self, name: str, command: Sequence[str], timeout: float) -> None:
        self.name = name
        self.command = list(command)
        self.timeout = timeout

    @classmethod
    def check(cls, config: Config, listed: bool) -> None:
        if config.alert.command_timeout <= 0:
            raise invalid(config, "alert.command_timeout", "must be > 0")
        if listed and not config.alert.command:
            raise invalid(config, "alert.command", "needed by the command backend")

    @classmethod
    def from_config(cls, config: Config) -> CommandBackend:
        return cls(config.alert.name, config.alert.command, config.alert.command_timeout)

    def __repr__(self) -> str:
        return f"CommandBackend({self.command!r}, timeout={self.timeout})"

    async def send(self, message: str) -> None:
        argv = [*self.command, self.name, message]
        killed = False
        last_error_line: list[str] = []  # the last line the command wrote to stderr

        async def kill(proc: trio.Process) -> None:
            nonlocal killed
            killed = True
            log.warning("alert command %s still running after %g s: killing it", self.command[0], self.timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signals.SIGTERM)
            await trio.sleep(KILL_GRACE)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signals.SIGKILL)

        proc: trio.Process | None = None
        with trio.move_on_after(self.timeout) as deadline:
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(
                    partial(
                        trio.run_process,
                        argv,
                        check=False,
                        deliver_cancel=kill,
                        start_new_session=True,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                )
                nursery.start_soon(self._log_output, proc.stdout, "stdout", None)
                nursery.start_soon(self._log_output, proc.stderr, "stderr", last_error_line)
        if proc is None:
            raise AlertFailed(f"could not start {self.command[0]} within {self.timeout:g} s")
        if killed:
            raise AlertFailed(f"still running after {self.timeout:g} s (alert.command_timeout): killed")
        if deadline.cancelled_caught:
            log.warning(
                "alert command %s exited, but its output stayed open past %g s (a background child?)",
                self.command[0],
                self.timeout,
            )
        status = proc.returncode
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            raise AlertFailed(f"{how}: {last_error_line[0]}" if last_error_line else how)

    async def _log_output(self, stream: Any, label: str, last_line: list[str] | None) -> None:
        logged = 0

        def emit(raw: bytes) -> None:
            nonlocal logged
            text = raw.decode(errors="replace").rstrip()
            if not text:
                return
            if last_line is not None:
                last_line[:] = [text[:OUTPUT_LINE_MAX]]
            logged += 1
            if logged <= OUTPUT_LINES_MAX:
                level = logging.WARNING if label == "stderr" else logging.INFO
                log.log(level, "alert command %s %s: %s", self.command[0], label, text[:OUTPUT_LINE_MAX])
            elif logged == OUTPUT_LINES_MAX + 1:
                log.warning("alert command %s %s: more output not logged", self.command[0], label)

        buffer = b""
        async with stream:
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    emit(line)
                if len(buffer) > 64 * 1024:  # a very long line: log what came so far
                    emit(buffer)
                    buffer = b""
        emit(buffer)
