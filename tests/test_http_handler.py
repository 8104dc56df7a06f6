"""The built-in ``http`` handler against a real HTTP server (http.server in a thread)."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from dcod import protocol
from dcod.net import sockets
from dcod.worker.handlers import http
from dcod.worker.handlers.http import InvalidOutCall, OutCallFailed, parse_out_call
from dcod.worker.runtime import Request, Worker, load_handler

GZIPPED_TEXT = b"squeezed " * 100


class Origin(BaseHTTPRequestHandler):
    """/hello: a fixed page; /echo: what it received, as JSON; /gzip: chunked and compressed;
    /stall: no answer until the test ends."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/hello":
            self.respond(200, [("X-Origin", "test")], b"hello")
        elif self.path == "/gzip":
            self.send_chunked_gzip()
        elif self.path == "/stall":
            self.server.released.wait()
            self.close_connection = True
        else:
            self.echo()

    def do_POST(self):
        self.echo()

    def echo(self):
        content = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": list(self.headers.items()),
            "body": content.decode(),
        }
        self.respond(201, [("Content-Type", "application/json")], json.dumps(seen).encode())

    def respond(self, status, headers, content):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def send_chunked_gzip(self):
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        packed = gzip.compress(GZIPPED_TEXT)
        for chunk in (packed[:10], packed[10:]):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format, *args):
        pass  # keep test output for failures


@pytest.fixture(scope="module")
def origin():
    """The base URL of a local HTTP server, serving from a thread while this module's tests run."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    server.released = threading.Event()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.released.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def refusing_url():
    """A URL whose port is bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield "http://127.0.0.1:%d/" % sock.getsockname()[1]


@pytest.fixture
async def out_call():
    """http.handle with the module's client set up and torn down as the worker would."""
    await http.init()

    async def call(text: str) -> bytes:
        return await http.handle(Request(audsid=1, rseq=1, body=text.encode(), sync=True))

    yield call
    await http.done()


def split_reply(reply: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, blank, content = reply.partition(b"\r\n\r\n")
    assert blank, f"no blank line after the head: {reply!r}"
    status, *lines = head.split(b"\r\n")
    return status, [tuple(line.split(b": ", 1)) for line in lines], content


async def test_get(origin, out_call):
    status, headers, content = split_reply(await out_call(f"GET {origin}/hello\n"))
    assert status == b"HTTP/1.1 200 OK"
    assert (b"X-Origin", b"test") in headers
    assert (b"Content-Length", b"5") in headers
    assert content == b"hello"


async def test_post_forwards_headers_and_body_but_not_the_timeout(origin, out_call):
    text = (
        f"POST {origin}/echo?q=1\r\nContent-Type: text/plain\r\nX-Trace: 42\r\n"
        f"X-DCO-Timeout: 5\r\n\r\nline one\nline two\r\n"
    )
    status, headers, content = split_reply(await out_call(text))
    assert status == b"HTTP/1.1 201 Created"
    assert (b"Content-Type", b"application/json") in headers
    seen = json.loads(content)
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/echo?q=1", "line one\nline two\r\n")
    received = {name.lower(): value for name, value in seen["headers"]}
    assert received["content-type"] == "text/plain"
    assert received["x-trace"] == "42"
    assert received["content-length"] == "19"
    assert "x-dco-timeout" not in received


async def test_decoded_content_comes_with_its_own_length(origin, out_call):
    status, headers, content = split_reply(await out_call(f"GET {origin}/gzip\n\n"))
    assert status == b"HTTP/1.1 200 OK"
    assert content == GZIPPED_TEXT
    names = [name.lower() for name, _ in headers]
    assert b"transfer-encoding" not in names and b"content-encoding" not in names
    assert (b"Content-Length", str(len(GZIPPED_TEXT)).encode()) in headers


async def test_stalled_server_times_out(origin, out_call):
    with trio.fail_after(5):
        with pytest.raises(OutCallFailed, match=rf"^GET {origin}/stall: timed out after 0\.2 s \(ReadTimeout\)$"):
            await out_call(f"GET {origin}/stall\nX-DCO-Timeout: 0.2\n\n")


async def test_refused_connection_fails(refusing_url, out_call):
    with pytest.raises(OutCallFailed, match=rf"^GET {refusing_url}: cannot connect: "):
        await out_call(f"GET {refusing_url}\n")


def routed_request(rseq: int, text: str) -> bytes:
    """A sync request as the hub forwards it to a worker: ``len, audsid, rseq, body``."""
    body = text.encode()
    return protocol.ROUTED_HEADER.pack(protocol.HEADER_SIZE + len(body), 1, rseq) + body


async def test_worker_replies_with_the_response_or_an_error_text(tmp_path, origin, refusing_url):
    """Through the worker: load_handler("http") with its init()/done(), replies and error replies."""
    path = str(tmp_path / "worker.sock")
    worker = Worker(load_handler("http"))
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.serve, sockets.bind(path))
        async with await trio.open_unix_socket(path) as hub:
            await hub.send_all(
                protocol.HUB_HANDSHAKE
                + routed_request(1, f"GET {origin}/hello\n")
                + routed_request(2, f"GET {refusing_url}\n")
            )
            await hub.send_eof()
            framer = protocol.Framer()
            replies = {}
            while data := await hub.receive_some():
                for pdu in framer.feed(data):
                    length, _, rseq = protocol.ROUTED_HEADER.unpack_from(pdu)
                    replies[rseq] = (length, bytes(pdu[protocol.HEADER_SIZE :]))
        worker.stop()
    assert replies[1][0] > 0 and replies[1][1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert replies[2][0] < 0
    assert replies[2][1].startswith(f"DCO-0006 OutCallFailed: GET {refusing_url}: cannot connect: ".encode())


@pytest.mark.parametrize(
    "text, method, url, headers, content, timeout",
    [
        ("GET http://h/x", "GET", "http://h/x", [], b"", 10.0),
        ("get http://h/x\n", "GET", "http://h/x", [], b"", 10.0),
        (
            "PUT https://h/\r\nA: 1\nB:two words \r\n\r\nbody\n\nmore",
            "PUT",
            "https://h/",
            [(b"A", b"1"), (b"B", b"two words")],
            b"body\n\nmore",
            10.0,
        ),
        ("GET http://h/\nx-dco-timeout: 2.5\n\n", "GET", "http://h/", [], b"", 2.5),
    ],
)
def test_parse_out_call(text, method, url, headers, content, timeout):
    call = parse_out_call(text.encode())
    assert (call.method, call.url, call.headers, call.content, call.timeout) == (method, url, headers, content, timeout)


@pytest.mark.parametrize(
    "text, error",
    [
        ("", r"line 1 must be 'METHOD URL', not b''"),
        ("GET\n", r"line 1 must be 'METHOD URL', not b'GET'"),
        ("GET http://h/ HTTP/1.1\n", r"line 1 must be 'METHOD URL'"),
        ("GET /relative\n", r"URL must be absolute http:// or https://, not '/relative'"),
        ("GET ftp://h/\n", r"URL must be absolute http:// or https://, not 'ftp://h/'"),
        ("GET http://h:x/\n", r"URL .*'http://h:x/'"),  # httpx >= 0.24 says why; 0.23 only that it is not http
        ("GET http://h/\nno colon here\n\n", r"line 2 must be a header 'Name: value', not b'no colon here'"),
        ("GET http://h/\nA: 1\n: empty name\n\n", r"line 3 must be a header 'Name: value'"),
        ("GET http://h/\nX-DCO-Timeout: soon\n\n", r"X-DCO-Timeout must be a number of seconds > 0, not 'soon'"),
        ("GET http://h/\nX-DCO-Timeout: 0\n\n", r"X-DCO-Timeout must be a number of seconds > 0, not '0'"),
    ],
)
def test_parse_out_call_refuses_bad_text(text, error):
    with pytest.raises(InvalidOutCall, match=error):
        parse_out_call(text.encode())
