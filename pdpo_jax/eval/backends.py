"""Judge backends: an OpenAI-compatible chat-completions endpoint, or a local HF checkpoint.

Both expose `judge_id` (names the judge in the cache) and
`answers(prompts, attempt) -> Iterator[(index, answer_text)]`, yielding answers as they finish
so the caller can store each one at once. `attempt` > 0 means the earlier answer held no
verdict: both backends then sample (temperature `retry_temperature`) instead of decoding
greedily, since asking a greedy judge the same question again gives the same answer.
"""
from __future__ import annotations

import concurrent.futures as futures
import http.client
import json
import logging
import os
import pathlib
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge could not be asked (bad settings, unreachable endpoint, retries exhausted)."""


class JudgeBackend(Protocol):
    judge_id: str

    def answers(self, prompts: Sequence[str], attempt: int = 0) -> Iterator[tuple[int, str]]: ...


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


class OpenAIBackend:
    """POST {base_url}/chat/completions with up to `concurrency` requests in flight.

    429, 408, 5xx, timeouts, dropped connections and unreadable bodies are retried up to
    `max_retries` times with exponential backoff (base `backoff_s`, doubled each time, jittered,
    capped at `max_backoff_s`; a Retry-After header is honoured within the cap). Other HTTP
    errors (401, 404, ...) stop at once. The API key is only ever put in the Authorization header.
    """

    def __init__(self, model: str, base_url: str, api_key: str, *, concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 5, max_tokens: int = 512,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 retry_temperature: float = 0.7, api_key_env: str = "OPENAI_API_KEY"):
        if not api_key:
            raise JudgeError(f"the OpenAI-compatible judge needs an API key in ${api_key_env}, "
                             "which is empty")
        if concurrency < 1:
            raise ValueError(f"judge.concurrency={concurrency} must be >= 1")
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self._api_key, self._api_key_env = api_key, api_key_env
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.max_tokens, self.retry_temperature = max_tokens, retry_temperature
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.judge_id = f"openai:{model}"

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(model={self.model!r}, url={self.url!r})"

    def answers(self, prompts: Sequence[str], attempt: int = 0) -> Iterator[tuple[int, str]]:
        pool = futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="judge")
        pending = {pool.submit(self.complete, p, attempt): i for i, p in enumerate(prompts)}
        error = None
        try:
            for done in futures.as_completed(pending):
                if done.cancelled():
                    continue
                if done.exception() is not None:
                    # Stop sending, but still hand over the answers already in flight: they
                    # are paid for and get cached. The first error is raised at the end.
                    error = error or done.exception()
                    for f in pending:
                        f.cancel()
                    continue
                yield pending[done], done.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # also when the caller stops early
        if error is not None:
            raise error

    def complete(self, prompt: str, attempt: int = 0) -> str:
        """The judge's answer text to one user message, retrying transient failures."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0 if attempt == 0 else self.retry_temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        last: _Retryable | None = None
        for tries in range(self.max_retries + 1):
            if tries:
                time.sleep(self._delay(tries, last.retry_after))
            try:
                return self._post(body)
            except _Retryable as e:
                last = e
                log.info("judge request failed (%s); try %d of %d", e, tries + 1,
                         self.max_retries + 1)
        raise JudgeError(f"judge endpoint {self.url} failed {self.max_retries + 1} times, last: "
                         f"{last}; check the URL (judge.base_url_env) and that the server is up, or "
                         "raise judge.max_retries / judge.timeout_s")

    def _delay(self, tries: int, retry_after: float | None) -> float:
        delay = self.backoff_s * 2 ** (tries - 1) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff_s)

    def _post(self, body: bytes) -> str:
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout_s}s") from None
            raise _Retryable(f"cannot reach {self.url}: {e.reason}") from None
        except (TimeoutError, http.client.HTTPException, ConnectionError) as e:
            raise _Retryable(f"{type(e).__name__} after sending ({e or 'timed out'})") from None
        return _answer_text(raw)

    def _http_error(self, e: urllib.error.HTTPError) -> Exception:
        detail = e.read()[:300].decode("utf-8", "replace") if e.fp is not None else ""
        if e.code in (408, 429) or e.code >= 500:
            return _Retryable(f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After")))
        hint = {401: f"the key in ${self._api_key_env} was refused",
                403: f"the key in ${self._api_key_env} may not use this model",
                404: f"check judge.model={self.model!r} and the URL"}.get(e.code, "bad request")
        return JudgeError(f"judge endpoint {self.url} answered HTTP {e.code} ({hint}): {detail}")


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _answer_text(raw: bytes) -> str:
    """choices[0].message.content of a chat-completions body; unreadable bodies are retried."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retryable(f"malformed response body {raw[:80]!r}") from None
    if content is not None and not isinstance(content, str):
        raise _Retryable(f"message content is {type(content).__name__}, not text")
    return content or ""  # a refusal without text: no verdict, asked again


class LocalJudge:
    """An HF causal LM as the judge, run through our jitted sampler (offline evaluation).

    The prompt goes through the tokenizer's chat template when it has one. Attempt 0 decodes
    greedily; later attempts sample with temperature `retry_temperature` and a new seed.
    """

    def __init__(self, checkpoint: str | os.PathLike, *, max_new_tokens: int = 512,
                 batch_size: int = 8, mesh=None, tokenizer=None, retry_temperature: float = 0.7):
        import transformers

        from pdpo_jax.fileio import checkpoint_fingerprint
        from pdpo_jax.models import from_pretrained
        from pdpo_jax.sharding import SAMPLING_RULES
        folder = pathlib.Path(checkpoint).expanduser()
        if not (folder / "config.json").is_file():
            raise JudgeError(f"judge.local_checkpoint={str(checkpoint)!r} is not an HF checkpoint "
                             "folder (no config.json); set judge.local_checkpoint")
        self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(folder)
        # Only sampled from: loaded in the sampler's decode layout (one copy of the weights).
        self.model = from_pretrained(folder, mesh=mesh, rules=SAMPLING_RULES, stack_layers=False)
        self.mesh, self.batch_size = mesh, batch_size
        self.max_new_tokens, self.retry_temperature = max_new_tokens, retry_temperature
        self.judge_id = (f"local:{folder.resolve()}@{checkpoint_fingerprint(folder)}"
                         f"|max_new_tokens={max_new_tokens}")

    def answers(self, prompts: Sequence[str], attempt: int = 0) -> Iterator[tuple[int, str]]:
        from pdpo_jax.eval.responses import sample_texts
        ids = [self._encode(p) for p in prompts]
        sampling = dict(max_new_tokens=self.max_new_tokens, greedy=attempt == 0,
                        temperature=self.retry_temperature, seed=attempt)
        for i, text, _ in sample_texts(self.model, self.tokenizer, ids, sampling,
                                       batch_size=self.batch_size, mesh=self.mesh, desc="judge"):
            yield i, text

    def _encode(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt)["input_ids"]
