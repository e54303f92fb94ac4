"""Building long prompts offline: haystack text, needle insertion at a sentence boundary, the model's chat
template (or a stated plain fallback), and fitting a prompt to a token length by binary search over how much
filler it holds. Deterministic: every random choice comes from a ``random.Random`` the caller seeds.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
_WORD_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")
MIN_HAYSTACK_WORDS = 50


@dataclass(frozen=True)
class Haystack:
    """A text file as one line of words (whitespace runs collapsed, like RULER's essay haystack)."""

    path: str
    words: list[str]
    sentence_starts: list[int]  # word indices that begin a sentence

    @classmethod
    def from_file(cls, path: str | Path) -> "Haystack":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"haystack file {path} does not exist")
        words = p.read_text(errors="replace").split()
        if not words:
            raise ValueError(f"haystack file {path} is empty; give a file of real text (e.g. a book or essays)")
        if len(words) < MIN_HAYSTACK_WORDS:
            raise ValueError(f"haystack file {path} has {len(words)} words, too short to build a context from "
                             f"(at least {MIN_HAYSTACK_WORDS}); give a longer text")
        starts = [0] + [i + 1 for i, w in enumerate(words[:-1]) if _WORD_ENDS_SENTENCE.search(w)]
        return cls(str(p), words, starts)

    def text(self, start: int, n: int) -> str:
        return " ".join(self.words[start : start + n])

    def vocabulary(self) -> list[str]:
        """Distinct lower-case alphabetic words of 4+ letters, in order of first appearance."""
        seen: dict[str, None] = {}
        for w in self.words:
            w = w.strip(".,;:!?\"'()[]").lower()
            if len(w) >= 4 and w.isalpha() and w.isascii():
                seen.setdefault(w, None)
        return list(seen)


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a sentence may start: 0, after each '. ', '! ', '? ', and len(text)."""
    return [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]


def insert_at_depth(context: str, needle: str, depth: float) -> tuple[str, float]:
    """Insert ``needle`` at the sentence boundary nearest ``depth`` percent of ``context`` (the nearest word
    boundary when no sentence ends within 5% of it); returns the text and the depth actually used (percent of
    characters before the needle)."""
    if not context:
        return needle, 0.0
    target = depth / 100 * len(context)
    b = min(sentence_boundaries(context), key=lambda i: (abs(i - target), i))
    if abs(b - target) > 0.05 * len(context):  # no sentence ends near the depth (short or list-like text): a word boundary
        words = [0] + [m.end() for m in re.finditer(r"\s", context)] + [len(context)]
        b = min(words, key=lambda i: (abs(i - target), i))
    head, tail = context[:b].rstrip(), context[b:].lstrip()
    text = " ".join(s for s in (head, needle, tail) if s)
    return text, 100.0 * b / len(context)


class PromptFormat:
    """Renders (user message, answer prefix) to token ids: the tokenizer's chat template when it has one,
    with the answer prefix opening the assistant turn; otherwise plain text (``chat = False``, stated in every
    report)."""

    def __init__(self, tokenizer: Any, use_chat_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        if use_chat_template and not self.chat:
            logger.warning("the tokenizer has no chat template: plain 'Question/Answer' prompts instead")

    @property
    def name(self) -> str:
        return "chat template" if self.chat else "plain (no chat template)"

    def text(self, user: str, answer_prefix: str) -> str:
        if self.chat:
            head = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True)
            return head + answer_prefix.lstrip()
        return user + "\n" + answer_prefix.lstrip() if answer_prefix else user

    def ids(self, user: str, answer_prefix: str) -> list[int]:
        """Token ids with the tokenizer's special tokens, BOS once (like ``sala chat``): not added again when the
        chat template already wrote it."""
        text = self.text(user, answer_prefix)
        bos = getattr(self.tokenizer, "bos_token", None)
        return list(self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def fit_largest(build: Callable[[int], T], count: Callable[[T], int], target: int, hi: int) -> tuple[int, T, int]:
    """Largest ``n`` in [0, hi] with ``count(build(n)) <= target`` (binary search; ``count`` grows with ``n``).
    Returns (n, build(n), its count). Raises when even ``n = 0`` is over ``target``."""
    item0 = build(0)
    c0 = count(item0)
    if c0 > target:
        raise ValueError(f"the prompt without any filler (template, needles, question, worked examples) is already "
                         f"{c0} tokens, over the {target} available: it does not fit this length; use a longer length")
    lo, best = 0, (0, item0, c0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        item = build(mid)
        c = count(item)
        if c <= target:
            lo, best = mid, (mid, item, c)
        else:
            hi = mid - 1
    return best


def check_filled(label: str, n_tokens: int, target: int, exhausted: bool, source: str, slack: int) -> None:
    """Raise when the filler ran out before the prompt reached ``target - slack`` tokens."""
    if exhausted and n_tokens < target - slack:
        raise ValueError(f"{source} is too short for {label}: all of it gives a {n_tokens}-token prompt, the length needs "
                         f"{target}; give a longer haystack text or a shorter length")
