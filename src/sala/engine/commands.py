"""What each ``sala`` subcommand does; ``sala.cli`` only parses flags into these config dataclasses.

Every config field is one CLI flag (``--max-tokens`` -> ``max_tokens``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

logger = logging.getLogger(__name__)

DEMO_PROMPT = "The capital of France is"


@dataclass(kw_only=True)
class ModelOptions:
    model: str | None = None
    """Checkpoint directory or preset name (minicpm-sala-9b, tiny, tiny-sparse, small; random weights)."""
    demo: bool = False
    """Build a tiny random checkpoint with the bundled tokenizer in a temporary directory and use it."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32."""
    seed: int = 0
    """Seed of preset/demo random weights."""
    threads: int | None = None
    """CPU threads for torch (default: :func:`sala.utils.env.default_cpu_threads`, the usable CPUs minus one, 1-8;
    1 for --demo)."""
    check_weights: bool = False
    """Refuse the checkpoint if a weight holds NaN/inf (such weights load, then every request fails)."""
    quantize: str | None = None
    """fp8: quantise every decoder projection to e4m3 at load (weights and, on the fly, activations; embeddings,
    norms and lm_head stay). A checkpoint written by ``sala quantize`` is fp8 already and needs no flag."""
    fp8_group_size: int = 128
    """With --quantize fp8: one scale per this many input features (32-1024, a power of two), or 0 for one scale
    per output channel / token (cuBLASLt's row-wise GEMM)."""


@dataclass(kw_only=True)
class EngineOptions:
    context: str | None = None
    """Tokens per sequence slot (e.g. 32K, 1M); default: what the command needs."""
    batch: int = 1
    """Sequence slots (requests decoding together)."""
    chunk: int = 8192
    """Prefill chunk in tokens."""
    gpu_mem: float | None = None
    """Memory budget in GiB (default: the CUDA device's memory; unchecked on CPU)."""
    no_cuda_graphs: bool = False
    """Decode eagerly on CUDA."""
    decode_attention: str = "auto"
    """Sparse-layer decode attention: "fused" (one batched kernel; the step is one CUDA graph), "eager" (row by
    row, no CUDA graph; "pieces" is its old name) or "auto" (fused on CUDA)."""


@dataclass(kw_only=True)
class SamplingOptions:
    max_tokens: int = 128
    """Most new tokens."""
    temperature: float = 0.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1 = all)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative ones) of tokens already in the prompt or output; 1 disables."""
    stop: list[str] = field(default_factory=list)
    """Stop when the text contains this string (repeatable)."""
    sample_seed: int | None = None
    """Seed of the sampler (default: unseeded)."""
    ignore_eos: bool = False
    """Keep generating past EOS."""

    def sampling_params(self):
        from sala.engine.types import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              repetition_penalty=self.repetition_penalty, stop=list(self.stop), seed=self.sample_seed,
                              ignore_eos=self.ignore_eos)


@dataclass(kw_only=True)
class InfoConfig:
    model: str | None = None
    """Also describe this checkpoint directory or preset."""


@dataclass(kw_only=True)
class PlanConfig:
    model: str
    """Checkpoint directory or preset."""
    context: str = "1M"
    """Tokens per sequence, e.g. 32K or 1M."""
    batch: int = 1
    """Sequences decoding together."""
    chunk: int = 8192
    """Prefill chunk in tokens."""
    gpu_mem: float | None = None
    """GPU memory in GiB (default: this machine's GPU, if any)."""
    dtype: str = "bfloat16"
    """Weights and KV dtype."""


@dataclass(kw_only=True)
class GenerateConfig(ModelOptions, EngineOptions, SamplingOptions):
    prompt: str | None = None
    """Prompt text."""
    prompt_file: str | None = None
    """Read the prompt from this file ('-' = stdin)."""
    no_stream: bool = False
    """Print the text at the end instead of streaming it."""
    quiet: bool = False
    """No progress bar or timing line."""


@dataclass(kw_only=True)
class ChatConfig(ModelOptions, EngineOptions, SamplingOptions):
    max_tokens: int = 1024
    """Most new tokens per answer."""
    system: str | None = None
    """System prompt."""
    think: str = "strip"
    """show: print and keep reasoning; strip: print it, drop it from the history; hide: neither."""


@dataclass(kw_only=True)
class ServeConfig(ModelOptions, EngineOptions):
    batch: int = 8
    """Sequence slots: requests decoding together."""
    host: str = "127.0.0.1"
    """Bind address."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Visible to every local user in the process list: prefer ``api_key_file`` or ``SALA_API_KEY``."""
    api_key_file: str | None = None
    """File holding the key (its first line); read once at start."""
    shutdown_timeout: float = 10.0
    """Seconds in-flight requests get to finish after SIGTERM / Ctrl-C before they are cancelled."""
    served_model_name: str | None = None
    """Model name clients must send (default: the checkpoint directory's name; sala-demo with --demo)."""
    max_request_bytes: int = 8 * 2**20
    """Largest request body in bytes."""
    log_level: str = "info"
    """uvicorn log level: critical, error, warning, info, debug, trace."""
    warmup_tokens: int | None = None
    """Before accepting requests, run one request with a prompt of this many tokens: it compiles the kernels, fills
    the tuning cache and captures the batch-1 CUDA graph (larger batch buckets are captured when first used), so
    the first client does not pay for them. Default: one prefill chunk on CUDA, none on CPU; 0 = off."""


@dataclass(kw_only=True)
class WarmupConfig(ModelOptions, EngineOptions):
    prompt_tokens: str = "8K"
    """Prompt length of the warm-up requests (e.g. 8K, 128K)."""
    decode_tokens: int = 16
    """Tokens decoded per request."""


# ---- shared plumbing ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _model_source(opts: ModelOptions) -> Iterator[str]:
    if opts.demo:
        from sala.engine.demo import make_demo_checkpoint

        with tempfile.TemporaryDirectory(prefix="sala-demo-") as tmp:
            preset = opts.model or "tiny"
            make_demo_checkpoint(tmp, preset=preset, seed=opts.seed)
            logger.info("demo checkpoint (%s, random weights) written to %s", preset, tmp)
            yield tmp
    elif opts.model is None:
        raise ValueError("--model DIR|PRESET is required (or --demo)")
    else:
        yield opts.model


def _load(opts: ModelOptions, path: str, context: int | None = None):
    from sala.engine.demo import quiet_hf_progress
    from sala.engine.loader import load_model
    from sala.utils.env import set_cpu_threads

    set_cpu_threads(opts.threads if opts.threads is not None else (1 if opts.demo else None))
    with quiet_hf_progress(opts.demo or getattr(opts, "quiet", False)):
        model, tokenizer = load_model(path, device=opts.device, dtype=opts.dtype, seed=opts.seed,
                                      max_position_embeddings=context)
    if opts.check_weights:
        from sala.model.checkpoint_io import check_finite_weights

        check_finite_weights(model.state_dict().items(), f"checkpoint {path}")
    if opts.quantize is not None:
        quantize_model(model, opts.quantize, opts.fp8_group_size)
    return model, tokenizer


def quantize_model(model, method: str, group_size: int) -> None:
    """``--quantize`` at load: fp8 (group_size 0 = row-wise). A checkpoint quantised already is left as it is."""
    from sala.model.quantize import describe, quantize_fp8_

    if method != "fp8":
        raise ValueError(f"--quantize takes fp8; got {method!r}")
    saved = getattr(model.config, "quantization_config", None)
    if saved:
        logger.warning("checkpoint is quantised already (%s); --quantize %s ignored", describe(saved), method)
        return
    names = quantize_fp8_(model, group_size=group_size or None)
    logger.info("quantised %d projections to fp8 (%s)", len(names),
                f"groups of {group_size}" if group_size else "row-wise scales")


def _engine(model, tokenizer, opts: EngineOptions, max_seq_len: int, progress=None):
    from sala.engine.engine import Engine
    from sala.engine.types import EngineConfig, fused_flag

    cfg = EngineConfig(max_batch=opts.batch, max_seq_len=max_seq_len, prefill_chunk=opts.chunk,
                       memory_budget_gib=opts.gpu_mem, cuda_graphs=not opts.no_cuda_graphs,
                       fused_attention=fused_flag(opts.decode_attention))
    return Engine(model, tokenizer, cfg, on_prefill_progress=progress)


def _context(opts: EngineOptions) -> int | None:
    from sala.engine.planner import parse_tokens

    return parse_tokens(opts.context) if opts.context else None


def _rope_limit(spec: str, context: int | None) -> int | None:
    """max_position_embeddings to load with: raised only when the asked context exceeds the config's."""
    from sala.engine.loader import load_config

    if context is None:
        return None
    limit = load_config(spec).max_position_embeddings
    if context > limit:
        logger.warning("context %d > max_position_embeddings %d: raising the RoPE limit (docs/architecture.md §10.16)", context, limit)
        return context
    return None


class _PrefillBar:
    """Progress over prompt tokens for prompts longer than one chunk: a bar on a terminal, a line every few seconds
    in a log (:func:`sala.utils.progress.counter`)."""

    def __init__(self, chunk: int, quiet: bool) -> None:
        self.chunk, self.quiet, self.bar = chunk, quiet, None

    def __call__(self, request_id: str, done: int, total: int) -> None:
        if self.quiet or total <= self.chunk:
            return
        if self.bar is None:
            from sala.utils.progress import counter

            self.bar = counter("prefill", total, unit="tok")
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


# ---- subcommands ----------------------------------------------------------------------------------------------
def run_info(cfg: InfoConfig, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    import platform

    import torch
    import transformers

    import sala
    from sala.ops.common.dispatch import resolve_backend, triton_available

    print(f"sala {sala.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}", file=out)
    if triton_available():
        import triton

        print(f"triton {triton.__version__}", file=out)
    else:
        print("triton not installed", file=out)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device cuda:0 {p.name}, {p.total_memory / 2**30:.1f} GiB; op backend {resolve_backend('auto', torch.device('cuda'))}", file=out)
    else:
        from sala.utils.env import default_cpu_threads

        n, why = default_cpu_threads()
        print(f"device cpu; torch threads by default here {n} ({why}); op backend "
              f"{resolve_backend('auto', torch.device('cpu'))}", file=out)
    if cfg.model:
        from sala.engine.loader import load_config
        from sala.engine.planner import num_parameters

        c = load_config(cfg.model)
        sched = "".join("S" if c.is_sparse_layer(i) else "L" for i in range(c.num_hidden_layers))
        print(f"model {cfg.model}: {num_parameters(c):,} parameters, {c.num_hidden_layers} layers [{sched}] "
              f"(S = InfLLM-v2 sparse {c.sparse_layers}, L = Lightning)", file=out)
        print(f"  hidden {c.hidden_size}, heads {c.num_attention_heads} (kv {c.num_key_value_heads} in sparse layers), head_dim "
              f"{c.head_dim}, intermediate {c.intermediate_size}, vocab {c.vocab_size}, max_position {c.max_position_embeddings}",
              file=out)
        print(f"  sparse_config {c.sparse_config}; sparse_attention {c.sparse_attention}", file=out)
    return 0


def run_plan(cfg: PlanConfig, out: TextIO | None = None) -> int:
    """Print the memory plan; exit status 1 when it does not fit the budget."""
    out = out or sys.stdout
    from sala.engine.loader import load_config
    from sala.engine.planner import format_bytes, max_context, parse_tokens, plan_memory

    config = load_config(cfg.model)
    context = parse_tokens(cfg.context)
    budget = cfg.gpu_mem
    if budget is None:
        import torch

        if torch.cuda.is_available():
            budget = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(config, batch=cfg.batch, context=context, chunk=cfg.chunk, dtype=cfg.dtype, budget_gib=budget)
    print(f"memory plan: {cfg.model}, batch {cfg.batch} x context {context:,} tokens, {cfg.dtype}", file=out)
    print(plan.format(), file=out)
    if context > config.max_position_embeddings:
        print(f"note: context exceeds max_position_embeddings ({config.max_position_embeddings}); the engine raises it "
              "at load time (RoPE is analytic)", file=out)
    if budget is None:
        print("no budget: pass --gpu-mem GiB to check whether it fits", file=out)
        return 0
    best = max_context(config, batch=cfg.batch, budget_gib=budget, chunk=cfg.chunk, dtype=cfg.dtype)
    print(f"largest context at batch {cfg.batch} within {format_bytes(plan.usable_bytes)}: {best:,} tokens", file=out)
    return 0 if plan.fits else 1


def _read_prompt(cfg: GenerateConfig) -> str:
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if cfg.prompt_file is not None:
        return sys.stdin.read() if cfg.prompt_file == "-" else Path(cfg.prompt_file).read_text()
    if cfg.prompt is not None:
        return cfg.prompt
    if cfg.demo:
        return DEMO_PROMPT
    raise ValueError("--prompt TEXT or --prompt-file FILE is required")


def run_generate(cfg: GenerateConfig, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Stream one completion to ``out`` (stdout); TTFT and speeds to ``err`` (stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    prompt = _read_prompt(cfg)
    context = _context(cfg)
    with _model_source(cfg) as path:
        t0 = time.perf_counter()
        model, tokenizer = _load(cfg, path, _rope_limit(path, context))
        load_s = time.perf_counter() - t0
        ids = tokenizer(prompt)["input_ids"]
        engine = _engine(model, tokenizer, cfg, context or len(ids) + cfg.max_tokens, _PrefillBar(cfg.chunk, cfg.quiet))

        def on_output(o):
            if not cfg.no_stream and o.text:
                out.write(o.text)
                out.flush()

        [c] = engine.generate([ids], cfg.sampling_params(), on_output=on_output)
    if cfg.no_stream:
        out.write(c.text)
    out.write("\n")
    out.flush()
    if not cfg.quiet:
        n_prompt, n_out = len(c.prompt_token_ids), len(c.token_ids)
        print(f"[load {load_s:.2f} s | prompt {n_prompt} tokens, TTFT {c.ttft:.3f} s ({n_prompt / c.ttft:,.0f} tok/s prefill) | "
              f"{n_out} tokens, decode {c.decode_tokens_per_s:,.1f} tok/s | finish: {c.finish_reason.value}]", file=err)
    return 0


CHAT_CONTEXT = 8192
"""Context of ``sala chat`` without ``--context`` (capped at the model's ``max_position_embeddings``)."""
CHAT_HELP = ("commands: /help this list, /reset clear the history, /exit or /quit (or EOF) leave; "
             "start a message with // to send one beginning with /")


def _max_positions(spec: str) -> int:
    from sala.engine.loader import load_config

    return load_config(spec).max_position_embeddings


def run_chat(cfg: ChatConfig, inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Multi-turn chat on stdin/stdout. Lines starting with ``/`` are commands (:data:`CHAT_HELP`), never sent to the
    model: ``/exit``, ``/quit`` or EOF end it, ``/reset`` clears the history, ``/help`` lists them."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    from sala.engine.chat import THINK_MODES, ThinkFilter, render_chat

    if cfg.think not in THINK_MODES:
        raise ValueError(f"--think must be one of {THINK_MODES}, got {cfg.think!r}")
    with _model_source(cfg) as path:
        # without --context: 8192 tokens or the model's own limit, whichever is smaller (raising the limit on every
        # start of a 4096-token demo model was silent and unasked for); an explicit --context may raise it
        context = _context(cfg) or min(CHAT_CONTEXT, _max_positions(path))
        model, tokenizer = _load(cfg, path, _rope_limit(path, context))
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {path} has no chat template")
        engine = _engine(model, tokenizer, cfg, context, _PrefillBar(cfg.chunk, False))
        history: list[dict[str, str]] = [{"role": "system", "content": cfg.system}] if cfg.system else []
        interactive = inp.isatty()
        while True:
            if interactive:
                err.write("> ")
                err.flush()
            line = inp.readline()
            if not line:
                return 0
            text = line.rstrip("\n")
            if text.strip().startswith("/"):  # a REPL command, never sent to the model ("//..." sends "/...")
                command = text.strip()
                if command.startswith("//"):
                    text = command[1:]
                elif command in ("/exit", "/quit"):
                    return 0
                elif command == "/reset":
                    history = history[:1] if cfg.system else []
                    print("[history cleared]", file=err)
                    continue
                else:
                    if command != "/help":
                        print(f"[unknown command {command.split()[0]}]", file=err)
                    print(CHAT_HELP, file=err)
                    continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            ids = render_chat(tokenizer, history)
            budget = context - len(ids)
            if budget < 1:
                print(f"[history is {len(ids)} tokens, over the {context}-token context; /reset to start over]", file=err)
                history.pop()
                continue
            params = cfg.sampling_params()
            params.max_tokens = min(params.max_tokens, budget)
            think = ThinkFilter()

            def on_output(o):
                reasoning, answer = think.feed(o.text)
                if o.finished:
                    r2, a2 = think.flush()
                    reasoning, answer = reasoning + r2, answer + a2
                shown = (reasoning if cfg.think != "hide" else "") + answer
                if shown:
                    out.write(shown)
                    out.flush()

            [c] = engine.generate([ids], params, on_output=on_output)
            out.write("\n")
            out.flush()
            kept = c.text if cfg.think == "show" else think.answer.strip()
            history.append({"role": "assistant", "content": kept})
            print(f"[{len(c.token_ids)} tokens, TTFT {c.ttft:.2f} s, {c.decode_tokens_per_s:,.1f} tok/s]", file=err)


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The key from ``--api-key``, ``--api-key-file`` or ``SALA_API_KEY`` (at most one of them), or None."""
    from sala.utils.env import api_key

    given = [name for name, v in (("--api-key", cfg.api_key), ("--api-key-file", cfg.api_key_file),
                                  ("SALA_API_KEY", api_key())) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give the API key one way, got {' and '.join(given)}")
    if cfg.api_key is not None:
        logger.warning("--api-key is visible to every local user in the process list; prefer --api-key-file or "
                       "SALA_API_KEY")
        key = cfg.api_key
    elif cfg.api_key_file is not None:
        lines = Path(cfg.api_key_file).read_text().splitlines()  # OSError names the file
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {cfg.api_key_file} is empty; put the key on its first line")
    else:
        key = api_key()
    if key is not None and not key.isprintable():
        raise ValueError("the API key has control characters; use printable characters only")
    return key


def serve_warmup_tokens(requested: int | None, chunk: int, max_len: int, cuda: bool) -> int:
    """Prompt tokens of ``serve``'s warm-up request: ``--warmup-tokens`` (0 = none), by default one prefill chunk on
    CUDA and none on CPU (nothing to compile there); always leaving room for its 8 decoded tokens."""
    want = requested if requested is not None else (chunk if cuda else 0)
    return max(0, min(want, max_len - 9))


def warm_up(engine, prompt_tokens: int, decode_tokens: int, seed: int = 0):
    """One request of ``prompt_tokens`` random tokens decoding ``decode_tokens`` (greedy, EOS ignored) -> its
    Completion. The first after load pays Triton compilation, tuning (:mod:`sala.ops.common.tuning`) and CUDA-graph
    capture; both compiled kernels and tuning picks persist on disk for later processes."""
    import torch

    from sala.engine.types import SamplingParams

    vocab = engine.model.config.vocab_size
    ids = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    [c] = engine.generate([ids], params)
    return c


def run_warmup(cfg: WarmupConfig, out: TextIO | None = None) -> int:
    """Load, then time the first request (cold) and an identical second one (warm): the cold-start cost a
    server's first client would pay, and the compile / tuning caches filled for the processes that come after."""
    from sala.engine.planner import parse_tokens

    out = out or sys.stdout
    tokens = parse_tokens(cfg.prompt_tokens)
    context = _context(cfg) or tokens + cfg.decode_tokens + 1
    if context < tokens + cfg.decode_tokens:
        raise ValueError(f"--context {context} is shorter than --prompt-tokens {tokens} + --decode-tokens "
                         f"{cfg.decode_tokens}")
    with _model_source(cfg) as path:
        t0 = time.perf_counter()
        model, tokenizer = _load(cfg, path, _rope_limit(path, context))
        engine = _engine(model, tokenizer, cfg, context)
        load_s = time.perf_counter() - t0
        cold = warm_up(engine, tokens, cfg.decode_tokens, cfg.seed)
        warm = warm_up(engine, tokens, cfg.decode_tokens, cfg.seed)
    ratio = cold.ttft / warm.ttft if warm.ttft > 0 else float("nan")
    print(f"load {load_s:.2f} s; prompt {tokens:,} tokens: first request TTFT {cold.ttft:.3f} s (compile, tuning, "
          f"graph capture), warm {warm.ttft:.3f} s: {ratio:.2f}x warm (target <= 1.2x after a warm-up in an "
          f"earlier process); decode {cold.decode_tokens_per_s:.1f} -> {warm.decode_tokens_per_s:.1f} tok/s", file=out)
    return 0


def run_serve(cfg: ServeConfig) -> int:
    from sala.engine.server import AsyncEngine, ServerConfig, serve

    key = resolve_api_key(cfg)  # before the model loads: a bad key source fails in a second, not after minutes
    context = _context(cfg)
    with _model_source(cfg) as path:
        model, tokenizer = _load(cfg, path, _rope_limit(path, context))
        max_len = context or min(model.config.max_position_embeddings, 32768)
        engine = _engine(model, tokenizer, cfg, max_len)
        warm = serve_warmup_tokens(cfg.warmup_tokens, cfg.chunk, max_len, next(model.parameters()).is_cuda)
        if warm > 0:
            c = warm_up(engine, warm, 8)
            logger.info("warm-up request (%d prompt tokens): TTFT %.3f s", len(c.prompt_token_ids), c.ttft)
        name = cfg.served_model_name or ("sala-demo" if cfg.demo else Path(cfg.model).name)
        server_cfg = ServerConfig(model_name=name, api_key=key, max_request_bytes=cfg.max_request_bytes)
        logger.info("serving %s on http://%s:%d (batch %d, context %d)", name, cfg.host, cfg.port, cfg.batch, max_len)
        serve(AsyncEngine(engine), tokenizer, server_cfg, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
              shutdown_timeout=cfg.shutdown_timeout)
    return 0
