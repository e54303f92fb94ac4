"""The demo's report folder: ``report.md``, ``demo.json`` and four PNGs (NIAH heatmaps, time vs context, cache
memory vs context, held-out perplexity), plus the rows of the printed summary table."""

from __future__ import annotations

import math
from pathlib import Path

from sala.eval.report import fmt_tokens, markdown_table, plot_ppl, write_json
from sala.utils import fs

PNGS = ("niah.png", "time.png", "memory.png", "ppl.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: the demo runs on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def decode_crossover(rows: list[dict], dense: str, hybrid: str) -> int | None:
    """First context from which the hybrid's decode step stays faster than the dense model's (None: never)."""
    by = {(r["model"], r["context"]): r["decode_ms"] for r in rows}
    common = sorted(c for (m, c) in by if m == dense and (hybrid, c) in by)
    faster = [by[(hybrid, c)] < by[(dense, c)] for c in common]
    for i, c in enumerate(common):
        if all(faster[i:]):
            return c
    return None


def plot_niah(grids: dict[str, dict], windows: dict[str, int | None], path: Path) -> None:
    """NIAH accuracy, one panel per model (x = length, y = depth); lengths past a model's window (``windows``:
    label -> max positions, the dense model's only) are marked."""
    plt = _pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    first = next(iter(grids.values()))
    lengths, depths = first["lengths"], first["depths"]
    fig, axes = plt.subplots(1, len(grids), figsize=(max(4.5, 1.1 * len(lengths) + 2.2) * len(grids),
                                                     0.5 * len(depths) + 2.4), squeeze=False)
    for k, (ax, (label, g)) in enumerate(zip(axes[0], grids.items())):
        window = windows.get(label)
        acc = [[math.nan if v is None else v for v in row] for row in g["accuracy"]]
        im = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                ax.text(j, i, "refused" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
        past = [j for j, L in enumerate(lengths) if window and L > window]
        if past:  # where the dense model's training window ends
            ax.axvline(past[0] - 0.5, color="black", ls="--", lw=1.2)
        ticks = [fmt_tokens(L) + ("\npast " + fmt_tokens(window) if j in past else "") for j, L in enumerate(lengths)]
        ax.set_xticks(range(len(lengths)), ticks)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{label}\nmean accuracy {g['mean']:.2f}", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_time(rows: list[dict], path: Path, labels: list[str]) -> None:
    """Two panels vs context: prefill seconds (real text) and decode ms/token (hollow markers: random caches)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for i, m in enumerate(labels):
        mine = sorted((r for r in rows if r["model"] == m), key=lambda r: r["context"])
        pre = [r for r in mine if r["prefill_s"] is not None]
        a.plot([r["context"] for r in pre], [r["prefill_s"] for r in pre], "o-", color=f"C{i}", label=m)
        b.plot([r["context"] for r in mine], [r["decode_ms"] for r in mine], "-", color=f"C{i}", label=m)
        for r in mine:
            b.plot(r["context"], r["decode_ms"], "o", color=f"C{i}", mfc=f"C{i}" if r["cache"] == "prefilled" else "white")
    a.set_title("prefill time (real text)")
    a.set_ylabel("seconds")
    b.set_title("decode time per token (hollow: random-filled cache)")
    b.set_ylabel("ms / token")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ctx = sorted({r["context"] for r in rows})
        ax.set_xticks(ctx, [fmt_tokens(c) for c in ctx])
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(rows: list[dict], path: Path, labels: list[str]) -> None:
    """Cache bytes (K/V + compressed keys + Lightning states) vs context: the hybrid keeps K/V in its softmax
    layers only and a fixed-size state in each Lightning layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, m in enumerate(labels):
        mine = sorted((r for r in rows if r["model"] == m), key=lambda r: r["context"])
        ax.plot([r["context"] for r in mine], [r["cache_bytes"] / 2**20 for r in mine], "o-", color=f"C{i}", label=m)
    ctx = sorted({r["context"] for r in rows})
    ax.set_xscale("log", base=2)  # linear y: the slopes (bytes per token) are the point
    ax.set_xticks(ctx, [fmt_tokens(c) for c in ctx])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache MiB (K/V + states)")
    ax.set_title("decode cache memory vs context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_rows(report: dict) -> list[list[str]]:
    """model | NIAH inside window | NIAH past window | ppl | decode ms @ longest | cache @ longest."""
    window = report["dense_window"]
    rows = []
    last = max((r["context"] for r in report["timing"]["rows"]), default=None)
    for m in report["labels"]:
        recs = [r for r in report["niah"]["records"] if r["model"] == m]

        def acc(sel) -> str:
            done = [r["correct"] for r in recs if sel(r) and r["correct"] is not None]
            refused = sum(1 for r in recs if sel(r) and r["correct"] is None)
            return f"{sum(done)}/{len(done)}" + (f" ({refused} refused)" if refused else "") if done or refused else "-"

        # columns split by length at the dense model's window, for both models (the hybrid has no such limit)
        inside = acc(lambda r: window is None or r["length"] <= window)
        past = acc(lambda r: window is not None and r["length"] > window)
        ppl = next((r["ppl"] for r in report["ppl"] if r["model"] == m), None)
        t = next((r for r in report["timing"]["rows"] if r["model"] == m and r["context"] == last), None)
        rows.append([m, inside, past, _num(ppl, ".2f"), _num(t and t["decode_ms"], ".1f"),
                     _mib(t and t["cache_bytes"])])
    w, c = fmt_tokens(window) if window else "window", fmt_tokens(last) if last else "-"
    head = ["model", f"NIAH <={w}", f"NIAH >{w}", "ppl", f"ms/tok @{c}", f"cache @{c}"]
    return [head] + rows


def _markdown(report: dict) -> str:
    head, *rows = summary_rows(report)
    lab = report["labels"]
    lines = [f"# sala demo: {lab[0]} vs {lab[1]}", ""]
    if not report["trained"]:
        lines += ["**The hybrid is the UNTRAINED conversion** (no trained delta was found): expect poor answers; "
                  "`sala train` is what makes it useful.", ""]
    lines += [f"- source: `{report['source']}`; softmax layers {report['recipe']['sparse_layers']}, the rest "
              f"Lightning; hybrid context {report['recipe']['context']}", f"- delta: `{report['delta']}`",
              f"- device {report['device']}, dtype {report['dtype']}, torch threads {report['threads']}; total "
              f"{report['seconds']:.0f} s; peak process RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB (both models loaded)",
              "", "## Summary", "", markdown_table(head, rows), "", "## Chat", ""]
    for c in report["chat"]:
        lines.append(f"**{c['prompt']}**\n")
        for m in lab:
            a = c["answers"][m]
            text = " ".join(a["answer"].split()) or "(empty)"  # one line: answers with newlines break the list
            lines.append(f"- *{m}* ({a['tokens']} tokens, {a['tokens_per_s']:.1f} tok/s): {text}")
        lines.append("")
    lines += ["## Needle in a haystack", "", report["niah"]["note"], "", "![niah](niah.png)", ""]
    rows = [[r["model"], fmt_tokens(r["length"]), f"{r['depth']:g}%", r["value"], " ".join(r["answer"].split())[:60] or "-",
             "refused" if r["correct"] is None else ("yes" if r["correct"] else "no")] for r in report["niah"]["records"]]
    lines += [markdown_table(["model", "length", "depth", "needle", "answer", "correct"], rows), ""]
    lines += ["## Held-out perplexity", "", report["ppl_note"], "", "![ppl](ppl.png)", ""]
    cross = report["crossover"]
    verdict = (f"The hybrid's decode step is faster than the dense model's from {fmt_tokens(cross)} tokens on."
               if cross else "No decode crossover within the measured contexts.")
    lines += ["## Time and memory vs context", "", report["timing"]["note"], "", verdict, "", "![time](time.png)", "",
              "![memory](memory.png)", ""]
    rows = [[r["model"], fmt_tokens(r["context"]), r["cache"], _num(r["prefill_s"], ".2f"), _num(r["decode_ms"], ".1f"),
             _mib(r["cache_bytes"])] for r in report["timing"]["rows"]]
    lines += [markdown_table(["model", "context", "cache", "prefill s", "decode ms/tok", "cache"], rows), ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> list[Path]:
    """report.md, demo.json and the PNGs into ``out``, through a temporary sibling (:func:`sala.utils.fs.atomic_dir`:
    sala's files of an earlier report replaced, any other file kept; the caller checked ``out`` before the run);
    -> the files written."""
    labels = report["labels"]
    with fs.atomic_dir(out, force=True) as tmp:
        plot_niah(report["niah"]["grids"], {labels[0]: report["dense_window"]}, tmp / "niah.png")
        plot_time(report["timing"]["rows"], tmp / "time.png", labels)
        plot_memory(report["timing"]["rows"], tmp / "memory.png", labels)
        plot_ppl(report["ppl"], tmp / "ppl.png")
        write_json(tmp / "demo.json", report)
        (tmp / "report.md").write_text(_markdown(report))
    return [out / "report.md", out / "demo.json"] + [out / p for p in PNGS]
