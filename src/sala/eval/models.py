"""Models under evaluation: one loader for every kind (SALA checkpoint or preset, dense HF directory, GGUF file),
the length checks made before anything long runs, and the two forward paths every eval uses: chunked prefill
through the model's own cache (SALA ``HybridCache`` or transformers ``DynamicCache``) and greedy decoding.

Knows nothing about tasks or prompts; works on token ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sala.engine.loader import PRESETS, dtype_name, load_config, load_model, resolve_device, resolve_dtype
from sala.engine.planner import format_bytes, plan_memory
from sala.model import SALAForCausalLM

logger = logging.getLogger(__name__)

Spec = str


def _gguf_in(directory: Path) -> Path | None:
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{directory} holds {len(files)} .gguf files ({', '.join(f.name for f in files)}); "
                         "pass the file itself as --model")
    return files[0] if files else None


def model_kind(spec: Spec) -> str:
    """``sala`` (preset or ``minicpm_sala`` checkpoint), ``gguf`` (file or directory holding one, no config.json)
    or ``hf`` (any other transformers causal-LM directory)."""
    path = Path(spec)
    if spec in PRESETS and not path.exists():  # like sala.engine.loader: an existing path wins over a preset name
        return "sala"
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {spec!r} is a file but not a .gguf; give a checkpoint directory, a .gguf file "
                             f"or a preset ({', '.join(PRESETS)})")
        return "gguf"
    if not path.is_dir():
        raise ValueError(f"--model {spec!r} is neither a directory, a .gguf file nor a preset ({', '.join(PRESETS)})")
    config = path / "config.json"
    if config.exists():
        return "sala" if json.loads(config.read_text()).get("model_type") == "minicpm_sala" else "hf"
    if _gguf_in(path) is not None:
        return "gguf"
    raise ValueError(f"{spec} has neither a config.json nor a .gguf file")


def model_label(spec: Spec) -> str:
    """Short name for tables and plots: the preset, the directory name or the GGUF file's stem."""
    path = Path(spec)
    if spec in PRESETS and not path.exists():
        return spec
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def load_eval_model(spec: Spec, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", *, seed: int = 0,
                    max_positions: int | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, label) for a SALA checkpoint or preset, a dense HF directory or a GGUF file / directory.

    ``max_positions`` raises ``max_position_embeddings``: a SALA model's RoPE is analytic (spec §10.16); a dense
    model with plain RoPE (``rope_type`` default) then runs past its trained window by extrapolation, which is
    what a "past the teacher's window" comparison measures; scaled RoPE kinds (linear, dynamic, yarn, ...) derive
    their frequencies from that limit, so they are refused. ``dtype`` auto is bf16 on CUDA and fp32 on CPU (GGUF
    weights are dequantized to it).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    kind, label = model_kind(spec), model_label(spec)
    if kind == "sala":
        model, tokenizer = load_model(spec, device=dev, dtype=dt, seed=seed, max_position_embeddings=max_positions)
        return model, tokenizer, label
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        path = Path(spec)
        gguf = path if path.is_file() else _gguf_in(path)
        directory, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        directory, kwargs = spec, {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt, **kwargs).to(dev).eval()
    if max_positions is not None:
        raise_dense_positions(model.config, max_positions, spec)
    logger.info("loaded %s (%s, %s) on %s in %s", spec, kind, type(model).__name__, dev, dtype_name(dt))
    return model, tokenizer, label


def raise_dense_positions(config: Any, max_positions: int, label: str, *, warn: bool = True) -> None:
    """Set a dense config's ``max_position_embeddings`` to ``max_positions`` if its RoPE does not depend on it;
    ``warn``: log that positions past the old limit are extrapolated (once per model: the load warns)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind != "default":
        raise ValueError(f"--max-positions cannot raise {label}'s limit: its RoPE ({kind!r}) is scaled from "
                         f"max_position_embeddings {config.max_position_embeddings:,}, so a new limit would change the "
                         "model; use lengths within it")
    if warn and max_positions > (config.max_position_embeddings or 0):
        logger.warning("%s: positions past its trained window of %s tokens are RoPE extrapolation", label,
                       f"{config.max_position_embeddings:,}")
    config.max_position_embeddings = max_positions


def is_sala(model: Any) -> bool:
    return isinstance(model, SALAForCausalLM)


def max_positions(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_lengths(config: Any, label: str, lengths: list[int], *, sala: bool, device: torch.device, dtype: torch.dtype,
                  batch: int = 1, chunk: int = 2048, budget_gib: float | None = None,
                  weights_bytes: int | None = None) -> None:
    """Refuse lengths a model cannot run: past ``max_position_embeddings`` (every model), or past the memory budget
    (SALA models, by :func:`sala.engine.planner.plan_memory`; the budget is the CUDA device's memory unless
    ``budget_gib`` is given; unchecked on CPU without one). Needs only the config: runs before loading."""
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(lengths)
    if limit is not None and longest > limit:
        fix = ("pass --max-positions to raise it (RoPE is analytic, docs/architecture.md §10.16)" if sala
               else "use a shorter length or a model with a longer context")
        raise ValueError(f"length {longest:,} exceeds {label}'s max_position_embeddings {limit:,}; {fix}")
    if not sala:
        return
    if budget_gib is None and device.type == "cuda":
        budget_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if budget_gib is None:
        return
    plan = plan_memory(config, batch=batch, context=longest, chunk=chunk, dtype=dtype_name(dtype), budget_gib=budget_gib,
                       weights_bytes=weights_bytes)
    if not plan.fits:
        raise ValueError(f"length {longest:,} x batch {batch} does not fit {label} in {format_bytes(plan.usable_bytes)} "
                         f"(needs {format_bytes(plan.total_bytes)}); lower the length, --batch or --chunk\n" + plan.format())


def load_checked(spec: Spec, opts: Any, lengths: list[int], batch: int = 1) -> tuple[Any, Any, str]:
    """:func:`load_eval_model` with ``opts`` (an :class:`~sala.eval.config.EvalOptions`), checking ``lengths``
    from the config before loading (SALA and HF directories, presets) and from the model after (GGUF too)."""
    dev = resolve_device(opts.device)
    dt = resolve_dtype(opts.dtype, dev)
    kind, label = model_kind(spec), model_label(spec)
    common = dict(sala=kind == "sala", device=dev, dtype=dt, batch=batch, chunk=opts.chunk, budget_gib=opts.gpu_mem)
    if kind == "sala":
        config = load_config(spec)
        if opts.max_positions is not None:
            config.max_position_embeddings = opts.max_positions
        check_lengths(config, label, lengths, **common)
    elif kind == "hf":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec)
        if opts.max_positions is not None:
            raise_dense_positions(config, opts.max_positions, label, warn=False)  # the load below warns
        check_lengths(config, label, lengths, **common)
    model, tokenizer, label = load_eval_model(spec, dev, dt, seed=opts.model_seed, max_positions=opts.max_positions)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    check_lengths(model.config, label, lengths, weights_bytes=weights, **common)
    return model, tokenizer, label


# ---- forward paths ------------------------------------------------------------------------------------------------
def new_cache(model: Any) -> Any:
    """An empty cache of the model's kind: SALA's HybridCache, or transformers' DynamicCache."""
    if is_sala(model):
        return model.model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill_chunks(model: Any, ids: torch.Tensor, chunk: int, cache: Any | None = None,
                   logits_to_keep: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed ``ids`` [B, T] through the model ``chunk`` tokens at a time, keeping the cache between chunks;
    yields (start, fp32 logits [B, t, V]) per chunk (the last ``logits_to_keep`` positions of it, 0 = all).
    The cache (new if None) holds all T tokens afterwards."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cache = new_cache(model) if cache is None else cache
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start : start + chunk]
        out = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        yield start, out.logits.float()


@torch.no_grad()
def greedy_generate(model: Any, prompt: list[int], max_new_tokens: int, *, chunk: int = 2048,
                    stop_ids: set[int] | frozenset[int] = frozenset(),
                    should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Greedy continuation of one prompt: chunked prefill, then one token per step through the cache. Stops at
    ``stop_ids`` (not returned), after ``max_new_tokens``, or when ``should_stop(tokens so far)`` is true."""
    dev = model_device(model)
    ids = torch.tensor([prompt], dtype=torch.long, device=dev)
    cache = new_cache(model)
    logits = None
    for _, logits in prefill_chunks(model, ids, chunk, cache, logits_to_keep=1):
        pass
    out: list[int] = []
    while len(out) < max_new_tokens:
        tok = int(logits[0, -1].argmax())  # .item() syncs once per token; fine for a few answer tokens
        if tok in stop_ids:
            break
        out.append(tok)
        if should_stop is not None and should_stop(out):
            break
        step = torch.tensor([[tok]], dtype=torch.long, device=dev)
        logits = model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.float()
    return out


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids of the config, the generation config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model.config, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


def describe(model: Any) -> dict:
    """What the JSON reports record about a model."""
    p = next(model.parameters())
    return {"class": type(model).__name__, "device": str(p.device), "dtype": dtype_name(p.dtype),
            "parameters": sum(q.numel() for q in model.parameters()), "max_position_embeddings": max_positions(model)}


def setup_threads(threads: int | None) -> None:
    from sala.utils.env import set_cpu_threads

    set_cpu_threads(threads)  # default: sala.utils.env.default_cpu_threads
