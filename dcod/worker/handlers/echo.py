"""Built-in ``echo`` handler: replies with the request body (smoke tests, benchmarks, health checks)."""

from __future__ import annotations

from dcod.worker import Request


async def handle(req: Request) -> bytes:
    return req.body
