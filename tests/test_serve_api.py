"""The OpenAI-compatible server against the `openai` Python client (the independent reference
for the API) on loopback: chat and completions, plain and streamed, n, seeds, stop strings,
log-probs, usage; concurrent clients; the judge's OpenAIBackend; bad requests via httpx."""
import json
from concurrent import futures

import httpx
import numpy as np
import pytest
from serve_reference import (
    EOS,
    MAX_MODEL_LEN,
    NAME,
    build_checkpoint,
    chat,
    client,
    make_server,
    wait_until,
)

from pdpo_jax import asgi
from pdpo_jax.serve import create_app


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers_dir):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-chat"), tokenizers_dir)


@pytest.fixture(scope="module")
def served(checkpoint):
    server = make_server(checkpoint)
    with asgi.running(create_app(server, max_body=64 * 1024)) as url:
        yield server, url


@pytest.fixture(scope="module")
def api(served):
    return client(served[1])


def _stream_text(stream, logprobs: list | None = None) -> tuple[dict, dict, object]:
    """Text and finish reason per choice of a streamed reply, and its usage chunk; the chat
    log-prob entries of choice 0 appended to `logprobs`."""
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            part = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + (part or "")
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
            if logprobs is not None and c.index == 0 and c.logprobs is not None:
                logprobs += c.logprobs.content
    return texts, reasons, usage


def test_models_lists_the_served_model(api):
    assert [m.id for m in api.models.list().data] == [NAME]
    assert api.models.retrieve(NAME).owned_by == "pdpo_jax"


def test_greedy_chat_equals_engine_generate_and_reports_its_logprobs(served, api):
    from pdpo_jax.sampling import SamplingConfig
    server, _ = served
    messages, tok = chat("Tell me about your dog."), server.tokenizer
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    cfg = SamplingConfig(16, greedy=True, eos_ids=(EOS,), pad_id=EOS, logprobs=True)
    want = server.engine.generate([ids], cfg=cfg, example_ids=[0])
    n = int(want.lengths[0])
    reply = api.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                        temperature=0, logprobs=True)
    choice = reply.choices[0]
    assert choice.message.content == tok.decode(want.tokens[0, :n], skip_special_tokens=True)
    assert choice.finish_reason == want.finish_reason[0] == "length"
    got = [e.logprob for e in choice.logprobs.content]
    np.testing.assert_allclose(got, want.logprobs[0, :n], atol=1e-5)
    assert [e.token for e in choice.logprobs.content] == [tok.decode([t]) for t in want.tokens[0, :n]]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n)
    assert reply.usage.total_tokens == len(ids) + n and reply.object == "chat.completion"


def test_streamed_chat_equals_the_plain_reply_for_the_same_seed(api):
    kwargs = {"model": NAME, "messages": chat("What do you like?"), "max_tokens": 24,
              "seed": 11, "temperature": 0.9, "top_p": 0.95, "extra_body": {"top_k": 20},
              "logprobs": True}
    plain = api.chat.completions.create(**kwargs)
    entries = []
    texts, reasons, usage = _stream_text(api.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}), entries)
    assert texts == {0: plain.choices[0].message.content}
    assert reasons == {0: plain.choices[0].finish_reason}
    assert usage.model_dump() == plain.usage.model_dump()
    want = plain.choices[0].logprobs.content
    assert [e.token for e in entries] == [e.token for e in want]
    # the same row in another slot: equal up to fp32 summation order (as in test_engine)
    np.testing.assert_allclose([e.logprob for e in entries], [e.logprob for e in want], atol=1e-5)


def test_n_choices_are_their_own_samples_and_a_seed_fixes_them(api):
    kwargs = {"model": NAME, "messages": chat("Hi!"), "max_tokens": 12, "temperature": 1.0,
              "seed": 5}
    two = api.chat.completions.create(**kwargs, n=2)
    one = api.chat.completions.create(**kwargs)
    again = api.chat.completions.create(**kwargs, n=2)
    texts = [c.message.content for c in two.choices]
    assert [c.index for c in two.choices] == [0, 1] and texts[0] != texts[1]
    assert one.choices[0].message.content == texts[0]  # choice j is sample j of the seed
    assert [c.message.content for c in again.choices] == texts
    assert two.usage.completion_tokens == 24 and two.usage.prompt_tokens == one.usage.prompt_tokens


def test_stop_strings_cut_the_reply_streamed_or_not(api):
    kwargs = {"model": NAME, "messages": chat("Go on."), "max_tokens": 20, "temperature": 0}
    full = api.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = api.chat.completions.create(**kwargs, stop=["never-there", stop])
    want = full[:full.index(stop)]
    assert cut.choices[0].message.content == want and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 20
    texts, reasons, _ = _stream_text(api.chat.completions.create(**kwargs, stop=stop, stream=True))
    assert texts == {0: want} and reasons == {0: "stop"}


def test_completions_take_text_or_token_ids_streamed_or_not(served, api):
    tok = served[0].tokenizer
    ids = tok("The persona says: I love hiking.")["input_ids"]
    by_text = api.completions.create(model=NAME, prompt="The persona says: I love hiking.",
                                     max_tokens=10, temperature=0, logprobs=0)
    by_ids = api.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.object == "text_completion"
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 10
    lp = by_text.choices[0].logprobs
    assert len(lp.token_logprobs) == 10 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and len(lp.tokens) == 10
    texts, reasons, _ = _stream_text(api.completions.create(model=NAME, prompt=ids, max_tokens=10,
                                                            temperature=0, stream=True))
    assert texts == {0: by_ids.choices[0].text} and reasons == {0: "length"}
    batch = api.completions.create(model=NAME, prompt=[ids, ids[:4]], max_tokens=5, n=2, seed=1)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == len(ids) + 4


def test_concurrent_clients_get_the_replies_they_get_alone(served, api):
    """6 threads x 2 requests (12 sequences through 4 slots, seeds and greedy mixed): each reply
    equals the same request served alone."""
    def ask(k):
        kwargs = {"model": NAME, "messages": chat(f"Question {k}?"), "max_tokens": 8 + k % 5,
                  "temperature": 0 if k % 3 == 0 else 0.8, "seed": 100 + k}
        return api.chat.completions.create(**kwargs).choices[0].message.content

    alone = [ask(k) for k in range(12)]
    with futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda t: [ask(2 * t), ask(2 * t + 1)], range(6)))
    assert [x for pair in together for x in pair] == alone
    wait_until(lambda: served[0].in_flight == 0, 10, "capacity released")


def test_the_judge_backend_gets_answers(served):
    from pdpo_jax.eval.backends import OpenAIBackend
    judge = OpenAIBackend(NAME, served[1] + "/v1", api_key="x", max_tokens=12, max_retries=0,
                          concurrency=3, timeout_s=60)
    answer = judge.complete("Which reply is more consistent with the persona? [[1]] or [[2]]")
    assert isinstance(answer, str) and answer
    got = dict(judge.answers(["a?", "b?", "c?"]))
    assert sorted(got) == [0, 1, 2] and all(isinstance(t, str) for t in got.values())
    assert got[0] == judge.complete("a?")  # attempt 0 decodes greedily


def test_a_client_leaving_mid_stream_cancels_its_request(served):
    server, url = served
    body = {"model": NAME, "messages": chat("Tell me a long story."), "max_tokens": 200,
            "stream": True, "temperature": 0.7, "seed": 3}
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/chat/completions",
                                                       json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    wait_until(lambda: server.in_flight == 0, 20, "the left request's capacity released")
    wait_until(lambda: not server.scheduler.busy, 20, "its slot freed")
    reply = client(url).chat.completions.create(model=NAME, messages=chat("Still there?"),
                                                max_tokens=4)
    assert reply.choices[0].finish_reason == "length"


def _post(url: str, content: bytes | None = None, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=content,
                      json=None if content is not None else body, timeout=30)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


BASE = {"model": NAME, "messages": chat("x")}


@pytest.mark.parametrize("body, status, param", [
    (dict(BASE, model="gpt-4o"), 404, "model"),
    (dict(BASE, max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    (dict(BASE, max_tokens=0), 400, "max_tokens"),
    (dict(BASE, max_tokens="5"), 400, "max_tokens"),
    (dict(BASE, temperature="hot"), 400, "temperature"),
    (dict(BASE, messages="hello"), 400, "messages"),
    (dict(BASE, n=50), 400, "n"),
    (dict(BASE, n=16), 400, "n"),  # more sequences than slots + queue
    (dict(BASE, top_k=21), 400, "top_k"),  # over the server's --max-top-k
    (dict(BASE, stop=["x" * 257]), 400, "stop"),  # over 256 characters
    (dict(BASE, stop=[""]), 400, "stop"),
    (dict(BASE, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (dict(BASE, messages=[{"role": "user", "content": "word " * 400}]), 400, "messages"),
])
def test_bad_requests_get_openai_errors(served, body, status, param):
    assert _error(_post(served[1], **body), status)["param"] == param


def test_malformed_json_oversized_bodies_and_unknown_routes(served):
    url = served[1]
    assert _error(_post(url, content=b'{"model": "tiny-chat", "messages": ['), 400)["code"] == \
        "invalid_json"
    assert _error(_post(url, content=b"[" * 70_000), 413)["code"] == "request_too_large"
    assert _error(httpx.get(url + "/v1/nothing", timeout=10), 404)["code"] == "not_found"
    outside = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [5, 10**6]},
                         timeout=30)
    assert _error(outside, 400)["param"] == "prompt"  # an id outside the model's vocabulary
    ok = _post(url, **dict(BASE, max_tokens=2, user="u", some_future_field=[1]))
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    assert json.loads(_post(url, **dict(BASE, max_tokens=2)).text)["model"] == NAME


