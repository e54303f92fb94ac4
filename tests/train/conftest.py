"""Fixtures for trainer tests: a tiny random Llama teacher, its SALA conversion, text files, and a helper that runs
the tiny-cpu recipe in this process on them. Nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sala.convert.default_text import DEFAULT_TEXT
from tests.convert.convert_sources import hf_source


def convert(teacher: Path, out: Path) -> Path:
    """``sala convert`` of ``teacher`` (layers 0 and 3 stay softmax attention, 1 and 2 become Lightning)."""
    from sala.convert.pipeline import ConvertConfig, run_convert

    run_convert(ConvertConfig(source=str(teacher), out=str(out), sparse_layers=(0, 3)))
    return out


@dataclass
class Tiny:
    root: Path
    teacher: Path
    student: Path
    train: Path
    heldout: Path

    def overrides(self, **extra: str) -> dict[str, str]:
        """--set values pointing tiny-cpu at these files, plus ``extra`` (keys with ``__`` for dots)."""
        base = {"model.student": str(self.student), "model.teacher": str(self.teacher),
                "data.train": json.dumps([str(self.train)]), "data.heldout": str(self.heldout)}
        return {**base, **{k.replace("__", "."): str(v) for k, v in extra.items()}}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """Teacher (tiny random Llama, 4 layers, vocab 320), its conversion and ~7.8k tokens of training text in 18
    documents separated by form feeds; the held-out text is another paragraph."""
    root = tmp_path_factory.mktemp("tiny_train")
    teacher = hf_source(root / "teacher", "llama")
    student = convert(teacher, root / "student")
    paras = [p for p in DEFAULT_TEXT.split("\n\n") if p.strip()]
    (root / "train.txt").write_text("\n\f\n".join(paras[:-1] * 3))  # a line holding only \f ends a document
    (root / "heldout.txt").write_text(paras[-1] * 3)
    return Tiny(root, teacher, student, root / "train.txt", root / "heldout.txt")


@pytest.fixture(scope="session")
def other_student(tmp_path_factory) -> Path:
    """A conversion of another random teacher (seed 1): same shapes, different weights and fingerprint."""
    root = tmp_path_factory.mktemp("other_student")
    return convert(hf_source(root / "teacher", "llama", seed=1), root / "student")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the CI box is small and shared, and oversubscribed OpenMP threads make these tiny runs
    tens of times slower. Module scope, so module fixtures (the reference run) get it too (autouse runs first in its
    scope): runs compared with each other must use the same thread count to be bitwise equal."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def records(out: Path) -> dict[tuple[str, int], dict]:
    """metrics.jsonl of a run by (stage, step); a step logged twice (a resume) keeps its last record."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {(r["stage"], r["step"]): r for r in map(json.loads, filter(None, lines))}
