"""``sala quantize``: a SALA checkpoint -> an FP8 checkpoint (e4m3 codes + fp32 scales in safetensors, the
``quantization_config`` in ``config.json``) that ``sala generate/chat/serve``, ``SALAForCausalLM.from_pretrained``
and ``AutoModelForCausalLM`` load as it is. Rounding to nearest, or GPTQ from calibration text (``--calibrate``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sala.utils.fs import atomic_dir, check_out_dir

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class QuantizeConfig:
    model: str
    """SALA checkpoint directory (bf16/fp16/fp32 weights)."""
    out: str
    """Output directory for the fp8 checkpoint (config.json, safetensors, tokenizer files)."""
    group_size: int = 128
    """One scale per this many input features (32-1024, a power of two), or 0 for one scale per output channel
    (activations: per token)."""
    calibrate: str | None = None
    """Text for GPTQ calibration: a text file, corpus:train (the project's corpus), or none for round-to-nearest.
    Never the text you will evaluate on."""
    calibration_tokens: int = 65536
    """Calibration tokens read from --calibrate (in windows of --calibration-length)."""
    calibration_length: int = 2048
    """Tokens per calibration window."""
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    """Projections left unquantised: a name, a dotted component (o_proj) or a prefix (model.layers.29)."""
    device: str = "auto"
    """Where to run the calibration forwards (auto: CUDA when present)."""
    force: bool = False
    """Write into a non-empty --out (files sala wrote there are replaced, others kept)."""
    check_weights: bool = True
    """Refuse to write NaN/inf tensors."""

    def __post_init__(self) -> None:
        from sala.ops.fp8 import check_group_size

        check_group_size(self.group_size or None)
        for name in ("calibration_tokens", "calibration_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.calibrate is not None and self.calibration_tokens < self.calibration_length:
            raise ValueError(f"--calibration-tokens ({self.calibration_tokens}) is less than one window of "
                             f"--calibration-length ({self.calibration_length})")


@dataclass
class QuantizeResult:
    out: Path
    quantized: int
    group_size: int | None
    calibration_windows: int
    bytes_before: int
    bytes_after: int
    seconds: float

    def summary(self) -> str:
        how = (f"GPTQ on {self.calibration_windows} calibration windows" if self.calibration_windows
               else "round to nearest")
        layout = f"groups of {self.group_size}" if self.group_size else "row-wise scales"
        return (f"fp8 checkpoint written to {self.out}: {self.quantized} projections, {layout}, {how}; weights "
                f"{self.bytes_before / 2**20:,.1f} -> {self.bytes_after / 2**20:,.1f} MiB ({self.seconds:.1f} s)")


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def calibration_windows(tokenizer, spec: str, tokens: int, length: int, vocab_size: int,
                        device: torch.device) -> list[torch.Tensor]:
    """[1, length] token-id windows, consecutive, from the text ``spec`` (a file or corpus:NAME) until ``tokens``."""
    from sala.utils.corpus import resolve_path

    path = resolve_path(spec)
    if not path.is_file():
        raise ValueError(f"--calibrate {spec}: {path} is not a file")
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:  # tokenise ~1 MB at a time: a large file is not read whole
        while len(ids) < tokens:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    n = min(tokens, len(ids)) // length
    if n == 0:
        raise ValueError(f"--calibrate {spec}: {len(ids)} tokens, fewer than one window of {length}; pass a longer "
                         "text or a smaller --calibration-length")
    if max(ids[:n * length]) >= vocab_size:
        raise ValueError(f"--calibrate {spec}: the tokenizer gives ids past the model's vocab_size {vocab_size}")
    return [torch.tensor([ids[i * length:(i + 1) * length]], device=device) for i in range(n)]


def run_quantize(cfg: QuantizeConfig) -> QuantizeResult:
    """Quantise ``cfg.model`` into ``cfg.out``; see :class:`QuantizeConfig`."""
    from sala.engine.loader import check_checkpoint_dir, load_tokenizer, resolve_device
    from sala.model import SALAForCausalLM
    from sala.model.checkpoint_io import check_finite_weights
    from sala.model.quantize import describe, quantize_fp8_

    t0 = time.perf_counter()
    src, out = Path(cfg.model), Path(cfg.out)
    check_checkpoint_dir(str(src))
    tokenizer = load_tokenizer(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out ({out}) must differ from --model: the source checkpoint is kept")
    check_out_dir(out, cfg.force)  # before minutes of calibration
    device = resolve_device(cfg.device)
    model = SALAForCausalLM.from_pretrained(src, dtype="auto").to(device).eval()
    saved = getattr(model.config, "quantization_config", None)
    if saved:
        raise ValueError(f"{src} is quantised already ({describe(saved)}); quantise the original checkpoint")
    before = _state_bytes(model)
    windows: list[torch.Tensor] | None = None
    if cfg.calibrate is not None:
        windows = calibration_windows(tokenizer, cfg.calibrate, cfg.calibration_tokens,
                                      cfg.calibration_length, model.config.vocab_size, device)
    names = quantize_fp8_(model, group_size=cfg.group_size or None, skip=cfg.skip, calibration=windows,
                          show_progress=True)
    if cfg.check_weights:
        check_finite_weights(model.state_dict().items(), "the quantised model")
    with atomic_dir(out, force=cfg.force) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    result = QuantizeResult(out, len(names), cfg.group_size or None, len(windows or []), before, _state_bytes(model),
                            time.perf_counter() - t0)
    logger.info("%s", result.summary())
    return result
