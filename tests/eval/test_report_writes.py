"""Issue 17: eval report folders are written through temporary siblings, never lose files sala did not write,
and a folder holding such files needs --force; sala's own earlier report is rewritten without it."""

from __future__ import annotations

import json

from sala.cli import main
from sala.utils import fs


def _ppl(out, text, capsys, *extra):
    rc = main(["eval", "ppl", "--model", "tiny", "--text", str(text), "--context", "64", "--max-windows", "1",
               "--out", str(out), "--quiet", *extra])
    return rc, capsys.readouterr().err


def test_eval_out_folder_rule(tmp_path, haystack_file, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    rc, err = _ppl(out, haystack_file, capsys)
    assert rc == 2 and "output folder" in err and "not empty (1 entries: notes.txt)" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    rc, err = _ppl(out, haystack_file, capsys, "--force")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "ppl.json").exists()
    assert set(json.loads((out / fs.MANIFEST).read_text())) == {"ppl.json", "ppl.md"}
    assert not [p for p in out.iterdir() if fs.TMP_MARK in p.name]
    again = tmp_path / "again"
    assert _ppl(again, haystack_file, capsys)[0] == 0
    assert _ppl(again, haystack_file, capsys)[0] == 0  # its own earlier report: rewritten without --force
