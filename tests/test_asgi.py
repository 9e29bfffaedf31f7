"""pdpo_jax.asgi: serving on loopback, bounded start and stop, graceful shutdown (thread and
SIGTERM), the body limit and the security headers."""
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from pdpo_jax import asgi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _app(started: threading.Event | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello():
        return {"hello": "world"}

    @app.get("/slow")
    async def slow():
        if started is not None:
            started.set()
        await asyncio.sleep(0.6)
        return {"slow": "done"}

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @app.get("/own-header")
    async def own_header():
        return PlainTextResponse("x", headers={"X-Frame-Options": "SAMEORIGIN"})

    return app


def test_running_serves_on_a_free_loopback_port_and_stops():
    with asgi.running(_app()) as url:
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/hello", timeout=5).json() == {"hello": "world"}
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/hello", timeout=2)
    asgi.bind("127.0.0.1", port).close()  # the port is free again


def test_leaving_running_lets_an_in_flight_request_finish():
    started, results = threading.Event(), []
    with asgi.running(_app(started)) as url:
        client = threading.Thread(target=lambda: results.append(httpx.get(url + "/slow", timeout=5)))
        client.start()
        assert started.wait(5)
    client.join(5)
    assert results and results[0].status_code == 200 and results[0].json() == {"slow": "done"}


def test_a_server_that_fails_to_start_is_an_error_not_a_hang():
    @contextlib.asynccontextmanager
    async def boom(app):
        raise RuntimeError("start-up fails")
        yield

    app = FastAPI(lifespan=boom)

    with pytest.raises(RuntimeError, match="exited during start-up"), \
            asgi.running(app, start_timeout=5):
        pass


def test_bind_names_the_address_in_use():
    taken = asgi.bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: .*--port"):
        asgi.bind("127.0.0.1", port)
    taken.close()


def test_body_limit_by_length_and_while_streaming():
    with asgi.running(asgi.BodyLimit(_app(), max_bytes=100)) as url:
        assert httpx.post(url + "/echo", content=b"x" * 100, timeout=5).json() == {"bytes": 100}
        too_big = httpx.post(url + "/echo", content=b"x" * 101, timeout=5)
        assert too_big.status_code == 413 and "100 bytes" in too_big.json()["detail"]
        chunks = iter([b"x" * 60, b"x" * 60])  # no Content-Length: chunked
        streamed = httpx.post(url + "/echo", content=chunks, timeout=5)
        assert streamed.status_code == 413


def test_security_headers_are_added_unless_the_app_sets_them():
    app = asgi.SecurityHeaders(_app(), {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"})
    with asgi.running(app) as url:
        plain = httpx.get(url + "/hello", timeout=5)
        own = httpx.get(url + "/own-header", timeout=5)
    assert plain.headers["x-frame-options"] == "DENY"
    assert plain.headers["x-content-type-options"] == "nosniff"
    assert own.headers["x-frame-options"] == "SAMEORIGIN"
    assert own.headers["x-content-type-options"] == "nosniff"


def test_serve_finishes_in_flight_requests_on_sigterm():
    code = textwrap.dedent("""
        import asyncio, sys
        from fastapi import FastAPI
        from pdpo_jax import asgi
        app = FastAPI()

        @app.get("/slow")
        async def slow():
            print("started", flush=True)
            await asyncio.sleep(0.8)
            return {"slow": "done"}

        asgi.serve(app, "127.0.0.1", 0, ready=lambda url: print(url, flush=True))
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        url = _read_line(proc)
        assert url.startswith("http://127.0.0.1:")
        results = []
        client = threading.Thread(target=lambda: results.append(httpx.get(url + "/slow", timeout=10)))
        client.start()
        assert _read_line(proc) == "started"
        proc.send_signal(signal.SIGTERM)
        client.join(10)
        assert results and results[0].status_code == 200 and results[0].json() == {"slow": "done"}
        # uvicorn re-raises SIGTERM after its graceful shutdown: the process ends by the signal
        assert proc.wait(10) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_answers_a_client_that_connects_as_soon_as_it_is_ready():
    box = {}

    def ready(url):  # runs before uvicorn starts: the request waits in the backlog
        box["url"] = url
        threading.Thread(target=lambda: box.update(r=httpx.get(url + "/hello", timeout=10)),
                         daemon=True).start()

    server = threading.Thread(target=asgi.serve, args=(_app(), "127.0.0.1", 0),
                              kwargs={"ready": ready, "limit_max_requests": 1}, daemon=True)
    server.start()  # limit_max_requests=1: the server stops after answering it
    server.join(15)
    assert not server.is_alive()
    assert box["r"].status_code == 200 and box["r"].json() == {"hello": "world"}


def _read_line(proc: subprocess.Popen, timeout: float = 20) -> str:
    """The next stdout line of `proc`, waiting at most `timeout` seconds."""
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        raise TimeoutError(f"no output from the server within {timeout} s")
    return box[0].strip()


def test_loopback_only_by_default():
    with asgi.running(_app()) as url:
        port = int(url.rsplit(":", 1)[1])
        addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        for address in addresses - {"127.0.0.1"}:
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=1).close()
