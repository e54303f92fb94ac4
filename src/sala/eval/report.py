"""Reports of the evals: output directory, JSON, Markdown tables and matplotlib figures (headless Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sala.utils import fs


def out_dir(out: str | None, command: str, force: bool = False) -> Path:
    """The report folder (default ``out/eval/<command>``), checked before any model loads: a folder holding files
    sala did not write there needs ``force`` (issue 17); an earlier report of sala's is rewritten."""
    path = Path(out) if out else Path("out") / "eval" / command
    fs.check_out_dir(path, force, reuse_own=True, own_names=tuple(f"{command}.{ext}" for ext in ("json", "md", "png")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def unique_label(label: str, taken) -> str:
    """``label``, or ``label#2``, ``label#3``... when models of the same name are compared."""
    n, out = 1, label
    while out in taken:
        n += 1
        out = f"{label}#{n}"
    return out


def write_json(path: Path, report: dict) -> None:
    write_text(path, json.dumps(report, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Written through a temporary sibling and recorded in the folder's manifest (:mod:`sala.utils.fs`)."""
    fs.write_text(path, text)
    fs.record_written(path.parent, path)


def save_figure(fig, path: Path, **kw) -> None:
    """``fig.savefig`` through a temporary sibling, recorded like :func:`write_text`."""
    with fs.atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kw)
    fs.record_written(path.parent, path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_tokens(n: int) -> str:
    """1024 -> 1K, 1048576 -> 1M, 1000 -> 1000."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(results: list[dict], path: Path) -> None:
    """Perplexity vs context, one line per model (bars when there is a single context)."""
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in results))
    contexts = sorted({r["context"] for r in results})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if len(contexts) == 1:
        vals = [next(r["ppl"] for r in results if r["model"] == m) for m in models]
        bars = ax.bar(models, vals, color=[f"C{i}" for i in range(len(models))])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_xlabel("model")
        ax.set_title(f"perplexity at context {fmt_tokens(contexts[0])}")
    else:
        for i, m in enumerate(models):
            rows = sorted((r for r in results if r["model"] == m), key=lambda r: r["context"])
            ax.plot([r["context"] for r in rows], [r["ppl"] for r in rows], "o-", color=f"C{i}", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [fmt_tokens(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_title("perplexity vs context")
        ax.legend()
    ax.set_ylabel("perplexity")
    values = [r["ppl"] for r in results]
    if max(values) > 20 * min(values):  # e.g. a random model beside a trained one
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_heatmaps(grids: dict[str, dict], path: Path) -> None:
    """NIAH accuracy heatmaps side by side, one per model: x = context length, y = depth, annotated cells.
    ``grids[label] = {"lengths": [...], "depths": [...], "accuracy": [[depth row][length col]]}``."""
    plt = _pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    n = len(grids)
    first = next(iter(grids.values()))
    w = max(4.0, 0.9 * len(first["lengths"]) + 2.0)
    fig, axes = plt.subplots(1, n, figsize=(w * n, 0.55 * len(first["depths"]) + 2.0), squeeze=False)
    for ax, (label, g) in zip(axes[0], grids.items()):
        acc = [[math.nan if v is None else v for v in row] for row in g["accuracy"]]
        im = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(g["lengths"])), [fmt_tokens(x) for x in g["lengths"]])
        ax.set_yticks(range(len(g["depths"])), [f"{d:g}%" for d in g["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{label}: mean {g['mean']:.2f}")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_ruler(results: list[dict], path: Path) -> None:
    """RULER: one panel per length, grouped bars (task x model) of the score, plus each model's average."""
    plt = _pyplot()
    lengths = sorted({r["length"] for r in results})
    models = list(dict.fromkeys(r["model"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    cols = tasks + ["average"]
    fig, axes = plt.subplots(len(lengths), 1, figsize=(max(6.0, 0.8 * len(cols) * max(1, len(models)) / 1.5), 3.2 * len(lengths)),
                             squeeze=False)
    width = 0.8 / len(models)
    for ax, length in zip(axes[:, 0], lengths):
        for i, m in enumerate(models):
            rows = {r["task"]: r["score"] for r in results if r["model"] == m and r["length"] == length}
            vals = [rows.get(t, math.nan) for t in tasks]
            done = [v for v in vals if not math.isnan(v)]
            vals.append(sum(done) / len(done) if done else math.nan)
            ax.bar([k + (i - (len(models) - 1) / 2) * width for k in range(len(cols))], vals, width, label=m, color=f"C{i}")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_ylim(0, 105)
        ax.set_ylabel("score")
        ax.set_title(f"RULER at {fmt_tokens(length)}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
