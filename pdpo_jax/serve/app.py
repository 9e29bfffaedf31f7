"""The OpenAI-compatible HTTP API over a `ModelServer` (FastAPI).

    GET  /v1/models             the served model
    POST /v1/chat/completions   messages -> the tokenizer's chat template -> a reply
    POST /v1/completions        a prompt (text or token ids, or a list of them) -> a continuation
    GET  /health                200 while the engine thread runs, else 503

`stream: true` answers with Server-Sent Events (`data: {chunk}` lines, then `data: [DONE]`).
The engine thread starts with the app (lifespan) and stops after uvicorn's graceful shutdown
has let in-flight requests, streams included, finish. A client that disconnects mid-stream has
its choices cancelled (their slots free at the engine's next step); a non-streamed request
whose client left finishes in the background and its answer is dropped.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdpo_jax import asgi
from pdpo_jax.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    error_body,
    parse,
    unsupported,
)
from pdpo_jax.serve.server import Generation, ModelServer, dumps
from pdpo_jax.serve.text import Piece, TextStream, token_texts

MAX_BODY = 4 * 2**20
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def create_app(server: ModelServer, *, max_body: int = MAX_BODY, stop_timeout: float = 30.0
               ) -> FastAPI:
    """The API over `server`; its engine thread runs while the app does (lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop(stop_timeout)

    app = FastAPI(title="pdpo_jax OpenAI-compatible server", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", _model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", _chat, methods=["POST"])
    app.add_api_route("/v1/completions", _completions, methods=["POST"])
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_middleware(asgi.SecurityHeaders, headers=HEADERS)
    too_large = error_body(f"the request body is over {max_body} bytes", code="request_too_large")
    app.add_middleware(asgi.BodyLimit, max_bytes=max_body, body=dumps(too_large).encode())
    return app


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                        status_code=500)


def _server(request: Request) -> ModelServer:
    return request.app.state.server


async def _models(request: Request):
    return {"object": "list", "data": [_server(request).info()]}


async def _model(request: Request, model: str):
    server = _server(request)
    if model != server.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{server.name!r}", param="model", code="model_not_found")
    return server.info()


async def _health(request: Request):
    loop = _server(request).loop
    if not loop.alive:
        return JSONResponse(error_body(loop.error or "the engine is not running",
                                       "server_error"), status_code=503)
    return {"status": "ok"}


async def _body(request: Request, model: type) -> ChatRequest | CompletionRequest:
    body = parse(model, await request.body())
    server = _server(request)
    if body.model != server.name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                       f"{server.name!r} (GET /v1/models)", param="model", code="model_not_found")
    unsupported(body)
    return body


async def _chat(request: Request) -> Response:
    body: ChatRequest = await _body(request, ChatRequest)
    server = _server(request)
    # Tokenised on the event loop: one tokenizer object is not safe to share between threads
    # (a fast tokenizer may raise "Already borrowed"); the body limit bounds the work.
    prompt = server.chat_prompt(body.messages)
    gen = server.start([prompt], server.sampling(body, [len(prompt)]), body.n)
    return await _respond(gen, _ChatRender(server, gen, body))


async def _completions(request: Request) -> Response:
    body: CompletionRequest = await _body(request, CompletionRequest)
    server = _server(request)
    one = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    prompts = [server.text_prompt(p) for p in ([body.prompt] if one else body.prompt)]
    gen = server.start(prompts, server.sampling(body, [len(p) for p in prompts]), body.n)
    return await _respond(gen, _CompletionRender(server, gen, body))


async def _respond(gen: Generation, render) -> Response:
    """The whole reply as JSON, or a stream of events (`stream: true`); the generation is
    closed however the response ends."""
    if render.body.stream:
        return _EventStream(_events(gen, render), on_close=gen.close)
    try:
        await gen.collect()
    finally:
        gen.close()
    return JSONResponse(render.whole())


# ---- streaming


class _EventStream(StreamingResponse):
    """Server-Sent Events whose `on_close` runs however the response ends (done, client gone,
    server shutting down), so the request's capacity always comes back."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _events(gen: Generation, render) -> AsyncIterator[str]:
    """SSE lines: the renderer's opening chunks, a chunk per released piece, each choice's
    finish, the usage chunk when asked, then [DONE]. An engine failure mid-stream ends the
    stream with an OpenAI error object."""
    for chunk in render.opening():
        yield f"data: {dumps(chunk)}\n\n"
    try:
        async for i, piece in gen.pieces():
            for chunk in render.chunks(i, piece):
                yield f"data: {dumps(chunk)}\n\n"
    except ApiError as e:
        yield f"data: {dumps(e.body())}\n\n"
        return
    if render.body.include_usage:
        yield f"data: {dumps(render.envelope([], usage=gen.usage()))}\n\n"
    yield "data: [DONE]\n\n"


class _Render:
    """Shared by both endpoints: the envelope of a response or chunk."""
    object_whole = object_chunk = prefix = ""

    def __init__(self, server: ModelServer, gen: Generation, body):
        self.server, self.gen, self.body = server, gen, body
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, choices: list, *, usage=None, whole: bool = False) -> dict:
        out = {"id": self.id, "object": self.object_whole if whole else self.object_chunk,
               "created": self.created, "model": self.server.name, "choices": choices}
        if self.server.fingerprint:
            out["system_fingerprint"] = f"pdpo_jax-{self.server.fingerprint}"
        if whole or self.body.include_usage:
            out["usage"] = usage
        return out

    def whole(self) -> dict:
        choices = [self.choice(i, s) for i, s in enumerate(self.gen.streams)]
        return self.envelope(choices, usage=self.gen.usage(), whole=True)

    def tokens(self, piece_tokens) -> list[str]:
        return token_texts(self.server.tokenizer, piece_tokens)


class _ChatRender(_Render):
    object_whole, object_chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _logprobs(self, tokens, logprobs) -> dict | None:
        if not self.body.logprobs:
            return None
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                             "top_logprobs": []}
                            for t, lp in zip(self.tokens(tokens), logprobs)], "refusal": None}

    def choice(self, i: int, stream: TextStream) -> dict:
        piece = _all_of(stream)
        return {"index": i, "message": {"role": "assistant", "content": stream.text},
                "logprobs": self._logprobs(piece.tokens, piece.logprobs),
                "finish_reason": stream.finish_reason}

    def opening(self) -> list[dict]:
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])
                for i in range(len(self.gen.streams))]

    def chunks(self, i: int, piece: Piece) -> list[dict]:
        out = []
        if piece.text or piece.tokens:
            out.append(self.envelope([{"index": i, "delta": {"content": piece.text},
                                       "logprobs": self._logprobs(piece.tokens, piece.logprobs),
                                       "finish_reason": None}]))
        reason = self.gen.streams[i].finish_reason
        if reason is not None:
            out.append(self.envelope([{"index": i, "delta": {}, "logprobs": None,
                                       "finish_reason": reason}]))
        return out


class _CompletionRender(_Render):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"

    def _logprobs(self, tokens, logprobs) -> dict | None:
        if self.body.logprobs is None:
            return None
        texts = self.tokens(tokens)
        offsets = list(itertools.accumulate((len(t) for t in texts), initial=0))[:len(texts)]
        return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": None,
                "text_offset": offsets}

    def choice(self, i: int, stream: TextStream) -> dict:
        piece = _all_of(stream)
        return {"index": i, "text": stream.text, "finish_reason": stream.finish_reason,
                "logprobs": self._logprobs(piece.tokens, piece.logprobs)}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, i: int, piece: Piece) -> list[dict]:
        reason = self.gen.streams[i].finish_reason
        if not (piece.text or piece.tokens or reason):
            return []
        return [self.envelope([{"index": i, "text": piece.text, "finish_reason": reason,
                                "logprobs": self._logprobs(piece.tokens, piece.logprobs)}])]


def _all_of(stream: TextStream) -> Piece:
    """Every kept token of an ended choice with its log-prob, EOS left out."""
    kept = [(t, lp) for t, lp in zip(stream.tokens, stream.logprobs) if t not in stream.eos_ids]
    return Piece(stream.text, tuple(t for t, _ in kept), tuple(lp for _, lp in kept))
