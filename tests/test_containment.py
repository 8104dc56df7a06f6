"""Issue 16, items 1, 2 and 3, with real processes: a one-way request that kills its worker is set
aside as poison after hub.poison_after deliveries, durably counted, and the operator lists, retries
and drops it; a worker whose event loop blocks is killed and restarted; an instance that is down is
held in every hub generation, so that requests to it wait in the queue instead of going into a
listening backlog nobody serves; what the hub holds in memory for a proxy with a slow worker stays
within queue_memory."""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import time

import pytest
import trio

import test_rollout
from conftest import wait_for
from dcod.client import DcoError, DcoTimeout, Session
from dcod.hub.deadletter import DeadLetters
from mounts import fill, tmpfs
from peers import WorkerPeer
from runs import ECHO
from test_rollout import FAST_PMON, dcod_async, row, status

handler_path = test_rollout.handler_path  # fixtures
handler_module = test_rollout.handler_module


async def test_a_worker_whose_loop_blocks_is_killed_and_restarted(run, handler_module, handler_path, nursery, tmp_path):
    """Its sync request gets the worker-lost error; the one-way requests it had taken go to the
    other instance; the other requests are served meanwhile; it comes back."""
    notes = tmp_path / "notes"
    handler_module(
        "block",
        f"""\
        import time

        async def handle(req):
            if req.body == b"block":
                time.sleep(60)  # blocks the worker's event loop: no heartbeat, no other request
            if req.body.startswith(b"note"):
                with open({str(notes)!r}, "a") as notes:
                    notes.write(req.body.decode() + "\\n")
            return req.body
        """,
    )
    r = run('[[proxy]]\nid = 1\nhandler = "block:handle"\ninstances = 2\n' + handler_path, supervisor=FAST_PMON)
    await r.notification("READY=1")
    served = 0
    blocked_done = trio.Event()

    async def others() -> None:
        """Requests on another session while one instance blocks: served by the other instance (or,
        routed to the blocked one before the hub knew, answered with the worker-lost error)."""
        nonlocal served
        async with Session(r.config.hub.advertise, audsid=2) as session:
            while not blocked_done.is_set():
                try:
                    assert await session.call_sync(1, b"ping", timeout=15) == b"ping"
                    served += 1
                except DcoError as e:
                    assert "DCO-0003" in str(e)
                await trio.sleep(0.01)

    async with Session(r.config.hub.advertise, audsid=1) as session:
        nursery.start_soon(others)
        # In one write, so that the hub sends them to one instance: the one-way requests wait
        # behind the block there, unacknowledged.
        session.write(b"block")
        rseq = await session.send_request(1, buffered=True)
        for n in range(5):
            session.write(b"note %d" % n)
            await session.send_request(1, buffered=True, oneway=True)
        started = time.monotonic()
        await session.flush()
        with pytest.raises(DcoError, match="DCO-0003"):
            await session.read_response(rseq, timeout=15)
        answered = time.monotonic() - started
        blocked_done.set()
    print(f"blocked handler: worker-lost answer after {answered:.2f}s (heartbeat_timeout 1.0)")
    assert served > 0
    assert "sent no heartbeat for" in r.log
    await wait_for(lambda: notes.exists() and len(notes.read_text().splitlines()) == 5, timeout=10)
    assert sorted(notes.read_text().splitlines()) == [f"note {n}" for n in range(5)]  # each once
    assert status(r.config)["hub"]["proxies"]["1"]["requeued"] == 5
    await wait_for(lambda: "restarting" in r.log, timeout=10)
    rows = [row(status(r.config), f"worker 1#{i}") for i in (0, 1)]
    [killed] = [w for w in rows if w["restarts"] == 1]
    assert killed["last_exit"]["returncode"] == -signal.SIGKILL
    with trio.fail_after(15):  # it comes back and serves
        while row(status(r.config), killed["name"])["state"] != "ready":
            await trio.sleep(0.1)
    async with Session(r.config.hub.advertise, audsid=3) as session:
        for _ in range(10):
            assert await session.call_sync(1, b"ping", timeout=15) == b"ping"


def instance_in_hub(config, proxy_id: int, index: int) -> dict:
    """The hub's view of an instance, and how many requests its proxy has queued."""
    proxy = status(config)["hub"]["proxies"][str(proxy_id)]
    return proxy["instances"][index] | {"queued_now": proxy["queued_now"]}


async def test_an_instance_left_down_is_held_in_every_hub_generation(run, handler_module, handler_path):
    handler_module(
        "broken",
        """\
        def init():
            raise RuntimeError("broken on purpose")

        async def handle(req):
            return req.body
        """,
    )
    r = run(
        ECHO + '[[proxy]]\nid = 2\nhandler = "broken:handle"\n' + handler_path,
        supervisor=FAST_PMON + "restart_max = 2\n",
        reply_timeout=2.0,
    )
    await r.notification("READY=1")
    await wait_for(lambda: "leaving it down" in r.log, timeout=15)
    assert row(status(r.config), "worker 2#0")["state"] == "failed"
    await wait_for(lambda: instance_in_hub(r.config, 2, 0)["held"], timeout=10)

    async with Session(r.config.hub.advertise, audsid=1) as session:
        rseq = await session.send_request(2)  # sync: waits in the queue (until reply_timeout)
        await wait_for(lambda: instance_in_hub(r.config, 2, 0)["queued_now"] == 1, timeout=5)
        for _ in range(200):  # a one-way flood goes to the queue, never into the dead socket's backlog
            session.write(b"x" * 65536)
            await session.send_request(2, oneway=True)
        await wait_for(lambda: instance_in_hub(r.config, 2, 0)["queued_now"] == 201, timeout=10)
        held = instance_in_hub(r.config, 2, 0)
        assert (held["inflight"], held["unacked"]) == (0, 0)
        with pytest.raises((DcoError, DcoTimeout), match="DCO-0002|within"):
            await session.read_response(rseq, timeout=10)
        assert await session.call_sync(1, b"ping", timeout=15) == b"ping"  # the rest serves

    # A new hub generation (the previous one killed) holds it from its start.
    [hub] = r.children_with(" hub")
    hub.kill()
    with trio.fail_after(20):
        while True:
            hubs = r.children_with(" hub")
            if hubs and hubs[0].pid != hub.pid and row(status(r.config), "hub")["state"] == "ready":
                break
            await trio.sleep(0.1)
    held = instance_in_hub(r.config, 2, 0)
    assert held["held"] and (held["inflight"], held["unacked"]) == (0, 0)


async def test_a_foreign_worker_is_not_judged_by_heartbeats(run):
    """A worker run from a `command` (another language) sends none: silent past ready_timeout, it stays."""
    r = run('[[proxy]]\nid = 2\ncommand = ["/bin/sleep", "600"]\n', supervisor=FAST_PMON + "ready_timeout = 3.0\n")
    await r.notification("READY=1")
    with trio.fail_after(20):
        while (foreign := row(status(r.config), "worker 2#0"))["restarts"] == 0 and (foreign["uptime"] or 0) < 4.5:
            await trio.sleep(0.2)
    assert (foreign["generation"], foreign["restarts"], foreign["state"]) == (1, 0, "ready")


@pytest.fixture
def poison(tmp_path, handler_module):
    """A handler (module "poison") that kills its own process on a body starting with "poison" while
    tmp_path/flag exists, after writing the body to tmp_path/deliveries; it notes "note..." bodies in
    tmp_path/notes and echoes the rest. Returns (flag, deliveries, notes)."""
    flag, deliveries, notes = tmp_path / "flag", tmp_path / "deliveries", tmp_path / "notes"
    handler_module(
        "poison",
        f"""\
        import os, signal

        async def handle(req):
            if req.body.startswith(b"poison"):
                with open({str(deliveries)!r}, "a") as deliveries:
                    deliveries.write(req.body.decode() + "\\n")
                if os.path.exists({str(flag)!r}):
                    os.kill(os.getpid(), signal.SIGKILL)
            if req.body.startswith(b"note"):
                with open({str(notes)!r}, "a") as notes:
                    notes.write(req.body.decode() + "\\n")
            return req.body
        """,
    )
    flag.touch()
    return flag, deliveries, notes


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def send_oneway(address: str, body: bytes, audsid: int = 1) -> None:
    async with Session(address, audsid=audsid) as session:
        session.write(body)
        await session.send_request(1, oneway=True)


async def test_a_request_that_kills_its_worker_is_set_aside_after_poison_after_deliveries(
    run, poison, handler_path, nursery
):
    """The one-way requests killed with it are handled, none set aside with it (its last delivery goes
    alone); the proxy serves on; it is logged once, counted in `dcod status`, listed, retried once its
    handler is fixed, dropped, and a fresh `dcod run` does not replay it."""
    flag, deliveries, notes = poison
    r = run(
        '[[proxy]]\nid = 1\nhandler = "poison:handle"\ninstances = 2\n' + handler_path,
        supervisor=FAST_PMON + "restart_max = 10\n",
        poison_after=3,
    )
    await r.notification("READY=1")
    store = DeadLetters(r.config.state_dir, 1)
    address = r.config.hub.advertise
    served = lost = 0
    poisoned = trio.Event()

    async def others() -> None:
        """Sync calls on another session meanwhile: answered, or, in flight on an instance the poison
        request killed, answered with the worker-lost error."""
        nonlocal served, lost
        async with Session(address, audsid=2) as session:
            while not poisoned.is_set():
                try:
                    assert await session.call_sync(1, b"ping", timeout=15) == b"ping"
                    served += 1
                except DcoError as e:
                    assert "DCO-0003" in str(e)
                    lost += 1

    nursery.start_soon(others)
    started = time.monotonic()
    async with Session(address, audsid=1) as session:
        session.write(b"poison 1")
        await session.send_request(1, oneway=True, buffered=True)
        for n in range(5):  # behind it, in the same write: to the same instance, killed with it
            session.write(b"note %d" % n)
            await session.send_request(1, oneway=True, buffered=True)
        await session.flush()
        await wait_for(lambda: store.count() == 1, timeout=30)
    took = time.monotonic() - started
    poisoned.set()
    print(f"poison request set aside after {took:.2f}s; {served} other calls served meanwhile, {lost} lost")
    assert lines(deliveries) == ["poison 1"] * 3
    # Each at least once (one handled just before its instance died is handled again): none set aside.
    await wait_for(lambda: set(lines(notes)) == {f"note {n}" for n in range(5)}, timeout=10)
    assert served > 0
    assert r.log.count("set aside as poison") == 1
    [letter] = store.letters()
    assert (letter.proxy, letter.audsid, letter.oneway, letter.attempts) == (1, 1, True, 3)
    assert letter.pdu.endswith(b"poison 1") and letter.size == 12 + len(b"poison 1")

    snapshot = status(r.config)
    proxy = snapshot["hub"]["proxies"]["1"]
    assert (proxy["dead_letters"], proxy["poisoned"], proxy["dead_letter_file"]) == (1, 1, str(store.path))
    assert row(snapshot, "hub")["dead"] == 1
    shown = await dcod_async(r.config, "status")
    assert "DEAD" in shown.stdout and f"1 request set aside as poison in {store.path}" in shown.stdout
    listed = await dcod_async(r.config, "dead-letters", "list")
    assert listed.returncode == 0 and "one-way" in listed.stdout and str(letter.rseq) in listed.stdout

    async with Session(address, audsid=3) as session:  # the proxy serves on
        for _ in range(10):
            assert await session.call_sync(1, b"ping", timeout=15) == b"ping"

    # Fixed: retried, it is delivered and handled once more.
    flag.unlink()
    retried = await dcod_async(r.config, "dead-letters", "retry", "1", "--all")
    assert retried.returncode == 0 and "1 dead letter queued again: 1" in retried.stdout, retried.stderr
    await wait_for(lambda: len(lines(deliveries)) == 4, timeout=10)
    assert store.count() == 0

    # Another one set aside, then a fresh `dcod run` on the same state directory: not replayed.
    flag.touch()
    await send_oneway(address, b"poison 2")
    await wait_for(lambda: store.count() == 1, timeout=30)
    assert r.stop() == 0
    assert lines(deliveries)[4:] == ["poison 2"] * 3
    offline = await dcod_async(r.config, "dead-letters", "list", "1", "--json")  # no service: on the file
    [left] = json.loads(offline.stdout)
    assert left["rseq"] != letter.rseq and left["attempts"] == 3
    again = run(config=r.config)
    await again.notification("READY=1")
    await send_oneway(address, b"note 5")
    await wait_for(lambda: "note 5" in lines(notes), timeout=10)
    assert len(lines(deliveries)) == 7
    unknown = await dcod_async(again.config, "dead-letters", "retry", "7", "--all")
    assert unknown.returncode == 1 and "proxy 7 is not in" in unknown.stderr
    missing = await dcod_async(again.config, "dead-letters", "drop", "1", str(left["id"]), "99")
    assert missing.returncode == 1 and "proxy 1 has no dead letter 99" in missing.stderr
    assert f"1 dead letter dropped: {left['id']}" in missing.stdout
    assert (await dcod_async(again.config, "dead-letters", "list")).stdout.strip() == "no dead letters"


async def test_a_sync_request_a_session_sends_again_and_again_is_set_aside_and_refused(
    run, poison, handler_path, nursery
):
    """A session's retry loop sends the same call that kills its worker after each DCO-0003: after
    poison_after deaths it gets DCO-0008, then DCO-0008 at once with no delivery; other calls are
    served meanwhile, and the instance is not left down (restart_max 5). Once its dead letter is
    dropped (the handler fixed), the same call is served."""
    flag, deliveries, _ = poison
    r = run('[[proxy]]\nid = 1\nhandler = "poison:handle"\n' + handler_path, supervisor=FAST_PMON, poison_after=3)
    await r.notification("READY=1")
    store = DeadLetters(r.config.state_dir, 1)
    address = r.config.hub.advertise
    served = lost = 0
    done = trio.Event()

    async def others() -> None:
        nonlocal served, lost
        async with Session(address, audsid=2) as session:
            while not done.is_set():
                try:
                    assert await session.call_sync(1, b"ping", timeout=15) == b"ping"
                    served += 1
                except DcoError as e:  # in flight on the instance the poison request killed
                    assert e.code == 3, e
                    lost += 1

    nursery.start_soon(others)
    codes = []
    async with Session(address, audsid=1) as session:
        while codes[-2:] != [8, 8] and len(codes) < 8:
            with pytest.raises(DcoError) as answer:
                await session.call_sync(1, b"poison", timeout=15)
            codes.append(answer.value.code)
        print(f"answers to the resent call: {codes}; {served} other calls served meanwhile, {lost} lost")
        assert codes == [3, 3, 8, 8] and "set aside as poison" in answer.value.text
        assert lines(deliveries) == ["poison"] * 3  # the last resend was not delivered
        assert await session.call_sync(1, b"ping", timeout=15) == b"ping"
        await wait_for(lambda: served > 0, timeout=15)
        done.set()
    [letter] = store.letters()
    assert (letter.audsid, letter.oneway, letter.attempts, letter.pdu[12:]) == (1, False, 3, b"poison")
    proxy = status(r.config)["hub"]["proxies"]["1"]
    assert (proxy["poisoned"], proxy["poison_refused"], proxy["worker_lost"]) == (1, 1, 2 + lost)
    worker = row(status(r.config), "worker 1#0")
    assert (worker["state"], worker["restarts"]) == ("ready", 3)
    assert r.log.count("set aside as poison: its worker instance went away") == 1
    assert r.log.count("refused: the same request was set aside as poison") == 1
    retried = await dcod_async(r.config, "dead-letters", "retry", "1", "--all")
    assert retried.returncode == 1 and store.count() == 1
    assert "nothing retried: dead letters 1 are sync requests" in retried.stderr
    flag.unlink()
    dropped = await dcod_async(r.config, "dead-letters", "drop", "1", "--all")
    assert dropped.returncode == 0 and store.count() == 0
    await wait_for(lambda: "1 poison sync requests dropped from its dead letters: served again" in r.log, timeout=10)
    async with Session(address, audsid=1) as session:
        assert await session.call_sync(1, b"poison", timeout=15) == b"poison"
    assert lines(deliveries) == ["poison"] * 4


async def test_the_attempts_of_a_request_survive_a_fresh_dcod_run(run, poison, handler_path):
    """Its one instance left down after it killed it once (restart_max 1), the request waits in the
    spool with its attempt; the next `dcod run` delivers it, it kills again: poison_after 2 reached."""
    _, deliveries, _ = poison
    r = run(
        '[[proxy]]\nid = 1\nhandler = "poison:handle"\n' + handler_path,
        supervisor=FAST_PMON + "restart_max = 1\n",
        poison_after=2,
    )
    await r.notification("READY=1")
    await send_oneway(r.config.hub.advertise, b"poison")
    await wait_for(lambda: "leaving it down" in r.log, timeout=15)
    await wait_for(lambda: instance_in_hub(r.config, 1, 0)["queued_now"] == 1, timeout=10)
    assert lines(deliveries) == ["poison"]
    assert r.stop() == 0

    again = run(config=r.config)
    store = DeadLetters(r.config.state_dir, 1)
    await wait_for(lambda: store.count() == 1, timeout=30)
    assert lines(deliveries) == ["poison"] * 2 and store.letters()[0].attempts == 2
    assert again.stop() == 0


async def test_an_instance_that_dies_is_held_before_the_hub_can_reconnect_into_its_backlog(run, poison, handler_path):
    """The hub sees the connection end before the supervisor has reaped the process and sent `hold`:
    it holds the instance itself, so its requests wait in the queue, not in the socket's backlog that
    the supervisor keeps for a next process, which never comes here (restart_max 1: left down)."""
    _, deliveries, _ = poison
    r = run(
        '[[proxy]]\nid = 1\nhandler = "poison:handle"\n' + handler_path,
        supervisor=FAST_PMON + "restart_max = 1\n",
    )
    await r.notification("READY=1")
    async with Session(r.config.hub.advertise, audsid=1) as session:
        session.write(b"poison")
        await session.send_request(1, oneway=True, buffered=True)
        for n in range(20):
            session.write(b"note %d" % n)
            await session.send_request(1, oneway=True, buffered=True)
        await session.flush()
        await wait_for(lambda: "leaving it down" in r.log, timeout=15)
        await wait_for(lambda: instance_in_hub(r.config, 1, 0)["held"], timeout=10)
        for n in range(20, 30):  # and those that come while it is down
            session.write(b"note %d" % n)
            await session.send_request(1, oneway=True)
        await wait_for(lambda: instance_in_hub(r.config, 1, 0)["queued_now"] == 31, timeout=10)
    held = instance_in_hub(r.config, 1, 0)
    assert (held["inflight"], held["unacked"]) == (0, 0)
    assert lines(deliveries) == ["poison"]


async def test_a_hold_of_the_hubs_own_after_a_lost_connection_lasts_only_until_the_supervisor_would_have_said(
    make_config, start_hub
):
    """A worker that ends its connection without a quit notice and without dying (the supervisor
    holds no instance for it) is used again after hold_after_loss; one the supervisor holds stays held."""
    config = make_config('[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 2\n')
    peers = [await WorkerPeer(str(config.worker_socket(1, i))).listen() for i in range(2)]
    hub, _ = await start_hub(config)
    hub.hold_after_loss = 0.5
    first, second = [await peer.accept() for peer in peers]
    instances = hub.router.proxies[1].instances
    await wait_for(lambda: all(i.state == "up" for i in instances))
    hub.held_by_supervisor.add(instances[1])  # as _hold does when the supervisor's word comes
    first.close()
    second.close()
    await wait_for(lambda: all(i.held for i in instances))
    reconnected = [await peer.accept() for peer in peers]
    await wait_for(lambda: not instances[0].held, timeout=5)
    assert instances[1].held and instances[0].available
    for sock in reconnected:
        sock.close()


def test_a_dead_letter_line_cut_short_by_a_crash_costs_only_itself(tmp_path, caplog):
    store = DeadLetters(tmp_path, 1)
    pdu = struct.pack(">iIi", -14, 7, 42) + b"hi"
    first = store.add(pdu, 3)
    with open(store.path, "ab") as file:
        file.write(b'{"id": 2, "proxy": 1, "aud')  # an append a crash cut short
    second = store.add(pdu, 3)
    assert [letter.id for letter in store.letters()] == [first.id, second.id] == [1, 2]
    assert "line 2 is not a dead letter" in caplog.text
    assert store.count() == 2 and store.take([1]) == [first]
    assert store.letters() == [second] and store.count() == 1


async def test_a_supervisor_started_on_a_full_disk_serves_degraded_and_says_so(run, tmp_path):
    """Seen in the chaos run: the marker of a running hub (for an unclean stop's alert at the next
    start) could not be written, and `dcod run` died of the traceback, again at every restart."""
    with tmpfs(tmp_path / "full", size="1m") as state:
        fill(state)
        r = run(ECHO, state_dir=state)
        await r.notification("READY=1")
        async with Session(r.config.hub.advertise, audsid=11) as session:
            assert await session.call_sync(1, b"served") == b"served"
        assert "Traceback" not in r.log
        assert "No space left on device" in r.log  # said, with what it costs
        result = await dcod_async(r.config, "status")
        assert result.returncode == 3, result.stdout + result.stderr


async def test_a_poison_request_the_full_disk_cannot_take_is_held_until_it_can(run, poison, handler_path, tmp_path):
    with tmpfs(tmp_path / "small", size="1m") as state:
        _, deliveries, _ = poison
        r = run(
            '[[proxy]]\nid = 1\nhandler = "poison:handle"\n' + handler_path,
            supervisor=FAST_PMON,
            state_dir=state,
            poison_after=2,
        )
        await r.notification("READY=1")
        filler = fill(state)
        await send_oneway(r.config.hub.advertise, b"poison")
        await wait_for(lambda: "held in memory until it can be written" in r.log, timeout=20)
        proxy = status(r.config)["hub"]["proxies"]["1"]
        assert proxy["dead_letters"] == 1  # counted where the operator looks, though not on disk yet
        filler.unlink()
        store = DeadLetters(state, 1)
        await wait_for(lambda: store.count() == 1, timeout=10)
        assert lines(deliveries) == ["poison"] * 2  # set aside, not delivered again meanwhile
        assert status(r.config)["hub"]["proxies"]["1"]["dead_letters"] == 1


def hub_rss(r) -> int:
    [hub] = r.children_with(" hub")
    return hub.memory_info().rss


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "state_dir_full"])
async def test_the_memory_a_hub_holds_for_a_slow_proxy_is_bounded_by_queue_memory(
    run, handler_module, handler_path, tmp_path, nursery, durable
):
    """A live worker that takes one-way requests and does not finish them (its handlers wait for a
    file): 96 MiB of 64 KiB one-way requests. The hub forwards at most queue_memory of them to it,
    and its RSS stays within a bound tied to queue_memory. The rest wait in the spool (on disk),
    with a sync request sent behind them; once the worker goes on, every one-way request is
    delivered, once, and the sync one answered. With the state directory full (the spool not
    durable), what memory is left holds requests, and past it one-way requests are refused and
    counted; the sync one, with nothing queued ahead of it, goes to the worker; all that was taken
    is delivered."""
    go, delivered = tmp_path / "go", tmp_path / "delivered"
    handler_module(
        "stuck",
        f"""\
        import os
        import trio

        async def handle(req):
            while not os.path.exists({str(go)!r}):
                await trio.sleep(0.05)
            if not req.sync:
                with open({str(delivered)!r}, "a") as notes:
                    notes.write(req.body[:6].decode() + "\\n")
            return req.body
        """,
    )
    queue_memory, count, size = 8 << 20, 1536, 64 << 10
    with contextlib.ExitStack() as mounted:
        state = None if durable else mounted.enter_context(tmpfs(tmp_path / "state", "16m"))
        r = run(
            '[[proxy]]\nid = 1\nhandler = "stuck:handle"\n' + handler_path,
            supervisor=FAST_PMON,
            queue_memory=queue_memory,
            reply_timeout=120.0,
            state_dir=state,
        )
        await r.notification("READY=1")
        if not durable:
            fill(state)
        baseline = peak = hub_rss(r)
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, hub_rss(r))
                await trio.sleep(0.02)

        nursery.start_soon(sample)
        async with Session(r.config.hub.advertise, audsid=1) as session:
            for n in range(count):
                session.write(b"%06d" % n + b"x" * (size - 6))
                await session.send_request(1, oneway=True, buffered=n % 16 != 15)
            sync_body = b"sync".ljust(size, b"y")
            session.write(sync_body)
            rseq = await session.send_request(1)
            await wait_for(lambda: status(r.config)["hub"]["proxies"]["1"]["requests"] == count + 1, timeout=120)
            proxy = status(r.config)["hub"]["proxies"]["1"]
            peak = max(peak, hub_rss(r))
            sampling = False
            print(
                f"hub RSS {baseline >> 20} MiB at start, at most {peak >> 20} MiB with {count * size >> 20} MiB "
                f"sent (queue_memory {queue_memory >> 20} MiB): {proxy['unacked']} unacknowledged, "
                f"{proxy['queued_now']} queued, {proxy['refused']} refused, memory_bytes {proxy['memory_bytes']}"
            )
            assert peak - baseline <= 3 * queue_memory
            # The bound, and the next request in line, read back from the spool to be forwarded next.
            assert proxy["memory_bytes"] <= queue_memory + size + 12 and proxy["unacked"] * size <= queue_memory
            assert proxy["queued_now"] + proxy["unacked"] + proxy["refused"] + proxy["inflight"] == count + 1
            if durable:
                assert proxy["refused"] == 0 and proxy["queued_now"] == count + 1 - proxy["unacked"]
            else:
                assert proxy["refused"] == count - proxy["unacked"] and proxy["inflight"] == 1
                assert "not durable: cannot write to it: No space left" in r.log
            go.touch()
            assert await session.read_response(rseq, timeout=120) == sync_body
        taken = count - proxy["refused"]
        await wait_for(lambda: delivered.exists() and len(delivered.read_text().splitlines()) >= taken, timeout=120)
        tags = delivered.read_text().splitlines()
        assert len(tags) == len(set(tags)) == taken and set(tags) <= {"%06d" % n for n in range(count)}
        proxy = status(r.config)["hub"]["proxies"]["1"]
        assert (proxy["acked"], proxy["queued_now"], proxy["memory_bytes"]) == (taken, 0, 0)
