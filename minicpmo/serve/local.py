"""Serve an app with uvicorn on a background thread of this process (tests, benchmarks, notebooks)."""

from __future__ import annotations

import contextlib
import threading
import time

from ..errors import DuplexError


class ServerStartError(DuplexError, RuntimeError):  # the serving family, beside ProtocolError
    """uvicorn did not start listening in time (port taken, app failed in its lifespan)."""


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0, **uvicorn_options):
    """Run `app` until the block ends; yields the WebSocket URL of its realtime endpoint (`ws://HOST:PORT/v1/realtime`).
    `port=0` takes a free port."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not (server.started and server.servers):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError(f"the server did not start on {host}:{port} within {start_timeout_s:.0f} s")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"ws://{host}:{bound}/v1/realtime"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


__all__ = ["ServerStartError", "running_server"]
