"""What the HTTP app serves: a model, its tokenizer and one engine loop, with bounded admission.

    server = ModelServer.load("runs/x/dpo/best", name="dpo", slots=16, max_model_len=2048)
    gen = server.start(server.chat_prompt(messages), sampling, n=2)   # in the event loop
    async for index, piece in gen.pieces(): ...                       # text as it is made
    gen.close()

Every choice is its own engine request keyed by (seed, example id 0, choice index): the same
seed, prompt and settings give the same reply whatever else the server is decoding. A request
without a seed gets a random one. `start` refuses with 429 when the engine already holds
`slots + max_queue` sequences (every slot busy and max_queue waiting).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pdpo_jax.sampling.engine import Engine, Request
from pdpo_jax.serve.loop import EngineLoop, Job
from pdpo_jax.serve.protocol import ApiError, Message
from pdpo_jax.serve.text import Piece, TextStream

RETRY_AFTER_S = 1  # what a 429 asks the client to wait


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's sampling settings, as the engine takes them (temperature 0: greedy)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def request(self, prompt: Sequence[int], sample: int, seed: int) -> Request:
        greedy = self.temperature == 0
        return Request(list(prompt), self.max_tokens, example_id=0, sample=sample, seed=seed,
                       greedy=greedy, temperature=1.0 if greedy else self.temperature,
                       top_k=self.top_k, top_p=self.top_p)


class ModelServer:
    """`engine` decoding in one `EngineLoop` over a ring of `max_model_len` columns.

    name: the model name clients send; eos_ids: tokens that end a reply; max_queue: sequences
    that may wait for a slot before requests are refused (429).
    """

    def __init__(self, engine: Engine, tokenizer: Any, *, name: str, max_model_len: int,
                 max_queue: int, eos_ids: Sequence[int], fingerprint: str | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.max_model_len, self.max_queue = max_model_len, max_queue
        self.eos_ids, self.fingerprint = tuple(eos_ids), fingerprint
        self.created = int(time.time())
        self.scheduler = engine.scheduler(cache_len=max_model_len)
        self.loop = EngineLoop(self.scheduler)
        self.in_flight = 0  # sequences accepted and not yet ended (event-loop thread only)

    @property
    def capacity(self) -> int:
        return self.engine.slots + self.max_queue

    @classmethod
    def load(cls, folder: str | pathlib.Path, *, name: str | None = None, slots: int = 16,
             max_model_len: int = 2048, max_queue: int = 64, dtype: str = "float32",
             max_top_k: int = 50, mesh=None, steps_per_call: int = 8) -> ModelServer:
        """An HF checkpoint folder (with its tokenizer) loaded in the decode layout."""
        from pdpo_jax.serve.loading import load_engine
        engine, tokenizer, eos_ids, fingerprint = load_engine(
            folder, slots=slots, max_model_len=max_model_len, dtype=dtype, max_top_k=max_top_k,
            mesh=mesh, steps_per_call=steps_per_call)
        return cls(engine, tokenizer, name=name or pathlib.Path(folder).name,
                   max_model_len=max_model_len, max_queue=max_queue, eos_ids=eos_ids,
                   fingerprint=fingerprint)

    # ---- prompts

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The token ids of the chat template applied to `messages`, with the generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {self.name!r} has no chat template (its tokenizer sets "
                           "none); use /v1/completions with the prompt text", param="messages")
        chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(chat, tokenize=False,
                                                      add_generation_prompt=True)
        # jinja raises TemplateError on message orders a template refuses, and templates that
        # index or concatenate content raise whatever Python does: all are the messages' fault
        except Exception as e:  # noqa: BLE001
            raise ApiError(400, f"the chat template refused these messages: {e}",
                           param="messages") from None
        return self._in_vocab(self.tokenizer(text, add_special_tokens=False)["input_ids"],
                              "messages")

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return self._in_vocab(ids, "prompt")

    def _in_vocab(self, ids: list[int], param: str) -> list[int]:
        """ids, refused (400) when one is outside the model's vocabulary (a tokenizer larger than
        the model's embedding, or ids sent by the client)."""
        vocab = self.engine.model_cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab}) (the model's "
                           "vocabulary)", param=param)
        return ids

    # ---- generation

    def sampling(self, body, prompt_lengths: Sequence[int]) -> Sampling:
        """The request's settings, its budget checked against the context (400 when over)."""
        longest = max(prompt_lengths)
        budget = body.budget
        if budget is None:
            budget = self.max_model_len - longest  # as vLLM: what the context leaves
        if budget < 1 or longest + budget > self.max_model_len:
            prompt = "messages" if hasattr(body, "messages") else "prompt"
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} "
                           f"tokens; the request needs {longest + max(budget, 1)} ({longest} in "
                           f"the prompt, {max(budget, 1)} or more for the completion); shorten "
                           "the prompt or lower max_tokens",
                           param=prompt if body.budget is None else "max_tokens",
                           code="context_length_exceeded")
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        return Sampling(budget, 1.0 if body.temperature is None else body.temperature,
                        1.0 if body.top_p is None else body.top_p, top_k, body.seed,
                        tuple(body.stops()))

    def start(self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int) -> Generation:
        """Submits n choices per prompt (choice i*n + j is sample j of prompt i)."""
        if not self.loop.alive:
            raise ApiError(503, self.loop.error or "the engine is not running", code="unavailable")
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(2**32)
        requests = [sampling.request(p, j, seed) for p in prompts for j in range(n)]
        if len(requests) > self.capacity:
            raise ApiError(400, f"the request asks for {len(requests)} sequences; this server "
                           f"holds at most {self.capacity} at once (slots + max queue)", param="n")
        for r in requests:
            try:
                self.scheduler.check(r)  # pure: reads the engine's fixed shape only
            except ValueError as e:
                raise ApiError(400, str(e), param="top_k" if "top_k" in str(e) else None) from None
        if self.in_flight + len(requests) > self.capacity:
            raise ApiError(429, f"the server is full ({self.in_flight} sequences in flight, at "
                           f"most {self.capacity}); retry in {RETRY_AFTER_S} s",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return Generation(self, requests, [TextStream(self.tokenizer, sampling.stop, self.eos_ids)
                                           for _ in requests])

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "pdpo_jax",
                "max_model_len": self.max_model_len}


class Generation:
    """The choices of one HTTP request in the engine. `pieces()` yields (choice, Piece) as text
    is released until every choice ended; `close()` (always call it) cancels what is still
    decoding and gives the capacity back."""

    def __init__(self, server: ModelServer, requests: list[Request], streams: list[TextStream]):
        self.server, self.requests, self.streams = server, requests, streams
        self._events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._jobs = [Job(r, loop, lambda event, i=i: self._events.put_nowait((i, event)))
                      for i, r in enumerate(requests)]
        self._open = set(range(len(requests)))   # choices still producing text
        self._engine_open = set(self._open)      # rows the engine has not ended
        self._closed = False
        server.in_flight += len(requests)
        for job in self._jobs:
            server.loop.submit(job)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens, each prompt counted once (not once per choice)."""
        return sum(len(r.prompt) for r in self.requests if r.sample == 0)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.streams)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        while self._open:
            i, (kind, *payload) = await self._next_event()
            if kind == "error":
                message, status = payload
                raise ApiError(status, message, code="unavailable" if status == 503 else None)
            if kind == "done":
                self._engine_open.discard(i)
            if i not in self._open:  # ended by a stop string already
                continue
            stream = self.streams[i]
            piece = stream.add(*payload) if kind == "tokens" else stream.finish(
                payload[0].finish_reason)
            if stream.finish_reason is not None:
                self._end(i)
            yield i, piece

    async def _next_event(self):
        """The next engine event; an error when the engine thread ended without answering."""
        while True:
            try:
                return await asyncio.wait_for(self._events.get(), timeout=1.0)
            except TimeoutError:
                if not self.server.loop.alive and self._events.empty():
                    return 0, ("error", self.server.loop.error or "the engine stopped", 503)

    async def collect(self) -> list[TextStream]:
        async for _ in self.pieces():
            pass
        return self.streams

    def _end(self, i: int) -> None:
        self._open.discard(i)
        if i in self._engine_open:  # a stop string ended it: free its slot
            self._engine_open.discard(i)
            self.server.loop.cancel(self._jobs[i])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for i in sorted(self._engine_open):
            self.server.loop.cancel(self._jobs[i])
        self._open.clear()
        self._engine_open.clear()
        self.server.in_flight -= len(self.requests)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
