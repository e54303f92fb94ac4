"""Greedy chat answers of a dense teacher and its SALA hybrid, side by side, as markdown (the SmolLM2 proof).

    python benchmarks/chat_samples.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf --hybrid runs/smollm2/final --out chat.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sala  # noqa: F401  (registers minicpm_sala)

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clean Python code.",
    "Explain in two sentences what a list comprehension is.",
    "Write a short poem about the sea.",
]


def load(path: str, device: str):
    p = Path(path)
    if p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    return model.to(device).eval(), tok


@torch.no_grad()
def answer(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(model.device)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--hybrid", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rows = {}
    for name, path in (("teacher (dense SmolLM2-135M-Instruct)", args.teacher), ("SALA hybrid (trained)", args.hybrid)):
        model, tok = load(path, args.device)
        rows[name] = [answer(model, tok, p, args.max_new_tokens) for p in PROMPTS]
        del model
    lines = ["# Greedy chat answers, teacher vs hybrid", ""]
    for i, prompt in enumerate(PROMPTS):
        lines += [f"## {prompt}", ""]
        for name, answers in rows.items():
            lines += [f"**{name}:** {answers[i]}", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
