"""What each op computes: pure-PyTorch references plus Triton kernels behind one dispatching entry per op.

Public entries validate their inputs once, then run the implementation their op registered for the chosen
backend (``naive``, ``cpu`` or ``triton``) through :func:`sala.ops.common.dispatch.call`. The model only calls
these entries.
"""

from sala.ops.infllm_v2 import (
    append_compressed_keys,
    block_sparse_attention,
    compress_keys,
    decode_attention_batch,
    dense_causal_attention,
    infllm_v2_attention,
    precompile_selection,
    select_blocks,
    stage1_block_scores,
    varlen_causal_attention,
)
from sala.ops.elementwise import scaled_residual, sigmoid_gate, silu_mul
from sala.ops.fp8 import fp8_linear, quantize_fp8_activation, quantize_fp8_weight
from sala.ops.kl import kl_rows
from sala.ops.lightning import chunk_lightning, lightning_decay_slopes, lightning_step
from sala.ops.norm import residual_rms_norm, rms_norm
from sala.ops.rope import apply_rope, qk_norm_rope

__all__ = [
    "append_compressed_keys",
    "apply_rope",
    "block_sparse_attention",
    "chunk_lightning",
    "compress_keys",
    "decode_attention_batch",
    "dense_causal_attention",
    "fp8_linear",
    "infllm_v2_attention",
    "kl_rows",
    "lightning_decay_slopes",
    "lightning_step",
    "precompile_selection",
    "qk_norm_rope",
    "quantize_fp8_activation",
    "quantize_fp8_weight",
    "residual_rms_norm",
    "rms_norm",
    "scaled_residual",
    "sigmoid_gate",
    "silu_mul",
    "select_blocks",
    "stage1_block_scores",
    "varlen_causal_attention",
]
