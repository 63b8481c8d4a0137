"""Text in, text out, with the checkpoint's own tokenizer.json (from the weight store).

Encoding is bounded: a text longer than one chunk is first counted chunk by chunk
(cut at whitespace, without special tokens) and refused as soon as the count is past
the limit by more than the chunking can account for, so a huge prompt costs memory
of one chunk and time up to the limit, never a tokenization of the whole text. A
text within the limit is then encoded whole, exactly as the tokenizer would."""

from __future__ import annotations

from typing import Iterator

from strata.runtime.errors import ErrorKind, StrataError, invalid

CHUNK_CHARS = 1 << 16
SLACK_PER_CHUNK = 2  # tokens one cut may add (a prefix space, a split merge)


class TextCodec:
    def __init__(self, tokenizer_json: str):
        self._tok = None
        if tokenizer_json:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(tokenizer_json)

    @property
    def has_tokenizer(self) -> bool:
        return self._tok is not None

    def encode(self, text: str, max_tokens: int = 0, chunk_chars: int = CHUNK_CHARS, what: str = "the text") -> list[int]:
        """The ids of `text`; with `max_tokens`, StrataError(INVALID_ARGUMENT) when it
        has more tokens than that, found in memory bounded by one chunk."""
        if self._tok is None:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "the model has no tokenizer.json: send token ids")
        if max_tokens and len(text) > chunk_chars:
            counted = 0
            for n, piece in enumerate(_pieces(text, chunk_chars), start=1):
                counted += len(self._tok.encode(piece, add_special_tokens=False))
                if counted - SLACK_PER_CHUNK * n > max_tokens:
                    raise _too_long(what, max_tokens)
        ids = self._tok.encode(text).ids
        if max_tokens and len(ids) > max_tokens:
            raise _too_long(what, max_tokens)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if self._tok is not None else ""


def _too_long(what: str, max_tokens: int) -> StrataError:
    return invalid(f"{what} has more than {max_tokens} tokens (--max-prompt-tokens)")


def _pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of about `size` characters, each cut just before a whitespace
    character where there is one in the piece's second half."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(c, start + size // 2, end) for c in " \n\t")
            end = cut if cut > start else end
        yield text[start:end]
        start = end
