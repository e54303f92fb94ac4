"""Where a decode step's (or a long-context prefill chunk's) GPU time goes: kernel time by kernel, per step.

Not a benchmark of record (that is ``sala bench e2e``): a breakdown that says which kernels to work on next.
The step runs eagerly under ``torch.profiler`` (so every kernel is seen; launch gaps are not counted), and the
same step is timed in a CUDA graph for comparison (decode only).

    python benchmarks/profile_step.py --context 256K                 # decode at batch 1
    python benchmarks/profile_step.py --context 512K --prefill 8192  # one prefill chunk after 512K cached tokens
    python benchmarks/profile_step.py --shape small --context 4096   # runs on CPU
    python benchmarks/profile_step.py --context 256K --quantize fp8  # fp8 weights (groups of 128)
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sala.engine.bench import _random_fill, sala_config
from sala.engine.kv_cache import StaticCache
from sala.engine.loader import random_model
from sala.engine.runner import ModelRunner
from sala.engine.planner import parse_tokens


def _family(name: str) -> str:
    """Group kernels into families a reader can act on."""
    n = name.lower()
    for key, fam in (("splitk", "gemm split-K reduce"), ("gemm", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"),
                     ("xmma", "gemm"), ("gemv", "gemm"), ("flash", "sdpa"), ("cudnn", "sdpa"), ("fmha", "sdpa"),
                     ("elementwise", "torch elementwise"), ("reduce", "torch reduce"), ("copy", "copy"),
                     ("cat", "copy"), ("index", "torch index")):
        if key in n:
            if fam.startswith("torch"):  # which torch op: the first functor/op name after the kernel's own
                ops = [m for m in re.findall(r"at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
                       if not re.search(r"elementwise|reduce_kernel|ReduceOp|unrolled|vectorized|Array|index_kernel", m)]
                fam += f" ({ops[0][:40]})" if ops else ""
            return fam
    return re.sub(r"_\d+(d\d+)*$", "", name)[:60]


def kernel_table(prof, steps: int) -> tuple[list[tuple[str, int, float]], float, int]:
    """(family, kernels per step, us per step) sorted by time; total us per step; kernels per step."""
    count: dict[str, int] = defaultdict(int)
    time_us: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            fam = _family(ev.name)
            count[fam] += 1
            time_us[fam] += ev.device_time
    rows = sorted(((f, count[f] // steps, time_us[f] / steps) for f in count), key=lambda r: -r[2])
    return rows, sum(time_us.values()) / steps, sum(count.values()) // steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="256K", help="cached tokens before the step (random K/V and states)")
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill chunk of this many tokens instead of decode")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--shape", choices=["released", "small", "tiny"], default="released")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (quick runs)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eager", "--pieces", dest="pieces", action="store_true",
                    help="decode with row-by-row eager attention, no CUDA graph (default: fused)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--quantize", choices=["none", "fp8"], default="none", help="fp8 weights, as --quantize fp8")
    ap.add_argument("--fp8-group-size", type=int, default=128, help="fp8 scale group (0 = one per channel)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = parse_tokens(args.context)
    max_len = ctx + max(args.prefill, args.steps + 4) + 1
    model = random_model(sala_config(args.shape, args.layers, max_len), device, dtype)
    if args.quantize == "fp8":
        from sala.model.quantize import quantize_fp8_

        quantize_fp8_(model, group_size=args.fp8_group_size or None)
    cache = StaticCache(model.config, args.batch, max_len, dtype, device)
    runner = ModelRunner(model, cache, cuda_graphs=False, fused_attention=not args.pieces)
    _random_fill(cache, ctx, 0)
    for s in range(1, args.batch):
        cache.copy_slot(0, s)
    slots = list(range(args.batch))
    tokens = torch.randint(0, model.config.vocab_size, (args.batch,), device=device)

    def step() -> None:
        if args.prefill:
            for s in slots:
                cache.lengths[s] = ctx  # same chunk each time: overwrite, do not grow
                runner.prefill(s, tokens[:1].expand(args.prefill).contiguous(), want_logits=True)
        else:
            runner.decode(slots, [cache.lengths[s] for s in slots], tokens)

    with torch.no_grad():
        step()  # compile / autotune outside the profile
        if not args.prefill:
            for s in slots:
                cache.lengths[s] -= 1
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
                if not args.prefill:
                    for s in slots:
                        cache.lengths[s] -= 1
            if device.type == "cuda":
                torch.cuda.synchronize()
    what = f"prefill chunk {args.prefill}" if args.prefill else f"decode batch {args.batch} ({'eager' if args.pieces else 'fused'})"
    weights = f"fp8 weights (groups of {args.fp8_group_size or 'a channel'})" if args.quantize == "fp8" else f"{dtype}"
    print(f"## {what} after {ctx:,} cached tokens, {model.config.num_hidden_layers} layers, {weights} on {device}")
    if device.type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        return
    rows, total, n = kernel_table(prof, args.steps)
    print(f"kernel time per step {total / 1000:.3f} ms over {n} kernels")
    print(f"{'family':62s} {'n/step':>7s} {'us/step':>10s} {'share':>6s}")
    for fam, k, us in rows[: args.top]:
        print(f"{fam:62s} {k:7d} {us:10.1f} {us / total:6.1%}")
    if not args.prefill:  # the same step replayed in a CUDA graph: what launch gaps cost on top of kernel time
        graphed = ModelRunner(model, cache, cuda_graphs=True, fused_attention=not args.pieces)
        for _ in range(3):
            graphed.decode(slots, [cache.lengths[s] for s in slots], tokens)
            for s in slots:
                cache.lengths[s] -= 1
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graphed.decode(slots, [cache.lengths[s] for s in slots], tokens)
            for s in slots:
                cache.lengths[s] -= 1
        end.record()
        torch.cuda.synchronize()
        print(f"graph step {start.elapsed_time(end) / 10:.3f} ms (host sync per step included)")


if __name__ == "__main__":
    main()
