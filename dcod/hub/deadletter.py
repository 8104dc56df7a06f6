"""The dead-letter store of a proxy: requests set aside as poison (dcod.hub.routing), for the operator.

One file per proxy in the state directory, ``dead-letters/proxy-<id>.jsonl``: a JSON object per
line and dead letter, with its key (the session's audsid, the hub's request number), its size,
its attempts, when it was set aside, and its PDU as the hub forwarded it (base64). Every hub
generation appends to the file (written and fsynced before the request is forgotten), and `dcod
dead-letters` lists, retries and drops, with or without a running service: whoever changes the
file holds the lock of the directory (``.lock``, flock) meanwhile. A retry writes the requests to
a spool file of its own, which a hub takes over as it takes over the spools of gone hubs
(dcod.hub.spool.SpoolDir), with no attempts; then they leave this file. A sync request cannot be
retried (the session that waited for its reply is gone): only dropped.

A line cut short by a crash is skipped when read (and logged); the next one starts on a line of
its own.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dcod import fs
from dcod.config import Config
from dcod.hub.spool import SpoolBusy, SpoolDir, SpoolFull
from dcod.protocol import ROUTED_HEADER

log = logging.getLogger("dcod.hub.deadletter")

DIRECTORY = "dead-letters"  # in the state directory


class NotRetryable(Exception):
    """A retry asked for sync dead letters: no session waits for their replies."""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A request set aside as poison."""

    id: int  # numbers the letters of one file, for the operator
    proxy: int
    audsid: int  # the session's
    rseq: int  # the hub's request number
    size: int  # bytes of the PDU, header included
    oneway: bool
    attempts: int  # deliveries its worker instance did not survive
    dead_at: float  # wall time it was set aside
    pdu: bytes

    def as_json(self) -> dict:
        """Everything but the PDU, for `dcod dead-letters list --json`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "pdu"}


class DeadLetters:
    """The dead-letter file of one proxy (see the module's docstring)."""

    def __init__(self, state_dir: Path, proxy_id: int) -> None:
        self.directory = state_dir / DIRECTORY
        self.path = self.directory / f"proxy-{proxy_id}.jsonl"
        self.proxy_id = proxy_id
        self._known: tuple[tuple[int, int, int], int, int] | None = None  # (file's stat, letters, last id)

    def add(self, pdu: bytes | bytearray, attempts: int) -> DeadLetter:
        """Keep a request set aside: appended and fsynced. Raises OSError if it cannot be."""
        length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
        with self._locked():
            count, last = self._summary()
            letter = DeadLetter(
                last + 1, self.proxy_id, audsid, rseq, abs(length), length < 0, attempts, time.time(), bytes(pdu)
            )
            line = _line(letter)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # after a line a crash cut short
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                if not size:
                    fs.sync_directory(self.directory)
                self._known = (_signature(os.fstat(fd)), count + 1, letter.id)
            finally:
                os.close(fd)
        return letter

    def letters(self) -> list[DeadLetter]:
        """Every dead letter in the file, oldest first."""
        try:
            return list(self._read())
        except FileNotFoundError:
            return []

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the file does (None: there is none)."""
        try:
            return _signature(os.stat(self.path))
        except OSError:
            return None

    def count(self) -> int:
        """How many are in the file now (read again only when the file changed)."""
        try:
            return self._summary()[0]
        except OSError:  # unreadable: the error shows where it is written
            return 0

    def take(
        self, ids: Iterable[int] | None = None, then: Callable[[list[DeadLetter]], None] | None = None
    ) -> list[DeadLetter]:
        """Remove the letters with these ids (all if None) from the file and return them; ``then(letters)``
        first, under the lock. Raises what ``then`` raises, or OSError if the file cannot be rewritten:
        then nothing is removed."""
        wanted = None if ids is None else set(ids)
        with self._locked():
            letters = self.letters()
            taken = [letter for letter in letters if wanted is None or letter.id in wanted]
            if taken and then is not None:
                then(taken)
            if taken:
                kept = [letter for letter in letters if wanted is not None and letter.id not in wanted]
                fs.write_atomically(self.path, b"".join(_line(letter) for letter in kept), durable=True)
        return taken

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _summary(self) -> tuple[int, int]:
        """(letters in the file, highest id)."""
        try:
            signature = _signature(os.stat(self.path))
        except FileNotFoundError:
            return 0, 0
        if self._known is None or self._known[0] != signature:
            letters = list(self._read())
            self._known = (signature, len(letters), max((letter.id for letter in letters), default=0))
        return self._known[1], self._known[2]

    def _read(self) -> Iterator[DeadLetter]:
        with open(self.path, "rb") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                    yield DeadLetter(**{**fields, "pdu": base64.b64decode(fields["pdu"], validate=True)})
                except (ValueError, TypeError, KeyError) as e:
                    log.warning("%s: line %d is not a dead letter (%s); skipped", self.path, number, e)


def _line(letter: DeadLetter) -> bytes:
    return json.dumps({**letter.as_json(), "pdu": base64.b64encode(letter.pdu).decode()}).encode() + b"\n"


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------- `dcod dead-letters`


def operate(config: Config, action: str, proxy_id: int | None = None, ids: list[int] | None = None) -> dict:
    """List (``proxy_id`` None: every proxy's), retry or drop (``ids`` None: all of the proxy's) dead
    letters, as the supervisor does for `dcod dead-letters`, or the command itself when no service
    runs. The answer as data: ``ok``, ``letters`` (as_json(), with their ``file``), ``missing`` (ids
    asked for and not found), or ``error``."""
    if action == "list":
        stores = [DeadLetters(config.state_dir, p) for p in _proxies_with_letters(config, proxy_id)]
        letters = [{**letter.as_json(), "file": str(store.path)} for store in stores for letter in store.letters()]
        return {"ok": True, "letters": letters}
    if action not in ("retry", "drop") or not isinstance(proxy_id, int):
        return {"ok": False, "error": f"dead letters: {action!r} needs a proxy id ({proxy_id!r})"}
    if action == "retry" and all(p.id != proxy_id for p in config.proxies):
        return {"ok": False, "error": f"proxy {proxy_id} is not in {config.source}: no hub would take them"}
    store = DeadLetters(config.state_dir, proxy_id)
    try:
        taken = store.take(ids, then=functools.partial(_queue_again, config, proxy_id) if action == "retry" else None)
    except (OSError, SpoolFull, SpoolBusy, NotRetryable) as e:
        return {"ok": False, "error": f"proxy {proxy_id}: nothing {'retried' if action == 'retry' else 'dropped'}: {e}"}
    found = {letter.id for letter in taken}
    return {
        "ok": True,
        "letters": [{**letter.as_json(), "file": str(store.path)} for letter in taken],
        "missing": [i for i in ids or () if i not in found],
    }


def _proxies_with_letters(config: Config, proxy_id: int | None) -> list[int]:
    """The proxies whose dead letters to list: the one asked for, else every file's (a proxy a reload
    removed included)."""
    if proxy_id is not None:
        return [proxy_id]
    found = []
    for path in (config.state_dir / DIRECTORY).glob("proxy-*.jsonl"):
        with contextlib.suppress(ValueError):
            found.append(int(path.name.removeprefix("proxy-").removesuffix(".jsonl")))
    return sorted(found)


def _queue_again(config: Config, proxy_id: int, letters: list[DeadLetter]) -> None:
    """Write the letters to a spool file of ours, durably, with no attempts: the running hub takes it
    over within a second (dcod.hub.server: ADOPT_INTERVAL), else the next one when it starts. Sync
    ones are refused (NotRetryable): replayed, their replies would go nowhere."""
    sync = [letter.id for letter in letters if not letter.oneway]
    if sync:
        ids = ", ".join(map(str, sync))
        raise NotRetryable(f"dead letters {ids} are sync requests: their sessions are gone; drop them instead")
    spools = SpoolDir(
        config.state_dir / "spool",
        memory_limit=0,
        size_limit=config.hub.spool_max,
        max_record=config.hub.max_pdu,
    )
    spool = spools.open(proxy_id)
    try:
        now = time.time()
        spool.extend([(now, letter.pdu, 0) for letter in letters])
    finally:
        spool.close()
