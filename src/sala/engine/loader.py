"""Load a model and its tokenizer from a checkpoint directory or a named preset (random weights)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sala.model import SALAConfig, SALAForCausalLM, preset

logger = logging.getLogger(__name__)

PRESETS = ("minicpm-sala-9b", "tiny", "tiny-sparse", "small")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch lists every device type it knows; sala runs on these
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA (spec §7), fp32 on CPU (the reference ops' precision)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_checkpoint_dir(spec: str) -> None:
    """A checkpoint directory must hold a SALA ``config.json``: without one transformers silently returned the 9B
    defaults, and ``sala plan``/``info`` described a model that is not there (issue 17 item 6)."""
    path = Path(spec) / "config.json"
    if not path.is_file():
        raise ValueError(f"{spec} has no config.json, so it is not a checkpoint directory (expected config.json + "
                         f"*.safetensors; or a preset: {', '.join(PRESETS)})")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a JSON object: {e}") from None
    if isinstance(model_type, str) and model_type != SALAConfig.model_type:
        from sala.model.configuration_sala import not_sala_message

        raise ValueError(not_sala_message(model_type, str(path)))  # "this is a llama checkpoint: run sala convert"
    if model_type != SALAConfig.model_type:
        raise ValueError(f"{path} has model_type {model_type!r}, expected {SALAConfig.model_type!r}; convert a dense "
                         "checkpoint first (sala convert --from DIR --out DIR ...)")


def load_config(spec: str) -> SALAConfig:
    """Config of a checkpoint directory or preset, without weights."""
    if os.path.isdir(spec):
        check_checkpoint_dir(spec)
        return SALAConfig.from_pretrained(spec)
    if spec in PRESETS:
        return preset(spec)
    raise ValueError(f"--model {spec!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def random_model(config: SALAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> SALAForCausalLM:
    """A model with random weights created directly on ``device`` in ``dtype`` (no fp32 copy of a 9B model)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = SALAForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def load_tokenizer(directory: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(directory))


def has_tokenizer(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists()


def load_model(spec: str, *, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto", seed: int = 0,
               max_position_embeddings: int | None = None) -> tuple[SALAForCausalLM, Any]:
    """(model, tokenizer) for a checkpoint directory (AutoTokenizer + ``from_pretrained``) or a preset (random
    weights seeded by ``seed`` and the bundled demo tokenizer). ``max_position_embeddings`` raises the RoPE
    limit for longer contexts (spec §10.16)."""
    from sala.engine.demo import demo_tokenizer_dir

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    overrides = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
    if os.path.isdir(spec):
        check_checkpoint_dir(spec)
        if not has_tokenizer(spec):
            raise ValueError(f"{spec} has no tokenizer (tokenizer.json or tokenizer.model); copy the original model's "
                             "tokenizer files into it")
        model = SALAForCausalLM.from_pretrained(spec, dtype=dt, **overrides).to(dev).eval()
        tokenizer = load_tokenizer(spec)
    elif spec in PRESETS:
        model = random_model(preset(spec, **overrides), dev, dt, seed)
        tokenizer = load_tokenizer(demo_tokenizer_dir())
    else:
        raise ValueError(f"--model {spec!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    logger.info("loaded %s on %s in %s", spec, dev, dtype_name(dt))
    return model, tokenizer


def stop_token_ids(model: SALAForCausalLM, tokenizer: Any | None) -> list[int]:
    """EOS ids of the config, the generation config and the tokenizer (released model: 2 and 73440)."""
    ids: set[int] = set()
    sources = [model.config.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return sorted(i for i in ids if 0 <= i < model.config.vocab_size)
