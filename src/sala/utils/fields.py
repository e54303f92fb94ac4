"""CLI flags tied to config dataclasses: field docstrings as help, field defaults as the only defaults.

:func:`flags_from_config` checks a parser against a config dataclass and fills in defaults and help;
:func:`config_from_args` builds the config from the parsed flags. Python keeps no field docstrings (the string
literal under each field) at run time: they are read from the class's source with :mod:`ast`, base classes first, so
a subclass that redeclares a field without a docstring keeps its base's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from typing import Any


@functools.lru_cache(maxsize=None)
def _own_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built in, or made at run time)
        return {}
    [node] = ast.parse(source).body
    docs: dict[str, str] = {}
    body = getattr(node, "body", [])
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of dataclass ``cls`` and its dataclass bases (a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def field_default(f: dataclasses.Field) -> Any:
    """The field's default (``default_factory()`` called), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


_PROPER_NOUNS = {"Lightning", "HALO", "SALA", "MiniCPM", "Llama", "Mistral", "Qwen2", "Qwen3", "Triton", "InfLLM-v2"}
_ROLE = re.compile(r":(?:func|mod|class|data|attr|meth|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(doc: str, names: dict[str, str] | None = None) -> str:
    """A docstring as one line of plain text: reST roles and literals unwrapped, ``field`` names in ``names``
    replaced by what they map to (e.g. ``sparse_fraction`` -> ``--sparse-fraction``)."""
    names = names or {}
    text = _ROLE.sub(lambda m: m.group(1), doc)
    text = _LITERAL.sub(lambda m: names.get(m.group(1), m.group(1)), text)
    return " ".join(text.split())


# ---- flags <-> config dataclasses ---------------------------------------------------------------------------
def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of config dataclass ``cls`` that are flags: all but ``field(metadata={"cli": False})``."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def config_from_args(cls, args: argparse.Namespace):
    """Build config dataclass ``cls`` from the parsed flags (each field is one flag, see :func:`flags_from_config`)."""
    missing = [f.name for f in cli_fields(cls) if not hasattr(args, f.name)]
    if missing:  # was skipped silently: the field kept its dataclass default whatever the user typed
        raise TypeError(f"{cls.__name__} fields {missing} have no flag; add one (or mark the field "
                        "metadata={'cli': False})")
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls)}
    for f in cli_fields(cls):  # a repeatable flag collects a list; a tuple field keeps a tuple
        if isinstance(f.default, tuple) and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def flags_from_config(p: argparse.ArgumentParser, cls) -> None:
    """Tie ``p``'s flags to config dataclass ``cls``, the one source of defaults and help:

    * each field's default becomes its flag's default: give flags no ``default=`` (one that disagrees is an error
      here, so the two cannot drift apart), and the help says ``(default X)``;
    * a flag without ``help=`` gets the field's docstring;
    * a field without a flag is an error here (the CLI used to drop it silently).
    """
    actions: dict[str, list[argparse.Action]] = {}
    for a in p._actions:
        actions.setdefault(a.dest, []).append(a)
    fields = cli_fields(cls)
    names = {f.name: _flag_name(actions[f.name]) for f in fields if f.name in actions}
    docs = field_docs(cls)
    for f in fields:
        if f.name not in actions:
            raise TypeError(f"{cls.__name__}.{f.name} has no flag in '{p.prog}'; add one (or mark the field "
                            "metadata={'cli': False})")
        default = field_default(f)
        for a in actions[f.name]:
            if default is not dataclasses.MISSING:
                if isinstance(a, argparse._AppendAction):
                    default = list(default)  # argparse appends to a copy of the default
                if a.default is not None and a.default != default:
                    raise TypeError(f"'{p.prog} {_flag_name([a])}' has default {a.default!r} but {cls.__name__}."
                                    f"{f.name} = {default!r}; drop default= from the flag (the field is the default)")
                a.default = default
            if a.help == argparse.SUPPRESS:
                continue
            if a.help is None and f.name in docs:
                text = plain_text(docs[f.name], names).rstrip(".").replace("%", "%%")
                first = text.split(" ", 1)[0]
                lower = text[1:2].islower() and first not in _PROPER_NOUNS  # "Most new" -> "most new", not "lightning"
                a.help = text[:1].lower() + text[1:] if lower else text
            shown = not (default is dataclasses.MISSING or default is None or isinstance(default, bool)
                         or default in ((), []) or a.required)
            if shown and a.help is not None and "default" not in a.help:
                a.help += f" (default {', '.join(default) if isinstance(default, list) else default})"
            elif shown and a.help is None:
                a.help = f"default {default}"


def _flag_name(actions: list[argparse.Action]) -> str:
    return next((o for a in actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")), "?")
