"""FP8 (e4m3) quantisation and ``fp8_linear``: scale rules, error bounds, per-channel isolation, the reference vs
an independent fp64 computation and vs the unquantised linear, the CPU ``_scaled_mm`` backend vs the reference,
input errors; the CUDA GEMM vs the reference on a GPU."""

from __future__ import annotations

import pytest
import torch

from sala.ops import fp8_linear, quantize_fp8_activation, quantize_fp8_weight
from sala.ops.fp8 import FP8_DTYPE, dequantize_fp8_weight, naive_fp8_linear
from sala.ops.fp8.naive import gptq_fp8_weight
from sala.utils.testing import assert_close, rel_l2

E4M3_MAX = 448.0
E4M3_INV = 1.0 / E4M3_MAX  # the scale rule: absmax * fp32(1 / 448), the same number on every device


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _fp64_reference(x, q, s, bias=None):
    """dequant(W) @ dequant(x)^T + bias in fp64, computed here from the scale rules (not with the module's code)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    xs = x64.abs().amax(-1, keepdim=True).float() * E4M3_INV
    xs = torch.where(xs > 0, xs, torch.ones_like(xs)).float()  # the scale is an fp32 number, like the module's
    xq = (x64.float() / xs).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    out = (xq.double() * xs.double()) @ (q.double() * s.double()[:, None]).t()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], q.shape[0])


@pytest.mark.parametrize("shape", [(64, 96), (7, 300), (1, 16)])
def test_weight_quantisation_error_and_exact_scales(shape):
    w = 0.05 * _randn(*shape, seed=shape[1])
    q, s = quantize_fp8_weight(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert torch.equal(s, w.abs().amax(1) * E4M3_INV)  # scale = absmax * fp32(1/448) exactly, per channel
    assert torch.equal(q.float().abs().amax(1), torch.full((shape[0],), E4M3_MAX))  # each row's absmax hits 448
    assert_close(dequantize_fp8_weight(q, s), w, 4e-2, "dequantised weight")
    assert rel_l2(dequantize_fp8_weight(q, s), w) > 1e-3  # it is really quantised (3 mantissa bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_activation_scales_are_per_token(dtype):
    x = (3 * _randn(2, 5, 64, seed=4)).to(dtype)
    x[1, 2] *= 1000  # one loud token must not coarsen the others
    q, s = quantize_fp8_activation(x)
    assert q.shape == x.shape and s.shape == (2, 5, 1) and s.dtype == torch.float32
    assert torch.equal(s, x.float().abs().amax(-1, keepdim=True) * E4M3_INV)
    deq = q.float() * s
    for b in range(2):
        for t in range(5):
            assert_close(deq[b, t], x[b, t].float(), 4e-2, f"token {b},{t}")


def test_zero_rows_get_unit_scale_and_stay_zero():
    w = _randn(6, 32, seed=2)
    w[1] = 0
    w[4] = 0
    q, s = quantize_fp8_weight(w)
    assert s[1] == 1 and s[4] == 1 and torch.isfinite(s).all()
    deq = dequantize_fp8_weight(q, s)
    assert torch.isfinite(deq).all() and (deq[1] == 0).all() and (deq[4] == 0).all()
    x = _randn(3, 32, seed=3)
    x[2] = 0
    xq, xs = quantize_fp8_activation(x)
    assert xs[2, 0] == 1 and (xq[2].float() == 0).all()
    out = fp8_linear(x, q, s, backend="naive")
    assert torch.isfinite(out).all() and (out[2] == 0).all() and (out[:, 1] == 0).all()


def test_values_past_448_after_scaling_stay_finite():
    """A row of fp32 subnormals gets a subnormal scale rounded down by ~5%, so x / scale reaches ~470 > 448: the
    clamp keeps the cast finite (torch 2.13's CPU cast also saturates; other devices and versions need not)."""
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # the smallest fp32 subnormal
    w = torch.tensor([[10.49 * tiny * E4M3_MAX, 1e-42, -3e-43], [448.0, -3e4, 1.0]])
    assert (w[0, 0] / (w[0].abs().max() * E4M3_INV)) > 460
    q, s = quantize_fp8_weight(w)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == E4M3_MAX
    assert_close(dequantize_fp8_weight(q, s)[1], w[1], 4e-2, "large row")


def test_an_outlier_channel_does_not_hurt_the_others():
    w = 0.02 * _randn(32, 128, seed=5)
    w[7] *= 1e6  # one channel with outliers
    q, s = quantize_fp8_weight(w)
    deq = dequantize_fp8_weight(q, s)
    keep = torch.arange(32) != 7
    assert_close(deq[keep], w[keep], 4e-2, "other channels")
    assert torch.equal(deq[keep], dequantize_fp8_weight(*quantize_fp8_weight(w[keep])))  # as if it were absent
    # with one scale for the whole tensor the other channels would fall below e4m3's smallest subnormal (zero)
    ts = w.abs().max() / E4M3_MAX
    per_tensor = (w / ts).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float() * ts
    assert rel_l2(per_tensor[keep], w[keep]) > 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("lead", [(9,), (2, 5), (2, 3, 4)], ids=["2d", "3d", "4d"])
def test_reference_matches_fp64_and_the_unquantised_linear(dtype, bias, lead):
    K, N = 96, 48
    x = (2 * _randn(*lead, K, seed=len(lead))).to(dtype)
    w = 0.1 * _randn(N, K, seed=11)
    b = 0.3 * _randn(N, seed=12) if bias else None
    q, s = quantize_fp8_weight(w)
    out = fp8_linear(x, q, s, b, backend="naive")
    assert out.shape == (*lead, N) and out.dtype == dtype
    rtol = 1e-6 if dtype == torch.float32 else (8e-3 if dtype == torch.bfloat16 else 1e-3)
    assert_close(out, _fp64_reference(x, q, s, b), rtol, "naive vs fp64 dequantised product")
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert_close(out, exact, 6e-2, "fp8 vs unquantised linear")
    assert rel_l2(out, exact) > 1e-3  # the activation and weight rounding really happen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["same", "fp32-out"])
def test_cpu_scaled_mm_matches_reference(dtype, out_dtype):
    x = _randn(3, 7, 64, seed=21, dtype=dtype)
    q, s = quantize_fp8_weight(0.1 * _randn(40, 64, seed=22))
    b = 0.2 * _randn(40, seed=23)
    got = fp8_linear(x, q, s, b, out_dtype=out_dtype, backend="cpu")
    want = naive_fp8_linear(x, q, s, b, out_dtype or dtype)
    assert got.dtype == want.dtype and got.shape == want.shape == (3, 7, 40)
    assert_close(got, want, 1e-6 if got.dtype == torch.float32 else 8e-3, "cpu _scaled_mm vs reference")
    assert fp8_linear(x, q, s, b, out_dtype=out_dtype).dtype == want.dtype  # auto takes the same path


@pytest.mark.parametrize("backend", ["naive", "cpu"])
def test_empty_batches(backend):
    q, s = quantize_fp8_weight(_randn(16, 32))
    assert fp8_linear(torch.randn(0, 32), q, s, _randn(16), backend=backend).shape == (0, 16)
    assert fp8_linear(torch.randn(2, 0, 32).bfloat16(), q, s, backend=backend).shape == (2, 0, 16)


def test_bad_inputs_are_refused_clearly():
    x = _randn(4, 32)
    q, s = quantize_fp8_weight(_randn(8, 32, seed=1))
    with pytest.raises(ValueError, match="q_weight of dtype torch.float8_e4m3fn"):
        fp8_linear(x, q.float(), s)
    with pytest.raises(ValueError, match=r"in = x.shape\[-1\] = 16"):
        fp8_linear(x[:, :16], q, s)
    with pytest.raises(ValueError, match=r"\(row-wise\) wants w_scale \[8\] float32"):
        fp8_linear(x, q, s[:4])
    with pytest.raises(ValueError, match=r"\(row-wise\) wants w_scale \[8\] float32"):
        fp8_linear(x, q, s.bfloat16())
    with pytest.raises(ValueError, match=r"bias \[out\] = \[8\]"):
        fp8_linear(x, q, s, torch.ones(32))
    with pytest.raises(ValueError, match="x in float16, bfloat16 or float32"):
        fp8_linear(x.double(), q, s)
    with pytest.raises(ValueError, match="out_dtype must be"):
        fp8_linear(x, q, s, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"float weight \[out, in\]"):
        quantize_fp8_weight(_randn(2, 3, 4))
    with pytest.raises(ValueError, match="float tensor"):
        quantize_fp8_activation(torch.ones(3, 4, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64, 128, 256, 512, 1024])
def test_cuda_group_gemm_matches_reference(group):
    """The Triton group-scale kernel compiled on a GPU, prefill- and decode-sized M, against the reference (groups
    past 128 run in K steps of 128, so every size fits shared memory)."""
    _check_cuda_group_linear(1536, 576, group, (1, 7, 300), seed=35)


def _check_cuda_group_linear(n: int, k: int, group: int, ms: tuple[int, ...], seed: int) -> None:
    """fp8_linear (triton backend, bf16) on a fresh [n, k] weight vs the reference, for each token count in ms."""
    dev = torch.device("cuda")
    q, s = quantize_fp8_weight((0.05 * _randn(n, k, seed=seed)).to(dev), group)
    for m in ms:
        x = (2 * _randn(m, k, seed=seed + 1)).bfloat16().to(dev)
        with torch.no_grad():
            got = fp8_linear(x, q, s, backend="triton", group_size=group)
            want = naive_fp8_linear(x, q, s, None, torch.bfloat16, group)
        assert_close(got.float(), want.float(), 8e-3, f"cuda group fp8 linear [{n}, {k}] vs reference, M={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("group", [64, 128, 256])
def test_cuda_decode_split_k_matches_reference(group):
    """Decode-sized M on a shape whose N leaves SMs idle (512 outputs: 8 tiles), so K (4,096) is split over CTAs;
    groups <= 128 quantise inside the kernel, 256 takes the quantiser first."""
    from sala.ops.fp8.triton_gemm import _sm_count, split_k_plan

    assert split_k_plan(8, 4096 // min(group, 128), _sm_count(torch.cuda.current_device())) > 1
    _check_cuda_group_linear(512, 4096, group, (1, 8, 16), seed=63)


@pytest.mark.gpu
def test_cuda_split_k_in_a_graph_replays_right():
    """The one-launch split-K (the last CTA of each tile adds the partials, then resets its arrival counter) in a
    CUDA graph, as the engine decodes: replays with new inputs give the reference's numbers, counters end at 0."""
    from sala.ops.fp8.triton_gemm import _ARRIVALS, triton_fp8_group_gemm

    dev = torch.device("cuda")
    q, s = quantize_fp8_weight((0.05 * _randn(512, 4096, seed=64)).to(dev), 128)
    x = torch.empty(4, 4096, dtype=torch.bfloat16, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x.copy_(_randn(4, 4096, seed=65))
        triton_fp8_group_gemm(x, None, q, s, None, torch.bfloat16, 128, split_k=6)  # compile and allocate outside
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = triton_fp8_group_gemm(x, None, q, s, None, torch.bfloat16, 128, split_k=6)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (66, 67, 68):
        x.copy_(_randn(4, 4096, seed=seed))
        graph.replay()
        want = naive_fp8_linear(x, q, s, None, torch.bfloat16, 128)
        assert_close(out.float(), want.float(), 8e-3, f"graph replay (seed {seed}) vs reference")
    torch.cuda.synchronize()
    assert all(not c.any() for d, sets in _ARRIVALS.items() if d.type == "cuda" for c in sets)


@pytest.mark.gpu
def test_cuda_prefill_group_128_path_matches_reference():
    """Prefill-sized M with groups of 128: cuBLAS block scaling where this torch takes it, else the Triton GEMM;
    either way the reference's numbers."""
    from sala.ops.fp8.blockwise import pick_layout

    dev = torch.device("cuda")
    q, s = quantize_fp8_weight((0.05 * _randn(1024, 1536, seed=61)).to(dev), 128)
    x = (2 * _randn(700, 1536, seed=62)).bfloat16().to(dev)
    with torch.no_grad():
        got = fp8_linear(x, q, s, backend="triton", group_size=128)
        want = naive_fp8_linear(x, q, s, None, torch.bfloat16, 128)
    assert_close(got.float(), want.float(), 8e-3, "prefill group-128 fp8 linear vs reference")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 11):  # took it on an H200, Dec 5 2026
        assert pick_layout(dev) is not None, "cuBLAS block scaling was not used"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_cuda_scaled_mm_matches_reference(dtype, bias):
    """The CUDA GEMM (row-wise ``_scaled_mm`` for bf16 outputs, unit-scale fp32 GEMM + scales otherwise) vs the
    reference on the same device; shapes not multiples of 16 decline to the reference."""
    from sala.ops.common.dispatch import resolve

    dev = torch.device("cuda")
    x = (2 * _randn(3, 37, 256, seed=31)).to(dtype).to(dev)  # 111 tokens: M need not be a multiple of 16
    q, s = quantize_fp8_weight((0.05 * _randn(384, 256, seed=32)).to(dev))
    b = (0.2 * _randn(384, seed=33)).to(dev) if bias else None
    with torch.no_grad():
        got = fp8_linear(x, q, s, b, backend="triton")
        want = naive_fp8_linear(x, q, s, b, dtype)
    assert got.dtype == dtype and got.shape == (3, 37, 384)
    # fp32 out: Hopper's fp8 tensor cores accumulate with fewer bits than fp32 (DeepSeek-V3 report §3.3.2); measured
    # 1.3e-4 on an H200 over K=256 (the group kernel promotes to fp32 every <= 128 columns instead)
    assert_close(got.float(), want.float(), 5e-4 if dtype == torch.float32 else 8e-3, "cuda fp8 GEMM vs reference")
    assert resolve("fp8_linear", "auto", dev, x, q, s, b, dtype, None).__name__ == "_triton_fp8_linear"
    q2, s2 = quantize_fp8_weight((0.05 * _randn(40, 256, seed=34)).to(dev))  # out = 40: not a multiple of 16
    assert resolve("fp8_linear", "auto", dev, x, q2, s2, None, dtype, None) is naive_fp8_linear


# ---------------------------------------------------------------------------------------------------------------
# group-wise scales
# ---------------------------------------------------------------------------------------------------------------
def _fp64_group_reference(x, q, s, group, bias=None):
    """The group-wise fp8 linear in fp64 from the scale rules, group by group (not with the module's code)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    out = torch.zeros(x64.shape[0], q.shape[0], dtype=torch.float64)
    for g, k0 in enumerate(range(0, x64.shape[1], group)):
        xg = x64[:, k0:k0 + group]
        xs = xg.abs().amax(-1, keepdim=True).float() * E4M3_INV
        xs = torch.where(xs > 0, xs, torch.ones_like(xs))
        xq = (xg.float() / xs).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
        out += (xq.double() @ q[:, k0:k0 + group].double().t()) * xs.double() * s[:, g].double()[None, :]
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], q.shape[0])


@pytest.mark.parametrize("shape,group", [((16, 96), 32), ((5, 200), 64), ((3, 576), 128)])
def test_group_scales_are_exact_per_group_with_a_ragged_tail(shape, group):
    w = 0.05 * _randn(*shape, seed=shape[1])
    q, s = quantize_fp8_weight(w, group)
    n_groups = -(-shape[1] // group)
    assert s.shape == (shape[0], n_groups) and s.dtype == torch.float32
    for g in range(n_groups):
        block = w[:, g * group:(g + 1) * group]  # the last one is shorter when group does not divide in
        assert torch.equal(s[:, g], block.abs().amax(1) * E4M3_INV), f"group {g}"
        assert torch.equal(q[:, g * group:(g + 1) * group].float().abs().amax(1), torch.full((shape[0],), E4M3_MAX))
    assert_close(dequantize_fp8_weight(q, s, group), w, 4e-2, "dequantised weight")


def test_a_loud_group_does_not_coarsen_its_row():
    """Row-wise scales give a 1e5x louder group's neighbours fp8 subnormals; group scales keep them at full
    relative precision."""
    x = _randn(4, 128, seed=8)
    x[:, :32] *= 1e5
    rowwise = quantize_fp8_activation(x)
    grouped = quantize_fp8_activation(x, 32)
    assert grouped[1].shape == (4, 4)
    quiet = slice(32, 128)
    err_row = rel_l2(rowwise[0].float()[:, quiet] * rowwise[1], x[:, quiet])
    err_group = rel_l2((grouped[0].float() * grouped[1].repeat_interleave(32, -1))[:, quiet], x[:, quiet])
    assert err_group < 4e-2 < err_row


@pytest.mark.parametrize("backend", ["naive", "cpu"])
@pytest.mark.parametrize("shape,group", [((2, 7, 96), 32), ((9, 200), 64)])
def test_group_linear_matches_fp64(backend, shape, group):
    x = (2 * _randn(*shape, seed=11)).bfloat16()
    q, s = quantize_fp8_weight(0.05 * _randn(40, shape[-1], seed=12), group)
    b = 0.2 * _randn(40, seed=13)
    with torch.no_grad():
        got = fp8_linear(x, q, s, b, out_dtype=torch.float32, backend=backend, group_size=group)
    assert got.shape == (*shape[:-1], 40)
    assert_close(got.double(), _fp64_group_reference(x.float(), q, s, group, b), 1e-6, "group fp8 linear vs fp64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m,k,n,group", [(5, 96, 40, 32), (37, 200, 72, 64), (1, 576, 33, 128), (3, 600, 20, 256),
                                         (2, 1100, 24, 512)])
def test_triton_group_gemm_matches_reference(monkeypatch, dtype, m, k, n, group):
    """The Triton kernel in the interpreter: ragged K tails, M and N not multiples of the tiles, one-row decode."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = (2 * _randn(m, k, seed=21)).to(dtype)
    q, s = quantize_fp8_weight(0.05 * _randn(n, k, seed=22), group)
    b = (0.2 * _randn(n, seed=23)).to(dtype)
    with torch.no_grad():
        got = fp8_linear(x, q, s, b, backend="triton", group_size=group)
        want = fp8_linear(x, q, s, b, backend="naive", group_size=group)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # one rounding of the output (the interpreter accumulates in fp32)
    assert_close(got.float(), want.float(), tol, "triton group GEMM vs reference")
    assert_close(got.double(), _fp64_group_reference(x.float(), q, s, group, b.float()), max(tol, 1e-6), "vs fp64")


def test_group_gemm_refuses_scales_of_another_layout(monkeypatch):
    """The kernel indexes scales by K step: a scale tensor of another group count would be read out of bounds."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm

    q, s = quantize_fp8_weight(0.05 * _randn(24, 256, seed=41), 64)
    xq, xs = quantize_fp8_activation(_randn(3, 256, seed=42), 128)  # 2 groups where the weight has 4
    with pytest.raises(ValueError, match="x_scale has 2 groups per row; K=256 in groups of 64 needs 4"):
        triton_fp8_group_gemm(xq, xs, q, s, None, torch.float32, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,group", [(5, 96, 32), (9, 200, 64), (3, 1100, 512), (6, 300, None), (2, 2100, None)])
def test_triton_quantizer_gives_the_reference_codes_and_scales(monkeypatch, dtype, m, k, group):
    """The one-pass quantiser (interpreter): the same codes and scales as the PyTorch reference, bit for bit, for
    groups narrower and wider than its column tile, ragged tails and row-wise scales; subnormal codes and an
    all-zero row (scale 1) included."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_quantize_groups

    x = (3 * _randn(m, k, seed=k)).to(dtype)
    x[0, : k // 3] *= 1e-4  # codes in e4m3's subnormal range next to loud ones
    x[0, 1] = -0.0  # keeps its sign bit (code 0x80)
    x[-1] = 0
    got_q, got_s = triton_quantize_groups(x, group)
    want_q, want_s = quantize_groups(x, group)
    assert got_q.dtype == FP8_DTYPE and got_q.shape == want_q.shape and got_s.shape == want_s.shape
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    cm_q, cm_s = triton_quantize_groups(x, group, scales_column_major=True)
    assert cm_s.stride() == (1, m) and torch.equal(cm_s, want_s) and torch.equal(cm_q.view(torch.uint8),
                                                                              want_q.view(torch.uint8))
    # another launch shape (more rows per program, a wider column tile): the same numbers
    tq, ts = triton_quantize_groups(x, group, tile=(1024, 1))
    assert torch.equal(ts, want_s) and torch.equal(tq.view(torch.uint8), want_q.view(torch.uint8))


def _quotient_cases() -> tuple[torch.Tensor, torch.Tensor]:
    """(x [R, C], scale [R]) rows of the kinds a quantiser meets: bf16 activations under their row's absmax, values
    within a few ulp of an e4m3 rounding midpoint times the scale, signed zeros, and rows whose scale is tiny
    (1 / scale overflows fp32), small (the remainder underflows without the rescale) or huge; scales as the
    quantisers make them (absmax * fp32(1/448), 1 where that is 0)."""
    g = torch.Generator().manual_seed(7)
    rows, cols = 96, 256
    x = torch.randn(rows, cols, generator=g).bfloat16().float() * torch.exp2(torch.randint(-30, 30, (rows, 1),
                                                                                          generator=g).float())
    mids = torch.tensor([(1 + (m + 0.5) / 8) * 2.0 ** e for e in range(-9, 9) for m in range(8)])
    amax = x.abs().amax(1)
    scale = amax * torch.tensor(E4M3_INV)
    near = scale[:, None] * mids[torch.randint(0, len(mids), (rows, cols), generator=g)]
    near = (near.view(torch.int32) + torch.randint(-2, 3, (rows, cols), generator=g, dtype=torch.int32)).view(
        torch.float32) * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    x = torch.where(torch.arange(cols) % 2 == 0, x, near.clamp(-amax[:, None], amax[:, None]))
    # rows with a set absmax: subnormal scales (1 / scale overflows fp32), small ones (the remainder underflows for
    # tiny x unless rescaled), huge ones; row 8's absmax is too small for a nonzero scale (scale 1)
    absmax = torch.tensor([1e-41, 1e-39, 1e-36, 1e-30, 1e-20, 1e-14, 1e30, 1e37, 1e-43])
    x[:9] = x[:9] / x[:9].abs().amax(1, True) * absmax[:, None]
    x[9, :5] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 0.0])
    x[10, :2] = torch.tensor([1.255502939364662e-16, 2.8340498766545383e-32])  # quotient 2^-43; r underflows at 2^-62
    x[10, 2:] = x[10, 2:].clamp(-1e-16, 1e-16)
    scale = x.abs().amax(1) * torch.tensor(E4M3_INV)
    return x, torch.where(scale > 0, scale, torch.ones_like(scale))


def _check_quotient(device: torch.device) -> None:
    pytest.importorskip("triton")
    from tests.ops.fp8_quotient_kernel import quotient_kernel

    x, scale = (t.to(device) for t in _quotient_cases())
    got = torch.empty_like(x)
    quotient_kernel[(x.shape[0],)](x, scale, got, C=x.shape[1])
    got, want = got.cpu(), (x / scale[:, None]).cpu()  # torch's division is IEEE on both devices
    big = want.abs() >= 2.0**-60
    assert big.sum() > 0.9 * x.numel()
    assert torch.equal(got.view(torch.int32)[big], want.view(torch.int32)[big])

    def codes(q):
        return q.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).view(torch.uint8)

    assert torch.equal(codes(got), codes(want))
    assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_codes_divide_like_ieee_division(monkeypatch):
    """The quantisers' quotient (one correctly rounded reciprocal per row and an FMA correction, interpreter) is
    x / scale as IEEE division computes it, bit for bit, wherever the quotient is >= 2^-60 (below that, intermediate
    underflow is allowed); the e4m3 codes, signed zeros included, match everywhere, tiny and huge scales too."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check_quotient(torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_codes_divide_like_ieee_division():
    """The same on the GPU: the compiled div.rn reciprocal and FFMAs against CUDA's IEEE division."""
    _check_quotient(torch.device("cuda"))


def test_a_group_too_small_for_a_scale_gets_scale_1(monkeypatch):
    """absmax * fp32(1/448) underflows to 0 below 224 * 2^-149: such a group takes scale 1 and zero codes, in the
    reference and in the Triton quantiser alike (before, the reference divided by 0 and the quantiser clamped NaN
    to -448)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_quantize_groups

    x = 2 * _randn(3, 32, seed=61)
    x[1, :16] = torch.tensor([1e-43, -1e-43, 5e-44] + [0.0] * 13)
    want_q, want_s = quantize_groups(x, 16)
    assert want_s[1, 0] == 1 and not want_q.float().isnan().any()
    assert torch.equal(want_q[1, :16].float().abs(), torch.zeros(16))
    got_q, got_s = triton_quantize_groups(x, 16)
    assert torch.equal(got_s, want_s) and torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("m,k,n,group,split", [(1, 576, 40, 128, 3), (7, 1000, 24, 64, 4), (3, 600, 20, 256, 2),
                                               (20, 512, 33, 32, 5)])
def test_triton_group_gemm_split_k_and_in_kernel_quantisation(monkeypatch, m, k, n, group, split):
    """Split-K (fp32 partial sums of K ranges, then one reduction and the bias) and the decode path that quantises
    the activations inside the GEMM: both against the reference, in the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm

    x = 2 * _randn(m, k, seed=51)
    q, s = quantize_fp8_weight(0.05 * _randn(n, k, seed=52), group)
    b = 0.2 * _randn(n, seed=53)
    want = naive_fp8_linear(x, q, s, b, torch.float32, group)
    xq, xs = quantize_groups(x, group)
    got = triton_fp8_group_gemm(xq, xs, q, s, b, torch.float32, group, split_k=split)
    assert_close(got, want, 1e-6, f"split-K x{split} vs reference")
    from sala.ops.fp8.triton_gemm import _ARRIVALS

    assert not any(c.any() for c in _ARRIVALS[torch.device("cpu")])  # the last split of each tile reset its counter
    if group <= 128:
        for sk in (1, split):
            got = triton_fp8_group_gemm(x, None, q, s, b, torch.float32, group, split_k=sk)
            assert_close(got, want, 1e-6, f"in-kernel quantisation, split-K x{sk}, vs reference")
        # another launch shape (narrow N tiles, taller M tiles): the same result
        got = triton_fp8_group_gemm(x, None, q, s, b, torch.float32, group, plan=(32, 16, 1, 1))
        assert_close(got, want, 1e-6, "in-kernel quantisation, 32 x 16 tiles, vs reference")
        got16 = triton_fp8_group_gemm(x.bfloat16(), None, q, s, b, torch.bfloat16, group, split_k=split)
        want16 = naive_fp8_linear(x.bfloat16(), q, s, b, torch.bfloat16, group)
        assert_close(got16.float(), want16.float(), 8e-3, "bf16 in and out, in-kernel quantisation")
    else:
        with pytest.raises(ValueError, match="groups of <= 128"):
            triton_fp8_group_gemm(x, None, q, s, b, torch.float32, group)
    with pytest.raises(ValueError, match="not fp8 codes"):
        triton_fp8_group_gemm(xq, None, q, s, b, torch.float32, 64)


@pytest.mark.parametrize("m,k,n,split", [(1, 640, 48, 3), (9, 384, 40, 1), (16, 512, 33, 2)])
def test_transposed_decode_product_matches_reference(monkeypatch, m, k, n, split):
    """The decode plans' transposed product (``swap``: C^T = W @ x^T, the weight tile as the MMA's M operand), with
    in-kernel and prior quantisation, split-K and a ragged N tile: the reference's numbers, in the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm

    x = 2 * _randn(m, k, seed=71)
    q, s = quantize_fp8_weight(0.05 * _randn(n, k, seed=72), 128)
    b = 0.2 * _randn(n, seed=73)
    want = naive_fp8_linear(x, q, s, b, torch.float32, 128)
    xq, xs = quantize_groups(x, 128)
    for swap in (1, 0):
        plan = (16, 32, 1, 1, swap)
        assert_close(triton_fp8_group_gemm(x, None, q, s, b, torch.float32, 128, split_k=split, plan=plan), want,
                     1e-6, f"in-kernel quantisation, swap={swap}, split-K x{split}")
        assert_close(triton_fp8_group_gemm(xq, xs, q, s, b, torch.float32, 128, split_k=split, plan=plan), want,
                     1e-6, f"quantised rows, swap={swap}, split-K x{split}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_gemm_is_f_linear(monkeypatch, dtype):
    """The 16-bit decode GEMM (the fp8 kernel without scales), both product orientations and split-K, against
    F.linear in fp32 on the same 16-bit values; mismatched dtypes are refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.triton_gemm import triton_decode_gemm

    x, w, b = (_randn(*shape, seed=seed).to(dtype) for shape, seed in (((5, 640), 74), ((40, 640), 75), ((40,), 76)))
    w = (0.05 * w.float()).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    for swap, split in ((0, 1), (1, 3)):
        got = triton_decode_gemm(x, w, b, split_k=split, plan=(16, 32, 1, 1, swap))
        assert got.dtype == dtype
        assert_close(got.float(), want, 4e-3, f"decode GEMM {dtype}, swap={swap}, split-K x{split}")
    with pytest.raises(ValueError, match="one 16-bit float dtype"):
        triton_decode_gemm(x.float(), w.float())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8])
def test_cuda_decode_gemm_is_f_linear(m):
    """The 16-bit decode GEMM compiled on a GPU (default plan, and the transposed product with split-K) against
    F.linear on a shape whose N leaves SMs idle."""
    from sala.ops.fp8.triton_gemm import triton_decode_gemm

    dev = torch.device("cuda")
    x = _randn(m, 4096, seed=77).bfloat16().to(dev)
    w = (0.02 * _randn(512, 4096, seed=78)).bfloat16().to(dev)
    want = torch.nn.functional.linear(x.float(), w.float())
    for plan, split in ((None, None), ((16, 64, 4, 3, 1), 6)):
        got = triton_decode_gemm(x, w, split_k=split, plan=plan)
        assert_close(got.float(), want, 8e-3, f"cuda decode GEMM, plan {plan}, split {split}")


def test_fp8_decode_plan_switch(monkeypatch):
    from sala.ops.fp8.triton_gemm import launch_plan
    from sala.utils import env

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a GPU's plans (launch_plan only reads the switch)
    default = launch_plan(1, True)
    monkeypatch.setenv("SALA_FP8_DECODE_PLAN", "16,64,4,3,1")
    assert env.fp8_decode_plan() == (16, 64, 4, 3, 1)
    assert launch_plan(1, True) == launch_plan(16, False) == (16, 64, 4, 3, 1) != default
    assert launch_plan(17, True) == (64, 128, 4, 3, 0)  # prefill-sized M keeps its plan
    assert launch_plan(1, False, scaled=False) == (16, 64, 4, 3, 0)  # the 16-bit decode GEMM is not fp8's
    monkeypatch.delenv("SALA_FP8_DECODE_PLAN")
    assert env.fp8_decode_plan() is None
    for bad in ("16,64,4,3", "8,64,4,3,1", "16,64,4,3,2", "a,b,c,d,e", "16,48,4,3,1", "16,64,3,3,1"):
        monkeypatch.setenv("SALA_FP8_DECODE_PLAN", bad)
        with pytest.raises(ValueError, match="BM,BN,warps,stages,swap"):
            env.fp8_decode_plan()


def _fake_blockwise_scaled_mm(accepted: int, wrong: bool = False):
    """A stand-in for a torch whose ``_scaled_mm`` takes 1 x 128 block scales with the weight's scales in layout
    ``accepted`` of WEIGHT_SCALE_LAYOUTS only (other layouts raise, like an unsupported recipe); it dequantises
    by those scales and multiplies, so it computes what cuBLAS would. ``wrong``: it returns garbage instead."""
    from sala.ops.fp8.blockwise import WEIGHT_SCALE_LAYOUTS

    def scaled_mm(a, b, scale_a, scale_b, out_dtype):
        n, g = b.shape[1], a.shape[1] // 128
        probe = WEIGHT_SCALE_LAYOUTS[accepted][1](torch.empty(n, g))
        if scale_b.shape != probe.shape or scale_b.stride() != probe.stride() or scale_a.stride() != (1, a.shape[0]):
            raise RuntimeError("Invalid scaling configuration")
        ws = scale_b if scale_b.shape == (n, g) else scale_b.t()
        out = (a.float() * scale_a.repeat_interleave(128, 1)) @ (b.float() * ws.t().repeat_interleave(128, 0))
        return (torch.randn_like(out) if wrong else out).to(out_dtype)

    return scaled_mm


@pytest.mark.parametrize("accepted", [0, 1, 2])
def test_blockwise_layout_pick_keeps_the_layout_that_computes_right(accepted):
    from sala.ops.fp8.blockwise import pick_layout

    assert pick_layout(torch.device("cpu"), _fake_blockwise_scaled_mm(accepted)) == accepted
    assert pick_layout(torch.device("cpu"), _fake_blockwise_scaled_mm(accepted, wrong=True)) is None


def test_blockwise_path_conditions():
    """cuBLAS block scaling only where its numbers are the group-128 layout's: CUDA, M >= 64, K % 128 == 0,
    N % 16 == 0, bf16 out, no bias."""
    from types import SimpleNamespace

    from sala.ops.fp8.blockwise import takes

    q = torch.zeros(384, 512, dtype=FP8_DTYPE)

    def x(m=256, k=512, dev="cuda"):  # takes() reads shape and device only
        return SimpleNamespace(shape=(m, k), device=torch.device(dev))

    assert takes(x(), q, None, 128, torch.bfloat16)
    assert not takes(x(dev="cpu"), q, None, 128, torch.bfloat16)
    assert not takes(x(m=63), q, None, 128, torch.bfloat16)
    assert not takes(x(k=576), q, None, 128, torch.bfloat16)
    assert not takes(x(), torch.zeros(40, 512, dtype=FP8_DTYPE), None, 128, torch.bfloat16)
    assert not takes(x(), q, None, 64, torch.bfloat16) and not takes(x(), q, None, None, torch.bfloat16)
    assert not takes(x(), q, torch.zeros(384), 128, torch.bfloat16)
    assert not takes(x(), q, None, 128, torch.float32)


def test_triton_quantizer_wants_a_matrix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.triton_gemm import triton_quantize_groups

    with pytest.raises(ValueError, match=r"triton_quantize_groups wants x \[M, K\]; got \(2, 3, 64\)"):
        triton_quantize_groups(torch.ones(2, 3, 64), 32)


def test_group_gemm_with_empty_k_is_the_bias(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm

    q = torch.zeros(6, 0, dtype=FP8_DTYPE)
    b = _randn(6, seed=71)
    got = triton_fp8_group_gemm(torch.zeros(3, 0), None, q, torch.zeros(6, 0), b, torch.float32, 32)
    assert torch.equal(got, b.expand(3, 6))
    assert torch.equal(triton_fp8_group_gemm(torch.zeros(3, 0), None, q, torch.zeros(6, 0), None, torch.float32, 32),
                       torch.zeros(3, 6))


def test_a_cublas_refusal_falls_back_to_triton_for_good(monkeypatch):
    """A shape cuBLAS block scaling refuses after the one-time check passed: that call and every later one on the
    device run the Triton GEMM (interpreter here), with the reference's numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops.fp8 import blockwise

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    dev = torch.device("cpu")
    monkeypatch.setattr(blockwise, "takes", lambda *a: True)
    monkeypatch.setattr(blockwise, "_checked", {(dev.type, dev.index): 0})
    monkeypatch.setattr(blockwise, "blockwise_fp8_linear", refuse)
    x = _randn(80, 256, seed=72).bfloat16()
    q, s = quantize_fp8_weight(0.05 * _randn(48, 256, seed=73), 128)
    want = naive_fp8_linear(x, q, s, None, torch.bfloat16, 128)
    with torch.no_grad():
        for _ in range(2):
            got = fp8_linear(x, q, s, backend="triton", group_size=128)
            assert_close(got.float(), want.float(), 8e-3, "fallback after a cuBLAS refusal")
    assert calls == [1] and blockwise.layout_for(dev) is None


def test_split_k_plan():
    from sala.ops.fp8.triton_gemm import split_k_plan

    assert split_k_plan(tiles=64, k_steps=32, sms=132) == 5  # 320 CTAs, 7 K steps each
    assert split_k_plan(tiles=64, k_steps=8, sms=132) == 2  # capped: >= 4 K steps per split
    assert split_k_plan(tiles=512, k_steps=128, sms=132) == 1  # enough tiles already
    assert split_k_plan(tiles=64, k_steps=3, sms=132) == 1


def test_group_layout_errors_are_specific():
    x = _randn(4, 96)
    q, s = quantize_fp8_weight(_randn(8, 96, seed=1), 32)
    with pytest.raises(ValueError, match=r"\(group_size=32\) wants w_scale \[8, 3\]"):
        fp8_linear(x, q, s[:, :2], group_size=32)
    with pytest.raises(ValueError, match=r"\(row-wise\) wants w_scale \[8\]"):
        fp8_linear(x, q, s)  # group scales passed without their group_size
    for bad in (48, 16, 2048, 0, True):
        with pytest.raises(ValueError, match="power of two from 32 to 1024"):
            quantize_fp8_weight(_randn(8, 96), bad)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------------
def _correlated_inputs(n_rows, k, seed, mix_seed=7):
    """Rows with one fixed correlation structure (``mix_seed``) and fresh samples (``seed``)."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(mix_seed)) / k**0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, k, generator=g) @ mix + 0.3 * torch.randn(n_rows, k, generator=g)


@pytest.mark.parametrize("group", [None, 32])
def test_gptq_lowers_the_output_error_with_the_same_scales(group):
    w = 0.05 * _randn(48, 96, seed=41)
    x = _correlated_inputs(4000, 96, seed=42)
    q, s = gptq_fp8_weight(w, x.t() @ x, group)
    rq, rs = quantize_fp8_weight(w, group)
    rs = rs[:, None] if group is None else rs
    assert q.dtype == FP8_DTYPE and torch.equal(s, rs)  # only the codes move
    x_test = _correlated_inputs(1000, 96, seed=43)  # same distribution, other samples
    err = lambda codes: (x_test @ (dequantize_fp8_weight(codes, s[:, 0] if group is None else s, group) - w).t()).norm()
    assert err(q) < 0.9 * err(rq), (err(q), err(rq))


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    w = 0.05 * _randn(16, 64, seed=43)
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(44)) + 0.5)
    q, _ = gptq_fp8_weight(w, h, 32, block=16)
    assert torch.equal(q.view(torch.uint8), quantize_fp8_weight(w, 32)[0].view(torch.uint8))


def test_gptq_dead_inputs_and_shape_errors():
    w = 0.05 * _randn(8, 32, seed=45)
    x = _correlated_inputs(500, 32, seed=46)
    x[:, 5] = 0  # a feature no calibration input uses: its weight column is dropped, nothing is NaN
    q, s = gptq_fp8_weight(w, x.t() @ x)
    assert torch.isfinite(q.float()).all() and (q[:, 5].float() == 0).all()
    with pytest.raises(ValueError, match=r"hessian \[in, in\] = \[32, 32\]"):
        gptq_fp8_weight(w, torch.eye(16))


def test_fp8_cublas_switch(monkeypatch):
    from sala.utils import env

    monkeypatch.delenv("SALA_FP8_CUBLAS", raising=False)
    assert env.fp8_cublas_blockwise()
    monkeypatch.setenv("SALA_FP8_CUBLAS", "0")
    assert not env.fp8_cublas_blockwise()
    monkeypatch.setenv("SALA_FP8_CUBLAS", "off")
    with pytest.raises(ValueError, match="SALA_FP8_CUBLAS must be 0 or 1, got 'off'"):
        env.fp8_cublas_blockwise()


@pytest.mark.parametrize("op", ["silu_mul", "sigmoid_gate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("group", [64, 256])
def test_glue_is_quantised_in_the_same_pass(monkeypatch, op, dtype, group):
    """The quantiser computing the glue itself (interpreter): the codes and scales of quantising the glue kernel's
    output, bit for bit, for column slices of one wider tensor (as a fused gate/up GEMM leaves them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sala.ops import elementwise
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_quantize_groups

    both = (3 * _randn(21, 2 * 320, seed=81)).to(dtype)
    a, b = both[:, :320], both[:, 320:]
    want_q, want_s = quantize_groups(getattr(elementwise, op)(a, b, "triton"), group)
    got_q, got_s = triton_quantize_groups(a, group, glue=(op, b))
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    with pytest.raises(ValueError, match="glue wants one of"):
        triton_quantize_groups(a, group, glue=("relu", b))


@pytest.mark.parametrize("op", ["silu_mul", "sigmoid_gate"])
@pytest.mark.parametrize("m", [40, 3])
def test_fp8_glue_linear_matches_glue_then_linear(monkeypatch, op, m):
    """``fp8_glue_linear`` = the glue, then ``fp8_linear``: prefill-sized M takes the fused quantiser (interpreter),
    decode-sized M the two steps; both against the reference composition. Bad arguments are named."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import sala.ops.fp8.triton_gemm as triton_gemm
    from sala.ops import elementwise
    from sala.ops.fp8 import fp8_glue_linear

    both = (2 * _randn(2, m, 2 * 256, seed=82)).bfloat16()
    a, b = both[..., :256], both[..., 256:]
    q, s = quantize_fp8_weight(0.05 * _randn(48, 256, seed=83), 128)
    glues = []
    real = triton_gemm.triton_quantize_groups
    monkeypatch.setattr(triton_gemm, "triton_quantize_groups",
                        lambda *args, **kw: glues.append((kw.get("glue") or (None,))[0]) or real(*args, **kw))
    with torch.no_grad():
        got = fp8_glue_linear(op, a, b, q, s, group_size=128, backend="triton")
    assert glues == ([op] if m > 16 else [])  # prefill-sized: one quantiser pass computing the glue
    with torch.no_grad():
        unfused = fp8_linear(getattr(elementwise, op)(a, b, "triton"), q, s, group_size=128, backend="triton")
        want = naive_fp8_linear(getattr(elementwise, op)(a, b, "naive").reshape(-1, 256), q, s, None,
                                torch.bfloat16, 128).reshape(2, m, 48)
    assert got.shape == (2, m, 48) and got.dtype == torch.bfloat16
    assert torch.equal(got, unfused)  # the same codes, the same GEMM
    assert_close(got.float(), want.float(), 2e-2, f"{op} fp8 glue linear vs the reference composition")
    with pytest.raises(ValueError, match="op must be one of"):
        fp8_glue_linear("gelu", a, b, q, s, group_size=128)
    with pytest.raises(ValueError, match="one shape and dtype"):
        fp8_glue_linear(op, a, b.float(), q, s, group_size=128)
    with pytest.raises(ValueError, match=r"fp8_glue_linear \(group_size=128\) wants w_scale"):
        fp8_glue_linear(op, a, b, q, s[:, :1], group_size=128)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [128, 64])
def test_cuda_glue_linear_equals_glue_then_linear(group):
    """On the GPU (cuBLAS block scaling for groups of 128, the Triton GEMM for 64): the fused glue quantisation
    gives exactly the glue kernel + fp8_linear result, and the reference's numbers."""
    from sala.ops import elementwise
    from sala.ops.fp8 import fp8_glue_linear

    dev = torch.device("cuda")
    both = (2 * _randn(700, 2 * 1536, seed=84)).bfloat16().to(dev)
    a, b = both[:, :1536], both[:, 1536:]
    q, s = quantize_fp8_weight((0.05 * _randn(1024, 1536, seed=85)).to(dev), group)
    for op in ("silu_mul", "sigmoid_gate"):
        with torch.no_grad():
            glue = getattr(elementwise, op)(a, b)
            got = fp8_glue_linear(op, a, b, q, s, group_size=group)
            assert torch.equal(got, fp8_linear(glue, q, s, group_size=group)), op
            want = naive_fp8_linear(glue, q, s, None, torch.bfloat16, group)
        assert_close(got.float(), want.float(), 8e-3, f"cuda {op} glue linear vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("group", [None, 64, 128, 512])
def test_cuda_quantizer_codes_are_the_references_bit_for_bit(group):
    """On the GPU the one-pass quantiser (``div_rn`` codes, ``absmax * fp32(1/448)`` scales) and the PyTorch
    reference on the same CUDA tensor give the same codes and scales, bit for bit; plain and with the SwiGLU glue."""
    from sala.ops import elementwise
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_quantize_groups

    dev = torch.device("cuda")
    both = (3 * _randn(300, 2 * 1536, seed=86)).bfloat16().to(dev)
    x, y = both[:, :1536], both[:, 1536:]
    for got, src in ((triton_quantize_groups(x, group), x),
                     (triton_quantize_groups(x, group, glue=("silu_mul", y)), elementwise.silu_mul(x, y))):
        want_q, want_s = quantize_groups(src, group)
        assert torch.equal(got[1], want_s)
        assert torch.equal(got[0].view(torch.uint8), want_q.view(torch.uint8))
