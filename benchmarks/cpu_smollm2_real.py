"""SmolLM2-135M-Instruct (transformers, SDPA) against its trained SALA hybrid on a CPU, with the real weights and
real held-out text: time to first token (one forward over the prompt, ``logits_to_keep=1``, transformers' default),
decode ms/token after it, and peak resident memory (the model's weights + growth while the row runs).

``sala bench e2e --shape smollm2`` times the same geometry with random weights; random weights give the sparse
layers' block selection no locality (each 64-query chunk's union of selected blocks is the whole cache), which is
the worst case for the hybrid's prefill. This script measures the case a user has.

    python benchmarks/cpu_smollm2_real.py --contexts 8K,32K --threads 1 --out benchmarks/results/cpu_smollm2_real

The hybrid is the demo's: the GGUF converted with the bundled delta's conversion.json, delta merged (cached in
``~/.cache/sala/demo``); models run one at a time per context, dense first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from sala.demo.models import load_models
from sala.engine.bench import RssPeak, malloc_trim, cpu_name
from sala.engine.planner import parse_tokens
from sala.utils.env import set_cpu_threads
from sala.utils.fs import write_json, write_text


def run_one(model, ids: torch.Tensor, decode_steps: int) -> dict:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    malloc_trim()
    with torch.no_grad(), RssPeak() as rss:
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        ttft = time.perf_counter() - t0
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        times = []
        for _ in range(decode_steps + 2):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    del cache
    decode = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up steps
    return {"ttft_s": ttft, "decode_ms": decode * 1e3, "peak_gib": (weights + rss.peak - rss.start) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="8K,32K")
    ap.add_argument("--decode-steps", type=int, default=6)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--text", default="data/text/heldout.txt")
    ap.add_argument("--systems", default="dense,hybrid", help="subset of dense,hybrid")
    ap.add_argument("--out", default="benchmarks/results/cpu_smollm2_real")
    args = ap.parse_args()
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not names or set(names) - {"dense", "hybrid"}:  # before the models load
        ap.error(f"--systems takes a subset of dense,hybrid, got {args.systems!r}")
    threads = set_cpu_threads(args.threads)
    dm = load_models(model=None, delta=None, conversion=None, sparse_layers=None, device=torch.device("cpu"),
                     dtype=torch.float32, quiet=True)
    text = Path(args.text).read_text()
    tokens = dm.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = []
    systems = {"dense": ("transformers dense", dm.dense), "hybrid": ("sala hybrid", dm.hybrid)}
    chosen = [systems[s] for s in names]
    for ctx in map(parse_tokens, args.contexts.split(",")):
        if len(tokens) < ctx:
            raise SystemExit(f"{args.text} has {len(tokens)} tokens, fewer than the context {ctx}")
        for name, model in chosen:
            # the decode steps must fit the model's window (the hybrid refuses positions past it; transformers
            # computes RoPE for any position): the prompt leaves room for them
            limit = getattr(model.config, "max_position_embeddings", None)
            n = ctx if name.startswith("transformers") or limit is None else min(ctx, limit - args.decode_steps - 2)
            ids = torch.tensor([tokens[:n]], dtype=torch.long)
            row = {"system": name, "context": ctx, "prompt_tokens": n, **run_one(model, ids, args.decode_steps)}
            rows.append(row)
            print(f"{name:>18} {ctx:>7,} ({n:,} prompt tokens): TTFT {row['ttft_s']:.2f} s, decode {row['decode_ms']:.1f} ms/token, "
                  f"peak {row['peak_gib']:.2f} GiB", flush=True)
    lines = ["| system | context | TTFT s | TTFT hybrid/dense | decode ms/token | decode hybrid/dense | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["system"], r["context"]): r for r in rows}
    for r in rows:
        d = by.get(("transformers dense", r["context"]))
        ratio = lambda key: f"{r[key] / d[key]:.2f}x" if d and r["system"] == "sala hybrid" else "-"  # noqa: E731
        lines.append(f"| {r['system']} | {r['context']:,} | {r['ttft_s']:.2f} | {ratio('ttft_s')} | "
                     f"{r['decode_ms']:.1f} | {ratio('decode_ms')} | {r['peak_gib']:.2f} |")
    table = "\n".join(lines)
    print(table)
    env = {"cpu": cpu_name(), "threads": threads, "torch": torch.__version__, "command": " ".join(sys.argv),
           "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    write_json(Path(args.out) / "real.json", {"environment": env, "rows": rows})
    write_text(Path(args.out) / "real.md", table + "\n")


if __name__ == "__main__":
    main()
