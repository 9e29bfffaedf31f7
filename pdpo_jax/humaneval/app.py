"""The annotation app (FastAPI): annotator pages, a small JSON API and the admin pages.

    app = create_app(Study(Store("annotations.sqlite", pairs), pairs, texts("ja"), admin_token))
    pdpo_jax.asgi.serve(app, "127.0.0.1", 8080)

Annotators sign in (name, or personal token when the study has them) and get a session cookie;
every endpoint under /task and /api/ shows only the caller's own assignments and never a model
name. Admin pages need the admin token (cookie from /admin/signin, or `Authorization: Bearer`).
Request bodies are pydantic models (JSON for the API, url-encoded for the two sign-in forms),
at most MAX_BODY bytes; refusals are 4xx with a message (JSON for /api/, HTML for pages).
"""
from __future__ import annotations

import csv
import dataclasses
import hmac
import io
import json
import urllib.parse
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdpo_jax import asgi
from pdpo_jax.humaneval import pages
from pdpo_jax.humaneval.pairs import Pair
from pdpo_jax.humaneval.store import EXPORT_FIELDS, Annotator, Assignment, Store, StoreError
from pdpo_jax.humaneval.texts import Texts

MAX_BODY = 16 * 1024
SESSION, ADMIN = "he_session", "he_admin"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}


@dataclasses.dataclass(frozen=True)
class Study:
    store: Store
    pairs: dict[int, Pair]
    texts: Texts
    admin_token: str


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class JudgmentIn(_Body):
    assignment_id: int = Field(ge=1, le=2**62)
    choice: Literal[1, 2, 3]  # in shown positions; 3 = tie

    @field_validator("choice", mode="before")
    @classmethod
    def _not_bool(cls, value):  # a Literal admits True as 1
        if isinstance(value, bool):
            raise ValueError("Input should be 1, 2 or 3, not a boolean")  # noqa: TRY004 (pydantic)
        return value


class UndoIn(_Body):
    assignment_id: int = Field(ge=1, le=2**62)


class NameIn(_Body):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40,
                                           pattern=r"^[^\x00-\x1f\x7f<>&\"']+$")]


class TokenIn(_Body):
    token: Annotated[str, StringConstraints(min_length=1, max_length=200)]


def create_app(study: Study) -> FastAPI:
    """The app over one study; wrapped in the body limit and the security headers."""
    app = FastAPI(title="pdpo_jax human evaluation", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.study = study
    app.mount("/static", StaticFiles(packages=[("pdpo_jax.humaneval", "static")]), name="static")
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for route in _ROUTES:
        app.add_api_route(*route[:2], methods=[route[2]], include_in_schema=False)
    app.add_middleware(asgi.SecurityHeaders, headers=HEADERS)
    app.add_middleware(asgi.BodyLimit, max_bytes=MAX_BODY)
    return app


def _study(request: Request) -> Study:
    return request.app.state.study


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(("/api/", "/admin/export", "/admin/progress"))


def _refuse(request: Request, status: int, message: str) -> Response:
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=status)
    texts = _study(request).texts
    return HTMLResponse(pages.message_page(texts, f"{status} — {texts.ui['error']}", message),
                        status_code=status)


async def _store_error(request: Request, exc: StoreError) -> Response:
    return _refuse(request, exc.status, str(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if 300 <= exc.status_code < 400:  # `annotator` sends a signed-out page to sign-in
        return RedirectResponse(exc.headers["Location"], exc.status_code)
    return _refuse(request, exc.status_code, str(exc.detail))


def _describe(errors: list) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}"
                     for e in errors[:5])


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    return _refuse(request, 422, f"invalid request: {_describe(exc.errors())}")


# ---- who is asking


def _annotator(request: Request) -> Annotator | None:
    secret = request.cookies.get(SESSION)
    if not secret or len(secret) > 100:
        return None
    return _study(request).store.annotator_for(secret)


def annotator(request: Request) -> Annotator:
    """The signed-in annotator (401 for the API, a redirect to sign-in for pages)."""
    who = _annotator(request)
    if who is None:
        if _is_api(request):
            raise HTTPException(401, "sign in first (POST /signin)")
        raise HTTPException(303, headers={"Location": "/"})
    return who


def json_body(request: Request) -> None:
    """API bodies are JSON (a cross-site form cannot send it without the browser asking first)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the body as JSON (Content-Type: application/json)")


def _admin_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(ADMIN, "")


def admin(request: Request) -> None:
    token = _admin_token(request)
    if not token:
        raise HTTPException(401, "admin token required: sign in at /admin")
    if not hmac.compare_digest(token.encode(), _study(request).admin_token.encode()):
        raise HTTPException(403, "wrong admin token")


Who = Annotated[Annotator, Depends(annotator)]
JsonBody = Annotated[None, Depends(json_body)]
Admin = Annotated[None, Depends(admin)]


async def _form(request: Request, model: type[_Body]) -> _Body:
    """A url-encoded form body as `model` (422 when it does not fit). A form posted from
    another site (its Origin is not this host, or 'null') is refused; browsers send the Origin
    of same-site posts under our Referrer-Policy same-origin (under no-referrer they send null)."""
    origin = request.headers.get("origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "a form from another site is refused; open this site directly")
    if request.headers.get("content-type", "").split(";")[0] != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    try:
        fields = urllib.parse.parse_qs((await request.body()).decode("utf-8"), max_num_fields=4)
        return model.model_validate({k: v[-1] for k, v in fields.items()})
    except (UnicodeDecodeError, ValueError) as e:
        errors = e.errors() if isinstance(e, ValidationError) else [{"loc": (), "msg": str(e)}]
        raise HTTPException(422, f"invalid form: {_describe(errors)}") from None


def _cookie(response: Response, request: Request, name: str, value: str, path: str = "/") -> Response:
    response.set_cookie(name, value, max_age=30 * 24 * 3600, path=path, httponly=True,
                        samesite="lax", secure=request.url.scheme == "https")
    return response


# ---- annotator pages


def home(request: Request) -> Response:
    if _annotator(request) is not None:
        return RedirectResponse("/task", 303)
    study = _study(request)
    return HTMLResponse(pages.signin_page(study.texts, study.store.token_study))


async def sign_in(request: Request) -> Response:
    store = _study(request).store
    body = await _form(request, TokenIn if store.token_study else NameIn)
    _, secret = await run_in_threadpool(lambda: store.sign_in(**body.model_dump()))
    return _cookie(RedirectResponse("/task", 303), request, SESSION, secret)


def sign_out(request: Request) -> Response:
    secret = request.cookies.get(SESSION)
    if secret and len(secret) <= 100:
        _study(request).store.sign_out(secret)
    response = RedirectResponse("/", 303)
    response.delete_cookie(SESSION, path="/")
    return response


def task(request: Request, who: Who) -> Response:
    study = _study(request)
    current = study.store.current(who)
    progress = study.store.progress(who)
    if current is None:
        return HTMLResponse(pages.done_page(study.texts, who, progress))
    return HTMLResponse(pages.task_page(study.texts, who, current, study.pairs[current.pair],
                                        progress))


# ---- the JSON API (the task page's script uses it)


def _assignment_json(study: Study, who: Annotator, a: Assignment | None) -> dict:
    done, quota, undo = study.store.progress(who)
    out = {"answered": done, "quota": quota, "undo": undo, "assignment": None}
    if a is not None:
        pair = study.pairs[a.pair]
        reply_1, reply_2 = pair.shown(a.swapped)
        out["assignment"] = {
            "assignment_id": a.id, "pair": a.pair, "status": a.status, "choice": a.choice,
            "persona": list(pair.persona), "dialogue": list(pair.dialogue),
            "reply_1": reply_1, "reply_2": reply_2, "shown_at": a.shown_at,
            "answered_at": a.answered_at}
    return out


def current_assignment(request: Request, who: Who) -> dict:
    study = _study(request)
    return _assignment_json(study, who, study.store.current(who))


def one_assignment(assignment_id: Annotated[int, Path(ge=1, le=2**62)], request: Request,
                   who: Who) -> dict:
    study = _study(request)
    return _assignment_json(study, who, study.store.assignment(who, assignment_id))


def submit(body: JudgmentIn, request: Request, who: Who,
           _: JsonBody) -> dict:
    status = _study(request).store.submit(who, body.assignment_id, body.choice)
    return {"status": status, "assignment_id": body.assignment_id, "choice": body.choice}


def undo(body: UndoIn, request: Request, who: Who,
         _: JsonBody) -> dict:
    status = _study(request).store.undo(who, body.assignment_id)
    return {"status": status, "assignment_id": body.assignment_id}


# ---- admin


def admin_home(request: Request) -> Response:
    study = _study(request)
    token = _admin_token(request)
    if not token or not hmac.compare_digest(token.encode(), study.admin_token.encode()):
        return HTMLResponse(pages.signin_page(study.texts, True, "/admin/signin", "Admin sign-in"),
                            status_code=401 if not token else 403)
    return HTMLResponse(pages.admin_page(study.texts, study.store.annotator_progress(),
                                         study.store.pair_progress(), study.store.per_pair))


async def admin_sign_in(request: Request) -> Response:
    study = _study(request)
    body = await _form(request, TokenIn)
    if not hmac.compare_digest(body.token.encode(), study.admin_token.encode()):
        raise HTTPException(403, "wrong admin token")
    return _cookie(RedirectResponse("/admin", 303), request, ADMIN, body.token, path="/admin")


def export_jsonl(request: Request, _: Admin) -> Response:
    rows = _study(request).store.judgments()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(text, media_type="application/x-ndjson", headers=_attachment("judgments.jsonl"))


def export_csv(request: Request, _: Admin) -> Response:
    out = io.StringIO()
    writer = csv.DictWriter(out, EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_study(request).store.judgments())
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers=_attachment("judgments.csv"))


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def progress_json(request: Request, _: Admin) -> dict:
    store = _study(request).store
    return {"annotators": store.annotator_progress(), "pairs": store.pair_progress()}


_ROUTES = [
    ("/", home, "GET"), ("/signin", sign_in, "POST"), ("/signout", sign_out, "POST"),
    ("/task", task, "GET"),
    ("/api/assignments/current", current_assignment, "GET"),
    ("/api/assignments/{assignment_id}", one_assignment, "GET"),
    ("/api/judgments", submit, "POST"), ("/api/undo", undo, "POST"),
    ("/admin", admin_home, "GET"), ("/admin/signin", admin_sign_in, "POST"),
    ("/admin/export.csv", export_csv, "GET"), ("/admin/export.jsonl", export_jsonl, "GET"),
    ("/admin/progress.json", progress_json, "GET"),
]
