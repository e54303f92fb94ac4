"""FP8 (e4m3) weight quantisation of a loaded model for inference: each decoder layer's projections become
:class:`FP8Linear` (fp8 weight, one fp32 scale per output channel, activations quantised per token on the fly).

Only the projections inside the decoder layers' ``self_attn`` and ``mlp`` are replaced (q/k/v/o, ``z_proj``,
``o_gate``, gate/up/down): they hold almost all of the weights and read normed activations. Embeddings, norms and
``lm_head`` stay in the model's dtype (the logits are the most rounding-sensitive GEMM; a tied head shares the
embedding anyway).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from sala.ops.fp8 import FP8_DTYPE, fp8_linear, quantize_fp8_weight

__all__ = ["FP8Linear", "quantize_fp8_"]


class FP8Linear(nn.Module):
    """Inference-only stand-in for ``nn.Linear``: ``y = x @ (weight * weight_scale[:, None])^T + bias``, computed by
    :func:`sala.ops.fp8_linear` (x quantised to e4m3 per token, one fp8 GEMM where the device has one).

    Buffers (saved in ``state_dict`` under the Linear's names plus ``weight_scale``): ``weight`` [out, in]
    float8_e4m3fn, ``weight_scale`` [out] float32, ``bias`` [out] (the model's dtype) or None. Casting the model
    (``.to(dtype)``, ``.half()``) moves these two buffers but keeps their dtypes (only ``bias`` follows), since a
    cast would turn the fp8 codes into unscaled floats. The output has x's dtype.
    """

    _FIXED = ("weight", "weight_scale")
    """Buffers whose dtype is part of the format: device moves only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantise ``linear``'s weight per output channel (absmax / 448); the bias is copied unchanged."""
        w = linear.weight.detach()
        has_bias = linear.bias is not None
        m = cls(linear.in_features, linear.out_features, bias=has_bias, device=w.device,
                bias_dtype=linear.bias.dtype if has_bias else torch.float32)
        q, scale = quantize_fp8_weight(w)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if has_bias:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] fp16/bf16/fp32 -> [..., out] in x's dtype."""
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "weight=float8_e4m3fn per-channel, activations=per-token")

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self._FIXED}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a dtype cast: keep the original, on the device the cast went to
                self._buffers[name] = old.to(new.device)
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # copy_ would silently cast an unquantised checkpoint's bf16 weight to fp8 codes without a scale
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != FP8_DTYPE:
            error_msgs.append(f"{prefix}weight: FP8Linear loads float8_e4m3fn weights (a state_dict of a model "
                              f"quantised by quantize_fp8_); got {w.dtype}. Load the checkpoint first, then quantise.")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _decoder_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(prefix, layer) for each decoder layer: ``model.model.layers`` (causal LM) or ``model.layers`` (base)."""
    for prefix, owner in (("model.layers", getattr(model, "model", None)), ("layers", model)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return [(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]
    raise ValueError(f"quantize_fp8_ wants a SALA model (SALAForCausalLM or SALAModel) with decoder layers; got "
                     f"{type(model).__name__}")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """``name`` matches an entry of ``skip``: the whole name, a dotted component, or a dotted suffix/prefix."""
    return any(s == name or s in name.split(".") or name.endswith("." + s) or name.startswith(s + ".")
               for s in skip)


@torch.no_grad()
def quantize_fp8_(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of each decoder layer's ``self_attn`` and ``mlp`` by an
    :class:`FP8Linear`; returns the replaced modules' names (``model.layers.0.self_attn.q_proj``, ...).

    ``skip``: names (whole, a dotted component such as ``"o_proj"``, or a dotted suffix) left unquantised.
    Projections fused for inference (``fuse_projections()``) are unfused first: their concatenated block is dropped
    and each Linear computed on its own (a later ``fuse_projections()`` leaves FP8Linear groups unfused). A Linear
    subclass (an adapter) is refused: merge it first, its extra terms would be lost.
    """
    skip = tuple(skip)
    replaced: list[str] = []
    for prefix, layer in _decoder_layers(model):
        for block_name in ("self_attn", "mlp"):
            block = getattr(layer, block_name, None)
            if block is None:
                continue
            if getattr(block, "_fused", None) is not None:
                block._fused = None  # the FusedLinears block would keep serving the unquantised weights
            for child_name, child in list(block.named_children()):
                full = f"{prefix}.{block_name}.{child_name}"
                if not isinstance(child, nn.Linear) or _skipped(full, skip):
                    continue
                if type(child) is not nn.Linear:
                    raise ValueError(f"quantize_fp8_: {full} is a {type(child).__name__} (an nn.Linear subclass, "
                                     "e.g. an adapter); merge it into a plain Linear before quantising")
                setattr(block, child_name, FP8Linear.from_linear(child))
                replaced.append(full)
    return replaced
