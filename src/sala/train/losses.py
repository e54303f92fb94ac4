"""Training losses over a 49K-73K vocabulary that never hold a full ``[N, V]`` logits matrix.

``fused_linear_kl`` (distillation) and ``fused_linear_cross_entropy`` (next-token CE) take the final hidden
states and the lm_head weight instead of logits. Their forward walks the selected rows ``chunk_size`` at a time:
logits of one chunk in fp32, the chunk's loss, the gradient of the loss w.r.t. those logits, and from it the
chunk's gradients w.r.t. the hidden rows and the weight (the "fused linear" trick of Liger-Kernel). The chunk's
logits are then dropped; the gradients are kept and ``backward`` only scales them by ``grad_output``. Peak extra
memory is a few ``[chunk_size, V]`` fp32 buffers, an fp32 copy of the weight (none when it is fp32 already),
the fp32 weight gradient and one hidden-sized gradient.

Why a custom Function rather than checkpointing chunks: recomputing the logits in backward would double the
two largest GEMMs; computing the gradients during forward costs one extra GEMM pair per chunk, once.

Every matmul runs with autocast off, in fp32 (fp64 when any input is fp64, which the tests use as the exact
reference); gradients come back in each input's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sala.ops.kl import kl_rows

logger = logging.getLogger(__name__)

__all__ = ["alignment_mse", "fused_linear_cross_entropy", "fused_linear_kl"]

# chunk_loss(logits [c, V] fp32, rows [c] long or slice, need_grad) -> (sum of the chunk's row losses,
# d(sum)/d(logits) [c, V] or None). It may overwrite ``logits`` in place.
ChunkLoss = Callable[[torch.Tensor, "torch.Tensor | slice", bool], tuple[torch.Tensor, "torch.Tensor | None"]]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_chunks(rows: torch.Tensor | None, n: int, chunk_size: int):
    """Chunks of row selectors: slices of ``range(n)`` (no mask: views, no gather) or pieces of ``rows``."""
    if rows is None:
        for start in range(0, n, chunk_size):
            yield slice(start, min(start + chunk_size, n))
    else:
        yield from rows.split(chunk_size)


def _fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, scale: float, rows: torch.Tensor | None,
                       count: int, chunk_size: int, chunk_loss: ChunkLoss, need_hidden: bool, need_weight: bool,
                       compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean over ``count`` selected rows of ``chunk_loss`` on ``(hidden * scale) @ weight^T``, and its gradients.

    hidden: [N, d]; weight: [V, d]; rows: [M] long (None: all N rows, M = N) -> (loss [] in ``compute``,
    grad hidden [N, d] in hidden.dtype or None, grad weight [V, d] in weight.dtype or None).
    """
    need_grad = need_hidden or need_weight
    w = weight.detach().to(compute)  # one upcast for all chunks; a no-op for fp32 weights
    grad_h = torch.zeros_like(hidden) if need_hidden else None  # rows outside the selection get exactly zero
    grad_w = torch.zeros_like(w) if need_weight else None  # fp32 accumulator, cast once at the end
    total = torch.zeros((), dtype=compute, device=hidden.device)
    for sel in _row_chunks(rows, hidden.shape[0], chunk_size):
        h = (hidden[sel] if isinstance(sel, slice) else hidden.index_select(0, sel)).detach().to(compute)
        h = h * scale  # [c, d]
        logits = h @ w.T  # [c, V]
        loss_sum, dlogits = chunk_loss(logits, sel, need_grad)
        del logits
        total += loss_sum
        if dlogits is None:
            continue
        dlogits.div_(count)  # the mean over selected rows
        if grad_w is not None:
            grad_w.addmm_(dlogits.T, h)  # [V, c] @ [c, d]
        if grad_h is not None:
            gh = (dlogits @ w).mul_(scale)  # [c, d]: d(loss)/d(hidden) = d/d(h*scale) * scale
            if isinstance(sel, slice):
                grad_h[sel] = gh.to(grad_h.dtype)
            else:
                grad_h.index_copy_(0, sel, gh.to(grad_h.dtype))
        del dlogits
    loss = total / count if count > 0 else total
    return loss, grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None)


class _FusedLinearLossFunction(torch.autograd.Function):
    """Gradients are computed in ``forward``; ``backward`` scales them by ``grad_output``."""

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        go = grad_output.detach()
        grad_h = grad_h * go.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w * go.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return (grad_h, grad_w) + (None,) * ctx.num_extra_inputs

    @staticmethod
    def _save(ctx, hidden, weight, grad_h, grad_w, num_extra_inputs: int) -> None:
        empty = hidden.new_empty(0)  # save_for_backward needs tensors; an empty one stands for "no gradient"
        ctx.save_for_backward(grad_h if grad_h is not None else empty, grad_w if grad_w is not None else empty)
        ctx.num_extra_inputs = num_extra_inputs


class _FusedLinearKL(_FusedLinearLossFunction):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, s_scale, t_scale, rows, count, chunk_size, temperature):
        compute = _compute_dtype(s_hidden, s_weight, t_hidden, t_weight)
        t_w = t_weight.detach().to(compute)

        def chunk_loss(logits, sel, need_grad):
            t_h = (t_hidden[sel] if isinstance(sel, slice) else t_hidden.index_select(0, sel)).detach()
            t_logits = (t_h.to(compute) * t_scale) @ t_w.T  # [c, V]
            # sum_rows T^2 * KL and T * (p_s - p_t) over the student's logits: one Triton kernel on CUDA (two
            # passes over each row), a dozen PyTorch passes elsewhere
            return kl_rows(logits, t_logits, temperature, need_grad)

        with torch.autocast(device_type=s_hidden.device.type, enabled=False):
            loss, grad_h, grad_w = _fused_linear_loss(
                s_hidden, s_weight, s_scale, rows, count, chunk_size, chunk_loss,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], compute)
        _FusedLinearKL._save(ctx, s_hidden, s_weight, grad_h, grad_w, num_extra_inputs=8)
        return loss


class _FusedLinearCE(_FusedLinearLossFunction):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, rows, count, chunk_size):
        compute = _compute_dtype(hidden, weight)

        def chunk_loss(logits, sel, need_grad):
            target = labels[sel] if isinstance(sel, slice) else labels.index_select(0, sel)  # [c]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            picked = logits.gather(1, target[:, None]).squeeze(1)
            ce_sum = (lse - picked).sum()
            if not need_grad:
                return ce_sum, None
            # d(lse - z_y)/dz = softmax(z) - onehot(y)
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[torch.arange(dlogits.shape[0], device=dlogits.device), target] -= 1.0
            return ce_sum, dlogits

        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, grad_h, grad_w = _fused_linear_loss(
                hidden, weight, scale, rows, count, chunk_size, chunk_loss,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], compute)
        _FusedLinearCE._save(ctx, hidden, weight, grad_h, grad_w, num_extra_inputs=5)
        return loss


def _check_linear_inputs(name: str, hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{name}: expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}; flatten [B, T, d] to [B*T, d] first")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden width {hidden.shape[1]} != weight width {weight.shape[1]} "
                         f"(hidden [N, d], weight [V, d])")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def fused_linear_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, *, student_scale: float = 1.0, teacher_scale: float = 1.0,
                    mask: torch.Tensor | None = None, chunk_size: int = 4096,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over selected tokens of ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, logits never materialised.

    student_hidden: [N, d]; student_weight: [V, d]; teacher_hidden: [N, dt]; teacher_weight: [V, dt];
    mask: [N] bool (None: every token) -> loss [] (fp32; fp64 for fp64 inputs).
    ``z_s = (student_hidden * student_scale) @ student_weight^T`` and likewise ``z_t``, both in fp32, at most
    ``chunk_size`` rows at a time. Pass ``scale = 1 / config.logit_divisor`` to match ``SALAForCausalLM.logits``.
    Gradients flow to ``student_hidden`` and to ``student_weight`` when it requires grad, never to the teacher.
    No selected token gives 0 (with zero gradients).
    """
    _check_linear_inputs("student", student_hidden, student_weight, chunk_size)
    _check_linear_inputs("teacher", teacher_hidden, teacher_weight, chunk_size)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}; KL needs one vocabulary")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student has {student_hidden.shape[0]} tokens, teacher {teacher_hidden.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, count = _select(mask, student_hidden.shape[0], "mask")
    return _FusedLinearKL.apply(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
                                float(student_scale), float(teacher_scale), rows, count, chunk_size,
                                float(temperature))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               scale: float = 1.0, ignore_index: int = -100,
                               chunk_size: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy of ``(hidden * scale) @ weight^T`` over non-ignored labels, chunked.

    hidden: [N, d]; weight: [V, d]; labels: [N] long, already aligned with ``hidden`` (the caller shifts)
    -> loss [] (fp32; fp64 for fp64 inputs). All labels ignored gives 0 with the graph intact (zero gradients).
    """
    _check_linear_inputs("cross_entropy", hidden, weight, chunk_size)
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    labels = labels.long()
    keep = labels != ignore_index
    rows, count = _select(keep, hidden.shape[0], "labels")
    if count:
        bad = labels[keep]
        lo, hi = int(bad.min()), int(bad.max())  # host sync, once per call
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}, "
                             f"got values in [{lo}, {hi}]")
    return _FusedLinearCE.apply(hidden, weight, labels, float(scale), rows, count, chunk_size)


def _select(mask: torch.Tensor | None, n: int, name: str) -> tuple[torch.Tensor | None, int]:
    """mask [N] bool -> (row indices [M] or None for all rows, M)."""
    if mask is None:
        return None, n
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(f"{name} must be a bool tensor [N] = [{n}], got {mask.dtype} {tuple(mask.shape)}")
    if bool(mask.all()):  # host sync, once per call: slices beat a gather when nothing is masked
        return None, n
    rows = mask.nonzero().squeeze(1)
    return rows, rows.numel()


def alignment_mse(student_out: torch.Tensor, teacher_out: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32 over the selected tokens' features; the teacher side gets no gradient.

    student_out, teacher_out: [B, T, d] or [N, d]; mask: bool broadcastable to the token dims ([B, T] / [N],
    e.g. [1, T]; None: all) -> loss [] fp32 (fp64 for fp64 inputs). No selected token gives 0, graph intact.
    """
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student_out {tuple(student_out.shape)} and teacher_out {tuple(teacher_out.shape)} "
                         f"must have one shape")
    compute = _compute_dtype(student_out, teacher_out)
    teacher_out = teacher_out.detach()
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {mask.dtype}")
        try:
            mask = mask.expand(student_out.shape[:-1])
        except RuntimeError as e:
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the token dims "
                             f"{tuple(student_out.shape[:-1])}") from e
        student_out, teacher_out = student_out[mask], teacher_out[mask]  # [M, d]
        if student_out.shape[0] == 0:
            return student_out.sum().to(compute) * 0.0
    with torch.autocast(device_type=student_out.device.type, enabled=False):
        return F.mse_loss(student_out.to(compute), teacher_out.to(compute))
