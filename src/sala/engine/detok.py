"""Incremental detokenization with stop strings, one object per request.

Text is released only when it is final: never half a multi-byte character (the decoded tail ends in
U+FFFD until the rest arrives) and never a prefix of a stop string (the last ``max(len(stop)) - 1``
characters are held back until they cannot start one). The stop string itself is not part of the output.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns generated token ids into text deltas for one request.

    ``tokenizer``: any HF tokenizer (``decode``); ``context``: a few prompt ids, decoded as a prefix so that
    tokenizers that drop a leading space at the start of a string (SentencePiece) keep it for the first output
    token; ``stop``: stop strings.
    """

    def __init__(self, tokenizer: Any, context: list[int] | None = None, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])[-5:]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = list(stop or [])
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all output text so far (stop string excluded once found)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that became final (maybe empty). Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - self.holdback)
            self.text += new
            for s in self.stop:
                at = self.text.find(s, start)
                if at >= 0:  # later strings search the cut text, so the earliest occurrence wins
                    self.text, self.stopped = self.text[:at], True
            if self.stopped:
                return self.flush()
        end = len(self.text) - self.holdback
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def flush(self) -> str:
        """The text still held back (call when the request finishes), including an incomplete character."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
