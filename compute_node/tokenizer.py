"""Text in, text out, with the checkpoint's own tokenizer.json (from the weight store)."""

from __future__ import annotations

from strata.errors import ErrorKind, StrataError


class TextCodec:
    def __init__(self, tokenizer_json: str):
        self._tok = None
        if tokenizer_json:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(tokenizer_json)

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "the model has no tokenizer.json: send token ids")
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if self._tok is not None else ""
