"""Offline data for HALO layer selection: calibration text, an LM-loss probe, and synthetic recall probes built from
the source's tokenizer vocabulary (spec training.md §2.1 uses SQuAD/FDA/SWDE and commonsense tasks; these are
local stand-ins that need no download).

* **general** (``lm``): next-token loss on held-out windows of the text (user files or :mod:`default_text`).
* **recall / kv**: ``k1 : v1 \\n k2 : v2 \\n ... kq : ?`` with random word tokens; several queries per sample, the
  metric is the model's log-probability (or top-1 accuracy) of each queried value.
* **recall / needle**: key-value "needles" inserted at random depths of real filler text, all queried at the end.

Every sample is built from one ``torch.Generator``, so a seed fixes the probe set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sala.convert.adapters import ConversionError
from sala.convert.default_text import DEFAULT_TEXT

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RecallSet:
    """Recall probe samples: ``ids`` [N, T]; ``answer_mask`` [N, T] marks positions whose next token is an answer;
    ``answers`` [N, T] holds that answer id there (0 elsewhere)."""

    ids: torch.Tensor
    answer_mask: torch.Tensor
    answers: torch.Tensor


@dataclass(kw_only=True)
class ProbeData:
    calib: torch.Tensor  # [n_tokens] calibration stream (student training)
    lm_windows: torch.Tensor  # [N, T] held-out text windows (general probe)
    recall: RecallSet


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` from a directory (the source's by default); a clear error when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never run checkpoint code
    except (OSError, ValueError, TypeError) as e:
        raise ConversionError(
            f"could not load a tokenizer from {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "layer selection builds its probes from the tokenizer: pass tokenizer=DIR (--tokenizer DIR)"
        ) from e


def read_texts(files: tuple[str, ...] | list[str]) -> list[str]:
    """The user's text files (UTF-8), or the built-in text when none are given."""
    if not files:
        return [DEFAULT_TEXT]
    texts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConversionError(f"text file {p} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ConversionError(f"text file {p} is empty")
        texts.append(text)
    return texts


def tokenize_texts(tokenizer, texts: list[str], vocab_size: int) -> torch.Tensor:
    """Concatenate the documents' ids (EOS between documents when the tokenizer has one) -> [n_tokens]."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    out = torch.tensor(ids, dtype=torch.long)
    if out.numel() and int(out.max()) >= vocab_size:
        raise ConversionError(f"tokenizer produced id {int(out.max())} >= the model's vocab_size {vocab_size}; wrong tokenizer?")
    return out


def word_token_ids(tokenizer, vocab_size: int, minimum: int = 16) -> list[int]:
    """Ids of tokens that decode to a plain word (letters only, >= 3 chars, optional leading space), not special."""
    special = set(tokenizer.all_special_ids)
    words = []
    for i in range(min(vocab_size, len(tokenizer))):
        if i in special:
            continue
        s = tokenizer.decode([i]).strip()
        if len(s) >= 3 and s.isascii() and s.isalpha():
            words.append(i)
    if len(words) < minimum:
        words = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
    if len(words) < minimum:
        raise ConversionError(f"tokenizer has only {len(words)} usable tokens; recall probes need at least {minimum}")
    return words


def _piece(tokenizer, text: str, fallback: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) if ids else [fallback]


def _pick(gen: torch.Generator, pool: list[int], n: int, distinct: bool) -> list[int]:
    if distinct:
        return [pool[j] for j in torch.randperm(len(pool), generator=gen)[:n].tolist()]
    return [pool[j] for j in torch.randint(0, len(pool), (n,), generator=gen).tolist()]


def build_recall_set(
    tokenizer, vocab_size: int, filler: torch.Tensor, *, samples: int, length: int, queries: int, gen: torch.Generator
) -> RecallSet:
    """Half key-value lists, half needles in filler text; every sample exactly ``length`` tokens."""
    words = word_token_ids(tokenizer, vocab_size)
    sep = _piece(tokenizer, ":", words[0])
    delim = _piece(tokenizer, "\n", words[1])
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    unit = 2 + len(sep) + len(delim)  # key sep value delim
    room = length - len(prefix) - queries * unit
    if room < 2 * unit:
        need = len(prefix) + (queries + 2) * unit
        raise ConversionError(f"probe_len {length} is too short for {queries} recall queries; raise it to >= {need}")
    ids = torch.zeros(samples, length, dtype=torch.long)
    mask = torch.zeros(samples, length, dtype=torch.bool)
    answers = torch.zeros(samples, length, dtype=torch.long)
    for n in range(samples):
        needle = n % 2 == 1 and filler.numel() > room
        n_pairs = min(queries, len(words) // 2) if needle else min(room // unit, len(words) // 2)
        keys = _pick(gen, words, n_pairs, distinct=True)
        values = _pick(gen, words, n_pairs, distinct=False)
        pair = [[k, *sep, v, *delim] for k, v in zip(keys, values)]
        if needle:  # needles at random depths of a random filler window
            start = int(torch.randint(0, filler.numel() - room + 1, (1,), generator=gen))
            body = filler[start:start + room - n_pairs * unit].tolist()
            cuts = sorted(torch.randint(0, len(body) + 1, (n_pairs,), generator=gen).tolist())
            ctx, last = [], 0
            for cut, p in zip(cuts, pair):
                ctx += body[last:cut] + p
                last = cut
            ctx += body[last:]
        else:
            ctx = [t for p in pair for t in p]
            ctx += _pick(gen, words, room - len(ctx), distinct=False)  # pad with random words to the exact length
        asked = torch.randperm(n_pairs, generator=gen)[:queries].tolist()
        seq = prefix + ctx
        for q in asked:
            seq += [keys[q], *sep]
            mask[n, len(seq) - 1], answers[n, len(seq) - 1] = True, values[q]
            seq += [values[q], *delim]
        seq = seq[:length]
        ids[n, : len(seq)] = torch.tensor(seq)
    return RecallSet(ids=ids, answer_mask=mask, answers=answers)


def lm_windows(tokens: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` from the held-out stream -> [N, length] (N <= max_windows)."""
    n = min(tokens.numel() // length, max_windows)
    if n == 0:
        raise ConversionError(
            f"held-out text has {tokens.numel()} tokens, fewer than one probe window of {length}; "
            "pass longer text files or lower probe_len"
        )
    return tokens[: n * length].view(n, length)


def split_heldout(tokens: torch.Tensor, eval_fraction: float, probe_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration head, held-out tail) of a token stream: the tail is ``eval_fraction`` of it, but at least one
    ``probe_len`` window (at most half the stream) for small corpora such as the built-in text."""
    n_eval = int(tokens.numel() * eval_fraction)
    if n_eval < probe_len:  # small corpora: hold out exactly one window
        n_eval = min(probe_len, tokens.numel() // 2)
    return tokens[: tokens.numel() - n_eval], tokens[tokens.numel() - n_eval:]


def build_probe_data(
    tokenizer, vocab_size: int, texts: list[str], *, probe_len: int, eval_fraction: float, lm_max_windows: int,
    recall_samples: int, recall_queries: int, seed: int,
) -> ProbeData:
    """Split the text into calibration (head) and held-out (tail) tokens and build every probe from a seed."""
    tokens = tokenize_texts(tokenizer, texts, vocab_size)
    calib, held_out = split_heldout(tokens, eval_fraction, probe_len)
    if calib.numel() < 2:
        raise ConversionError(f"the text gives only {tokens.numel()} tokens; pass longer text files")
    length = min(probe_len, held_out.numel())
    if length < probe_len:
        logger.warning("held-out text has %d tokens: LM probe windows shortened from %d", held_out.numel(), probe_len)
    gen = torch.Generator().manual_seed(seed + 1)
    recall = build_recall_set(tokenizer, vocab_size, calib, samples=recall_samples, length=probe_len,
                              queries=recall_queries, gen=gen)
    return ProbeData(calib=calib, lm_windows=lm_windows(held_out, length, lm_max_windows), recall=recall)
