"""The Python client of the compute node's Generate API, blocking (`Client`) and
asyncio (`AsyncClient`, grpc.aio):

    with Client("127.0.0.1:50551") as c:
        r = c.generate(["Hello", "The sea"], max_new_tokens=32, greedy=True)
        r.texts, r.tokens, r.finish_reasons, r.stats.generated_tokens
        for d in c.stream(["Hello"], max_new_tokens=32):   # one Delta per step
            print(d.texts[0], end="")                        # with a tokenizer
        d.result                                             # on the last Delta

Every call has a deadline (`timeout`, seconds over all its attempts; None = none) and
is retried while the server answers UNAVAILABLE (not started yet, restarting), with
exponential backoff, until the deadline or `retries` attempts; a stream is retried
only before its first response. `api_key` is sent as `authorization: Bearer KEY`
metadata; `tls_ca` (PEM bytes or a path) makes the channel TLS with that root.

The wire streams token ids per step and the texts at the end. Text as it streams
needs the model's tokenizer here (`tokenizer`: the model directory, its
tokenizer.json, or an object with `decode(ids)`): each Delta's `texts` is then the new
text per sequence, held back while it could still be the start of a stop sequence, so
that the deltas add up to the final text exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import random
import time
from typing import AsyncIterator, Iterator, Sequence

import grpc

from strata.runtime.errors import ErrorKind, StrataError, from_rpc_error
from strata.transport.wire import common_pb2, generate_pb2, generate_pb2_grpc

Prompt = str | Sequence[int]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
    # reconnect soon after a server comes up, so that retries find it
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class CallError(StrataError):
    """A failed call; `code` is the gRPC status code's name (e.g. "UNAUTHENTICATED")."""

    def __init__(self, kind: ErrorKind, message: str, code: str):
        super().__init__(kind, message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Stats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    queued_s: float = 0.0
    first_token_s: float = 0.0
    peak_gpu_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Result:
    texts: list[str]
    tokens: list[list[int]]  # generated ids per sequence
    finish_reasons: list[str]  # "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: list[int]
    stats: Stats


@dataclasses.dataclass(frozen=True)
class Delta:
    step: int
    tokens: list[int]  # one per sequence; -1 where it gave none this step
    texts: list[str]  # new text per sequence (without a tokenizer: "", and the whole text on the last Delta)
    result: Result | None = None  # on the last Delta of a stream only


@dataclasses.dataclass(frozen=True)
class Retry:
    attempts: int = 8
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)


def load_tokenizer(source):
    """`source`: a model directory or tokenizer.json path (loaded with `tokenizers`, the
    compute node's own decoder), an object with `decode(ids)`, or None."""
    if source is None or hasattr(source, "decode"):
        return source
    from tokenizers import Tokenizer

    path = pathlib.Path(source)
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise StrataError(ErrorKind.NOT_FOUND, f"no readable tokenizer at {path}: {e}") from None


def build_request(prompts: Sequence[Prompt], max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                  stop_at_eos: bool = True) -> generate_pb2.GenerateRequest:
    msgs = [generate_pb2.Prompt(text=p) if isinstance(p, str) else generate_pb2.Prompt(ids=generate_pb2.TokenIds(ids=list(p)))
            for p in prompts]
    return generate_pb2.GenerateRequest(
        prompts=msgs, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, stop=list(stop),
        sampling=generate_pb2.SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                             seed=seed))


class TextStream:
    """One sequence's text as its tokens arrive: `push` returns the text that is safe to
    show (complete characters, no stop sequence nor a possible start of one),
    `finish(final)` the rest of the server's final text."""

    def __init__(self, decode, stops: Sequence[str]):
        self.decode, self.stops = decode, list(stops)
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a character cut between tokens
            return ""
        safe = len(text)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                safe = min(safe, at)
            else:  # the longest end of the text that starts this stop
                safe = min(safe, next((len(text) - k for k in range(min(len(s) - 1, len(text)), 0, -1)
                                       if s.startswith(text[-k:])), len(text)))
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):safe], text[:safe]
        return new

    def finish(self, final: str) -> str:
        rest = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return rest


class _Call:
    """One Generate call's responses -> Deltas and the Result (shared by both clients)."""

    def __init__(self, request: generate_pb2.GenerateRequest, tokenizer):
        self.request = request
        n = len(request.prompts)
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.texts = [TextStream(tokenizer.decode, request.stop) for _ in range(n)] if tokenizer is not None else None
        self.sent = [0] * n  # characters of the server's text deltas given out (no local tokenizer)

    def delta(self, resp: generate_pb2.GenerateResponse) -> Delta:
        if resp.done:
            result = self.result(resp)
            if self.texts:
                texts = [t.finish(f) for t, f in zip(self.texts, result.texts)]
            else:  # the rest of each text past what the server's deltas said
                texts = [f[k:] for f, k in zip(result.texts, self.sent)]
            return Delta(resp.step, [-1] * len(texts), texts, result)
        texts = []
        for i, t in enumerate(resp.tokens):
            if t >= 0:
                self.tokens[i].append(t)
            if self.texts:
                texts.append(self.texts[i].push(t) if t >= 0 else "")
            else:  # the server's decoded text (compute node's text_deltas), where it sends them
                d = resp.text_deltas[i] if i < len(resp.text_deltas) else ""
                self.sent[i] += len(d)
                texts.append(d)
        return Delta(resp.step, list(resp.tokens), texts)

    def result(self, resp: generate_pb2.GenerateResponse) -> Result:
        s, req = resp.stats, self.request
        finish = list(resp.finish_reasons) or ["length" if len(t) >= req.max_new_tokens else "stop" for t in self.tokens]
        prompt_tokens = list(resp.prompt_tokens) or [self._prompt_length(p) for p in req.prompts]
        stats = Stats(s.prefill_s, s.decode_s, s.generated_tokens, s.prompt_tokens or sum(prompt_tokens), s.queued_s,
                      s.first_token_s, s.peak_gpu_bytes)
        return Result(list(resp.texts), self.tokens, finish, prompt_tokens, stats)

    def _prompt_length(self, prompt) -> int:
        """For a server that does not send prompt_tokens: counted here (the same tokenizer.json)."""
        if prompt.WhichOneof("input") == "ids":
            return len(prompt.ids.ids)
        encode = getattr(self.tokenizer, "encode", None)
        ids = encode(prompt.text) if encode is not None else []
        return len(getattr(ids, "ids", ids))


class _Base:
    def __init__(self, endpoint: str, *, timeout: float | None = 600.0, api_key: str | None = None,
                 tls_ca: bytes | str | None = None, retry: Retry = Retry(), tokenizer=None):
        self.endpoint, self.timeout, self.retry = endpoint, timeout, retry
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if isinstance(tls_ca, str):
            tls_ca = pathlib.Path(tls_ca).read_bytes()
        self.credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
        self.tokenizer = load_tokenizer(tokenizer)

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return time.monotonic() + timeout if timeout else None

    def _error(self, e: grpc.RpcError) -> CallError:
        err = from_rpc_error(e, f"compute node at {self.endpoint}")
        code = e.code() if hasattr(e, "code") else None
        return CallError(err.kind, err.message, code.name if code is not None else "UNKNOWN")

    def _next_wait(self, e: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None: raise."""
        if e.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 >= self.retry.attempts:
            return None
        wait = self.retry.delay(attempt)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.001, deadline - time.monotonic())


class Client(_Base):
    """Blocking client; one channel, closed by `close()` or leaving `with`."""

    def __init__(self, endpoint: str, **kw):
        super().__init__(endpoint, **kw)
        self.channel = (grpc.secure_channel(endpoint, self.credentials, options=CHANNEL_OPTIONS) if self.credentials
                        else grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS))
        self.stub = generate_pb2_grpc.GeneratorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, method, request, timeout):
        deadline = self._deadline(timeout)
        for attempt in range(self.retry.attempts):
            try:
                return method(request, timeout=self._left(deadline), metadata=self.metadata)
            except grpc.RpcError as e:
                wait = self._next_wait(e, attempt, deadline)
                if wait is None:
                    raise self._error(e) from None
                time.sleep(wait)

    def health(self, timeout: float | None = 5.0) -> bool:
        return self._unary(self.stub.Health, common_pb2.HealthRequest(), timeout).ready

    def stats(self, timeout: float | None = 5.0) -> tuple[dict[str, float], str]:
        """The compute node's named counters and gauges (compute_node/metrics.py), and its model name."""
        r = self._unary(self.stub.Stats, generate_pb2.StatsRequest(), timeout)
        return dict(r.values), r.model

    def stream(self, prompts: Sequence[Prompt], max_new_tokens: int = 16, *, timeout: float | None = None,
               **sampling) -> Iterator[Delta]:
        """One Delta per generated step; the last carries `result`. Leaving the loop early cancels the call."""
        request = build_request(prompts, max_new_tokens, **sampling)
        deadline = self._deadline(timeout)
        for attempt in range(self.retry.attempts):
            call, started = _Call(request, self.tokenizer), False
            responses = self.stub.Generate(request, timeout=self._left(deadline), metadata=self.metadata)
            try:
                for resp in responses:
                    started = True
                    yield call.delta(resp)
                    if resp.done:
                        return
            except grpc.RpcError as e:
                wait = None if started else self._next_wait(e, attempt, deadline)
                if wait is None:
                    raise self._error(e) from None
                time.sleep(wait)
                continue
            finally:
                responses.cancel()
            raise StrataError(ErrorKind.INTERNAL, f"compute node at {self.endpoint}: stream ended without a result")

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16, *, timeout: float | None = None,
                 **sampling) -> Result:
        for d in self.stream(prompts, max_new_tokens, timeout=timeout, **sampling):
            if d.result is not None:
                return d.result
        raise StrataError(ErrorKind.INTERNAL, "stream ended without a result")


class AsyncClient(_Base):
    """asyncio client (grpc.aio); make it inside the running event loop."""

    def __init__(self, endpoint: str, **kw):
        super().__init__(endpoint, **kw)
        self.channel = (grpc.aio.secure_channel(endpoint, self.credentials, options=CHANNEL_OPTIONS)
                        if self.credentials else grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS))
        self.stub = generate_pb2_grpc.GeneratorStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _unary(self, method, request, timeout):
        deadline = self._deadline(timeout)
        for attempt in range(self.retry.attempts):
            try:
                return await method(request, timeout=self._left(deadline), metadata=self.metadata)
            except grpc.RpcError as e:
                wait = self._next_wait(e, attempt, deadline)
                if wait is None:
                    raise self._error(e) from None
                await asyncio.sleep(wait)

    async def health(self, timeout: float | None = 5.0) -> bool:
        return (await self._unary(self.stub.Health, common_pb2.HealthRequest(), timeout)).ready

    async def stats(self, timeout: float | None = 5.0) -> tuple[dict[str, float], str]:
        r = await self._unary(self.stub.Stats, generate_pb2.StatsRequest(), timeout)
        return dict(r.values), r.model

    async def stream(self, prompts: Sequence[Prompt], max_new_tokens: int = 16, *, timeout: float | None = None,
                     **sampling) -> AsyncIterator[Delta]:
        request = build_request(prompts, max_new_tokens, **sampling)
        deadline = self._deadline(timeout)
        for attempt in range(self.retry.attempts):
            call, started = _Call(request, self.tokenizer), False
            responses = self.stub.Generate(request, timeout=self._left(deadline), metadata=self.metadata)
            try:
                async for resp in responses:
                    started = True
                    yield call.delta(resp)
                    if resp.done:
                        return
            except grpc.RpcError as e:
                wait = None if started else self._next_wait(e, attempt, deadline)
                if wait is None:
                    raise self._error(e) from None
                await asyncio.sleep(wait)
                continue
            finally:
                responses.cancel()
            raise StrataError(ErrorKind.INTERNAL, f"compute node at {self.endpoint}: stream ended without a result")

    async def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16, *, timeout: float | None = None,
                       **sampling) -> Result:
        async for d in self.stream(prompts, max_new_tokens, timeout=timeout, **sampling):
            if d.result is not None:
                return d.result
        raise StrataError(ErrorKind.INTERNAL, "stream ended without a result")
