"""The server's text and request layer without a model: detokenising as tokens arrive (multi-
byte characters split across tokens, stop strings across chunks, EOS) against the tokenizer's
own decode of the whole reply, and the request bodies' validation in OpenAI's error layout."""
import random

import pytest

from pdpo_jax.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse, unsupported
from pdpo_jax.serve.text import REPLACEMENT, TextStream

TEXT = "Héllo 世界 🙂 world, stop here please. Done"
EOS = 2


@pytest.fixture(scope="module")
def tok(tokenizers_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "smollm2")


def _chunks(ids, seed):
    rng, out, i = random.Random(seed), [], 0
    while i < len(ids):
        k = rng.randint(1, 4)
        out.append(ids[i:i + k])
        i += k
    return out


def _feed(stream, chunks, finish="length"):
    pieces = [stream.add(c, [-0.5] * len(c)) for c in chunks]
    pieces.append(stream.finish(finish))
    return pieces


@pytest.mark.parametrize("seed", range(4))
def test_pieces_concatenate_to_the_whole_decode_and_never_split_a_character(tok, seed):
    ids = tok(TEXT)["input_ids"]
    stream = TextStream(tok)
    pieces = _feed(stream, _chunks(ids, seed))
    assert "".join(p.text for p in pieces) == tok.decode(ids) == TEXT == stream.text
    assert not any(REPLACEMENT in p.text for p in pieces)  # 世 and 🙂 span several tokens
    assert [t for p in pieces for t in p.tokens] == ids  # every log-prob entry once, in order
    assert stream.finish_reason == "length"


@pytest.mark.parametrize("seed", range(4))
def test_a_stop_string_cuts_the_text_and_drops_the_tokens_after_it(tok, seed):
    ids = tok(TEXT)["input_ids"] + tok(" stop again")["input_ids"]
    stream = TextStream(tok, stop=["zzz", "stop"])
    pieces = _feed(stream, _chunks(ids, seed), finish="length")
    want = TEXT[:TEXT.index("stop")]
    assert "".join(p.text for p in pieces) == stream.text == want
    assert stream.finish_reason == "stop"
    # the tokens kept end with the one that completed the stop string
    assert tok.decode(stream.tokens).endswith("stop") and len(stream.tokens) < len(ids)
    assert not any("st" in p.text for p in pieces)  # a possible start of 'stop' is held back


def test_a_stop_string_inside_one_token_and_the_earliest_of_several(tok):
    ids = tok("abc, world. Done")["input_ids"]
    stream = TextStream(tok, stop=["Done", "orl"])
    pieces = _feed(stream, [ids])
    assert stream.text == "abc, w" and pieces[0].text == "abc, w"


def test_eos_ends_the_text_and_has_no_log_prob_entry(tok):
    ids = tok("Hi there")["input_ids"]
    stream = TextStream(tok, eos_ids=[EOS])
    pieces = _feed(stream, [ids, [EOS]], finish="stop")
    assert stream.text == "Hi there" and stream.finish_reason == "stop"
    assert [t for p in pieces for t in p.tokens] == ids
    assert stream.tokens == ids + [EOS]  # counted in usage


def _error(model, raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        request = parse(model, raw)
        unsupported(request)
    return info.value


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": true}', "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}', "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 17}', "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": -1}', "seed"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}', "stop"),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
])
def test_wrong_fields_are_named(raw, param):
    e = _error(ChatRequest, raw)
    assert (e.status, e.param, e.type) == (400, param, "invalid_request_error")
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_bad_json_unknown_fields_and_content_parts():
    assert _error(ChatRequest, b'{"model": "m", "messages": [').code == "invalid_json"
    ok = parse(ChatRequest, b'{"model": "m", "messages": [{"role": "user", "content": [{"type": '
                            b'"text", "text": "a"}, {"type": "text", "text": "b"}]}], "user": "u",'
                            b' "some_future_field": {"x": 1}}')
    assert ok.messages[0].text() == "ab"
    image = _error(ChatRequest, b'{"model": "m", "messages": [{"role": "user", "content": [{"type":'
                                b' "image_url", "image_url": {"url": "http://x"}}]}]}')
    assert "only text content" in image.message and image.param == "messages.0.content"


@pytest.mark.parametrize("field, param", [
    ('"tools": [{"type": "function", "function": {"name": "f"}}]', "tools"),
    ('"frequency_penalty": 0.5', "frequency_penalty"),
    ('"logit_bias": {"5": 10}', "logit_bias"),
    ('"top_logprobs": 2, "logprobs": true', "top_logprobs"),
    ('"response_format": {"type": "json_object"}', "response_format"),
])
def test_known_but_unsupported_features_are_refused_by_name(field, param):
    raw = f'{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], {field}}}'.encode()
    e = _error(ChatRequest, raw)
    assert (e.status, e.param, e.code) == (400, param, "unsupported")


def test_completion_prompts_and_their_refusals():
    for prompt in ('"text"', "[1, 2, 3]", '["a", "b"]', "[[1, 2], [3]]"):
        parse(CompletionRequest, f'{{"model": "m", "prompt": {prompt}, "logprobs": 0}}'.encode())
    for prompt in ("[]", '[1, "a"]', "[[]]", "5"):
        assert _error(CompletionRequest, f'{{"model": "m", "prompt": {prompt}}}'.encode()).param == "prompt"
    for field in ('"echo": true', '"logprobs": 2', '"best_of": 3', '"suffix": "x"'):
        e = _error(CompletionRequest, f'{{"model": "m", "prompt": "x", {field}}}'.encode())
        assert e.code == "unsupported"
