"""A checkpoint's chat template, rendered and tokenized by transformers itself
(`apply_chat_template` with the generation prompt): the HTTP gateway's and `strata
batch`'s chat requests become token ids exactly as transformers makes them.

The template comes from the model directory's tokenizer files (the converter copies
tokenizer_config.json, where `chat_template` lives, beside the shards)."""

from __future__ import annotations

import logging
import pathlib

log = logging.getLogger("strata.chat_template")


class ChatTemplate:
    def __init__(self, tokenizer, context: int | None = None):
        self.tokenizer = tokenizer
        self.context = context  # the model's positions (prompt + generated tokens), where known

    @classmethod
    def load(cls, model_dir: str | pathlib.Path) -> "ChatTemplate | None":
        """The directory's template, or None where it has no tokenizer or no template."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            log.warning("no tokenizer in %s (%s): chat requests will be refused", model_dir, e)
            return None
        return cls(tok, _positions(model_dir)) if getattr(tok, "chat_template", None) else None

    def __call__(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5, a list before
        return [int(t) for t in ids]


def _positions(model_dir) -> int | None:
    """The converted model's positions (its manifest's config), or None."""
    from strata.model import arch
    from strata.model.manifest import Manifest

    try:
        return arch.dims_for(Manifest.load(model_dir).config).max_positions
    except Exception:  # noqa: BLE001 - a plain HF directory, an unknown family: no cap known
        return None
