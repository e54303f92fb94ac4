"""Text corpus: reST -> prose conversion, the fixed split rule, atomic idempotent writes, missing-corpus errors."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest

from sala.utils import corpus
from sala.utils.corpus import (DOC_SEPARATOR, default_corpus_dir, heldout_path, prepare_corpus, rst_to_text,
                               split_documents, train_path)

SAMPLE = """\
.. _json-module:

:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. index:: single: JSON

**Source code:** :source:`Lib/json/__init__.py`

--------------

The :mod:`json` module exposes an API familiar to users of :func:`pickle.dumps`
and :meth:`~io.TextIOBase.write`; see :ref:`the table <py-to-json-table>` and :pep:`8`.
Use ``sort_keys=True`` for *stable* output, as `JSON <https://json.org>`_ says.

Example::

    >>> import json
    >>> json.dumps([1, 2])
    '[1, 2]'

.. function:: dumps(obj, *, skipkeys=False, \\
                    indent=None)

   Serialize *obj* to a JSON formatted :class:`str`.

   .. versionchanged:: 3.6
      All optional parameters are now keyword-only.

   .. note::
      Keys are always strings.

+------------+-----------+
| Python     | JSON      |
+============+===========+
| dict       | object    |
+------------+-----------+

.. |x| replace:: ``replaced``

Text with |x| substitution.

.. code-block:: python

   print("code kept")
"""


def test_rst_to_text_removes_markup_and_keeps_prose():
    text = rst_to_text(SAMPLE)
    for noise in (":mod:", ":func:", ":meth:", ":ref:", ":pep:", "``", ".. ", ":synopsis:", "====", "----",
                  "+---", "_json-module", "single: JSON", "**", "<https", "`", "|x|", "\\"):
        assert noise not in text, noise
    for prose in ("json --- JSON encoder and decoder", "The json module exposes an API familiar to users of",
                  "pickle.dumps", "and write; see the table and PEP 8.", "Use sort_keys=True for stable output,"
                  " as JSON says.", "Example:\n", "Serialize obj to a JSON formatted str.",
                  "Changed in version 3.6: All optional parameters are now keyword-only.",
                  "Note:\nKeys are always strings.", "Python  JSON", "dict  object",
                  "Text with replaced substitution.", "Source code: Lib/json/__init__.py",
                  "dumps(obj, *, skipkeys=False, indent=None)"):
        assert prose in text, prose
    # code examples survive verbatim, indented
    assert "    >>> json.dumps([1, 2])\n    '[1, 2]'" in text
    assert '    print("code kept")' in text
    assert DOC_SEPARATOR not in rst_to_text("a\fb\n")


def _fake_tree(root: Path, n: int = 23) -> list[str]:
    src = root / corpus.SOURCES_SUBDIR
    names = []
    for i in range(n):
        rel = f"{'lib' if i % 2 else 'howto'}/doc{i:02d}.rst.txt"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"Title {rel}\n{'=' * 20}\n\nBody of :func:`{rel}`.\n")
        names.append(rel)
    (src / "notes.txt").write_text("not a source\n")
    return sorted(names)


def test_split_rule_on_fake_tree(tmp_path):
    names = _fake_tree(tmp_path / "src")
    info = prepare_corpus(tmp_path / "out", source_dir=tmp_path / "src")
    train = split_documents(info.train_path.read_text())
    held = split_documents(info.heldout_path.read_text())
    expect_held = [n for i, n in enumerate(names) if i % 10 == 9]
    expect_train = [n for i, n in enumerate(names) if i % 10 != 9]
    assert [d.splitlines()[0] for d in held] == [f"Title {n}" for n in expect_held]
    assert [d.splitlines()[0] for d in train] == [f"Title {n}" for n in expect_train]
    assert (info.source_files, info.train_docs, info.heldout_docs) == (23, 21, 2)
    meta = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert meta["package"] == "python3.11-doc" and "i % 10 == 9" in meta["rule"]
    assert meta["heldout_bytes"] == info.heldout_path.stat().st_size
    # the separator is a line of its own; a reader that splits on lines sees the boundary
    assert f"\n{DOC_SEPARATOR}\n" in info.train_path.read_text()


def test_idempotent_and_force(tmp_path, monkeypatch):
    _fake_tree(tmp_path / "src", n=12)
    out = tmp_path / "out"
    first = prepare_corpus(out, source_dir=tmp_path / "src")
    mtime = (out / "train.txt").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(corpus, "_build", lambda *a: calls.append(a) or first)
    assert prepare_corpus(out, source_dir=tmp_path / "src") == first and calls == []  # cached
    prepare_corpus(out, source_dir=tmp_path / "src", force=True)
    assert len(calls) == 1
    (out / "train.txt").write_text("tampered")  # checksum mismatch -> rebuild
    prepare_corpus(out, source_dir=tmp_path / "src")
    assert len(calls) == 2
    monkeypatch.undo()
    info = prepare_corpus(out, source_dir=tmp_path / "src")
    assert (out / "train.txt").read_bytes() != b"tampered" and info.train_sha256 == first.train_sha256
    assert (out / "train.txt").stat().st_mtime_ns != mtime
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        corpus._write_atomic(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_missing_corpus_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SALA_CORPUS_DIR", str(tmp_path / "nothing"))
    assert default_corpus_dir() == tmp_path / "nothing"
    for fn in (train_path, heldout_path):
        with pytest.raises(FileNotFoundError, match=r"bash scripts/bootstrap.sh.*python -m sala.utils.corpus"):
            fn()
    with pytest.raises(ValueError, match="no \\*.rst.txt"):
        prepare_corpus(tmp_path / "o", source_dir=tmp_path)


def test_default_dir_in_checkout(monkeypatch):
    monkeypatch.delenv("SALA_CORPUS_DIR", raising=False)
    repo = next(p for p in Path(corpus.__file__).resolve().parents if (p / "pyproject.toml").is_file())
    assert default_corpus_dir() == repo / "data" / "text"


def test_cli_main(tmp_path, capsys):
    _fake_tree(tmp_path / "src", n=10)
    assert corpus.main(["--out", str(tmp_path / "o"), "--source", str(tmp_path / "src")]) == 0
    assert "held-out 1 docs" in capsys.readouterr().out
    assert train_path(tmp_path / "o").is_file() and heldout_path(tmp_path / "o").is_file()


DOCS = [
    "Dealing with Bugs\n\nPython is a mature programming language which has established a reputation for\n"
    "stability. Report what you find.\n\nA second paragraph of the same section, also prose and long enough to "
    "count.\n\nUsing the Tracker\n\nThe tracker lists every issue that was reported, with its state and its "
    "history, in one place.\n\nThird Title\n\nNot taken: two sections per document are enough for the rule here.",
    "no title here, just a long opening line of prose that ends with a period and goes on for a while.\n\n"
    ">>> print(1)\n\nTitle Before Code\n\n>>> x = 1\n>>> x\n1",
]


def test_chat_examples_keep_the_documents_own_text():
    rows = corpus.chat_examples(DOCS)
    assert [r["messages"][0]["content"] for r in rows] == ["What is Dealing with Bugs?", "Tell me about Using the Tracker."]
    first, second = (r["messages"][1]["content"] for r in rows)
    assert first == DOCS[0].split("\n\n")[1] + "\n\n" + DOCS[0].split("\n\n")[2]  # whole paragraphs, verbatim
    assert second == DOCS[0].split("\n\n")[4]
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)
    short = corpus.chat_examples(DOCS, max_chars=120)  # at least one paragraph, never a cut one
    assert short[0]["messages"][1]["content"] == DOCS[0].split("\n\n")[1]
    assert corpus.chat_examples(DOCS, per_doc=1) == rows[:1]


def test_chat_path_builds_once_and_follows_train(tmp_path):
    (tmp_path / "train.txt").write_text(("\n" + DOC_SEPARATOR + "\n").join(DOCS) + "\n")
    path = corpus.chat_path(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and json.loads((tmp_path / "chat.json").read_text())["examples"] == 2
    stamp = path.stat().st_mtime_ns
    assert corpus.chat_path(tmp_path) == path and path.stat().st_mtime_ns == stamp  # up to date: not rewritten
    (tmp_path / "train.txt").write_text(DOCS[0] + "\n")
    assert len(corpus.chat_path(tmp_path).read_text().splitlines()) == 2
    (tmp_path / "train.txt").write_text(DOCS[1] + "\n")
    assert corpus.chat_path(tmp_path).read_text() == ""  # rebuilt from the new train split


def test_retrieval_examples_hide_one_fact_in_the_documents_text():
    rows = corpus.retrieval_examples(DOCS, n=40, seed=3, min_chars=100, max_chars=400)
    assert len(rows) == 40 and rows == corpus.retrieval_examples(DOCS, n=40, seed=3, min_chars=100, max_chars=400)
    assert rows != corpus.retrieval_examples(DOCS, n=40, seed=4, min_chars=100, max_chars=400)
    doc_pars = {p for d in DOCS for p in d.split("\n\n")}
    for r in rows:
        user, answer = (m["content"] for m in r["messages"])
        key, value = re.fullmatch(r"The access code for the (\w+ \w+ project) is (\d+)\.", answer).groups()
        assert 5 <= len(value) <= 8 and value[0] != "0"
        intro, *pars, question = user.split("\n\n")
        assert question == f"Question: What is the access code for the {key}?"
        assert pars.count(answer) == 1  # the fact once, as its own paragraph
        assert all(p in doc_pars for p in pars if p != answer)  # everything else is the documents' own paragraphs
        assert len(pars) == 2 or sum(len(p) for p in pars if p != answer) <= 400  # whole paragraphs up to the length
    depths = {[p for p in r["messages"][0]["content"].split("\n\n")].index(r["messages"][1]["content"]) for r in rows}
    assert len(depths) > 3  # the fact moves through the text
    with pytest.raises(ValueError, match="at least one non-empty document"):
        corpus.retrieval_examples(["", "  "])


def test_retrieval_path_and_its_corpus_name(tmp_path, monkeypatch):
    (tmp_path / "train.txt").write_text(("\n" + DOC_SEPARATOR + "\n").join(DOCS) + "\n")
    path = corpus.retrieval_path(tmp_path)
    assert path.name == "retrieval.jsonl" and len(path.read_text().splitlines()) == 800
    meta = json.loads((tmp_path / "retrieval.json").read_text())
    assert meta["format_version"] == corpus.RETRIEVAL_FORMAT_VERSION and meta["rule"] == corpus.RETRIEVAL_RULE
    stamp = path.stat().st_mtime_ns
    assert corpus.retrieval_path(tmp_path) == path and path.stat().st_mtime_ns == stamp
    monkeypatch.setattr(corpus, "default_corpus_dir", lambda: tmp_path)
    assert corpus.resolve_path("corpus:retrieval") == path
    with pytest.raises(ValueError, match="corpus:chat and corpus:retrieval"):
        corpus.resolve_path("corpus:nope")
