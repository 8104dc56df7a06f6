"""The Prometheus endpoint (`[metrics] listen`): a real `dcod run` scraped under load, its figures
against `dcod status --json`; scrapers that stall; the configuration; every name documented."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from dcod import config as configuration
from dcod.supervisor import metrics
from load import Load
from runs import ECHO
from test_rollout import dcod, status

METRICS_DOC = Path(__file__).parent.parent / "docs" / "METRICS.md"


def with_metrics(port: int, proxies: str = ECHO) -> str:
    return proxies + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'


async def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """GET /metrics, parsed: value by (sample name, labels); each family's type checked against METRICS."""
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in metrics.METRICS and metrics.METRICS[name][0] == family.type, (name, family.type)
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict, name: str, **labels: object) -> float:
    return samples[name, frozenset((k, str(v)) for k, v in labels.items())]


def figures(snapshot: dict, samples: dict | None = None) -> dict[tuple, float]:
    """The counters both `dcod status --json` and the metrics have, by what names them: from the
    snapshot, or (``samples``) the same figures read from a scrape."""
    found = {}
    for row in snapshot["processes"]:
        labels = {"process": row["name"], "role": row["role"], "generation": row["generation"]}
        labels |= {"proxy": row["proxy"] or "", "worker": f"{row['proxy']}#{row['instance']}" if row["proxy"] else ""}
        for key, name in (("done", "dcod_process_requests_done_total"), ("errors", "dcod_process_errors_total")):
            found[row["name"], row["generation"], key] = row[key] if samples is None else value(samples, name, **labels)
    generation = next(p["generation"] for p in snapshot["processes"] if p["role"] == "hub")
    for proxy_id, proxy in snapshot["hub"]["proxies"].items():
        for key, name in (("requests", "dcod_proxy_requests_total"), ("replies", "dcod_proxy_replies_total")):
            found["proxy", proxy_id, key] = (
                proxy[key] if samples is None else value(samples, name, proxy=proxy_id, generation=generation)
            )
    found["hub", "sessions"] = (
        snapshot["hub"]["totals"].get("sessions", 0)
        if samples is None
        else value(samples, "dcod_hub_sessions_total", generation=generation)
    )
    return found


def counters(samples: dict) -> dict:
    return {key: v for key, v in samples.items() if metrics.METRICS.get(key[0], ("",))[0] == "counter"}


async def test_the_metrics_are_the_status_figures_and_grow_under_load(run):
    port = free_port()
    r = run(with_metrics(port))
    await r.notification("READY=1")
    load = Load(r.config.hub.listen, r.config.alert_file, sessions=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        await under_load(r, port, load)
        load.stop()  # the nursery waits for every session's last call

    # Once the load has stopped and the heartbeats have said so, they are the same figures.
    with trio.fail_after(30):
        while True:
            before = await trio.to_thread.run_sync(status, r.config)
            samples = await scrape(port)
            after = await trio.to_thread.run_sync(status, r.config)
            if figures(before) == figures(after) and figures(before)["proxy", "1", "replies"] == load.ok:
                break
    assert figures(before, samples) == figures(before)
    for row in before["processes"]:
        labels = {"process": row["name"], "role": row["role"], "generation": row["generation"]}
        labels |= {"proxy": row["proxy"] or "", "worker": f"{row['proxy']}#{row['instance']}" if row["proxy"] else ""}
        assert value(samples, "dcod_process_state", state=row["state"], **labels) == 1
        assert value(samples, "dcod_process_resident_memory_bytes", **labels) > 0
        assert value(samples, "dcod_process_cpu_seconds_total", **labels) > 0


async def under_load(r, port: int, load: Load) -> None:
    await load.progress(100)
    # Under load every figure moves: a scrape between two `dcod status` lies between their figures.
    before = await trio.to_thread.run_sync(status, r.config)
    first = await scrape(port)
    after = await trio.to_thread.run_sync(status, r.config)
    low, high = figures(before), figures(after)
    scraped = figures(before, first)
    assert low.keys() == high.keys() == scraped.keys()
    for key, got in scraped.items():
        assert low[key] <= got <= high[key], (key, low[key], got, high[key])
    assert value(first, "dcod_ready") == 1 and value(first, "dcod_degraded") == 0

    await load.progress(300)
    second = await scrape(port)
    grown = counters(second)
    for key, earlier in counters(first).items():
        assert grown[key] >= earlier, key
    hub = {"process": "hub", "role": "hub", "proxy": "", "worker": "", "generation": 1}
    assert value(second, "dcod_process_requests_done_total", **hub) > value(
        first, "dcod_process_requests_done_total", **hub
    )
    assert value(second, "dcod_proxy_reply_latency_seconds_count", proxy=1, generation=1) >= 300


async def test_scrapers_that_stall_stop_neither_a_scrape_nor_the_supervisor(run):
    port = free_port()
    # The supervisor's watchdog pings (WATCHDOG=1) come from its event loop: they go on only if it runs.
    r = run(with_metrics(port), how={"env": {"WATCHDOG_USEC": "200000"}})
    await r.notification("READY=1")
    idle = []
    for _ in range(metrics.MAX_CONNECTIONS + 4):  # more than the endpoint keeps open
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        idle.append(sock)
    trickling = trio.socket.socket()
    await trickling.connect(("127.0.0.1", port))

    async def trickle() -> None:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
            await trickling.send(bytes([byte]))
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        for _ in range(3):
            samples = await scrape(port)
            assert value(samples, "dcod_ready") == 1
        await r.notification("WATCHDOG=1")
        await r.notification("WATCHDOG=1")
        nursery.cancel_scope.cancel()
    assert (await trio.to_thread.run_sync(dcod, r.config, "status")).returncode == 0
    # The oldest connections made room for the scrapes: the endpoint closed them (long before their timeout).
    with trio.fail_after(metrics.EXCHANGE_TIMEOUT / 2):
        assert await idle[0].recv(1) == b""
    for sock in [*idle, trickling]:
        sock.close()


async def test_an_endpoint_that_cannot_listen_is_refused_by_config_check_and_run(run, make_config, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(with_metrics(port))
        expected = f"{config.source}: metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
        check = await trio.to_thread.run_sync(dcod, config, "config", "--check")
        assert check.returncode == 1 and expected in check.stderr, check.stderr
        r = run(config=config)
        assert await trio.to_thread.run_sync(r.proc.wait, 30) == 1
        assert expected in r.log
        assert "started: pid" not in r.log  # before any child
    assert (await trio.to_thread.run_sync(dcod, config, "config", "--check")).returncode == 0  # free again


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('listen = "9523"', "metrics.listen: must be host:port, not '9523'"),
        ('listen = "/run/dcod/metrics.sock:1"', "metrics.listen: must be host:port"),
        ("listen = 9523", "metrics.listen: must be a string"),
        ('port = "9523"', "metrics.port: unknown key (known: listen)"),
    ],
)
def test_the_metrics_table_is_validated(table, error):
    with pytest.raises(configuration.ConfigError, match=re.escape(f"x.toml: {error}")):
        configuration.parse(f"[metrics]\n{table}\n", "x.toml")


def test_the_endpoint_is_off_by_default():
    assert configuration.load(None).metrics.listen == ""
    assert metrics.bind(configuration.load(None)) is None


async def test_a_reload_says_that_a_new_listen_waits_for_a_restart(run):
    port, other = free_port(), free_port()
    r = run(with_metrics(port))
    await r.notification("READY=1")
    path = Path(r.config.source)
    path.write_text(path.read_text().replace(f":{port}", f":{other}"))
    result = await trio.to_thread.run_sync(dcod, r.config, "reload")
    assert result.returncode == 0, result.stderr
    assert (
        f"reload: metrics.listen changed to 127.0.0.1:{other}: the endpoint stays on 127.0.0.1:{port} "
        "until the service restarts" in result.stdout
    )
    assert value(await scrape(port), "dcod_last_reload_success") == 1


# ---------------------------------------------------------------- the HTTP framing, in process

QUIET = {
    "supervisor": {"pid": 1, "uptime": 1.0, "rss": None, "cpu_seconds": None, "rollout": None, "alerts": {}},
    "processes": [],
    "hub": None,
}


@pytest.fixture
async def endpoint(nursery, monkeypatch):
    """The port of a MetricsServer serving QUIET, whose exchanges time out after 0.5 s."""
    monkeypatch.setattr(metrics, "EXCHANGE_TIMEOUT", 0.5)
    sock = socket.create_server(("127.0.0.1", 0))
    nursery.start_soon(metrics.MetricsServer(sock, lambda: QUIET).serve)
    return sock.getsockname()[1]


async def exchange(port: int, request: bytes) -> bytes:
    """What the endpoint answers to ``request``, up to its close."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            answer = b""
            while data := await stream.receive_some():
                answer += data
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
        (b"GET /metrics?name[]=dcod_ready HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed\r\n"),
        (b"GET /metrics\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
        (b"GET /metrics HTTP/1.1\r\nnonsense\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
        ((b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 9000)[:9000], b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
    ],
)
async def test_one_get_of_metrics_per_connection(endpoint, request_bytes, status_line):
    answer = await exchange(endpoint, request_bytes)
    assert answer.startswith(status_line), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    if status_line.endswith(b"200 OK\r\n"):
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert b"dcod_ready 1.0" in body


async def test_an_exchange_that_takes_too_long_is_closed(endpoint):
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", endpoint)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the headers
        assert await stream.receive_some() == b""
    assert (await exchange(endpoint, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")


def test_every_metric_is_documented():
    doc = METRICS_DOC.read_text()
    documented = dict(re.findall(r"^\| `(dcod_\w+)` \| (\w+) \|", doc, re.MULTILINE))
    assert documented == {name: kind for name, (kind, _, _) in metrics.METRICS.items()}
