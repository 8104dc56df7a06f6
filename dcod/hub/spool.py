"""The durable queue of one proxy: requests waiting for a worker instance, in FIFO order.

Every queued request is appended to the proxy's spool file before it counts as queued,
so a hub that is killed loses nothing it accepted; the next hub replays the file. The
first ``memory_limit`` bytes of records are also kept in memory, so a short outage never
reads the disk; records beyond that are read back in order as the queue drains.

File layout: a 24-byte header ``b"DCOSPL04"`` + u64 *head* (offset of the first record not
yet forwarded) + u64 *mark* (end of the batch being forwarded, 0 when none), then records
``4-byte marker, u32 crc32, u32 size, f64 queued_at, u32 attempts, PDU``; the crc covers size,
queued_at, attempts and the PDU. *attempts* counts the deliveries of the request that ended with
its worker instance gone before it acknowledged the request (the hub sets a request aside as
poison at ``hub.poison_after``): it travels with the record, so a new hub knows it too.
A record is dropped (the head moves past it) only once forwarded: the mark is written before
a batch goes out and the head after, so after a crash the records under the mark may have
been forwarded already. They are forwarded again and counted as
``possible_duplicates``. Files of previous versions (``b"DCOSPL03"``: records without
attempts; ``b"DCOSPL02"``: records ``u32 size, u32 crc32, f64 queued_at, PDU``, no marker) are
still read, their records with 0 attempts, and appended to in their own layout (attempts not
kept) until they empty.

Damage costs only the damaged records: recovery resynchronizes on the next marker whose
record checks out, logs each skipped range with its offsets, and keeps a copy of the file
aside (``<name>.damaged-<time>``) before it changes anything. A header that contradicts the
file (head past the end or inside a record, mark out of place) is logged, and every record
from the first is queued again, all counted as possible duplicates. A torn tail (an append
cut short by a crash) is cut. Resynchronizing inside a damaged record could take a PDU that
holds a record-shaped copy for a record: it could only hold what its session could send anyway.

When the file cannot be written (a full disk, a read-only or inaccessible state directory,
a failed fsync), the spool is not ``durable``: it says why (``not_durable_reason``) and keeps
what it cannot write in memory, within ``memory_limit`` and still in order, until
``retry_durable()`` writes it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

FILE_HEADER = struct.Struct(">8sQQ")  # magic, head, mark
SCAN_CHUNK = 1 << 16  # bytes read at a time when looking for the next record marker
WRITE_CHUNK = 1 << 20  # bytes written at a time when appending many records

log = logging.getLogger("dcod.hub.spool")


class RecordLayout:
    """How one version of the file lays out its records."""

    magic: bytes
    header: struct.Struct
    marker: bytes  # what every record starts with, to resynchronize on; empty in the old layout
    covered: slice  # the part of the header the crc covers (with the PDU)

    def pack(self, queued_at: float, pdu: bytes | bytearray, attempts: int) -> bytes:
        raise NotImplementedError

    def fields(self, header: bytes) -> tuple[int, int, float, int] | None:
        """(size, crc, queued_at, attempts) of a record header, or None if it has no marker."""
        raise NotImplementedError

    def check(self, header: bytes, pdu: bytes, crc: int) -> bool:
        return zlib.crc32(pdu, zlib.crc32(header[self.covered])) == crc


class LayoutV4(RecordLayout):
    magic = b"DCOSPL04"
    header = struct.Struct(">4sIIdI")  # marker, crc32, size, queued_at, attempts
    marker = b"\xd3\xc0\x5a\x17"
    covered = slice(8, 24)
    _covered = struct.Struct(">IdI")

    def pack(self, queued_at: float, pdu: bytes | bytearray, attempts: int) -> bytes:
        covered = self._covered.pack(len(pdu), queued_at, attempts)
        return b"".join((self.marker, struct.pack(">I", zlib.crc32(pdu, zlib.crc32(covered))), covered, pdu))

    def fields(self, header: bytes) -> tuple[int, int, float, int] | None:
        marker, crc, size, queued_at, attempts = self.header.unpack(header)
        return (size, crc, queued_at, attempts) if marker == self.marker else None


class LayoutV3(RecordLayout):
    magic = b"DCOSPL03"
    header = struct.Struct(">4sIId")  # marker, crc32, size, queued_at
    marker = LayoutV4.marker
    covered = slice(8, 20)
    _covered = struct.Struct(">Id")

    def pack(self, queued_at: float, pdu: bytes | bytearray, attempts: int) -> bytes:
        covered = self._covered.pack(len(pdu), queued_at)
        return b"".join((self.marker, struct.pack(">I", zlib.crc32(pdu, zlib.crc32(covered))), covered, pdu))

    def fields(self, header: bytes) -> tuple[int, int, float, int] | None:
        marker, crc, size, queued_at = self.header.unpack(header)
        return (size, crc, queued_at, 0) if marker == self.marker else None


class LayoutV2(RecordLayout):
    magic = b"DCOSPL02"
    header = struct.Struct(">IId")  # size, crc32, queued_at
    marker = b""
    covered = slice(8, 16)

    def pack(self, queued_at: float, pdu: bytes | bytearray, attempts: int) -> bytes:
        stamp = struct.pack(">d", queued_at)
        return self.header.pack(len(pdu), zlib.crc32(pdu, zlib.crc32(stamp)), queued_at) + pdu

    def fields(self, header: bytes) -> tuple[int, int, float, int] | None:
        size, crc, queued_at = self.header.unpack(header)
        return size, crc, queued_at, 0


CURRENT = LayoutV4()
LAYOUTS = {layout.magic: layout for layout in (CURRENT, LayoutV3(), LayoutV2())}
MAGIC = CURRENT.magic
RECORD_HEADER = CURRENT.header

Record = tuple[float, bytes, int]  # queued_at (wall time), PDU, attempts (deliveries its instance did not survive)


class SpoolFull(Exception):
    """The spool is at its size bound (or, not durable, at its memory bound); the request is refused."""


class SpoolBusy(Exception):
    """Another living hub owns that spool file."""


def _aside_path(path: Path, why: str) -> Path:
    """A name beside ``path`` that no hub adopts (it does not end in ``.spool``) and that is not taken."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    candidate = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{why}-{stamp}.{n}")
    return candidate


class Spool:
    """FIFO of PDUs for one proxy, durable in ``path`` while it can be (see ``durable``).

    Opening it, queueing and forwarding never raise OSError: trouble with the file makes it not
    durable instead; ``must_open`` (for the files of gone hubs) raises it if the file cannot be
    opened and recovered."""

    def __init__(
        self, path: Path, *, memory_limit: int, size_limit: int, max_record: int, must_open: bool = False
    ) -> None:
        self.path = path
        self.memory_limit = memory_limit
        self.size_limit = size_limit
        self.max_record = max_record
        self._layout: RecordLayout = CURRENT
        self._fd = -1
        # Records of the file loaded in memory: (end offset, queued_at, pdu, attempts), contiguous from the head.
        self._mem: collections.deque[tuple[int, float, bytes, int]] = collections.deque()
        self._loaded_bytes = 0
        # Records the file could not take (not durable): they come after every record of the file.
        self._held: collections.deque[Record] = collections.deque()
        self._held_bytes = 0
        self._gaps: dict[int, int] = {}  # damaged ranges between head and end: start -> end
        self._disk_next = FILE_HEADER.size  # first record of the file not in memory
        self._end = FILE_HEADER.size
        self._head = FILE_HEADER.size
        self._head_written = FILE_HEADER.size
        self._marked = False  # a batch is being forwarded and the mark says where it ends
        self.dirty = False  # appended since the last fsync
        self.records = 0
        self.recovered = 0  # records found at open (left by a previous hub)
        self.possible_duplicates = 0  # of those, records a crash may have caught being forwarded
        self.torn_bytes = 0  # bytes of a torn tail cut off at open
        self.damaged_ranges = 0  # ranges of damaged bytes skipped, at open or reading back
        self.damaged_bytes = 0
        self.damaged_copies: list[Path] = []  # copies of damaged files, kept for inspection
        self._copy_tried = False
        self.durable = True
        self.not_durable_reason: str | None = None
        try:
            self._open()
        except OSError as e:
            if must_open:
                raise
            self._lose_durability(f"cannot open it: {e}")

    # ------------------------------------------------------------ state

    def __len__(self) -> int:
        return self.records

    @property
    def size(self) -> int:
        """Bytes of records not yet forwarded (in the file, damaged ranges included, or held in memory)."""
        return self._end - self._head + self._held_bytes + len(self._held) * CURRENT.header.size

    @property
    def memory_bytes(self) -> int:
        return self._loaded_bytes + self._held_bytes

    @property
    def memory_only(self) -> int:
        """Records held in memory only: lost if the hub dies before retry_durable() writes them."""
        return len(self._held)

    # ------------------------------------------------------------ operations

    def append(self, pdu: bytes | bytearray, queued_at: float | None = None, attempts: int = 0) -> None:
        """Queue a PDU: written to the file before return (fsync per the caller's policy), or, if
        the file cannot take it, held in memory (not durable). Raises SpoolFull past the bounds.

        ``queued_at`` (wall time) is now, or the original time of a record taken over from
        another spool; ``attempts``, its deliveries so far that its instance did not survive."""
        if self.size + CURRENT.header.size + len(pdu) > self.size_limit:
            raise SpoolFull(f"spool {self.path} at its bound of {self.size_limit} bytes")
        if queued_at is None:
            queued_at = time.time()
        if self.durable:
            record = self._layout.pack(queued_at, pdu, attempts)
            try:
                self._write_at(record, self._end)
            except OSError as e:
                self._lose_durability(f"cannot write to it: {e.strerror or e}")
            else:
                self.records += 1
                self.dirty = True
                self._written((queued_at, pdu, attempts), len(record))
                return
        self._hold((queued_at, bytes(pdu), attempts))

    def extend(self, records: list[Record]) -> None:
        """Append records (queued_at, pdu, attempts) taken over from another spool, durably (written and
        fsynced) or not at all: raises SpoolFull if they do not fit or the file cannot take them."""
        if not self.durable:
            raise SpoolFull(f"spool {self.path} is not durable ({self.not_durable_reason})")
        if self.size + sum(CURRENT.header.size + len(record[1]) for record in records) > self.size_limit:
            raise SpoolFull(f"spool {self.path} at its bound of {self.size_limit} bytes")
        try:
            sizes = self._write_durably(records)
        except OSError as e:
            raise SpoolFull(f"spool {self.path}: {e.strerror or e}") from None
        for record, size in zip(records, sizes):
            self.records += 1
            self._written(record, size)

    def peek(self) -> Record | None:
        """The oldest record (queued_at, pdu, attempts) without removing it, or None.

        None can come even when len() was not 0: records found damaged while reading back."""
        if not self._mem and self._disk_next < self._end:
            damaged = self.damaged_ranges
            self._load()
            if self.damaged_ranges != damaged:  # the damaged records were counted: count what is left
                self.records = len(self._mem) + sum(1 for _ in self._file_records(self._disk_next)) + len(self._held)
        if self._mem:
            _, queued_at, pdu, attempts = self._mem[0]
            return queued_at, pdu, attempts
        return self._held[0] if self._held else None

    def pop(self) -> None:
        """Drop the oldest record, about to be forwarded (call commit() after the batch)."""
        if self._mem:
            if not self._marked:
                # Records popped in this batch all end at or before the current end.
                self._write_header(self._head_written, self._end)
                self._marked = True
            end, _, pdu, _ = self._mem.popleft()
            self._loaded_bytes -= len(pdu)
            self._head = self._gaps.pop(end, end)
        else:
            _, pdu, _ = self._held.popleft()
            self._held_bytes -= len(pdu)
        self.records -= 1

    def commit(self) -> None:
        """Persist the head after a forwarded batch and clear the mark; an empty file is truncated."""
        if self._head == self._head_written and not self._marked:
            return
        self._marked = False
        if self._head == self._end:
            try:
                os.ftruncate(self._fd, FILE_HEADER.size)
            except OSError as e:
                self._lose_durability(f"cannot truncate it: {e.strerror or e}")
                return
            self._head = self._end = self._disk_next = FILE_HEADER.size
            self._gaps.clear()
            self._layout = CURRENT  # an empty file of the old version becomes one of the current
        if self._write_header(self._head, 0):
            self._head_written = self._head

    def sync(self) -> None:
        """fsync the file (the caller's fsync policy decides when); may run in a thread."""
        if self.dirty and self.durable:
            self.dirty = False
            try:
                os.fsync(self._fd)
            except OSError as e:
                # Taken at its word: what a later fsync reports as written is trusted.
                self._lose_durability(f"fsync failed: {e.strerror or e}")

    def retry_durable(self) -> bool:
        """Try to make the spool durable again: (re)open the file if need be, write the records held
        in memory and fsync. Returns whether it is durable. For a periodic task of the hub, in its
        event loop's thread and between batches (pop ... commit), as it changes the bookkeeping."""
        if self.durable:
            return True
        held = list(self._held)
        try:
            if self._fd < 0:
                self._open()
            sizes = self._write_durably(held, head=self._head)
        except (OSError, SpoolBusy) as e:
            self.not_durable_reason = f"still cannot write it: {e}"
            return False
        self._head_written = self._head
        self._held.clear()
        self._held_bytes = 0
        for record, size in zip(held, sizes):
            self._written(record, size)
        log.info("%s: durable again (%d requests held in memory written)", self.path, len(held))
        self.durable = True
        self.not_durable_reason = None
        return True

    def close(self) -> None:
        if not self.durable:
            self.retry_durable()
        if self._fd >= 0:
            self.commit()
            self.sync()
            os.close(self._fd)
            self._fd = -1
        if self._held:
            log.error(
                "%s: %d queued requests held in memory only are lost: %s",
                self.path,
                len(self._held),
                self.not_durable_reason,
            )

    def remove(self) -> None:
        """Delete the file (its records were taken over) and close it."""
        self.path.unlink()
        os.close(self._fd)
        self._fd = -1

    def set_aside(self) -> Path | None:
        """Close the spool of a proxy that is gone, its file renamed ``<name>.removed-<time>`` so
        that no proxy adopts it: the new path, or None when its file holds nothing (then it is
        deleted; records held in memory only are lost, and logged as such). Raises OSError if the
        file cannot be renamed (it is closed all the same)."""
        if not self.durable:
            self.retry_durable()
        self.commit()
        if self._fd < 0 or self._end == self._head:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self.close()
            return None
        aside = _aside_path(self.path, "removed")
        try:
            os.rename(self.path, aside)
        finally:
            self.close()
        return aside

    # ------------------------------------------------------------ reading back

    def scan(self) -> Iterator[Record]:
        """Every queued record (queued_at, pdu, attempts), oldest first, read from disk; nothing is consumed."""
        for _, queued_at, pdu, attempts in self._file_records(self._head):
            yield queued_at, pdu, attempts
        yield from self._held

    def _load(self) -> None:
        """Read records from disk into memory, up to the memory limit (at least one)."""
        for record in self._file_records(self._disk_next):
            self._mem.append(record)
            end, _, pdu, _ = record
            self._loaded_bytes += len(pdu)
            self._disk_next = end
            if self.memory_bytes >= self.memory_limit:
                return
        self._disk_next = self._end

    def _file_records(self, offset: int) -> Iterator[tuple[int, float, bytes, int]]:
        """The intact records of the file from offset (end offset, queued_at, pdu, attempts). Damage found
        here (it was not at open: it came since, or the disk fails) is skipped and logged once."""
        while offset < self._end:
            offset = self._gaps.get(offset, offset)
            if offset >= self._end:
                return
            try:
                record = self._read(offset, self._end)
                resume = None if record else (self._resync(offset + 1, self._end) or self._end)
            except OSError as e:
                log.error("%s: cannot read it back at offset %d: %s", self.path, offset, e)
                record, resume = None, self._end
            if record is None:
                self._damaged(offset, resume)
                self._gaps[offset] = resume
                continue
            yield record
            offset = record[0]

    def _read(self, offset: int, limit: int) -> tuple[int, float, bytes, int] | None:
        """(end offset, queued_at, pdu, attempts) of an intact record at offset that ends by limit, or None."""
        layout = self._layout
        header = os.pread(self._fd, layout.header.size, offset)
        if len(header) < layout.header.size:
            return None
        fields = layout.fields(header)
        if fields is None:
            return None
        size, crc, queued_at, attempts = fields
        end = offset + len(header) + size
        if size > self.max_record or end > limit:
            return None
        pdu = os.pread(self._fd, size, offset + len(header))
        if len(pdu) < size or not layout.check(header, pdu, crc):
            return None
        return end, queued_at, pdu, attempts

    def _resync(self, offset: int, limit: int) -> int | None:
        """Offset of the first intact record at or after offset (found by its marker), or None."""
        marker = self._layout.marker
        if not marker:
            return None  # the old layout has nothing to resynchronize on
        while offset < limit:
            chunk = os.pread(self._fd, SCAN_CHUNK + len(marker) - 1, offset)
            found = chunk.find(marker)
            while 0 <= found < SCAN_CHUNK and offset + found < limit:
                if self._read(offset + found, limit) is not None:
                    return offset + found
                found = chunk.find(marker, found + 1)
            offset += SCAN_CHUNK
        return None

    # ------------------------------------------------------------ writing

    def _write_at(self, data: bytes, offset: int) -> None:
        """pwrite all of data, or raise OSError with nothing of it left behind."""
        try:
            written = os.pwrite(self._fd, data, offset)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(data)} bytes)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)  # back to the last whole record: shrinking needs no space
            raise

    def _write_durably(self, records: list[Record], head: int | None = None) -> list[int]:
        """Write records at the end of the file (and the head, if given), fsync: all of it, or raise
        OSError with none of the records left in the file. Returns the size of each record."""
        packed = [self._layout.pack(*record) for record in records]
        offset = self._end
        try:
            chunk: list[bytes] = []
            chunk_size = 0
            for n, record in enumerate(packed, 1):
                chunk.append(record)
                chunk_size += len(record)
                if chunk_size >= WRITE_CHUNK or n == len(packed):
                    data = b"".join(chunk)
                    self._write_at(data, offset)
                    offset += len(data)
                    chunk, chunk_size = [], 0
            if head is not None:
                os.pwrite(self._fd, FILE_HEADER.pack(self._layout.magic, head, 0), 0)
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            raise
        self.dirty = False
        return [len(record) for record in packed]

    def _written(self, record: tuple[float, bytes | bytearray, int], size: int) -> None:
        """Account for a record just written at the end; keep it in memory if it can be."""
        queued_at, pdu, attempts = record
        self._end += size
        if self._disk_next == self._end - size and self.memory_bytes + len(pdu) <= self.memory_limit:
            self._mem.append((self._end, queued_at, bytes(pdu), attempts))
            self._loaded_bytes += len(pdu)
            self._disk_next = self._end

    def _write_header(self, head: int, mark: int) -> bool:
        try:
            os.pwrite(self._fd, FILE_HEADER.pack(self._layout.magic, head, mark), 0)
            return True
        except OSError as e:
            self._lose_durability(f"cannot write its head: {e.strerror or e}")
            return False

    # ------------------------------------------------------------ not durable

    def _lose_durability(self, reason: str) -> None:
        if self.durable:
            self.durable = False
            log.warning(
                "%s: not durable: %s; queued requests are held in memory (up to %d bytes) until it can "
                "be written again",
                self.path,
                reason,
                self.memory_limit,
            )
        self.not_durable_reason = reason

    def _hold(self, record: Record) -> None:
        """Keep a record the file cannot take, in memory only, after every record of the file."""
        pdu = record[1]
        # Records loaded from the file make room first: they are read back when their turn comes.
        while self._mem and self.memory_bytes + len(pdu) > self.memory_limit:
            _, _, evicted, _ = self._mem.pop()
            self._loaded_bytes -= len(evicted)
            self._disk_next = self._mem[-1][0] if self._mem else self._head
        if self.memory_bytes + len(pdu) > self.memory_limit:
            raise SpoolFull(
                f"spool {self.path} not durable ({self.not_durable_reason}) and "
                f"{self.memory_limit} bytes held in memory"
            )
        self._held.append(record)
        self._held_bytes += len(pdu)
        self.records += 1

    # ------------------------------------------------------------ open and recover

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink: a spool is written to, and one left by a gone hub is adopted.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # Held while this process lives (the kernel lets go even on SIGKILL): a spool whose
            # lock can be taken belongs to a hub that is gone.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.stat(self.path)):
                raise BlockingIOError  # taken over and removed by another hub since we opened it
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise SpoolBusy(f"{self.path} is in use by a running hub") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self._recover()
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    def _recover(self) -> None:
        """Open an existing file: find the head, count the records, skip damage, cut a torn tail."""
        fd = self._fd
        file_size = os.fstat(fd).st_size
        header = os.pread(fd, FILE_HEADER.size, 0)
        if len(header) < FILE_HEADER.size:
            if not any(magic.startswith(header[:8]) for magic in LAYOUTS):
                self._keep_copy()
                log.warning("%s: not a dcod spool (%d bytes, bad magic); starting it afresh", self.path, file_size)
            os.ftruncate(fd, 0)
            os.pwrite(fd, FILE_HEADER.pack(CURRENT.magic, FILE_HEADER.size, 0), 0)
            return
        magic, head, mark = FILE_HEADER.unpack(header)
        layout = LAYOUTS.get(magic)
        problem = None
        if layout is None:
            layout, problem = CURRENT, f"its header is not a dcod spool's (magic {magic!r})"
        elif file_size == FILE_HEADER.size:
            head, mark = FILE_HEADER.size, 0  # emptied: a crash before its head was rewritten is harmless
        elif not FILE_HEADER.size <= head <= file_size:
            problem = f"its head {head} is outside the file ({file_size} bytes)"
        elif mark and not head <= mark <= file_size:
            problem = f"its mark {mark} is outside the records (head {head}, {file_size} bytes)"
        self._layout = layout
        if (
            problem is None
            and head < file_size
            and self._read(head, file_size) is None
            and self._inside_a_record(head, file_size)
        ):
            problem = f"its head {head} is inside a record"
        start = FILE_HEADER.size if problem else head
        records = duplicates = 0
        gaps: dict[int, int] = {}
        offset = start
        while offset < file_size:
            record = self._read(offset, file_size)
            if record is None:
                resume = self._resync(offset + 1, file_size)
                if resume is None:
                    break
                gaps[offset] = offset = resume
                continue
            offset = record[0]
            records += 1
            duplicates += problem is not None or offset <= mark
        end = offset
        if problem:
            self._keep_copy()
            log.warning(
                "%s: %s; every record from the first is queued again (%d), each counted as possibly forwarded already",
                self.path,
                problem,
                records,
            )
        for gap_start, gap_end in gaps.items():
            self._damaged(gap_start, gap_end)
        if end < file_size:
            if self._torn(end, file_size):
                self.torn_bytes = file_size - end
                log.info(
                    "%s: cut a torn tail of %d bytes at offset %d (an append a crash cut short)",
                    self.path,
                    self.torn_bytes,
                    end,
                )
            else:
                self._damaged(end, file_size)
            os.ftruncate(fd, end)
        new_head = gaps.pop(start, start)
        new_mark = (end if problem else min(mark, end)) if records else 0
        if new_mark <= new_head:
            new_mark = 0
        if header != FILE_HEADER.pack(layout.magic, new_head, new_mark):
            os.pwrite(fd, FILE_HEADER.pack(layout.magic, new_head, new_mark), 0)
        self._head = self._head_written = self._disk_next = new_head
        self._end = end
        self._gaps = gaps
        self.records += records
        self.recovered = records
        self.possible_duplicates = duplicates
        if records:
            log.info(
                "%s: %d queued requests (%d bytes) left by a previous hub, %d of which it may have "
                "forwarded just before it stopped",
                self.path,
                records,
                end - new_head,
                duplicates,
            )

    def _inside_a_record(self, offset: int, file_size: int) -> bool:
        """Whether offset falls inside an intact record, walking the file from its first record."""
        at: int | None = FILE_HEADER.size
        while at is not None and at < offset:
            record = self._read(at, file_size)
            if record is None:
                at = self._resync(at + 1, file_size)
            elif record[0] > offset:
                return True
            else:
                at = record[0]
        return False

    def _torn(self, offset: int, file_size: int) -> bool:
        """Whether the bytes from offset to the end are an append cut short: the start of a record
        (its marker, if the layout has one) that would end past the end of the file."""
        layout = self._layout
        header = os.pread(self._fd, layout.header.size, offset)
        if header[: len(layout.marker)] != layout.marker[: len(header)]:
            return False
        if len(header) < layout.header.size:
            return True
        fields = layout.fields(header)
        return fields is not None and fields[0] <= self.max_record and offset + len(header) + fields[0] > file_size

    def _damaged(self, start: int, end: int) -> None:
        self._keep_copy()
        self.damaged_ranges += 1
        self.damaged_bytes += end - start
        log.warning("%s: skipped %d damaged bytes, offsets %d to %d", self.path, end - start, start, end)

    def _keep_copy(self) -> None:
        """Copy the file aside for inspection before anything in it changes (once)."""
        if self._copy_tried:
            return
        self._copy_tried = True
        copy = _aside_path(self.path, "damaged")
        try:
            shutil.copyfile(self.path, copy)
        except OSError as e:
            with contextlib.suppress(OSError):
                copy.unlink()
            log.warning("%s: damaged, and no copy of it could be kept: %s", self.path, e)
            return
        self.damaged_copies.append(copy)
        log.warning("%s: damaged; a copy of it as found is kept in %s", self.path, copy)


class SpoolDir:
    """The spool files of a state directory. Hubs overlap during a rollout, so each hub process
    writes its own file per proxy, ``proxy-<id>.<pid>.spool``, and takes over (adopts) the files
    of hubs that are gone: their records are appended to its own spool, then the file is removed.
    Files set aside (``.removed-...``, ``.damaged-...``) do not end in ``.spool``: never adopted.
    """

    def __init__(self, directory: Path, *, memory_limit: int, size_limit: int, max_record: int) -> None:
        self.directory = directory
        self.limits = dict(memory_limit=memory_limit, size_limit=size_limit, max_record=max_record)
        self._reported: dict[Path, str] = {}  # why a file could not be taken over, said once
        self._waiting: dict[Path, Spool] = {}  # files of gone hubs opened but not taken over yet

    def open(self, proxy_id: int) -> Spool:
        """This process's own spool for a proxy (not durable if its file cannot be written)."""
        return Spool(self.directory / f"proxy-{proxy_id}.{os.getpid()}.spool", **self.limits)

    def adopt(self, spool: Spool, proxy_id: int) -> tuple[list[Record], int]:
        """Move the records of gone hubs' spools for this proxy into ``spool``, oldest file first.

        Returns the records taken (queued_at, pdu, attempts) and how many may have been forwarded already.
        Damage found in those files is added to ``spool``'s counts. Nothing is taken while
        ``spool`` is not durable: the records are safer in their files than in memory. A file
        that cannot be taken yet stays open (locked) until it can: it is recovered only once.
        """
        taken: list[Record] = []
        possible_duplicates = 0
        if not spool.durable:
            return taken, possible_duplicates
        for path in self._files(proxy_id):
            if path == spool.path:
                continue
            orphan = self._waiting.pop(path, None)
            if orphan is None:
                orphan = self._open_gone(path)
                if orphan is None:
                    continue
                spool.damaged_ranges += orphan.damaged_ranges
                spool.damaged_bytes += orphan.damaged_bytes
                spool.damaged_copies += orphan.damaged_copies
                spool.torn_bytes += orphan.torn_bytes
            try:
                if spool.size + orphan.size > spool.size_limit:  # known before reading it
                    raise SpoolFull(f"{orphan.size} bytes would pass spool_max")
                records = list(orphan.scan())
                spool.extend(records)
            except SpoolFull as e:
                self._report(path, f"cannot take over {path.name} yet: {e}")
                self._waiting[path] = orphan
                continue
            taken += records
            possible_duplicates += orphan.possible_duplicates
            orphan.remove()
            self._reported.pop(path, None)
            if records:
                log.info("took over %d queued requests for proxy %d from %s", len(records), proxy_id, path.name)
        return taken, possible_duplicates

    def close(self) -> None:
        """Let go of the files of gone hubs that could not be taken over (another hub may)."""
        for orphan in self._waiting.values():
            orphan.close()
        self._waiting.clear()

    def set_aside(self, proxy_id: int) -> list[tuple[Path, int]]:
        """For a proxy a reload removed: rename the spool files its gone hubs left, so that no proxy
        added later with that id adopts them. Returns (new path, records left in it) for each file
        that held any (the others are deleted). Files of hubs still running are left alone: call
        this once the hubs that served the proxy are gone. Raises OSError if a file cannot be renamed."""
        aside = []
        for path in self._files(proxy_id):
            orphan = self._open_gone(path)
            if orphan is None:
                continue
            records = len(orphan)
            new_path = orphan.set_aside()
            if new_path is not None:
                log.warning("proxy %d removed: %d queued requests kept in %s", proxy_id, records, new_path)
                aside.append((new_path, records))
        return aside

    def _files(self, proxy_id: int) -> list[Path]:
        """The spool files of a proxy, oldest first."""
        found = []
        for path in self.directory.glob(f"proxy-{proxy_id}.*.spool"):
            with contextlib.suppress(OSError):  # gone since: taken over by another hub
                found.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(found)]

    def _open_gone(self, path: Path) -> Spool | None:
        """The spool in a file whose hub is gone, or None (its hub runs, or it cannot be opened)."""
        try:
            return Spool(
                path,
                memory_limit=0,
                size_limit=self.limits["size_limit"],
                max_record=self.limits["max_record"],
                must_open=True,
            )
        except SpoolBusy:
            return None  # its hub still runs, or another hub took it first
        except OSError as e:
            self._report(path, f"cannot take over {path.name} yet: {e}")
            return None

    def _report(self, path: Path, message: str) -> None:
        if self._reported.get(path) != message:
            self._reported[path] = message
            log.warning("%s", message)
