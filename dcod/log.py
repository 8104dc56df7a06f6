"""Logging to stderr in a form journald shows well.

Under systemd (``$JOURNAL_STREAM`` set) each line starts with a syslog priority prefix
like ``<4>``, which journald turns into the entry's priority and strips; journald adds
the timestamp and the unit. In a terminal, lines carry a short time and the level instead.
"""

from __future__ import annotations

import logging
import os
import sys

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
