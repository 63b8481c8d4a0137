"""A Python client of the Generate API (used by `strata generate`, the demo and bench)."""

from __future__ import annotations

import dataclasses

import grpc

from strata.runtime.errors import ErrorKind, StrataError, from_rpc_error
from strata.transport import rpc
from strata.transport.wire import generate_pb2, generate_pb2_grpc

OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


@dataclasses.dataclass
class Result:
    tokens: list[list[int]]
    texts: list[str]
    prefill_s: float
    decode_s: float
    peak_gpu_bytes: int


def request_for(prompts: list[str | list[int]], max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                stop: list[str] | None = None) -> generate_pb2.GenerateRequest:
    msgs = []
    for p in prompts:
        if isinstance(p, str):
            msgs.append(generate_pb2.Prompt(text=p))
        else:
            msgs.append(generate_pb2.Prompt(ids=generate_pb2.TokenIds(ids=list(p))))
    return generate_pb2.GenerateRequest(
        prompts=msgs, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, stop=stop or [],
        sampling=generate_pb2.SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
    )


def generate(endpoint: str, request: generate_pb2.GenerateRequest, timeout: float | None = None, on_step=None,
             stop_after: int | None = None, api_key: str = "", tls_ca: str = "") -> Result | None:
    """Runs one Generate call; `on_step(step, tokens)` sees each streamed step.
    `stop_after`: cancel the call once that many steps have arrived (returns None).
    `api_key` is sent as `authorization: Bearer KEY`; `tls_ca` (a PEM file) makes the
    channel TLS with that root certificate."""
    tokens: list[list[int]] = [[] for _ in request.prompts]
    with rpc.channel(endpoint, api_key=api_key, tls_ca=tls_ca, options=OPTIONS) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        try:
            for resp in stub.Generate(request, timeout=timeout):
                if resp.done:
                    s = resp.stats
                    return Result(tokens, list(resp.texts), s.prefill_s, s.decode_s, s.peak_gpu_bytes)
                for i, t in enumerate(resp.tokens):
                    if t >= 0:
                        tokens[i].append(t)
                if on_step is not None:
                    on_step(resp.step, list(resp.tokens))
                if stop_after is not None and resp.step + 1 >= stop_after:
                    return None  # leaving the channel cancels the call
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (e.details() or ""):
                raise StrataError(ErrorKind.INVALID_ARGUMENT, f"compute node at {endpoint}: the request is larger than "
                                  f"the server takes (--max-request-bytes): {e.details()}") from None
            raise from_rpc_error(e, f"compute node at {endpoint}") from None
    raise RuntimeError("stream ended without a final response")


def has_tokenizer(endpoint: str, timeout: float | None = 30.0, api_key: str = "", tls_ca: str = "") -> bool:
    """Whether the served model has a tokenizer (can give text), asked without
    generating: a text prompt with no new tokens is refused either way, but for a model
    without a tokenizer first, with FAILED_PRECONDITION (compute_node/validation.py)."""
    probe = generate_pb2.GenerateRequest(prompts=[generate_pb2.Prompt(text="?")], max_new_tokens=0)
    with rpc.channel(endpoint, api_key=api_key, tls_ca=tls_ca, options=OPTIONS) as channel:
        try:
            for _ in generate_pb2_grpc.GeneratorStub(channel).Generate(probe, timeout=timeout):
                pass
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "tokenizer" in (e.details() or ""):
                return False
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return True
            raise from_rpc_error(e, f"compute node at {endpoint}") from None
    return True
