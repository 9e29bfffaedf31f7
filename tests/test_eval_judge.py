"""The judge client against a real HTTP server on 127.0.0.1: retries, parsing, caching, errors.

The server implements POST /v1/chat/completions. Its verdict is deterministic: the reply that
contains "GOOD" wins ([[3]] when both or neither do). Markers inside a reply inject failures
on the first request of that prompt (DEAD: on every request): R429 → 429 with Retry-After, R500 → 500, SLOW → a
reply after the client's timeout, MALFORMED → a non-JSON body, NOVERDICT → an answer without
a verdict on every request (so it ends invalid), NOVERDICT1 → no verdict on the first request.
"""
import collections
import http.server
import json
import logging
import re
import socket
import sqlite3
import threading
import time

import pytest

from pdpo_jax.data import PersonaTurn
from pdpo_jax.config import JudgeSection
from pdpo_jax.errors import UserError
from pdpo_jax.eval import (JudgeError, JudgmentCache, OpenAIBackend, load_template, make_backend,
                           parse_verdict, plan_comparisons, run_judge_stage, run_tournament)

SECRET = "sk-test-DO-NOT-LEAK-1234"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with state["lock"]:
            state["requests"] += 1
            state["auth"].add(self.headers.get("Authorization"))
            state["per_prompt"][prompt] += 1
            seen = state["per_prompt"][prompt]
        if self.path != "/v1/chat/completions":
            return self._send(404, b"no such route")
        if state["status"]:
            return self._send(state["status"], b"server says no")
        r1, r2 = _replies(prompt)
        if "DEAD" in r1 + r2 and not state["revived"]:
            return self._send(500, b"this one always fails")
        first = seen == 1
        if first and "R429" in r1 + r2:
            return self._send(429, b"slow down", {"Retry-After": "0"})
        if first and "R500" in r1 + r2:
            return self._send(500, b"oops")
        if first and "SLOW" in r1 + r2:
            time.sleep(0.6)  # beyond the client's 0.3 s timeout
        if first and "MALFORMED" in r1 + r2:
            return self._send(200, b"{not json")
        if "NOVERDICT" in r1 + r2 and (first or "NOVERDICT1" not in r1 + r2):
            content = "Both are fine, I cannot decide."
        else:
            content = f"Reply {'1' if 'GOOD' in r1 else '2'} plays the persona. [[{_verdict(r1, r2)}]]"
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                             "content": content}}]}).encode())

    def _send(self, status, payload, headers=()):
        try:
            self.send_response(status)
            for k, v in dict(headers).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


def _replies(prompt):
    return (re.search(r"\[Assistant 1's reply\]\n(.*?)\n\n\[Assistant 2", prompt, re.S).group(1),
            re.search(r"\[Assistant 2's reply\]\n(.*)$", prompt, re.S).group(1).strip())


def _verdict(r1, r2):
    g1, g2 = "GOOD" in r1, "GOOD" in r2
    return 3 if g1 == g2 else (1 if g1 else 2)


@pytest.fixture
def server():
    """A threaded chat-completions server that shuts itself down after 120 s at the latest."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.state = {"lock": threading.Lock(), "requests": 0, "auth": set(), "status": 0, "revived": False,
                 "per_prompt": collections.Counter()}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    timer = threading.Timer(120, srv.shutdown)
    timer.daemon = True
    timer.start()
    yield srv
    timer.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _backend(srv, **kw):
    kw = {"concurrency": 4, "timeout_s": 0.3, "max_retries": 3, "backoff_s": 0.01,
          "max_backoff_s": 0.05, **kw}
    return OpenAIBackend("judge-model", _url(srv), SECRET, **kw)


HISTORIES = [PersonaTurn(f"d{i}", ("i like tea .", "i am a nurse ."), ("hi !", "hello", f"turn {i} ?"),
                         "") for i in range(6)]
# Model "good" always wins; "flaky" replies carry the failure markers.
RESPONSES = {
    "good": [f"GOOD reply {i}" for i in range(6)],
    "plain": [f"plain reply {i}" for i in range(6)],
    "flaky": ["R429 one", "R500 two", "SLOW three", "MALFORMED four", "NOVERDICT five",
              "NOVERDICT1 GOOD six"],
}


def _expected(j):
    r1 = RESPONSES[j.comparison.first][j.comparison.history]
    r2 = RESPONSES[j.comparison.second][j.comparison.history]
    if "NOVERDICT" in r1 + r2 and "NOVERDICT1" not in r1 + r2:
        return None
    return _verdict(r1, r2)


def test_tournament_retries_parses_caches_and_resumes_for_free(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    template = load_template("english")
    plan = plan_comparisons(list(RESPONSES), len(HISTORIES), 36, seed=0)
    cache_path = tmp_path / "judgments.sqlite"
    with JudgmentCache(cache_path) as cache:
        judgments = run_tournament(plan, HISTORIES, RESPONSES, _backend(server), template, cache,
                                   parse_retries=2, progress=False)
        assert len(cache) == len({(c.history, c.first, c.second) for c in plan})
    assert [j.verdict for j in judgments] == [_expected(j) for j in judgments]
    assert any(j.verdict is None for j in judgments)           # NOVERDICT: invalid, not a tie
    assert all(j.attempts == 3 for j in judgments if j.verdict is None)
    assert all(not j.cached for j in judgments)
    unique = len(server.state["per_prompt"])
    assert server.state["requests"] > unique                    # failures were retried
    assert server.state["auth"] == {f"Bearer {SECRET}"}

    before = server.state["requests"]
    with JudgmentCache(cache_path) as cache:
        again = run_tournament(plan, HISTORIES, RESPONSES, _backend(server), template, cache,
                               progress=False)
    assert server.state["requests"] == before                   # a rerun pays nothing
    assert [(j.verdict, j.answer) for j in again] == [(j.verdict, j.answer) for j in judgments]
    assert all(j.cached for j in again)

    # The key is never written anywhere: cache, logs, repr.
    assert SECRET.encode() not in cache_path.read_bytes()
    assert SECRET not in caplog.text and SECRET not in repr(_backend(server))


def test_request_counts_per_failure(server):
    backend = _backend(server)
    template = load_template("english")
    prompt = template.render(["p"], ["h"], "R429 GOOD", "x")
    assert parse_verdict(backend.complete(prompt)) == 1
    assert server.state["per_prompt"][prompt] == 2           # one 429, one answer
    prompt = template.render(["p"], ["h"], "y", "SLOW GOOD")
    assert parse_verdict(backend.complete(prompt)) == 2
    assert server.state["per_prompt"][prompt] == 2           # one timeout, one answer


def test_interrupted_run_keeps_finished_rows_and_resumes(server, tmp_path):
    template = load_template("english")
    plan = plan_comparisons(["good", "plain"], len(HISTORIES), 6, seed=1)
    server.state["status"] = 503
    with JudgmentCache(tmp_path / "c.sqlite") as cache, pytest.raises(JudgeError, match="HTTP 503"):
        run_tournament(plan, HISTORIES, RESPONSES, _backend(server, max_retries=1), template,
                       cache, progress=False)
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 0
    server.state["status"] = 0
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        judgments = run_tournament(plan, HISTORIES, RESPONSES, _backend(server), template, cache,
                                   progress=False)
        assert len(cache) == 6
    assert all(j.winner == "good" for j in judgments)


def test_one_failing_request_keeps_the_answers_already_paid_for(server, tmp_path):
    replies = {"good": RESPONSES["good"], "dead": [f"reply {i}" for i in range(5)] + ["DEAD"]}
    plan = plan_comparisons(list(replies), len(HISTORIES), 12, seed=0)
    template = load_template("english")
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(JudgeError, match="HTTP 500"):
            run_tournament(plan, HISTORIES, replies, _backend(server, max_retries=1), template,
                           cache, progress=False)
        stored = len(cache)
    prompts = len(server.state["per_prompt"])
    assert 0 < stored < prompts           # finished answers were kept, nothing else
    server.state["revived"] = True
    before = server.state["requests"]
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        judgments = run_tournament(plan, HISTORIES, replies, _backend(server), template, cache,
                                   progress=False)
        total = len(cache)
    assert server.state["requests"] - before == total - stored   # only the missing ones
    assert all(j.winner == "good" for j in judgments)


def test_unreachable_endpoint_is_a_clear_error_and_writes_nothing(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend("m", f"http://127.0.0.1:{port}/v1", SECRET, max_retries=1,
                            backoff_s=0.01, timeout_s=2)
    plan = plan_comparisons(["good", "plain"], len(HISTORIES), 4, seed=0)
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(JudgeError, match=r"failed 2 times, last: cannot reach") as err:
            run_tournament(plan, HISTORIES, RESPONSES, backend, load_template("english"), cache,
                           progress=False)
        assert len(cache) == 0
    assert SECRET not in str(err.value)


def test_refused_key_fails_at_once(server):
    server.state["status"] = 401
    backend = _backend(server)
    with pytest.raises(JudgeError, match=r"HTTP 401 \(the key in \$OPENAI_API_KEY was refused\)"):
        backend.complete("hello")
    assert server.state["requests"] == 1


def test_missing_api_key_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("PDPO_TEST_NO_SUCH_KEY", raising=False)
    cfg = JudgeSection(api_key_env="PDPO_TEST_NO_SUCH_KEY")
    with pytest.raises(JudgeError, match=r"\$PDPO_TEST_NO_SUCH_KEY, which is not set"):
        make_backend(cfg)
    with pytest.raises(JudgeError, match="PDPO_TEST_NO_SUCH_KEY"):
        run_judge_stage(tmp_path, {"a": tmp_path, "b": tmp_path}, None, HISTORIES, cfg)
    assert not (tmp_path / "judge").exists()
    with pytest.raises(JudgeError, match="API key"):
        OpenAIBackend("m", "http://127.0.0.1:1/v1", "")


def test_template_errors(tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("Persona {persona}\nHistory {history}\nWhich is better? [[1]] or [[2]]")
    with pytest.raises(ValueError, match=r"\{response_1\}, \{response_2\} missing"):
        load_template(str(bad))
    bad.write_text("{persona} {history} {response_1} {response_2} {response_1}")
    with pytest.raises(ValueError, match=r"\{response_1\} repeated"):
        load_template(str(bad))
    with pytest.raises(UserError, match="judge.template"):
        load_template(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="repeated"):  # checked before the key
        make_backend(JudgeSection(template=str(bad), api_key_env="PDPO_UNSET_KEY"))


def test_templates_render_and_custom_file(tmp_path):
    for name in ("english", "japanese"):
        t = load_template(name)
        text = t.render(["i like tea ."], ["hi", "hello", "how are you ?"], "fine {response_2}", "")
        assert "- i like tea ." in text and "fine {response_2}" in text and "(empty reply)" in text
        assert "[[1]]" in text and "[[2]]" in text and "[[3]]" in text
        assert not re.search(r"\{(persona|history|response_1|response_2)\}", text.replace(
            "fine {response_2}", ""))
    en = load_template("english").render(["p"], ["a", "b", "c"], "x", "y")
    assert "User: a\nAssistant: b\nUser: c" in en
    ja = load_template("japanese").render(["p"], ["a", "b"], "x", "y")
    assert "アシスタント: a\nユーザー: b" in ja
    custom = tmp_path / "mine.txt"
    custom.write_text('{"json": true}\nP={persona}\nH={history}\n1={response_1}\n2={response_2}\n')
    t = load_template(str(custom))
    assert t.render(["p"], ["h"], "r1", "r2").startswith('{"json": true}\nP=- p\nH=User: h\n1=r1')
    assert t.hash != load_template("english").hash


@pytest.mark.parametrize("answer, verdict", [
    ("A is better. [[1]]", 1), ("[[2]]", 2), ("equal [[ 3 ]]", 3),
    ("I would say [[1]] if ..., but final: [[2]]", 2), ("［［１］］", 1),
    ("no verdict", None), ("[[4]]", None), ("[1]", None), ("", None), (None, None)])
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_stage_with_openai_backend_from_environment(server, tmp_path, monkeypatch):
    """run_judge_stage reads URL and key from the environment; replies are injected."""
    monkeypatch.setenv("PDPO_TEST_JUDGE_URL", _url(server))
    monkeypatch.setenv("PDPO_TEST_JUDGE_KEY", SECRET)
    cfg = JudgeSection(model="judge-model", base_url_env="PDPO_TEST_JUDGE_URL",
                       api_key_env="PDPO_TEST_JUDGE_KEY", comparisons=12, bootstrap=50,
                       concurrency=3, timeout_s=5)
    replies = {"good": RESPONSES["good"], "plain": RESPONSES["plain"]}
    monkeypatch.setattr("pdpo_jax.eval.stages.responses_for_checkpoints",
                        lambda out, cks, tok, tmpl, picked, rcfg, mesh=None: replies)
    markdown = run_judge_stage(tmp_path, {"good": "unused", "plain": "unused"}, None, HISTORIES, cfg)
    assert "| good | 12 | 100.0 | 0.0 | 0.0 | 0 |" in markdown
    assert "| good vs plain | 12 | 100.0 | 0.0 | 0.0 | 0 |" in markdown
    out = tmp_path / "judge"
    assert (out / "win_rates.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "comparisons.jsonl").read_text().splitlines()]
    assert {r["winner"] for r in rows} == {"good"} and {r["first"] for r in rows} == {"good", "plain"}
    for f in out.iterdir():
        assert SECRET.encode() not in f.read_bytes()
    requests = server.state["requests"]
    assert run_judge_stage(tmp_path, {"good": "u", "plain": "u"}, None, HISTORIES, cfg) == markdown
    assert server.state["requests"] == requests
