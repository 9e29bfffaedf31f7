"""The OpenAI request bodies the server accepts, and its errors in OpenAI's layout.

Bodies are pydantic models in strict mode (a string where a number belongs, or a boolean where
an integer belongs, is refused) that ignore fields they do not know, as OpenAI's API does.
Fields the server knows but cannot honour (tools, logit_bias, penalties, top alternatives, …)
are refused by name (`unsupported`), never silently ignored. Every refusal is an `ApiError`,
rendered as `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16           # choices per request
MAX_STOP = 16        # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string (the text held back is searched for them)
MAX_PROMPTS = 64     # prompts of one /v1/completions request


class ApiError(Exception):
    """A refusal the client gets as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Message(_Body):
    """A chat message; content is text, or a list of text parts."""
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            kinds = sorted({str(part.get("type")) for part in content} - {"text"})
            if kinds or not all(isinstance(part.get("text"), str) for part in content):
                raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are "
                                 f"supported; got {', '.join(kinds) or 'a part without text'}")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class _Sampling(_Body):
    """What both endpoints share: the model, the budget, sampling and streaming."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 and -1 switch it off
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Known, but only their neutral values are served (see `unsupported`).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"give at most {MAX_STOP} stop strings of 1 to {MAX_STOP_CHARS} "
                             "characters")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list):
            if not prompt or len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
                raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
            if any(isinstance(p, list) and not p for p in prompt):
                raise ValueError("a prompt of token ids needs at least one id")
        return prompt

    @property
    def budget(self) -> int | None:
        return self.max_tokens


def parse(model: type[_Body], raw: bytes) -> Any:
    """The request body as `model`; ApiError 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}",
                           code="invalid_json") from None
        param = ".".join(str(x) for x in first["loc"] if not _union_branch(x)) or None
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ApiError(400, f"{param or 'body'}: {first['msg']}{more}", param=param,
                       code="invalid_value") from None


def _union_branch(part) -> bool:
    """pydantic names the union member tried ('str', 'list[int]', …) in an error's location."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool")
                                      or part.startswith(("list[", "dict[")))


def unsupported(request: ChatRequest | CompletionRequest) -> None:
    """Refuses, by name, what the server knows of but does not do."""
    checks = [
        ("presence_penalty", request.presence_penalty not in (None, 0, 0.0)),
        ("frequency_penalty", request.frequency_penalty not in (None, 0, 0.0)),
        ("logit_bias", bool(request.logit_bias)),
    ]
    if isinstance(request, ChatRequest):
        checks += [
            ("tools", bool(request.tools) or bool(request.functions)),
            ("tool_choice", request.tool_choice not in (None, "none")),
            ("response_format", (request.response_format or {}).get("type", "text") != "text"),
            ("top_logprobs", bool(request.top_logprobs)),
        ]
    else:
        checks += [("logprobs", bool(request.logprobs)), ("echo", bool(request.echo)),
                   ("best_of", request.best_of not in (None, 1, request.n)),
                   ("suffix", bool(request.suffix))]
    for param, refused in checks:
        if refused:
            raise ApiError(400, f"{param}: {_WHY[param]}", param=param, code="unsupported")


_WHY = {
    "presence_penalty": "penalties are not supported by this server; send 0 or leave it out",
    "frequency_penalty": "penalties are not supported by this server; send 0 or leave it out",
    "logit_bias": "logit_bias is not supported by this server",
    "tools": "tools and function calling are not supported by this server",
    "tool_choice": "tools and function calling are not supported by this server",
    "response_format": "only response_format {'type': 'text'} is supported (no JSON mode)",
    "top_logprobs": "the server reports the sampled token's log-prob only; send top_logprobs 0",
    "logprobs": "the server reports the sampled token's log-prob only; send logprobs 0",
    "echo": "echo is not supported by this server",
    "best_of": "best_of is not supported by this server (use n)",
    "suffix": "suffix (insertion) is not supported by this server",
}
