"""Checks of a Generate request's fields before anything is tokenized or queued: every
bad field is an INVALID_ARGUMENT that names it.

`RequestLimits` is what one request may ask for, built once from the compute node's
config and its model; `check_generate(request, limits)` is the one place the fields
are checked (without limits: only what the protocol itself allows, as the CLI does).
Text prompts are checked here for their length in characters; their length in tokens
is checked while they are tokenized (compute_node/tokenizer.py)."""

from __future__ import annotations

import dataclasses
import math

from strata.runtime.errors import ErrorKind, StrataError, invalid

CHARS_PER_TOKEN = 16  # a text prompt may have this many characters per allowed token (--max-prompt-chars 0)
MAX_PROMPTS = 1024  # prompts in one request
MAX_STOPS = 16  # stop sequences in one request
MAX_STOP_CHARS = 256  # characters of one stop sequence (each step decodes 4x that many tokens per sequence)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one Generate request may ask for; 0 = no limit."""

    max_prompts: int = MAX_PROMPTS
    max_prompt_tokens: int = 0
    max_prompt_chars: int = 0
    max_sequence_tokens: int = 0  # prompt + new tokens of one sequence
    sequence_limit: str = ""  # what max_sequence_tokens is, for messages ("the model's 2048 positions")
    sequence_is_budget: bool = False  # the limit is the serving budget (a slot), not the model: RESOURCE_EXHAUSTED
    vocab: int = 0  # token ids lie in [0, vocab)
    max_stops: int = MAX_STOPS
    max_stop_chars: int = MAX_STOP_CHARS
    has_tokenizer: bool = True

    @classmethod
    def for_model(cls, config, positions: int, vocab: int, capacity: int = 0,
                  has_tokenizer: bool = True) -> "RequestLimits":
        """From a ComputeNodeConfig (max_prompt_tokens, max_prompt_chars; 0 = derived)
        and the model: its positions, its vocabulary, and the tokens a sequence slot
        holds (`capacity`, 0 = the positions)."""
        seq = min(positions, capacity) if capacity else positions
        what = f"the model's {positions} positions" if seq == positions else f"the {seq} tokens a sequence may hold"
        tokens = config.max_prompt_tokens or max(1, seq - 1)
        chars = config.max_prompt_chars or CHARS_PER_TOKEN * tokens
        return cls(max_prompt_tokens=tokens, max_prompt_chars=chars, max_sequence_tokens=seq, sequence_limit=what,
                   sequence_is_budget=seq < positions,
                   vocab=vocab, has_tokenizer=has_tokenizer)


def check_generate(request, limits: RequestLimits | None = None) -> None:
    """Raises StrataError(INVALID_ARGUMENT) naming the first bad field of `request`."""
    lim = limits or RequestLimits(max_prompts=0, max_stops=0, max_stop_chars=0)
    n = len(request.prompts)
    if not n:
        raise invalid("no prompts given")
    if lim.max_prompts and n > lim.max_prompts:
        raise invalid(f"{n} prompts exceed the limit of {lim.max_prompts} per request")
    for i, prompt in enumerate(request.prompts):  # first: what a prompt is, then the other fields
        _check_input(i, prompt, lim)
    new = request.max_new_tokens
    if new < 1:
        raise invalid("max_new_tokens must be at least 1")
    if lim.max_sequence_tokens and new >= lim.max_sequence_tokens:
        raise _over(lim, f"max_new_tokens {new} leaves no room for a prompt: it exceeds {lim.sequence_limit}")
    _check_sampling(request.sampling)
    _check_stops(list(request.stop), lim)
    for i, prompt in enumerate(request.prompts):
        _check_prompt(i, prompt, new, lim)


def _over(lim: RequestLimits, message: str) -> StrataError:
    """A sequence too long: for the model (INVALID_ARGUMENT), or for the serving
    budget of a sequence slot (RESOURCE_EXHAUSTED: the same request fits a server
    started with a larger --max-seq-len)."""
    return StrataError(ErrorKind.RESOURCE_EXHAUSTED if lim.sequence_is_budget else ErrorKind.INVALID_ARGUMENT, message)


def _check_sampling(s) -> None:
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise invalid(f"sampling.temperature must be a finite number >= 0 (0 = 1.0), got {s.temperature}")
    if not (math.isfinite(s.top_p) and 0 <= s.top_p <= 1):
        raise invalid(f"sampling.top_p must be in [0, 1] (0 or 1 = off), got {s.top_p}")


def _check_stops(stops: list[str], lim: RequestLimits) -> None:
    if lim.max_stops and len(stops) > lim.max_stops:
        raise invalid(f"{len(stops)} stop sequences exceed the limit of {lim.max_stops}")
    for j, s in enumerate(stops):
        if not s:
            raise invalid(f"a stop sequence is empty (stop {j})")
        if lim.max_stop_chars and len(s) > lim.max_stop_chars:
            raise invalid(f"stop {j} has {len(s)} characters; the limit is {lim.max_stop_chars}")
    if stops and not lim.has_tokenizer:
        raise invalid("stop sequences need text, and the model has no tokenizer.json")


def _check_input(i: int, prompt, lim: RequestLimits) -> None:
    """A prompt is a text or ids, not empty; a text needs the model's tokenizer. This
    is checked before any other field, so a request of a text prompt and no new tokens
    tells a client whether the model has a tokenizer (deploy/client.has_tokenizer)."""
    kind = prompt.WhichOneof("input")
    if kind is None or (kind == "text" and not prompt.text) or (kind == "ids" and not prompt.ids.ids):
        raise invalid(f"prompt {i} is empty")
    if kind == "text" and not lim.has_tokenizer:
        raise StrataError(ErrorKind.FAILED_PRECONDITION,
                          f"prompt {i} is text, and the model has no tokenizer.json: send token ids")


def _check_prompt(i: int, prompt, new: int, lim: RequestLimits) -> None:
    kind = prompt.WhichOneof("input")
    if kind == "text":
        if lim.max_prompt_chars and len(prompt.text) > lim.max_prompt_chars:
            raise invalid(f"prompt {i} has {len(prompt.text)} characters; the limit is {lim.max_prompt_chars} "
                          "(--max-prompt-chars)")
        return
    ids = prompt.ids.ids
    if lim.max_prompt_tokens and len(ids) > lim.max_prompt_tokens:
        raise invalid(f"prompt {i} has {len(ids)} tokens; the limit is {lim.max_prompt_tokens} (--max-prompt-tokens)")
    if lim.vocab:
        bad = next((t for t in ids if t < 0 or t >= lim.vocab), None)
        if bad is not None:
            raise invalid(f"prompt {i} has token id {bad} outside the vocabulary [0, {lim.vocab})")
    if lim.max_sequence_tokens and len(ids) + new > lim.max_sequence_tokens:
        raise _over(lim, f"prompt of {len(ids)} tokens + max_new_tokens {new} exceeds {lim.sequence_limit}")


def add_request_limit_flags(parser) -> None:
    """The request limits and access flags `strata serve` and the compute node both take."""
    import os

    from strata.runtime.config import ComputeNodeConfig
    from strata.transport import rpc

    parser.add_argument("--max-request-bytes", type=int, default=ComputeNodeConfig.max_request_bytes,
                        help="largest Generate request the compute node takes, in bytes (default 64 MiB; also the "
                             "gRPC receive limit)")
    parser.add_argument("--max-prompt-tokens", type=int, default=0,
                        help="tokens of one prompt, at most (0 = what a sequence may hold, less one)")
    parser.add_argument("--max-prompt-chars", type=int, default=0,
                        help="characters of one text prompt, at most (0 = 16 per allowed token)")
    parser.add_argument("--api-key", default=os.environ.get(rpc.API_KEY_ENV, ""),
                        help=f"every call must carry 'authorization: Bearer KEY' (default ${rpc.API_KEY_ENV}; "
                             "none = open)")
