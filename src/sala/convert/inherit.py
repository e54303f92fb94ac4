"""Weight inheritance, dense Transformer -> SALA (spec training.md §3), streamed tensor by tensor.

Per layer:

* **Lightning** (``lightning-attn``): ``q_proj``/``o_proj`` copied; ``k_proj``/``v_proj`` (and biases) expanded
  GQA -> MHA by ``repeat_interleave`` over heads (new head i = source KV head i // g); ``q_norm``/``k_norm`` from
  the source when it has them (Qwen3) else ones; ``o_norm`` ones; ``z_proj`` per :class:`InitOptions`.
* **Sparse** (``minicpm4``): ``q/k/v/o`` copied at the source's KV heads; RoPE off (HyPE, a config switch);
  ``o_gate`` per :class:`InitOptions`; q/k norms copied when the source has them.
* Embedding, norms, MLPs, lm_head copied.

The source is read through ``safe_open`` (memory-mapped); one output tensor is materialised at a time and the
writer flushes a shard once it reaches ``max_shard_bytes``, so at most one output shard sits in RAM.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sala.convert.adapters import ConversionError, SourceSpec, SourceTensorError
from sala.model.checkpoint_io import (SAFE_INDEX, SAFE_SINGLE, check_finite_weights, expected_shapes, verify_checkpoint,
                                      write_official_config)
from sala.model.configuration_sala import SALAConfig
from sala.model.modeling_sala import SALAForCausalLM

logger = logging.getLogger(__name__)

Z_PROJ_INITS = ("random", "zeros")
O_GATE_INITS = ("compensated", "random")
# non-weight files of a checkpoint directory that travel with it (tokenizer, chat template, generation defaults)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


@dataclass(frozen=True, kw_only=True)
class InitOptions:
    """How the tensors with no source counterpart are initialised."""

    z_proj_init: str = "random"
    """Lightning output gate ``z_proj``: ``random`` = HALO (PyTorch's nn.Linear default, U(+-1/sqrt(hidden)));
    ``zeros`` = constant gate 0.5."""
    o_gate_init: str = "compensated"
    """Sparse-layer ``o_gate``: ``compensated`` = zero weights (gate = sigmoid(0) = 0.5 everywhere) with ``o_proj``
    doubled, so the layer's output equals the source's exactly at conversion; ``random`` = U(+-1/sqrt(hidden)) with
    ``o_proj`` copied unchanged (HALO adds its attention gate fresh; the source function changes)."""
    seed: int = 0
    """Seed of the random initialisations; each layer and tensor draws from its own generator, so results do not
    depend on the order tensors are produced in."""

    def __post_init__(self) -> None:
        if self.z_proj_init not in Z_PROJ_INITS:
            raise ValueError(f"z_proj_init must be one of {Z_PROJ_INITS}, got {self.z_proj_init!r}")
        if self.o_gate_init not in O_GATE_INITS:
            raise ValueError(f"o_gate_init must be one of {O_GATE_INITS}, got {self.o_gate_init!r}")


# ---------------------------------------------------------------------------------------------------------------
# per-layer transforms (shared by the checkpoint writer, the in-memory builder and HALO's students)
# ---------------------------------------------------------------------------------------------------------------
def expand_kv_heads(t: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """GQA -> MHA for a k/v projection weight [Hkv*D, hidden] or bias [Hkv*D]: head i of the result is source head
    i // (num_heads / num_kv_heads) (spec §3.1, HALO ``expand_kv_proj``)."""
    g = num_heads // num_kv_heads
    heads = t.reshape(num_kv_heads, -1, *t.shape[1:])  # [Hkv, D, (hidden)]
    return heads.repeat_interleave(g, dim=0).reshape(num_heads * heads.shape[1], *t.shape[1:])


def _uniform(shape: tuple[int, ...], fan_in: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound).to(dtype)


def _init_seed(opts: InitOptions, layer: int, which: int) -> int:
    return (opts.seed * 1_000_003 + layer * 16 + which) % (2**63)


def lightning_attention_tensors(
    src: Mapping[str, torch.Tensor], spec: SourceSpec, layer: int, opts: InitOptions
) -> dict[str, torch.Tensor]:
    """Source attention tensors of one layer (local names ``q_proj.weight``, ...) -> Lightning tensors."""
    H, Hkv, D, hid = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    dtype = src["q_proj.weight"].dtype
    out = {"q_proj.weight": src["q_proj.weight"], "o_proj.weight": src["o_proj.weight"],
           "k_proj.weight": expand_kv_heads(src["k_proj.weight"], Hkv, H),
           "v_proj.weight": expand_kv_heads(src["v_proj.weight"], Hkv, H)}
    for name in spec.layer_bias_names():
        b = src[f"{name}.bias"]
        out[f"{name}.bias"] = expand_kv_heads(b, Hkv, H) if name in ("k_proj", "v_proj") else b
    for name in ("q_norm.weight", "k_norm.weight"):
        out[name] = src[name] if name in src else torch.ones(D, dtype=dtype)
    out["o_norm.weight"] = torch.ones(H * D, dtype=dtype)
    if opts.z_proj_init == "random":
        out["z_proj.weight"] = _uniform((H * D, hid), hid, _init_seed(opts, layer, 1), dtype)
    else:
        out["z_proj.weight"] = torch.zeros(H * D, hid, dtype=dtype)
    return out


def sparse_attention_tensors(
    src: Mapping[str, torch.Tensor], spec: SourceSpec, config: SALAConfig, layer: int, opts: InitOptions
) -> dict[str, torch.Tensor]:
    """Source attention tensors of one layer -> sparse (softmax) layer tensors at the source's KV heads."""
    out = {k: v for k, v in src.items()}
    if config.attn_use_output_gate:
        H, D, hid = spec.num_heads, spec.head_dim, spec.hidden_size
        dtype = src["q_proj.weight"].dtype
        if opts.o_gate_init == "compensated":
            out["o_gate.weight"] = torch.zeros(H * D, hid, dtype=dtype)
            out["o_proj.weight"] = src["o_proj.weight"] * 2  # sigmoid(0) = 1/2, exactly undone (x2 is exact in fp)
        else:
            out["o_gate.weight"] = _uniform((H * D, hid), hid, _init_seed(opts, layer, 2), dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------------
class SourceReader:
    """Tensor access by name over a (sharded) safetensors checkpoint; shards are opened lazily and memory-mapped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / SAFE_INDEX
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(directory.glob("*.safetensors"))
            if len(files) != 1:
                raise SourceTensorError(
                    f"source {directory} has {len(files)} safetensors files but no {SAFE_INDEX} to say which tensor is where"
                )
            with safe_open(str(files[0]), framework="pt") as f:
                self.weight_map = {k: files[0].name for k in f.keys()}
        self._handles: dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise SourceTensorError(f"source {self.directory} has no tensor {name}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _layer_source(reader: SourceReader, spec: SourceSpec, i: int) -> dict[str, torch.Tensor]:
    """Every source tensor of layer i under SALA-local names (``self_attn.q_proj.weight``, ...)."""
    return {local: reader.get(spec.source_key(f"model.layers.{i}.{local}")) for local in spec.layer_local_shapes()}


def iter_sala_tensors(
    spec: SourceSpec,
    config: SALAConfig,
    opts: InitOptions,
    *,
    overrides: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(official name, tensor)`` for every tensor of the converted model, in source order.

    ``overrides`` replaces converted tensors by name (e.g. HALO's aligned Lightning students); ``dtype`` casts
    everything (default: each tensor keeps the source's dtype).
    """
    if config.num_hidden_layers != spec.num_layers:
        raise ConversionError(f"config has {config.num_hidden_layers} layers, source has {spec.num_layers}")
    expected = expected_shapes(config)
    overrides = dict(overrides or {})
    for name, t in overrides.items():
        if name not in expected:
            raise ConversionError(f"override {name} is not a tensor of the converted model")
        if tuple(t.shape) != expected[name]:
            raise ConversionError(f"override {name} has shape {list(t.shape)}, the converted model needs {list(expected[name])}")
    reader = SourceReader(spec.path)

    def emit(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        t = overrides.get(name, t)
        assert tuple(t.shape) == expected[name], (name, tuple(t.shape), expected[name])
        return name, (t.to(dtype) if dtype is not None else t).contiguous()

    try:
        yield emit("model.embed_tokens.weight", reader.get(spec.source_key("model.embed_tokens.weight")))
        for i in range(spec.num_layers):
            src = _layer_source(reader, spec, i)
            attn = {k.removeprefix("self_attn."): v for k, v in src.items() if k.startswith("self_attn.")}
            if config.is_sparse_layer(i):
                attn = sparse_attention_tensors(attn, spec, config, i, opts)
            else:
                attn = lightning_attention_tensors(attn, spec, i, opts)
            layer = {k: v for k, v in src.items() if not k.startswith("self_attn.")}
            layer.update({f"self_attn.{k}": v for k, v in attn.items()})
            for local in sorted(layer):
                yield emit(f"model.layers.{i}.{local}", layer[local])
        yield emit("model.norm.weight", reader.get(spec.source_key("model.norm.weight")))
        if not config.tie_word_embeddings:
            key = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
            yield emit("lm_head.weight", reader.get(spec.source_key(key)))  # untie: lm_head = copy of embedding
    finally:
        reader.close()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_sala_checkpoint(
    spec: SourceSpec,
    config: SALAConfig,
    out_dir: str | Path,
    opts: InitOptions,
    *,
    overrides: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 2**30,
    force: bool = False,
    check_weights: bool = True,
) -> list[Path]:
    """Write ``config.json`` + safetensors (sharded past ``max_shard_bytes``, with an index) + the source's
    tokenizer files into ``out_dir``; verify the result's names and shapes against ``config``, and with
    ``check_weights`` that no tensor holds NaN/inf. Written as a temporary sibling, then moved into place
    (:func:`sala.utils.fs.atomic_dir`): a non-empty ``out_dir`` is refused unless ``force``, and only files sala
    wrote there are ever replaced or removed."""
    from sala.utils.fs import atomic_dir

    with atomic_dir(out_dir, force=force) as work:
        files = _write_checkpoint(spec, config, work, opts, overrides, dtype, max_shard_bytes, check_weights)
    return [Path(out_dir) / f.name for f in files]


def _write_checkpoint(spec: SourceSpec, config: SALAConfig, out: Path, opts: InitOptions,
                      overrides: Mapping[str, torch.Tensor] | None, dtype: torch.dtype | None, max_shard_bytes: int,
                      check_weights: bool) -> list[Path]:
    """Fill the empty folder ``out`` (see :func:`write_sala_checkpoint`)."""
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        path = out / f"part-{len(parts):05d}.safetensors.tmp"
        save_file(buf, str(path), metadata={"format": "pt"})
        parts.append(path)
        buf, size = {}, 0

    for name, t in iter_sala_tensors(spec, config, opts, overrides=overrides, dtype=dtype):
        if check_weights:  # NaN/inf weights would load and then generate garbage
            check_finite_weights([(name, t)], f"the converted checkpoint (from {spec.path})")
        if buf and size + _nbytes(t) > max_shard_bytes:
            flush()
        buf[name] = t
        weight_map[name] = len(parts)
        size += _nbytes(t)
        total += _nbytes(t)
    if buf:
        flush()
    if len(parts) == 1:
        files = [parts[0].rename(out / SAFE_SINGLE)]
    else:
        names = [f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors" for k in range(len(parts))]
        files = [p.rename(out / n) for p, n in zip(parts, names)]
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    elif spec.torch_dtype:
        config.dtype = spec.torch_dtype
    config.save_pretrained(out)
    write_official_config(out)
    copy_tokenizer_files(spec.path, out)
    verify_checkpoint(out, config)
    logger.info("wrote %d shard(s), %.1f MiB, to %s", len(files), total / 2**20, out)
    return files


GROWTH_KINDS = ("kv_expansion", "z_proj", "o_gate", "norms", "untied_lm_head")


def parameter_growth(spec: SourceSpec, config: SALAConfig) -> dict:
    """Parameter counts of the source and of its conversion under ``config``, and the difference by kind:
    ``kv_expansion`` (Lightning k/v GQA -> MHA, biases included), ``z_proj`` (Lightning output gate), ``o_gate``
    (sparse output gate), ``norms`` (new q/k/o norms), ``untied_lm_head``. Tied weights count once (spec §3)."""
    src = spec.expected_source_shapes()
    kinds = dict.fromkeys(GROWTH_KINDS, 0)
    converted = 0
    for name, shape in expected_shapes(config).items():
        n = math.prod(shape)
        converted += n
        try:
            key = spec.source_key(name)
        except KeyError:
            key = None
        if key is not None and key in src:
            extra = n - math.prod(src[key])
            if extra:
                assert name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")), name
                kinds["kv_expansion"] += extra
        elif name == "lm_head.weight":
            kinds["untied_lm_head"] += n
        elif name.endswith("z_proj.weight"):
            kinds["z_proj"] += n
        elif name.endswith("o_gate.weight"):
            kinds["o_gate"] += n
        else:
            assert name.endswith("norm.weight"), name  # q_norm / k_norm / o_norm with no source counterpart
            kinds["norms"] += n
    source = sum(math.prod(s) for s in src.values())
    assert source + sum(kinds.values()) == converted, (source, kinds, converted)
    return {"source_params": source, "converted_params": converted, "growth": converted - source,
            "growth_fraction": (converted - source) / source, "by_kind": kinds}


def format_growth(g: dict) -> str:
    """``params 134.52M -> 163.10M (+21.2%): kv_expansion +14.16M, ...`` for the CLI summary."""
    def m(n: int) -> str:
        return f"{n:,}" if n < 1_000_000 else f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"

    parts = ", ".join(f"{k} +{m(v)}" for k, v in g["by_kind"].items() if v)
    return (f"params {m(g['source_params'])} -> {m(g['converted_params'])} (+{100 * g['growth_fraction']:.1f}%)"
            + (f": {parts}" if parts else ""))


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer / chat-template / generation-config files a checkpoint directory carries."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def build_sala_model(
    spec: SourceSpec,
    config: SALAConfig,
    opts: InitOptions,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    overrides: Mapping[str, torch.Tensor] | None = None,
) -> SALAForCausalLM:
    """The converted model in memory (built on ``meta``, then assigned the streamed tensors: one copy)."""
    with torch.device("meta"):
        model = SALAForCausalLM(config)
    state = {name: t.to(device=device, dtype=dtype) for name, t in
             iter_sala_tensors(spec, config, opts, overrides=overrides)}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
