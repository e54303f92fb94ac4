"""Identity check: a source converted with every layer kept as softmax attention, RoPE on, output gate off and
dense at every length must reproduce the source's logits.

The reference is transformers' own implementation of the source (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ...)
loaded from the same directory. MiniCPM has no transformers class; its reference is transformers' Llama with the
muP scales folded into the weights (embedding x scale_emb, o_proj and down_proj x scale_depth/sqrt(N), lm_head /
(hidden/dim_model_base)), which is the same function. Rope scaling and sliding windows, which SALA does not
implement, are removed from the reference too (and reported), so the check isolates the weight mapping.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from sala.convert.adapters import ConversionError, SourceSpec, check_source_tensors, sala_config
from sala.convert.inherit import InitOptions, SourceReader, build_sala_model
from sala.model.configuration_sala import SALAConfig
from sala.utils.testing import rel_l2

logger = logging.getLogger(__name__)


class IdentityCheckError(ConversionError):
    """The identity-converted model's logits differ from the source's beyond tolerance."""


@dataclass(kw_only=True)
class IdentityReport:
    """Outcome of :func:`verify_identity`."""

    family: str
    reference: str
    rel_l2: float
    max_abs: float
    tolerance: float
    passed: bool
    batch: int
    seq_len: int
    dtype: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def identity_config(spec: SourceSpec) -> SALAConfig:
    """Every layer softmax (``minicpm4``) with RoPE, no output gate, dense at all lengths."""
    return sala_config(spec, ["minicpm4"] * spec.num_layers, attn_use_rope=True, attn_use_output_gate=False,
                       sparse_attention=False)


def build_identity_model(spec: SourceSpec, *, device="cpu", dtype=torch.float32):
    """The source as a SALA model that computes exactly the source's function (teacher for HALO)."""
    return build_sala_model(spec, identity_config(spec), InitOptions(), device=device, dtype=dtype)


def _native_reference(spec: SourceSpec, device, dtype) -> PreTrainedModel:
    cfg = AutoConfig.from_pretrained(spec.path)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    if getattr(cfg, "use_sliding_window", False):
        cfg.use_sliding_window = False
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = ["full_attention"] * spec.num_layers
    model = AutoModelForCausalLM.from_pretrained(spec.path, config=cfg, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def _minicpm_reference(spec: SourceSpec, device, dtype) -> PreTrainedModel:
    cfg = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps, max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta}, attention_bias=spec.attention_bias,
        tie_word_embeddings=False, hidden_act="silu",
    )
    cfg._attn_implementation = "eager"
    alpha = (spec.scale_depth if spec.scale_depth is not None else math.sqrt(spec.num_layers)) / math.sqrt(spec.num_layers)
    divisor = spec.hidden_size / (spec.dim_model_base or spec.hidden_size)
    reader = SourceReader(spec.path)
    state = {}
    for name in spec.expected_source_shapes():
        t = reader.get(name).to(dtype)
        if name == "model.embed_tokens.weight":
            t = t * spec.scale_emb
        elif name.endswith(("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")):
            t = t * alpha  # residual branch scale folded into the branch's last linear
        elif name == "lm_head.weight":
            t = t / divisor
        state[name] = t.to(device)
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = (reader.get("model.embed_tokens.weight").to(dtype) / divisor).to(device)
    reader.close()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)  # its buffer was left on meta
    return model.eval()


def reference_model(spec: SourceSpec, *, device="cpu", dtype=torch.float32) -> tuple[PreTrainedModel, str]:
    """transformers' model of the source (see module docstring) and a description of it."""
    reference = spec.adapter.reference
    if reference == "transformers":
        model = _native_reference(spec, device, dtype)
        return model, f"transformers {type(model).__name__}"
    if reference == "minicpm":
        return _minicpm_reference(spec, device, dtype), "transformers LlamaForCausalLM with MiniCPM muP folded into weights"
    raise ConversionError(f"no reference implementation {reference!r} for family {spec.family!r}")


@torch.no_grad()
def verify_identity(
    spec: SourceSpec,
    *,
    batch: int = 2,
    seq_len: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tolerance: float = 1e-4,
    raise_on_failure: bool = True,
) -> IdentityReport:
    """Compare SALA(identity conversion) and the reference on random token ids; relative L2 of the logits.

    Holds both models in memory at ``dtype`` (run on a machine that fits two copies of the source).
    """
    check_source_tensors(spec)
    seq_len = min(seq_len, spec.max_position_embeddings)
    if spec.sliding_window is not None:
        seq_len = min(seq_len, spec.sliding_window)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, seq_len), generator=gen).to(device)
    reference, description = reference_model(spec, device=device, dtype=dtype)
    expected = reference(input_ids=ids, use_cache=False).logits.float()
    del reference
    sala = build_identity_model(spec, device=device, dtype=dtype)
    actual = sala(input_ids=ids, use_cache=False).logits.float()
    err = rel_l2(actual, expected)
    report = IdentityReport(
        family=spec.family, reference=description, rel_l2=err, max_abs=float((actual - expected).abs().max()),
        tolerance=tolerance, passed=err <= tolerance, batch=batch, seq_len=seq_len,
        dtype=str(dtype).removeprefix("torch."), notes=list(spec.notes),
    )
    logger.info("identity check (%s vs %s): rel L2 %.2e (tolerance %.0e)", spec.path, description, err, tolerance)
    if raise_on_failure and not report.passed:
        raise IdentityCheckError(
            f"identity check failed for {spec.path}: logits relative L2 error {err:.3e} > {tolerance:.0e} against "
            f"{description}; the key map or config translation for family {spec.family!r} is wrong"
        )
    return report
