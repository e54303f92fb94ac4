"""Official checkpoint format (spec §2): ``config.json`` + safetensors (single file or sharded with an index).

Parameter names in code equal the official on-disk names, so HF's ``save_pretrained``/``from_pretrained`` do the
tensor I/O. This module adds what HF leaves soft: a strict check of a checkpoint directory against the
config (missing, unexpected or mis-shaped tensors, broken index, unreadable shards) that runs before loading,
with one specific error per problem, and the expected-name table used by tests and converters.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from sala.model.configuration_sala import SALAConfig

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
OFFICIAL_ARCHITECTURE = "MiniCPMSALAForCausalLM"


class CheckpointError(ValueError):
    """A checkpoint directory does not match its config or cannot be read."""


def expected_shapes(config: SALAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the official format with its shape ([out, in] for linears)."""
    c = config
    H, Hkv, D, hid, inter = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    width = H * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, hid), "model.norm.weight": (hid,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, hid)
    bias = c.attention_bias or c.qkv_bias
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        kv = Hkv if c.is_sparse_layer(i) else c.lightning_nkv
        shapes.update({
            p + "input_layernorm.weight": (hid,),
            p + "post_attention_layernorm.weight": (hid,),
            p + "self_attn.q_proj.weight": (width, hid),
            p + "self_attn.k_proj.weight": (kv * D, hid),
            p + "self_attn.v_proj.weight": (kv * D, hid),
            p + "self_attn.o_proj.weight": (hid, width),
            p + "mlp.gate_proj.weight": (inter, hid),
            p + "mlp.up_proj.weight": (inter, hid),
            p + "mlp.down_proj.weight": (hid, inter),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (width,), p + "self_attn.k_proj.bias": (kv * D,),
                           p + "self_attn.v_proj.bias": (kv * D,)})
        if c.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hid,)
        if c.is_sparse_layer(i):
            if c.attn_use_output_gate:
                shapes[p + "self_attn.o_gate.weight"] = (width, hid)
            if c.attn_qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
        else:
            if c.use_output_gate:
                shapes[p + "self_attn.z_proj.weight"] = (width, hid)
            if c.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
            if c.use_output_norm:
                shapes[p + "self_attn.o_norm.weight"] = (width,)
    return shapes


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file header, without reading tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    end = 0
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = (meta["dtype"], tuple(meta["shape"]))
        end = max(end, meta["data_offsets"][1])
    if 8 + n + end > path.stat().st_size:
        raise CheckpointError(f"{path}: truncated safetensors file (data ends at {8 + n + end}, file has {path.stat().st_size} bytes)")
    return out


def checkpoint_tensors(directory: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """All tensors of a checkpoint directory (single file or index + shards) -> (dtype, shape)."""
    d = Path(directory)
    if (d / SAFE_INDEX).exists():
        try:
            index = json.loads((d / SAFE_INDEX).read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{d / SAFE_INDEX}: unreadable index ({e})") from e
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).exists():
                names = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(f"shard {shard} listed in {SAFE_INDEX} is missing ({len(names)} tensors, e.g. {names[0]})")
            header = read_safetensors_header(d / shard)
            for name, meta in header.items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"tensor {name} is in shard {shard} but the index maps it to {weight_map.get(name)}")
                tensors[name] = meta
        missing_in_shards = sorted(set(weight_map) - set(tensors))
        if missing_in_shards:
            raise CheckpointError(f"index lists tensors absent from their shards: {missing_in_shards[:5]}")
        return tensors
    if (d / SAFE_SINGLE).exists():
        return read_safetensors_header(d / SAFE_SINGLE)
    raise CheckpointError(f"{d}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def verify_checkpoint(directory: str | os.PathLike, config: SALAConfig) -> None:
    """Raise :class:`CheckpointError` unless the directory holds exactly the tensors ``config`` needs."""
    found = checkpoint_tensors(directory)
    expected = expected_shapes(config)
    dtypes: dict[str, str] = {}
    if getattr(config, "quantization_config", None):
        from sala.model.quantize import quantized_tensors

        expected, dtypes = quantized_tensors(expected, config.quantization_config)
    if config.tie_word_embeddings:
        found = {k: v for k, v in found.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {len(missing)} tensors, e.g. {missing[:3]}")
    if extra:
        raise CheckpointError(f"checkpoint {directory} has {len(extra)} unexpected tensors, e.g. {extra[:3]}")
    for name, shape in expected.items():
        if found[name][1] != shape:
            raise CheckpointError(f"tensor {name} has shape {list(found[name][1])}, config expects {list(shape)}")
    for name, dtype in dtypes.items():
        if found[name][0] != dtype:
            from sala.model.quantize import describe

            raise CheckpointError(f"tensor {name} is {found[name][0]}, but config.json's quantization_config "
                                  f"({describe(config.quantization_config)}) expects {dtype}")


def write_official_config(directory: str | os.PathLike) -> None:
    """Rewrite ``config.json`` with the official architecture name (HF writes the Python class name)."""
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = [OFFICIAL_ARCHITECTURE]
    cfg.setdefault("rope_scaling", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def nonfinite_tensors(named) -> list[tuple[str, int, int]]:
    """``(name, non-finite count, numel)`` of each floating tensor in ``named`` ((name, tensor) pairs) holding NaN or
    inf. Reads every element once (memory-bandwidth bound: ~2 s for a 9B model on a GPU)."""
    import torch

    bad = []
    for name, t in named:
        if t.is_floating_point() and t.numel():
            n = int((~torch.isfinite(t.float() if t.element_size() == 1 else t)).sum())  # no isfinite for fp8
            if n:
                bad.append((name, n, t.numel()))
    return bad


def check_finite_weights(named, where: str) -> None:
    """Raise :class:`CheckpointError` naming the tensors of ``named`` that hold NaN/inf: such weights load, then
    every request returns garbage (issue 17 item 5)."""
    bad = nonfinite_tensors(named)
    if bad:
        shown = ", ".join(f"{n} ({k:,} of {total:,} values)" for n, k, total in bad[:3])
        raise CheckpointError(f"{where} has {len(bad)} tensor(s) with NaN/inf values: {shown}"
                              f"{', ...' if len(bad) > 3 else ''}; the weights are corrupt (re-convert or re-train)")


def check_checkpoint_weights(directory: str | os.PathLike) -> None:
    """:func:`check_finite_weights` over every safetensors file of a checkpoint directory, one tensor at a time."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors file to check")

    def tensors():
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)

    check_finite_weights(tensors(), f"checkpoint {directory}")
