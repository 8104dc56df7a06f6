"""`dcod run` as a real process for tests, synchronised on its real sd_notify messages."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys

import psutil

from dcod.bench.target import NotifySocket, socket_activated

_numbers = itertools.count()
ECHO = '[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 2\n'
DCOD = (sys.executable, "-m", "dcod")


def dcod_worker_command(config_path, listen: str, proxy: int = 1) -> list[str]:
    """`dcod worker` of ``proxy`` on the TCP address ``listen``, run by hand (no supervisor), as a
    Noradle hub or a test peer connects to it."""
    return [*DCOD, "worker", "--config", str(config_path), "--proxy", str(proxy), "--listen", listen]


class Run:
    """A `dcod run` process with a private NOTIFY_SOCKET, so tests wait on its real sd_notify."""

    def __init__(
        self,
        config,
        tmp_path,
        listen_socket: socket.socket | None = None,
        *,
        command: tuple[str, ...] = DCOD,
        cwd=None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``command`` runs dcod (e.g. its console script, or as another user), in ``cwd`` with ``env``
        added to ours."""
        self.config = config
        notify_path = tmp_path / f"notify-{next(_numbers)}.sock"
        self.notify = NotifySocket(notify_path)
        os.chmod(notify_path, 0o666)  # a `dcod run` as another user may send to it too
        env = {**os.environ, **(env or {}), **self.notify.env}
        argv = [*command, "run", "--config", config.source]
        options = {"env": env}
        if listen_socket is not None:
            argv, options = socket_activated(argv, listen_socket, env)
        self.stderr_path = notify_path.with_suffix(".log")
        self.proc = subprocess.Popen(
            argv, **options, stdin=subprocess.DEVNULL, cwd=cwd, stderr=open(self.stderr_path, "wb")
        )

    async def notification(self, field: str, timeout: float = 15.0) -> str:
        """The next sd_notify message (after those already returned) containing field, e.g. "READY=1"."""
        message = await self.notify.notification(field, timeout)
        assert message is not None, f"no {field} within {timeout}s; got {self.notify.messages}"
        return message

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def children_with(self, role: str) -> list[psutil.Process]:
        """Living children whose command line contains role (one may exit while we look)."""
        found = []
        for c in self.children():
            try:
                if role in " ".join(c.cmdline()):
                    found.append(c)
            except psutil.Error:
                pass
        return found

    @property
    def log(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)
