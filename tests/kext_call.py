"""A stand-in for Noradle's Oracle-side package k_ext_call, the only Oracle client of DCO there is.

Written from the description of how that PL/SQL reads and writes the wire (issue 15), not from
dcod's own client, whose blind spots it is here to find. It does what the PL/SQL does, step for
step, including what a dcod hub must not trip over:

- connect: the rows of ``exthub_config_t`` are tried in ``seq`` order, all of them again every
  ``retry_interval`` (3 s in the PL/SQL) until one accepts; then the 16-byte handshake
  (197610262, sid, serial, audsid). The hub in use is kept as host and port.
- send: each request (header: length, negative for one-way; proxy id; rseq, counted from 1 per
  session) goes into the session's buffer; ``onbuf`` counts every request, one-way ones too.
- flush: check_reconnect first: DBMS_ALERT.WAITONE on the quit alert with timeout 0; if alerted
  and the message (kept in a VARCHAR2(30): a longer one raises ORA-06502) is the 'host:port' in
  use, read replies until ``onway`` is 0, then reconnect; otherwise peek one byte without waiting
  and reconnect on end of input. Then write the buffer and ``onway := onway + onbuf``.
- read_response(rseq, timeout): a reply already stored is returned; else wait up to ``timeout``
  (None: forever) for data, read length, audsid and rseq, ``v_len := length - 12``, and the body as
  FLOOR(v_len/8132) pieces of 8132 bytes then MOD(v_len, 8132) bytes if positive, with Oracle's
  FLOOR and MOD: a negative length (a dcod error reply) reads no body at all and leaves its text
  in the stream. The body is stored under its rseq and ``onway := onway - 1``; true if it is the
  wanted rseq, false if onway reached 0, else read on until the timeout passes.
- UTL_TCP with tx_timeout 0: a read that finds no data at once raises ORA-29276.

Assumed where the description says nothing: a reconnect starts with ``onway`` 0 (the new
connection owes nothing); the quit alert's reads stop at end of input (the old hub let the
session go) and reconnect; DBMS_ALERT is registered when the session is made; other network
errors raise ORA-29260 to the caller, as UTL_TCP does.

Synchronous, blocking sockets, as PL/SQL is: one session per thread.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from peers import ORACLE_MAGIC

HANDSHAKE = struct.Struct(">iiiI")  # magic, sid, serial, audsid
HEADER = struct.Struct(">iii")  # length, proxy id, rseq (request); length, audsid, rseq (reply)
INT = struct.Struct(">i")
PIECE = 8132  # the body is read in pieces of this size
ALERT_MESSAGE_MAX = 30  # the PL/SQL keeps the quit alert's message in a VARCHAR2(30)

VALUE_ERROR = 6502
END_OF_INPUT = 29259
NETWORK_ERROR = 29260
TRANSFER_TIMEOUT = 29276


class OracleError(Exception):
    """An ORA-nnnnn error as the PL/SQL would raise it to the application."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"ORA-{code:05d}: {text}")
        self.code = code


@dataclass(frozen=True)
class ExtHub:
    """A row of ``exthub_config_t``."""

    host: str
    port: int
    seq: int


def oracle_floor(dividend: int, divisor: int) -> int:
    """FLOOR(dividend / divisor): towards minus infinity, so -1 or less for a negative dividend."""
    return dividend // divisor


def oracle_mod(dividend: int, divisor: int) -> int:
    """Oracle's MOD: the sign of the dividend (MOD(-20, 8132) = -20), unlike Python's %."""
    remainder = abs(dividend) % abs(divisor)
    return remainder if dividend >= 0 else -remainder


def varchar2(value: str, size: int) -> str:
    """Assigning ``value`` to a VARCHAR2(size) variable (byte semantics, Oracle's default)."""
    if len(value.encode()) > size:
        raise OracleError(VALUE_ERROR, "PL/SQL: numeric or value error: character string buffer too small")
    return value


class DbmsAlert:
    """DBMS_ALERT for one session, on dcod's file backend (``<alert dir>/<name>``, one line
    ``<counter> <message>``, the counter only grows): registered when made; ``waitone()`` is
    WAITONE with timeout 0: the message of the latest alert signalled since, else None."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.seen = self._read()[0]

    def _read(self) -> tuple[int, str]:
        try:
            counter, _, message = self.path.read_text().rstrip("\n").partition(" ")
            return int(counter), message
        except (FileNotFoundError, ValueError):
            return 0, ""

    def waitone(self) -> str | None:
        counter, message = self._read()
        if counter <= self.seen:
            return None
        self.seen = counter
        return message


class Tcp:
    """UTL_TCP's connection with tx_timeout 0: reads never wait, ``available`` does."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))

    def available(self, timeout: float | None) -> bool:
        """UTL_TCP.AVAILABLE(c, timeout) > 0: data (or end of input) within ``timeout`` seconds."""
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(None if timeout is None else timeout * 1000))

    def read_raw(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            if not self.available(0):
                raise OracleError(TRANSFER_TIMEOUT, "transfer timeout")
            try:
                chunk = self.sock.recv(size - len(data))
            except OSError as e:
                raise OracleError(NETWORK_ERROR, f"network error: {e.strerror}") from None
            if not chunk:
                raise OracleError(END_OF_INPUT, "end-of-input reached")
            data += chunk
        return bytes(data)

    def at_end_of_input(self) -> bool:
        """Peek one byte without waiting: true only on end of input."""
        if not self.available(0):
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError as e:
            raise OracleError(NETWORK_ERROR, f"network error: {e.strerror}") from None

    def write_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise OracleError(NETWORK_ERROR, f"network error: {e.strerror}") from None

    def close(self) -> None:
        self.sock.close()


class KExtCall:
    """One Oracle session running k_ext_call (its state is what the PL/SQL keeps in dcopv).

    ``give_up`` bounds the connect loop for tests (the PL/SQL retries forever, which is None).
    ``reconnects`` records why each reconnect happened ("quit alert" or "end of input").
    """

    def __init__(
        self,
        exthubs: list[ExtHub],
        *,
        audsid: int,
        sid: int = 17,
        serial: int = 4242,
        alert_file: Path | None = None,
        retry_interval: float = 3.0,
        give_up: float | None = 30.0,
    ) -> None:
        self.exthubs = sorted(exthubs, key=lambda row: row.seq)
        self.audsid = audsid
        self.sid = sid
        self.serial = serial
        self.alert = DbmsAlert(alert_file) if alert_file else None
        self.retry_interval = retry_interval
        self.give_up = give_up
        self.host: str | None = None
        self.port: int | None = None
        self.tcp: Tcp | None = None
        self.rseq = 0
        self.buffer: list[bytes] = []
        self.onbuf = 0
        self.onway = 0
        self.stored: dict[int, bytes] = {}  # replies read, by rseq
        self.reconnects: list[str] = []
        self.connect()

    # ------------------------------------------------------------ the connection

    def connect(self) -> None:
        stop = None if self.give_up is None else time.monotonic() + self.give_up
        while True:
            for row in self.exthubs:
                try:
                    tcp = Tcp(row.host, row.port)
                except OSError:
                    continue
                self.tcp, self.host, self.port = tcp, row.host, row.port
                tcp.write_raw(HANDSHAKE.pack(ORACLE_MAGIC, self.sid, self.serial, self.audsid))
                return
            if stop is not None and time.monotonic() >= stop:
                raise OracleError(NETWORK_ERROR, "network error: no ext-hub of exthub_config_t answers")
            time.sleep(self.retry_interval)

    def reconnect(self, why: str) -> None:
        self.tcp.close()
        self.reconnects.append(why)
        self.onway = 0
        self.connect()

    def close(self) -> None:
        self.tcp.close()

    @property
    def hub(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------ sending

    def send_request(self, proxy_id: int, body: bytes, *, oneway: bool = False, buffered: bool = False) -> int:
        """Put a request into the buffer (and flush, unless ``buffered``); returns its rseq."""
        self.rseq += 1
        length = HEADER.size + len(body)
        self.buffer.append(HEADER.pack(-length if oneway else length, proxy_id, self.rseq) + body)
        self.onbuf += 1
        if not buffered:
            self.flush()
        return self.rseq

    def flush(self) -> None:
        if not self.onbuf:
            return
        self.check_reconnect()
        self.tcp.write_raw(b"".join(self.buffer))
        self.buffer.clear()
        self.onway += self.onbuf
        self.onbuf = 0

    def check_reconnect(self) -> None:
        message = self.alert.waitone() if self.alert else None
        if message is not None and varchar2(message, ALERT_MESSAGE_MAX) == self.hub:
            try:
                while self.onway > 0:
                    self.tcp.available(None)
                    self._read_reply()
            except OracleError as e:
                if e.code != END_OF_INPUT:
                    raise
            self.reconnect("quit alert")
        elif self.tcp.at_end_of_input():
            self.reconnect("end of input")

    # ------------------------------------------------------------ replies

    def read_response(self, rseq: int, timeout: float | None = None) -> bool:
        """Whether the reply to ``rseq`` is stored (take it with ``reply``) within ``timeout`` seconds."""
        if rseq in self.stored:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.tcp.available(wait):
                return False
            if self._read_reply() == rseq:
                return True
            if self.onway == 0:
                return False

    def reply(self, rseq: int) -> bytes:
        return self.stored.pop(rseq)

    def call(self, proxy_id: int, body: bytes, timeout: float | None) -> bytes | None:
        """Send, flush, and the reply's body, or None if read_response returned false."""
        rseq = self.send_request(proxy_id, body)
        return self.reply(rseq) if self.read_response(rseq, timeout) else None

    def _read_reply(self) -> int:
        length = INT.unpack(self.tcp.read_raw(4))[0]
        self.tcp.read_raw(4)  # the audsid: not looked at
        rseq = INT.unpack(self.tcp.read_raw(4))[0]
        v_len = length - HEADER.size
        pieces = [self.tcp.read_raw(PIECE) for _ in range(oracle_floor(v_len, PIECE))]
        if oracle_mod(v_len, PIECE) > 0:
            pieces.append(self.tcp.read_raw(oracle_mod(v_len, PIECE)))
        self.stored[rseq] = b"".join(pieces)
        self.onway -= 1
        return rseq


def exthub(address: str, seq: int = 1) -> ExtHub:
    """The exthub_config_t row for a dcod hub's ``host:port``."""
    host, _, port = address.rpartition(":")
    return ExtHub(host, int(port), seq)
