"""Held-out LM loss and perplexity of the source and of the converted hybrid, for ``sala convert --verify``.

The identity check only shows that the weight mapping is right (all-softmax conversion == source). The hybrid
itself, with Lightning layers that inherited softmax weights and fresh gates, is a different function until it is
trained (spec training.md §4); this module measures how different, on text neither model was converted on.

Text, first match wins: the user's ``--text`` files (their tail, as the selection probes hold it out), the
project's held-out corpus (``sala.utils.corpus.heldout_path()``, when that module exists and the file is there),
the built-in text's tail (:mod:`sala.convert.default_text`, ~1K tokens: a smoke test, not a benchmark).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sala.convert.adapters import ConversionError
from sala.convert.default_text import DEFAULT_TEXT
from sala.convert.probes import read_texts, split_heldout, tokenize_texts

logger = logging.getLogger(__name__)

WINDOW = 512
"""Tokens per held-out window."""
MAX_WINDOWS = 8
"""At most this many windows are scored."""
EVAL_FRACTION = 0.2
"""Tail fraction held out of ``--text`` files and the built-in text (as ``SelectConfig.eval_fraction``)."""
NEEDS_TRAINING_RATIO = 1.5
"""Hybrid perplexity above this multiple of the source's: the summary says the hybrid needs training."""
_CORPUS_CHARS = 1 << 20  # read at most 1 MiB of the project corpus: MAX_WINDOWS x WINDOW tokens need far less


@dataclass(kw_only=True)
class HeldoutReport:
    """Mean next-token loss (nats) of the source and the hybrid on the same held-out windows."""

    text: str
    windows: int
    window_len: int
    source_loss: float
    hybrid_loss: float

    @property
    def source_ppl(self) -> float:
        return math.exp(self.source_loss)

    @property
    def hybrid_ppl(self) -> float:
        return math.exp(min(self.hybrid_loss, 700.0))  # exp overflows past ~709 nats

    @property
    def ratio(self) -> float:
        return self.hybrid_ppl / self.source_ppl

    @property
    def needs_training(self) -> bool:
        return not math.isfinite(self.hybrid_loss) or self.ratio > NEEDS_TRAINING_RATIO

    def to_dict(self) -> dict:
        return {"text": self.text, "windows": self.windows, "window_len": self.window_len,
                "source_loss": self.source_loss, "hybrid_loss": self.hybrid_loss, "source_ppl": self.source_ppl,
                "hybrid_ppl": self.hybrid_ppl, "ppl_ratio": self.ratio, "needs_training": self.needs_training}

    def summary(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio < 10 else _fmt(self.ratio)
        head = (f"held-out ppl ({self.text}, {self.windows} x {self.window_len} tokens): source {_fmt(self.source_ppl)}, "
                f"hybrid (untrained) {_fmt(self.hybrid_ppl)} (x{ratio})")
        if self.needs_training:
            return head + ": the hybrid needs training (sala train) before use"
        return head + f": within x{NEEDS_TRAINING_RATIO} of the source"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}" if x < 10 else f"{x:,.1f}"


def _project_heldout() -> Path | None:
    """``sala.utils.corpus.heldout_path()`` when the module exists (another room adds it) and the file exists."""
    try:
        from sala.utils import corpus  # optional: absent in older trees
    except ImportError:
        return None
    fn = getattr(corpus, "heldout_path", None)
    try:
        path = fn() if callable(fn) else None
    except FileNotFoundError:  # corpus not built on this machine (scripts/bootstrap.sh builds it)
        return None
    return Path(path) if path is not None and Path(path).is_file() else None


def _corpus_documents(path: Path) -> list[str]:
    """The corpus file's first MiB, split into documents when the corpus module says how."""
    text = path.read_text(encoding="utf-8", errors="replace")[:_CORPUS_CHARS]
    from sala.utils import corpus

    split = getattr(corpus, "split_documents", None)
    docs = split(text) if callable(split) else [text]
    return [d for d in docs if d.strip()] or [text]


def heldout_windows(tokenizer, vocab_size: int, text_files: tuple[str, ...] | list[str] = ()) -> tuple[torch.Tensor, str]:
    """Held-out windows ``[N, T]`` (N <= MAX_WINDOWS, T <= WINDOW) and a description of their text."""
    corpus = None if text_files else _project_heldout()
    if corpus is not None:  # already held out: read from its start
        tokens = tokenize_texts(tokenizer, _corpus_documents(corpus), vocab_size)
        what = f"project held-out corpus {corpus.name}"
    else:
        texts = read_texts(tuple(text_files)) if text_files else [DEFAULT_TEXT]
        _, tokens = split_heldout(tokenize_texts(tokenizer, texts, vocab_size), EVAL_FRACTION, WINDOW)
        what = (", ".join(Path(f).name for f in text_files) if text_files else "built-in text") + " tail"
    length = min(WINDOW, tokens.numel())
    if length < 16:
        raise ConversionError(f"held-out text gives {tokens.numel()} tokens, too few for a perplexity; pass --text FILE")
    n = min(tokens.numel() // length, MAX_WINDOWS)
    return tokens[: n * length].view(n, length), what


@torch.no_grad()
def lm_loss(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over every position of ``windows`` [N, T]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for a in range(0, windows.shape[0], batch_size):
        ids = windows[a:a + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)  # .item(): one sync per batch
        count += ids[:, 1:].numel()
    return total / count
