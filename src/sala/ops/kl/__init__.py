"""Distillation KL of logit rows: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per row and its gradient
w.r.t. the student's logits, for one chunk of the vocabulary-wide training loss (:mod:`sala.train.losses`).

``naive``: PyTorch, about a dozen passes over the ``[c, V]`` fp32 buffers (log-softmax of both, exp, difference,
dot, gradient). ``triton`` (fp32 rows; CUDA or the interpreter): one program per row, an online-softmax pass for
both log-normalisers and the KL, and a second pass that writes the gradient over the student's logits -- two
reads of each row and one write.
"""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register
from sala.ops.kl.naive import naive_kl_rows

__all__ = ["kl_rows", "naive_kl_rows"]


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, need_grad: bool,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """student_logits, teacher_logits: [c, V] float (raw logits; both are overwritten) ->
    (sum over rows of ``T^2 * KL(p_t || p_s)`` [] in their dtype, ``d(sum)/d(student_logits)`` [c, V] or None).

    The gradient is ``T * (p_s - p_t)``; it is written into ``student_logits``' storage and returned."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"kl_rows wants student and teacher logits of one shape [c, V]; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.dtype != teacher_logits.dtype:
        raise ValueError(f"kl_rows wants one dtype; got {student_logits.dtype} and {teacher_logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return call("kl_rows", backend, student_logits.device, student_logits, teacher_logits, float(temperature),
                bool(need_grad))


register("kl_rows", "naive", naive_kl_rows)


@register("kl_rows", "triton", accepts=lambda s, t, temperature, need_grad: (
    s.dtype == torch.float32 and s.stride(-1) == 1 and t.stride(-1) == 1 and s.shape[0] > 0 and s.shape[1] > 0))
def _triton_kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, need_grad: bool):
    from sala.ops.kl.triton_kl import triton_kl_rows

    return triton_kl_rows(s, t, temperature, need_grad)
