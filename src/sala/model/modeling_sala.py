"""MiniCPM-SALA in PyTorch (spec ``architecture.md``), readable top to bottom.

    h = E[ids] * scale_emb
    for each layer:  h = h + a * Mixer(RMSNorm(h));  h = h + a * MLP(RMSNorm(h))      a = scale_depth / sqrt(N)
    logits = lm_head(RMSNorm(h) / (hidden / dim_model_base))

Mixers: ``LightningAttention`` (qk-norm, RoPE, fixed-decay linear attention, output norm + gate) and
``SparseAttention`` (GQA softmax, NoPE, sigmoid output gate; dense below ``dense_len``, InfLLM-v2 at or above).
All attention math goes through :mod:`sala.ops`, which picks the reference or Triton backend.

Batching: left padding with a 2-D ``attention_mask`` ([B, past + T]); positions are ``cumsum(mask) - 1``.
Each sequence chooses dense or sparse by its own length (HF decides per batch by the longest sequence; the
per-sequence rule makes batched results equal unbatched ones).
"""

from __future__ import annotations

import functools
import logging
import os
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from sala.model.cache import HybridCache, LightningState, NoCache, SparseKV
from sala.model.checkpoint_io import verify_checkpoint, write_official_config
from sala.model.configuration_sala import SALAConfig
from sala.model.layout import BatchLayout
from sala.model.fused import FusedRows, fuse
from sala.ops import (  # apply_rope, rms_norm and the elementwise glue: one fused kernel each on CUDA
    apply_rope,
    chunk_lightning,
    lightning_decay_slopes,
    lightning_step,
    precompile_selection,
    qk_norm_rope,
    residual_rms_norm,
    rms_norm,
    scaled_residual,
)
from sala.ops import elementwise
from sala.ops.elementwise import GLUE_OPS
from sala.ops.infllm_v2 import InfLLMv2Params

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------
class SALARMSNorm(nn.Module):
    """``to_dtype(x32 * rsqrt(mean(x32^2) + eps)) * w`` (spec §3): fp32 statistics, cast before the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # one fused kernel on CUDA


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX RoPE tables at ``positions`` [B, T] -> cos, sin [B, T, 1, head_dim] in fp32 (fp64 for fp64 models)."""
    dt = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).to(dt) / head_dim))
    angles = positions.to(dt)[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # cos/sin duplicated over both halves
    return emb.cos(), emb.sin()


@functools.cache
def _slopes(num_heads: int, device: str) -> torch.Tensor:
    return lightning_decay_slopes(num_heads).to(device)  # float64; ops cast to their compute dtype


class FusedLinears(FusedRows):
    """Inference only: several ``nn.Linear`` that read the same input, computed by one GEMM (see
    :class:`sala.model.fused.FusedRows`).

    Each Linear's parameters are re-pointed through ``.data`` (the Parameter objects, and optimizers holding them,
    stay); a missing bias is zeros, added exactly. At decode one wide GEMM reads the weights closer to copy
    bandwidth than three or four narrow ones and saves their launches. The fused call steps aside (callers run
    the Linears one by one) while gradients are enabled.
    """

    MODULE = nn.Linear
    TENSORS = ("weight", "bias")

    def _point(self, module: nn.Module, name: str, view: torch.Tensor) -> None:
        getattr(module, name).data = view

    def _usable(self) -> bool:
        return not torch.is_grad_enabled()

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.blocks["weight"], self.blocks["bias"])

    @classmethod
    def fusable(cls, modules: list[nn.Module]) -> bool:
        """One dtype and device for every weight and bias."""
        if not modules or any(type(m) is not nn.Linear for m in modules):
            return False
        tensors = [t for m in modules for t in (m.weight, m.bias) if t is not None]
        return len({(t.dtype, t.device) for t in tensors}) == 1


_GLUES = {op: getattr(elementwise, op) for op in GLUE_OPS}


def glued_linear(linear: nn.Module, op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``linear(glue(a, b))`` for the elementwise glue ``op`` that feeds it ("silu_mul" before down_proj,
    "sigmoid_gate" before o_proj). A linear with a ``glued`` method (FP8Linear) takes both inputs, so that its
    activation quantisation computes the glue in the same pass instead of reading back a written result."""
    glued = getattr(linear, "glued", None)
    if (glued is None or a.dtype != b.dtype or a.device != b.device  # the glue promotes mixed dtypes
            or linear._forward_hooks or linear._forward_pre_hooks or hasattr(linear, "_hf_hook")):  # hooks: __call__
        return linear(_GLUES[op](a, b))
    return glued(op, a, b)


def run_linears(linears: list[nn.Module], fused: FusedRows | None, x: torch.Tensor) -> list[torch.Tensor]:
    """Each Linear applied to ``x``: one fused GEMM when ``fused`` serves, else one call each."""
    out = fused(x, linears) if fused is not None else None
    return out if out is not None else [m(x) for m in linears]


class SALAMLP(nn.Module):
    def __init__(self, config: SALAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self._fused: FusedRows | None = None

    def fuse_projections(self) -> None:
        """One GEMM for gate and up (inference; see :class:`FusedLinears`)."""
        self._fused = fuse(self._fused, [self.gate_proj, self.up_proj])

    CPU_ROWS = 4096
    """Inference on a CPU runs the MLP this many tokens at a time, so a long prompt's [T, intermediate]
    activations stay small: 75 MB instead of 600 MB at 32K for SmolLM2's shape (peak memory), and 25% faster
    where large allocations fault in 4 KB pages (``THP_MEM_ALLOC_ENABLE=0``; no change with huge pages). Rows are
    independent, so results are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.CPU_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled():
            flat, out = x.reshape(rows, x.shape[-1]), x.new_empty(*x.shape[:-1], self.down_proj.out_features)
            flat_out = out.view(rows, -1)
            for a in range(0, rows, self.CPU_ROWS):
                flat_out[a : a + self.CPU_ROWS] = self._mlp(flat[a : a + self.CPU_ROWS])
            return out
        return self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = run_linears([self.gate_proj, self.up_proj], self._fused, x)
        return glued_linear(self.down_proj, "silu_mul", gate, up)


class _Projections(nn.Module):
    """q/k/v/o projections with optional q/k RMSNorm shared by both mixers."""

    def __init__(self, config: SALAConfig, num_kv_heads: int, qk_norm: bool) -> None:
        super().__init__()
        H, D, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
        bias = config.attention_bias or config.qkv_bias
        self.num_heads, self.num_kv_heads, self.head_dim = H, num_kv_heads, D
        self.q_proj = nn.Linear(hidden, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=config.attention_bias)
        if qk_norm:
            self.q_norm = SALARMSNorm(D, config.rms_norm_eps)  # one [D] weight shared by all heads
            self.k_norm = SALARMSNorm(D, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self._fused: FusedRows | None = None

    def gate_linear(self) -> nn.Linear | None:
        """The output-gate projection, which reads the same input as q/k/v (None: no gate)."""
        return None

    def _input_linears(self) -> list[nn.Linear]:
        gate = self.gate_linear()
        return [self.q_proj, self.k_proj, self.v_proj] + ([gate] if gate is not None else [])

    def fuse_projections(self) -> None:
        """One GEMM for q, k, v and the gate projection (inference; see :class:`FusedLinears`)."""
        self._fused = fuse(self._fused, self._input_linears())

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """x: [B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D] (qk-norm, then RoPE when given) and the
        gate projection's pre-activation [B, T, H*D] (None without a gate)."""
        B, T, _ = x.shape
        q, k, v, *gate = run_linears(self._input_linears(), self._fused, x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # norms then RoPE: one kernel for q and k on CUDA
            q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, rope,
                                k_eps=self.k_norm.eps)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if torch.is_autocast_enabled(x.device.type):
            # Autocast does not reach the Triton mixers. The fp32 qk-norm weights promoted q and k to fp32 beside a
            # bf16 v, which sent training's Lightning dots to 3xTF32 with conversion copies. Give the mixers
            # autocast's dtype, as it would give a matmul: the numbers of a bf16 model's inference.
            dt = mixer_dtype(x)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        return q, k, v, (gate[0] if gate else None)


def mixer_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a mixer computes and writes in: autocast's where it is on (the residual stream x is then fp32),
    else x's. A Lightning output in it also keeps the backward's gradient in it, so all four passes of the chunk
    kernel take 16-bit dots under autocast."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# ---------------------------------------------------------------------------------------------------------------
# mixers
# ---------------------------------------------------------------------------------------------------------------
class LightningAttention(_Projections):
    """Lightning layer (spec §4): qk-norm -> RoPE -> fp32 decay recurrence -> RMSNorm(H*D) -> * sigmoid(z) -> o_proj."""

    def __init__(self, config: SALAConfig, layer_idx: int) -> None:
        super().__init__(config, config.lightning_nkv, config.qk_norm)
        self.layer_idx = layer_idx
        self.use_rope = config.lightning_use_rope
        self.scale = config.lightning_scale_value()
        width = config.num_attention_heads * config.head_dim
        if config.use_output_norm:
            self.o_norm = SALARMSNorm(width, config.rms_norm_eps)  # over the whole H*D vector, not per head
        if config.use_output_gate:
            self.z_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.use_output_norm, self.use_output_gate = config.use_output_norm, config.use_output_gate

    def gate_linear(self) -> nn.Linear | None:
        return self.z_proj if self.use_output_gate else None

    def forward(self, x, layout: BatchLayout, rope, cache: LightningState | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v, z = self.project(x, rope if self.use_rope else None)
        if layout.new_valid is not None:  # left pads must not enter the state (it starts at zero before them)
            keep = layout.new_valid[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        slopes = _slopes(self.num_heads, str(x.device))
        state = cache.state if cache is not None else None
        rows = cache.rows if cache is not None else None
        if T == 1 and state is not None:
            o = lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, self.scale, state, output_dtype=mixer_dtype(x),
                               state_rows=rows)[:, None]
        else:
            if rows is not None:
                raise ValueError("a Lightning cache with state rows serves one-token decode steps only")
            o, final = chunk_lightning(q, k, v, slopes, self.scale, initial_state=state,
                                       output_final_state=cache is not None, output_dtype=mixer_dtype(x),
                                       cu_seqlens=layout.cu_seqlens)
            if cache is not None:
                cache.state = final
        o = o.reshape(B, T, -1)  # fp32 result already cast to the model dtype (spec §4.4 step 1)
        if self.use_output_norm:
            o = self.o_norm(o)
        if self.use_output_gate:
            return glued_linear(self.o_proj, "sigmoid_gate", o, z)
        return self.o_proj(o)


class SparseAttention(_Projections):
    """Softmax layer (spec §5): GQA, NoPE (unless ``attn_use_rope``), sigmoid ``o_gate`` on the layer input.

    Per sequence: dense causal attention while its total length < ``dense_len``, else InfLLM-v2.
    """

    def __init__(self, config: SALAConfig, layer_idx: int) -> None:
        super().__init__(config, config.num_key_value_heads, config.attn_qk_norm)
        self.layer_idx = layer_idx
        self.use_rope = config.attn_use_rope
        self.scale = config.head_dim**-0.5
        sc = config.sparse_config
        self.dense_len = sc["dense_len"] if config.sparse_attention else None
        self.params = InfLLMv2Params(
            kernel_size=sc["kernel_size"], kernel_stride=sc["kernel_stride"], block_size=sc["block_size"],
            init_blocks=sc["init_blocks"], local_blocks=sc["window_size"] // sc["block_size"], topk=sc["topk"],
        )
        if config.attn_use_output_gate:
            self.o_gate = nn.Linear(config.hidden_size, config.num_attention_heads * config.head_dim, bias=False)
        self.use_output_gate = config.attn_use_output_gate

    def gate_linear(self) -> nn.Linear | None:
        return self.o_gate if self.use_output_gate else None

    def uses_sparse(self, num_keys: int) -> bool:
        return self.dense_len is not None and num_keys >= self.dense_len

    def precompile(self, max_keys: int, dtype: torch.dtype, device: torch.device) -> list[int]:
        """Compile the sparse prefill's key-count-dependent kernel variants up to ``max_keys`` (see
        :func:`sala.ops.precompile_selection`); nothing when sparse attention is off or never reached."""
        if not self.uses_sparse(max_keys):
            return []
        return precompile_selection(max_keys, self.params, self.num_kv_heads, dtype, device)

    def forward(self, x, layout: BatchLayout, rope, cache: SparseKV | None) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]. The cache stores k/v and runs the attention its layout calls for
        (padded batch, packed documents or an engine's slots); None: this call's tokens only."""
        q, k, v, g = self.project(x, rope if self.use_rope else None)
        o = (cache if cache is not None else NoCache()).attend(q, k, v, layout, self)  # [B, T, H, D]
        return self._output(o, g)

    def _output(self, o: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """o: [B, T, H, D] attention output -> sigmoid output gate -> o_proj -> [B, T, hidden]."""
        o = o.reshape(*o.shape[:2], -1)
        if self.use_output_gate:
            return glued_linear(self.o_proj, "sigmoid_gate", o, g)
        return self.o_proj(o)


def add_pending_and_norm(h: torch.Tensor, pending: torch.Tensor | None, alpha: float, norm: SALARMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + pending * alpha, its RMSNorm) in one kernel on CUDA; (h, norm(h)) when nothing is pending."""
    if pending is None:
        return h, norm(h)
    return residual_rms_norm(h, pending, alpha, norm.weight, norm.eps)


class SALADecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block; ``gradient_checkpointing_enable()`` recomputes it in the backward (HF's checkpointing layer)."""

    def __init__(self, config: SALAConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_sparse = config.is_sparse_layer(layer_idx)
        self.self_attn = (SparseAttention if self.is_sparse else LightningAttention)(config, layer_idx)
        self.mlp = SALAMLP(config)
        self.input_layernorm = SALARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = SALARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    # Layers chain with the MLP's residual add left *pending* (the stream is h + y * a): the next layer's input norm
    # adds it in the same kernel (``residual_rms_norm``), one launch fewer per layer; the final norm adds the last.
    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, layout: BatchLayout, rope, cache
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the stream ``h + pending * a`` (``pending`` None: just h), h [B, T, hidden] -> (h', y) with
        the same convention: y is the MLP's output, its residual add left to the caller."""
        h, x = add_pending_and_norm(h, pending, self.residual_scale, self.input_layernorm)
        attn_out = self.self_attn(x, layout, rope, cache)
        h, x = residual_rms_norm(h, attn_out, self.residual_scale, self.post_attention_layernorm.weight,
                                 self.post_attention_layernorm.eps)  # one kernel on CUDA
        return h, self.mlp(x)


# ---------------------------------------------------------------------------------------------------------------
# HF wrappers
# ---------------------------------------------------------------------------------------------------------------
class SALAPreTrainedModel(PreTrainedModel):
    config_class = SALAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SALADecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # we bring our own HybridCache
        return False

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts (``.to``, ``.cuda``, ``.half``) give the parameters new storage: the fused projection
        blocks (``fuse_projections``) would serve nothing but still hold the old weights (GPU memory after
        ``.to("cpu")``), so they are dropped here; call ``fuse_projections()`` again to re-fuse."""
        out = super()._apply(fn, recurse)
        for module in self.modules():
            if getattr(module, "_fused", None) is not None:
                module._fused = None
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict_checkpoint: bool = True, **kwargs):
        """HF loading, preceded (for local directories) by a strict check of tensor names and shapes against the
        config, so a missing, extra or mis-shaped tensor is an error instead of a silently re-initialised weight."""
        path = os.fspath(pretrained_model_name_or_path)
        if strict_checkpoint and os.path.isdir(path):
            config = kwargs.get("config")
            if not isinstance(config, SALAConfig):
                config = SALAConfig.from_pretrained(path)
                for key in list(kwargs):  # quantization_config: the checkpoint's own decides what is on disk
                    if key in config.to_dict() and key not in ("dtype", "torch_dtype", "quantization_config"):
                        setattr(config, key, kwargs[key])
                config.check()
            verify_checkpoint(path, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF saving (safetensors, sharded past ``max_shard_size``) with the official ``config.json`` names."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_official_config(save_directory)


class SALAModel(SALAPreTrainedModel):
    """Embedding, decoder layers, final norm. Returns hidden states [B, T, hidden] and the ``HybridCache``."""

    def __init__(self, config: SALAConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SALADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SALARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self) -> HybridCache:
        return HybridCache([layer.is_sparse for layer in self.layers])

    def precompile(self, max_len: int) -> list[int]:
        """Compile, before the first request, the kernel variants that depend on the key count, for prompts up to
        ``max_len`` tokens (the engine calls this at start; a no-op off Triton). -> the selection classes compiled."""
        param = next(self.parameters())
        done: dict[tuple, list[int]] = {}
        for layer in self.layers:
            if layer.is_sparse:
                attn = layer.self_attn
                key = (attn.params, attn.num_kv_heads)
                if key not in done:  # the same geometry compiles the same variants
                    done[key] = attn.precompile(max_len, param.dtype, param.device)
        return sorted({c for classes in done.values() for c in classes})

    def _layout(self, B: int, T: int, past: int, attention_mask: torch.Tensor | None, device) -> BatchLayout:
        total = past + T
        if attention_mask is None or bool((attention_mask == 1).all()):
            if attention_mask is not None and attention_mask.shape != (B, total):
                raise ValueError(f"attention_mask must be [batch, past + new] = {(B, total)}, got {tuple(attention_mask.shape)}")
            positions = torch.arange(past, total, device=device).expand(B, T)
            return BatchLayout(positions, None, None, [0] * B, total)
        if attention_mask.dim() != 2 or attention_mask.shape != (B, total):
            raise ValueError(
                f"attention_mask must be 2-D [batch, past + new] = {(B, total)}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.long)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must contain only 0 and 1")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("only left padding is supported: each attention_mask row must be 0...0 1...1")
        counts = mask.sum(-1)
        if bool((counts == 0).any()):
            raise ValueError(f"attention_mask rows {(counts == 0).nonzero().flatten().tolist()} have no tokens")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        valid = mask.bool()
        return BatchLayout(positions, valid[:, -T:], valid, (total - counts).tolist(), total)

    @staticmethod
    def _packed_layout(cu_seqlens: torch.Tensor, B: int, T: int, device) -> BatchLayout:
        """Layout of a packed row [1, T] of independent documents bounded by ``cu_seqlens`` [D+1]."""
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch 1, got {B}; flatten packed rows to [1, sum T]")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [D+1] with D >= 1, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to the sequence length {T}, got {bounds[:8]}"
                             f"{'...' if len(bounds) > 8 else ''}")
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        starts = torch.zeros(T, dtype=torch.long, device=device)
        starts[cu[1:-1].long()] = torch.diff(cu.long())[:-1]  # each boundary subtracts the previous doc's length
        positions = (torch.arange(T, device=device) - starts.cumsum(0))[None]  # restarts at 0 in every document
        return BatchLayout(positions, None, None, [0], T, cu_seqlens=cu, doc_bounds=list(zip(bounds, bounds[1:])))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        layout: BatchLayout | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids: [B, T] (or inputs_embeds [B, T, hidden], used unscaled); attention_mask: [B, past + T]
        left-padded 0/1; position_ids [B, T] override RoPE positions only.

        Packed training input: input_ids [1, sum T] with ``cu_seqlens`` [D+1] (int) bounding D documents; each is
        computed as if alone (positions from 0, fresh Lightning state, no attention across boundaries). No cache.

        ``layout``: attention metadata built by the caller (a serving engine's decode step, with its batched slot
        cache). The caller vouches for ids and positions: nothing is checked on the host, so the call has no host
        sync and can be captured in a CUDA graph."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
            if layout is None and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
                raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")
            h = self.embed_tokens(input_ids) * self.config.scale_emb
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}")
            h = inputs_embeds  # spec §3.1: HF leaves inputs_embeds unscaled; so do we
        B, T = h.shape[:2]
        if T == 0:
            raise ValueError("empty input: sequence length is 0")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cu_seqlens is not None or (self.training and any(layer.gradient_checkpointing for layer in self.layers)):
            if past_key_values is not None:
                raise ValueError("packed input (cu_seqlens) and gradient-checkpointed training run without a cache; "
                                 "pass past_key_values=None")
            use_cache = False  # HF convention: checkpointing turns caching off
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        cache = past_key_values if use_cache else None
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"past_key_values must be a sala HybridCache, got {type(cache).__name__}")
        if layout is None:
            past = cache.get_seq_length() if cache is not None else 0
            if cu_seqlens is not None:
                if attention_mask is not None and not bool((attention_mask == 1).all()):
                    raise ValueError("packed input (cu_seqlens) takes no padding; drop attention_mask or make it all ones")
                layout = self._packed_layout(cu_seqlens, B, T, h.device)
            else:
                layout = self._layout(B, T, past, attention_mask, h.device)
            max_pos = int(layout.positions.max()) if position_ids is None else int(position_ids.max())
            if max_pos >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {max_pos} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                    "RoPE is computed analytically, so raise max_position_embeddings in the config to extrapolate"
                )
        rope_pos = layout.positions if position_ids is None else position_ids.to(h.device)
        rope = rope_cos_sin(rope_pos, self.config.head_dim, self.config.rope_theta, h.dtype)
        hidden_states = [h] if output_hidden_states else None
        pending = None  # the last MLP output, not yet added to h (see SALADecoderLayer)
        for i, layer in enumerate(self.layers):
            h, pending = layer(h, pending, layout, rope, cache[i] if cache is not None else None)
            if output_hidden_states:
                hidden_states.append(scaled_residual(h, pending, layer.residual_scale))
        if cache is not None:
            cache.seq_length = layout.total
        _, h = add_pending_and_norm(h, pending, self.config.residual_scale, self.norm)
        return BaseModelOutputWithPast(
            last_hidden_state=h, past_key_values=cache, hidden_states=tuple(hidden_states) if hidden_states else None
        )


class SALAForCausalLM(SALAPreTrainedModel, GenerationMixin):
    """SALA with an untied lm_head on h / (hidden / dim_model_base); fp32 logits (spec §3)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SALAConfig) -> None:
        super().__init__(config)
        self.model = SALAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def fuse_projections(self) -> None:
        """Inference: each mixer's q/k/v/gate and each MLP's gate/up projections computed by one GEMM (weights
        concatenated once, the Linears' parameters become views of it; see :class:`FusedLinears`). Results are
        those of the separate GEMMs up to accumulation order; training (grad enabled) keeps the separate path."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] (after the final norm) -> fp32 logits [..., vocab]."""
        return self.lm_head(hidden / self.config.logit_divisor).float()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Returns fp32 logits [B, T', vocab] for the last ``logits_to_keep`` positions (0 = all) and, with
        ``labels`` [B, T] (-100 = ignore), the mean next-token cross-entropy. ``cu_seqlens``: packed documents
        (see :meth:`SALAModel.forward`); set ``labels`` to -100 at each document's first token."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens,
        )
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.logits(h[:, keep])
        loss = None
        if labels is not None:
            full = logits if logits.shape[1] == labels.shape[1] else self.logits(h)
            loss = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, **kwargs
    ) -> dict:
        """Feed only the tokens the cache has not seen; the model derives positions from the mask."""
        past = past_key_values.get_seq_length() if isinstance(past_key_values, HybridCache) else 0
        inputs = {"past_key_values": past_key_values, "attention_mask": attention_mask,
                  "use_cache": kwargs.get("use_cache", True)}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


MiniCPMSALAConfig = SALAConfig
MiniCPMSALAModel = SALAModel
MiniCPMSALAForCausalLM = SALAForCausalLM

__all__ = ["SALAForCausalLM", "SALAModel", "SALAPreTrainedModel", "MiniCPMSALAForCausalLM", "MiniCPMSALAModel"]
