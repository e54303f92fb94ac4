"""``sala eval ppl``: perplexity of a text at several context lengths.

Windows: full windows of ``context`` tokens starting every ``stride`` tokens (default stride = context:
non-overlapping). The first window scores every token that has a predecessor in it (context - 1 tokens); each
later window scores only its last ``min(stride, context - 1)`` tokens, so with a stride every scored token sees at
least ``context - stride`` tokens of history. Windows run ``batch`` at a time, each in chunks of ``chunk`` tokens
through the model's cache (chunked prefill), so long windows never materialise full-length logits.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sala.eval.config import PplConfig
from sala.eval.models import describe, load_checked, model_device, prefill_chunks, setup_threads
from sala.eval.progress import Progress
from sala.eval.report import markdown_table, out_dir, plot_ppl, unique_label, write_json, write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the text
    score_from: int  # first scored position inside the window (>= 1)


def plan_windows(n_tokens: int, context: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    """Full windows over ``n_tokens`` (see module docstring); raises when the text holds none."""
    stride = context if stride is None else stride
    if n_tokens < context:
        raise ValueError(f"the text has {n_tokens:,} tokens, fewer than the context {context:,}: no full window to score; "
                         "use a shorter --context or a longer --text")
    later = context - min(stride, context - 1)
    windows = [Window(s, 1 if s == 0 else later) for s in range(0, n_tokens - context + 1, stride)]
    return windows[:max_windows] if max_windows else windows


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor, score_from: torch.Tensor, chunk: int) -> tuple[float, int]:
    """Summed next-token NLL (nats, fp64) and scored-token count of windows ``ids`` [B, L]; row b scores the
    targets at window positions >= ``score_from[b]``."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    B, L = ids.shape
    for start, logits in prefill_chunks(model, ids, chunk):  # logits [B, t, V] predict positions start+1 .. start+t
        targets = ids[:, start + 1 : start + 1 + logits.shape[1]]  # [B, t'] (t' = t - 1 in the last chunk)
        t = targets.shape[1]
        if t == 0:
            continue
        nll = F.cross_entropy(logits[:, :t].reshape(B * t, -1), targets.reshape(-1), reduction="none").view(B, t)
        pos = torch.arange(start + 1, start + 1 + t, device=ids.device)
        keep = pos[None, :] >= score_from[:, None].to(ids.device)  # [B, t]
        total += (nll.double() * keep).sum().cpu()
        count += int(keep.sum())
    return float(total), count


def score_text(model: Any, tokens: list[int], context: int, *, stride: int | None = None, batch: int = 4, chunk: int = 2048,
               max_windows: int | None = None, progress: Progress | None = None) -> dict:
    """Perplexity of ``tokens`` at one context length: tokens scored, mean NLL (nats/token), ppl."""
    windows = plan_windows(len(tokens), context, stride, max_windows)
    dev = model_device(model)
    ids_all = torch.tensor(tokens, dtype=torch.long)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        ids = torch.stack([ids_all[w.start : w.start + context] for w in group]).to(dev)  # [b, L]
        s, n = window_nll(model, ids, torch.tensor([w.score_from for w in group]), chunk)
        total, count = total + s, count + n
        if progress is not None:
            progress.update(len(group))
    mean = total / count
    return {"context": context, "stride": stride or context, "windows": len(windows), "tokens_scored": count,
            "mean_nll": mean, "ppl": math.exp(mean)}


def run_ppl(cfg: PplConfig) -> dict:
    """Score ``cfg.text`` with every model at every context; writes ppl.json, ppl.md and (several models or
    contexts) ppl.png to the output directory; returns the report."""
    setup_threads(cfg.threads)
    path = Path(cfg.text)
    if not path.is_file():
        raise ValueError(f"--text {cfg.text} does not exist")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise ValueError(f"--text {cfg.text} is empty")
    out = out_dir(cfg.out, "ppl", cfg.force)
    report: dict = {"command": "ppl", "text": str(path), "contexts": cfg.contexts, "stride": cfg.stride,
                    "batch": cfg.batch, "chunk": cfg.chunk, "models": {}, "results": []}
    for spec in cfg.model:
        model, tokenizer, label = load_checked(spec, cfg, cfg.contexts, batch=cfg.batch)
        label = unique_label(label, report["models"])
        tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        plans = {c: plan_windows(len(tokens), c, cfg.stride, cfg.max_windows) for c in cfg.contexts}
        report["models"][label] = {"spec": spec, "text_tokens": len(tokens), **describe(model)}
        with Progress(sum(map(len, plans.values())), f"ppl {label}", unit="win", quiet=cfg.quiet) as bar:
            for c in cfg.contexts:
                row = score_text(model, tokens, c, stride=cfg.stride, batch=cfg.batch, chunk=cfg.chunk,
                                 max_windows=cfg.max_windows, progress=bar)
                report["results"].append({"model": label, **row})
                logger.info("%s context %d: ppl %.3f over %d tokens", label, c, row["ppl"], row["tokens_scored"])
        del model
        gc.collect()
    tokenizers = {m["text_tokens"] for m in report["models"].values()}
    if len(tokenizers) > 1:
        report["note"] = "models tokenize the text differently: per-token perplexities are not directly comparable"
    rows = [[r["model"], f"{r['context']:,}", f"{r['stride']:,}", f"{r['windows']:,}", f"{r['tokens_scored']:,}",
             f"{r['mean_nll']:.4f}", f"{r['ppl']:.3f}"] for r in report["results"]]
    table = markdown_table(["model", "context", "stride", "windows", "tokens scored", "mean NLL", "ppl"], rows)
    report["out"] = str(out)
    write_json(out / "ppl.json", report)
    write_text(out / "ppl.md", table + "\n" + (f"\n{report['note']}\n" if "note" in report else ""))
    if len(cfg.model) > 1 or len(cfg.contexts) > 1:
        plot_ppl(report["results"], out / "ppl.png")
    report["table"] = table
    return report
