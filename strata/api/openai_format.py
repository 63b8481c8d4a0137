"""OpenAI's request and response bodies <-> a Generate call, in one place for the HTTP
gateway (gateway/) and `strata batch` (deploy/batch.py). Plain Python: no grpc, no
HTTP framework.

Requests: `completion_job(body)` and `chat_job(body, template)` check a
/v1/completions or /v1/chat/completions body and return a `Job` (the Generate call's
arguments); a bad field is an `APIError` (400, naming the field). Supported: `prompt`
(text, token ids, or a list of either: one choice per prompt), `messages` (rendered by
the checkpoint's chat template), `max_tokens` / `max_completion_tokens`,
`temperature` (0 = greedy), `top_p`, `seed`, `stop`, `n` = 1, `stream`,
`stream_options.include_usage`, and two extensions: `top_k`, `ignore_eos`. Fields
whose effect Strata does not implement (n > 1, logprobs, echo, suffix, penalties,
logit_bias, tools) are a 400 rather than silently ignored.

Responses: `completion_body` / `chat_body` from a `strata.api.client.Result`, and the
streamed chunks (`completion_chunk`, `chat_chunk`, `usage_chunk`)."""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import Any, Callable

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256  # chat has no default length in OpenAI's API (the context's end); ours is this

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}

UNSUPPORTED = {  # field: the values that mean "off"
    "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
}


class APIError(Exception):
    """An error in OpenAI's shape: HTTP status, message, and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


# gRPC status (by name) -> HTTP status
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
               "DEADLINE_EXCEEDED": 504, "CANCELLED": 499}


def from_call_error(code: str, message: str) -> APIError:
    """A failed Generate call (its gRPC status name) as the HTTP error users see. The
    compute node's RESOURCE_EXHAUSTED is a full queue ("retry later": 429) or a request
    longer than its sequence slots hold (400: retrying will not help)."""
    status = HTTP_STATUS.get(code, 500)
    if code == "RESOURCE_EXHAUSTED" and "retry" not in message:
        status = 400
    return APIError(status, message, code=code.lower())


@dataclasses.dataclass(frozen=True)
class Job:
    """One OpenAI request as a Generate call."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list  # each a text or a list of token ids
    max_new_tokens: int
    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stop_at_eos: bool
    stream: bool = False
    include_usage: bool = False

    def sampling(self) -> dict:
        """Keyword arguments of strata.api.client's generate/stream."""
        return dict(greedy=self.greedy, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    seed=self.seed, stop=self.stop, stop_at_eos=self.stop_at_eos)


def completion_job(body: Any) -> Job:
    body = _object(body)
    return _job("completion", body, _prompts(body.get("prompt")), _max_tokens(body, DEFAULT_COMPLETION_MAX_TOKENS))


def chat_job(body: Any, render: Callable[[list[dict]], list[int]] | None,
             default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> Job:
    """`render(messages)`: the prompt's token ids by the model's chat template (None: the
    model has none, a 400). Without max_tokens, at most `default_max_tokens`, and no more
    than the model's positions leave after the prompt (`render.context`, where known)."""
    body = _object(body)
    messages = _messages(body.get("messages"))
    if render is None:
        raise APIError(400, "this model has no chat template (no chat_template in its tokenizer_config.json); "
                            "use /v1/completions", param="messages", code="no_chat_template")
    try:
        ids = render(messages)
    except Exception as e:  # noqa: BLE001 - the template's own error (e.g. roles must alternate)
        raise bad("messages", f"the chat template cannot render them: {e}") from None
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    context = getattr(render, "context", None)
    if context:
        default_max_tokens = max(1, min(default_max_tokens, context - len(ids)))
    return _job("chat", body, [ids], _max_tokens(body, default_max_tokens, key))


def _job(kind: str, body: dict, prompts: list, max_new_tokens: int) -> Job:
    for field, off in UNSUPPORTED.items():
        if body.get(field) not in off:
            raise bad(field, "is not supported by this server")
    if body.get("n") not in (None, 1):
        raise bad("n", "only n = 1 is supported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "a model name is required")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p", "must be above 0")
    top_k = _integer(body, "top_k", 0, -1, 1 << 31)
    seed = _integer(body, "seed", None, 0, (1 << 64) - 1)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    ignore_eos = body.get("ignore_eos") or False
    return Job(kind=kind, model=model, prompts=prompts, max_new_tokens=max_new_tokens, greedy=temperature == 0.0,
               temperature=temperature or 1.0, top_p=top_p, top_k=max(top_k, 0),
               seed=secrets.randbits(63) if seed is None else seed, stop=_stops(body.get("stop")),
               stop_at_eos=not ignore_eos, stream=stream, include_usage=bool(options.get("include_usage")))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:  # NaN fails the range too
        raise bad(key, f"must be a number from {lo:g} to {hi:g}, got {v!r}")
    return float(v)


def _integer(body: dict, key: str, default, lo: int, hi: int):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(key, f"must be a whole number from {lo} to {hi}, got {v!r}")
    return v


def _max_tokens(body: dict, default: int, key: str = "max_tokens") -> int:
    return _integer(body, key, default, 1, (1 << 32) - 1)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "must be a non-empty string or a list of them")
    return tuple(stops)


def _ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)


def _prompts(prompt) -> list:
    if isinstance(prompt, str) and prompt:
        return [prompt]
    if _ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or _ids(p) for p in prompt):
        return list(prompt)
    raise bad("prompt", "must be a non-empty text, a list of token ids, or a list of either")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a text")
        out.append({"role": m["role"], "content": content, **({"name": m["name"]} if "name" in m else {})})
    return out


# ---- responses ----------------------------------------------------------------

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(result) -> dict:
    prompt = sum(result.prompt_tokens)
    completion = sum(len(t) for t in result.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(job: Job, result, request_id: str | None = None, created: int | None = None) -> dict:
    """The whole (non-streamed) response of `job` from its Generate result."""
    request_id, created = request_id or new_id(job.kind), created or now()
    if job.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": job.model, "choices": choices,
            "usage": usage(result)}


def chunk(job: Job, request_id: str, created: int, index: int, text: str | None, finish_reason: str | None = None,
          first: bool = False) -> dict:
    """One streamed chunk: new text of choice `index`, or its end (finish_reason)."""
    if job.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": request_id, "object": obj, "created": created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return body


def usage_chunk(job: Job, request_id: str, created: int, result) -> dict:
    """The last chunk with `stream_options.include_usage`: no choices, the usage."""
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": job.model, "choices": [],
            "usage": usage(result)}


# ---- batch files (OpenAI's batch input and output lines) ------------------------

BATCH_URLS = ("/v1/completions", "/v1/chat/completions")


def batch_output(custom_id: str | None, status: int | None, body: dict | None, error: dict | None = None) -> dict:
    """One line of a batch's output: a response (status and body, an error body for a
    request the server refused) or, for a line that is no request at all, `error`."""
    response = None if status is None else {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}
