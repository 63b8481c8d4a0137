"""strata.api.client against `strata serve`: a call made before the server is up is retried
(UNAVAILABLE, with backoff) and answered once it is; streamed deltas add up to the
final result; the async client gives the same tokens; a deadline ends retries. And
TextStream alone: stop sequences are never shown, even in part."""

import asyncio
import pathlib
import socket
import threading
import time

import pytest

import tiny_models
from strata.api.client import AsyncClient, CallError, Client, Retry, TextStream

from serving import Server, strata

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def late_server(tmp_path_factory):
    """A server started only after the module's first call was made (a thread)."""
    _, shards = tiny_models.converted("opt", tmp_path_factory)
    address = f"127.0.0.1:{free_port()}"
    box: dict = {}

    def start():
        time.sleep(1.0)
        box["server"] = Server(shards, "--listen", address)

    thread = threading.Thread(target=start)
    yield address, thread, shards
    if thread.is_alive() or box:
        thread.join()
        assert box["server"].stop() == 0


def up(late_server) -> tuple[str, pathlib.Path]:
    """The server, started (if this test runs without the first) and listening."""
    address, thread, shards = late_server
    if not thread.is_alive() and thread.ident is None:
        thread.start()
    thread.join()
    return address, shards


@pytest.mark.slow
def test_a_call_before_the_server_is_up_is_retried_until_answered(late_server):
    address, thread, _ = late_server
    thread.start()
    with Client(address, timeout=240, retry=Retry(attempts=1000, backoff_s=0.2, max_backoff_s=1.0)) as c:
        result = c.generate(PROMPTS, 6, greedy=True, stop_at_eos=False)
    assert [len(t) for t in result.tokens] == [6, 6]
    assert result.finish_reasons == ["length", "length"]
    assert result.prompt_tokens == [6, 3]


@pytest.mark.slow
def test_stream_deltas_add_up_to_the_result_and_async_agrees(late_server):
    address, shards = up(late_server)
    with Client(address, timeout=120, tokenizer=shards) as c:
        deltas = list(c.stream(["hello world", "the fox"], 8, greedy=True, stop_at_eos=False))
        whole = c.generate(["hello world", "the fox"], 8, greedy=True, stop_at_eos=False)
    result = deltas[-1].result
    assert result is not None and all(d.result is None for d in deltas[:-1])
    assert result.tokens == whole.tokens and result.texts == whole.texts
    assert [[d.tokens[i] for d in deltas[:-1]] for i in range(2)] == result.tokens
    assert ["".join(d.texts[i] for d in deltas) for i in range(2)] == result.texts

    async def run():
        async with AsyncClient(address, timeout=120) as ac:
            return await ac.generate(PROMPTS, 6, greedy=True, stop_at_eos=False)

    with Client(address, timeout=120) as c:
        assert asyncio.run(run()).tokens == c.generate(PROMPTS, 6, greedy=True, stop_at_eos=False).tokens


@pytest.mark.slow
def test_strata_generate_with_a_tokenizer_prints_the_same_text_as_it_streams(late_server):
    address, shards = up(late_server)
    args = ["generate", "--endpoint", address, "--prompt", "hello world", "--max-new-tokens", "8", "--greedy"]
    plain, streamed = strata(*args), strata(*args, "--tokenizer", str(shards))
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout and plain.stdout.strip()


def test_the_deadline_ends_retries_with_unavailable():
    start = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", timeout=1.0) as c, pytest.raises(CallError) as e:
        c.generate(["hi"], 2)
    assert e.value.code == "UNAVAILABLE"
    assert time.monotonic() - start < 5


def test_text_stream_never_shows_a_stop_sequence_even_in_part():
    pieces = ["Hel", "lo", " wo", "r", "ld", " and", " more"]

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    stream = TextStream(decode, ["world"])
    shown = [stream.push(i) for i in range(len(pieces))]
    assert "".join(shown) == "Hello "  # " wo", "r", "ld" were held back: they could start (then were) the stop
    assert stream.finish("Hello ") == ""
    stream = TextStream(decode, ["wax"])
    shown = "".join(stream.push(i) for i in range(5))
    assert shown + stream.finish("Hello world") == "Hello world"
