"""The quit alert (DESIGN §5): tell Oracle sessions that a hub is going away.

The supervisor raises the alert ``Noradle-DCO-EXTHUB-QUIT`` with the hub's advertised
``host:port`` as message whenever a hub goes away (rollout drain, crash, hang); sessions on
that hub read the replies it still owes them and reconnect. An Alerter raises it on every
configured backend at once:

- ``file``: ``<alert_dir>/<name>`` is replaced atomically with one line ``<counter> <message>``,
  which the bundled client (dcod.client.QuitAlert) checks before each send. The counter only
  grows, also across supervisor restarts and a wiped runtime directory: it is at least the
  previous one + 1 and at least the wall time in milliseconds.
- ``command``: runs ``alert.command + [name, message]``; a non-zero exit or a timeout fails.
- ``oracle``: ``DBMS_ALERT.SIGNAL(name, message)`` and COMMIT through python-oracledb (thin
  mode), on a connection kept open and re-opened once per signal when it broke.

A failing backend never stops the others and never raises out of ``signal``: it is logged
(logger ``dcod.supervisor.alert``, warning) and counted in ``stats()`` for ``dcod status``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import signal as signals
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import trio

from dcod.config import ORACLEDB_MISSING, Config, ConfigError, credential_name

log = logging.getLogger("dcod.supervisor.alert")

DIR_MODE = 0o755  # Oracle-side readers run as other users
FILE_MODE = 0o644
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for an alert command past its timeout
OUTPUT_LINES_MAX = 100  # lines of an alert command's output logged per stream and run
OUTPUT_LINE_MAX = 1000  # characters logged of one line


class AlertFailed(Exception):
    """A backend could not raise the alert; the message is the reason, for the log and `dcod status`."""


@dataclass
class BackendStats:
    sent: int = 0
    failed: int = 0
    last_error: str | None = None
    last_sent: float | None = None  # wall time (time.time())
    last_failed: float | None = None


class Backend:
    """One way of raising the alert. ``send`` raises on failure; the Alerter logs and counts it."""

    kind = ""

    async def send(self, message: str) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


# ---------------------------------------------------------------- the file backend


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
                    view = view[os.write(fd, view):]
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


# ---------------------------------------------------------------- the command backend


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
                proc = await nursery.start(partial(
                    trio.run_process, argv, check=False, deliver_cancel=kill, start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                nursery.start_soon(self._log_output, proc.stdout, "stdout", None)
                nursery.start_soon(self._log_output, proc.stderr, "stderr", last_error_line)
        if proc is None:
            raise AlertFailed(f"could not start {self.command[0]} within {self.timeout:g} s")
        if killed:
            raise AlertFailed(f"still running after {self.timeout:g} s (alert.command_timeout): killed")
        if deadline.cancelled_caught:
            log.warning("alert command %s exited, but its output stayed open past %g s (a background child?)",
                        self.command[0], self.timeout)
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


# ---------------------------------------------------------------- the oracle backend


def import_oracledb(source: str = "") -> Any:
    """python-oracledb, imported on first need (the optional extra dcod[oracle]); ConfigError if missing."""
    prefix = f"{source}: " if source else ""
    try:
        return importlib.import_module("oracledb")
    except ImportError as e:
        if e.name == "oracledb":
            raise ConfigError(f"{prefix}alert.backends: {ORACLEDB_MISSING}") from None
        raise ConfigError(f"{prefix}alert.backends: python-oracledb cannot be imported: {e}") from None


class OracleBackend(Backend):
    """``DBMS_ALERT.SIGNAL(name, message)`` + COMMIT through python-oracledb in thin mode.

    One connection, opened at the first alert and kept; when a call on it fails it is
    closed, re-opened and the alert tried once more. oracledb blocks, so a signal runs in a
    worker thread, one at a time. ``timeout`` bounds the TCP connect and every round trip;
    a signal that still has no answer after twice that (a database that accepts and then
    hangs) fails, and its thread is abandoned: it closes whatever connection it ends with.
    The password is read from its file at each connect and kept nowhere.
    """

    kind = "oracle"

    def __init__(self, oracledb: Any, name: str, dsn: str, user: str, password_file: str, timeout: float) -> None:
        self.oracledb = oracledb
        self.name = name
        self.dsn = dsn
        self.user = user
        self.password_file = password_file
        self.timeout = timeout
        self._connection: Any = None  # the kept one; a thread takes it while it signals
        self._guard = threading.Lock()  # over _connection and _closed, between threads
        self._closed = False
        self._lock = trio.Lock()  # one signal at a time

    def __repr__(self) -> str:
        return f"OracleBackend({self.user}@{self.dsn})"

    async def send(self, message: str) -> None:
        async with self._lock:
            attempt = _Attempt()
            with trio.move_on_after(2 * self.timeout) as deadline:
                await _run_sync_abandoning(self._signal, message, attempt)
            if deadline.cancelled_caught:
                attempt.abandoned = True
                raise AlertFailed(f"no answer from {self.dsn} within {2 * self.timeout:g} s (2 x alert.oracle_timeout)")

    async def aclose(self) -> None:
        with self._guard:
            self._closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            await trio.to_thread.run_sync(_close_quietly, connection)
        else:
            await trio.lowlevel.checkpoint()

    def _signal(self, message: str, attempt: _Attempt) -> None:
        """In a worker thread: the connection is this thread's until it hands it back."""
        with self._guard:
            kept, self._connection = self._connection, None
        connection = None
        try:
            try:
                connection = self._call(kept, message, attempt)
            except self.oracledb.Error as e:
                if kept is None:
                    raise  # a fresh connection failed: no point trying again at once
                log.info("quit alert: the Oracle connection failed (%s); reconnecting", " ".join(str(e).split()))
                connection = self._call(None, message, attempt)
        finally:
            if connection is not None:
                with self._guard:
                    if not attempt.abandoned and not self._closed and self._connection is None:
                        self._connection, connection = connection, None
                if connection is not None:
                    _close_quietly(connection)

    def _call(self, connection: Any, message: str, attempt: _Attempt) -> Any:
        """Signal and commit on ``connection`` (None: a new one). Returns the connection; on
        failure closes it and raises."""
        if connection is None:
            connection = self._connect()
        try:
            if attempt.abandoned:  # reported failed already: too late to raise it now
                raise AlertFailed("given up")
            with connection.cursor() as cursor:
                cursor.callproc("DBMS_ALERT.SIGNAL", [self.name, message])
            connection.commit()  # DBMS_ALERT delivers on commit
        except BaseException:
            _close_quietly(connection)
            raise
        return connection

    def _connect(self) -> Any:
        connection = self.oracledb.connect(user=self.user, password=self._password(), dsn=self.dsn,
                                           tcp_connect_timeout=self.timeout)
        connection.call_timeout = max(1, int(self.timeout * 1000))
        return connection

    def _password(self) -> str:
        credential = credential_name(self.password_file)
        if credential is None:
            path = Path(self.password_file)
        else:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise AlertFailed(f"alert.oracle_password_file = {self.password_file!r} but $CREDENTIALS_DIRECTORY "
                                  "is not set (LoadCredential= in the unit)")
            path = Path(directory) / credential
        try:
            password = path.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise AlertFailed(f"cannot read the password file {path}: {getattr(e, 'strerror', None) or e}") from None
        if not password:
            raise AlertFailed(f"the password file {path} is empty")
        return password


class _Attempt:
    """One signal's thread learns through this that the trio side gave up on it."""

    abandoned = False


def _close_quietly(connection: Any) -> None:
    with contextlib.suppress(Exception):
        connection.close()


# trio 0.22 (Debian 12) calls it `cancellable`; 0.23 renamed it `abandon_on_cancel`.
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else "cancellable")


async def _run_sync_abandoning(fn: Any, *args: Any) -> Any:
    """trio.to_thread.run_sync that returns at once when cancelled, leaving the thread to finish alone."""
    return await trio.to_thread.run_sync(fn, *args, **{_ABANDON: True})


# ---------------------------------------------------------------- the alerter


def _reason(error: BaseException) -> str:
    """One line (oracledb's messages have several) for the log and `dcod status`."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in error.exceptions)
    text = " ".join(str(error).split())
    if isinstance(error, AlertFailed):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Alerter:
    """Raises the quit alert on every configured backend: ``await alerter.signal("host:port")``."""

    def __init__(self, name: str, backends: Sequence[Backend]) -> None:
        self.name = name
        self.backends = list(backends)
        self._stats = {b.kind: BackendStats() for b in self.backends}

    @classmethod
    def from_config(cls, config: Config) -> Alerter:
        """The backends of ``config.alert``. Raises ConfigError (oracle backend without python-oracledb)."""
        alert = config.alert
        backends: list[Backend] = []
        for kind in alert.backends:
            if kind == "file":
                backends.append(FileBackend(config.alert_file))
            elif kind == "command":
                backends.append(CommandBackend(alert.name, alert.command, alert.command_timeout))
            elif kind == "oracle":
                backends.append(OracleBackend(import_oracledb(config.source), alert.name, alert.oracle_dsn,
                                              alert.oracle_user, alert.oracle_password_file, alert.oracle_timeout))
            else:
                raise ConfigError(f"{config.source}: alert.backends: unknown backend {kind!r} (file, command, oracle)")
        return cls(alert.name, backends)

    def __repr__(self) -> str:
        return f"Alerter({self.name!r}, {self.backends!r})"

    async def signal(self, message: str) -> None:
        """Raise the alert with ``message`` on every backend concurrently. Never raises a backend's
        failure: that is logged and counted (cancellation still propagates)."""
        raised: list[str] = []
        async with trio.open_nursery() as nursery:
            for backend in self.backends:
                nursery.start_soon(self._send, backend, message, raised)
        if raised:
            log.info("quit alert %s raised: %s (%s)", self.name, message, ", ".join(raised))

    async def _send(self, backend: Backend, message: str, raised: list[str]) -> None:
        stats = self._stats[backend.kind]
        try:
            await backend.send(message)
        except Exception as e:
            stats.failed += 1
            stats.last_error = _reason(e)
            stats.last_failed = time.time()
            log.warning("quit alert %s (%s): %s backend failed: %s", self.name, message, backend.kind,
                        stats.last_error)
        else:
            stats.sent += 1
            stats.last_sent = time.time()
            raised.append(backend.kind)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per backend: sent, failed, last_error, last_sent, last_failed (wall times), for `dcod status`."""
        return {kind: asdict(s) for kind, s in self._stats.items()}

    async def aclose(self) -> None:
        for backend in self.backends:
            with contextlib.suppress(Exception):
                await backend.aclose()

    async def __aenter__(self) -> Alerter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
