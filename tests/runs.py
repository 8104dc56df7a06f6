"""`dcod run` as a real process for tests, synchronised on its real sd_notify messages."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading

import psutil
import trio

_numbers = itertools.count()
ECHO = '[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 2\n'
DCOD = (sys.executable, "-m", "dcod")


class Run:
    """A `dcod run` process with a private NOTIFY_SOCKET, so tests wait on its real sd_notify."""

    def __init__(self, config, tmp_path, listen_socket: socket.socket | None = None, *,
                 command: tuple[str, ...] = DCOD, cwd=None, env: dict[str, str] | None = None) -> None:
        """``command`` runs dcod (e.g. its console script, or as another user), in ``cwd`` with ``env``
        added to ours."""
        self.config = config
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = tmp_path / f"notify-{next(_numbers)}.sock"
        self.notify.bind(str(notify_path))
        os.chmod(notify_path, 0o666)  # a `dcod run` as another user may send to it too
        self.notifications: list[str] = []
        self._seen = 0
        self._arrived = threading.Condition()
        threading.Thread(target=self._read_notifications, daemon=True).start()
        env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify_path)}
        argv = [*command, "run", "--config", config.source]
        pass_fds = ()
        if listen_socket is not None:
            # As systemd would: the socket at fd 3, LISTEN_PID set to the process's own pid.
            fd = listen_socket.fileno()
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES="hub")
            shim = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                    "os.execv(sys.argv[2], sys.argv[2:])")
            argv = [sys.executable, "-c", shim, str(fd), *argv]
            pass_fds = (fd,)
        self.stderr_path = notify_path.with_suffix(".log")
        self.proc = subprocess.Popen(argv, env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL, cwd=cwd,
                                     stderr=open(self.stderr_path, "wb"))

    def _read_notifications(self) -> None:
        """Read every datagram at once, as systemd does, so the supervisor never waits on us."""
        while True:
            try:
                message = self.notify.recv(4096).decode()
            except OSError:
                return
            with self._arrived:
                self.notifications.append(message)
                self._arrived.notify_all()

    async def notification(self, field: str, timeout: float = 15.0) -> str:
        """The next sd_notify message (after those already returned) containing field, e.g. "READY=1"."""
        def wait() -> str | None:
            with self._arrived:
                while True:
                    for i in range(self._seen, len(self.notifications)):
                        if field in self.notifications[i].split("\n"):
                            self._seen = i + 1
                            return self.notifications[i]
                    if not self._arrived.wait(timeout):
                        return None
        message = await trio.to_thread.run_sync(wait)
        assert message is not None, f"no {field} within {timeout}s; got {self.notifications[self._seen:]}"
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
