"""Flags of ``sala train`` (and ``python -m sala.train``), one per :class:`TrainConfig` field."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file or shipped recipe name (smollm2, sala-release, tiny-cpu)")
    p.add_argument("--out", help="output directory (default: the recipe's out)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing run in --out and start over")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (checkpointed; --resume later)")
    p.add_argument("--max-minutes", type=float, help="stop at the first step end past this many minutes (checkpointed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field: model.student=DIR, data.train=[\"a.txt\"], stages.distill.tokens=2_000_000 ...")
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many steps of each stage (after 2 warm-up "
                   "steps) with torch.profiler; tables in OUT/profile-<stage>.txt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse to export a model with NaN/inf weights (default on)")
    p.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    from sala.train.trainer import TrainConfig, run_train

    from sala.train.recipe import parse_overrides

    cfg = TrainConfig(recipe=args.recipe, out=args.out, resume=args.resume, force=args.force, device=args.device,
                      max_steps=args.max_steps, max_minutes=args.max_minutes, profile_steps=args.profile_steps, quiet=args.quiet, overrides=parse_overrides(args.set),
                      check_weights=args.check_weights)
    result = run_train(cfg)
    if not args.quiet:
        state = "finished" if result.finished else "stopped (resume with --resume)"
        print(f"{result.out}: {state}", file=sys.stderr)
        for stage, ev in result.evals.items():
            line = f"  held-out ppl after {stage}: {ev.get('student_ppl', float('nan')):.3f}"
            if "teacher_ppl" in ev:
                line += f" (teacher {ev['teacher_ppl']:.3f})"
            print(line, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sala.train", description="train a converted SALA hybrid")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_train_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
