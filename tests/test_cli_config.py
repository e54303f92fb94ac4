"""CLI flags come from the config dataclasses: one default, help from the field docstrings, no field without a flag
(issue 14 items 5 and 6)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sala import cli
from sala.utils.fields import config_from_args, flags_from_config
from sala.utils.fields import field_docs, plain_text


def _subparsers(parser: argparse.ArgumentParser, path=()):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield path + (name,), sp
                yield from _subparsers(sp, path + (name,))


def _configs():
    from sala.convert import ConvertConfig, SelectConfig
    from sala.demo.config import DemoConfig
    from sala.engine.bench import E2EConfig
    from sala.engine.commands import ChatConfig, GenerateConfig, InfoConfig, PlanConfig, ServeConfig
    from sala.eval.config import NiahConfig, PplConfig, RulerConfig

    return [  # (argv with the required flags, config class, the same required values as fields)
        (["info"], InfoConfig, {}),
        (["plan", "--model", "tiny"], PlanConfig, dict(model="tiny")),
        (["generate"], GenerateConfig, {}),
        (["chat"], ChatConfig, {}),
        (["serve"], ServeConfig, {}),
        (["select-layers", "--from", "SRC"], SelectConfig, dict(source="SRC")),
        (["convert", "--from", "SRC", "--out", "OUT", "--sparse-layers", "0,3"], ConvertConfig,
         dict(source="SRC", out="OUT", sparse_layers=(0, 3))),
        (["demo"], DemoConfig, {}),
        (["bench", "demo"], DemoConfig, {}),
        (["bench", "e2e"], E2EConfig, {}),
        (["eval", "ppl", "--model", "tiny", "--text", "T"], PplConfig, dict(model=["tiny"], text="T")),
        (["eval", "niah", "--model", "tiny", "--haystack", "H"], NiahConfig, dict(model=["tiny"], haystack="H")),
        (["eval", "ruler", "--model", "tiny"], RulerConfig, dict(model=["tiny"])),
    ]


@pytest.mark.parametrize("argv, cls, required", _configs(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_flag_defaults_are_the_config_defaults(argv, cls, required):
    """Defaults were written twice: `sala chat` defaulted to 1024 tokens but ChatConfig to 128, `sala serve` to
    batch 8 but ServeConfig to 1. Now the dataclass is the only default."""
    args = cli.build_parser().parse_args(argv)
    got = config_from_args(cls, args)
    want = cls(**required)
    for f in dataclasses.fields(cls):
        if f.init:
            assert getattr(got, f.name) == getattr(want, f.name), f"{' '.join(argv)}: --{f.name}"


def test_command_defaults_differ_where_meant():
    from sala.engine.commands import ChatConfig, GenerateConfig, ServeConfig

    assert (ChatConfig().max_tokens, GenerateConfig().max_tokens) == (1024, 128)
    assert (ServeConfig().batch, GenerateConfig().batch) == (8, 1)


def test_every_flag_has_help():
    """40 of 103 flags had no help text although the dataclasses document them."""
    subparsers = list(_subparsers(cli.build_parser()))
    missing = [f"sala {' '.join(path)} {a.option_strings[-1]}" for path, sp in subparsers
               for a in sp._actions if a.option_strings and a.help is None]
    assert missing == []
    for _, sp in subparsers:  # and argparse can render every page (a stray % in a docstring would raise)
        assert sp.format_help()


def test_help_is_the_field_docstring_and_shows_the_default():
    from sala.convert import SelectConfig

    parser = cli.build_parser()
    sub = dict(_subparsers(parser))[("select-layers",)]
    [lr] = [a for a in sub._actions if a.dest == "lr"]
    assert lr.help == plain_text(field_docs(SelectConfig)["lr"]).rstrip(".").replace("Peak", "peak") + " (default 0.001)"
    [num] = [a for a in sub._actions if a.dest == "num_sparse"]
    assert "--sparse-fraction" in num.help  # ``sparse_fraction`` in the docstring names the flag
    text = sub.format_help()  # argparse can render every help (a stray % would raise here)
    assert "(default 200)" in text


def test_fill_refuses_a_field_without_a_flag():
    """`_fill` skipped fields without a flag: the user's value never reached the config."""
    @dataclasses.dataclass
    class Cfg:
        a: int = 1
        b: int = 2

    with pytest.raises(TypeError, match=r"Cfg fields \['b'\] have no flag"):
        config_from_args(Cfg, argparse.Namespace(a=5))


def test_from_config_catches_drift():
    @dataclasses.dataclass
    class Cfg:
        steps: int = 10
        """Steps."""
        seed: int = 0

    p = argparse.ArgumentParser(prog="sala x")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int)
    with pytest.raises(TypeError, match=r"'sala x --steps' has default 20 but Cfg.steps = 10"):
        flags_from_config(p, Cfg)
    p = argparse.ArgumentParser(prog="sala x")
    p.add_argument("--steps", type=int)
    with pytest.raises(TypeError, match=r"Cfg.seed has no flag in 'sala x'"):
        flags_from_config(p, Cfg)
    p.add_argument("--seed", type=int)
    flags_from_config(p, Cfg)
    assert p.parse_args([]).steps == 10 and "steps (default 10)" in p.format_help()


def test_demo_help_shows_the_full_and_quick_values_from_one_table():
    """The demo's help repeated FULL / QUICK of sala.demo.config by hand."""
    from sala.demo.config import FULL, QUICK

    sub = dict(_subparsers(cli.build_parser()))[("demo",)]
    helps = {a.dest: a.help for a in sub._actions}
    def shown(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    for name in FULL:
        assert f"(default {shown(FULL[name])}; --quick {shown(QUICK[name])})" in helps[name]
