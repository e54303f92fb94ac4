"""Configs of ``sala eval ppl|niah|ruler``: one field per CLI flag (``--max-new-tokens`` -> ``max_new_tokens``),
checked in ``__post_init__`` so a bad flag fails before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from sala.eval.scoring import parse_depths, parse_token_list


@dataclass(kw_only=True)
class EvalOptions:
    """Flags every eval shares: which models, where they run, where the reports go."""

    model: list[str] = field(default_factory=list)
    """Models to evaluate side by side: SALA checkpoint dirs, dense HF dirs, .gguf files (or dirs holding one),
    presets (tiny, tiny-sparse, small, minicpm-sala-9b: random weights)."""
    compare: list[str] = field(default_factory=list)
    """More models for the same table and figure (same kinds as ``model``), listed after them."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32."""
    model_seed: int = 0
    """Seed of a preset's random weights."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    max_positions: int | None = None
    """Raise a SALA model's max_position_embeddings to this (RoPE is analytic); dense models keep theirs."""
    chunk: int = 2048
    """Prefill chunk in tokens: long prompts go through the model's cache this many tokens at a time."""
    gpu_mem: float | None = None
    """Memory budget in GiB for the plan check of SALA models (default: the CUDA device's memory; none on CPU)."""
    out: str | None = None
    """Directory for the JSON / Markdown / PNG reports (default out/eval/<command>)."""
    force: bool = False
    """Write into an ``out`` holding files sala did not write there (kept; refused otherwise)."""
    quiet: bool = False
    """No progress bar or progress lines."""

    def __post_init__(self) -> None:
        self.model = list(self.model or []) + list(self.compare or [])
        self.compare = []
        if not self.model:
            raise ValueError("--model is required (repeat it, or add --compare, to put several models side by side)")
        if len(set(self.model)) != len(self.model):
            raise ValueError(f"--model lists a model twice: {self.model}")
        if self.chunk < 1:
            raise ValueError(f"--chunk must be >= 1, got {self.chunk}")
        if self.max_positions is not None and self.max_positions < 1:
            raise ValueError(f"--max-positions must be >= 1, got {self.max_positions}")


@dataclass(kw_only=True)
class PplConfig(EvalOptions):
    """``sala eval ppl``: perplexity of a text at several context lengths."""

    text: str
    """Text file to score (UTF-8)."""
    context: str = "2K"
    """Comma-separated context lengths (window sizes) in tokens, e.g. 2K,8K."""
    stride: int | None = None
    """Window step in tokens; each window after the first scores only its last ``stride`` tokens (default: the
    context, i.e. non-overlapping windows that score all their tokens but the first)."""
    batch: int = 4
    """Windows per forward pass."""
    max_windows: int | None = None
    """Score at most this many windows per context (default: all the text holds)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.contexts = parse_token_list(self.context, "--context")
        if min(self.contexts) < 2:
            raise ValueError(f"--context must be >= 2 tokens, got {self.context!r}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {self.stride}")
        if self.stride is not None and self.stride > min(self.contexts):
            raise ValueError(f"--stride {self.stride} is larger than the context {min(self.contexts)}: tokens between "
                             "windows would never be scored; use a stride <= the smallest context")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"--max-windows must be >= 1, got {self.max_windows}")


@dataclass(kw_only=True)
class NiahConfig(EvalOptions):
    """``sala eval niah``: needle-in-a-haystack accuracy over a (length x depth) grid."""

    haystack: str
    """Text file of real prose the context is cut from (the needle goes between its sentences)."""
    lengths: str = "1K,2K,4K,8K,16K"
    """Comma-separated context lengths in model tokens (prompt + answer tokens), e.g. 1K,8K,8192,1M."""
    depths: str = "0,25,50,75,100"
    """Comma-separated needle depths, percent of the context before the needle."""
    samples: int = 1
    """Needles (different keys, numbers and haystack offsets) per grid cell."""
    seed: int = 0
    """Seed of the needles and haystack offsets."""
    max_new_tokens: int = 16
    """Tokens generated for each answer (greedy)."""
    no_chat_template: bool = False
    """Plain 'Question/Answer' prompts even when the tokenizer has a chat template."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.length_list = parse_token_list(self.lengths, "--lengths")
        self.depth_list = parse_depths(self.depths)
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(kw_only=True)
class RulerConfig(EvalOptions):
    """``sala eval ruler``: RULER's synthetic tasks (no download), scored like RULER."""

    lengths: str = "4K,8K"
    """Comma-separated sequence lengths in model tokens (prompt + the task's answer budget)."""
    tasks: str = "all"
    """Comma-separated task names or ``all`` (see ``sala.eval.ruler.TASKS``)."""
    samples: int = 4
    """Samples per task per length."""
    seed: int = 42
    """Seed of the generated samples (RULER's default 42)."""
    haystack: str | None = None
    """Essay text for the essay-haystack tasks; without it those tasks are skipped (stated in the report)."""
    max_new_tokens: int | None = None
    """Cap on generated tokens (default: each task's RULER budget: niah 128, vt 30, cwe 120, fwe 50)."""
    no_chat_template: bool = False
    """Plain prompts even when the tokenizer has a chat template."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from sala.eval.ruler import TASKS

        self.length_list = parse_token_list(self.lengths, "--lengths")
        names = list(TASKS) if self.tasks.strip() == "all" else [t.strip() for t in self.tasks.split(",")]
        unknown = [t for t in names if t not in TASKS]
        if unknown or not names:
            raise ValueError(f"--tasks: unknown task {unknown[0] if unknown else self.tasks!r}; choose from all, "
                             f"{', '.join(TASKS)}")
        self.task_list = names
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
