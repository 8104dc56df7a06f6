"""The worker runtime and its built-in handlers. Handler authors need only ``Request``.

A handler is ``async def handle(req: Request) -> bytes | str | None`` in a module the workers can
import (``handler = "package.module:function"``; a directory outside site-packages goes in
``handler_path``), with optional ``init()`` and ``done()`` around serving. What it may rely on
(README, "Writing a worker handler"):

- it runs on trio, not asyncio: blocking code goes to ``await trio.to_thread.run_sync(f, *args)``,
  asyncio code to ``await trio.to_thread.run_sync(asyncio.run, coroutine_function(...))`` or is
  replaced by a library that runs on trio (anyio-based, such as httpx);
- up to ``concurrency`` requests (default 64) run at once in one thread, taking turns at each
  ``await``, each in a context of its own;
- a one-way request is delivered at least once: it may come again after the instance died
  handling it; ``(req.audsid, req.rseq)`` identifies it;
- an exception fails that request alone: the session gets the error reply ``DCO-0006 <type>:
  <text>`` if it understands error replies, and the worker's log the request's key and the
  traceback.
"""

from dcod.worker.runtime import Request

__all__ = ["Request"]
