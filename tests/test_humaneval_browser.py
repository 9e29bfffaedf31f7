"""The annotation app in a real browser: Debian's headless Chromium driven by Playwright against
the app served on loopback by pdpo_jax.asgi.running. Screenshots go to $PDPO_TEST_ARTIFACTS
(default build/test-artifacts/)."""
import csv
import io
import json
import os
import pathlib

import pytest
from humaneval_data import english_pairs, pair_row, write_judge_folder

from pdpo_jax import asgi
from pdpo_jax.humaneval.app import Study, create_app
from pdpo_jax.humaneval.pairs import load_pairs
from pdpo_jax.humaneval.store import Store
from pdpo_jax.humaneval.texts import texts

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = pathlib.Path(os.environ.get("PDPO_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
ADMIN = "admin-token-123"
XSS = "<script>alert(1)</script>"
WAIT_MS = 10_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=(
    f"{CHROMIUM} absent: these tests drive Debian's Chromium (apt-get install chromium "
    "fonts-noto-cjk); CI installs it"))


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        # launch() runs Chromium on a fresh temporary profile (user-data dir), removed on close
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS,
                                    timeout=30_000)
        playwright.expect.set_options(timeout=WAIT_MS)
        yield browser
        browser.close()


def _study(tmp_path, rows, lang="en", **store_kw) -> Study:
    pairs = load_pairs(write_judge_folder(tmp_path / "judge", rows))
    return Study(Store(tmp_path / "a.sqlite", pairs, **store_kw), {p.id: p for p in pairs},
                 texts(lang), ADMIN)


def _page(browser, width=1100, height=900):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    return page


def _sign_in(page, url, field, value):
    page.goto(url + "/")
    page.fill(f"#{field}", value)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/task")


def _progress(page, text):
    """Waits for the progress text, then for the page's load event: task.js is deferred, so a
    key pressed between the text appearing and the script running would be lost (seen once, on
    a loaded machine: "2 of 5 judged" stayed after a key press)."""
    from playwright.sync_api import expect
    expect(page.locator("#progress")).to_have_text(text)
    page.wait_for_load_state("load")


def _shown(page, study) -> tuple[int, str, str]:
    """(pair id, model shown as 1, model shown as 2), read off the page's text."""
    pair = study.pairs[int(page.inner_text(".pair-no").removeprefix("No. "))]
    first_is_1 = page.inner_text("#reply-1 .text") == pair.response_first
    return pair.id, *(pair.models if first_is_1 else pair.models[::-1])


def _screenshot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_judge_with_mouse_and_keys_undo_reload_and_export(browser, tmp_path):
    study = _study(tmp_path, english_pairs(5), per_pair=1)
    made = {}  # pair -> the winner the clicks mean
    with asgi.running(create_app(study)) as url:
        page = _page(browser)
        _sign_in(page, url, "name", "ann")
        _progress(page, "0 of 5 judged")
        _screenshot(page, "humaneval_en.png")
        order = []
        for act, choice, done in ((lambda: page.click("#choose-1"), 1, 1),
                                  (lambda: page.keyboard.press("2"), 2, 2),
                                  (lambda: page.keyboard.press("3"), 3, 3)):
            pair, one, two = _shown(page, study)
            act()
            _progress(page, f"{done} of 5 judged")
            made[pair] = {1: one, 2: two, 3: "tie"}[choice]
            order.append(pair)
        page.click("#back")                  # undo the last answer: its pair comes back
        _progress(page, "2 of 5 judged")
        assert _shown(page, study)[0] == order[2]
        page.keyboard.press("Backspace")     # and the one before
        _progress(page, "1 of 5 judged")
        assert _shown(page, study)[0] == order[1]
        del made[order[2]], made[order[1]]
        page.click("#choose-3")
        _progress(page, "2 of 5 judged")
        made[order[1]] = "tie"
        before = _shown(page, study)
        page.reload()                         # mid-task: the same pair, same order
        _progress(page, "2 of 5 judged")
        assert _shown(page, study) == before
        page.keyboard.press("1")
        _progress(page, "3 of 5 judged")
        made[before[0]] = before[1]
        csv_text, jsonl_text = _admin_exports(browser, url)
    assert page.dialogs == []
    for rows in (list(csv.DictReader(io.StringIO(csv_text))),
                 [json.loads(line) for line in jsonl_text.splitlines()]):
        assert {int(r["pair"]): r["winner"] for r in rows} == made
        assert {r["annotator"] for r in rows} == {"ann"}


def _admin_exports(browser, url) -> tuple[str, str]:
    page = _page(browser)
    page.goto(url + "/admin")
    page.fill("#token", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/admin")
    assert "Annotators" in page.inner_text("main")
    get = page.context.request.get  # shares the admin cookie
    return get(url + "/admin/export.csv").text(), get(url + "/admin/export.jsonl").text()


def test_two_annotators_at_once_never_share_a_slot(browser, tmp_path):
    tokens = {"ann": "token-ann-1", "bob": "token-bob-2"}
    study = _study(tmp_path, english_pairs(6), per_pair=1, annotators=tokens)
    with asgi.running(create_app(study)) as url:
        ann, bob = _page(browser), _page(browser)
        _sign_in(ann, url, "token", tokens["ann"])
        _sign_in(bob, url, "token", tokens["bob"])
        for done in (1, 2, 3):
            a, b = _shown(ann, study)[0], _shown(bob, study)[0]
            assert a != b  # one slot per pair: both pages are open at once on different pairs
            ann.keyboard.press("1")
            bob.click("#choose-2")
            _progress(ann, f"{done} of 3 judged")
            _progress(bob, f"{done} of 3 judged")
        for page in (ann, bob):
            assert "You have judged 3 of 3 pairs" in page.inner_text("#done")
    assert [p["answered"] for p in study.store.pair_progress()] == [1] * 6
    assert sorted(r["annotator"] for r in study.store.judgments()) == ["ann"] * 3 + ["bob"] * 3


def test_a_script_in_a_reply_is_shown_as_text(browser, tmp_path):
    rows = [{**pair_row(0, response_first=XSS), "persona": ['<img src=x onerror="alert(2)">']}]
    study = _study(tmp_path, rows, per_pair=1)
    with asgi.running(create_app(study)) as url:
        page = _page(browser)
        _sign_in(page, url, "name", "ann")
        from playwright.sync_api import expect
        expect(page.get_by_text(XSS, exact=True)).to_be_visible()
        expect(page.get_by_text('<img src=x onerror="alert(2)">', exact=True)).to_be_visible()
        assert page.locator("script").count() == 1  # task.js only
        assert page.locator("main img").count() == 0
        page.keyboard.press("1")
        _progress(page, "1 of 1 judged")
    assert page.dialogs == []


def test_japanese_page_wraps_and_screenshots(browser, tmp_path):
    study = _study(tmp_path, [pair_row(0, japanese=True)], lang="ja", per_pair=1)
    with asgi.running(create_app(study)) as url:
        page = _page(browser)
        _sign_in(page, url, "name", "評価者A")
        assert page.get_attribute("html", "lang") == "ja"
        instructions = page.inner_text(".instructions")
        assert study.texts.instructions[1] in instructions and "[[" not in instructions
        _progress(page, "1件中0件 評価済み")
        font = page.evaluate("getComputedStyle(document.documentElement).fontFamily")
        assert "Noto Sans CJK JP" in font and "Hiragino Sans" in font and "Yu Gothic" in font
        _screenshot(page, "humaneval_ja.png")
        page.set_viewport_size({"width": 400, "height": 900})  # a phone: long lines must wrap
        box = page.evaluate("""() => { const t = [...document.querySelectorAll('.replies .text')]
                .reduce((a, b) => (a.textContent.length > b.textContent.length ? a : b));
            return {scroll: t.scrollWidth, client: t.clientWidth, height: t.clientHeight,
                    line: parseFloat(getComputedStyle(t).lineHeight),
                    page: document.documentElement.scrollWidth, view: window.innerWidth}; }""")
        assert box["scroll"] <= box["client"] and box["page"] <= box["view"], box
        assert box["height"] > 3 * box["line"], box  # the long reply runs over several lines
        page.keyboard.press("3")
        _progress(page, "1件中1件 評価済み")
        assert "ご協力ありがとうございました" in page.inner_text("#done")
    assert [r["choice"] for r in study.store.judgments()] == ["tie"]
