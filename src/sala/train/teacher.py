"""The frozen dense teacher: any transformers causal LM with Llama-style ``model.layers[i].self_attn`` (Llama,
Mistral, Qwen2/3, ... and SALA itself), loaded from an HF folder or a GGUF file.

Packed rows reach it as ``input_ids`` [B, T] with ``position_ids`` restarting at each document, from which
transformers builds a block-diagonal causal mask, so the teacher sees exactly the documents the student sees.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from sala.train.recipe import RecipeError, resolve_path

logger = logging.getLogger(__name__)


def gguf_location(path: Path) -> tuple[Path, str] | None:
    """(folder, file name) when ``path`` is a .gguf file or a folder holding exactly one; else None."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1 and not (path / "config.json").exists():
            raise RecipeError(f"{path} holds several GGUF files ({', '.join(p.name for p in found)}); name one")
        if len(found) == 1 and not (path / "config.json").exists():
            return path, found[0].name
    return None


def load_teacher(spec: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The teacher in ``dtype`` on ``device``, eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    import sala.model  # noqa: F401  (a SALA checkpoint can teach too)

    path = resolve_path(spec)
    if not path.exists():
        raise RecipeError(f"model.teacher: {path} does not exist")
    where = gguf_location(path)
    if where is not None:
        logger.info("teacher: dequantising GGUF %s", path)
        model = AutoModelForCausalLM.from_pretrained(where[0], gguf_file=where[1], dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise RecipeError(f"model.teacher {path}: {type(model).__name__} has no model.layers; the teacher must be a "
                          "decoder with Llama-style layers (Llama, Mistral, Qwen2/3, SALA, ...)")
    return model.to(device).eval().requires_grad_(False)


def logit_scale(model: nn.Module) -> float:
    """Multiplier on the final hidden state before the output embedding (SALA/MiniCPM divide by hidden/dim_base)."""
    divisor = getattr(model.config, "logit_divisor", None)
    return 1.0 / divisor if divisor else 1.0


@contextlib.contextmanager
def capture(model: nn.Module, attention_io: bool):
    """During a forward of ``model``: its final-norm output, and (``attention_io``) each layer's attention input
    (after the input norm) and output. Yields a dict filled by the hooks."""
    store: dict = {"x": {}, "y": {}}

    def norm_hook(_m, _args, out):
        store["hidden"] = out

    def attn_hook(i):
        def hook(_m, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = out[0] if isinstance(out, tuple) else out
            store["x"][i], store["y"][i] = x, y
        return hook

    handles = [model.model.norm.register_forward_hook(norm_hook)]
    if attention_io:
        handles += [layer.self_attn.register_forward_hook(attn_hook(i), with_kwargs=True)
                    for i, layer in enumerate(model.model.layers)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def teacher_forward(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_io: bool) -> dict:
    """input_ids, position_ids: [B, T] packed rows -> {"hidden": [B, T, d] final-norm output, "x"/"y": per layer}."""
    with capture(model, attention_io) as store:
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1)
    return store
