"""The Oracle-session client against a fake hub written byte by byte from the wire protocol.

The fake hub (tests/peers.py) uses trio sockets and struct only, never dcod's own protocol code, so these
tests hold the client to the spec rather than to itself.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from dcod.bench.target import free_port
from dcod.client import ClientError, DcoError, DcoTimeout, HubLost, HubUnavailable, Session, call
from dcod.config import AlertConfig, Config
from peers import ORACLE_MAGIC, FakeHub

AUDSID = 3_000_000_001  # above 2**31: the audsid travels unsigned
ERROR_REPLIES = 0xDC0D0001  # the handshake's sid field: "I parse error replies" (issue 15)
SERIAL = 4242
DEADLINE = 5.0  # no test may hang: each session block fails after this


@pytest.fixture
def make_fake_hub(nursery):
    async def make(port: int = 0) -> FakeHub:
        [listener] = await trio.open_tcp_listeners(port, host="127.0.0.1")
        hub = FakeHub(listener)
        nursery.start_soon(hub.serve, nursery)
        return hub

    return make


@pytest.fixture
async def fake_hub(make_fake_hub) -> FakeHub:
    return await make_fake_hub()


@pytest.fixture
def alert_file(tmp_path: Path) -> Path:
    return tmp_path / "Noradle-DCO-EXTHUB-QUIT"


def raise_alert(path: Path, counter: int, message: str) -> None:
    """What the supervisor's file backend does: replace the file atomically."""
    scratch = path.with_suffix(".new")
    scratch.write_text(f"{counter} {message}\n")
    os.replace(scratch, path)


def refused_address() -> str:
    """A local port nobody listens on."""
    return f"127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def open_session(hubs, alert_file: Path, **options):
    with trio.fail_after(DEADLINE):
        async with Session(hubs, audsid=AUDSID, serial=SERIAL, alert_file=alert_file, **options) as session:
            yield session


async def test_handshake_is_magic_capabilities_serial_audsid(fake_hub, alert_file):
    async with open_session(fake_hub.address, alert_file):
        peer = await fake_hub.connection()
        expected = bytes.fromhex("0bc74b16") + struct.pack(">IiI", ERROR_REPLIES, SERIAL, AUDSID)
        assert await peer.take(16) == expected


async def test_rseq_counts_sync_and_oneway_requests_from_1(fake_hub, alert_file):
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        session.write(b"ab")
        session.line("cé")
        assert await session.send_request(7) == 1
        session.line("fire")
        assert await session.send_request(8, oneway=True) is None
        assert await session.send_request(7) == 3
        assert await peer.request() == (18, 7, 1, "abcé\n".encode())
        assert await peer.request() == (-17, 8, 2, b"fire\n")
        assert await peer.request() == (12, 7, 3, b"")


async def test_buffered_requests_go_out_together_at_flush(fake_hub, alert_file):
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        session.write(b"one")
        assert await session.send_request(5, buffered=True) == 1
        session.write(b"two")
        assert await session.send_request(5, buffered=True, oneway=True) is None
        await trio.testing.wait_all_tasks_blocked()
        assert peer.received == b""
        await session.flush()
        await trio.testing.wait_all_tasks_blocked()
        assert len(peer.received) == 30
        assert await peer.request() == (15, 5, 1, b"one")
        assert await peer.request() == (-15, 5, 2, b"two")


async def test_replies_out_of_order_reach_their_own_reader(fake_hub, alert_file):
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()

        # Readers already waiting, replies arriving in another order.
        got = {}

        async def read(rseq):
            got[rseq] = await session.read_response(rseq)

        rseqs = [await session.send_request(1) for _ in range(3)]
        async with trio.open_nursery() as nursery:
            for rseq in rseqs:
                nursery.start_soon(read, rseq)
            for rseq in reversed(rseqs):
                await peer.request()
                await peer.reply(rseq, b"reply %d" % rseq)
        assert got == {1: b"reply 1", 2: b"reply 2", 3: b"reply 3"}

        # Replies that came before anyone asked wait in the cache.
        rseqs = [await session.send_request(1) for _ in range(3)]
        for rseq in (6, 4, 5):
            await peer.request()
            await peer.reply(rseq, b"reply %d" % rseq)
        await trio.testing.wait_all_tasks_blocked()
        assert [await session.read_response(rseq) for rseq in rseqs] == [b"reply 4", b"reply 5", b"reply 6"]
        with pytest.raises(ClientError, match="request 4 awaits no reply"):
            await session.read_response(4)


@pytest.mark.parametrize(("text", "code"), [("DCO-0001 unknown proxy 9", 1), ("worker said no", None)])
async def test_error_reply_raises_dco_error(fake_hub, alert_file, text, code):
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        rseq = await session.send_request(9)
        await peer.request()
        await peer.reply(rseq, text.encode(), error=True)
        with pytest.raises(DcoError) as caught:
            await session.read_response(rseq)
        assert (caught.value.code, caught.value.text, caught.value.rseq) == (code, text, rseq)


async def test_read_timeout_leaves_a_late_reply_in_the_cache(fake_hub, alert_file):
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        rseq = await session.send_request(1)
        await peer.request()
        with pytest.raises(DcoTimeout):
            await session.read_response(rseq, timeout=0.05)
        await peer.reply(rseq, b"late")
        assert await session.read_response(rseq) == b"late"
    assert issubclass(DcoTimeout, TimeoutError)


async def test_a_hub_that_refuses_is_skipped_for_the_next(fake_hub, alert_file):
    async with open_session([refused_address(), fake_hub.address], alert_file) as session:
        assert session.address == fake_hub.address
        peer = await fake_hub.accept()
        rseq = await session.send_request(2)
        assert (await peer.request())[2] == rseq


async def test_no_hub_answering_is_a_clear_error(alert_file):
    dead = [refused_address(), refused_address()]
    with pytest.raises(HubUnavailable) as caught:
        async with open_session(dead, alert_file):
            pass
    assert all(address in str(caught.value) for address in dead)


async def test_quit_alert_reads_owed_replies_then_moves_to_the_next_hub(make_fake_hub, alert_file):
    old, new = await make_fake_hub(), await make_fake_hub()
    async with open_session([old.address, new.address], alert_file) as session:
        old_peer = await old.accept()
        session.write(b"before")
        assert await session.send_request(1) == 1
        assert await old_peer.request() == (18, 1, 1, b"before")

        # The old hub drains: it stops listening and the alert names it.
        await old.stop_listening()
        raise_alert(alert_file, 1, old.address)
        async with trio.open_nursery() as nursery:

            async def send_after():
                session.write(b"after")
                assert await session.send_request(1) == 2

            nursery.start_soon(send_after)
            await trio.testing.wait_all_tasks_blocked()
            # The session waits for what the old hub owes it before going anywhere.
            assert new.accepted == 0 and not old_peer.eof
            await old_peer.reply(1, b"owed")

        await old_peer.closed()
        new_peer = await new.connection()
        assert await new_peer.handshake() == (ORACLE_MAGIC, ERROR_REPLIES, SERIAL, AUDSID)
        assert await new_peer.request() == (17, 1, 2, b"after")
        assert session.address == new.address
        assert await session.read_response(1) == b"owed"
        await new_peer.reply(2, b"fresh")
        assert await session.read_response(2) == b"fresh"


async def test_quit_alert_for_another_hub_keeps_the_connection(fake_hub, alert_file):
    raise_alert(alert_file, 3, fake_hub.address)  # raised before this session connected: history
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        assert await session.send_request(1) == 1
        assert (await peer.request())[2] == 1
        raise_alert(alert_file, 4, "10.9.9.9:1523")
        assert await session.send_request(1) == 2
        assert (await peer.request())[2] == 2
        await trio.testing.wait_all_tasks_blocked()
        assert fake_hub.accepted == 1 and not peer.eof
        assert session.address == fake_hub.address


@pytest.mark.parametrize("failure", ["close", "garbage"])
async def test_lost_connection_fails_waiting_reads_and_the_next_send_reconnects(fake_hub, alert_file, failure):
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        rseq = await session.send_request(1)
        await peer.request()
        async with trio.open_nursery() as nursery:

            async def read_lost():
                with pytest.raises(HubLost, match=f"no reply to request {rseq}"):
                    await session.read_response(rseq)

            nursery.start_soon(read_lost)
            await trio.testing.wait_all_tasks_blocked()
            if failure == "close":
                await peer.stream.aclose()
            else:
                await peer.stream.send_all(struct.pack(">iIi", 5, AUDSID, rseq))  # length below 12
        await trio.testing.wait_all_tasks_blocked()
        assert fake_hub.accepted == 1  # reconnecting waits for the next send

        session.write(b"again")
        assert await session.send_request(1, oneway=True) is None
        peer = await fake_hub.accept()
        assert await peer.request() == (-17, 1, 2, b"again")


async def test_reconnect_retries_while_the_hub_restarts(fake_hub, make_fake_hub, alert_file):
    port = int(fake_hub.address.rpartition(":")[2])
    async with open_session(fake_hub.address, alert_file) as session:
        peer = await fake_hub.accept()
        await fake_hub.stop_listening()
        await peer.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def send():
                session.write(b"x")
                await session.send_request(1, oneway=True)

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()  # refused, pausing before the next round
            restarted = await make_fake_hub(port)
        peer = await restarted.accept()
        assert await peer.request() == (-13, 1, 1, b"x")


async def test_reconnect_gives_up_after_reconnect_timeout(fake_hub, alert_file):
    async with open_session(fake_hub.address, alert_file, reconnect_timeout=0.1) as session:
        peer = await fake_hub.accept()
        await fake_hub.stop_listening()
        await peer.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(HubUnavailable, match=fake_hub.address):
            await session.send_request(1, oneway=True)


def config_with_alerts_in(directory: Path) -> Config:
    return Config(alert=AlertConfig(dir=str(directory)))


@pytest.mark.parametrize(("body", "printed"), [(b"pong", "pong\n"), (b"two\nlines\n", "two\nlines\n")])
async def test_call_prints_the_reply(fake_hub, nursery, tmp_path, capsys, body, printed):
    requests = []

    async def answer():
        peer = await fake_hub.accept()
        requests.append(await peer.request())
        await peer.reply(1, body)

    nursery.start_soon(answer)
    assert await call(config_with_alerts_in(tmp_path), 4, "ping", hub=fake_hub.address, timeout=DEADLINE) == 0
    assert requests == [(16, 4, 1, b"ping")]
    assert capsys.readouterr() == (printed, "")


async def test_call_announces_error_replies_and_reports_one(fake_hub, nursery, tmp_path, capsys):
    handshakes = []

    async def refuse():
        peer = await fake_hub.connection()
        handshakes.append(await peer.handshake())
        await peer.request()
        await peer.reply(1, b"DCO-0001 unknown proxy 4", error=True)

    nursery.start_soon(refuse)
    assert await call(config_with_alerts_in(tmp_path), 4, "ping", hub=fake_hub.address, timeout=DEADLINE) == 1
    assert capsys.readouterr() == ("", "dcod call: DCO-0001 unknown proxy 4\n")
    assert [h[:3] for h in handshakes] == [(ORACLE_MAGIC, ERROR_REPLIES, os.getpid())]


async def test_call_oneway_returns_at_once(fake_hub, tmp_path, capsys):
    with trio.fail_after(DEADLINE):
        assert await call(config_with_alerts_in(tmp_path), 4, "ping", oneway=True, hub=fake_hub.address) == 0
        peer = await fake_hub.accept()
        assert await peer.request() == (-16, 4, 1, b"ping")
    assert capsys.readouterr() == ("", "")


async def test_call_without_a_hub_names_the_address(tmp_path, capsys):
    dead = refused_address()
    assert await call(config_with_alerts_in(tmp_path), 4, "ping", hub=dead) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcod call: ") and dead in err
