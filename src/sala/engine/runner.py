"""Model execution for the engine: batch-1 chunked prefill through the model, and a lean batched decode step.

**Prefill** runs ``SALAModel.forward`` on one sequence with ``past_key_values = cache.view(slot)``: the model's
own code path, writing straight into the slot's preallocated buffers; logits are computed for the last
position of the prompt only (never ``T x vocab``).

**Decode** does not go through ``SALAModel.forward`` (whose per-sequence loops, host syncs and shared-length
layout do not fit a batch of sequences at different lengths). It calls the model's submodules directly.

With ``fused_attention`` (the default on CUDA), the sparse layers' attention is *fused* into the step: after the
K/V write, ``append_compressed_keys`` extends the compressed-key caches and ``decode_attention_batch`` attends
every row over its own slot (dense below ``dense_len``, InfLLM-v2 above, chosen per row on the device), with
shapes that depend only on the batch bucket and the cache. The whole step is then one CUDA graph per bucket.

Otherwise (reference ops, e.g. on CPU) the step is split into pieces with eager attention between them::

    piece 0 : embed -> Lightning layers before the first sparse layer -> sparse layer's norm + q/k/v, K/V write
    attend  : per sparse layer, eager: dense attention over the slot's K/V (rows with equal length and
              consecutive slots share one call) or InfLLM-v2 for rows at/above ``dense_len``
    piece j : gate + o_proj + MLP of sparse layer j-1 -> Lightning layers -> next sparse layer's q/k/v
    piece S : ... -> final norm -> logits [N, vocab]

Lightning layers run their own ``step`` (each MLP's residual add left pending for the next norm kernel);
``lightning_step`` updates each row's slot of the state pool in place, so every sequence keeps its slot
without a gather or scatter. The pieces have static shapes for a given batch bucket and no host syncs; on
CUDA each piece is captured once per bucket as a CUDA graph (all graphs share one memory pool and replay in
capture order), and only the attention between pieces runs eagerly, because its key length changes every
step. Padding rows of a bucket write K/V to the scratch column and use the
scratch Lightning state, so they never touch a live sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sala.engine.kv_cache import LightningStore, SparseStore, StaticCache
from sala.engine.types import EngineError
from sala.model import SALAForCausalLM
from sala.model.cache import LightningLayerCache
from sala.model.modeling_sala import BatchLayout, add_pending_and_norm, rope_cos_sin
from sala.ops import (
    append_compressed_keys,
    decode_attention_batch,
    dense_causal_attention,
    infllm_v2_attention,
    sigmoid_gate,
)

logger = logging.getLogger(__name__)


@dataclass
class _PieceOut:
    """Outputs of a decode piece: residual ``h`` [N, 1, hidden], the sparse layer's queries ``q`` [N, 1, H, D] and
    output-gate pre-activation ``g`` [N, 1, H*D], the step's RoPE tables; or, for the last piece, ``logits``
    [N, vocab] fp32."""

    h: torch.Tensor | None = None
    q: torch.Tensor | None = None
    g: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    o: torch.Tensor | None = None  # fused mode: the sparse layer's attention output [N, 1, H*D]
    logits: torch.Tensor | None = None


class _DecodeGraphs:
    """CUDA graphs of every decode piece for one batch bucket, with their static inputs."""

    def __init__(self, runner: "ModelRunner", bucket: int) -> None:
        dev = runner.device
        self.bucket = bucket
        self.ids = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.idx = torch.as_tensor(runner.index_rows([], [], bucket), device=dev)  # all padding rows
        self.o = runner.attention_buffers(bucket, torch.zeros)
        # warm up outside capture (Triton compiles, cuBLAS handles, cached slopes); padding rows write only
        # scratch K/V and state, and complete no compressed window (position 0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                runner.run_pieces(self.ids, self.idx, self.o, attend=None)
        torch.cuda.current_stream().wait_stream(side)
        if runner.graph_pool is None:
            runner.graph_pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outs: list[_PieceOut] = []
        if runner.fused:  # attention inside: the whole step is one graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=runner.graph_pool):
                out = runner.run_pieces(self.ids, self.idx, self.o, attend=None)
            self.graphs.append(graph)
            self.outs.append(out)
            return
        prev = _PieceOut()
        for j in range(len(runner.sparse_layers) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=runner.graph_pool):
                prev = runner.piece(j, self.ids, self.idx, prev, self.o[j - 1] if j else None)
            self.graphs.append(graph)
            self.outs.append(prev)

    def replay(self, runner: "ModelRunner", tokens: torch.Tensor, idx_host: list[list[int]], slots: list[int],
               lengths: list[int]) -> torch.Tensor:
        n = tokens.shape[0]
        self.ids[:n].copy_(tokens)
        self.ids[n:].zero_()
        self.idx.copy_(torch.as_tensor(idx_host))
        for j, graph in enumerate(self.graphs):
            graph.replay()
            if j < len(runner.sparse_layers) and not runner.fused:
                runner.attend(runner.sparse_layers[j], self.outs[j].q, slots, lengths, self.idx[0], self.o[j])
        return self.outs[-1].logits[:n].clone()


class ModelRunner:
    """Runs prefill chunks and decode steps of a :class:`SALAForCausalLM` against a :class:`StaticCache`.

    ``fused_attention``: run the sparse layers' decode attention inside the (graph-captured) step (True) or
    eagerly between pieces (False); None picks fused on CUDA. Construction also fuses the model's input
    projections (``SALAForCausalLM.fuse_projections``) for inference.
    """

    def __init__(self, model: SALAForCausalLM, cache: StaticCache, *, cuda_graphs: bool = True,
                 graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 fused_attention: bool | None = None) -> None:
        self.model, self.net, self.config = model, model.model, model.config
        self.cache = cache
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sparse_layers = [i for i, layer in enumerate(self.net.layers) if layer.is_sparse]
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.buckets = sorted(set(graph_batch_sizes))
        self.graph_pool = None
        self._graphs: dict[int, _DecodeGraphs] = {}
        can_fuse = all(self.net.layers[li].self_attn.dense_len is None or self.cache.stores[li].ck1 is not None
                       for li in self.sparse_layers)
        if fused_attention and not can_fuse:
            raise EngineError("fused decode attention needs the compressed-key caches of every InfLLM-v2 layer")
        self.fused = (can_fuse and self.device.type == "cuda") if fused_attention is None else fused_attention
        model.fuse_projections()
        logger.info("decode: %s, sparse-layer attention %s", "CUDA graphs" if self.use_graphs else "eager",
                    "fused into the step" if self.fused else f"eager between {len(self.sparse_layers) + 1} pieces")

    # ---- prefill ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slot: int, ids: torch.Tensor, want_logits: bool) -> torch.Tensor | None:
        """Append prompt tokens ``ids`` [T] to ``slot``; returns fp32 logits [vocab] of the last one if asked."""
        out = self.net(input_ids=ids[None], past_key_values=self.cache.view(slot), use_cache=True)
        if not want_logits:
            return None
        return self.model.logits(out.last_hidden_state[0, -1])

    # ---- decode -------------------------------------------------------------------------------------------------
    def index_rows(self, slots: list[int], positions: list[int], rows: int) -> list[list[int]]:
        """Host index table [4, rows]: RoPE position, K/V slot, K/V position, Lightning state row; padded."""
        pad = rows - len(slots)
        return [
            list(positions) + [0] * pad,
            list(slots) + [0] * pad,
            list(positions) + [self.cache.scratch_position] * pad,
            list(slots) + [self.cache.scratch_state] * pad,
        ]

    @torch.no_grad()
    def decode(self, slots: list[int], positions: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token for each sequence: ``tokens`` [N] written at ``positions`` of ``slots`` -> logits [N, vocab]."""
        n = len(slots)
        for s, p in zip(slots, positions):
            if self.cache.lengths[s] != p:
                raise RuntimeError(f"slot {s} holds {self.cache.lengths[s]} tokens, decode asked to write position {p}")
            if p >= self.cache.max_seq_len:
                raise RuntimeError(f"slot {s} is full ({self.cache.max_seq_len} tokens)")
        lengths = [p + 1 for p in positions]
        if self.fused:  # the fused step appends only the window its token completes
            for s in slots:
                self.cache.ensure_compressed(s)
        bucket = next((b for b in self.buckets if b >= n), None)
        if self.use_graphs and bucket is not None:
            graphs = self._graphs.get(bucket)
            if graphs is None:
                logger.info("capturing decode CUDA graphs for batch bucket %d", bucket)
                graphs = self._graphs[bucket] = _DecodeGraphs(self, bucket)
            logits = graphs.replay(self, tokens, self.index_rows(slots, positions, bucket), slots, lengths)
        else:
            idx = torch.as_tensor(self.index_rows(slots, positions, n), device=self.device)
            logits = self.run_pieces(tokens, idx, self.attention_buffers(n), attend=(slots, lengths)).logits
        for s in slots:
            self.cache.lengths[s] += 1  # fused: the step also appended the window its token completed
        return logits

    def attention_buffers(self, rows: int, alloc=torch.empty) -> list[torch.Tensor | None]:
        """Per sparse layer, the [rows, 1, H*D] buffer its eager attention writes; fused mode needs none (each
        piece hands its attention output to the next)."""
        if self.fused:
            return [None] * len(self.sparse_layers)
        width = self.config.num_attention_heads * self.config.head_dim
        return [alloc(rows, 1, width, dtype=self.dtype, device=self.device) for _ in self.sparse_layers]

    def run_pieces(self, ids: torch.Tensor, idx: torch.Tensor, o: list[torch.Tensor | None],
                   attend: tuple[list[int], list[int]] | None) -> _PieceOut:
        """All pieces eagerly; ``attend`` = (slots, lengths) of the real rows (None: warm-up, no real rows)."""
        out = _PieceOut()
        for j in range(len(self.sparse_layers) + 1):
            out = self.piece(j, ids, idx, out, o[j - 1] if j else None)
            if j < len(self.sparse_layers) and attend is not None and not self.fused:
                self.attend(self.sparse_layers[j], out.q, attend[0], attend[1], idx[0], o[j])
        return out

    def piece(self, j: int, ids: torch.Tensor, idx: torch.Tensor, prev: _PieceOut, o: torch.Tensor | None) -> _PieceOut:
        """Decode piece ``j`` (see module docstring). ids: [N]; idx: [4, N]; o: [N, 1, H*D] attention output of
        sparse layer j-1 (fused mode: written by piece j-1 itself). Static shapes, no host sync: safe to
        capture in a CUDA graph."""
        net, cfg = self.net, self.config
        pos, kv_slot, kv_pos, state_row = idx[0], idx[1], idx[2], idx[3]
        n = ids.shape[0]
        rope = prev.rope  # [N, 1, 1, D] each, computed once per step
        if rope is None:
            rope = rope_cos_sin(pos[:, None], cfg.head_dim, cfg.rope_theta, self.dtype)
        if j == 0:
            h, y = net.embed_tokens(ids)[:, None] * cfg.scale_emb, None  # [N, 1, hidden]
            start = 0
        else:
            li = self.sparse_layers[j - 1]
            layer = net.layers[li]
            attn = layer.self_attn
            o = prev.o if prev.o is not None else o
            if attn.use_output_gate:
                o = sigmoid_gate(o, prev.g)
            h, y = layer.finish(prev.h, attn.o_proj(o))
            start = li + 1
        end = self.sparse_layers[j] if j < len(self.sparse_layers) else len(net.layers)
        layout = BatchLayout(pos[:, None], None, None, [0] * n, 0)  # Lightning reads only new_valid (None)
        for li in range(start, end):
            store: LightningStore = self.cache.stores[li]
            # lightning_step updates each row's slot of the pool in place (padding rows share the scratch row)
            h, y = net.layers[li].step(h, y, layout, rope, LightningLayerCache(store.state, state_row))
        if j == len(self.sparse_layers):
            _, normed = add_pending_and_norm(h, y, net.layers[-1].residual_scale, net.norm)  # last MLP's add too
            return _PieceOut(logits=self.model.logits(normed[:, 0]))
        layer = net.layers[end]
        attn = layer.self_attn
        h, x = layer.input_norm(h, y)
        q, k, v, g = attn.project(x, rope if attn.use_rope else None)  # [N, 1, H|Hkv, D], gate [N, 1, H*D]
        store: SparseStore = self.cache.stores[end]
        store.keys[kv_slot, kv_pos] = k[:, 0]
        store.values[kv_slot, kv_pos] = v[:, 0]
        if self.fused:  # padding rows: position 0 of slot 0 completes no window and is only read
            p, cap = attn.params, self.cache.max_seq_len  # views without the scratch column
            keys, values = store.keys[:, :cap], store.values[:, :cap]
            if attn.dense_len is not None:
                append_compressed_keys(keys, store.ck1, store.ck2, kv_slot, pos, p.kernel_size, p.kernel_stride)
            o_j = decode_attention_batch(q[:, 0], keys, values, store.ck1, store.ck2, kv_slot, pos, p,
                                         attn.scale, attn.dense_len)
            return _PieceOut(h=h, q=q, g=g, rope=rope, o=o_j.reshape(n, 1, -1))
        return _PieceOut(h=h, q=q, g=g, rope=rope)

    def attend(self, li: int, q: torch.Tensor, slots: list[int], lengths: list[int], q_pos: torch.Tensor,
               out: torch.Tensor) -> None:
        """Attention of sparse layer ``li`` for the real rows. q: [Bb, 1, H, D]; q_pos: [Bb] (position = length - 1);
        writes out[:N] = o [N, 1, H*D]. Dense rows with equal length in consecutive slots share one call."""
        attn = self.net.layers[li].self_attn
        store: SparseStore = self.cache.stores[li]
        n, i = len(slots), 0
        while i < n:
            L = lengths[i]
            if attn.uses_sparse(L):  # spec §5.2: the call's total length decides, per sequence
                s = slots[i]
                kb, vb = store.keys[s, :L], store.values[s, :L]
                ck1, ck2 = store.compressed(s, kb, attn.params.kernel_size, attn.params.kernel_stride)
                o = infllm_v2_attention(q[i], kb, vb, ck1, ck2, q_pos[i : i + 1], attn.params, attn.scale,
                                         first_pos=L - 1)  # [1, H, D]; no host sync
                out[i] = o.reshape(1, -1)
                i += 1
                continue
            j = i + 1
            while j < n and lengths[j] == L and slots[j] == slots[j - 1] + 1:
                j += 1
            s0 = slots[i]
            o = dense_causal_attention(q[i:j], store.keys[s0 : s0 + j - i, :L], store.values[s0 : s0 + j - i, :L], None, attn.scale)
            out[i:j] = o.reshape(j - i, 1, -1)
            i = j
