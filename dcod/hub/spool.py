"""The durable queue of one proxy: requests waiting for a worker instance, in FIFO order.

Every queued request is appended to the proxy's spool file before it counts as queued,
so a hub that is killed loses nothing it accepted; the next hub replays the file. The
first ``memory_limit`` bytes of records are also kept in memory, so a short outage never
reads the disk; records beyond that are read back in order as the queue drains.

File layout: a 24-byte header ``b"DCOSPL02"`` + u64 *head* (offset of the first record not
yet forwarded) + u64 *mark* (end of the batch being forwarded, 0 when none), then records
``u32 size, u32 crc32, f64 queued_at, PDU``; the crc covers ``queued_at`` and the PDU. A
record is dropped (the head moves past it) only once forwarded: the mark is written before
a batch goes out and the head after, so after a crash the records under the mark may have
been forwarded already. They are forwarded again and counted as ``possible_duplicates``.
A torn or corrupt tail (a crash mid-append, a full disk) is cut off at the first bad record.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import struct
import time
import zlib
from pathlib import Path

MAGIC = b"DCOSPL02"
FILE_HEADER = struct.Struct(">8sQQ")
POSITIONS = struct.Struct(">QQ")  # head, mark
RECORD_HEADER = struct.Struct(">IId")
HEAD_OFFSET = len(MAGIC)

log = logging.getLogger("dcod.hub.spool")


class SpoolFull(Exception):
    """The spool is at its size bound; the request is refused."""


class SpoolBusy(Exception):
    """Another living hub owns that spool file."""


class Spool:
    """FIFO of PDUs for one proxy, durable in ``path``."""

    def __init__(self, path: Path, *, memory_limit: int, size_limit: int, max_record: int) -> None:
        self.path = path
        self.memory_limit = memory_limit
        self.size_limit = size_limit
        self.max_record = max_record
        # Records loaded in memory: (end offset, queued_at, pdu), contiguous from the head.
        self._mem: collections.deque[tuple[int, float, bytes]] = collections.deque()
        self._mem_bytes = 0
        self._disk_next = FILE_HEADER.size  # first record not in memory
        self._end = FILE_HEADER.size
        self._head = FILE_HEADER.size
        self._head_written = FILE_HEADER.size
        self._marked = False  # a batch is being forwarded and the mark says where it ends
        self.dirty = False  # appended since the last fsync
        self.records = 0
        self.recovered = 0  # records found at open (left by a previous hub)
        self.torn_bytes = 0  # bytes of a torn tail cut off at open
        self.possible_duplicates = 0  # of those, records a crash may have caught being forwarded
        path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink: a spool is written to, and one left by a gone hub is adopted.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # Held while this process lives (the kernel lets go even on SIGKILL): a spool whose
            # lock can be taken belongs to a hub that is gone.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise SpoolBusy(f"{path} is in use by a running hub") from None
        self._recover()

    # ------------------------------------------------------------ state

    def __len__(self) -> int:
        return self.records

    @property
    def size(self) -> int:
        """Bytes of records not yet forwarded."""
        return self._end - self._head

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    # ------------------------------------------------------------ operations

    def append(self, pdu: bytes, queued_at: float | None = None) -> None:
        """Queue a PDU durably (written before return; fsync per the caller's policy).

        ``queued_at`` (wall time) is now, or the original time of a record taken over from
        another spool."""
        if self.size + RECORD_HEADER.size + len(pdu) > self.size_limit:
            raise SpoolFull(f"spool {self.path} at its bound of {self.size_limit} bytes")
        if queued_at is None:
            queued_at = time.time()
        stamp = struct.pack(">d", queued_at)
        record = RECORD_HEADER.pack(len(pdu), zlib.crc32(pdu, zlib.crc32(stamp)), queued_at) + pdu
        try:
            written = os.pwrite(self._fd, record, self._end)
        except OSError as e:  # ENOSPC, EIO, ...: nothing of it may stay behind
            written, error = 0, e.strerror
        else:
            error = "short write (disk full?)"
        if written != len(record):
            os.ftruncate(self._fd, self._end)  # back to the last whole record: shrinking never needs space
            raise SpoolFull(f"spool {self.path}: {error}, {written} of {len(record)} bytes; request refused")
        self._end += len(record)
        self.records += 1
        self.dirty = True
        if self._disk_next == self._end - len(record) and self._mem_bytes + len(pdu) <= self.memory_limit:
            self._mem.append((self._end, queued_at, bytes(pdu)))
            self._mem_bytes += len(pdu)
            self._disk_next = self._end

    def peek(self) -> tuple[float, bytes] | None:
        """The oldest record (queued_at, pdu) without removing it, or None."""
        if not self._mem and self._disk_next < self._end:
            self._load()
        if not self._mem:
            return None
        _, queued_at, pdu = self._mem[0]
        return queued_at, pdu

    def pop(self) -> None:
        """Drop the oldest record, about to be forwarded (call commit() after the batch)."""
        if not self._marked:
            # Records popped in this batch all end at or before the current end.
            os.pwrite(self._fd, POSITIONS.pack(self._head_written, self._end), HEAD_OFFSET)
            self._marked = True
        end, _, pdu = self._mem.popleft()
        self._mem_bytes -= len(pdu)
        self._head = end
        self.records -= 1

    def commit(self) -> None:
        """Persist the head after a forwarded batch and clear the mark; an empty spool is truncated."""
        if self._head == self._head_written and not self._marked:
            return
        if self._head == self._end:
            self._head = self._end = self._disk_next = FILE_HEADER.size
            os.ftruncate(self._fd, FILE_HEADER.size)
        os.pwrite(self._fd, POSITIONS.pack(self._head, 0), HEAD_OFFSET)
        self._head_written = self._head
        self._marked = False

    def sync(self) -> None:
        """fsync the file (the caller's fsync policy decides when)."""
        if self.dirty:
            self.dirty = False
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            self.commit()
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Delete the file (its records were taken over) and close it."""
        self.path.unlink()
        os.close(self._fd)
        self._fd = -1

    # ------------------------------------------------------------ reading back

    def scan(self):
        """Every queued record (queued_at, pdu), oldest first, read from disk; nothing is consumed."""
        offset = self._head
        while offset < self._end:
            offset, queued_at, pdu = self._read_record(offset)
            yield queued_at, pdu

    def _load(self) -> None:
        """Read records from disk into memory, up to the memory limit (at least one)."""
        offset = self._disk_next
        while offset < self._end and (not self._mem or self._mem_bytes < self.memory_limit):
            record = self._read_record(offset)
            assert record is not None, "records below the end were checked at open or written by us"
            offset, queued_at, pdu = record
            self._mem.append((offset, queued_at, pdu))
            self._mem_bytes += len(pdu)
        self._disk_next = offset

    def _read_record(self, offset: int) -> tuple[int, float, bytes] | None:
        """(end offset, queued_at, pdu) of the record at offset, or None if torn or corrupt."""
        header = os.pread(self._fd, RECORD_HEADER.size, offset)
        if len(header) < RECORD_HEADER.size:
            return None
        size, crc, queued_at = RECORD_HEADER.unpack(header)
        if size > self.max_record:
            return None
        pdu = os.pread(self._fd, size, offset + RECORD_HEADER.size)
        if len(pdu) < size or zlib.crc32(pdu, zlib.crc32(header[8:])) != crc:
            return None
        return offset + RECORD_HEADER.size + size, queued_at, pdu

    def _recover(self) -> None:
        """Open an existing spool: find the head, count the records, cut a torn tail."""
        header = os.pread(self._fd, FILE_HEADER.size, 0)
        file_size = os.fstat(self._fd).st_size
        if len(header) < FILE_HEADER.size or header[:8] != MAGIC:
            if file_size > 0 and header[:8] != MAGIC[: len(header[:8])]:
                log.warning("%s: not a dcod spool (bad magic); starting it afresh", self.path)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, FILE_HEADER.pack(MAGIC, FILE_HEADER.size, 0), 0)
            return
        _, head, mark = FILE_HEADER.unpack(header)
        head = max(FILE_HEADER.size, min(head, file_size))
        offset = head
        while offset < file_size:
            record = self._read_record(offset)
            if record is None:
                break
            offset = record[0]
            self.records += 1
            if offset <= mark:
                self.possible_duplicates += 1
        if offset < file_size:
            self.torn_bytes = file_size - offset
            log.warning("%s: cut a torn or corrupt tail of %d bytes at offset %d", self.path, self.torn_bytes, offset)
            os.ftruncate(self._fd, offset)
        self._head = self._head_written = self._disk_next = head
        self._end = offset
        self.recovered = self.records
        if self.records:
            log.info("%s: %d queued requests (%d bytes) left by a previous hub, %d of which it may have "
                     "forwarded just before it stopped", self.path, self.records, self.size, self.possible_duplicates)


class SpoolDir:
    """The spool files of a state directory. Hubs overlap during a rollout, so each hub process
    writes its own file per proxy, ``proxy-<id>.<pid>.spool``, and takes over (adopts) the files
    of hubs that are gone: their records are appended to its own spool, then the file is removed.
    """

    def __init__(self, directory: Path, *, memory_limit: int, size_limit: int, max_record: int) -> None:
        self.directory = directory
        self.limits = dict(memory_limit=memory_limit, size_limit=size_limit, max_record=max_record)

    def open(self, proxy_id: int) -> Spool:
        """This process's own spool for a proxy."""
        return Spool(self.directory / f"proxy-{proxy_id}.{os.getpid()}.spool", **self.limits)

    def adopt(self, spool: Spool, proxy_id: int) -> tuple[list[tuple[float, bytes]], int]:
        """Move the records of gone hubs' spools for this proxy into ``spool``, oldest file first.

        Returns the records taken (queued_at, pdu) and how many may have been forwarded already.
        """
        taken: list[tuple[float, bytes]] = []
        possible_duplicates = 0
        paths = sorted(self.directory.glob(f"proxy-{proxy_id}.*.spool"), key=lambda p: p.stat().st_mtime)
        for path in paths:
            if path == spool.path:
                continue
            try:
                orphan = Spool(path, memory_limit=0, size_limit=self.limits["size_limit"],
                               max_record=self.limits["max_record"])
            except (SpoolBusy, FileNotFoundError):
                continue  # its hub still runs, or another hub took it first
            if spool.size + orphan.size > spool.size_limit:
                log.warning("cannot take over %s yet: %d bytes would pass spool_max", path.name, orphan.size)
                orphan.close()
                continue
            records = list(orphan.scan())
            for queued_at, pdu in records:
                spool.append(pdu, queued_at)
            spool.sync()  # durable here before the orphan goes
            taken += records
            possible_duplicates += orphan.possible_duplicates
            orphan.remove()
            if records:
                log.info("took over %d queued requests for proxy %d from %s", len(records), proxy_id, path.name)
        return taken, possible_duplicates
