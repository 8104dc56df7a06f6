"""Logging to stderr in a form journald shows well.

Under systemd (``$JOURNAL_STREAM`` set) each line starts with a syslog priority prefix
like ``<4>``, which journald turns into the entry's priority and strips; journald adds
the timestamp and the unit. In a terminal, lines carry a short time and the level instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """journald makes an entry of each line: each line of a record (a traceback has many) gets the
    priority and the role, so that each entry says whose it is and how grave."""

    def __init__(self, role: str) -> None:
        super().__init__("%(message)s")
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>{self.role}: "
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup(role: str, level: int = logging.INFO) -> None:
    """Send all dcod logging to stderr, each line prefixed with the process role ("hub", "worker 1#0")."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {role}: %(levelname)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Throttle:
    """Warnings that a flood (bad peers, a full queue) could repeat: the first of each kind is logged
    at once, the rest of its interval only counted, and a summary line says how many more came
    and the last of them, so a flood costs a line per interval, not a line per event.

    ``flush()`` logs the summaries of intervals that are over; call it now and then (the hub's
    sweep does), or a flood's summary waits for the next warning of its kind.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._kinds: dict[str, list] = {}  # kind -> [interval started, suppressed since, last suppressed text]

    def warn(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        """``exc_info``: the traceback of the exception being handled goes with the line logged
        at once (a summary has none)."""
        now = self.clock()
        entry = self._kinds.get(kind)
        if entry is not None and now - entry[0] >= self.interval:
            self._summarize(entry, now)
        if entry is None or not entry[1] and now - entry[0] >= self.interval:
            self.logger.warning(message, *args, exc_info=exc_info)
            self._kinds[kind] = [now, 0, ""]
        else:
            entry[1] += 1
            entry[2] = message % args if args else message

    def flush(self) -> None:
        now = self.clock()
        for entry in self._kinds.values():
            if entry[1] and now - entry[0] >= self.interval:
                self._summarize(entry, now)

    def _summarize(self, entry: list, now: float) -> None:
        if entry[1]:
            self.logger.warning("%d more like it in the last %.0fs, the last: %s", entry[1], now - entry[0], entry[2])
            entry[0], entry[1] = now, 0
