"""A randomly initialised dense Llama with SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads of 64, vocab
49152) and the bundled tokenizer: a stand-in teacher for dress rehearsals of training on a GPU (throughput, memory,
the whole path) when the real weights are not at hand.

    python benchmarks/random_teacher.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2)).save_pretrained(out)
    AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "src/sala/assets").save_pretrained(out)
    print(f"random SmolLM2-shaped teacher in {out}")
