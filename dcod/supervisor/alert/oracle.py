"""The oracle backend: ``DBMS_ALERT.SIGNAL(name, message)`` and COMMIT through python-oracledb
(thin mode, the optional extra dcod[oracle]), on a connection kept open and re-opened once per
signal when it broke."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import trio

from dcod.config import Config, ConfigError
from dcod.supervisor.alert.base import AlertFailed, Backend, invalid

log = logging.getLogger("dcod.supervisor.alert")

ORACLEDB_MISSING = "the oracle backend needs python-oracledb, which is not installed (pip install 'dcod[oracle]')"


def credential_name(password_file: str) -> str | None:
    """The name in ``credential:<name>`` (a systemd LoadCredential=), else None for a plain path."""
    return password_file[len("credential:") :] if password_file.startswith("credential:") else None


def oracledb_available() -> bool:
    """Whether python-oracledb can be imported, without importing it."""
    if "oracledb" in sys.modules:
        return sys.modules["oracledb"] is not None
    return importlib.util.find_spec("oracledb") is not None


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

    @classmethod
    def check(cls, config: Config, listed: bool) -> None:
        alert = config.alert
        if alert.oracle_timeout <= 0:
            raise invalid(config, "alert.oracle_timeout", "must be > 0")
        if not listed:
            return
        for key in ("oracle_dsn", "oracle_user", "oracle_password_file"):
            if not getattr(alert, key):
                raise invalid(config, f"alert.{key}", "needed by the oracle backend")
        name = alert.name
        if name.upper().startswith("ORA$"):
            raise invalid(config, "alert.name", f"names starting with ORA$ are reserved by Oracle, not {name!r}")
        credential = credential_name(alert.oracle_password_file)
        if credential is not None and (not credential or "/" in credential or credential in (".", "..")):
            raise invalid(
                config,
                "alert.oracle_password_file",
                f"credential:<name> needs a credential name (no '/'), not {alert.oracle_password_file!r}",
            )
        if not oracledb_available():
            raise invalid(config, "alert.backends", ORACLEDB_MISSING)

    @classmethod
    def from_config(cls, config: Config) -> OracleBackend:
        alert = config.alert
        return cls(
            import_oracledb(config.source),
            alert.name,
            alert.oracle_dsn,
            alert.oracle_user,
            alert.oracle_password_file,
            alert.oracle_timeout,
        )

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
        connection = self.oracledb.connect(
            user=self.user, password=self._password(), dsn=self.dsn, tcp_connect_timeout=self.timeout
        )
        connection.call_timeout = max(1, int(self.timeout * 1000))
        return connection

    def _password(self) -> str:
        credential = credential_name(self.password_file)
        if credential is None:
            path = Path(self.password_file)
        else:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise AlertFailed(
                    f"alert.oracle_password_file = {self.password_file!r} but $CREDENTIALS_DIRECTORY "
                    "is not set (LoadCredential= in the unit)"
                )
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
_ABANDON = (
    "abandon_on_cancel"
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else "cancellable"
)


async def _run_sync_abandoning(fn: Any, *args: Any) -> Any:
    """trio.to_thread.run_sync that returns at once when cancelled, leaving the thread to finish alone."""
    return await trio.to_thread.run_sync(fn, *args, **{_ABANDON: True})
