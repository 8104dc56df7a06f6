"""The file backend: ``<alert_dir>/<name>`` replaced atomically with one line ``<counter> <message>``.

The bundled client (dcod.client.QuitAlert) checks it before each send. The counter only grows,
also across supervisor restarts and a wiped runtime directory: it is at least the previous
one + 1 and at least the wall time in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import trio

from dcod.config import Config
from dcod.supervisor.alert.base import AlertFailed, Backend

DIR_MODE = 0o755  # Oracle-side readers run as other users
FILE_MODE = 0o644


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def read_counter(path: Path) -> int:
    """The counter of an alert file, 0 when it is missing or not a line ``<counter> <message>``."""
    try:
        head = path.read_bytes()[:64].split(b" ", 1)[0].strip()
    except OSError:
        return 0
    return int(head) if head.isdigit() else 0


class FileBackend(Backend):
    """``<dir>/<name>`` replaced atomically (temp file in the same dir, fsync, rename) by each alert."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.counter = 0  # the last one written by this instance
        self._lock = trio.Lock()  # one write at a time, so the counter in the file only grows

    @classmethod
    def from_config(cls, config: Config) -> FileBackend:
        return cls(config.alert_file)

    def __repr__(self) -> str:
        return f"FileBackend({str(self.path)!r})"

    async def send(self, message: str) -> None:
        if "\n" in message or "\r" in message:
            raise AlertFailed("the message has a line break, the alert file holds one line")
        async with self._lock:
            # A thread: fsync may take a while on a disk, and the supervisor's loop must go on.
            self.counter = await trio.to_thread.run_sync(self._write, message)

    def _write(self, message: str) -> int:
        directory = self.path.parent
        _make_dirs(directory)
        counter = max(read_counter(self.path) + 1, self.counter + 1, _now_ms())
        data = f"{counter} {message}\n".encode()
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            try:
                os.fchmod(fd, FILE_MODE)  # mkstemp makes it 0600
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                # mtime = the counter in ms: strictly increasing, so a reader's (inode, mtime, size)
                # stamp changes with every alert even if the inode number is reused.
                with contextlib.suppress(OSError, OverflowError):
                    os.utime(fd, ns=(counter * 1_000_000, counter * 1_000_000))
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_dir(directory)
        return counter


def _make_dirs(directory: Path) -> None:
    """Create the directory and missing parents with mode 0755, whatever the umask."""
    if directory.is_dir():
        return
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DIR_MODE)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: the alert is already visible)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
