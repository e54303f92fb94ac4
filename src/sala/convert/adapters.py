"""Source families: read a dense HF checkpoint's ``config.json`` into one normalised :class:`SourceSpec`, name its
tensors through a per-family key table, and translate it into a :class:`SALAConfig` (spec training.md §3).

Supported ``model_type`` values and where their reference implementation lives:

* ``llama``, ``mistral``, ``qwen2``, ``qwen3``: transformers ships them (``LlamaForCausalLM`` ...), so the
  identity check compares against transformers' own code.
* ``minicpm`` (MiniCPM 1/2, MiniCPM4): remote code only (transformers 5.17 has ``minicpm3`` (MLA) and
  ``minicpmv4_6`` but no ``minicpm``). The format is Llama's tensor names plus muP keys ``scale_emb``,
  ``scale_depth`` and ``dim_model_base``; it is read from ``config.json`` directly.

Each family is one :class:`Family` row in :data:`FAMILIES`: its tensor-name tables (``{}`` = layer index) and the
config conventions that differ between families (biases, q/k norms, muP keys, tied embeddings, sliding window).
All five use the Llama tensor names today; a family with other names or conventions adds a row, not a branch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sala.convert.errors import ConversionError, SourceTensorError, UnsupportedArchitectureError
from sala.convert.gguf import find_gguf, materialise_gguf
from sala.model.checkpoint_io import CheckpointError, checkpoint_tensors
from sala.model.configuration_sala import SPARSE_CONFIG_DEFAULTS, SALAConfig

logger = logging.getLogger(__name__)


# Per-family key tables: SALA (official) name -> source name; "{}" is the layer index.
_LLAMA_GLOBAL = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "self_attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "self_attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "self_attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
    "self_attn.o_proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "self_attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "self_attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
}
# Source tensors that carry nothing SALA needs (old checkpoints stored RoPE tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one source ``model_type`` names its tensors and spells its config: everything family-specific."""

    name: str
    global_keys: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_GLOBAL))
    """SALA global tensor name -> source name."""
    layer_keys: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_LAYER))
    """SALA layer-local tensor name -> source name, ``{}`` = layer index."""
    qkv_bias: bool = False
    """q/k/v projections always carry biases, o_proj none (Qwen2); ``attention_bias`` is then not read."""
    qk_norm: bool = False
    """Per-head q/k RMSNorm weights (Qwen3)."""
    mup: bool = False
    """muP keys ``scale_emb``, ``scale_depth``, ``dim_model_base`` are read (MiniCPM); others get the identity scales."""
    tied_by_default: bool = False
    """``tie_word_embeddings`` when config.json omits it (the family's config class default)."""
    sliding_window_always: bool = False
    """``sliding_window`` applies whenever set (Mistral); otherwise only with ``use_sliding_window`` (Qwen2/3)."""
    reference: str = "transformers"
    """Identity-check reference: ``transformers`` (its own model class) or ``minicpm`` (Llama with muP folded in)."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="llama"),
    Family(name="mistral", sliding_window_always=True),
    Family(name="qwen2", qkv_bias=True),
    Family(name="qwen3", qk_norm=True),
    Family(name="minicpm", mup=True, tied_by_default=True, reference="minicpm"),
)}
SUPPORTED_FAMILIES = tuple(FAMILIES)
_KNOWN_UNSUPPORTED = {
    "minicpm3": "MiniCPM3 uses multi-head latent attention (MLA), which has no q/k/v/o projections to inherit",
    "qwen2_moe": "MoE MLPs have no SALA equivalent (SALA has one dense SwiGLU MLP per layer)",
    "qwen3_moe": "MoE MLPs have no SALA equivalent (SALA has one dense SwiGLU MLP per layer)",
    "qwen3_next": "Qwen3-Next is already a hybrid (gated DeltaNet + gated attention) with MoE MLPs",
    "mixtral": "MoE MLPs have no SALA equivalent (SALA has one dense SwiGLU MLP per layer)",
}


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """A dense source checkpoint, normalised across families (every field in SALA's terms)."""

    path: Path
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v/o biases (Llama convention)
    qkv_bias: bool  # q/k/v biases only (Qwen2 convention)
    qk_norm: bool  # per-head q/k RMSNorm weights in the source (Qwen3)
    scale_emb: float = 1.0
    scale_depth: float | None = None  # None: sqrt(num_layers), i.e. residual scale 1
    dim_model_base: int | None = None  # None: hidden_size, i.e. logit divisor 1
    sliding_window: int | None = None
    sparse_config: dict | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    notes: tuple[str, ...] = field(default=())
    gguf: dict | None = None  # GGUFSource.to_dict() when the source was a .gguf (path is then its dense copy)

    @property
    def adapter(self) -> Family:
        return FAMILIES[self.family]

    @property
    def is_mup(self) -> bool:
        return self.adapter.mup

    def source_key(self, sala_name: str) -> str:
        """Source tensor name for a SALA name (``model.layers.{i}.<local>`` or a global name), by the family's table."""
        fam = self.adapter
        if sala_name in fam.global_keys:
            return fam.global_keys[sala_name]
        prefix, _, rest = sala_name.partition("model.layers.")
        idx, _, local = rest.partition(".")
        if prefix or not idx.isdigit() or local not in fam.layer_keys:
            raise KeyError(f"no source key for SALA tensor {sala_name!r} in the {fam.name} key table")
        return fam.layer_keys[local].format(int(idx))

    def layer_bias_names(self) -> tuple[str, ...]:
        if self.attention_bias:
            return ("q_proj", "k_proj", "v_proj", "o_proj")
        return ("q_proj", "k_proj", "v_proj") if self.qkv_bias else ()

    def expected_source_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the source must hold, with the shape its config implies (source names)."""
        hid = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {
            self.source_key("model.embed_tokens.weight"): (self.vocab_size, hid),
            self.source_key("model.norm.weight"): (hid,),
        }
        if not self.tie_word_embeddings:
            shapes[self.source_key("lm_head.weight")] = (self.vocab_size, hid)
        local_shapes = self.layer_local_shapes()
        for i in range(self.num_layers):
            for local, shape in local_shapes.items():
                shapes[self.source_key(f"model.layers.{i}.{local}")] = shape
        return shapes

    def layer_local_shapes(self) -> dict[str, tuple[int, ...]]:
        """SALA-local layer tensor names -> shapes as stored in the source (GQA K/V)."""
        H, Hkv, D, hid, inter = self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (hid,),
            "post_attention_layernorm.weight": (hid,),
            "self_attn.q_proj.weight": (H * D, hid),
            "self_attn.k_proj.weight": (Hkv * D, hid),
            "self_attn.v_proj.weight": (Hkv * D, hid),
            "self_attn.o_proj.weight": (hid, H * D),
            "mlp.gate_proj.weight": (inter, hid),
            "mlp.up_proj.weight": (inter, hid),
            "mlp.down_proj.weight": (hid, inter),
        }
        bias_out = {"q_proj": H * D, "k_proj": Hkv * D, "v_proj": Hkv * D, "o_proj": hid}
        for name in self.layer_bias_names():
            shapes[f"self_attn.{name}.bias"] = (bias_out[name],)
        if self.qk_norm:
            shapes["self_attn.q_norm.weight"] = (D,)
            shapes["self_attn.k_norm.weight"] = (D,)
        return shapes

    def is_ignored(self, source_name: str) -> bool:
        if source_name.endswith(_IGNORED_SUFFIXES):
            return True
        return self.tie_word_embeddings and source_name == self.source_key("lm_head.weight")


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise ConversionError(f"source {path} is not a directory; pass a HF checkpoint directory (config.json + safetensors)")
    if not cfg_path.exists():
        raise ConversionError(f"source {path} has no config.json; pass a HF checkpoint directory")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from e


def _rope(raw: dict[str, Any]) -> tuple[float, dict | None]:
    """(theta, scaling or None) from either the transformers-5 ``rope_parameters`` or the legacy keys."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), scaling
    scaling = raw.get("rope_scaling") or None
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(raw.get("rope_theta", 10000.0)), scaling


def _require(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise ConversionError(f"{path / 'config.json'} lacks required key {key!r}")
    return raw[key]


def read_source(path: str | Path, *, gguf_dtype: str = "float32") -> SourceSpec:
    """Parse and validate a source checkpoint's ``config.json``; raise on anything unsupported.

    ``path`` is a HF checkpoint directory, a ``.gguf`` file or a directory holding one ``.gguf``; a GGUF is first
    materialised (dequantised to ``gguf_dtype``) into a cached dense directory (:mod:`sala.convert.gguf`), which
    becomes ``spec.path``; ``spec.gguf`` records the file, quant type and hash.
    """
    gguf_file = find_gguf(path)
    gguf = materialise_gguf(gguf_file, dtype=gguf_dtype).to_dict() if gguf_file is not None else None
    path = Path(gguf["materialised"]) if gguf else Path(path)
    raw = _read_config(path)
    family = raw.get("model_type")
    if family not in FAMILIES:
        why = _KNOWN_UNSUPPORTED.get(family, "no key map / config translation exists for it")
        raise UnsupportedArchitectureError(
            f"source model_type {family!r} (architectures {raw.get('architectures')}) is not supported: {why}. "
            f"Supported model_type values: {', '.join(SUPPORTED_FAMILIES)}"
        )
    notes: list[str] = []
    hidden, heads = _require(raw, "hidden_size", path), _require(raw, "num_attention_heads", path)
    head_dim = raw.get("head_dim") or hidden // heads
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"source hidden_act is {act!r}; SALA's MLP is SwiGLU (silu) only")
    if (raw.get("num_experts") or raw.get("num_local_experts") or 0) > 1:  # e.g. MiniCPM-MoE shares model_type
        raise UnsupportedArchitectureError(_KNOWN_UNSUPPORTED["mixtral"])
    if raw.get("mlp_bias"):
        raise UnsupportedArchitectureError("source has mlp_bias=true; SALA's MLP has no biases")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError(
            f"source uses partial_rotary_factor={raw['partial_rotary_factor']}; SALA rotates the full head_dim"
        )
    theta, scaling = _rope(raw)
    if scaling is not None:
        notes.append(
            f"source rope scaling {scaling.get('rope_type', scaling.get('type'))!r} dropped: SALA has plain RoPE "
            f"(theta={theta}); Lightning layers keep RoPE without it, softmax layers become NoPE (HyPE)"
        )
    fam = FAMILIES[family]
    window = raw.get("sliding_window") if fam.sliding_window_always or raw.get("use_sliding_window") else None
    if window is not None:
        notes.append(f"source sliding_window={window} dropped: SALA softmax layers attend over the full context")
    sparse = None
    if isinstance(raw.get("sparse_config"), dict):  # MiniCPM4: InfLLM-v2 settings carry over
        sparse = {k: v for k, v in raw["sparse_config"].items() if k in SPARSE_CONFIG_DEFAULTS}
    spec = SourceSpec(
        path=path,
        family=family,
        vocab_size=_require(raw, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size", path),
        num_layers=_require(raw, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", fam.tied_by_default)),
        attention_bias=bool(raw.get("attention_bias", False)) and not fam.qkv_bias,
        qkv_bias=fam.qkv_bias,
        qk_norm=fam.qk_norm,
        scale_emb=float(raw.get("scale_emb", 1.0)) if fam.mup else 1.0,
        scale_depth=float(raw["scale_depth"]) if fam.mup and "scale_depth" in raw else None,
        dim_model_base=int(raw["dim_model_base"]) if fam.mup and "dim_model_base" in raw else None,
        sliding_window=window,
        sparse_config=sparse,
        initializer_range=float(raw.get("initializer_range", 0.02)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=raw.get("dtype", raw.get("torch_dtype")),
        notes=tuple(notes),
        gguf=gguf,
    )
    if spec.num_heads % spec.num_kv_heads:
        raise ConversionError(
            f"num_attention_heads ({spec.num_heads}) is not a multiple of num_key_value_heads ({spec.num_kv_heads})"
        )
    for note in notes:
        logger.warning("%s: %s", path, note)
    return spec


def check_source_tensors(spec: SourceSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Read the source's safetensors headers (no data) and raise :class:`SourceTensorError` on the first missing,
    unexpected or mis-shaped tensor. Returns name -> (dtype, shape)."""
    d = spec.path
    if not any(d.glob("*.safetensors")):
        bins = sorted(p.name for p in d.glob("*.bin"))
        hint = f" (found {bins[:2]}: re-save with save_pretrained(..., safe_serialization=True))" if bins else ""
        raise SourceTensorError(f"source {d} has no safetensors files{hint}; only safetensors checkpoints are read")
    try:
        found = checkpoint_tensors(d)
    except CheckpointError as e:
        raise SourceTensorError(f"source checkpoint unreadable: {e}") from e
    expected = spec.expected_source_shapes()
    missing = [k for k in expected if k not in found]
    if missing:
        raise SourceTensorError(
            f"source {d} is missing {len(missing)} tensor(s) its config implies, e.g. {missing[:3]}; "
            "the checkpoint is incomplete or its config.json belongs to another model"
        )
    for name, shape in expected.items():
        if tuple(found[name][1]) != shape:
            raise SourceTensorError(
                f"source tensor {name} has shape {list(found[name][1])}, but config.json implies {list(shape)} "
                f"(hidden={spec.hidden_size}, heads={spec.num_heads}, kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim})"
            )
    extra = [k for k in found if k not in expected and not spec.is_ignored(k)]
    if extra:
        raise SourceTensorError(
            f"source {d} has {len(extra)} tensor(s) no SALA weight takes, e.g. {extra[:3]}; converting would drop "
            "them silently (is the model_type right?)"
        )
    return found


def sala_config(
    spec: SourceSpec,
    mixer_types: list[str],
    *,
    attn_use_rope: bool = False,
    attn_use_output_gate: bool = True,
    sparse_attention: bool = True,
    sparse_config: dict | None = None,
    tie_word_embeddings: bool | None = None,
    max_position_embeddings: int | None = None,
) -> SALAConfig:
    """The SALA config of a converted source. Defaults give the HyPE hybrid (NoPE gated sparse layers); the
    identity check passes ``attn_use_rope=True, attn_use_output_gate=False, sparse_attention=False``.

    muP (spec §3): MiniCPM sources keep their scales; other sources get scale_emb=1, scale_depth=sqrt(N) and
    dim_model_base=hidden, so the residual stream and logits equal the source's exactly.
    ``max_position_embeddings`` defaults to the source's.
    """
    n = spec.num_layers
    return SALAConfig(
        architectures=["MiniCPMSALAForCausalLM"],
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=max_position_embeddings or spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rope_scaling=None,
        scale_emb=spec.scale_emb,
        scale_depth=spec.scale_depth if spec.scale_depth is not None else math.sqrt(n),
        dim_model_base=spec.dim_model_base if spec.dim_model_base is not None else spec.hidden_size,
        tie_word_embeddings=spec.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings,
        attention_bias=spec.attention_bias,
        qkv_bias=spec.qkv_bias,
        initializer_range=spec.initializer_range,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id if spec.eos_token_id is not None else [],  # never SALA's [2, 73440] default
        pad_token_id=spec.pad_token_id,
        mixer_types=list(mixer_types),
        attn_use_rope=attn_use_rope,
        attn_use_output_gate=attn_use_output_gate,
        attn_qk_norm=spec.qk_norm,
        lightning_nkv=spec.num_heads,
        qk_norm=True,
        use_output_gate=True,
        use_output_norm=True,
        sparse_config=sparse_config if sparse_config is not None else spec.sparse_config,
        sparse_attention=sparse_attention,
    )
