"""Scorers of generated answers (RULER's string match, NIAH's exact match) and flag-list parsing."""

from __future__ import annotations

import re

from sala.engine.planner import parse_tokens

_CONTROL = re.compile(r"[\x00-\x1f]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, control characters to spaces, whitespace runs collapsed (RULER strips and replaces
    non-printable characters before matching)."""
    return _SPACE.sub(" ", _CONTROL.sub(" ", text)).strip().lower()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of ``references`` contained in ``prediction`` (case-insensitive), in [0, 1] (RULER's metric for
    NIAH, variable tracking, CWE and FWE; RULER reports the mean x 100)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = normalize(prediction)
    return sum(normalize(r) in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is contained in ``prediction`` (case-insensitive), else 0 (RULER's QA metric)."""
    pred = normalize(prediction)
    return float(any(normalize(r) in pred for r in references))


def exact_match(prediction: str, answer: str) -> bool:
    """NIAH: the needle's value appears in the answer (case and whitespace insensitive)."""
    return normalize(answer) in normalize(prediction)


def parse_token_list(text: str, what: str = "--lengths") -> list[int]:
    """``"1K,2K,8192,1M"`` -> [1024, 2048, 8192, 1048576] (K and M binary, like ``sala plan --context``)."""
    items = [s for s in (text or "").split(",")]
    if not text or any(not s.strip() for s in items):
        raise ValueError(f"{what} must be a comma-separated list of token counts like 1K,8K,8192 or 1M, got {text!r}")
    try:
        return [parse_tokens(s.strip()) for s in items]
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def parse_depths(text: str) -> list[float]:
    """``"0,25,50,75,100"`` -> percents of the context before the needle, each in [0, 100]."""
    items = (text or "").split(",")
    try:
        depths = [float(s) for s in items]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated percents in [0, 100] like 0,25,50,75,100, got {text!r}") from None
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"--depths must be percents in [0, 100], got {bad[0]:g} in {text!r}")
    return depths
