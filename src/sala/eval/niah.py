"""``sala eval niah``: needle in a haystack over a (context length x depth) grid, built offline from a text file.

Each sample hides "The special magic number for <city> is <7-digit number>." at a sentence boundary at the
given depth of a context cut from the haystack (a seeded offset per sample), asks for the number, and lets the
model answer greedily after the prefix "Answer: The special magic number for <city> is". The prompt (chat
template included) plus ``max_new_tokens`` fills the length in model tokens to within a word or two. A sample
is correct when the number appears in the answer.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from sala.eval.config import NiahConfig
from sala.eval.models import describe, eos_ids, greedy_generate, load_checked, setup_threads
from sala.eval.progress import Progress
from sala.eval.prompts import Haystack, PromptFormat, check_filled, fit_largest, insert_at_depth
from sala.eval.report import fmt_tokens, markdown_table, out_dir, plot_heatmaps, unique_label, write_json, write_text
from sala.eval.scoring import exact_match

logger = logging.getLogger(__name__)

CITIES = [c.replace("-", " ") for c in (
    "Amsterdam Athens Auckland Bangkok Barcelona Beijing Berlin Bogota Boston Brussels Budapest Cairo Cape-Town Chicago "
    "Copenhagen Dakar Delhi Dublin Edinburgh Florence Geneva Hanoi Havana Helsinki Istanbul Jakarta Kyoto Lagos Lima "
    "Lisbon London Madrid Manila Marrakesh Melbourne Mexico-City Montreal Moscow Mumbai Munich Nairobi Naples Oslo "
    "Paris Prague Quito Reykjavik Riga Rome Santiago Seattle Seoul Shanghai Singapore Stockholm Sydney Taipei Tokyo "
    "Toronto Vancouver Venice Vienna Warsaw Zurich"
).split()]
NEEDLE = "The special magic number for {key} is {value}."
INTRO = ("Below is a long text. A special magic number is hidden in it. Read the text carefully, then answer the "
         "question at the end.")
QUESTION = "What is the special magic number for {key}? Answer with the number only."
ANSWER_PREFIX = "Answer: The special magic number for {key} is"


@dataclass
class NiahSample:
    length: int
    depth: float
    index: int
    key: str
    value: str
    offset: int  # first haystack word of the context
    haystack_words: int
    depth_actual: float  # percent of context characters before the needle
    prompt_tokens: int
    prompt_ids: list[int]


def words_per_token(hay: Haystack, tokenizer: Any, sample_words: int = 2000) -> float:
    text = hay.text(0, sample_words)
    return min(sample_words, len(hay.words)) / max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def make_sample(hay: Haystack, fmt: PromptFormat, length: int, depth: float, index: int, *, seed: int,
                answer_tokens: int, wpt: float | None = None) -> NiahSample:
    """One prompt of ``length - answer_tokens`` tokens at most (a word or two less), deterministic in
    (seed, length, depth, index)."""
    rng = random.Random(f"niah/{seed}/{length}/{depth:g}/{index}")
    key, value = rng.choice(CITIES), str(rng.randint(10**6, 10**7 - 1))
    needle = NEEDLE.format(key=key, value=value)
    target = length - answer_tokens
    wpt = words_per_token(hay, fmt.tokenizer) if wpt is None else wpt
    needed = int(target * wpt * 1.2) + 20
    starts = [s for s in hay.sentence_starts if s + needed <= len(hay.words)]
    offset = rng.choice(starts) if starts else 0
    avail = len(hay.words) - offset

    def build(n: int):
        context, actual = insert_at_depth(hay.text(offset, n), needle, depth)
        user = f"{INTRO}\n\n{context}\n\nQuestion: {QUESTION.format(key=key)}"
        return fmt.ids(user, ANSWER_PREFIX.format(key=key)), actual

    cap = min(avail, 2 * needed)
    try:
        n, (ids, actual), count = fit_largest(build, lambda x: len(x[0]), target, cap)
        if n == cap < avail:  # the estimate was low: search the whole rest of the haystack
            n, (ids, actual), count = fit_largest(build, lambda x: len(x[0]), target, avail)
    except ValueError as e:
        raise ValueError(f"niah length {length:,} ({target:,} prompt tokens + {answer_tokens} answer tokens): {e}") from None
    check_filled(f"niah length {length:,}", count, target, n == avail, f"haystack {hay.path}", slack=64)
    return NiahSample(length, depth, index, key, value, offset, n, actual, count, ids)


def run_niah(cfg: NiahConfig) -> dict:
    """Grid of every model; writes niah.json, niah.md and niah.png (one heatmap per model); returns the report."""
    setup_threads(cfg.threads)
    hay = Haystack.from_file(cfg.haystack)
    out = out_dir(cfg.out, "niah", cfg.force)
    report: dict = {"command": "niah", "haystack": cfg.haystack, "lengths": cfg.length_list, "depths": cfg.depth_list,
                    "samples": cfg.samples, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                    "needle": NEEDLE, "question": QUESTION, "models": {}, "grids": {}, "records": []}
    tables = []
    for spec in cfg.model:
        model, tokenizer, label = load_checked(spec, cfg, cfg.length_list)
        label = unique_label(label, report["models"])
        fmt = PromptFormat(tokenizer, use_chat_template=not cfg.no_chat_template)
        report["models"][label] = {"spec": spec, "prompt_format": fmt.name, **describe(model)}
        stops, wpt = eos_ids(model, tokenizer), words_per_token(hay, tokenizer)
        correct = {(L, d): 0 for L in cfg.length_list for d in cfg.depth_list}
        seconds = {L: 0.0 for L in cfg.length_list}  # prefill + answer per sample (greedy syncs on every token)
        total = len(correct) * cfg.samples
        # every prompt first: a length the needle cannot fit, or a haystack too short, fails before generating
        samples = [make_sample(hay, fmt, L, d, i, seed=cfg.seed, answer_tokens=cfg.max_new_tokens, wpt=wpt)
                   for L in cfg.length_list for d in cfg.depth_list for i in range(cfg.samples)]
        with Progress(total, f"niah {label}", unit="sample", quiet=cfg.quiet) as bar:
            for s in samples:
                done = lambda toks, v=s.value: v in tokenizer.decode(toks)  # stop once the number is out
                t0 = time.perf_counter()
                ans_ids = greedy_generate(model, s.prompt_ids, cfg.max_new_tokens, chunk=cfg.chunk,
                                          stop_ids=stops, should_stop=done)
                secs = time.perf_counter() - t0
                seconds[s.length] += secs
                answer = tokenizer.decode(ans_ids, skip_special_tokens=True)
                ok = exact_match(answer, s.value)
                correct[(s.length, s.depth)] += ok
                rec = {k: v for k, v in asdict(s).items() if k != "prompt_ids"}
                report["records"].append({"model": label, **rec, "answer": answer, "correct": ok,
                                          "seconds": round(secs, 4)})
                bar.update()
        acc = [[correct[(L, d)] / cfg.samples for L in cfg.length_list] for d in cfg.depth_list]
        mean = sum(map(sum, acc)) / (len(cfg.length_list) * len(cfg.depth_list))
        per_length = len(cfg.depth_list) * cfg.samples
        throughput = {L: per_length / seconds[L] if seconds[L] > 0 else float("inf") for L in cfg.length_list}
        report["grids"][label] = {"lengths": cfg.length_list, "depths": cfg.depth_list, "accuracy": acc, "mean": mean,
                                  "samples_per_s": [throughput[L] for L in cfg.length_list]}
        rows = [[f"{d:g}%"] + [f"{a:.2f}" for a in row] for d, row in zip(cfg.depth_list, acc)]
        rows.append(["mean"] + [f"{sum(col) / len(col):.2f}" for col in zip(*acc)])
        rows.append(["samples/s"] + [f"{throughput[L]:.3g}" for L in cfg.length_list])
        tables.append(f"{label} ({fmt.name}): mean accuracy {mean:.3f}\n\n"
                      + markdown_table(["depth \\ length"] + [fmt_tokens(L) for L in cfg.length_list], rows))
        del model
        gc.collect()
    report["out"] = str(out)
    write_json(out / "niah.json", report)
    report["table"] = "\n\n".join(tables)
    write_text(out / "niah.md", report["table"] + "\n")
    plot_heatmaps(report["grids"], out / "niah.png")
    return report
