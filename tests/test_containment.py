"""Issue 16, items 2 and 3, with real processes: a worker whose event loop blocks is killed and
restarted; an instance that is down is held in every hub generation, so that requests to it wait
in the queue instead of going into a listening backlog nobody serves; what the hub holds in memory
for a proxy with a slow worker stays within queue_memory."""

from __future__ import annotations

import contextlib
import signal
import time

import pytest
import trio

import test_rollout
from conftest import wait_for
from dcod.client import DcoError, DcoTimeout, Session
from mounts import fill, tmpfs
from runs import ECHO
from test_rollout import FAST_PMON, row, status

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
