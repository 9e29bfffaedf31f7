"""The server's life around the requests: a full queue answers 429, shutdown lets in-flight
requests (streams too) finish and stops the engine thread, an engine failure answers 503,
`Scheduler.cancel` frees a slot without touching its neighbours, and the command line (user
mistakes exit 2; SIGINT ends a running server cleanly)."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import httpx
import numpy as np
import pytest
from serve_reference import (
    MAX_MODEL_LEN,
    NAME,
    SLOTS,
    build_checkpoint,
    chat,
    client,
    gated,
    make_server,
    wait_until,
)

from pdpo_jax import asgi
from pdpo_jax.serve import create_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers_dir):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-chat"), tokenizers_dir)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return make_server(checkpoint).engine


def _ask(url: str, max_tokens: int = 4, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": NAME, "messages": chat("Tell me more."), "max_tokens": max_tokens, **extra})


def test_a_full_queue_answers_429_with_retry_after(checkpoint, engine):
    server = make_server(checkpoint, max_queue=1, engine=engine)  # 4 slots + 1 waiting
    with gated(server.scheduler) as gate, asgi.running(create_app(server)) as url, \
            futures.ThreadPoolExecutor(5) as pool:
        accepted = [pool.submit(_ask, url, seed=k) for k in range(5)]
        wait_until(lambda: server.in_flight == 5, 30, "5 sequences in flight")
        refused = _ask(url)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        assert [f.result(60).status_code for f in accepted] == [200] * 5
        assert _ask(url).status_code == 200


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), 0.2).close()
        return False
    except OSError:
        return True


def _stream(url: str, out: dict) -> None:
    stream = client(url).chat.completions.create(
        model=NAME, messages=chat("Tell me more."), max_tokens=30, stream=True, seed=1,
        stream_options={"include_usage": True})
    out["text"], out["usage"] = "", None
    for chunk in stream:
        out["usage"] = chunk.usage or out["usage"]
        for c in chunk.choices:
            out["text"] += c.delta.content or ""
            out["reason"] = c.finish_reason or out.get("reason")


def test_shutdown_finishes_in_flight_requests_then_stops_the_engine(checkpoint, engine):
    server = make_server(checkpoint, engine=engine)
    plain, streamed = {}, {}
    with gated(server.scheduler) as gate:
        with asgi.running(create_app(server)) as url:
            threads = [threading.Thread(target=lambda: plain.update(r=_ask(url, 30, seed=1))),
                       threading.Thread(target=_stream, args=(url, streamed))]
            for t in threads:
                t.start()
            wait_until(lambda: server.in_flight == 2, 30, "both requests in flight")

            def open_when_closed():  # the engine resumes once the server stopped accepting
                wait_until(lambda: _refuses_connections(url), 10, "listening socket closed")
                gate.set()
            threading.Thread(target=open_when_closed, daemon=True).start()
        for t in threads:
            t.join(30)
    assert gate.is_set() and not server.loop.alive
    reply = plain["r"].json()
    assert plain["r"].status_code == 200 and reply["usage"]["completion_tokens"] == 30
    assert streamed["reason"] == "length" and streamed["usage"].completion_tokens == 30
    assert streamed["text"] == reply["choices"][0]["message"]["content"]  # same seed, prompt


def test_an_engine_failure_answers_503(checkpoint, engine):
    server = make_server(checkpoint, engine=engine)

    def broken_step():
        raise RuntimeError("device lost")

    server.scheduler.step = broken_step
    with asgi.running(create_app(server)) as url:
        failed = _ask(url)
        assert failed.status_code == 503 and "device lost" in failed.json()["error"]["message"]
        wait_until(lambda: not server.loop.alive, 10, "engine thread ended")
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        assert _ask(url).status_code == 503


def test_cancel_frees_a_slot_and_leaves_the_others_alone(engine):
    from pdpo_jax.sampling.engine import Request
    make = lambda s: Request([5, 6, 7, 8, 9], 40, seed=s)
    alone = engine.scheduler(cache_len=256)
    want = make(2)
    alone.submit(want)
    while alone.busy:
        alone.step()
    scheduler = engine.scheduler(cache_len=256)
    doomed, kept, queued = make(1), make(2), make(3)
    for r in (doomed, kept):
        scheduler.submit(r)
    scheduler.submit(queued)
    assert scheduler.cancel(queued)  # still queued (equal fields, but cancelled by identity)
    scheduler.step()
    assert scheduler.cancel(doomed) and not scheduler.cancel(doomed)
    done = []
    while scheduler.busy:
        done += scheduler.step()
    assert done == [kept] and kept.tokens == want.tokens
    np.testing.assert_allclose(kept.logprobs, want.logprobs, atol=1e-5)  # batch of 1 vs 2
    assert doomed.finish_reason is None and not scheduler.cancel(kept)


def test_cli_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    from pdpo_jax.serve.__main__ import main
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint") and "\n" not in err
    assert main(["--checkpoint", str(tmp_path), "--graceful-timeout", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --graceful-timeout")


def _serving_line(proc: subprocess.Popen, log, timeout: float) -> str:
    """The 'serving ... at URL' line once the server wrote it (bounded); '' if it never did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        line = next((x for x in log.read_text().splitlines() if x.startswith("serving ")), "")
        if line:
            return line
        time.sleep(0.1)
    return ""


@pytest.mark.slow
def test_cli_serves_and_stops_on_sigint(checkpoint, tmp_path):
    import jax
    # the session's matmul precision and, when it has one (PDPO_TEST_JAX_CACHE), its compilation
    # cache: make_server's shapes are the in-process servers' programs, found there
    cache = jax.config.jax_compilation_cache_dir
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision),
               **({"JAX_COMPILATION_CACHE_DIR": cache,
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"} if cache else {}))
    cmd = [sys.executable, "-m", "pdpo_jax.serve", "--checkpoint", str(checkpoint), "--port", "0",
           "--slots", str(SLOTS), "--max-model-len", str(MAX_MODEL_LEN), "--max-top-k", "20",
           "--served-model-name", NAME]
    log = tmp_path / "server.log"  # a file, not a pipe: an undrained pipe would block the server
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        line = _serving_line(proc, log, 120)  # 'serving ... at http://127.0.0.1:PORT/v1'
        assert line, log.read_text()[-2000:]
        url = line.rsplit(" at ", 1)[1].strip().removesuffix("/v1")
        reply = client(url).chat.completions.create(model=NAME, messages=chat("Hi"), max_tokens=3)
        assert reply.usage.completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
