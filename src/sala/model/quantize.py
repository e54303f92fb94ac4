"""FP8 (e4m3) weight quantisation of a loaded model for inference: each decoder layer's projections become
:class:`FP8Linear` (fp8 weight with fp32 scales per output channel or per channel and group of input features;
activations quantised on the fly with the same layout).

Three ways in: :func:`quantize_fp8_` on a loaded model; ``from_pretrained(..., quantization_config=FP8Config())``
(quantise at load); a checkpoint saved after either, whose ``config.json`` carries the ``quantization_config`` and
whose safetensors hold the fp8 codes and scales (loaded as they are). Rounding is to nearest, or GPTQ with
calibration inputs (:func:`quantize_fp8_` ``calibration=``): each layer's rounding error is folded into the columns
not yet rounded, weighted by the layer's input statistics, layer after layer.

Only the projections inside the decoder layers' ``self_attn`` and ``mlp`` are replaced (q/k/v/o, ``z_proj``,
``o_gate``, gate/up/down): they hold almost all of the weights and read normed activations. Embeddings, norms and
``lm_head`` stay in the model's dtype (the logits are the most rounding-sensitive GEMM; a tied head shares the
embedding anyway).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sala.model.fused import FusedRows
from sala.ops.fp8 import FP8_DTYPE, check_group_size, fp8_glue_linear, fp8_linear, num_groups, quantize_fp8_weight
from sala.ops.fp8.naive import gptq_fp8_weight
from sala.utils.progress import counter

__all__ = ["FP8Config", "FP8Linear", "QUANT_METHOD", "quantize_fp8_"]

QUANT_METHOD = "sala_fp8"
DEFAULT_GROUP_SIZE = 128


class FP8Linear(nn.Module):
    """Inference-only stand-in for ``nn.Linear``: ``y = x @ (weight * weight_scale[:, None])^T + bias``, computed by
    :func:`sala.ops.fp8_linear` (x quantised to e4m3 per token, one fp8 GEMM where the device has one).

    Buffers (saved in ``state_dict`` under the Linear's names plus ``weight_scale``): ``weight`` [out, in]
    float8_e4m3fn, ``weight_scale`` [out] (row-wise, ``group_size=None``) or [out, ceil(in / group_size)] float32,
    ``bias`` [out] (the model's dtype) or None. Casting the model (``.to(dtype)``) moves these two buffers but
    keeps their dtypes (only ``bias`` follows), since a cast would turn the fp8 codes into unscaled floats; a model
    loaded quantised through transformers refuses ``.half()``/``.float()`` (transformers' rule for quantised
    models): use ``.to(dtype)``. The output has x's dtype.
    """

    _FIXED = ("weight", "weight_scale")
    """Buffers whose dtype is part of the format: device moves only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32,
                 group_size: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = check_group_size(group_size)
        scale_shape = (out_features,) if group_size is None else (out_features, num_groups(in_features, group_size))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None,
                    hessian: torch.Tensor | None = None) -> "FP8Linear":
        """Quantise ``linear``'s weight (scales absmax / 448 per output channel, or per channel and group of
        ``group_size`` input features); with ``hessian`` [in, in] (X^T X of calibration inputs) by GPTQ, else to
        nearest. The bias is copied unchanged."""
        w = linear.weight.detach()
        has_bias = linear.bias is not None
        m = cls(linear.in_features, linear.out_features, bias=has_bias, device=w.device,
                bias_dtype=linear.bias.dtype if has_bias else torch.float32, group_size=group_size)
        if hessian is None:
            q, scale = quantize_fp8_weight(w, group_size)
        else:
            q, scale = gptq_fp8_weight(w, hessian.to(w.device), group_size)
            scale = scale[:, 0] if group_size is None else scale
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if has_bias:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] fp16/bf16/fp32 -> [..., out] in x's dtype."""
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype, group_size=self.group_size)

    def glued(self, op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``self(glue(a, b))`` for an elementwise glue ``op`` ("silu_mul", "sigmoid_gate"), the same numbers; a
        prefill's activation quantisation computes the glue itself (see :func:`sala.ops.fp8.fp8_glue_linear`)."""
        return fp8_glue_linear(op, a, b, self.weight, self.weight_scale, self.bias, group_size=self.group_size)

    def extra_repr(self) -> str:
        layout = ("per-channel, activations per-token" if self.group_size is None
                  else f"groups of {self.group_size} (activations too)")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=float8_e4m3fn {layout}")

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
        scale = state_dict.get(prefix + "weight_scale")
        if scale is not None and scale.shape != self.weight_scale.shape:
            layout = "row-wise" if self.group_size is None else f"group_size={self.group_size}"
            error_msgs.append(f"{prefix}weight_scale: this FP8Linear ({layout}) wants scales "
                              f"{list(self.weight_scale.shape)}; the checkpoint has {list(scale.shape)} (quantised with "
                              "another group_size?)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class FusedFP8Linears(FusedRows):
    """Inference: several :class:`FP8Linear` reading the same input as one fp8 GEMM (see
    :class:`sala.model.fused.FusedRows`). Scales are per output row, so they concatenate like the codes; each
    module's buffers are re-pointed at the views. The input is quantised once instead of once per projection."""

    MODULE = FP8Linear
    TENSORS = ("weight", "weight_scale", "bias")

    def _point(self, module: nn.Module, name: str, view: torch.Tensor) -> None:
        module._buffers[name] = view

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.blocks["weight"], self.blocks["weight_scale"], self.blocks["bias"],
                          out_dtype=x.dtype, group_size=self.modules[0].group_size)

    @classmethod
    def fusable(cls, modules: list[nn.Module]) -> bool:
        """FP8Linear modules with one group size and input width (and one dtype and device per tensor)."""
        return super().fusable(modules) and len({(m.group_size, m.in_features) for m in modules}) == 1


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


def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[int, str, nn.Module, str, nn.Linear]]:
    """(layer index, full name, owning block, attribute, Linear) of every Linear quantize_fp8_ replaces, layer by
    layer. Fused projection blocks are dropped first (they would keep serving the unquantised weights)."""
    out = []
    for index, (prefix, layer) in enumerate(_decoder_layers(model)):
        for block_name in ("self_attn", "mlp"):
            block = getattr(layer, block_name, None)
            if block is None:
                continue
            if getattr(block, "_fused", None) is not None:
                block._fused = None
            for child_name, child in list(block.named_children()):
                full = f"{prefix}.{block_name}.{child_name}"
                if not isinstance(child, nn.Linear) or _skipped(full, skip):
                    continue
                if type(child) is not nn.Linear:
                    raise ValueError(f"quantize_fp8_: {full} is a {type(child).__name__} (an nn.Linear subclass, "
                                     "e.g. an adapter); merge it into a plain Linear before quantising")
                out.append((index, full, block, child_name, child))
    return out


class _LayerDone(Exception):
    """Raised by a hook at the first decoder layer's input: calibration needs the model only up to there."""


@torch.no_grad()
def _first_layer_inputs(model: nn.Module, first: nn.Module, calibration: list[torch.Tensor]) -> list[list]:
    """The positional arguments ``(h, pending, layout, rope, cache)`` the first decoder layer gets for each
    calibration batch (the embedding and layout work of the model's own forward, nothing after it)."""
    captured: list[list] = []

    def grab(module, args):
        captured.append(list(args))
        raise _LayerDone

    handle = first.register_forward_pre_hook(grab)
    try:
        for ids in calibration:
            try:
                model(input_ids=ids, use_cache=False)
            except _LayerDone:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def _layer_hessians(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[list]) -> dict[str, torch.Tensor]:
    """X^T X / rows [in, in] (fp32) of each Linear's inputs while ``layer`` runs on each batch's ``inputs``; Linears
    reading the same tensor (q/k/v/gate, gate/up) share one product per batch."""
    sums = {name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)
            for name, lin in linears.items()}
    rows = {name: 0 for name in linears}
    seen: dict[str, torch.Tensor] = {}

    def collect(name):
        def hook(module, args, output):
            seen[name] = args[0]
        return hook

    handles = [lin.register_forward_hook(collect(name)) for name, lin in linears.items()]
    try:
        for args in inputs:
            seen.clear()
            layer(*args)
            readers: dict[int, list[str]] = {}  # id of an input tensor -> the Linears that read it
            for name, x in seen.items():
                readers.setdefault(id(x), []).append(name)
            for names in readers.values():
                x = seen[names[0]].reshape(-1, seen[names[0]].shape[-1]).float()
                product = x.t() @ x
                for name in names:
                    sums[name] += product
                    rows[name] += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return {name: sums[name] / max(rows[name], 1) for name in linears}


@torch.no_grad()
def quantize_fp8_(model: nn.Module, group_size: int | None = DEFAULT_GROUP_SIZE, skip: Iterable[str] = ("lm_head",),
                  calibration: Iterable[torch.Tensor] | None = None, show_progress: bool = False) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of each decoder layer's ``self_attn`` and ``mlp`` by an
    :class:`FP8Linear`; returns the replaced modules' names (``model.layers.0.self_attn.q_proj``, ...).

    ``group_size``: scales per output channel and group of this many input features (a power of two from 32 to
    1024; activations get the same groups), or None for one scale per output channel (activations per token).
    ``skip``: names (whole, a dotted component such as ``"o_proj"``, or a dotted suffix) left unquantised.
    Projections fused for inference are unfused first; a later ``fuse_projections()`` fuses the FP8Linear groups
    (:class:`FusedFP8Linears`).
    ``calibration``: token-id batches [B, T] of representative text; given, each layer is quantised by GPTQ from its
    inputs' statistics (layers in order, each calibrated on the outputs of the layers before it, already
    quantised: one pass of each layer per batch, the batches' hidden states kept between layers); else rounding
    to nearest. A Linear subclass (an adapter) is refused: merge it first, its extra terms would be lost.
    """
    check_group_size(group_size)
    if any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("quantize_fp8_: this model is quantised already (it holds FP8Linear modules); quantise the "
                         "unquantised model")
    targets = _targets(model, tuple(skip))
    batches = None if calibration is None else list(calibration)
    if batches is not None and not batches:
        raise ValueError("quantize_fp8_: calibration is empty; pass token-id batches [B, T] or None (round to nearest)")
    decoder = [layer for _, layer in _decoder_layers(model)]
    with_targets = sorted({index for index, *_ in targets})
    last = with_targets[-1] if with_targets else -1
    inputs = _first_layer_inputs(model, decoder[0], batches) if batches is not None and with_targets else None
    bar = counter("fp8 " + ("GPTQ" if batches else "quantise"), len(with_targets), disable=not show_progress,
                  unit="layer")
    replaced: list[str] = []
    for index, layer in enumerate(decoder[:last + 1]):
        mine = [(full, block, attr, lin) for i, full, block, attr, lin in targets if i == index]
        hessians = {}
        if inputs is not None and mine:
            hessians = _layer_hessians(layer, {full: lin for full, _, _, lin in mine}, inputs)
        for full, block, attr, lin in mine:
            setattr(block, attr, FP8Linear.from_linear(lin, group_size, hessians.get(full)))
            replaced.append(full)
        if inputs is not None and index < last:  # the next layer's inputs, from this layer quantised
            for args in inputs:
                args[0], args[1] = layer(*args)
        if mine:
            bar.update(1)
    bar.close()
    if hasattr(model, "config"):
        model.config.quantization_config = FP8Config(group_size=group_size, modules_to_not_convert=list(skip),
                                                     calibrated=batches is not None)
    return replaced


def quantized_tensors(shapes: dict[str, tuple[int, ...]], quantization_config: Any
                      ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensors of a pre-quantised checkpoint from those of the unquantised one (``expected_shapes``): each
    quantised projection's ``weight`` (safetensors dtype F8_E4M3) gains a ``weight_scale`` (F32). -> (name -> shape,
    name -> safetensors dtype for the names whose dtype the format fixes)."""
    cfg = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    if cfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"config.json's quantization_config has quant_method {cfg.get('quant_method')!r}; sala "
                         f"reads {QUANT_METHOD!r} (written by sala quantize / quantize_fp8_)")
    group_size = check_group_size(cfg.get("group_size"))
    skip = tuple(cfg.get("modules_to_not_convert") or ())
    shapes = dict(shapes)
    dtypes: dict[str, str] = {}
    for name, shape in list(shapes.items()):
        module = name.removesuffix(".weight")
        parts = module.split(".")
        if (len(shape) != 2 or not name.endswith(".weight") or len(parts) < 5 or parts[:2] != ["model", "layers"]
                or parts[3] not in ("self_attn", "mlp") or _skipped(module, skip) or parts[-1].endswith("_norm")):
            continue
        out, inp = shape
        shapes[module + ".weight_scale"] = (out,) if group_size is None else (out, num_groups(inp, group_size))
        dtypes[name], dtypes[module + ".weight_scale"] = "F8_E4M3", "F32"
    return shapes, dtypes


# ---------------------------------------------------------------------------------------------------------------
# transformers integration: quantization_config = FP8Config(...) in from_pretrained, and pre-quantised checkpoints
# ---------------------------------------------------------------------------------------------------------------
class FP8Config(QuantizationConfigMixin):
    """``quantization_config`` of an FP8 SALA model (``config.json``: ``{"quant_method": "sala_fp8", ...}``).

    Passed to ``from_pretrained`` with an unquantised checkpoint, the model is quantised at load (round to nearest);
    saved with a quantised model, ``from_pretrained`` builds FP8Linear modules and loads the codes and scales as
    they are. ``group_size``: see :func:`quantize_fp8_`; ``modules_to_not_convert``: its ``skip``; ``calibrated``:
    whether GPTQ made the codes (informational).
    """

    def __init__(self, group_size: int | None = DEFAULT_GROUP_SIZE, modules_to_not_convert: list[str] | None = None,
                 calibrated: bool = False, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.group_size = check_group_size(group_size)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else ["lm_head"]
        self.calibrated = bool(calibrated)
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"FP8Config: unknown keys {unknown}; known: group_size, modules_to_not_convert, calibrated")


def describe(quantization_config: Any) -> str:
    """One line for messages: ``sala_fp8, group_size 128, GPTQ`` (a config object or its dict)."""
    cfg = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    parts = [str(cfg.get("quant_method"))]
    if cfg.get("quant_method") == QUANT_METHOD:
        parts.append(f"group_size {cfg.get('group_size')}" if cfg.get("group_size") else "row-wise scales")
        parts.append("GPTQ" if cfg.get("calibrated") else "round to nearest")
    return ", ".join(parts)


class FP8Quantizer(HfQuantizer):
    """Pre-quantised checkpoint: FP8Linear modules replace the Linears before the weights load (codes and scales
    load as stored). Unquantised checkpoint: the weights load into the Linears, then :func:`quantize_fp8_` runs."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        for _, _, block, attr, lin in _targets(model, tuple(cfg.modules_to_not_convert)):
            setattr(block, attr, FP8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                           device=lin.weight.device, group_size=cfg.group_size,
                                           bias_dtype=lin.bias.dtype if lin.bias is not None else torch.float32))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            cfg = self.quantization_config
            quantize_fp8_(model, group_size=cfg.group_size, skip=cfg.modules_to_not_convert)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    """Make transformers map ``quant_method: "sala_fp8"`` to these classes (once; a module reload keeps the first)."""
    for register, cls in ((register_quantization_config, FP8Config), (register_quantizer, FP8Quantizer)):
        try:
            register(QUANT_METHOD)(cls)
        except ValueError:  # already registered
            pass


_register()
