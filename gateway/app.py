"""The OpenAI-compatible HTTP API: a FastAPI app that turns each request into one
Generate call on the compute node (gRPC, through strata.api.client.AsyncClient).

    GET  /health                 the gateway answers
    GET  /ready                  the compute node answers Health
    GET  /v1/models              the one served model
    POST /v1/completions         text or token-id prompts (a list: one choice each)
    POST /v1/chat/completions    messages rendered by the checkpoint's chat template
    GET  /metrics                Prometheus: the compute node's Stats and these requests

Bodies and errors are OpenAI's (strata/api/openai_format.py). With `stream`, the
response is server-sent events, one chunk per piece of new text, then `[DONE]`. With
an API key configured, /v1/* needs `Authorization: Bearer KEY` (401 otherwise) and
the gateway calls the compute node with the same key."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import pathlib
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from gateway.metrics import ComputeNodeCollector, HttpMetrics
from strata.api import openai_format as oai
from strata.api.client import AsyncClient, CallError, Client, Retry, load_tokenizer
from strata.runtime.errors import StrataError


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    endpoint: str  # the compute node's gRPC address
    model_dir: str = ""  # the served model's directory: tokenizer (streamed text) and chat template
    model_name: str = ""  # the id in /v1/models; default: the model directory's name
    api_key: str = ""  # "" = no key asked for
    tls_ca: str = ""  # PEM root for a TLS compute node
    timeout_s: float = 600.0  # each request's deadline on the compute node

    @property
    def served_name(self) -> str:
        return self.model_name or (pathlib.Path(self.model_dir).name if self.model_dir else "strata-model")


def create_app(config: GatewayConfig, template=None) -> FastAPI:
    """`template`: a strata.api.chat_template.ChatTemplate, or None (chat is refused)."""
    tokenizer = None
    if config.model_dir and (pathlib.Path(config.model_dir) / "tokenizer.json").exists():
        tokenizer = load_tokenizer(config.model_dir)
    client_kw = dict(api_key=config.api_key or None, tls_ca=config.tls_ca or None, timeout=config.timeout_s)
    registry = CollectorRegistry()
    http = HttpMetrics(registry)
    stats_client = Client(config.endpoint, **{**client_kw, "timeout": 5.0}, retry=Retry(attempts=1))
    registry.register(ComputeNodeCollector(lambda: stats_client.stats()[0]))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = AsyncClient(config.endpoint, tokenizer=tokenizer, **client_kw)  # in the serving loop
        yield
        await app.state.client.close()
        stats_client.close()

    app = FastAPI(title="Strata", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_auth_and_metrics(app, config, http)
    _add_error_handlers(app)
    _add_health_routes(app)
    _add_openai_routes(app, config, template)
    _add_metrics_route(app, registry)
    return app


def _add_auth_and_metrics(app: FastAPI, config: GatewayConfig, http: HttpMetrics) -> None:
    """The middleware every request passes: the API key check on /v1/*, and the
    request's route, status and duration counted in `http`."""

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.monotonic()
        if request.url.path.startswith("/v1/") and config.api_key and not _authorized(request, config.api_key):
            response = _error(oai.APIError(401, "a valid API key is needed: send `Authorization: Bearer KEY`",
                                           code="invalid_api_key"))
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        http.observe(getattr(route, "path", "other"), response.status_code, time.monotonic() - start)
        return response


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered as an OpenAI error body: API errors, the compute node's
    errors, and the framework's own (404, 405, ...)."""

    @app.exception_handler(oai.APIError)
    async def api_error(request: Request, e: oai.APIError):
        return _error(e)

    @app.exception_handler(StrataError)
    async def call_error(request: Request, e: StrataError):
        return _error(oai.from_call_error(getattr(e, "code", "INTERNAL"), str(e)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(oai.APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))


def _add_health_routes(app: FastAPI) -> None:
    """GET /health (the gateway answers) and GET /ready (the compute node answers Health)."""

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        try:
            if await app.state.client.health(timeout=2.0):
                return {"status": "ready"}
        except StrataError:
            pass
        return _error(oai.APIError(503, "the compute node is not ready", code="not_ready"))


def _add_openai_routes(app: FastAPI, config: GatewayConfig, template) -> None:
    """The OpenAI API: /v1/models (the one served model), /v1/completions and /v1/chat/completions."""
    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model(config.served_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != config.served_name:
            raise oai.APIError(404, f"model {name!r} is not served here (this server serves {config.served_name!r})",
                               param="model", code="model_not_found")
        return _model(name, created)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(app.state.client, oai.completion_job(await _body(request)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _answer(app.state.client, oai.chat_job(await _body(request), template))


def _add_metrics_route(app: FastAPI, registry: CollectorRegistry) -> None:
    """GET /metrics: `registry` (the compute node's Stats and the gateway's requests) for Prometheus."""

    @app.get("/metrics")
    def metrics():  # sync: the Stats call runs in the thread pool
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _model(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "strata"}


def _authorized(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _error(e: oai.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _body(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise oai.APIError(400, "the request body is not valid JSON", code="invalid_json") from None


async def _answer(client: AsyncClient, job: oai.Job):
    if not job.stream:
        result = await client.generate(job.prompts, job.max_new_tokens, **job.sampling())
        return JSONResponse(oai.response_body(job, result))
    deltas = client.stream(job.prompts, job.max_new_tokens, **job.sampling())
    try:
        first = await anext(deltas)  # a refused call is still an HTTP error, not a broken stream
    except BaseException:
        await deltas.aclose()
        raise
    return StreamingResponse(_events(job, first, deltas), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(job: oai.Job, first, deltas):
    rid, created = oai.new_id(job.kind), oai.now()
    try:
        if job.kind == "chat":
            for i in range(len(job.prompts)):
                yield _sse(oai.chunk(job, rid, created, i, "", first=True))
        d = first
        while True:
            for i, text in enumerate(d.texts):
                if text:
                    yield _sse(oai.chunk(job, rid, created, i, text))
            if d.result is not None:
                for i, reason in enumerate(d.result.finish_reasons):
                    yield _sse(oai.chunk(job, rid, created, i, None, finish_reason=reason))
                if job.include_usage:
                    yield _sse(oai.usage_chunk(job, rid, created, d.result))
                break
            d = await anext(deltas)
    except CallError as e:
        yield _sse(oai.from_call_error(e.code, str(e)).body())
    finally:
        await deltas.aclose()
    yield "data: [DONE]\n\n"
