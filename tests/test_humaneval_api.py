"""The annotation app without a browser (Starlette's TestClient): sign-in, refusals with clear
4xx, idempotent submits, privacy (own assignments only, no model names), admin access and
export, escaping, security headers, and a restart on the same database."""
import csv
import io
import json

import pytest
from fastapi.testclient import TestClient
from humaneval_data import MODEL_A, MODEL_B, english_pairs, pair_row, write_judge_folder

from pdpo_jax.humaneval.app import MAX_BODY, Study, create_app
from pdpo_jax.humaneval.pairs import load_pairs
from pdpo_jax.humaneval.store import Store
from pdpo_jax.humaneval.texts import texts

ADMIN = "admin-token-123"
XSS = "<script>alert(1)</script>"


def _study(tmp_path, rows=None, lang="en", **store_kw) -> Study:
    pairs = load_pairs(write_judge_folder(tmp_path / "judge", rows or english_pairs(4)))
    store = Store(tmp_path / "a.sqlite", pairs, **store_kw)
    return Study(store, {p.id: p for p in pairs}, texts(lang), ADMIN)


def _client(study: Study) -> TestClient:
    return TestClient(create_app(study), base_url="http://127.0.0.1", follow_redirects=False)


def _sign_in(client: TestClient, **form) -> TestClient:
    r = client.post("/signin", data=form)
    assert r.status_code == 303 and r.headers["location"] == "/task", r.text
    return client


class Bodies:
    """Every annotator-facing response body, to check that no model name leaks."""

    def __init__(self):
        self.seen = []

    def __call__(self, response):
        self.seen.append(response.text)
        return response


@pytest.fixture
def app_and_client(tmp_path):
    study = _study(tmp_path, per_pair=2)
    return study, _sign_in(_client(study), name="ann")


def _current(client) -> dict:
    r = client.get("/api/assignments/current")
    assert r.status_code == 200
    return r.json()["assignment"]


def test_task_page_and_api_show_one_pair_without_model_names(app_and_client):
    study, client = app_and_client
    bodies = Bodies()
    page = bodies(client.get("/task"))
    assert page.status_code == 200 and '<html lang="en">' in page.text
    a = _current(client)
    bodies(client.get("/api/assignments/current"))
    bodies(client.get(f"/api/assignments/{a['assignment_id']}"))
    pair = study.pairs[a["pair"]]
    assert {a["reply_1"], a["reply_2"]} == {pair.response_first, pair.response_second}
    assert f'data-assignment="{a["assignment_id"]}"' in page.text
    assert study.texts.instructions[0] in page.text
    assert "User:" in page.text and "I work night shifts at a bakery." in page.text
    for choice in (1, 2):
        a = _current(client)
        bodies(client.post("/api/judgments", json={"assignment_id": a["assignment_id"], "choice": choice}))
        bodies(client.get("/task"))
    bodies(client.get("/"))
    for text in bodies.seen:
        assert MODEL_A not in text and MODEL_B not in text
        for key in ('"first"', '"second"', '"swapped"', '"verdict"', '"winner"'):
            assert key not in text  # no field that tells which model wrote which reply


@pytest.mark.parametrize("body,status,message", [
    ({"assignment_id": 1}, 422, "choice: Field required"),
    ({"assignment_id": 1, "choice": 4}, 422, "choice: Input should be 1, 2 or 3"),
    ({"assignment_id": 1, "choice": "1"}, 422, "choice: Input should be 1, 2 or 3"),
    ({"assignment_id": 1, "choice": True}, 422, "choice: Value error, Input should be 1, 2 or 3, not a boolean"),
    ({"assignment_id": 0, "choice": 1}, 422, "assignment_id: Input should be greater than or equal to 1"),
    ({"assignment_id": 1, "choice": 1, "model": "x"}, 422, "model: Extra inputs are not permitted"),
    ({"assignment_id": 99, "choice": 1}, 404, "you have no assignment 99"),
    ([1, 2], 422, "invalid request"),
])
def test_malformed_submissions_are_refused_with_a_message(app_and_client, body, status, message):
    _, client = app_and_client
    _current(client)
    r = client.post("/api/judgments", json=body)
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_bodies_of_the_wrong_kind_or_size_are_refused(app_and_client):
    _, client = app_and_client
    a = _current(client)
    payload = json.dumps({"assignment_id": a["assignment_id"], "choice": 1})
    r = client.post("/api/judgments", content=payload, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"]
    r = client.post("/api/judgments", content="{broken", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
    r = client.post("/api/judgments", content=b" " * (MAX_BODY + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/api/assignments/abc").status_code == 422
    assert client.get("/api/assignments/-3").status_code == 422


def test_submit_is_idempotent_and_changing_needs_undo(app_and_client):
    study, client = app_and_client
    a = _current(client)
    body = {"assignment_id": a["assignment_id"], "choice": 2}
    assert client.post("/api/judgments", json=body).json()["status"] == "saved"
    assert client.post("/api/judgments", json=body).json()["status"] == "unchanged"
    r = client.post("/api/judgments", json={**body, "choice": 1})
    assert r.status_code == 409 and "undo it first" in r.json()["detail"]
    assert len(study.store.judgments()) == 1
    undo = client.post("/api/undo", json={"assignment_id": a["assignment_id"]})
    assert undo.json()["status"] == "undone"
    assert _current(client)["assignment_id"] == a["assignment_id"]
    assert client.post("/api/judgments", json={**body, "choice": 1}).json()["status"] == "saved"
    assert [r["choice"] for r in study.store.judgments()] == ["1"]


def test_annotators_see_only_their_own_assignments(tmp_path):
    study = _study(tmp_path, per_pair=2)
    ann, bob = _sign_in(_client(study), name="ann"), _sign_in(_client(study), name="bob")
    mine = _current(ann)["assignment_id"]
    assert bob.get(f"/api/assignments/{mine}").status_code == 404
    r = bob.post("/api/judgments", json={"assignment_id": mine, "choice": 1})
    assert r.status_code == 404
    assert bob.post("/api/undo", json={"assignment_id": mine}).status_code == 404
    anonymous = _client(study)
    assert anonymous.get("/api/assignments/current").status_code == 401
    assert anonymous.get("/task").headers["location"] == "/"
    for path in ("/admin/export.csv", "/admin/export.jsonl", "/admin/progress.json"):
        assert ann.get(path).status_code == 401  # a session cookie is not an admin token


def test_admin_needs_the_token(tmp_path):
    study = _study(tmp_path)
    client = _client(study)
    assert client.get("/admin").status_code == 401
    assert client.get("/admin/export.csv").status_code == 401
    wrong = {"authorization": "Bearer not-the-token"}
    assert client.get("/admin/export.jsonl", headers=wrong).status_code == 403
    assert client.get("/admin", headers=wrong).status_code == 403
    assert client.post("/admin/signin", data={"token": "not-the-token"}).status_code == 403
    ok = client.post("/admin/signin", data={"token": ADMIN})
    assert ok.status_code == 303 and ok.headers["location"] == "/admin"
    page = client.get("/admin")
    assert page.status_code == 200 and "4 pairs × 3 judgments each" in page.text
    assert client.get("/admin/export.csv").status_code == 200


def test_admin_export_matches_the_answers(tmp_path):
    study = _study(tmp_path, per_pair=1)
    client = _sign_in(_client(study), name="ann")
    answers = {}
    for choice in (1, 2, 3):
        a = _current(client)
        client.post("/api/judgments", json={"assignment_id": a["assignment_id"], "choice": choice})
        pair = study.pairs[a["pair"]]
        shown_1 = pair.first if a["reply_1"] == pair.response_first else pair.second
        shown_2 = pair.second if shown_1 == pair.first else pair.first
        answers[a["pair"]] = (shown_1, shown_2, {1: shown_1, 2: shown_2, 3: "tie"}[choice])
    headers = {"authorization": f"Bearer {ADMIN}"}
    jsonl = [json.loads(line) for line in client.get("/admin/export.jsonl", headers=headers).text.splitlines()]
    rows = list(csv.DictReader(io.StringIO(client.get("/admin/export.csv", headers=headers).text)))
    for export in (jsonl, rows):
        assert {int(r["pair"]): (r["shown_1"], r["shown_2"], r["winner"]) for r in export} == answers
        assert {r["annotator"] for r in export} == {"ann"}
        assert all(r["shown_at"] and r["answered_at"] for r in export)
    progress = client.get("/admin/progress.json", headers=headers).json()
    assert progress["annotators"][0]["answered"] == 3


def test_replies_and_personas_are_escaped(tmp_path):
    rows = [{**pair_row(0, response_first=XSS), "persona": ['<img src=x onerror="alert(2)">']}]
    study = _study(tmp_path, rows=rows, per_pair=1)
    client = _sign_in(_client(study), name="ann")
    page = client.get("/task").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and XSS not in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page and "<img" not in page


def test_security_headers_and_no_third_party_pages(app_and_client):
    _, client = app_and_client
    r = client.get("/task")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert "<script src=\"/static/task.js\" defer></script>" in r.text and "<script>" not in r.text
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404
    assert client.get("/static/humaneval.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_sign_in_refusals(tmp_path):
    study = _study(tmp_path)
    client = _client(study)
    for name in ("", "   ", "x" * 41, "<b>bold</b>"):
        r = client.post("/signin", data={"name": name})
        assert r.status_code == 422 and "invalid form: name" in r.text
    assert client.post("/signin", json={"name": "ann"}).status_code == 415
    tokened = _client(_study(tmp_path / "t", annotators={"ann": "token-ann-1", "bob": "token-bob-2",
                                                           "cyd": "token-cyd-3"}))
    home = tokened.get("/").text
    assert 'name="token"' in home and 'type="password"' in home
    r = tokened.post("/signin", data={"token": "wrong-token"})
    assert r.status_code == 403 and "unknown token" in r.text and "<html" in r.text
    assert tokened.post("/signin", data={"name": "ann"}).status_code == 422
    _sign_in(tokened, token="token-bob-2")
    assert "Annotator: bob" in tokened.get("/task").text


def test_sign_out_ends_the_session(app_and_client):
    _, client = app_and_client
    assert client.post("/signout").headers["location"] == "/"
    assert client.get("/task").headers["location"] == "/"


def test_a_restart_on_the_same_database_loses_nothing(tmp_path):
    study = _study(tmp_path, per_pair=2)
    client = _sign_in(_client(study), name="ann")
    first = _current(client)
    client.post("/api/judgments", json={"assignment_id": first["assignment_id"], "choice": 3})
    second = _current(client)
    cookies = dict(client.cookies)
    again = _client(_study(tmp_path, per_pair=2))  # a new app (a new process) on the same files
    again.cookies.update(cookies)
    assert _current(again) == second
    assert again.post("/api/undo", json={"assignment_id": first["assignment_id"]}).json()["status"] == "undone"
    assert _current(again)["assignment_id"] == first["assignment_id"]


def test_japanese_page(tmp_path):
    study = _study(tmp_path, rows=[pair_row(0, japanese=True)], lang="ja", per_pair=1)
    client = _sign_in(_client(study), name="評価者A")
    page = client.get("/task").text
    assert '<html lang="ja">' in page
    assert "公平に判断し" in page and "[[" not in page and "{persona}" not in page
    assert "ユーザー:" in page and "1の方が良い" in page and "評価者: 評価者A" in page


def test_forms_from_another_site_are_refused(tmp_path):
    client = _client(_study(tmp_path))
    r = client.post("/signin", data={"name": "ann"}, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and "another site" in r.text
    r = client.post("/signin", data={"name": "ann"}, headers={"origin": "null"})  # sandboxed frame
    assert r.status_code == 403
    r = client.post("/signin", data={"name": "ann"}, headers={"origin": "http://127.0.0.1"})
    assert r.status_code == 303
    # pages ask browsers to send the Origin of same-site posts (no-referrer would make it 'null')
    assert client.get("/").headers["referrer-policy"] == "same-origin"


def test_an_open_study_caps_the_number_of_names(tmp_path, monkeypatch):
    from pdpo_jax.humaneval import store as store_module
    monkeypatch.setattr(store_module, "MAX_ANNOTATORS", 2)
    client = _client(_study(tmp_path))
    for name in ("ann", "bob", "ann"):  # a known name may sign in again
        assert client.post("/signin", data={"name": name}).status_code == 303
    r = client.post("/signin", data={"name": "cyd"})
    assert r.status_code == 409 and "has its 2 annotators" in r.text
