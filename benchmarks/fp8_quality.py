"""FP8 (e4m3, per-channel weight / per-token activation scales) against full precision on the SmolLM2 hybrid with
the bundled trained delta: held-out perplexity and greedy agreement (issue 15, item 2; a CPU run uses the cpu
backend's ``torch._scaled_mm``, a GPU run the CUDA one).

    python benchmarks/fp8_quality.py [--context 2048] [--windows 8] [--device cpu] [--skip down_proj] [--out DIR]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/fp8_quality")
    ap.add_argument("--skip", default="", help="projections left unquantised, e.g. down_proj,o_proj (lm_head always)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    m = load_models(model=None, delta=None, conversion=None, sparse_layers=None, device=dev, dtype=dtype)
    tok = m.tokenizer
    tokens = tok(corpus.heldout_path().read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([tokens[:256]], device=dev)
    report: dict = {"device": str(dev), "reference_dtype": str(dtype), "context": args.context}
    runs = {}
    for name in ("reference", "fp8"):
        if name == "fp8":
            skip = ("lm_head", *filter(None, args.skip.split(",")))
            report["skipped"] = list(skip)
            report["quantized_linears"] = len(quantize_fp8_(m.hybrid, skip=skip))
        t0 = time.time()
        ppl = score_text(m.hybrid, tokens, args.context, batch=1, max_windows=args.windows)
        runs[name] = {"ppl": ppl["ppl"], "tokens_scored": ppl["tokens_scored"], "greedy": greedy(m.hybrid, prompt, 32),
                      "seconds": round(time.time() - t0, 1)}
        print(f"{name}: ppl {ppl['ppl']:.4f} over {ppl['tokens_scored']} tokens ({runs[name]['seconds']} s)")
    same = sum(a == b for a, b in zip(runs["reference"]["greedy"], runs["fp8"]["greedy"]))
    report.update(runs=runs, ppl_ratio=runs["fp8"]["ppl"] / runs["reference"]["ppl"], greedy_agreement=f"{same}/32")
    print(f"fp8 / reference ppl {report['ppl_ratio']:.4f}; greedy tokens equal {same}/32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
