"""``sala demo``: load (convert, merge the delta), then chat, NIAH, perplexity, speed/memory sweep, report.

The display is rich: side-by-side streaming answers, then one progress bar per measurement; with ``quiet`` or
without a terminal only the summary table is printed.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from sala.demo.config import CHAT_PROMPTS, DemoConfig
from sala.demo.measure import chat_answer, heldout_ppl, niah_answer, niah_grid, niah_samples, time_context
from sala.demo.models import DemoModels, load_models
from sala.demo.report import PNGS, decode_crossover, summary_rows, write_report
from sala.engine.loader import dtype_name, resolve_device, resolve_dtype
from sala.eval.prompts import Haystack
from sala.eval.report import fmt_tokens
from sala.utils.corpus import heldout_path
from sala.utils.env import set_cpu_threads
from sala.utils.fs import check_out_dir

logger = logging.getLogger(__name__)


class _PlainBar:
    """rich.progress.Progress's add_task / update / advance as one printed line per step (logs, CI, nohup)."""

    def __init__(self, console: Any) -> None:
        self.console, self.tasks, self.t0 = console, {}, time.perf_counter()

    def add_task(self, description: str, total: int) -> int:
        self.tasks[len(self.tasks)] = [description, 0, total]
        return len(self.tasks) - 1

    def update(self, task: int, description: str | None = None, completed: int | None = None) -> None:
        t = self.tasks[task]
        t[0] = description or t[0]
        t[1] = t[1] if completed is None else completed

    def advance(self, task: int) -> None:
        t = self.tasks[task]
        t[1] += 1
        self.console.print(f"[{time.perf_counter() - self.t0:6.0f} s] {t[0]}: {t[1]}/{t[2]}", highlight=False)


class Display:
    """rich console output on stderr; everything but the final table is off when ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.err = Console(stderr=True, quiet=quiet)
        self.out = Console()

    def status(self, text: str):
        return self.err.status(text) if not self.quiet else contextlib.nullcontext()

    @contextlib.contextmanager
    def progress(self) -> Iterator[Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if not self.quiet and not self.err.is_terminal:  # a bar that redraws in place is unreadable in a log
            yield _PlainBar(self.err)
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.err, disable=self.quiet, transient=False) as bar:
            yield bar

    def chat_live(self, prompt: str, labels: list[str]):
        """(live context, update(label, text)) showing both answers side by side as they stream."""
        from rich.live import Live
        from rich.table import Table

        answers = {m: "" for m in labels}

        def render() -> Table:
            t = Table(title=f"[bold]user:[/bold] {prompt}", expand=True, show_lines=True)
            for m in labels:
                t.add_column(m, ratio=1)
            t.add_row(*(answers[m] for m in labels))
            return t

        live = Live(render(), console=self.err, refresh_per_second=8, transient=False) if not self.quiet else None

        def update(label: str, text: str) -> None:
            answers[label] = text
            if live is not None:
                live.update(render())

        return (live if live is not None else contextlib.nullcontext()), update


def _text(cfg: DemoConfig) -> Path:
    path = Path(cfg.text) if cfg.text else heldout_path()
    if not path.is_file():
        raise FileNotFoundError(f"--text {path} does not exist")
    return path


def _chat(cfg: DemoConfig, pair: list[tuple[str, Any]], tok: Any, ui: Display) -> list[dict]:
    out = []
    for prompt in CHAT_PROMPTS[: cfg.chat_prompts]:
        live, update = ui.chat_live(prompt, [m for m, _ in pair])
        answers = {}
        with live:
            for label, model in pair:
                answers[label] = chat_answer(model, tok, prompt, cfg.max_new_tokens, chunk=cfg.chunk,
                                             on_text=lambda s, m=label: update(m, s))
                update(label, answers[label]["answer"])
        out.append({"prompt": prompt, "answers": answers})
    return out


def _niah(cfg: DemoConfig, dm: DemoModels, pair: list[tuple[str, Any]], hay: Haystack, bar: Any) -> dict:
    samples = niah_samples(hay, dm.tokenizer, cfg.length_list, cfg.depth_list, cfg.samples, cfg.seed)
    task = bar.add_task("needle in a haystack", total=len(samples) * len(pair))
    records, grids = [], {}
    for label, model in pair:
        window = dm.dense_window if model is dm.dense else None  # the hybrid runs to its own context (checked)
        mine = []
        for s in samples:
            bar.update(task, description=f"NIAH {label} {fmt_tokens(s.length)}")
            mine.append({"model": label, **niah_answer(model, dm.tokenizer, s, window, cfg.chunk)})
            bar.advance(task)
        grids[label] = niah_grid(mine, cfg.length_list, cfg.depth_list)
        records += mine
    past = [L for L in cfg.length_list if dm.dense_window and L > dm.dense_window]
    refused = [r for r in records if r["refused"]]
    note = (f"Lengths {', '.join(fmt_tokens(L) for L in past)} are past the dense model's "
            f"{dm.dense_window:,}-token window: " + (
                f"transformers refused them ({refused[0]['refused']})" if refused else
                "transformers does not refuse (RoPE positions are computed), but the model never saw them in "
                "training") if past else "Every length is inside the dense model's window.")
    return {"lengths": cfg.length_list, "depths": cfg.depth_list, "samples": cfg.samples, "grids": grids,
            "records": records, "note": note}


def _sweep(cfg: DemoConfig, pair: list[tuple[str, Any]], tokens: list[int], bar: Any) -> dict:
    task = bar.add_task("time and memory", total=len(cfg.context_list) * len(pair))
    deadline = time.perf_counter() + cfg.time_budget
    rows, unprefilled = [], []
    for ctx in cfg.context_list:
        prefill = ctx <= cfg.prefill_max_tokens and ctx < len(tokens)
        if prefill and time.perf_counter() > deadline:  # out of time for prefills: decode on a random cache instead
            prefill = False
            unprefilled.append(ctx)
        for label, model in pair:
            bar.update(task, description=f"time {label} {fmt_tokens(ctx)}")
            rows.append({"model": label, **time_context(model, tokens, ctx, prefill=prefill,
                                                        decode_steps=cfg.decode_steps, chunk=cfg.chunk, seed=cfg.seed)})
            bar.advance(task)
    note = (f"Prefill is timed on real text up to {fmt_tokens(cfg.prefill_max_tokens)} tokens; decode is timed over "
            f"{cfg.decode_steps} steps after that prefill, or, for longer contexts, on a cache filled with random K/V "
            "and states of that length (same work per step; hollow markers). Memory is the bytes the cache holds.")
    if unprefilled:
        note += (f" Not prefilled after the {cfg.time_budget:.0f} s budget (decode on random caches instead): "
                 f"{', '.join(fmt_tokens(c) for c in unprefilled)} (raise --time-budget).")
    return {"rows": rows, "unprefilled": unprefilled, "note": note}


def run_demo(cfg: DemoConfig) -> dict:
    """Run every part of the demo and write the report folder ``cfg.out``; returns the report."""
    t0 = time.perf_counter()
    check_out_dir(cfg.out, cfg.force, reuse_own=True, own_names=("report.md", "demo.json", *PNGS))  # before the run
    set_cpu_threads(cfg.threads)  # default: sala.utils.env.default_cpu_threads
    ui = Display(cfg.quiet)
    text_path = _text(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    with ui.status("loading the dense model and its SALA hybrid (first run: dequantise + convert, cached)"):
        dm = load_models(model=cfg.model, delta=cfg.delta, conversion=cfg.conversion, sparse_layers=cfg.sparse_layers,
                         device=device, dtype=dtype)
    if not dm.trained:
        ui.err.print("[bold yellow]no trained delta: the hybrid is the UNTRAINED conversion "
                     "(answers will be poor; sala train makes it useful)[/]")
    _check_hybrid_lengths(cfg, dm)
    pair = [(dm.dense_label, dm.dense), (dm.hybrid_label, dm.hybrid)]
    hay = Haystack.from_file(text_path)
    need = max(cfg.ppl_tokens * cfg.ppl_windows + 1, cfg.prefill_max_tokens + 1)
    tokens = _tokens(dm.tokenizer, text_path, need)
    report: dict = {"labels": [m for m, _ in pair], "trained": dm.trained, "source": dm.source, "delta": dm.delta,
                    "converted": str(dm.converted), "recipe": vars(dm.recipe), "dense_window": dm.dense_window,
                    "device": str(device), "dtype": dtype_name(dtype), "threads": torch.get_num_threads(),
                    "text": str(text_path), "quick": cfg.quick}
    report["chat"] = _chat(cfg, pair, dm.tokenizer, ui)
    with ui.progress() as bar:
        report["niah"] = _niah(cfg, dm, pair, hay, bar)
        task = bar.add_task("held-out perplexity", total=len(pair))
        report["ppl"] = []
        for label, model in pair:
            report["ppl"].append({"model": label, **heldout_ppl(model, tokens, cfg.ppl_tokens, cfg.ppl_windows, cfg.chunk)})
            bar.advance(task)
        report["timing"] = _sweep(cfg, pair, tokens, bar)
    report["ppl_note"] = (f"{cfg.ppl_windows} windows of {cfg.ppl_tokens:,} tokens from `{text_path.name}`; both models "
                          "share the tokenizer, so the perplexities compare directly.")
    report["crossover"] = decode_crossover(report["timing"]["rows"], *report["labels"])
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report["seconds"] = time.perf_counter() - t0
    files = write_report(report, Path(cfg.out))
    _print_summary(ui, report, files)
    return report


def _check_hybrid_lengths(cfg: DemoConfig, dm: DemoModels) -> None:
    """The dense model may run past its window (that is the point); the hybrid stays inside its context. Checked
    before anything long runs: NIAH lengths, and the sweep's contexts plus the decode steps after a prefill."""
    limit = getattr(dm.hybrid.config, "max_position_embeddings", None)
    steps = cfg.decode_steps + 1
    need = cfg.length_list + [c + steps if c <= cfg.prefill_max_tokens else c for c in cfg.context_list]
    if limit is not None and max(need) > limit:
        raise ValueError(f"{max(need):,} positions (--lengths, or --time-contexts plus {steps} decode steps after a "
                         f"prefill) exceed the hybrid's context {limit:,} (the conversion's max_position_embeddings); "
                         "use shorter lengths")


def _tokens(tokenizer: Any, path: Path, need: int) -> list[int]:
    """The first ``need`` tokens of the text (tokenizing a prefix: the whole corpus would take seconds)."""
    text = path.read_text(errors="replace")
    chars = need * 8
    while True:
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if len(ids) >= need or chars >= len(text):
            if len(ids) < need:
                raise ValueError(f"{path} holds {len(ids):,} tokens, the demo needs {need:,}; give a longer --text "
                                 "or shorter --ppl-context / --prefill-max")
            return ids[:need]
        chars *= 2


def _print_summary(ui: Display, report: dict, files: list[Path]) -> None:
    from rich.table import Table

    head, *rows = summary_rows(report)
    t = Table(title="sala demo" + ("" if report["trained"] else " (hybrid UNTRAINED)"))
    for h in head:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    ui.out.print(t)
    cross = report["crossover"]
    ui.out.print(f"decode: the hybrid is faster per token from {fmt_tokens(cross)} tokens on" if cross else
                 "decode: no crossover within the measured contexts (see time.png)")
    ui.out.print(f"report: {files[0]} (+ demo.json, {', '.join(p.name for p in files[2:])}); "
                 f"{report['seconds']:.0f} s")
