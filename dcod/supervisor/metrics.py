"""The Prometheus endpoint (`[metrics] listen`): what `dcod status` shows, as metrics.

The supervisor already holds every child's counts: each heartbeat brings them, and
``Supervisor.snapshot()`` puts them together for `dcod status`. ``StatusCollector`` turns one such
snapshot into metric families at each scrape, so the metrics are the status's own figures, with no
bookkeeping of their own. Every name is in ``METRICS`` and documented in docs/METRICS.md.

Served in the supervisor's trio event loop rather than by prometheus_client's start_http_server:
that one runs a thread per connection without any timeout, so scrapers that connect and send
nothing would pile up threads, and its collect() would read the supervisor's state from another
thread while the trio thread changes it. Here the snapshot is taken in the event loop's thread,
each connection is a task with a deadline (EXCHANGE_TIMEOUT), at most MAX_CONNECTIONS are open (a
new one evicts the oldest, so idle connections cannot lock a scraper out), and only the HTTP
framing is ours: one GET /metrics per connection, answered with prometheus_client's encoder, then
closed. Nothing in it can block or end the event loop (the pmon and systemd's watchdog run there).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from dcod import __version__
from dcod.cli.admin import problems
from dcod.config import Config, ConfigError
from dcod.net import sockets

log = logging.getLogger("dcod.supervisor")

MAX_CONNECTIONS = 16  # open at once; a new one closes the oldest
EXCHANGE_TIMEOUT = 10.0  # seconds for a whole exchange: the request in, the response out
MAX_REQUEST = 8192  # bytes of request line and headers
ACCEPT_RETRY = 0.1  # seconds to wait after accept() failed for want of a file descriptor or memory

COUNTER, GAUGE, SUMMARY = "counter", "gauge", "summary"
FAMILIES = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily, SUMMARY: SummaryMetricFamily}

PROCESS_LABELS = ("process", "role", "proxy", "worker", "generation")
SLOT_LABELS = ("process", "role", "proxy", "worker")  # a slot's figures span its generations

# name: (type, labels, help). docs/METRICS.md has a line for each (tests/test_metrics.py checks).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "dcod_build_info": (GAUGE, ("version",), "1, with the version of dcod running the supervisor"),
    "dcod_ready": (GAUGE, (), "1 when the serving hub generation and every worker instance are ready"),
    "dcod_degraded": (GAUGE, (), "1 when `dcod status` says DEGRADED (and exits 3)"),
    "dcod_reload_running": (GAUGE, (), "1 while a rollout (`dcod reload`, SIGHUP) runs"),
    "dcod_last_reload_success": (GAUGE, (), "1 if the last rollout completed, 0 if it failed; absent before one"),
    "dcod_last_reload_timestamp_seconds": (GAUGE, (), "when the last rollout started, seconds since the epoch"),
    "dcod_last_reload_duration_seconds": (GAUGE, (), "how long the last finished rollout took"),
    "dcod_alerts_raised_total": (COUNTER, ("backend",), "quit alerts a backend raised"),
    "dcod_alert_failures_total": (COUNTER, ("backend",), "quit alerts a backend failed to raise"),
    "dcod_alert_last_raised_timestamp_seconds": (GAUGE, ("backend",), "when a backend last raised the quit alert"),
    "dcod_alert_backend_failing": (GAUGE, ("backend",), "1 if the backend's last attempt failed"),
    # Every process: the supervisor (role supervisor), each hub generation alive, each worker instance.
    "dcod_process_state": (GAUGE, (*PROCESS_LABELS, "state"), "1 for the process's state, as `dcod status` says it"),
    "dcod_process_uptime_seconds": (GAUGE, PROCESS_LABELS, "seconds since the process started"),
    "dcod_process_resident_memory_bytes": (GAUGE, PROCESS_LABELS, "resident memory (RSS)"),
    "dcod_process_cpu_seconds_total": (COUNTER, PROCESS_LABELS, "CPU time, user and system"),
    "dcod_process_requests_done_total": (COUNTER, PROCESS_LABELS, "requests handled: replies and one-way (DONE)"),
    "dcod_process_errors_total": (COUNTER, PROCESS_LABELS, "requests that failed (ERRORS)"),
    "dcod_process_inflight_requests": (GAUGE, PROCESS_LABELS, "requests taken and not answered yet (INFLIGHT)"),
    "dcod_process_queued_requests": (GAUGE, PROCESS_LABELS, "hub: requests waiting for a worker instance (QUEUED)"),
    "dcod_process_spool_bytes": (GAUGE, PROCESS_LABELS, "hub: bytes in the durable queue (SPOOLED)"),
    "dcod_process_dead_letters": (GAUGE, PROCESS_LABELS, "hub: requests in the dead-letter stores (DEAD)"),
    "dcod_process_restarts_total": (COUNTER, SLOT_LABELS, "processes started again after one ended (RESTARTS)"),
    "dcod_process_recent_failures": (GAUGE, SLOT_LABELS, "failures within restart_window; at restart_max: failed"),
    # The serving hub generation's view, per proxy and per worker instance of it.
    "dcod_hub_connections": (GAUGE, ("generation",), "Oracle connections open (hub.max_connections bounds them)"),
    "dcod_hub_sessions": (GAUGE, ("generation",), "Oracle sessions connected"),
    "dcod_hub_sessions_total": (COUNTER, ("generation",), "Oracle sessions that sent their handshake"),
    "dcod_hub_unknown_proxy_requests_total": (COUNTER, ("generation",), "requests for a proxy id not configured"),
    "dcod_hub_overloaded_requests_total": (COUNTER, ("generation",), "requests refused with DCO-0007"),
    "dcod_hub_withheld_errors_total": (
        COUNTER,
        ("generation",),
        "error replies not sent for an unknown proxy id: the session takes none",
    ),
    "dcod_hub_replies_without_session_total": (COUNTER, ("generation",), "replies whose session had gone"),
    "dcod_hub_refused_connections_total": (COUNTER, ("generation",), "connections refused: hub.allow, max_connections"),
    "dcod_hub_protocol_errors_total": (COUNTER, ("generation",), "session connections closed for a protocol error"),
    "dcod_hub_worker_protocol_errors_total": (COUNTER, ("generation",), "worker connections closed for one"),
    "dcod_hub_stalled_connections_total": (
        COUNTER,
        ("generation",),
        "sessions closed: stalled for stall_timeout mid-PDU",
    ),
    "dcod_hub_slow_readers_total": (COUNTER, ("generation",), "times a session left its replies unread and was paused"),
    "dcod_hub_truncated_pdus_total": (COUNTER, ("generation",), "sessions that went away in the middle of a PDU"),
    "dcod_proxy_requests_total": (COUNTER, ("proxy", "generation"), "requests received, sync and one-way (REQUESTS)"),
    "dcod_proxy_oneway_requests_total": (COUNTER, ("proxy", "generation"), "one-way requests received (ONEWAY)"),
    "dcod_proxy_oneway_acks_total": (COUNTER, ("proxy", "generation"), "one-way requests a worker acknowledged"),
    "dcod_proxy_replies_total": (COUNTER, ("proxy", "generation"), "replies delivered (REPLIES)"),
    "dcod_proxy_errors_total": (
        COUNTER,
        ("proxy", "generation", "origin"),
        "error replies, made by the hub or by a worker whose handler failed (ERRORS: both)",
    ),
    "dcod_proxy_withheld_errors_total": (
        COUNTER,
        ("proxy", "generation"),
        "error replies not sent: the session takes none (WITHHELD)",
    ),
    "dcod_proxy_timeouts_total": (COUNTER, ("proxy", "generation"), "DCO-0002: no reply in reply_timeout (TIMEOUTS)"),
    "dcod_proxy_lost_requests_total": (COUNTER, ("proxy", "generation"), "DCO-0003: the instance went away (LOST)"),
    "dcod_proxy_refused_requests_total": (
        COUNTER,
        ("proxy", "generation"),
        "DCO-0004 (queue full), DCO-0007 (REFUSED)",
    ),
    "dcod_proxy_enqueued_requests_total": (COUNTER, ("proxy", "generation"), "requests that waited in the queue"),
    "dcod_proxy_not_durable_requests_total": (
        COUNTER,
        ("proxy", "generation"),
        "requests queued while the spool could not write: held in memory only",
    ),
    "dcod_proxy_requeued_requests_total": (
        COUNTER,
        ("proxy", "generation"),
        "requests queued again: their instance went away",
    ),
    "dcod_proxy_replayed_requests_total": (COUNTER, ("proxy", "generation"), "requests replayed from a spool file"),
    "dcod_proxy_expired_requests_total": (
        COUNTER,
        ("proxy", "generation"),
        "queued requests dropped: DCO-0002 answered them",
    ),
    "dcod_proxy_possible_duplicates_total": (
        COUNTER,
        ("proxy", "generation"),
        "requests sent again that a worker may have had (at most)",
    ),
    "dcod_proxy_orphan_replies_total": (COUNTER, ("proxy", "generation"), "replies to no request in flight"),
    "dcod_proxy_poisoned_requests_total": (
        COUNTER,
        ("proxy", "generation"),
        "requests set aside as poison by this hub generation",
    ),
    "dcod_proxy_poison_refused_requests_total": (
        COUNTER,
        ("proxy", "generation"),
        "sync requests answered DCO-0008 at once: the same body was set aside as poison",
    ),
    "dcod_proxy_dead_letters": (GAUGE, ("proxy", "generation"), "requests in the proxy's dead-letter store (DEAD)"),
    "dcod_proxy_reply_latency_seconds": (
        SUMMARY,
        ("proxy", "generation"),
        "from request to reply or error reply from a worker (AVG MS: sum / count)",
    ),
    "dcod_proxy_reply_latency_max_seconds": (GAUGE, ("proxy", "generation"), "the longest (MAX MS)"),
    "dcod_proxy_queued_requests": (GAUGE, ("proxy", "generation"), "requests waiting in the queue now (QUEUED)"),
    "dcod_proxy_spool_bytes": (GAUGE, ("proxy", "generation"), "bytes in the proxy's spool file"),
    "dcod_proxy_spool_durable": (GAUGE, ("proxy", "generation"), "0 while the spool cannot write (DEGRADED)"),
    "dcod_proxy_memory_only_requests": (GAUGE, ("proxy", "generation"), "queued requests not in the spool file"),
    "dcod_proxy_spool_damaged_ranges_total": (COUNTER, ("proxy", "generation"), "damaged spool ranges skipped"),
    "dcod_proxy_spool_damaged_bytes_total": (COUNTER, ("proxy", "generation"), "bytes in them"),
    "dcod_proxy_inflight_requests": (GAUGE, ("proxy", "generation"), "sync requests sent to a worker (INFLIGHT)"),
    "dcod_proxy_unacked_requests": (GAUGE, ("proxy", "generation"), "one-way requests not acknowledged (UNACKED)"),
    "dcod_instance_up": (
        GAUGE,
        ("proxy", "worker", "generation"),
        "1 if the hub is connected to the instance and does not hold it (INSTANCES)",
    ),
    "dcod_instance_held": (GAUGE, ("proxy", "worker", "generation"), "1 while the hub holds it (a restart, a reload)"),
    "dcod_instance_inflight_requests": (GAUGE, ("proxy", "worker", "generation"), "sync requests sent to it"),
    "dcod_instance_unacked_requests": (GAUGE, ("proxy", "worker", "generation"), "one-way requests not acknowledged"),
    "dcod_instance_connects_total": (COUNTER, ("proxy", "worker", "generation"), "connections the hub made to it"),
}

# The hub's totals (`dcod status`: hub totals) and the per-proxy Counters, by their key there.
HUB_TOTALS = {
    "sessions": "dcod_hub_sessions_total",
    "unknown_proxy": "dcod_hub_unknown_proxy_requests_total",
    "overloaded": "dcod_hub_overloaded_requests_total",
    "withheld": "dcod_hub_withheld_errors_total",
    "replies_without_session": "dcod_hub_replies_without_session_total",
    "refused_connections": "dcod_hub_refused_connections_total",
    "protocol_errors": "dcod_hub_protocol_errors_total",
    "worker_protocol_errors": "dcod_hub_worker_protocol_errors_total",
    "stalled": "dcod_hub_stalled_connections_total",
    "slow_readers": "dcod_hub_slow_readers_total",
    "truncated_pdus": "dcod_hub_truncated_pdus_total",
}
PROXY_FIGURES = {
    "requests": "dcod_proxy_requests_total",
    "oneway": "dcod_proxy_oneway_requests_total",
    "acked": "dcod_proxy_oneway_acks_total",
    "replies": "dcod_proxy_replies_total",
    "withheld": "dcod_proxy_withheld_errors_total",
    "timeouts": "dcod_proxy_timeouts_total",
    "worker_lost": "dcod_proxy_lost_requests_total",
    "refused": "dcod_proxy_refused_requests_total",
    "queued": "dcod_proxy_enqueued_requests_total",
    "not_durable": "dcod_proxy_not_durable_requests_total",
    "requeued": "dcod_proxy_requeued_requests_total",
    "replayed": "dcod_proxy_replayed_requests_total",
    "expired": "dcod_proxy_expired_requests_total",
    "duplicates": "dcod_proxy_possible_duplicates_total",
    "orphan_replies": "dcod_proxy_orphan_replies_total",
    "poisoned": "dcod_proxy_poisoned_requests_total",
    "poison_refused": "dcod_proxy_poison_refused_requests_total",
    "dead_letters": "dcod_proxy_dead_letters",
    "latency_max": "dcod_proxy_reply_latency_max_seconds",
    "queued_now": "dcod_proxy_queued_requests",
    "spooled_bytes": "dcod_proxy_spool_bytes",
    "memory_only": "dcod_proxy_memory_only_requests",
    "damaged_ranges": "dcod_proxy_spool_damaged_ranges_total",
    "damaged_bytes": "dcod_proxy_spool_damaged_bytes_total",
    "inflight": "dcod_proxy_inflight_requests",
    "unacked": "dcod_proxy_unacked_requests",
}
PROCESS_FIGURES = {
    "uptime": "dcod_process_uptime_seconds",
    "rss": "dcod_process_resident_memory_bytes",
    "cpu_seconds": "dcod_process_cpu_seconds_total",
    "done": "dcod_process_requests_done_total",
    "errors": "dcod_process_errors_total",
    "inflight": "dcod_process_inflight_requests",
    "queued": "dcod_process_queued_requests",
    "spooled": "dcod_process_spool_bytes",
    "dead": "dcod_process_dead_letters",
}


class _Families:
    """The families of one scrape, each made at its first sample."""

    def __init__(self) -> None:
        self.made: dict[str, Metric] = {}

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        family = self._family(name)
        assert isinstance(family, (CounterMetricFamily, GaugeMetricFamily)), name
        family.add_metric(self._values(name, labels), value)

    def add_summary(self, name: str, labels: dict[str, str], count: int, total: float) -> None:
        family = self._family(name)
        assert isinstance(family, SummaryMetricFamily), name
        family.add_metric(self._values(name, labels), count, total)

    def _family(self, name: str) -> Metric:
        if name not in self.made:
            kind, label_names, documentation = METRICS[name]
            self.made[name] = FAMILIES[kind](name, documentation, labels=label_names)
        return self.made[name]

    @staticmethod
    def _values(name: str, labels: dict[str, str]) -> list[str]:
        return [labels[label] for label in METRICS[name][1]]


class StatusCollector(Collector):
    """The metrics of ``snapshot()`` (a `dcod status` snapshot, taken anew at each scrape)."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self.snapshot()).made.values()


def families(status: dict) -> _Families:
    """The metric families of a `dcod status --json` snapshot."""
    out = _Families()
    sup = status["supervisor"]
    rows = status["processes"]
    out.add("dcod_build_info", {"version": __version__}, 1)
    serving_hub = next((p for p in rows if p["role"] == "hub"), None)  # the slot's current generation comes first
    ready = all(p["state"] == "ready" for p in rows if p is serving_hub or p["role"] == "worker")
    out.add("dcod_ready", {}, int(ready))
    out.add("dcod_degraded", {}, int(bool(problems(status))))
    _rollout(out, sup["rollout"])
    for backend, stats in sup["alerts"].items():
        labels = {"backend": backend}
        out.add("dcod_alerts_raised_total", labels, stats["sent"])
        out.add("dcod_alert_failures_total", labels, stats["failed"])
        if stats["last_sent"] is not None:
            out.add("dcod_alert_last_raised_timestamp_seconds", labels, stats["last_sent"])
        failed, sent = stats["last_failed"], stats["last_sent"]
        failing = failed is not None and (sent is None or failed > sent)  # as problems() says
        out.add("dcod_alert_backend_failing", labels, int(failing))
    supervisor_row = {"name": "supervisor", "role": "supervisor", "proxy": None, "instance": None, "generation": None}
    _process(out, {**supervisor_row, "state": "ready", **sup})
    seen_slots = set()
    for row in rows:
        _process(out, row)
        if row["name"] not in seen_slots:  # a slot's hub generations: one row each, one slot
            seen_slots.add(row["name"])
            labels = _labels(row, SLOT_LABELS)
            out.add("dcod_process_restarts_total", labels, row["restarts"])
            out.add("dcod_process_recent_failures", labels, row["failures"])
    if status["hub"] is not None and serving_hub is not None:
        _hub(out, status["hub"], str(serving_hub["generation"]))
    return out


def _rollout(out: _Families, rollout: dict | None) -> None:
    out.add("dcod_reload_running", {}, int(rollout is not None and rollout["state"] == "running"))
    if rollout is None:
        return
    out.add("dcod_last_reload_timestamp_seconds", {}, rollout["started"])
    if rollout["state"] != "running":
        out.add("dcod_last_reload_success", {}, int(rollout["state"] == "done"))
        out.add("dcod_last_reload_duration_seconds", {}, rollout["seconds"])


def _labels(row: dict, names: tuple[str, ...]) -> dict[str, str]:
    worker = f"{row['proxy']}#{row['instance']}" if row["proxy"] is not None else ""
    every = {
        "process": row["name"],
        "role": row["role"],
        "proxy": "" if row["proxy"] is None else str(row["proxy"]),
        "worker": worker,
        "generation": "" if row["generation"] is None else str(row["generation"]),
    }
    return {name: every[name] for name in names}


def _process(out: _Families, row: dict) -> None:
    labels = _labels(row, PROCESS_LABELS)
    out.add("dcod_process_state", {**labels, "state": row["state"]}, 1)
    for key, name in PROCESS_FIGURES.items():
        if row.get(key) is not None:  # absent for a process that is down, or not a hub's figure
            out.add(name, labels, row[key])


def _hub(out: _Families, hub: dict, generation: str) -> None:
    labels = {"generation": generation}
    out.add("dcod_hub_connections", labels, hub["connections"])
    out.add("dcod_hub_sessions", labels, hub["sessions"])
    for key, name in HUB_TOTALS.items():
        out.add(name, labels, hub["totals"].get(key, 0))
    for proxy_id, proxy in sorted(hub["proxies"].items(), key=lambda kv: int(kv[0])):
        labels = {"proxy": str(proxy_id), "generation": generation}
        for key, name in PROXY_FIGURES.items():
            out.add(name, labels, proxy[key])
        out.add("dcod_proxy_errors_total", {**labels, "origin": "hub"}, proxy["errors"])
        out.add("dcod_proxy_errors_total", {**labels, "origin": "worker"}, proxy["error_replies"])
        answered = proxy["replies"] + proxy["error_replies"]
        out.add_summary("dcod_proxy_reply_latency_seconds", labels, answered, proxy["latency_sum"])
        out.add("dcod_proxy_spool_durable", labels, int(proxy["durable"]))
        for instance in proxy["instances"]:
            instance_labels = {**labels, "worker": f"{proxy_id}#{instance['index']}"}
            up = instance["state"] == "up" and not instance["held"]
            out.add("dcod_instance_up", instance_labels, int(up))
            out.add("dcod_instance_held", instance_labels, int(instance["held"]))
            out.add("dcod_instance_inflight_requests", instance_labels, instance["inflight"])
            out.add("dcod_instance_unacked_requests", instance_labels, instance["unacked"])
            out.add("dcod_instance_connects_total", instance_labels, instance["connects"])


# ---------------------------------------------------------------- the endpoint


def bind(config: Config) -> socket.socket | None:
    """The endpoint's listening socket (None without ``metrics.listen``); ConfigError if it cannot listen."""
    address = config.metrics.listen
    if not address:
        return None
    try:
        return sockets.bind(address, backlog=MAX_CONNECTIONS)
    except OSError as e:
        raise ConfigError(f"{config.source}: metrics.listen: cannot listen on {address}: {e.strerror}") from None


class BadRequest(Exception):
    """The request cannot be answered: its status line says why."""


class MetricsServer:
    """Serves GET /metrics on a listening socket: run ``serve()`` in a task of the supervisor."""

    def __init__(self, sock: socket.socket, snapshot: Callable[[], dict]) -> None:
        self.address = sockets.address_of(sock)
        self.listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(snapshot))
        self._open: dict[trio.CancelScope, None] = {}  # the exchanges under way, oldest first

    async def serve(self) -> None:
        log.info("metrics: serving Prometheus metrics on http://%s/metrics", self.address)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await self.listener.accept()
                except OSError as e:  # EMFILE, ENOBUFS...: the connection waits in the backlog meanwhile
                    log.warning("metrics: cannot accept a connection: %s", e.strerror or e)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if len(self._open) >= MAX_CONNECTIONS:
                    oldest = next(iter(self._open))
                    del self._open[oldest]
                    oldest.cancel()
                nursery.start_soon(self._exchange, stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(EXCHANGE_TIMEOUT) as scope:
            self._open[scope] = None
            try:
                async with stream:
                    try:
                        response = self._respond(*await _read_request(stream))
                    except BadRequest as e:
                        response = _response(str(e), b"")
                    except EOFError:
                        return
                    await stream.send_all(response)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the scraper went away
            finally:
                self._open.pop(scope, None)

    def _respond(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        if path != "/metrics":
            return _response("404 Not Found", b"GET /metrics\n")
        if method != "GET":
            return _response("405 Method Not Allowed", b"GET /metrics\n", "Allow: GET")
        encode, content_type = choose_encoder(headers.get("accept", ""))
        try:
            body = encode(self.registry)
        except Exception:  # a bug of ours must not end the supervisor
            log.exception("metrics: cannot make the metrics")
            return _response("500 Internal Server Error", b"")
        log.debug("metrics: %d bytes of metrics", len(body))
        return _response("200 OK", body, f"Content-Type: {content_type}")


async def _read_request(stream: trio.SocketStream) -> tuple[str, str, dict[str, str]]:
    """Method, path (without the query) and headers (lower-case names) of one request; BadRequest,
    or EOFError if the peer ended it before it was whole."""
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > MAX_REQUEST:
            raise BadRequest("431 Request Header Fields Too Large")
        data = await stream.receive_some(MAX_REQUEST)
        if not data:
            raise EOFError
        head += data
    request_line, *lines = head[:end].decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("400 Bad Request")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest("400 Bad Request")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1].partition("?")[0], headers


def _response(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body
