"""Serving an ASGI app with uvicorn: the one way the project's web apps run.

    serve(app, "127.0.0.1", 8080)            # blocks; SIGINT/SIGTERM finish in-flight requests
    with running(app) as base_url:           # tests: a free loopback port, in a background thread
        httpx.get(base_url + "/")

Both bind the listening socket themselves, so "port in use" is an OSError naming the address
before uvicorn starts. Two small ASGI middlewares every app here wants: `BodyLimit` (refuse
request bodies over a size, 413) and `SecurityHeaders` (add fixed headers to every response).
Bounded by default: at most `limit_concurrency` open connections (uvicorn answers 503 beyond),
a listen backlog of 128, and `graceful_s` to finish in-flight requests at shutdown.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import uvicorn

DEFAULTS = {"limit_concurrency": 64, "backlog": 128, "timeout_keep_alive": 5,
            "timeout_graceful_shutdown": 10, "log_level": "warning"}


def bind(host: str = "127.0.0.1", port: int = 0, backlog: int = DEFAULTS["backlog"]) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. It listens at once, so
    a client that connects before uvicorn runs waits in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        error = OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                        "or --host")
        error.errno = e.errno
        raise error from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def make_server(app, **config) -> uvicorn.Server:
    """A uvicorn.Server for `app` with the bounded DEFAULTS; `config` overrides any
    uvicorn.Config argument (log_level, limit_concurrency, proxy_headers, ...)."""
    return uvicorn.Server(uvicorn.Config(app, **{**DEFAULTS, **config}))


def serve(app, host: str = "127.0.0.1", port: int = 8080, *,
          ready: Callable[[str], None] | None = None, **config) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting and let in-flight requests finish
    (at most timeout_graceful_shutdown seconds). Loopback unless `host` says otherwise.
    `ready(base_url)` is called once the port is bound (port 0: a free one).
    After SIGTERM uvicorn re-raises the signal, so the process ends with the signal's status."""
    sock = bind(host, port, config.get("backlog", DEFAULTS["backlog"]))
    port = sock.getsockname()[1]
    server = make_server(app, host=host, port=port, **config)
    if ready is not None:  # clients may connect now: the socket listens
        ready(_url(host, port))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after its graceful shutdown
        pass
    finally:
        sock.close()


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", *, start_timeout: float = 10.0,
            stop_timeout: float = 10.0, **config) -> Iterator[str]:
    """Serve `app` on a free port of `host` in a daemon thread; yields its base URL
    ('http://127.0.0.1:PORT'). Waits (bounded) until it accepts connections; on exit asks it
    to stop, lets in-flight requests finish, and waits (bounded) for the thread."""
    sock = bind(host, 0, config.get("backlog", DEFAULTS["backlog"]))
    port = sock.getsockname()[1]
    server = make_server(app, host=host, port=port, **config)
    thread = threading.Thread(target=_run_quietly, args=(server, sock), name=f"uvicorn-{port}",
                              daemon=True)
    thread.start()
    try:
        _wait_started(server, thread, host, port, start_timeout)
        yield _url(host, port)
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(stop_timeout)
        sock.close()
        if thread.is_alive():
            raise TimeoutError(f"server on {host}:{port} did not stop within "
                               f"{2 * stop_timeout:.0f} s")


def _run_quietly(server: uvicorn.Server, sock: socket.socket) -> None:
    """server.run in a thread: uvicorn ends a failed start-up with sys.exit, which `running`
    reports itself (the thread is gone) instead of an unhandled-thread-exception warning."""
    with contextlib.suppress(SystemExit):
        server.run(sockets=[sock])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _wait_started(server: uvicorn.Server, thread: threading.Thread, host: str, port: int,
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"server on {host}:{port} exited during start-up (see its log)")
        if server.started:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 1.0):
                return
        time.sleep(0.02)
    server.should_exit = True
    raise TimeoutError(f"server on {host}:{port} did not start within {timeout:.0f} s")


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, by Content-Length or while streaming,
    so no request can make the app buffer more than that. `body`: the JSON of the refusal
    (default `{"detail": "request body over N bytes"}`), for APIs with their own error layout."""

    def __init__(self, app, max_bytes: int, body: bytes | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.body = body or f'{{"detail": "request body over {max_bytes} bytes"}}'.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(send, self.body)
        seen, started, refused = 0, False, False

        async def limited_receive():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if not started and not refused:
                    refused = True
                    await _too_large(send, self.body)
                raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:  # the 413 went out; drop whatever the app answers to its error
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, tracking_send)


class _TooLarge(Exception):
    pass


async def _too_large(send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Adds `headers` to every HTTP response that does not already set them."""

    def __init__(self, app, headers: Mapping[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in self.headers
                                                    if k not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
