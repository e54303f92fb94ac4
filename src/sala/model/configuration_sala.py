"""``SALAConfig``: the MiniCPM-SALA ``config.json`` (spec §1) as a transformers config, with validation and presets."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

SPARSE_MIXERS = ("minicpm4",)
LIGHTNING_MIXERS = ("lightning", "lightning_attn", "lightning-attn")

# spec §1.1: defaults the modeling code falls back to when ``sparse_config`` lacks a key (= released values)
SPARSE_CONFIG_DEFAULTS: dict[str, Any] = {
    "kernel_size": 32,
    "kernel_stride": 16,
    "init_blocks": 1,
    "block_size": 64,
    "window_size": 2048,
    "topk": 64,
    "use_nope": False,
    "dense_len": 8192,
}

# spec §1.2: released layer schedule, S = sparse ("minicpm4"), L = Lightning
RELEASED_SPARSE_LAYERS = (0, 9, 16, 17, 22, 29, 30, 31)


def mixer_schedule(num_layers: int, sparse_layers: tuple[int, ...] | list[int]) -> list[str]:
    """``mixer_types`` with ``minicpm4`` at ``sparse_layers`` and ``lightning-attn`` elsewhere."""
    bad = [i for i in sparse_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"sparse layer indices {bad} out of range for {num_layers} layers")
    return ["minicpm4" if i in set(sparse_layers) else "lightning-attn" for i in range(num_layers)]


def not_sala_message(model_type: Any, where: str) -> str:
    """What to say when ``where`` (a config.json) holds another model type, e.g. a dense Llama checkpoint."""
    return (f"{where}: this is a {model_type} checkpoint (model_type {model_type!r}), not a MiniCPM-SALA one "
            f"(model_type {SALAConfig.model_type!r}): run sala convert --from DIR --out NEW_DIR --select auto (or "
            "--sparse-layers 0,...) to make a hybrid of it, then use NEW_DIR")


class SALAConfig(PretrainedConfig):
    r"""Configuration of a MiniCPM-SALA hybrid model (``model_type = "minicpm_sala"``).

    Accepts every key of the released ``config.json`` with the released defaults (spec §1.1). Keys that only
    ``sala`` reads, all defaulting to the released behaviour, exist for converted dense models (issue: convert):

    * ``attn_qk_norm`` (False): per-head q/k RMSNorm in the softmax (sparse) layers too.
    * ``attention_bias`` (False): biases on q/k/v/o projections of every layer (Llama convention).
    * ``qkv_bias`` (False): biases on q/k/v only (Qwen2 convention).
    * ``sparse_attention`` (True): False keeps softmax layers dense at every length (identity checks).

    Lengths past ``max_position_embeddings`` are refused with an error: RoPE is computed analytically, so
    raising ``max_position_embeddings`` (e.g. to 1048576) is how to run longer contexts (spec §10.16).
    ``inputs_embeds`` are used unscaled, as in HF (spec §3.1); only ``input_ids`` are multiplied by ``scale_emb``.
    """

    model_type = "minicpm_sala"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 4096,
        intermediate_size: int = 16384,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 524288,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        scale_emb: float = 12.0,
        scale_depth: float = 1.4,
        dim_model_base: int = 256,
        mup_denominator: int = 32,
        tie_word_embeddings: bool = False,
        attention_bias: bool = False,
        qkv_bias: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.1,
        pretraining_tp: int = 1,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = 2,
        use_cache: bool = True,
        mixer_types: list[str] | None = None,
        attn_use_rope: bool = False,
        attn_use_output_gate: bool = True,
        attn_qk_norm: bool = False,
        lightning_use_rope: bool = True,
        lightning_nh: int | None = None,
        lightning_nkv: int | None = None,
        lightning_head_dim: int | None = None,
        lightning_scale: str | float = "1/sqrt(d)",
        qk_norm: bool = True,
        use_output_gate: bool = True,
        use_output_norm: bool = True,
        sparse_config: dict | None = None,
        sparse_attention: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        self.mup_denominator = mup_denominator
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        if mixer_types is None and num_hidden_layers == 32:
            mixer_types = mixer_schedule(32, RELEASED_SPARSE_LAYERS)
        self.mixer_types = list(mixer_types) if mixer_types is not None else None
        self.attn_use_rope = attn_use_rope
        self.attn_use_output_gate = attn_use_output_gate
        self.attn_qk_norm = attn_qk_norm
        self.lightning_use_rope = lightning_use_rope
        self.lightning_nh = lightning_nh if lightning_nh is not None else num_attention_heads
        self.lightning_nkv = lightning_nkv if lightning_nkv is not None else num_attention_heads
        self.lightning_head_dim = lightning_head_dim if lightning_head_dim is not None else self.head_dim
        self.lightning_scale = lightning_scale
        self.qk_norm = qk_norm
        self.use_output_gate = use_output_gate
        self.use_output_norm = use_output_norm
        self.sparse_config = {**SPARSE_CONFIG_DEFAULTS, **(sparse_config or {})}
        self.sparse_attention = sparse_attention
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id if eos_token_id is not None else [2, 73440],
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers may not keep these as attributes in every version; they are part of the on-disk format
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.eos_token_id = eos_token_id if eos_token_id is not None else [2, 73440]
        self.tie_word_embeddings = tie_word_embeddings
        self.check()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "SALAConfig":
        """As transformers', but a config.json of another model type (a dense Llama, Qwen, ... checkpoint) is refused
        with what to do instead of "mixer_types is required"."""
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(not_sala_message(model_type, "config.json"))
        return super().from_dict(config_dict, **kwargs)

    # ---- validation -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``ValueError`` naming the offending key, what it was and what is expected."""

        def positive(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def finite_positive(name: str, value: Any) -> None:
            # NaN, inf, 0 or a negative here loads fine and then yields NaN logits (or a ZeroDivisionError):
            # refuse it at load instead of generating silent garbage (issue 17 item 5)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if not ok:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            positive(name, getattr(self, name))
        for name in ("rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "dim_model_base"):
            finite_positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.lightning_nkv != self.num_attention_heads:
            raise ValueError(
                f"lightning_nkv ({self.lightning_nkv}) must equal num_attention_heads ({self.num_attention_heads}): "
                "Lightning layers have no GQA (docs/architecture.md §4.1)"
            )
        # keys of the released config.json that the model does not read (docs/architecture.md §10.16): accepted when
        # they agree with what the model does, refused when a value would be silently ignored
        if self.lightning_nh != self.num_attention_heads:
            raise ValueError(
                f"lightning_nh ({self.lightning_nh!r}) must equal num_attention_heads ({self.num_attention_heads}): "
                "Lightning layers use num_attention_heads query heads; lightning_nh is not read (omit it or set it equal)"
            )
        if self.lightning_head_dim != self.head_dim:
            raise ValueError(
                f"lightning_head_dim ({self.lightning_head_dim!r}) must equal head_dim ({self.head_dim}): Lightning "
                "layers use head_dim; lightning_head_dim is not read (omit it or set it equal)"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU MLP), got {self.hidden_act!r}")
        if self.rope_scaling not in (None, {}) and (self.rope_scaling or {}).get("rope_type", self.rope_scaling.get("type")) != "default":
            raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported; MiniCPM-SALA uses plain RoPE (null)")
        if self.mixer_types is None:
            raise ValueError(f"mixer_types is required for {self.num_hidden_layers} layers (a list of 'minicpm4' / 'lightning-attn')")
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, m in enumerate(self.mixer_types):
            if m not in SPARSE_MIXERS + LIGHTNING_MIXERS:
                raise ValueError(
                    f"mixer_types[{i}] = {m!r} is unknown; expected one of {SPARSE_MIXERS + LIGHTNING_MIXERS}"
                )
        self.lightning_scale_value()  # validates the string
        sc = self.sparse_config
        unknown = set(sc) - set(SPARSE_CONFIG_DEFAULTS)
        if unknown:
            raise ValueError(f"sparse_config has unknown keys {sorted(unknown)}; known: {sorted(SPARSE_CONFIG_DEFAULTS)}")
        for key in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            positive(f"sparse_config.{key}", sc[key])
        for key in ("init_blocks", "dense_len"):
            if not isinstance(sc[key], int) or isinstance(sc[key], bool) or sc[key] < 0:
                raise ValueError(f"sparse_config.{key} must be a non-negative integer, got {sc[key]!r}")
        if not isinstance(sc["use_nope"], bool):
            raise ValueError(f"sparse_config.use_nope must be true or false, got {sc['use_nope']!r}")
        if sc["use_nope"] and self.attn_use_rope:
            # with NoPE softmax layers (attn_use_rope false, released) the flag is moot: the scorer's keys are the
            # un-rotated keys either way; with RoPE, sala's scorer always uses the rotated keys
            raise ValueError(
                "sparse_config.use_nope = true with attn_use_rope = true is not supported: the InfLLM-v2 scorer uses "
                "the same (rotated) keys as the attention; set use_nope false or attn_use_rope false"
            )
        if sc["kernel_size"] < sc["kernel_stride"]:
            raise ValueError(f"sparse_config.kernel_size ({sc['kernel_size']}) must be >= kernel_stride ({sc['kernel_stride']})")
        if sc["block_size"] % sc["kernel_stride"]:
            raise ValueError(
                f"sparse_config.block_size ({sc['block_size']}) must be a multiple of kernel_stride ({sc['kernel_stride']})"
            )
        if sc["window_size"] % sc["block_size"]:
            raise ValueError(
                f"sparse_config.window_size ({sc['window_size']}) must be a multiple of block_size ({sc['block_size']})"
            )
        if sc["topk"] <= sc["init_blocks"]:
            raise ValueError(
                f"sparse_config.topk ({sc['topk']}) must exceed init_blocks ({sc['init_blocks']}) so the forced sink, "
                "local and own blocks always fit in the selection"
            )

    # ---- derived values ---------------------------------------------------------------------------------------
    def lightning_scale_value(self) -> float:
        """The Lightning q.k scale: ``"1/sqrt(d)"`` -> head_dim^-0.5, or a number."""
        s = self.lightning_scale
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"lightning_scale must be '1/sqrt(d)' or a finite number > 0, got {s!r}")
            return float(s)
        if isinstance(s, str) and s.replace(" ", "") in ("1/sqrt(d)", "1/sqrt(head_dim)"):
            return 1.0 / math.sqrt(self.head_dim)
        raise ValueError(f"lightning_scale must be '1/sqrt(d)' or a number, got {s!r}")

    def is_sparse_layer(self, index: int) -> bool:
        return self.mixer_types[index] in SPARSE_MIXERS

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i)]

    @property
    def residual_scale(self) -> float:
        """alpha = scale_depth / sqrt(num_hidden_layers), on both branches of every layer (spec §3)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        """hidden_size / dim_model_base: lm_head sees h / this (spec §3)."""
        return self.hidden_size / self.dim_model_base


def preset(name: str, **overrides: Any) -> SALAConfig:
    """Named configs: ``minicpm-sala-9b`` (released shapes), ``tiny`` (tests, dense path), ``tiny-sparse``
    (tests; small sparse_config so short inputs take the InfLLM-v2 path), ``small`` (CPU demo), ``smollm2-hybrid``
    (the SmolLM2-135M conversion's geometry, for benchmarks)."""
    presets: dict[str, dict[str, Any]] = {
        "minicpm-sala-9b": dict(architectures=["MiniCPMSALAForCausalLM"]),
        "tiny": dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            mixer_types=mixer_schedule(4, (0, 3)), architectures=["MiniCPMSALAForCausalLM"],
        ),
        "tiny-sparse": dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            mixer_types=mixer_schedule(4, (0, 3)), architectures=["MiniCPMSALAForCausalLM"],
            sparse_config=dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32,
                               topk=3, dense_len=96),
        ),
        "small": dict(
            vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=65536,
            mixer_types=mixer_schedule(8, (0, 4, 7)), architectures=["MiniCPMSALAForCausalLM"],
            sparse_config=dict(kernel_size=16, kernel_stride=8, block_size=32, init_blocks=1, window_size=128,
                               topk=8, dense_len=512),
        ),
        # what `sala convert` makes of SmolLM2-135M(-Instruct) with softmax layers 0,4,8,16,17,18,19,29 (HALO's picks:
        # the demo's and the training proof's conversion): for benchmarks with random weights of the real geometry
        "smollm2-hybrid": dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, lightning_nh=9, lightning_nkv=9, lightning_head_dim=64,
            max_position_embeddings=32768, rope_theta=100000.0, rms_norm_eps=1e-5, scale_emb=1.0,
            scale_depth=30**0.5, dim_model_base=576, qk_norm=True, attn_qk_norm=False, attn_use_rope=False,
            attn_use_output_gate=True, use_output_gate=True, use_output_norm=True, lightning_use_rope=True,
            tie_word_embeddings=True, mixer_types=mixer_schedule(30, (0, 4, 8, 16, 17, 18, 19, 29)),
            architectures=["MiniCPMSALAForCausalLM"], bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
    return SALAConfig(**{**presets[name], **overrides})
