"""``sala eval ruler``: RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER ``scripts/synthetic.yaml``),
generated offline and deterministically from a seed, scored with RULER's string-match-all x 100.

Families and their RULER settings (the QA tasks need downloaded datasets and are left out):

* ``niah_*``: needles "One of the special magic {numbers|words|uuids} for {key} is: {value}." in a noise
  haystack ("The grass is green. ..." repeated), an essay haystack (``--haystack`` text; tasks skipped without
  one) or a haystack of distractor needles; several keys, values per key, or queried keys.
* ``vt``: variable tracking, one chain of 4 hops (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ...) in
  noise, with one worked example first; the answer is every variable of the chain.
* ``cwe``: common words extraction, a numbered list where 10 words appear 30 times and the rest 3 (6 and 1
  below 4K tokens), after one worked example; the answer is the 10 common words.
* ``fwe``: frequent words extraction, coded 6-letter words drawn from a Zipf (zeta, alpha 2) distribution
  with the top word replaced by '...'; the answer is the ranks 2-4.

Each sample's filler amount (sentences, words, list entries) is the largest whose prompt, chat template
included, plus the task's answer budget fits the length (binary search), so prompts land within one filler
unit (one short sentence, word or list entry) of it. Words come from built-in lists (RULER draws them from the
``wonderwords`` package), and pronounceable pseudo-words once a list runs out.
"""

from __future__ import annotations

import functools
import gc
import logging
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from sala.eval.models import describe, eos_ids, greedy_generate, load_checked, setup_threads
from sala.eval.progress import Progress
from sala.eval.prompts import Haystack, PromptFormat, check_filled, fit_largest, sentence_boundaries
from sala.eval.report import fmt_tokens, markdown_table, out_dir, plot_ruler, unique_label, write_json, write_text
from sala.eval.scoring import string_match_all

if TYPE_CHECKING:  # config.py reads TASKS from here: the config type only for annotations, no import circle
    from sala.eval.config import RulerConfig

logger = logging.getLogger(__name__)

ADJECTIVES = (
    "able acid ancient angry bitter black bold brave bright broad broken calm careful cheap clean clever cold cool "
    "curious damp dark deep dry dusty eager early easy empty fair fancy fast fierce flat fresh gentle giant glad "
    "golden grand green happy hard heavy hidden high hollow humble hungry jolly keen kind large late lazy light "
    "little lively long loud lucky mellow mighty modern narrow neat nervous new noble odd old orange pale plain "
    "polite proud purple quick quiet rapid rare red rich rough round royal rusty sharp shiny short silent silly "
    "simple slow small smooth soft solid sour spicy steady steep sticky strange strong sunny sweet swift tall tame "
    "tender thick thin tidy tiny tough warm weak wet white wide wild wise witty young"
).split()
NOUNS = (
    "acorn anchor apple arrow artist autumn badge bakery balloon banana basket beach beard bell bicycle blanket "
    "boat bottle branch bread breeze bridge bucket butter button cabin camera candle canyon carpet castle cellar "
    "chair cherry chimney circle cliff clock cloud coffee comet copper cottage crayon crystal cup curtain daisy "
    "desert diamond dolphin donkey dragon drum eagle engine falcon feather fence forest fountain garden garlic "
    "ginger glacier glove harbor harvest helmet hill honey horizon island jacket jungle kettle kitten ladder lake "
    "lantern lemon library lizard magnet maple marble meadow mirror monkey mountain needle ocean orchard otter "
    "oven owl paddle palace panda parrot pebble pencil pepper piano pillow planet pocket pond potato puzzle rabbit "
    "river rocket saddle sailor salmon shadow shell shovel silver sparrow spider spoon squirrel station statue "
    "stone storm stream sugar summer teapot thunder tiger tomato tower tractor trumpet tulip turtle umbrella valley "
    "violin volcano wagon walnut whale window winter wizard wolf zebra"
).split()
VERBS = (
    "admire answer arrive bake borrow bounce breathe build carry catch chase climb collect cook dance deliver dig "
    "dream drift explore fetch float fold gather glide grow guard hammer hike hunt invent juggle jump knit laugh "
    "listen march mend mix observe paint plant play polish pour pull push question reach read repair rescue row "
    "sail scatter search sing sketch skate sleep slide sneeze sort spin splash stack steer stir swim swing travel "
    "tumble visit wander wash whisper whistle wiggle wonder write yawn"
).split()
WORDS = sorted(set(ADJECTIVES + NOUNS + VERBS))
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: 40 evenly spaced insertion depths

NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz "
                 "you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} "
                 "mentioned in the provided text?")
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
                "dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class Task:
    family: str  # niah | vt | cwe | fwe
    tokens_to_generate: int  # RULER's answer budget, part of the length
    haystack: str | None = None  # niah/vt: noise | essay | needle
    args: dict = field(default_factory=dict)


TASKS: dict[str, Task] = {
    "niah_single_1": Task("niah", 128, "noise", dict(k="words", v="numbers")),
    "niah_single_2": Task("niah", 128, "essay", dict(k="words", v="numbers")),
    "niah_single_3": Task("niah", 128, "essay", dict(k="words", v="uuids")),
    "niah_multikey_1": Task("niah", 128, "essay", dict(k="words", v="numbers", nk=4)),
    "niah_multikey_2": Task("niah", 128, "needle", dict(k="words", v="numbers")),
    "niah_multikey_3": Task("niah", 128, "needle", dict(k="uuids", v="uuids")),
    "niah_multivalue": Task("niah", 128, "essay", dict(k="words", v="numbers", nv=4)),
    "niah_multiquery": Task("niah", 128, "essay", dict(k="words", v="numbers", nq=4)),
    "vt": Task("vt", 30, "noise", dict(chains=1, hops=4)),
    "cwe": Task("cwe", 120, None, dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": Task("fwe", 50, None, dict(alpha=2.0, word_len=6)),
}


@dataclass
class RulerSample:
    task: str
    length: int
    index: int
    user: str  # the user message (context + question)
    answer_prefix: str
    outputs: list[str]  # references
    prompt_ids: list[int]
    prompt_tokens: int
    filler: int  # sentences / words / list entries of filler


# ---- random values ----------------------------------------------------------------------------------------------
def _random(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}")


def _distinct(rng: random.Random, kind: str, n: int, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _random(rng, kind)
        if v not in avoid and v not in out:
            out.append(v)
    return out


def _insert(rng: random.Random, items: list[str], extra: list[str]) -> list[str]:
    """Insert ``extra`` (in order) at sorted random positions of ``items``."""
    slots = len(items) + 1
    pos = sorted(rng.sample(range(slots), len(extra)) if slots >= len(extra) else rng.choices(range(slots), k=len(extra)))
    out = list(items)
    for j, (p, e) in enumerate(zip(pos, extra)):
        out.insert(p + j, e)
    return out


def _noise_lines(n: int) -> list[str]:
    """``n`` noise sentences, five to a line (RULER's noise haystack when n is a multiple of 5)."""
    sents = [NOISE[i % len(NOISE)] for i in range(n)]
    return [" ".join(sents[i : i + 5]) for i in range(0, n, 5)]


@functools.lru_cache(maxsize=4)
def pseudo_words(n: int) -> tuple[str, ...]:
    """``n`` distinct pronounceable lower-case pseudo-words (three consonant-vowel syllables), fixed order."""
    rng = random.Random("sala-ruler-pseudo-words")
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: dict[str, None] = {}
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(3))
        if w not in WORDS:
            out.setdefault(w, None)
    return tuple(out)


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus Euler-Maclaurin tail)."""
    return sum(k**-alpha for k in range(1, terms + 1)) + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms**-alpha


# ---- generators: (rng, filler amount) -> (user message, answer prefix, references) --------------------------------
def gen_niah(rng: random.Random, n: int, task: Task, hay: Haystack | None, length: int) -> tuple[str, str, list[str]]:
    a = task.args
    nv, nq = a.get("nv", 1), a.get("nq", 1)
    nk = max(a.get("nk", 1), nq)
    kind = a["v"]
    keys = _distinct(rng, a["k"], nk)
    values = [_distinct(rng, kind, nv) for _ in keys]
    needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if task.haystack == "essay":
        text = hay.text(0, n)
        b = sentence_boundaries(text)
        sents = [text[i:j].strip() for i, j in zip(b, b[1:]) if text[i:j].strip()]
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        pos = [int(len(sents) * d / 100) for d in depths]
        for j, (p, nd) in enumerate(zip(pos, needles)):
            sents.insert(p + j, nd)
        context = " ".join(sents)
    else:
        if task.haystack == "noise":
            lines = _noise_lines(n)
        else:  # distractor needles with other keys
            lines = [NIAH_NEEDLE.format(kind=kind, key=k, value=_random(rng, kind))
                     for k in _distinct(rng, a["k"], n, avoid=set(keys))]
        context = "\n".join(_insert(rng, lines, needles))
    asked = rng.sample(range(nk), nq)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if nq * nv == 1:  # RULER's singular wording
        kind = kind[:-1]
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
    return template.format(kind=kind, context=context, query=query), prefix.format(kind=kind, query=query), answers


def _vt_chain(rng: random.Random, hops: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names:
            names.append(v)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, chain


def _vt_text(rng: random.Random, n: int, hops: int) -> tuple[str, str, list[str]]:
    names, chain = _vt_chain(rng, hops)
    value = chain[0].split("=")[-1].strip()
    context = "\n".join(_insert(rng, _noise_lines(n), chain))
    return (VT_TEMPLATE.format(context=context, query=value), VT_PREFIX.format(num_v=hops + 1, query=value), names)


def gen_vt(rng: random.Random, n: int, task: Task, hay: Haystack | None, length: int) -> tuple[str, str, list[str]]:
    hops = task.args["hops"]
    ex_user, ex_prefix, ex_names = _vt_text(rng, 10, hops)  # RULER's one worked example, in a short noise text
    user, prefix, names = _vt_text(rng, n, hops)
    return f"{ex_user}{ex_prefix}{' '.join(ex_names)}\n\n{user}", prefix, names


def _cwe_list(rng: random.Random, unique: int, freq_cw: int, freq_ucw: int, num_cw: int) -> tuple[str, list[str]]:
    pool = WORDS if unique <= len(WORDS) else WORDS + list(pseudo_words(unique - len(WORDS)))
    words = rng.sample(pool, unique)
    common, uncommon = words[:num_cw], words[num_cw:]
    items = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


def gen_cwe(rng: random.Random, n: int, task: Task, hay: Haystack | None, length: int) -> tuple[str, str, list[str]]:
    a = task.args
    num_cw = a["num_cw"]
    if length < 4096:  # RULER's settings for short contexts
        shot, (fc, fu) = (20, 3, 1), (6, 1)
    else:
        shot, (fc, fu) = (40, 10, 3), (a["freq_cw"], a["freq_ucw"])
    ex_ctx, ex_common = _cwe_list(rng, shot[0], shot[1], shot[2], num_cw)
    ctx, common = _cwe_list(rng, num_cw + n, fc, fu, num_cw)
    example = CWE_TEMPLATE.format(context=ex_ctx) + CWE_PREFIX + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
    return f"{example}\n{CWE_TEMPLATE.format(context=ctx)}", CWE_PREFIX, common


def gen_fwe(rng: random.Random, n: int, task: Task, hay: Haystack | None, length: int) -> tuple[str, str, list[str]]:
    a = task.args
    vocab_size = max(8, (length - task.tokens_to_generate) // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=a["word_len"])))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent word is noise
    z = zeta(a["alpha"])
    text = [w for k, w in enumerate(words, 1) for _ in range(int(n * k ** -a["alpha"] / z))]
    rng.shuffle(text)
    return FWE_TEMPLATE.format(context=" ".join(text)), FWE_PREFIX, words[1:4]


GENERATORS: dict[str, Callable[..., tuple[str, str, list[str]]]] = {"niah": gen_niah, "vt": gen_vt, "cwe": gen_cwe, "fwe": gen_fwe}


def needs_haystack(name: str) -> bool:
    return TASKS[name].haystack == "essay"


def make_sample(name: str, length: int, index: int, *, seed: int, fmt: PromptFormat, hay: Haystack | None = None) -> RulerSample:
    """One sample of task ``name`` whose prompt plus the task's answer budget fits ``length`` tokens (within one
    filler unit); deterministic in (seed, name, length, index)."""
    task = TASKS[name]
    if task.haystack == "essay" and hay is None:
        raise ValueError(f"RULER task {name} needs an essay haystack: pass --haystack FILE")
    target = length - task.tokens_to_generate
    base = f"ruler/{seed}/{name}/{length}/{index}"

    def build(n: int):
        user, prefix, outputs = GENERATORS[task.family](random.Random(base), n, task, hay, length)
        return fmt.ids(user, prefix), user, prefix, outputs

    hi = min(target, len(hay.words)) if task.haystack == "essay" else target  # every filler unit costs >= 1 token
    try:
        n, (ids, user, prefix, outputs), count = fit_largest(build, lambda x: len(x[0]), target, hi)
    except ValueError as e:
        raise ValueError(f"RULER {name} at length {length:,} ({target:,} prompt + {task.tokens_to_generate} answer "
                         f"tokens): {e}") from None
    if task.haystack == "essay":
        check_filled(f"RULER {name} at length {length:,}", count, target, n == len(hay.words), f"haystack {hay.path}", slack=64)
    return RulerSample(name, length, index, user, prefix, outputs, ids, count, n)


def run_ruler(cfg: RulerConfig) -> dict:
    """Every task x length x sample for every model; writes ruler.json, ruler.md and ruler.png."""
    setup_threads(cfg.threads)
    hay = Haystack.from_file(cfg.haystack) if cfg.haystack else None
    skipped = [t for t in cfg.task_list if needs_haystack(t) and hay is None]
    tasks = [t for t in cfg.task_list if t not in skipped]
    if skipped:
        logger.warning("no --haystack: skipping the essay-haystack tasks %s", ", ".join(skipped))
    if not tasks:
        raise ValueError(f"every selected task ({', '.join(skipped)}) needs an essay haystack: pass --haystack FILE")
    out = out_dir(cfg.out, "ruler", cfg.force)
    report: dict = {"command": "ruler", "lengths": cfg.length_list, "tasks": tasks, "samples": cfg.samples,
                    "seed": cfg.seed, "haystack": cfg.haystack, "metric": "string_match_all x 100",
                    "skipped": {t: "needs --haystack (essay)" for t in skipped}, "models": {}, "results": [], "records": []}
    for spec in cfg.model:
        model, tokenizer, label = load_checked(spec, cfg, cfg.length_list)
        label = unique_label(label, report["models"])
        fmt = PromptFormat(tokenizer, use_chat_template=not cfg.no_chat_template)
        report["models"][label] = {"spec": spec, "prompt_format": fmt.name, **describe(model)}
        stops = eos_ids(model, tokenizer)
        total = len(cfg.length_list) * len(tasks) * cfg.samples
        # every prompt first: a length a task cannot fit fails before any generation
        samples = {(length, name): [make_sample(name, length, i, seed=cfg.seed, fmt=fmt, hay=hay) for i in range(cfg.samples)]
                   for length in cfg.length_list for name in tasks}
        with Progress(total, f"ruler {label}", unit="sample", quiet=cfg.quiet) as bar:
            for length in cfg.length_list:
                for name in tasks:
                    budget = TASKS[name].tokens_to_generate
                    new = budget if cfg.max_new_tokens is None else min(budget, cfg.max_new_tokens)
                    scores = []
                    for i, s in enumerate(samples[(length, name)]):
                        ans = greedy_generate(model, s.prompt_ids, new, chunk=cfg.chunk, stop_ids=stops)
                        pred = tokenizer.decode(ans, skip_special_tokens=True)
                        scores.append(100.0 * string_match_all(pred, s.outputs))
                        report["records"].append({"model": label, "task": name, "length": length, "index": i,
                                                  "prompt_tokens": s.prompt_tokens, "outputs": s.outputs,
                                                  "prediction": pred, "score": scores[-1]})
                        bar.update()
                    report["results"].append({"model": label, "task": name, "length": length,
                                              "score": round(sum(scores) / len(scores), 2), "samples": len(scores)})
        del model
        gc.collect()
    report["table"] = ruler_tables(report["results"])
    report["out"] = str(out)
    write_json(out / "ruler.json", report)
    note = "".join(f"\nskipped {t}: {why}" for t, why in report["skipped"].items())
    write_text(out / "ruler.md", report["table"] + "\n" + note + "\n")
    plot_ruler(report["results"], out / "ruler.png")
    return report


def ruler_tables(results: list[dict]) -> str:
    """One Markdown table per length: task rows, model columns, an average row."""
    models = list(dict.fromkeys(r["model"] for r in results))
    tables = []
    for length in sorted({r["length"] for r in results}):
        by = {(r["task"], r["model"]): r["score"] for r in results if r["length"] == length}
        tasks = list(dict.fromkeys(t for t, _ in by))
        rows = [[t] + [f"{by[(t, m)]:.2f}" if (t, m) in by else "-" for m in models] for t in tasks]
        avg = [sum(by[(t, m)] for t in tasks if (t, m) in by) / max(1, sum((t, m) in by for t in tasks)) for m in models]
        rows.append(["average"] + [f"{a:.2f}" for a in avg])
        tables.append(f"length {fmt_tokens(length)}\n\n" + markdown_table(["task"] + models, rows))
    return "\n\n".join(tables)


