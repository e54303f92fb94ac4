"""Low-rank adapters (LoRA) whose trained delta is a compact, sharded safetensors file.

The official key layout stays intact: a wrapped ``model.layers.3.self_attn.q_proj`` keeps its ``weight`` (and
``bias``) Parameter objects where they were and gains ``lora_A`` [r, in] and ``lora_B`` [out, r] next to them
(``...q_proj.lora_A``). Wrapping builds a new :class:`LoRALinear` that *shares* the base Parameters and sets it
on the parent module, so optimizers, FSDP2 and ``load_state_dict`` keep seeing the same base tensors, and
:func:`merge_lora` leaves ``model.state_dict()`` with exactly the official keys again.

A delta directory (``save_delta`` / ``load_delta``)::

    delta.json                      rank, alpha, targets, layers, rank_overrides, base_fingerprint, dtype,
                                    modules (wrapped names), extra_names, weight_map (tensor -> file)
    delta-00001-of-0000N.safetensors   lora_A/lora_B of every wrapped Linear + the full ``extra_names`` tensors

Adapters are created in the base weight's dtype (the trainer keeps fp32 master weights; FSDP2 wants one dtype
per group). Inference note: ``SALAForCausalLM.fuse_projections`` (called by the engine) must not run on a model
with unmerged adapters, since the fused GEMM reads only the base weights; merge first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from sala.utils.fs import atomic_dir

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "apply_lora",
    "load_delta",
    "lora_state_dict",
    "merge_lora",
    "model_fingerprint",
    "save_delta",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "z_proj", "o_gate", "gate_proj", "up_proj", "down_proj")
# Output-gate projections a SALA config may switch off (use_output_gate / attn_use_output_gate): asking for them
# on a model without them is not an error, they are skipped with a log line.
OPTIONAL_TARGETS = frozenset({"z_proj", "o_gate"})
DELTA_FORMAT = "sala-lora-delta"
DELTA_VERSION = 1
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SETTINGS_ATTR = "_sala_lora_settings"  # what apply_lora was called with, read by save_delta


class LoRALinear(nn.Linear):
    """``y = F.linear(x, W, b) + (dropout(x) @ A^T @ B^T) * alpha / r``, sharing ``W``/``b`` with ``base``.

    lora_A: [r, in] (kaiming-uniform, as peft); lora_B: [out, r] (zeros, so the output is unchanged at start).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        # build on meta (no allocation), then point at the base's own Parameter objects
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.base_requires_grad = (base.weight.requires_grad,
                                   None if base.bias is None else base.bias.requires_grad)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        if w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # scale the [..., r] side: r << out
        return out + F.linear(low, self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _num_layers(model: nn.Module) -> int:
    idx = [i for n, _ in model.named_modules() if (i := _layer_index(n + ".")) is not None]
    return max(idx) + 1 if idx else 0


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               layers: Iterable[int] | None = None, rank_overrides: Mapping[str, int] | None = None,
               dropout: float = 0.0) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets`` (in ``layers``; None: all) by a
    :class:`LoRALinear` sharing its weight, and freeze that weight (and bias). Other parameters keep their
    ``requires_grad``: which extras train is the trainer's choice. -> qualified names wrapped, in model order.

    rank_overrides: per target name, e.g. ``{"z_proj": 64}``. ``z_proj``/``o_gate`` absent from the model (output
    gates switched off) are skipped; any other name that matches no Linear is a ValueError.
    """
    if isinstance(targets, str):
        raise TypeError(f"targets must be a sequence of names, got the string {targets!r}")
    targets = tuple(targets)
    rank_overrides = dict(rank_overrides or {})
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not targets:
        raise ValueError("targets is empty: name at least one linear layer (q_proj, ...)")
    for name, r in rank_overrides.items():
        if name not in targets:
            raise ValueError(f"rank_overrides[{name!r}]: {name!r} is not one of targets {list(targets)}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"rank_overrides[{name!r}] must be an integer >= 1, got {r!r}")
    if existing := _lora_modules(model):
        raise ValueError(f"model already has LoRA adapters ({existing[0][0]}, ...): apply_lora runs once; "
                         f"merge_lora first, or load into a fresh base model")
    n_layers = _num_layers(model)
    layer_set = None if layers is None else sorted(set(int(i) for i in layers))
    if layer_set is not None and (not layer_set or layer_set[0] < 0 or layer_set[-1] >= n_layers):
        raise ValueError(f"layers must be non-empty indices in [0, {n_layers}), got {layer_set}")

    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    present = {n.rpartition(".")[2] for n, _ in linears}
    for name in targets:
        if name not in present:
            if name in OPTIONAL_TARGETS:
                logger.info("LoRA: no %s in this model (output gate off); skipping that target", name)
                continue
            raise ValueError(f"unknown LoRA target {name!r}: no nn.Linear of that name in the model; "
                             f"linear layers here: {sorted(present)}")
    chosen = [(n, m) for n, m in linears if n.rpartition(".")[2] in targets
              and (layer_set is None or _layer_index(n) in layer_set)]
    if not chosen:
        raise ValueError(f"no Linear matches targets {list(targets)} in layers {layer_set}")
    for name, base in chosen:
        r = rank_overrides.get(name.rpartition(".")[2], rank)
        _set_submodule(model, name, LoRALinear(base, r, alpha, dropout))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
    setattr(model, _SETTINGS_ATTR, dict(rank=rank, alpha=float(alpha), targets=list(targets), layers=layer_set,
                                         rank_overrides=rank_overrides))
    n_params = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in _lora_modules(model))
    logger.info("LoRA: wrapped %d linear layers (rank %d, alpha %g), %.2fM adapter parameters",
                len(chosen), rank, alpha, n_params / 1e6)
    return [n for n, _ in chosen]


def _unwrap(model: nn.Module, merge: bool) -> None:
    """Replace each LoRALinear by a plain nn.Linear holding the same Parameters (``merge``: W += B A * scale)."""
    for name, m in _lora_modules(model):
        if merge:
            with torch.no_grad():  # fp32 product and sum, one rounding back to W's dtype
                w = m.weight
                w.copy_(w.float().addmm_(m.lora_B.float(), m.lora_A.float(), alpha=m.scaling))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        m.weight.requires_grad_(m.base_requires_grad[0])
        if m.bias is not None:
            m.bias.requires_grad_(m.base_requires_grad[1])
        _set_submodule(model, name, plain)
    if hasattr(model, _SETTINGS_ATTR):
        delattr(model, _SETTINGS_ATTR)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (``W += B @ A * alpha / r`` in fp32, cast back) and put plain
    ``nn.Linear`` modules back (same weight Parameters, ``requires_grad`` as before ``apply_lora``), so
    ``model.state_dict()`` has exactly the official keys."""
    if not _lora_modules(model):
        raise ValueError("model has no LoRA adapters to merge")
    _unwrap(model, merge=True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: ``{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}`` (detached)."""
    return {f"{n}.{p}": getattr(m, p).detach() for n, m in _lora_modules(model) for p in ("lora_A", "lora_B")}


# ---------------------------------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------------------------------
def model_fingerprint(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """16 hex chars of sha256 over each base tensor's name, shape and first/last 64 values.

    Adapter tensors (``lora_A``/``lora_B``) are left out, so a freshly wrapped model keeps its base's fingerprint.
    Values are rounded to bf16 first: the same checkpoint in fp32 or bf16 has one fingerprint. Take it before
    training when extras (norms) train too, since those change.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        if name.endswith((".lora_A", ".lora_B")):
            continue
        t = state[name]
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (load the weights first)")
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]) if flat.numel() > 128 else flat
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).float()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(sample.cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# delta files
# ---------------------------------------------------------------------------------------------------------------
def _header_bytes(name: str, t: torch.Tensor) -> int:
    """Upper bound on one tensor's entry in a safetensors JSON header."""
    return len(name) + 64 + 24 * (t.dim() + 2)


def _shard(tensors: dict[str, torch.Tensor], max_file_bytes: int) -> list[list[str]]:
    """Greedy, in name order: a new file whenever the next tensor would push this one past ``max_file_bytes``."""
    shards: list[list[str]] = []
    size = 0
    for name, t in tensors.items():
        need = t.numel() * t.element_size() + _header_bytes(name, t)
        if need + 64 > max_file_bytes:
            raise ValueError(f"tensor {name} {tuple(t.shape)} needs ~{need} bytes, over max_file_bytes="
                             f"{max_file_bytes}; raise max_file_bytes")
        if not shards or size + need > max_file_bytes:
            shards.append([])
            size = 64  # header length prefix, braces, padding
        shards[-1].append(name)
        size += need
    return shards


def save_delta(path: str | os.PathLike, model: nn.Module, *, extra_names: Iterable[str], base_fingerprint: str,
               dtype: torch.dtype = torch.bfloat16, max_file_bytes: int = 16 * 2**20,
               overwrite: bool = False) -> list[Path]:
    """Write the trained delta (adapters + the full ``extra_names`` tensors) as sharded safetensors plus
    ``delta.json``, atomically: into a temp dir beside ``path``, then renamed into place. An existing ``path``
    is replaced only with ``overwrite`` (``--force``). Floating tensors are stored as ``dtype``.
    -> the written files (shards, then delta.json) at their final location.
    """
    path = Path(path)
    settings = getattr(model, _SETTINGS_ATTR, None)
    if settings is None or not _lora_modules(model):
        raise ValueError("model has no LoRA adapters: call apply_lora before training and save_delta")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --force (overwrite=True) to replace it")
    state = model.state_dict()
    extra_names = list(dict.fromkeys(extra_names))
    lora = lora_state_dict(model)
    for name in extra_names:
        if name not in state:
            raise ValueError(f"extra tensor {name!r} is not in the model's state_dict")
        if name in lora:
            raise ValueError(f"extra tensor {name!r} is an adapter tensor; list only non-LoRA tensors in extra_names")
    tensors = {}
    for name in sorted([*lora, *extra_names]):
        t = lora[name] if name in lora else state[name]
        # copy=True: a fresh CPU tensor even when no cast is needed (safetensors refuses shared storage)
        tensors[name] = t.detach().to("cpu", dtype=dtype if t.is_floating_point() else t.dtype, copy=True).contiguous()
    shards = _shard(tensors, max_file_bytes)
    n = len(shards)
    files = [f"delta-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = dict(format=DELTA_FORMAT, version=DELTA_VERSION, **settings, base_fingerprint=base_fingerprint,
                dtype=str(dtype).removeprefix("torch."), modules=[nm for nm, _ in _lora_modules(model)],
                extra_names=extra_names, weight_map={t: f for f, names in zip(files, shards) for t in names})

    # a temporary sibling renamed into place; an overwrite replaces the delta's own files and keeps any other file
    # in the folder (it used to delete the whole folder)
    with atomic_dir(path, force=True) as tmp:
        for f, names in zip(files, shards):
            save_file({t: tensors[t] for t in names}, str(tmp / f), metadata={"format": "pt"})
            size = (tmp / f).stat().st_size
            assert size <= max_file_bytes, f"{f}: {size} bytes > {max_file_bytes} (header estimate too small)"
        (tmp / "delta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("saved LoRA delta: %d tensors, %.1f MB in %d file(s) -> %s", len(tensors),
                sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6, n, path)
    return [path / f for f in files] + [path / "delta.json"]


def _read_delta(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta_file = path / "delta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no delta.json in {path}: not a LoRA delta directory (see save_delta)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != DELTA_FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {DELTA_FORMAT!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(set(meta["weight_map"].values())):
        if not (path / f).is_file():
            raise ValueError(f"delta shard {f} listed in delta.json is missing from {path}")
        with safe_open(str(path / f), framework="pt") as sf:
            for k in sf.keys():
                if meta["weight_map"].get(k) != f:
                    raise ValueError(f"tensor {k} in {f} is not mapped to that file in delta.json")
                tensors[k] = sf.get_tensor(k)
    if missing := sorted(set(meta["weight_map"]) - set(tensors)):
        raise ValueError(f"delta.json lists tensors no shard holds: {missing[:5]}")
    return meta, tensors


def load_delta(path: str | os.PathLike, model: nn.Module, *, expected_fingerprint: str | None = None) -> dict:
    """Apply a saved delta to a base model in place: adapters with the recorded settings, then every tensor.

    The base is checked first: ``expected_fingerprint`` (the caller's own fingerprint of ``model``, e.g. when
    its weights are sharded) or else ``model_fingerprint(model)`` must equal the recorded ``base_fingerprint``.
    Strict: a missing, unexpected or wrongly shaped tensor is a ValueError naming it, and the model is left
    unwrapped. -> the delta.json metadata.
    """
    path = Path(path)
    meta, tensors = _read_delta(path)
    have = expected_fingerprint if expected_fingerprint is not None else model_fingerprint(model)
    if have != meta["base_fingerprint"]:
        raise ValueError(f"delta {path} belongs to the base model with fingerprint {meta['base_fingerprint']}, "
                         f"but this model's fingerprint is {have}; load the base it was trained on")
    state = model.state_dict()
    for name in meta["extra_names"]:
        if name not in state:
            raise ValueError(f"delta tensor {name} has no counterpart in the model")
    wrapped = apply_lora(model, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"],
                         layers=meta["layers"], rank_overrides=meta["rank_overrides"])
    try:
        if meta.get("modules") is not None and wrapped != meta["modules"]:
            diff = sorted(set(wrapped) ^ set(meta["modules"]))
            raise ValueError(f"the recorded settings wrap other modules here than at save time: {diff[:5]}")
        targets = {**lora_state_dict(model), **{n: state[n] for n in meta["extra_names"]}}
        if missing := sorted(set(targets) - set(tensors)):
            raise ValueError(f"delta {path} lacks tensor(s) {missing[:5]}")
        if extra := sorted(set(tensors) - set(targets)):
            raise ValueError(f"delta {path} has unexpected tensor(s) {extra[:5]}")
        for name, t in tensors.items():
            if t.shape != targets[name].shape:
                raise ValueError(f"delta tensor {name} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(targets[name].shape)}")
    except Exception:  # leave the model as it came: unwrapped, weights untouched
        _unwrap(model, merge=False)
        raise
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)  # casts to the parameter's dtype and device
    logger.info("loaded LoRA delta %s: %d modules, %d extra tensors", path, len(wrapped), len(meta["extra_names"]))
    return meta
