"""Fuzzing the wire with hypothesis: the PDU framer against a model written from the spec, and a
live hub fed arbitrary session byte streams (bench/fuzz.py runs the same properties for minutes).

The framer: streams that mix valid and invalid PDUs, cut anywhere, give exactly the valid PDUs
in order up to the first invalid one and then a clean ProtocolError; the 16-byte Oracle
preamble; the max_pdu bounds, exactly; and the memory it holds after any feed() is less than
one PDU (so a connection costs at most max_pdu + one recv).

The hub: a real Hub on real sockets, in a trio loop of its own thread (hypothesis and
pytest-trio fixtures do not mix), with a byte-level echo worker (tests/peers.py). Whatever a session sends, the
session is either served (every valid request forwarded, every sync one answered, with an error
reply only if its handshake announced that it takes them) or closed with one protocol error
counted in hub.totals; no exception escapes the hub's tasks, it keeps serving a well-behaved
session afterwards, and it keeps no per-connection state once closed.
"""

from __future__ import annotations

import collections
import itertools
import socket
import struct
import threading
import time

import pytest
import trio
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dcod import config as configuration
from dcod import protocol
from dcod.hub.server import Hub
from dcod.net import sockets
from dcod.protocol import Framer, ProtocolError
from peers import ORACLE_MAGIC, TAKES_ERROR_REPLIES, WorkerPeer, handshake, read_pdu, reply_pdu, request_pdu, send_all

INT32 = st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)
HUB_MAX_PDU = 4096
KNOWN_PROXY = 1

# ---------------------------------------------------------------- streams, and what the spec says of them


@st.composite
def segments(draw, max_pdu: int, noradle_quit: bool = False):
    """A list of ("pdu", bytes) and ("bad", bytes) pieces of a stream; a bad piece is a header
    whose length the spec forbids (below 12, above max_pdu), maybe followed by junk."""
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        kind = draw(st.sampled_from(["pdu", "pdu", "pdu", "bad"]))
        if kind == "pdu":
            size = draw(st.one_of(st.integers(12, min(max_pdu, 80)), st.just(max_pdu), st.integers(12, max_pdu)))
            body = draw(st.binary(min_size=size - 12, max_size=size - 12))
            length = -size if draw(st.booleans()) else size
            out.append(("pdu", struct.pack(">iii", length, draw(INT32), draw(INT32)) + body))
        else:
            small = [n for n in range(-11, 12) if not (noradle_quit and abs(n) == 6)]
            length = draw(
                st.one_of(
                    st.sampled_from(small),
                    st.integers(max_pdu + 1, (1 << 31) - 1),
                    st.integers(-(1 << 31), -(max_pdu + 1)),
                )
            )
            junk = draw(st.binary(max_size=20))
            out.append(("bad", struct.pack(">iii", length, draw(INT32), draw(INT32)) + junk))
    return out


def expected(pieces) -> tuple[list[bytes], bool]:
    """The PDUs the spec says come out (those before the first bad piece), and whether it errs."""
    good = []
    for kind, data in pieces:
        if kind == "bad":
            return good, True
        good.append(data)
    return good, False


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_all(framer: Framer, chunks: list[bytes], bound: int) -> tuple[list[bytes], bool]:
    """Feed chunk by chunk; the PDUs that came out and whether a ProtocolError ended it. Checks
    after every feed() that what the framer holds is less than ``bound`` bytes."""
    out = []
    for chunk in chunks:
        try:
            out += [bytes(p) for p in framer.feed(chunk)]
        except ProtocolError:
            return out, True
        assert framer.buffered < bound, (framer.buffered, bound)
    return out, False


# ---------------------------------------------------------------- the framer


@given(
    st.data(),
    st.integers(min_value=12, max_value=300),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_mixed_stream_cut_anywhere_gives_the_valid_prefix_then_an_error(data, max_pdu, noradle_quit, points):
    pieces = data.draw(segments(max_pdu, noradle_quit))
    good, errs = expected(pieces)
    tail = data.draw(st.binary(max_size=11)) if not errs else b""  # an unfinished header: not an error yet
    stream = b"".join(d for _, d in pieces) + tail
    framer = Framer(max_pdu, accept_noradle_quit=noradle_quit)
    out, raised = feed_all(framer, cut(stream, points), max_pdu)
    assert raised == errs
    if errs:
        # What came out is a prefix of the valid PDUs (PDUs split in the very feed() that raises are
        # not returned: the connection is being closed anyway).
        assert out == good[: len(out)]
    else:
        assert out == good
        assert framer.buffered == len(tail)


@given(
    st.data(),
    st.integers(min_value=12, max_value=300),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_all_at_once_and_cut_agree_on_valid_streams(data, max_pdu, noradle_quit, points):
    pieces = [p for p in data.draw(segments(max_pdu, noradle_quit)) if p[0] == "pdu"]
    stream = b"".join(d for _, d in pieces)
    whole, _ = feed_all(Framer(max_pdu, accept_noradle_quit=noradle_quit), [stream], max_pdu)
    pieces_out, _ = feed_all(Framer(max_pdu, accept_noradle_quit=noradle_quit), cut(stream, points), max_pdu)
    assert whole == pieces_out == [d for _, d in pieces]


@given(st.integers(min_value=12, max_value=5000), st.booleans(), st.integers(min_value=1, max_value=64))
def test_max_pdu_is_the_largest_length_accepted(max_pdu, oneway, step):
    sign = -1 if oneway else 1
    fits = struct.pack(">iii", sign * max_pdu, 1, 1) + bytes(max_pdu - 12)
    framer = Framer(max_pdu)
    out = []
    for i in range(0, len(fits), step):
        out += framer.feed(fits[i : i + step])
    assert [bytes(p) for p in out] == [fits]
    with pytest.raises(ProtocolError, match="above max_pdu"):
        Framer(max_pdu).feed(struct.pack(">iii", sign * (max_pdu + 1), 1, 1))
    with pytest.raises(ProtocolError, match="below 12"):
        Framer(max_pdu).feed(struct.pack(">iii", sign * 11, 1, 1))


@given(
    st.data(),
    st.integers(min_value=12, max_value=300),
    st.booleans(),
    INT32,
    INT32,
    st.integers(min_value=0, max_value=(1 << 32) - 1),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_oracle_preamble_is_checked_then_pdus_follow(data, max_pdu, good_magic, sid, serial, audsid, points):
    magic = ORACLE_MAGIC if good_magic else data.draw(INT32.filter(lambda m: m != ORACLE_MAGIC))
    preamble = struct.pack(">iiiI", magic, sid, serial, audsid)
    pieces = [p for p in data.draw(segments(max_pdu)) if p[0] == "pdu"]
    stream = preamble + b"".join(d for _, d in pieces)
    framer = Framer(max_pdu, preamble=16, magic=ORACLE_MAGIC)
    chunks = cut(stream, points)
    fed = 0
    out = []
    for chunk in chunks:
        try:
            out += [bytes(p) for p in framer.feed(chunk)]
        except ProtocolError:
            assert not good_magic and fed + len(chunk) >= 16  # raised only once the whole preamble is in
            return
        fed += len(chunk)
        assert framer.buffered < max(max_pdu, 16)
        if fed < 16:
            assert framer.preamble is None and not out
    assert good_magic
    assert framer.preamble == preamble
    assert struct.unpack(">iiiI", framer.preamble)[3] == audsid  # above 2^31 too: unsigned
    assert out == [d for _, d in pieces]


@given(
    st.integers(min_value=12, max_value=1 << 20),
    st.integers(min_value=1, max_value=1 << 16),
    st.integers(min_value=1, max_value=40),
)
def test_a_stalled_pdu_costs_less_than_max_pdu(max_pdu, recv, rounds):
    """A peer that announces a PDU of max_pdu bytes and trickles it: the framer holds less than one
    PDU whatever the recv size, and hands the PDU over once it is whole."""
    framer = Framer(max_pdu)
    pdu = struct.pack(">iii", max_pdu, 1, 1) + bytes(max_pdu - 12)
    offset = 0
    for _ in range(rounds):
        if offset >= len(pdu):
            break
        out = framer.feed(pdu[offset : offset + recv])
        offset += recv
        assert framer.buffered < max_pdu
        assert (len(out) == 1) == (offset >= len(pdu))


# ---------------------------------------------------------------- a live hub in a thread of its own


class CountingFramer(Framer):
    """The hub's framer, watched: the most any connection's framer held after a feed()."""

    most = 0
    feeds = 0

    def feed(self, data):
        pdus = super().feed(data)  # after a ProtocolError the connection is closed: what it held goes
        CountingFramer.feeds += 1
        CountingFramer.most = max(CountingFramer.most, self.buffered)
        return pdus


class HubThread:
    """A Hub serving on 127.0.0.1 in a trio loop of its own, and a byte-level echo worker for proxy 1
    that records the one-way requests it gets."""

    def __init__(self, tmp) -> None:
        text = (
            f"[hub]\nmax_pdu = {HUB_MAX_PDU}\nreply_timeout = 5.0\n"
            f'[supervisor]\nruntime_dir = "{tmp}/run"\nstate_dir = "{tmp}/state"\n'
            f'[[proxy]]\nid = {KNOWN_PROXY}\nhandler = "echo"\n'
        )
        (tmp / "run").mkdir(parents=True, exist_ok=True)
        self.config = configuration.parse(text, str(tmp / "fuzz.toml"))
        self.oneway: dict[int, list[bytes]] = collections.defaultdict(list)  # audsid -> bodies
        self.crash: BaseException | None = None
        self.hub: Hub | None = None
        self.address = ""
        self._started = threading.Event()
        self._token = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz hub", daemon=True)

    def start(self) -> HubThread:
        self._thread.start()
        assert self._started.wait(10), f"the hub did not start: {self.crash!r}"
        return self

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)

    def call(self, fn):
        """fn() run in the hub's loop, between its tasks (its state is consistent there)."""
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - whatever escapes the hub is the finding
            self.crash = e
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listener = sockets.bind("127.0.0.1:0")
        self.address = "127.0.0.1:%d" % listener.getsockname()[1]
        worker = await WorkerPeer(str(self.config.worker_socket(KNOWN_PROXY, 0))).listen()
        self.hub = Hub(self.config)
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._worker, worker)
                await nursery.start(self.hub.run, [listener])
                while not self.hub.router.workers_connected():
                    await trio.sleep(0.01)
                self._started.set()

    async def _worker(self, worker: WorkerPeer) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(self._serve_hub, await worker.accept())

    async def _serve_hub(self, sock) -> None:
        """Echo sync requests; record one-way requests and acknowledge them (the hub asked, on connecting)."""
        with sock:
            while True:
                try:
                    length, audsid, rseq, body = await read_pdu(sock)
                except EOFError:
                    return
                if length > 0:
                    await send_all(sock, reply_pdu(audsid, rseq, body))
                else:
                    self.oneway[audsid].append(body)
                    await send_all(sock, reply_pdu(audsid, rseq))  # the acknowledgement


@pytest.fixture(scope="module")
def live_hub(tmp_path_factory):
    saved = protocol.Framer
    protocol.Framer = CountingFramer  # the hub builds its framers as protocol.Framer(...)
    hub = HubThread(tmp_path_factory.mktemp("fuzzhub")).start()
    try:
        yield hub
    finally:
        hub.stop()
        protocol.Framer = saved
    assert hub.crash is None, f"an exception escaped the hub: {hub.crash!r}"


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_pdus(sock: socket.socket, want: int) -> tuple[list[tuple[int, int, int, bytes]], bool]:
    """Up to ``want`` PDUs from the hub (stops early at end of stream); and whether it ended."""
    buf, out = b"", []
    while len(out) < want:
        while len(buf) >= 12 and len(buf) >= abs(struct.unpack_from(">i", buf)[0]):
            length, audsid, rseq = struct.unpack_from(">iIi", buf)
            out.append((length, audsid, rseq, buf[12 : abs(length)]))
            buf = buf[abs(length) :]
        if len(out) >= want:
            break
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out, True
        if not data:
            return out, True
        buf += data
    return out, False


def _wait(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


_audsids = itertools.count(1000)
WELL_BEHAVED = 0xFFFFFFF0


@st.composite
def session_streams(draw):
    """(audsid, handshake ok?, handshake, pieces, tail) of an arbitrary session: requests to the
    known proxy and to unknown ones, sync and one-way, then maybe a bad length or raw junk and more
    after it; rseqs distinct, as Oracle's are. Its sid field announces that it takes error replies,
    or is any other number."""
    audsid = next(_audsids)
    good_magic = draw(st.sampled_from([True, True, True, False]))
    magic = ORACLE_MAGIC if good_magic else draw(INT32.filter(lambda m: m != ORACLE_MAGIC))
    sid = draw(st.one_of(st.just(TAKES_ERROR_REPLIES), INT32))
    preamble = struct.pack(">iiiI", magic, sid, draw(INT32), audsid)
    rseqs = iter(draw(st.lists(INT32, min_size=16, max_size=16, unique=True)))

    def request():
        kind = draw(st.sampled_from(["sync", "sync", "oneway", "oneway", "unknown"]))
        body = draw(
            st.one_of(
                st.binary(max_size=100),  # or one of exactly max_pdu: drawn cheaply
                st.binary(min_size=1, max_size=1).map(lambda b: b * (HUB_MAX_PDU - 12)),
            )
        )
        size = 12 + len(body)
        proxy = KNOWN_PROXY if kind != "unknown" else draw(INT32.filter(lambda p: p != KNOWN_PROXY))
        oneway = kind == "oneway" or (kind == "unknown" and draw(st.booleans()))
        return "pdu", struct.pack(">iii", -size if oneway else size, proxy, next(rseqs)) + body

    def wrong():
        if draw(st.booleans()):
            length = draw(
                st.one_of(
                    st.integers(-11, 11),
                    st.integers(HUB_MAX_PDU + 1, (1 << 31) - 1),
                    st.integers(-(1 << 31), -(HUB_MAX_PDU + 1)),
                )
            )
            return "bad", struct.pack(">iii", length, draw(INT32), next(rseqs)) + draw(st.binary(max_size=30))
        junk = draw(st.binary(min_size=12, max_size=40))
        return "junk", junk

    pieces = [request() for _ in range(draw(st.integers(min_value=0, max_value=8)))]
    if draw(st.booleans()):
        pieces.append(wrong())
        pieces += [request() for _ in range(draw(st.integers(min_value=0, max_value=3)))]
    tail = draw(st.binary(max_size=11))  # an unfinished header, or nothing
    return audsid, good_magic, preamble, pieces, tail


def takes_error_replies(preamble: bytes) -> bool:
    """The spec: a sid field of 0xDC0D in its high 16 bits and bit 0 set announces it."""
    sid = struct.unpack_from(">I", preamble, 4)[0]
    return sid >> 16 == 0xDC0D and bool(sid & 1)


def _model(stream: bytes) -> tuple[list[bytes], bool]:
    """What the spec says the hub does with a session's bytes: the request PDUs it takes, in order,
    and whether it must close the connection for a protocol error (an unfinished PDU at the end is
    neither: it is dropped when the session goes)."""
    if len(stream) < 16:
        return [], False
    if struct.unpack_from(">i", stream)[0] != ORACLE_MAGIC:
        return [], True
    requests, offset = [], 16
    while len(stream) - offset >= 12:
        size = abs(struct.unpack_from(">i", stream, offset)[0])
        if size < 12 or size > HUB_MAX_PDU:
            return requests, True
        if len(stream) - offset < size:
            break
        requests.append(stream[offset : offset + size])
        offset += size
    return requests, False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(session_streams(), st.lists(st.integers(min_value=0, max_value=100_000), max_size=6))
def test_hub_serves_or_closes_cleanly_whatever_a_session_sends(live_hub, stream, points):
    audsid, good_magic, preamble, pieces, tail = stream
    takes_errors = takes_error_replies(preamble)
    data = preamble + b"".join(d for _, d in pieces) + tail
    requests, error = _model(data)
    truncated = not error and (len(data) - 16 - sum(map(len, requests))) > 0
    rseqs = [struct.unpack_from(">i", r, 8)[0] for r in requests]
    assume(len(set(rseqs)) == len(rseqs))  # junk read as a request may repeat an rseq; Oracle never does
    event("bad handshake" if not good_magic else "protocol error" if error else "served")
    event("takes error replies" if takes_errors else "takes no error replies")
    event(f"{min(len(requests), 5)}{'+' if len(requests) >= 5 else ''} requests before the end or the error")
    totals = live_hub.call(lambda: dict(live_hub.hub.totals))

    sock = _connect(live_hub.address)
    try:
        for chunk in cut(data, points):
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                assert error, "the hub closed a session that sent nothing wrong"
                break
        sync = [
            r
            for r in requests
            if struct.unpack_from(">i", r)[0] > 0 and (takes_errors or struct.unpack_from(">i", r, 4)[0] == KNOWN_PROXY)
        ]  # those that get a reply
        oneway_known = [
            r
            for r in requests
            if struct.unpack_from(">ii", r) < (0, 0) and struct.unpack_from(">ii", r)[1] == KNOWN_PROXY
        ]
        if error:
            replies, ended = _read_pdus(sock, len(sync) + 1)
            assert ended, "the hub did not close a session that broke the protocol"
        else:
            replies, ended = _read_pdus(sock, len(sync))
            assert not ended, "the hub closed a session that sent nothing wrong"
        # Every reply answers a sync request sent, once: the echo, or DCO-0001 for an unknown proxy
        # (only to a session that takes error replies: another gets none).
        by_rseq = {struct.unpack_from(">i", r, 8)[0]: r for r in sync}
        seen = set()
        for length, reply_audsid, rseq, body in replies:
            assert reply_audsid == audsid and rseq in by_rseq and rseq not in seen
            seen.add(rseq)
            request = by_rseq[rseq]
            if struct.unpack_from(">i", request, 4)[0] == KNOWN_PROXY:
                assert (length, body) == (len(request), request[12:])
            else:
                assert length < 0 and body.startswith(b"DCO-0001 unknown proxy")
        # One-way requests for the known proxy reach the worker in order: all of them, or a prefix
        # if the session broke the protocol.
        want = [r[12:] for r in oneway_known]
        if not error:
            _wait(lambda: len(live_hub.oneway[audsid]) >= len(want), "one-way requests at the worker")
        got = live_hub.oneway[audsid]
        assert got == want[: len(got)] and (error or got == want)
    finally:
        sock.close()

    def closed_and_counted() -> bool:
        now = live_hub.call(
            lambda: (
                live_hub.hub.connections,
                dict(live_hub.hub.totals),
                any(s.audsid == audsid for s in live_hub.hub.router.sessions),
            )
        )
        connections, after, registered = now
        return (
            connections == 0
            and not registered
            and after.get("protocol_errors", 0) == totals.get("protocol_errors", 0) + (1 if error else 0)
        )

    _wait(closed_and_counted, "the session to be closed, and a protocol error counted iff it sent one")
    if truncated:
        _wait(
            lambda: live_hub.call(lambda: live_hub.hub.totals["truncated_pdus"]) > totals.get("truncated_pdus", 0),
            "a truncated PDU counted",
        )

    # The hub still serves a well-behaved session, and holds no more than one PDU per connection.
    assert live_hub.crash is None, f"an exception escaped the hub: {live_hub.crash!r}"
    good = _connect(live_hub.address)
    try:
        good.sendall(handshake(WELL_BEHAVED, 1, 1) + request_pdu(KNOWN_PROXY, 1, b"ok"))
        assert _read_pdus(good, 1)[0] == [(14, WELL_BEHAVED, 1, b"ok")]
    finally:
        good.close()
    assert CountingFramer.feeds, "the hub no longer frames with dcod.protocol.Framer: update this check"
    assert CountingFramer.most < HUB_MAX_PDU
    _wait(
        lambda: live_hub.call(lambda: live_hub.hub.connections == 0 and live_hub.hub.router.inflight == 0),
        "the well-behaved session to be gone",
    )


def test_a_session_that_never_reads_costs_bounded_hub_memory(live_hub):
    """Sync requests from a session that never reads: the hub must stop reading it, or close it, before
    it holds more than a few MiB of replies for it. (max_inflight_per_session does not see them:
    they are answered requests.) Sends for up to 10 s, or until the hub holds ``bound`` for it."""
    bound = 16 * 1024 * 1024
    audsid = WELL_BEHAVED - 1
    body = b"x" * (HUB_MAX_PDU - 12)

    def held() -> int:
        return sum(s.conn.pending_bytes for s in live_hub.hub.router.sessions if s.audsid == audsid)

    sock = _connect(live_hub.address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(1.0)
    most = sent = 0
    try:
        sock.sendall(handshake(audsid, 1, 1))
        started = looked = time.monotonic()
        while time.monotonic() - started < 10 and most < bound:
            try:
                sock.sendall(request_pdu(KNOWN_PROXY, sent + 1, body))
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # the hub stopped reading us, or closed us: bounded either way
            sent += 1
            if time.monotonic() - looked > 0.1:
                most, looked = max(most, live_hub.call(held)), time.monotonic()
        assert most < bound, (
            f"sent {sent * HUB_MAX_PDU >> 20} MiB in {time.monotonic() - started:.1f} s "
            f"without reading a reply; the hub held {most >> 20} MiB of replies for the session"
        )
    finally:
        sock.close()
        _wait(lambda: live_hub.call(lambda: live_hub.hub.connections == 0), "the session to be gone")
