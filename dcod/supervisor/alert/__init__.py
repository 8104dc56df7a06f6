"""The quit alert (docs/ARCHITECTURE.md): tell Oracle sessions that a hub is going away.

The supervisor raises the alert ``Noradle-DCO-EXTHUB-QUIT`` with the hub's advertised
``host:port`` as message whenever a hub goes away (rollout drain, crash, hang); sessions on
that hub read the replies it still owes them and reconnect. An Alerter raises it on every
backend listed in ``alert.backends`` at once; each backend is a module of this package,
registered in BACKENDS:

- ``file`` (file.py): ``<alert_dir>/<name>`` replaced atomically with one line ``<counter> <message>``,
  which the bundled client (dcod.client.QuitAlert) checks before each send.
- ``command`` (command.py): runs ``alert.command + [name, message]``; a non-zero exit or a timeout fails.
- ``oracle`` (oracle.py): ``DBMS_ALERT.SIGNAL(name, message)`` and COMMIT through python-oracledb.

Each backend checks its own settings; check() checks them all, and what they share.
A failing backend never stops the others and never raises out of ``signal``: it is logged
(logger ``dcod.supervisor.alert``, warning) and counted in ``stats()`` for ``dcod status``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import trio

from dcod.config import Config, ConfigError
from dcod.supervisor.alert.base import AlertFailed, Backend, invalid
from dcod.supervisor.alert.command import CommandBackend
from dcod.supervisor.alert.file import FileBackend, read_counter
from dcod.supervisor.alert.oracle import OracleBackend

__all__ = ["BACKENDS", "AlertFailed", "Alerter", "Backend", "check", "read_counter"]

log = logging.getLogger("dcod.supervisor.alert")

ALERT_NAME_MAX = 30  # bytes: DBMS_ALERT's limit

BACKENDS: dict[str, type[Backend]] = {backend.kind: backend for backend in (FileBackend, CommandBackend, OracleBackend)}


def check(config: Config) -> None:
    """Refuse (ConfigError, naming file, key and reason, one line each) alert settings that would
    not work: the name, the list of backends, and each backend's own settings."""
    alert = config.alert
    name = alert.name
    errors: list[ConfigError] = []
    if not name or "/" in name or "\0" in name or name in (".", "..") or name != name.strip():
        errors.append(
            invalid(config, "alert.name", f"must be a file name (no '/', no surrounding blanks), not {name!r}")
        )
    elif len(name.encode()) > ALERT_NAME_MAX:
        # Whichever backends raise it, Noradle's sessions wait on it with DBMS_ALERT.
        errors.append(
            invalid(
                config,
                "alert.name",
                f"must be at most {ALERT_NAME_MAX} bytes for DBMS_ALERT, not {len(name.encode())} ({name!r})",
            )
        )
    known = ", ".join(BACKENDS)
    if not alert.backends:
        errors.append(invalid(config, "alert.backends", f"needs at least one of {known}"))
    for i, kind in enumerate(alert.backends):
        if kind not in BACKENDS:
            errors.append(invalid(config, "alert.backends", f"unknown backend {kind!r} ({known})"))
        elif kind in alert.backends[:i]:
            errors.append(invalid(config, "alert.backends", f"{kind!r} is listed twice"))
    for kind, backend in BACKENDS.items():
        try:
            backend.check(config, listed=kind in alert.backends)
        except ConfigError as e:
            errors.append(e)
    if errors:
        raise ConfigError("\n".join(map(str, errors)))


@dataclass
class BackendStats:
    sent: int = 0
    failed: int = 0
    last_error: str | None = None
    last_sent: float | None = None  # wall time (time.time())
    last_failed: float | None = None


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
        self.sending = 0  # signal() calls under way

    @classmethod
    def from_config(cls, config: Config) -> Alerter:
        """The backends of ``config.alert``. Raises ConfigError if its settings would not work (check())."""
        check(config)
        return cls(config.alert.name, [BACKENDS[kind].from_config(config) for kind in config.alert.backends])

    def __repr__(self) -> str:
        return f"Alerter({self.name!r}, {self.backends!r})"

    async def signal(self, message: str) -> None:
        """Raise the alert with ``message`` on every backend concurrently. Never raises a backend's
        failure: that is logged and counted (cancellation still propagates)."""
        raised: list[str] = []
        self.sending += 1
        try:
            async with trio.open_nursery() as nursery:
                for backend in self.backends:
                    nursery.start_soon(self._send, backend, message, raised)
        finally:
            self.sending -= 1
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
            log.warning("quit alert %s (%s): %s backend failed: %s", self.name, message, backend.kind, stats.last_error)
        else:
            stats.sent += 1
            stats.last_sent = time.time()
            raised.append(backend.kind)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per backend: sent, failed, last_error, last_sent, last_failed (wall times), for `dcod status`."""
        return {kind: asdict(s) for kind, s in self._stats.items()}

    def restore(self, stats: dict[str, dict[str, Any]]) -> None:
        """Carry on counting from ``stats()`` of a previous image of the supervisor (dcod.supervisor.reexec)."""
        for kind, saved in stats.items():
            if kind in self._stats:
                self._stats[kind] = BackendStats(**saved)

    async def aclose(self) -> None:
        for backend in self.backends:
            with contextlib.suppress(Exception):
                await backend.aclose()

    async def __aenter__(self) -> Alerter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
