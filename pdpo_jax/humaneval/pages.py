"""The app's HTML: the package's templates filled with escaped text.

Templates are `string.Template` files in `templates/` ($name placeholders). Every value is
HTML-escaped unless it is an `Html` (a fragment built here from escaped parts), so a reply or a
persona holding markup is shown as text. No model name is ever passed to an annotator page.
"""
from __future__ import annotations

import functools
import html
import importlib.resources
import string
from collections.abc import Iterable, Mapping, Sequence

from pdpo_jax.humaneval.pairs import Pair, speaker_labels
from pdpo_jax.humaneval.store import Annotator, Assignment
from pdpo_jax.humaneval.texts import Texts


class Html(str):
    """Markup that `render` inserts as is (build it only from escaped text)."""


@functools.cache
def _template(name: str) -> string.Template:
    text = importlib.resources.files(__package__).joinpath("templates", name).read_text("utf-8")
    return string.Template(text)


def render(name: str, **values: object) -> Html:
    """templates/<name> with every value escaped (Html values inserted as they are)."""
    return Html(_template(name).substitute(
        {k: v if isinstance(v, Html) else html.escape(str(v)) for k, v in values.items()}))


def page(texts: Texts, title: str, body: Html, scripts: Sequence[str] = ()) -> str:
    tags = Html("".join(f'<script src="/static/{html.escape(s)}" defer></script>' for s in scripts))
    return render("base.html", lang=texts.lang, title=title, scripts=tags, body=body)


def items(tag: str, texts_: Iterable[str], cls: str = "") -> Html:
    attr = f' class="{cls}"' if cls else ""
    return Html("".join(f"<{tag}{attr}>{html.escape(t)}</{tag}>" for t in texts_))


def signin_page(texts: Texts, token_study: bool, action: str = "/signin",
                title: str | None = None) -> str:
    field = "token" if token_study else "name"
    body = render("signin.html", title=title or texts.ui["title"], action=action, field=field,
                  label=texts.ui[field], input_type="password" if token_study else "text",
                  maxlength=200 if token_study else 40, sign_in=texts.ui["sign_in"])
    return page(texts, title or texts.ui["title"], body)


def message_page(texts: Texts, heading: str, message: str, link: str = "/",
                 link_text: str | None = None) -> str:
    body = render("message.html", heading=heading, message=message, link=link,
                  link_text=link_text or texts.ui["title"])
    return page(texts, heading, body)


def _header(texts: Texts, who: Annotator, done: int, quota: int) -> Html:
    ui = texts.ui
    return render("header.html", signed_in_as=ui["signed_in_as"].format(name=who.name),
                  progress=ui["progress"].format(done=done, quota=quota), sign_out=ui["sign_out"])


def _undo_values(texts: Texts, undo: int | None) -> dict[str, object]:
    return {"undo": undo or "", "back": texts.ui["back"],
            "back_disabled": Html("" if undo else " disabled"),
            "saving": texts.ui["saving"], "error": texts.ui["error"]}


def dialogue_items(texts: Texts, dialogue: Sequence[str]) -> Html:
    """<li><span class="speaker">User:</span>turn</li> per turn, labelled as the judge does."""
    labels = speaker_labels(len(dialogue), texts.speakers)
    return Html("".join(f'<li><span class="speaker">{html.escape(s)}:</span>'
                        f'<span class="turn">{html.escape(t)}</span></li>'
                        for s, t in zip(labels, dialogue)))


def task_page(texts: Texts, who: Annotator, assignment: Assignment, pair: Pair,
              progress: tuple[int, int, int | None]) -> str:
    """One pair: instructions, persona, dialogue, the two replies in the order drawn for this
    annotator, the three choices and Back."""
    done, quota, undo = progress
    reply_1, reply_2 = pair.shown(assignment.swapped)
    ui, heads = texts.ui, texts.headings
    body = render(
        "task.html", header=_header(texts, who, done, quota), assignment=assignment.id,
        instructions_title=ui["instructions"], instructions=items("p", texts.instructions),
        how=ui["how"], pair=pair.id, persona_title=heads["persona"],
        persona=items("li", pair.persona), history_title=heads["history"],
        dialogue=dialogue_items(texts, pair.dialogue), reply_1_title=heads["response_1"],
        reply_1=reply_1, reply_2_title=heads["response_2"], reply_2=reply_2,
        better_1=ui["better_1"], better_2=ui["better_2"], tie=ui["tie"], **_undo_values(texts, undo))
    return page(texts, ui["title"], body, ["task.js"])


def done_page(texts: Texts, who: Annotator, progress: tuple[int, int, int | None]) -> str:
    done, quota, undo = progress
    message = texts.ui["done" if done >= quota else "none_left"].format(done=done, quota=quota)
    body = render("done.html", header=_header(texts, who, done, quota), message=message,
                  **_undo_values(texts, undo))
    return page(texts, texts.ui["title"], body, ["task.js"])


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Html:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c] if r[c] is not None else ''))}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def admin_page(texts: Texts, annotators: Sequence[Mapping], pairs: Sequence[Mapping],
               per_pair: int) -> str:
    answered = sum(p["answered"] for p in pairs)
    full = sum(p["answered"] >= per_pair for p in pairs)
    summary = (f"{len(pairs)} pairs × {per_pair} judgments each: {answered} of "
               f"{len(pairs) * per_pair} given; {full} pairs complete; {len(annotators)} annotators.")
    body = render("admin.html", title=texts.ui["title"], summary=summary,
                  annotators=table(annotators, ["annotator", "answered", "open", "released",
                                                "quota", "last_answer"]),
                  pairs=table(pairs, ["pair", "answered", "open", "per_pair"]))
    return page(texts, "admin", body)
