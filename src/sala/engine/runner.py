"""Model execution for the engine: batch-1 chunked prefill and batched decode steps, both through the model's
one forward (``SALAModel.forward``) with the engine's caches behind the model's cache protocol.

**Prefill** runs the forward on one sequence with ``past_key_values = cache.view(slot)``, writing straight into
the slot's preallocated buffers; logits are computed for the last position of the prompt only (never
``T x vocab``).

**Decode** runs the same forward on N sequences at one token each, with the attention metadata the engine
builds itself (``BatchLayout.decode``: per-row positions, no host data) and ``cache.decode_view``: Lightning
layers step each row's slot of the state pool in place; softmax layers write K/V at (slot, position) and attend
over each row's own slot.

With ``fused_attention`` (the default on CUDA) that attention is one batched kernel per layer
(``decode_attention_batch``, dense below ``dense_len``, InfLLM-v2 above, chosen per row on the device) after
``append_compressed_keys`` extends the compressed keys, so the step has static shapes for a given batch bucket
and no host syncs: on CUDA it is captured once per bucket as one CUDA graph and replayed. Padding rows of a
bucket write K/V to the scratch column and step the scratch Lightning state, so they never touch a live
sequence. Without it (``eager``, the default off CUDA) the softmax layers attend row by row with host lengths,
and the step runs eagerly.
"""

from __future__ import annotations

import logging

import torch

from sala.engine.kv_cache import StaticCache
from sala.engine.types import EngineError
from sala.model import SALAForCausalLM
from sala.model.layout import BatchLayout

logger = logging.getLogger(__name__)


class _DecodeGraph:
    """The decode step of one batch bucket captured as a CUDA graph, with its static inputs and output."""

    def __init__(self, runner: "ModelRunner", bucket: int) -> None:
        dev = runner.device
        self.ids = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.idx = torch.as_tensor(runner.index_rows([], [], bucket), device=dev)  # all padding rows
        # warm up outside capture (Triton compiles, cuBLAS handles, cached slopes); padding rows write only
        # scratch K/V and state, and complete no compressed window (position 0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                runner.step(self.ids, self.idx, None)
        torch.cuda.current_stream().wait_stream(side)
        if runner.graph_pool is None:
            runner.graph_pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.logits = runner.step(self.ids, self.idx, None)

    def replay(self, tokens: torch.Tensor, idx_host: list[list[int]]) -> torch.Tensor:
        n = tokens.shape[0]
        self.ids[:n].copy_(tokens)
        self.ids[n:].zero_()
        self.idx.copy_(torch.as_tensor(idx_host))
        self.graph.replay()
        return self.logits[:n].clone()


class ModelRunner:
    """Runs prefill chunks and decode steps of a :class:`SALAForCausalLM` against a :class:`StaticCache`.

    ``fused_attention``: the softmax layers' decode attention as one batched kernel per layer, which lets the
    whole step be one CUDA graph (True), or row by row, eagerly (False); None picks fused on CUDA. CUDA graphs
    (``cuda_graphs``) need the fused step. Construction also fuses the model's input projections
    (``SALAForCausalLM.fuse_projections``) for inference.
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
        self._graphs: dict[int, _DecodeGraph] = {}
        can_fuse = all(self.net.layers[li].self_attn.dense_len is None or self.cache.stores[li].ck1 is not None
                       for li in self.sparse_layers)
        if fused_attention and not can_fuse:
            raise EngineError("fused decode attention needs the compressed-key caches of every InfLLM-v2 layer")
        self.fused = (can_fuse and self.device.type == "cuda") if fused_attention is None else fused_attention
        if self.use_graphs and not self.fused:
            logger.warning("decode runs eagerly: CUDA graphs need the fused decode attention (--decode-attention fused)")
            self.use_graphs = False
        model.fuse_projections()
        compiled = self.net.precompile(cache.max_seq_len)  # a first long prompt would compile them in its TTFT
        if compiled:
            logger.info("precompiled sparse selection for %d block-count classes (up to %d blocks)", len(compiled),
                        compiled[-1])
        logger.info("decode: %s, sparse-layer attention %s", "one CUDA graph per batch bucket" if self.use_graphs
                    else "eager", "fused (one batched kernel)" if self.fused else "row by row")

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
            graph = self._graphs.get(bucket)
            if graph is None:
                logger.info("capturing the decode CUDA graph for batch bucket %d", bucket)
                graph = self._graphs[bucket] = _DecodeGraph(self, bucket)
            logits = graph.replay(tokens, self.index_rows(slots, positions, bucket))
        else:
            idx = torch.as_tensor(self.index_rows(slots, positions, n), device=self.device)
            logits = self.step(tokens, idx, None if self.fused else (slots, lengths))
        for s in slots:
            self.cache.lengths[s] += 1  # fused: the step also appended the window its token completed
        return logits

    def step(self, ids: torch.Tensor, idx: torch.Tensor, rows: tuple[list[int], list[int]] | None) -> torch.Tensor:
        """One decode step through the model's forward. ids: [N]; idx: [4, N] (see :meth:`index_rows`); ``rows``:
        the real rows' (slots, lengths) for eager attention (None when fused) -> fp32 logits [N, vocab]. Fused:
        static shapes and no host sync, so it can be captured in a CUDA graph."""
        view = self.cache.decode_view(idx, rows, self.fused)
        out = self.net(input_ids=ids[:, None], past_key_values=view, use_cache=True, layout=BatchLayout.decode(idx[0]))
        return self.model.logits(out.last_hidden_state[:, 0])
