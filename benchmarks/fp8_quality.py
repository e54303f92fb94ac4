"""FP8 (e4m3) against bf16 on the SmolLM2 hybrid with the bundled trained delta: held-out perplexity and greedy
agreement for several scale layouts and roundings (issue 15, item 2). The reference runs in bf16, the dtype FP8
replaces; on a CPU the fp8 GEMMs are the cpu backend's ``torch._scaled_mm`` (row-wise) or the reference
(group-wise), on a GPU cuBLASLt / our Triton kernel.

    python benchmarks/fp8_quality.py [--variants row,128,64,32,64+gptq,32+gptq] [--windows 4] [--device cpu]

A variant is a group size ("row": one scale per output channel / token) and "+gptq" for GPTQ codes calibrated on
``--calibration-windows`` windows of the train split (never the held-out text).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sala.demo.models import load_models
from sala.eval.ppl import score_text
from sala.model.quantize import quantize_fp8_
from sala.utils import corpus


def greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def parse_variant(text: str) -> tuple[int | None, bool]:
    group, _, method = text.partition("+")
    if method not in ("", "gptq"):
        raise ValueError(f"variant {text!r}: the part after '+' must be gptq")
    return (None if group == "row" else int(group)), method == "gptq"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows scored")
    ap.add_argument("--calibration-windows", type=int, default=8, help="train-split windows for GPTQ")
    ap.add_argument("--variants", default="row,128,64,32,64+gptq,32+gptq")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/fp8_quality")
    ap.add_argument("--skip", default="", help="projections left unquantised, e.g. down_proj,o_proj (lm_head always)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    m = load_models(model=None, delta=None, conversion=None, sparse_layers=None, device=dev, dtype=torch.bfloat16)
    tok = m.tokenizer
    heldout = tok(corpus.heldout_path().read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    train = tok(corpus.train_path().read_text(encoding="utf-8")[:2_000_000], add_special_tokens=False)["input_ids"]
    calibration = [torch.tensor([train[i * args.context:(i + 1) * args.context]], device=dev)
                   for i in range(args.calibration_windows)]
    prompt = torch.tensor([heldout[:256]], device=dev)
    skip = ("lm_head", *filter(None, args.skip.split(",")))
    report: dict = {"device": str(dev), "reference_dtype": "bfloat16", "context": args.context,
                    "windows": args.windows, "calibration_windows": args.calibration_windows, "skipped": list(skip),
                    "runs": {}}

    def measure(name, model, extra):
        t0 = time.time()
        ppl = score_text(model, heldout, args.context, batch=1, max_windows=args.windows)
        run = {"ppl": ppl["ppl"], "tokens_scored": ppl["tokens_scored"], "greedy": greedy(model, prompt, 32), **extra,
               "seconds": round(time.time() - t0, 1)}
        ref = report["runs"].get("bf16")
        if ref:
            run["ppl_vs_bf16"] = run["ppl"] / ref["ppl"] - 1
            run["greedy_equal"] = sum(a == b for a, b in zip(ref["greedy"], run["greedy"]))
        report["runs"][name] = run
        print(f"{name}: ppl {run['ppl']:.4f}" + (f" ({run['ppl_vs_bf16']:+.2%} vs bf16, greedy {run['greedy_equal']}/32)"
                                                if ref else "") + f" [{run['seconds']} s]", flush=True)

    measure("bf16", m.hybrid, {})
    for v in variants:
        group, gptq = parse_variant(v)
        model = copy.deepcopy(m.hybrid)
        t0 = time.time()
        n = len(quantize_fp8_(model, group_size=group, skip=skip, calibration=calibration if gptq else None))
        measure(f"fp8 {v}", model, {"group_size": group, "gptq": gptq, "quantized_linears": n,
                                    "quantize_seconds": round(time.time() - t0, 1)})
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
