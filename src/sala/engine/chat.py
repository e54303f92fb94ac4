"""Chat helpers: a streaming filter that separates ``<think> ... </think>`` reasoning from the answer, and the
prompt rendering that avoids a double BOS (spec §9)."""

from __future__ import annotations

from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_MODES = ("show", "strip", "hide")


class ThinkFilter:
    """Split streamed text into (reasoning, answer) pieces; tags may arrive split across deltas.

    Reasoning is whatever sits between ``<think>`` and ``</think>``. Text before a ``<think>`` that never comes is
    answer text. ``answer`` accumulates the answer only (what a chat history should keep, per spec §9 practice).
    """

    def __init__(self) -> None:
        self.inside = False
        self.pending = ""  # text that may be the start of a tag
        self.answer = ""
        self.reasoning = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Returns (reasoning delta, answer delta)."""
        buf, think, answer = self.pending + text, "", ""
        self.pending = ""
        while buf:
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            at = buf.find(tag)
            if at >= 0:
                if self.inside:
                    think += buf[:at]
                else:
                    answer += buf[:at]
                buf, self.inside = buf[at + len(tag) :], not self.inside
                continue
            keep = next((k for k in range(min(len(tag) - 1, len(buf)), 0, -1) if tag.startswith(buf[-k:])), 0)
            body, self.pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
            if self.inside:
                think += body
            else:
                answer += body
            break
        self.reasoning += think
        self.answer += answer
        return think, answer

    def flush(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.inside:
            self.reasoning += rest
            return rest, ""
        self.answer += rest
        return "", rest


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template with the generation prompt; BOS once."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])
