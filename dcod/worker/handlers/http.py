"""Built-in ``http`` handler: an HTTP out-call described by the request body.

The body is an HTTP request as text: a first line ``METHOD URL``, header lines
``Name: value``, a blank line, then the content (lines end in \\n or \\r\\n; with no content
the blank line may be left out). The pseudo-header ``X-DCO-Timeout: <seconds>`` sets this
call's timeout and is not forwarded. The reply is the response as text:
``HTTP/1.1 <status> <reason>``, the response headers, a blank line, the content.

The content is returned as httpx delivers it, de-chunked and decompressed, so the headers
that described the transfer (Transfer-Encoding, Content-Encoding, Content-Length) are
replaced by the Content-Length of what is returned. Redirects are returned, not followed.
Any failure raises, and the session gets an error reply with its text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx

from dcod.worker import Request

DEFAULT_TIMEOUT = 10.0  # seconds for each phase of a call: connect, each read, each write
TIMEOUT_HEADER = b"x-dco-timeout"
TRANSFER_HEADERS = {b"transfer-encoding", b"content-encoding", b"content-length"}

_client: httpx.AsyncClient | None = None  # one per worker: keeps connections alive across calls


class InvalidOutCall(ValueError):
    """The request body does not describe an HTTP request."""


class OutCallFailed(Exception):
    """The HTTP call could not be made or completed (no response to return)."""


@dataclass(frozen=True)
class OutCall:
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes
    timeout: float

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


async def init() -> None:
    global _client
    _client = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)


async def done() -> None:
    await _client.aclose()


async def handle(req: Request) -> bytes:
    call = parse_out_call(req.body)
    try:
        response = await _client.request(
            call.method, call.url, headers=call.headers, content=call.content or None, timeout=call.timeout
        )
    except httpx.TimeoutException as e:
        raise OutCallFailed(f"{call}: timed out after {call.timeout:g} s ({type(e).__name__})") from None
    except httpx.ConnectError as e:
        raise OutCallFailed(f"{call}: cannot connect: {e}") from None
    except httpx.HTTPError as e:
        raise OutCallFailed(f"{call}: {type(e).__name__}: {e}") from None
    return format_response(response)


def parse_out_call(text: bytes) -> OutCall:
    """The HTTP request a body describes. Raises InvalidOutCall saying what is wrong and where."""
    lines, content = _split_head(text)
    if not lines or len(lines[0].split()) != 2:
        first = lines[0][:80] if lines else b""
        raise InvalidOutCall(f"line 1 must be 'METHOD URL', not {first!r}")
    method, url = (part.decode("utf-8", "replace") for part in lines[0].split())
    _check_url(url)
    headers = []
    timeout = DEFAULT_TIMEOUT
    for number, line in enumerate(lines[1:], start=2):
        name, colon, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        if not colon or not name or len(name.split()) != 1:
            raise InvalidOutCall(f"line {number} must be a header 'Name: value', not {line[:80]!r}")
        if name.lower() == TIMEOUT_HEADER:
            timeout = _timeout(value)
        else:
            headers.append((name, value))
    return OutCall(method.upper(), url, headers, content, timeout)


def _split_head(text: bytes) -> tuple[list[bytes], bytes]:
    """(head lines, content): the head ends at the first empty line, or with the text."""
    lines = []
    start = 0
    while start < len(text):
        end = text.find(b"\n", start)
        if end < 0:
            end = len(text)
        line = text[start:end].removesuffix(b"\r")
        start = end + 1
        if not line:
            break
        lines.append(line)
    return lines, text[start:]


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise InvalidOutCall(f"invalid URL {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidOutCall(f"URL must be absolute http:// or https://, not {url!r}")


def _timeout(value: bytes) -> float:
    try:
        seconds = float(value)
        valid = 0 < seconds < math.inf
    except ValueError:
        valid = False
    if not valid:
        raise InvalidOutCall(f"X-DCO-Timeout must be a number of seconds > 0, not {value.decode(errors='replace')!r}")
    return seconds


def format_response(response: httpx.Response) -> bytes:
    """The response as HTTP/1.1 text, its transfer headers replaced by the returned content's length."""
    content = response.content
    head = [b"HTTP/1.1 %d %s" % (response.status_code, response.reason_phrase.encode("latin-1", "replace"))]
    head += [name + b": " + value for name, value in response.headers.raw if name.lower() not in TRANSFER_HEADERS]
    head.append(b"Content-Length: %d" % len(content))
    return b"\r\n".join(head) + b"\r\n\r\n" + content
