"""TextCodec.encode with a token limit: the same ids as the tokenizer within it, and a
prompt far over it refused after one chunk, not tokenized whole."""

from __future__ import annotations

import time

import pytest

from compute_node.tokenizer import TextCodec
from strata.runtime.errors import ErrorKind, StrataError


@pytest.fixture(scope="module")
def codec(tiny_opt) -> TextCodec:
    return TextCodec((tiny_opt / "tokenizer.json").read_text())


TEXTS = ["the quick brown fox", "hello  world,\n\tthis is  a tiny model " * 40, "ünïcödé ☃ " * 30, "x" * 500]


@pytest.mark.parametrize("text", TEXTS)
def test_within_the_limit_the_ids_are_the_tokenizers(codec, text):
    whole = codec.encode(text)
    assert codec.encode(text, max_tokens=len(whole), chunk_chars=64) == whole
    with pytest.raises(StrataError) as info:
        codec.encode(text, max_tokens=len(whole) - 1, chunk_chars=64, what="prompt 3")
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT
    assert f"prompt 3 has more than {len(whole) - 1} tokens" in str(info.value)


def test_a_huge_prompt_is_refused_within_a_second(codec):
    text = "memory tiers keep the slowest link busy " * 200_000  # 8 MB: seconds and GBs to tokenize whole
    t0 = time.monotonic()
    with pytest.raises(StrataError, match="more than 100 tokens"):
        codec.encode(text, max_tokens=100)
    assert time.monotonic() - t0 < 1.0


def test_without_a_tokenizer_text_is_a_failed_precondition():
    codec = TextCodec("")
    assert not codec.has_tokenizer
    with pytest.raises(StrataError) as info:
        codec.encode("hello")
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION
