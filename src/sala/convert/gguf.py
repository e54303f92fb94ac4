"""GGUF sources: a ``.gguf`` file (or a directory holding exactly one) is materialised once into a dense HF
checkpoint directory (``config.json`` + ``model.safetensors`` + tokenizer files with the chat template +
``generation_config.json``), which the rest of ``sala.convert`` reads like any other source.

transformers does the reading (``from_pretrained(dir, gguf_file=name)``: dequantisation and llama.cpp's q/k
row permutation undone), so the materialised model is exactly what transformers computes for the GGUF, and the
identity check compares against transformers' own class for it.

The cache lives under ``$SALA_CACHE_DIR/gguf`` (default ``~/.cache/sala/gguf``), one directory per
(file content sha256, dtype); it is written in a temporary directory and renamed into place, so a killed run never
leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from sala.convert.errors import ConversionError, UnsupportedArchitectureError
from sala.utils import fs
from sala.utils.env import cache_dir

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# general.architecture values whose transformers model is one of our families (llama.cpp writes Mistral as llama)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SOURCE_JSON = "gguf_source.json"  # written last into a cache entry: its presence marks the entry complete
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class GGUFSource:
    """A GGUF file and the dense HF directory it was materialised into."""

    file: str
    """The ``.gguf`` file (resolved path)."""
    architecture: str
    """``general.architecture`` (llama, qwen2, ...)."""
    quant_type: str
    """``general.file_type`` as llama.cpp names it (e.g. ``MOSTLY_Q4_1``), or the dominant tensor type."""
    tensor_types: dict
    """Tensor count per GGML type, e.g. ``{"Q4_1": 211, "F32": 61}``."""
    sha256: str
    size: int
    mtime_ns: int
    dtype: str
    """dtype of the materialised weights (dequantised from the GGUF's types)."""
    materialised: str
    """The cached dense HF directory."""

    def to_dict(self) -> dict:
        return asdict(self)


def cache_root() -> Path:
    """Where GGUF sources are materialised: ``$SALA_CACHE_DIR/gguf``, default ``~/.cache/sala/gguf``."""
    return cache_dir() / "gguf"


def _check_magic(file: Path) -> None:
    with open(file, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ConversionError(
            f"{file} is not a GGUF file: it starts with {head!r}, a GGUF starts with {GGUF_MAGIC!r} "
            "(truncated download, a Git LFS pointer, or another format?)"
        )


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file a source path names, or None for a HF checkpoint directory. Raises :class:`ConversionError`
    for a missing path, a directory with no checkpoint, several ``.gguf`` files, or a file that is not a GGUF."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConversionError(f"source {p} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            with open(p, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise ConversionError(
                        f"source {p} is a file but not a GGUF; pass a HF checkpoint directory (config.json + "
                        "safetensors), a .gguf file, or a directory holding one .gguf"
                    )
        _check_magic(p)
        return p
    if (p / "config.json").exists():  # HF checkpoint directory (a .gguf beside it is ignored)
        return None
    ggufs = sorted(q for q in p.glob("*.gguf") if q.is_file())
    if len(ggufs) > 1:
        listed = ", ".join(q.name for q in ggufs)
        raise ConversionError(
            f"source {p} holds {len(ggufs)} .gguf files ({listed}); pass the one to convert: --from {ggufs[0]}"
        )
    if not ggufs:
        raise ConversionError(
            f"source {p} holds no checkpoint: neither config.json (+ *.safetensors), as a HF checkpoint directory "
            "has, nor a .gguf file"
        )
    _check_magic(ggufs[0])
    return ggufs[0]


def _sha256(file: Path, size: int, mtime_ns: int) -> str:
    """Content hash, memoised per (path, size, mtime) in the cache so an unchanged file is hashed once."""
    memo = cache_root() / "sha256" / (hashlib.sha256(f"{file}|{size}|{mtime_ns}".encode()).hexdigest()[:32] + ".txt")
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    fs.write_text(memo, digest + "\n")  # temporary sibling, then rename (sala.utils.fs)
    return digest


def read_gguf_header(file: Path) -> tuple[str, str, dict]:
    """(architecture, quant type, tensor type counts) from the GGUF metadata, without dequantising anything."""
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(file))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ConversionError(f"{file}: unreadable GGUF ({type(e).__name__}: {e})") from e

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch is None:
        raise ConversionError(f"{file}: GGUF has no general.architecture key")
    types = Counter(GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors)
    file_type = field("general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        quant = None
    quant = quant or (types.most_common(1)[0][0] if types else "unknown")
    return str(arch), quant, dict(types)


def _fix_special_tokens(tokenizer, file: Path) -> None:
    """transformers 5's GGUF Llama tokenizer converter takes eos from the *bos* id and ignores the padding id;
    set bos/eos/pad/unk from the GGUF's own ``tokenizer.ggml.*_token_id`` keys."""
    from gguf import GGUFReader

    fields = GGUFReader(str(file)).fields
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is None:
            continue
        idx = int(f.contents())
        token = tokenizer.convert_ids_to_tokens(idx)
        if token is not None and getattr(tokenizer, f"{role}_token_id") != idx:
            logger.info("%s: %s token %r (id %d) from the GGUF metadata", file.name, role, token, idx)
            setattr(tokenizer, f"{role}_token", token)


def _write_entry(file: Path, tmp: Path, dtype: str) -> None:
    """Dequantise ``file`` with transformers and write a dense HF checkpoint into ``tmp``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=getattr(torch, dtype))
    except ImportError as e:
        raise ConversionError(f"reading GGUF needs the gguf and accelerate packages: {e}") from e
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"{file}: hidden_act {cfg.hidden_act!r}; SALA's MLP is SwiGLU (silu) only")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # save_pretrained's convention: tied heads are not stored
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    raw = cfg.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        raw.pop(key, None)
    raw["dtype"] = dtype
    raw["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(tmp))
    del model, state
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    _fix_special_tokens(tokenizer, file)
    tokenizer.save_pretrained(str(tmp))


def materialise_gguf(file: str | Path, *, dtype: str = "float32") -> GGUFSource:
    """The dense HF directory of a GGUF file, from the cache or written now (see module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    file = Path(file).expanduser().resolve()
    _check_magic(file)
    arch, quant, types = read_gguf_header(file)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{file}: GGUF architecture {arch!r} is not supported; convertible GGUF architectures: "
            f"{', '.join(GGUF_ARCHITECTURES)} (dense SwiGLU decoders with q/k/v/o attention)"
        )
    st = file.stat()
    sha = _sha256(file, st.st_size, st.st_mtime_ns)
    root = cache_root()
    target = root / f"{sha[:24]}-{dtype}"
    info = GGUFSource(file=str(file), architecture=arch, quant_type=quant, tensor_types=types, sha256=sha,
                      size=st.st_size, mtime_ns=st.st_mtime_ns, dtype=dtype, materialised=str(target))
    if (target / SOURCE_JSON).exists():
        logger.info("GGUF %s (%s, sha256 %s...): cached dense copy %s", file.name, quant, sha[:12], target)
        return info
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    logger.info("GGUF %s (%s %s): dequantising to %s into %s", file.name, arch, quant, dtype, target)
    try:
        _write_entry(file, tmp, dtype)
        (tmp / SOURCE_JSON).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        if target.exists():  # a stale, incomplete entry (no SOURCE_JSON) or a concurrent writer's finished one
            if (target / SOURCE_JSON).exists():
                return info
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / SOURCE_JSON).exists():  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("GGUF materialised in %.1fs", time.perf_counter() - t0)
    return info
