"""Stop sequences: a sequence ends when its generated text contains one of them; the
text returned ends before the stop. Works on decoded text, so a stop may span tokens.

Checked every step, a new stop can only end in the newest token, so each check
decodes only the last few tokens: every token is at least one byte and a character
at most four, so a stop of n characters lies within the last 4n tokens (plus one for
a character cut at the window's start). A step costs the same however long the
generation has run."""

from __future__ import annotations

from strata.runtime.errors import invalid


class StopWatch:
    def __init__(self, stops: list[str], decode, n: int):
        if any(not s for s in stops):
            raise invalid("a stop sequence is empty")
        self.stops, self.decode = list(stops), decode
        self.stopped = [False] * n
        self.window = 4 * max((len(x) for x in self.stops), default=0) + 1

    def check(self, i: int, ids: list[int]) -> bool:
        """Whether sequence i (its generated ids so far, one more each call) has now hit a stop."""
        if self.stops and not self.stopped[i] and self._cut(self.decode(ids[-self.window:])) is not None:
            self.stopped[i] = True
        return self.stopped[i]

    def _cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stops if s in text]
        return min(hits) if hits else None

    def text(self, ids: list[int]) -> str:
        text = self.decode(ids)
        cut = self._cut(text) if self.stops else None
        return text if cut is None else text[:cut]


class TextStream:
    """Each sequence's new text per step, for streaming: its tokens decoded, cut before a
    stop, less what may still be the start of a stop (the stops' longest length - 1
    characters) and a trailing incomplete character, until the final text says the rest."""

    def __init__(self, stops: StopWatch, n: int):
        self.stops = stops
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.sent = [0] * n
        self.hold = max((len(x) for x in stops.stops), default=1) - 1

    def step(self, tokens: list[int]) -> list[str]:
        out = []
        for i, t in enumerate(tokens):
            if t < 0:
                out.append("")
                continue
            self.ids[i].append(t)
            text = self.stops.text(self.ids[i])
            end = len(text) - self.hold
            while end > self.sent[i] and text[end - 1] == "\ufffd":  # a character cut between tokens
                end -= 1
            out.append(text[self.sent[i] : end] if end > self.sent[i] else "")
            self.sent[i] = max(self.sent[i], end)
        return out
