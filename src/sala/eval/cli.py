"""Flags of ``sala eval ppl|niah|ruler``: each flag is one field of the command's config dataclass
(:mod:`sala.eval.config`); the runner prints the table and where the reports went. Imports nothing heavy, so
``sala --help`` stays fast."""

from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", required=True,
                   help="SALA checkpoint dir, dense HF dir, .gguf file (or dir holding one), or preset (tiny, tiny-sparse, "
                        "small, minicpm-sala-9b: random weights); repeat to compare models side by side")
    g.add_argument("--compare", action="append", help="another model for the same table and figure (repeatable)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
    g.add_argument("--model-seed", type=int, help="seed of a preset's random weights")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--max-positions", type=int, help="raise max_position_embeddings: SALA (RoPE is analytic), or a "
                   "dense model with plain RoPE (extrapolated past its window)")
    g.add_argument("--chunk", type=int, help="prefill chunk in tokens")
    g.add_argument("--gpu-mem", type=float, help="memory budget in GiB for the SALA memory-plan check (default: the GPU's)")
    g.add_argument("--out", help="report directory (default out/eval/<command>)")
    g.add_argument("--force", action="store_true", help="write into an --out holding other files (they are kept)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def _ppl_flags(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--text", required=True, help="text file to score")
    p.add_argument("--context", help="comma-separated context lengths, e.g. 2K,8K")
    p.add_argument("--stride", type=int, help="window step; later windows score only their last STRIDE tokens "
                                              "(default: the context, non-overlapping windows)")
    p.add_argument("--batch", type=int, help="windows per forward pass")
    p.add_argument("--max-windows", type=int, help="score at most this many windows per context")
    _tie(p, "PplConfig")


def _niah_flags(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--haystack", required=True, help="text file of real prose to hide the needle in")
    p.add_argument("--lengths", help="context lengths in model tokens")
    p.add_argument("--depths", help="needle depths in percent")
    p.add_argument("--samples", type=int, help="needles per grid cell")
    p.add_argument("--seed", type=int, help="seed of needles and haystack offsets")
    p.add_argument("--max-new-tokens", type=int, help="answer tokens, greedy")
    p.add_argument("--no-chat-template", action="store_true", help="plain Question/Answer prompts")
    _tie(p, "NiahConfig")


def _ruler_flags(p: argparse.ArgumentParser) -> None:
    from sala.eval.ruler import TASKS

    _common(p)
    p.add_argument("--lengths", help="sequence lengths in model tokens")
    p.add_argument("--tasks", help=f"comma-separated tasks or all: {', '.join(TASKS)}")
    p.add_argument("--samples", type=int, help="samples per task and length")
    p.add_argument("--seed", type=int, help="seed of the generated samples")
    p.add_argument("--haystack", help="essay text for the essay-haystack NIAH tasks (skipped without it)")
    p.add_argument("--max-new-tokens", type=int, help="cap on answer tokens (default: each task's RULER budget)")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts")
    _tie(p, "RulerConfig")


def _fill(cls, args: argparse.Namespace):
    from sala.utils.fields import config_from_args

    return config_from_args(cls, args)


def _tie(p: argparse.ArgumentParser, name: str) -> None:
    """Defaults and missing help from the config dataclass (:func:`sala.utils.fields.flags_from_config`)."""
    from sala.eval import config
    from sala.utils.fields import flags_from_config

    flags_from_config(p, getattr(config, name))


def _run(kind: str):
    def run(args: argparse.Namespace) -> int:
        from sala.eval import config, niah, ppl, ruler

        cls, fn = {"ppl": (config.PplConfig, ppl.run_ppl), "niah": (config.NiahConfig, niah.run_niah),
                   "ruler": (config.RulerConfig, ruler.run_ruler)}[kind]
        report = fn(_fill(cls, args))
        print(report["table"])
        for label, m in report["models"].items():
            if "prompt_format" in m:
                print(f"{label}: prompts use the {m['prompt_format']}")
        print(f"reports in {report['out']}", file=sys.stderr)
        return 0

    return run


EVAL_COMMANDS = {
    "ppl": ("perplexity at several context lengths (windows batched, chunked prefill)", _ppl_flags),
    "niah": ("needle in a haystack: accuracy over context length x depth, heatmap", _niah_flags),
    "ruler": ("RULER synthetic tasks (NIAH variants, variable tracking, CWE, FWE), offline", _ruler_flags),
}


def add_eval_subcommands(p: argparse.ArgumentParser) -> None:
    """``sala eval`` -> ``ppl | niah | ruler``, each with its flags and runner."""
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    for name, (help_, flags) in EVAL_COMMANDS.items():
        q = sub.add_parser(name, help=help_, description=help_)
        flags(q)
        q.set_defaults(func=_run(name))
