"""Chunked fused-linear losses == unchunked autograd references (loss and grads), and no [N, V] allocation."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sala.train.losses import alignment_mse, fused_linear_cross_entropy, fused_linear_kl
from sala.utils.testing import assert_close

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ---------------------------------------------------------------------------------------------------------------
# references: full logits, plain autograd
# ---------------------------------------------------------------------------------------------------------------
def ref_kl(sh, sw, th, tw, s_scale, t_scale, mask, temperature):
    zs = (sh.to(sw.dtype) * s_scale) @ sw.T
    zt = (th * t_scale) @ tw.T
    kl = F.kl_div(torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1),
                  log_target=True, reduction="none").sum(-1)  # [N]
    kl = kl if mask is None else kl[mask]
    return kl.mean() * temperature**2


def ref_ce(h, w, labels, scale, ignore_index):
    return F.cross_entropy((h.to(w.dtype) * scale) @ w.T, labels, ignore_index=ignore_index)


def _inputs(N, d, V, dtype, dt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    sw = (torch.randn(V, d, generator=g, dtype=dtype) / d**0.5).requires_grad_()
    dt = dt or d
    th = torch.randn(N, dt, generator=g, dtype=dtype)
    tw = torch.randn(V, dt, generator=g, dtype=dtype) / dt**0.5
    return sh, sw, th, tw


def _holes(N, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, generator=g) > 0.3
    mask[:5] = False  # a hole at the start and the end, and whole chunks' worth of holes in the middle
    mask[-3:] = False
    mask[40:60] = False
    return mask


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


# ---------------------------------------------------------------------------------------------------------------
# fused_linear_kl
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "holes"])
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
def test_kl_matches_reference(dtype, masked, temperature):
    N, d, dt, V = 103, 24, 40, 317  # N not divisible by the chunk; teacher width differs
    sh, sw, th, tw = _inputs(N, d, V, dtype, dt=dt)
    mask = _holes(N) if masked else None
    kw = dict(student_scale=0.7, teacher_scale=1.3, mask=mask, temperature=temperature)
    loss = fused_linear_kl(sh, sw, th, tw, chunk_size=16, **kw)
    ref = ref_kl(sh, sw, th, tw, 0.7, 1.3, mask, temperature)
    assert loss.dtype == dtype and loss.shape == ()
    assert ref.item() > 0.1
    assert_close(loss, ref, RTOL[dtype], "loss")
    gh, gw = _grads(loss, sh, sw)
    for got, want, name in zip((gh, gw), _grads(ref, sh, sw), ("d hidden", "d weight")):
        assert_close(got, want, RTOL[dtype], name)
    if masked:  # unselected rows get exactly zero gradient
        assert gh[~mask].abs().max() == 0 and gh[mask].abs().min() > 0


def test_kl_grad_output_scaling_and_backward_through_graph():
    """backward scales the stored grads by grad_output: the loss can sit inside a larger expression."""
    sh, sw, th, tw = _inputs(37, 16, 101, torch.float64)
    loss = 3.0 * fused_linear_kl(sh, sw, th, tw, chunk_size=8) ** 2
    ref = 3.0 * ref_kl(sh, sw, th, tw, 1.0, 1.0, None, 1.0) ** 2
    for got, want in zip(_grads(loss, sh, sw), _grads(ref, sh, sw)):
        assert_close(got, want, 1e-10)


def test_kl_frozen_weight_and_no_teacher_grad():
    sh, sw, th, tw = _inputs(50, 16, 97, torch.float32)
    sw.requires_grad_(False)
    th.requires_grad_()
    tw.requires_grad_()
    loss = fused_linear_kl(sh, sw, th, tw, chunk_size=7)
    loss.backward()
    assert sw.grad is None and th.grad is None and tw.grad is None  # teacher never gets a gradient
    ref = ref_kl(sh, sw, th.detach(), tw.detach(), 1.0, 1.0, None, 1.0)
    assert_close(sh.grad, _grads(ref, sh)[0], 1e-5, "d hidden")


def test_kl_bf16_hidden_fp32_weight():
    """Autocast-style input: bf16 hidden, fp32 master weight; logits in fp32, grad in the input dtypes."""
    sh, sw, th, tw = _inputs(64, 32, 211, torch.float32)
    sh16 = sh.detach().bfloat16().requires_grad_()
    th16 = th.bfloat16()
    loss = fused_linear_kl(sh16, sw, th16, tw.bfloat16(), chunk_size=20)
    gh, gw = _grads(loss, sh16, sw)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    # the reference on the same bf16-rounded values, in fp32
    sh_r = sh16.detach().float().requires_grad_()
    ref = ref_kl(sh_r, sw, th16.float(), tw.bfloat16().float(), 1.0, 1.0, None, 1.0)
    rh, rw = _grads(ref, sh_r, sw)
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(gh.float(), rh, 1e-2, "d hidden")  # bf16 rounding of the returned gradient
    assert_close(gw, rw, 1e-5, "d weight")


def test_kl_bf16_weight_grad_cast_back():
    sh, sw, th, tw = _inputs(40, 16, 83, torch.float32)
    sw16 = sw.detach().bfloat16().requires_grad_()
    loss = fused_linear_kl(sh, sw16, th, tw, chunk_size=9)
    gw = _grads(loss, sw16)[0]
    assert gw.dtype == torch.bfloat16
    sw_r = sw16.detach().float().requires_grad_()
    assert_close(gw.float(), _grads(ref_kl(sh, sw_r, th, tw, 1.0, 1.0, None, 1.0), sw_r)[0], 1e-2, "d weight")


@pytest.mark.skipif(not hasattr(torch, "autocast"), reason="no autocast")
def test_kl_under_cpu_autocast_stays_fp32():
    """Under bf16 autocast the chunk GEMMs must not drop to bf16 (they run with autocast off)."""
    sh, sw, th, tw = _inputs(33, 16, 71, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_kl(sh, sw, th, tw, chunk_size=8)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_kl(sh, sw, th, tw, 1.0, 1.0, None, 1.0), 1e-5, "loss")


def test_kl_empty_mask_is_zero_with_zero_grads():
    sh, sw, th, tw = _inputs(10, 8, 31, torch.float32)
    loss = fused_linear_kl(sh, sw, th, tw, mask=torch.zeros(10, dtype=torch.bool))
    gh, gw = _grads(loss, sh, sw)
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_kl_identical_models_give_zero():
    sh, sw, _, _ = _inputs(20, 8, 31, torch.float64)
    loss = fused_linear_kl(sh, sw, sh.detach(), sw.detach(), chunk_size=6)
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("bad, match", [
    (dict(student_weight=torch.randn(30, 8)), "vocabularies differ"),
    (dict(student_hidden=torch.randn(10, 9)), "hidden width 9 != weight width 8"),
    (dict(teacher_hidden=torch.randn(11, 8)), "student has 10 tokens, teacher 11"),
    (dict(mask=torch.ones(10)), "mask must be a bool tensor"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(student_hidden=torch.randn(2, 5, 8)), "flatten"),
])
def test_kl_errors(bad, match):
    args = dict(student_hidden=torch.randn(10, 8), student_weight=torch.randn(31, 8),
                teacher_hidden=torch.randn(10, 8), teacher_weight=torch.randn(31, 8))
    args.update(bad)
    kw = {k: args.pop(k) for k in ("mask", "temperature", "chunk_size") if k in args}
    with pytest.raises(ValueError, match=match):
        fused_linear_kl(*args.values(), **kw)


# ---------------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("ignored", [False, True], ids=["all", "ignored"])
def test_ce_matches_reference(dtype, ignored):
    N, d, V = 91, 24, 257
    sh, sw, _, _ = _inputs(N, d, V, dtype)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    if ignored:
        labels[~_holes(N)] = -1
    loss = fused_linear_cross_entropy(sh, sw, labels, scale=0.5, ignore_index=-1, chunk_size=16)
    ref = ref_ce(sh, sw, labels, 0.5, -1)
    assert loss.dtype == dtype and loss.shape == ()
    assert_close(loss, ref, RTOL[dtype], "loss")
    for got, want, name in zip(_grads(loss, sh, sw), _grads(ref, sh, sw), ("d hidden", "d weight")):
        assert_close(got, want, RTOL[dtype], name)


def test_ce_frozen_weight_bf16_hidden():
    sh, sw, _, _ = _inputs(48, 16, 129, torch.float32)
    sw.requires_grad_(False)
    sh16 = sh.detach().bfloat16().requires_grad_()
    labels = torch.randint(0, 129, (48,))
    loss = fused_linear_cross_entropy(sh16, sw, labels, chunk_size=10)
    loss.backward()
    assert sw.grad is None and sh16.grad.dtype == torch.bfloat16
    sh_r = sh16.detach().float().requires_grad_()
    ref = ref_ce(sh_r, sw, labels, 1.0, -100)
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(sh16.grad.float(), _grads(ref, sh_r)[0], 1e-2, "d hidden")


def test_ce_all_ignored_is_zero_with_graph():
    sh, sw, _, _ = _inputs(12, 8, 31, torch.float32)
    loss = fused_linear_cross_entropy(sh, sw, torch.full((12,), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert sh.grad.abs().max() == 0 and sw.grad.abs().max() == 0


def test_ce_errors():
    h, w = torch.randn(6, 8), torch.randn(31, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 31\)"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 31, -100, 4]))
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[6\]"):
        fused_linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be int64"):
        fused_linear_cross_entropy(h, w, torch.zeros(6))


# ---------------------------------------------------------------------------------------------------------------
# memory: no [N, V] tensor, ever
# ---------------------------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest numel among the outputs of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("which", ["kl", "ce"])
def test_never_materialises_full_logits(which):
    """N x V fp32 logits would be 1 GiB; every tensor created must stay within one chunk's [chunk, V]."""
    N, V, d, chunk = 4096, 65536, 64, 256
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).requires_grad_()
    w = (torch.randn(V, d, generator=g) / 8).requires_grad_()
    start = time.perf_counter()
    with _LargestTensor() as spy:
        if which == "kl":
            mask = torch.rand(N, generator=g) > 0.5
            loss = fused_linear_kl(h, w, torch.randn(N, d, generator=g), w.detach() * 0.5, mask=mask,
                                   chunk_size=chunk)
        else:
            loss = fused_linear_cross_entropy(h, w, torch.randint(0, V, (N,), generator=g), chunk_size=chunk)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert spy.largest <= chunk * V, f"largest tensor {spy.largest} elements > one chunk {chunk * V}"
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------------------------------------
# alignment_mse
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, mask_shape", [((2, 9, 5), (2, 9)), ((2, 9, 5), (1, 9)), ((13, 5), (13,))],
                         ids=["BTd", "BTd-bcast", "Nd"])
def test_alignment_mse(shape, mask_shape):
    s = torch.randn(shape, dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(shape, dtype=torch.bfloat16).requires_grad_()
    mask = torch.rand(mask_shape) > 0.4
    mask.view(-1)[0] = False
    mask.view(-1)[1] = True
    loss = alignment_mse(s, t, mask)
    sel = mask.expand(shape[:-1])
    ref = ((s.detach().float() - t.detach().float())[sel] ** 2).mean()
    assert loss.dtype == torch.float32
    assert_close(loss, ref, 1e-6, "mse")
    loss.backward()
    assert t.grad is None  # the teacher side is a target
    assert s.grad[~sel].abs().max() == 0 and s.grad[sel].abs().max() > 0
    assert_close(alignment_mse(s, t), ((s.detach().float() - t.detach().float()) ** 2).mean(), 1e-6, "no mask")


def test_alignment_mse_empty_mask_and_errors():
    s = torch.randn(2, 3, 4, requires_grad=True)
    loss = alignment_mse(s, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="must have one shape"):
        alignment_mse(s, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        alignment_mse(s, torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))
