"""The reference distillation KL of logit rows (PyTorch, in place over the two buffers)."""

from __future__ import annotations

import torch


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, overwriting ``logits`` [c, V]."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def naive_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See :func:`sala.ops.kl.kl_rows`. Both buffers are overwritten (fewer [c, V] buffers alive at once)."""
    if temperature != 1.0:
        student_logits.mul_(1.0 / temperature)
        teacher_logits.mul_(1.0 / temperature)
    logp_s = _log_softmax_(student_logits)
    logp_t = _log_softmax_(teacher_logits)
    p_t = logp_t.exp()
    diff = logp_t.sub_(logp_s)  # logp_t is not needed again
    kl_sum = torch.dot(p_t.view(-1), diff.view(-1)) * temperature**2  # sum_rows KL * T^2 (Hinton)
    del diff
    if not need_grad:
        return kl_sum, None
    # d(T^2 KL)/d(student logits) = T^2 * (p_s - p_t) / T
    return kl_sum, logp_s.exp_().sub_(p_t).mul_(temperature)
