"""NIAH and RULER generators: deterministic from the seed, the requested token length within a few tokens,
needles where they should be; bad inputs (needle longer than the context, empty/short haystack, no chat
template) give their errors or stated fallbacks."""

from __future__ import annotations

import collections
import copy

import pytest

from sala.eval import niah, ruler
from sala.eval.prompts import Haystack, PromptFormat, insert_at_depth


@pytest.fixture(scope="module")
def hay(haystack_file):
    return Haystack.from_file(haystack_file)


@pytest.fixture(scope="module")
def chat(tokenizer):
    return PromptFormat(tokenizer)


@pytest.fixture(scope="module")
def plain(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return PromptFormat(tok)


@pytest.mark.parametrize("length", [300, 512, 1000])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_niah_prompt_length_within_a_few_tokens(hay, chat, length, depth):
    s = niah.make_sample(hay, chat, length, depth, 0, seed=0, answer_tokens=16)
    target = length - 16
    assert len(s.prompt_ids) == s.prompt_tokens
    assert target - 6 <= s.prompt_tokens <= target  # word granularity
    text = chat.tokenizer.decode(s.prompt_ids)
    assert niah.NEEDLE.format(key=s.key, value=s.value) in text
    assert text.startswith("<s><|im_start|>user\n") and text.rstrip().endswith(f"for {s.key} is")


def test_niah_deterministic_from_seed(hay, chat):
    a = niah.make_sample(hay, chat, 512, 50, 1, seed=3, answer_tokens=16)
    b = niah.make_sample(hay, chat, 512, 50, 1, seed=3, answer_tokens=16)
    c = niah.make_sample(hay, chat, 512, 50, 1, seed=4, answer_tokens=16)
    assert a == b
    assert (a.key, a.value, a.offset) != (c.key, c.value, c.offset)


def test_niah_needle_depth(hay, chat):
    for depth, lo, hi in ((0, 0, 0), (50, 40, 60), (100, 100, 100)):
        s = niah.make_sample(hay, chat, 1000, depth, 0, seed=0, answer_tokens=16)
        assert lo <= s.depth_actual <= hi, (depth, s.depth_actual)


def test_insert_at_depth_uses_sentence_boundaries():
    text = " ".join(f"Sentence {i:02d} ends here." for i in range(20))
    out, used = insert_at_depth(text, "NEEDLE.", 50)
    assert "Sentence 09 ends here. NEEDLE. Sentence 10 ends here." in out
    assert used == pytest.approx(100 * text.index("Sentence 10") / len(text))
    assert insert_at_depth(text, "NEEDLE.", 0)[0].startswith("NEEDLE. Sentence 00")
    assert insert_at_depth(text, "NEEDLE.", 100)[0].endswith("19 ends here. NEEDLE.")
    # no sentence end within 5% of the depth: the nearest word boundary instead
    out, used = insert_at_depth("One two three four five six seven eight. Nine ten.", "NEEDLE.", 30)
    assert out == "One two three NEEDLE. four five six seven eight. Nine ten."


def test_no_chat_template_falls_back_to_plain_prompt(hay, plain, caplog):
    assert not plain.chat and plain.name == "plain (no chat template)"
    s = niah.make_sample(hay, plain, 400, 50, 0, seed=0, answer_tokens=16)
    text = plain.tokenizer.decode(s.prompt_ids)
    assert "<|im_start|>" not in text
    assert f"Question: What is the special magic number for {s.key}?" in text
    assert text.rstrip().endswith(f"Answer: The special magic number for {s.key} is")


def test_needle_longer_than_context(hay, chat):
    with pytest.raises(ValueError, match="niah length 96 .*does not fit this length"):
        niah.make_sample(hay, chat, 96, 50, 0, seed=0, answer_tokens=16)


def test_empty_and_short_haystack(tmp_path, hay, chat):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="is empty"):
        Haystack.from_file(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("Too few words here. Really too few.")
    with pytest.raises(ValueError, match="too short to build a context"):
        Haystack.from_file(tmp_path / "short.txt")
    with pytest.raises(ValueError, match="does not exist"):
        Haystack.from_file(tmp_path / "missing.txt")
    small = Haystack.from_file(tmp_path / "short.txt") if False else Haystack(str(tmp_path / "s"), hay.words[:300], [0])
    with pytest.raises(ValueError, match="too short for niah length 4,096"):
        niah.make_sample(small, chat, 4096, 50, 0, seed=0, answer_tokens=16)


# ---- RULER ----------------------------------------------------------------------------------------------------------
TOLERANCE = {"niah_multikey_3": 80, "niah_multikey_2": 40}  # one distractor needle (a uuid pair is ~70 tiny tokens)


@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_ruler_lengths_and_determinism(name, hay, chat):
    length = 2048
    s = ruler.make_sample(name, length, 0, seed=42, fmt=chat, hay=hay)
    target = length - ruler.TASKS[name].tokens_to_generate
    assert target - TOLERANCE.get(name, 16) <= s.prompt_tokens <= target
    assert s == ruler.make_sample(name, length, 0, seed=42, fmt=chat, hay=hay)
    other = ruler.make_sample(name, length, 0, seed=43, fmt=chat, hay=hay)
    assert other.outputs != s.outputs
    for ref in s.outputs:  # every reference is recoverable from the context
        assert ref in s.user


def test_ruler_task_contents(hay, chat):
    s = ruler.make_sample("niah_multivalue", 2048, 0, seed=1, fmt=chat, hay=hay)
    assert len(s.outputs) == 4 and all(len(v) == 7 and v.isdigit() for v in s.outputs)
    s = ruler.make_sample("niah_multiquery", 2048, 0, seed=1, fmt=chat, hay=hay)
    assert len(s.outputs) == 4 and ", and " in s.answer_prefix
    s = ruler.make_sample("niah_single_1", 2048, 0, seed=1, fmt=chat, hay=hay)
    assert "The grass is green." in s.user and "A special magic number is hidden" in s.user
    s = ruler.make_sample("vt", 2048, 0, seed=1, fmt=chat, hay=hay)
    main = s.user[s.user.rindex("Memorize and track"):]  # after the worked example
    chain = [line for line in main.splitlines() if line.startswith("VAR ")]
    assert [c.split()[1] for c in chain] == s.outputs  # the chain in order, first one holds the value
    s = ruler.make_sample("cwe", 2048, 0, seed=1, fmt=chat, hay=hay)
    main_list = s.user.split("\n")[-2]
    counts = collections.Counter(w for w in main_list.split() if not w[0].isdigit())
    assert {w for w, _ in counts.most_common(10)} == set(s.outputs)
    s = ruler.make_sample("fwe", 2048, 0, seed=1, fmt=chat, hay=hay)
    counts = collections.Counter(s.user.split("coded words. ", 1)[1].split("\nQuestion")[0].split())
    assert [w for w, _ in counts.most_common(4)][1:] == s.outputs and counts.most_common(1)[0][0] == "..."


def test_ruler_essay_task_needs_haystack(chat):
    with pytest.raises(ValueError, match="needs an essay haystack: pass --haystack"):
        ruler.make_sample("niah_single_2", 2048, 0, seed=0, fmt=chat, hay=None)


def test_ruler_length_too_short(chat, hay):
    with pytest.raises(ValueError, match="RULER cwe at length 512 .*does not fit this length"):
        ruler.make_sample("cwe", 512, 0, seed=0, fmt=chat, hay=hay)
