"""``sala convert``: dense HF checkpoint -> official-format SALA checkpoint (optionally selecting layers first and
verifying the conversion). The CLI maps one flag to each :class:`ConvertConfig` field and calls :func:`run_convert`."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from sala.convert.adapters import ConversionError, SourceSpec, check_source_tensors, read_source, sala_config
from sala.convert.heldout import HeldoutReport, heldout_windows, lm_loss
from sala.convert.inherit import InitOptions, format_growth, parameter_growth, write_sala_checkpoint
from sala.convert.probes import load_tokenizer
from sala.convert.report import CONVERSION_JSON, write_json
from sala.convert.select import SelectConfig, SelectionResult, run_select_layers
from sala.convert.verify import IdentityReport, reference_model, verify_identity
from sala.model.configuration_sala import mixer_schedule
from sala.utils.fs import atomic_dir, check_out_dir

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"4GB"``, ``"500MB"``, ``"64KB"``, ``"1024"`` -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"max_shard_size must look like 4GB, 500MB, 64KB or a byte count; got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " "))


_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*$", re.IGNORECASE)


def parse_context(text: str | int) -> int:
    """``"32K"`` -> 32768, ``"1M"`` -> 1048576, ``"8192"`` -> 8192 (K and M binary, as ``sala plan``)."""
    m = _TOKENS.match(str(text))
    if not m:
        raise ValueError(f"context must look like 32K, 1M or a token count; got {text!r}")
    n = int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " "))
    if n < 1:
        raise ValueError(f"context must be >= 1 token, got {text!r}")
    return n


@dataclass(kw_only=True)
class ConvertConfig:
    """``sala convert``: inherit a dense checkpoint's weights into a SALA hybrid."""

    source: str
    """Dense HF checkpoint directory: Llama, Mistral, Qwen2, Qwen3 or MiniCPM/MiniCPM4 (config.json + safetensors);
    or a ``.gguf`` file (llama, mistral, qwen2, qwen3), or a directory holding exactly one, materialised once into a
    cached dense copy (:mod:`sala.convert.gguf`)."""
    out: str
    """Output directory: official config.json, safetensors (+ index), tokenizer files, conversion.json."""
    sparse_layers: tuple[int, ...] | None = None
    """Layers kept as softmax (InfLLM-v2 sparse, NoPE); the rest become Lightning. Exclusive with ``select``."""
    select: str | None = None
    """``auto``: run HALO layer selection (``selection``) first and use its choice."""
    selection: SelectConfig | None = field(default=None, metadata={"cli": False})  # from the select flags
    """Options of the ``select=auto`` run (default: SelectConfig with this source; report into ``out/selection``)."""
    students: str | None = None
    """``aligned_students.safetensors`` from ``sala select-layers --save-students``: Lightning layers take these
    aligned weights instead of plain inheritance."""
    use_aligned_students: bool = True
    """With ``select=auto``, Lightning layers take the students aligned during selection (HALO stage 1 output)."""
    verify: bool = False
    """Run the identity check (all-softmax conversion == source logits) and load + run the written checkpoint."""
    verify_tolerance: float = 1e-4
    """Relative L2 tolerance of the identity check (fp32)."""
    text_files: tuple[str, ...] = ()
    """Text for ``verify``'s held-out perplexity (their tail; default: the project's held-out corpus when present,
    else the built-in text's tail). With ``select=auto`` the same files feed the selection probes."""
    tokenizer: str | None = None
    """Tokenizer directory for the held-out text (default: the source's)."""
    context: str | int | None = None
    """``max_position_embeddings`` of the converted model (``32K``, ``1M``, ``131072``); default: the source's."""
    z_proj_init: str = "random"
    """Lightning output gate init: ``random`` (HALO) or ``zeros``."""
    o_gate_init: str = "compensated"
    """Sparse output gate init: ``compensated`` (zeros, o_proj x2: output unchanged) or ``random``."""
    seed: int = 0
    """Seed of the random initialisations."""
    dtype: str | None = None
    """Cast the output (``bfloat16``, ``float16``, ``float32``); default keeps the source's dtypes."""
    untie_embeddings: bool = False
    """Write a separate lm_head (copy of the embedding) for tied sources, as the released SALA is untied."""
    max_shard_size: str = "4GB"
    """Output shard size (e.g. 4GB, 500MB)."""
    device: str = "auto"
    """Device for ``verify`` / ``select=auto``: auto, cpu, cuda."""
    quiet: bool = False
    """No progress bars."""
    force: bool = False
    """Write into a non-empty ``out`` (refused otherwise): files sala wrote there before are replaced or removed,
    any other file is kept."""
    check_weights: bool = True
    """Refuse to write a checkpoint with a NaN/inf tensor (the source's or an initialisation's)."""

    def __post_init__(self) -> None:
        if (self.sparse_layers is None) == (self.select is None):
            raise ValueError("pass exactly one of sparse_layers (--sparse-layers 0,9,...) or select='auto' (--select auto)")
        if self.select is not None and self.select != "auto":
            raise ValueError(f"select must be 'auto', got {self.select!r}")
        if self.sparse_layers is not None:
            self.sparse_layers = tuple(sorted(set(int(i) for i in self.sparse_layers)))
        if self.students is not None and self.select is not None:
            raise ValueError("students= is for a conversion with explicit sparse_layers; select='auto' aligns its own")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        parse_size(self.max_shard_size)
        self.text_files = tuple(self.text_files)
        if self.context is not None:
            parse_context(self.context)
        InitOptions(z_proj_init=self.z_proj_init, o_gate_init=self.o_gate_init, seed=self.seed)


@dataclass(kw_only=True)
class ConvertResult:
    out: Path
    sparse_layers: list[int]
    mixer_types: list[str]
    files: list[Path]
    growth: dict
    max_position_embeddings: int
    identity: IdentityReport | None = None
    heldout: HeldoutReport | None = None
    heldout_skipped: str | None = None
    selection: SelectionResult | None = None
    hybrid_logits_finite: bool | None = None
    gguf: dict | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = []
        if self.gguf is not None:
            g = self.gguf
            lines.append(f"source GGUF {g['file']} ({g['architecture']}, {g['quant_type']}, sha256 {g['sha256'][:12]}...) "
                         f"dequantised to {g['dtype']} in {g['materialised']}")
        lines.append(f"wrote {self.out} ({len(self.files)} shard(s)) in {self.seconds:.1f}s: softmax layers "
                     f"{self.sparse_layers}, {len(self.mixer_types) - len(self.sparse_layers)} Lightning layers, "
                     f"max_position_embeddings {self.max_position_embeddings}")
        lines.append(format_growth(self.growth))
        if self.identity is not None:
            verdict = "within" if self.identity.passed else "ABOVE"
            lines.append(f"identity check (all layers softmax + RoPE, no gates) vs {self.identity.reference}: rel L2 "
                         f"{self.identity.rel_l2:.2e} ({verdict} {self.identity.tolerance:.0e}): the weight mapping is "
                         "right; this says nothing about the hybrid's quality")
            lines.append(f"converted checkpoint loads and runs (finite logits): {self.hybrid_logits_finite}")
        if self.heldout is not None:
            lines.append(self.heldout.summary())
        elif self.identity is not None:
            lines.append(f"held-out perplexity not measured: {self.heldout_skipped}; the hybrid needs training "
                         "(sala train) before use")
        else:
            lines.append("the converted hybrid needs training (sala train) before use; --verify measures its "
                         "held-out perplexity against the source's")
        if self.selection is not None:
            lines.append(self.selection.summary())
        return "\n".join(lines)


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,9,16"`` -> (0, 9, 16) for the CLI."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise ValueError(f"--sparse-layers wants comma-separated integers like 0,9,16,31; got {text!r}") from e


def _load_students(path: str, sparse: list[int]) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"students file {p} does not exist (write one with sala select-layers --save-students)")
    tensors = load_file(str(p))
    return {k: v for k, v in tensors.items() if int(k.split(".")[2]) not in sparse}  # sparse layers keep softmax


@torch.no_grad()
def _run_hybrid(out: Path, vocab: int, device: torch.device, windows: torch.Tensor | None) -> tuple[bool, float | None]:
    """Load the written checkpoint with AutoModelForCausalLM (strict tensor check), run a short forward, and score
    the held-out ``windows`` when given: (finite logits, mean loss or None)."""
    from transformers import AutoModelForCausalLM

    import sala  # noqa: F401  (registers minicpm_sala)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    finite = bool(torch.isfinite(model(input_ids=ids, use_cache=False).logits).all())
    loss = lm_loss(model, windows) if windows is not None and finite else None
    del model
    return finite, loss


def _heldout_windows(cfg: ConvertConfig, spec: SourceSpec) -> tuple[torch.Tensor | None, str, str | None]:
    """(windows, text description, None) or (None, "", why not) when there is no tokenizer to read text with."""
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or spec.path)
    except ConversionError as e:
        if cfg.tokenizer is not None or cfg.text_files:  # asked for explicitly: an error, not a skip
            raise
        logger.warning("held-out perplexity skipped: %s", e)
        return None, "", f"no tokenizer in {spec.path} (pass --tokenizer DIR)"
    windows, what = heldout_windows(tokenizer, spec.vocab_size, cfg.text_files)
    return windows, what, None


@torch.no_grad()
def _source_loss(spec: SourceSpec, windows: torch.Tensor, device: torch.device) -> float:
    model, _ = reference_model(spec, device=device)
    loss = lm_loss(model, windows)
    del model
    return loss


def _max_positions(cfg: ConvertConfig, spec: SourceSpec) -> int:
    """``--context`` or the source's ``max_position_embeddings``, logged either way."""
    if cfg.context is None:
        logger.info("max_position_embeddings %d kept from the source; the hybrid can be raised with --context "
                    "(e.g. 32K, 1M): sparse layers are NoPE and Lightning layers compute RoPE analytically",
                    spec.max_position_embeddings)
        return spec.max_position_embeddings
    max_pos = parse_context(cfg.context)
    logger.info("max_position_embeddings %d (source: %d)", max_pos, spec.max_position_embeddings)
    return max_pos


def _choose_layers(cfg: ConvertConfig, spec: SourceSpec, work: Path) -> tuple[list[int], SelectionResult | None, dict | None]:
    """(softmax layers, HALO selection or None, Lightning weight overrides or None). ``work`` is the temporary
    sibling of ``out`` being filled: the selection report goes to ``work/selection`` unless given a folder."""
    if cfg.select != "auto":
        sparse = list(cfg.sparse_layers)
        return sparse, None, _load_students(cfg.students, sparse) if cfg.students is not None else None
    sel_cfg = cfg.selection or SelectConfig(source=str(spec.path), seed=cfg.seed,
                                            z_proj_init=cfg.z_proj_init, device=cfg.device, quiet=cfg.quiet,
                                            text_files=cfg.text_files, tokenizer=cfg.tokenizer)
    if sel_cfg.out is None:
        sel_cfg.out = str(work / "selection")
    sel_cfg.source = str(spec.path)  # a GGUF source is read once, through its dense copy
    selection = run_select_layers(sel_cfg)
    sparse = selection.sparse_layers
    overrides = None
    if cfg.use_aligned_students:
        overrides = {k: v for k, v in selection.students.items() if int(k.split(".")[2]) not in sparse}
    return sparse, selection, overrides


def run_convert(cfg: ConvertConfig) -> ConvertResult:
    """Convert ``cfg.source`` into ``cfg.out``; see :class:`ConvertConfig`. Raises :class:`ConversionError`."""
    t0 = time.perf_counter()
    spec = read_source(cfg.source, gguf_dtype=cfg.dtype or "float32")
    check_source_tensors(spec)  # every missing / extra / mis-shaped tensor fails here, before anything is written
    if cfg.sparse_layers is not None:
        mixer_schedule(spec.num_layers, cfg.sparse_layers)  # range check before any work
    out = Path(cfg.out)
    if out.resolve() == spec.path.resolve():
        raise ConversionError(f"out ({out}) must differ from the source directory")
    check_out_dir(out, cfg.force)  # before minutes of selection / verification
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    max_pos = _max_positions(cfg, spec)
    identity, windows, text, skipped, source_loss = None, None, "", None, None
    if cfg.verify:  # before writing: a wrong key map should not leave a checkpoint behind
        identity = verify_identity(spec, device=device, tolerance=cfg.verify_tolerance)
        windows, text, skipped = _heldout_windows(cfg, spec)
        if windows is not None:
            source_loss = _source_loss(spec, windows, device)
    with atomic_dir(out, force=cfg.force) as work:  # a killed or failed run leaves out as it was
        result = _convert_into(cfg, spec, work, t0, max_pos, device, identity, windows, text, skipped, source_loss)
    result.out, result.files = out, [out / f.name for f in result.files]
    logger.info("converted %s -> %s: softmax layers %s", spec.path, out, result.sparse_layers)
    return result


def _convert_into(cfg: ConvertConfig, spec: SourceSpec, out: Path, t0: float, max_pos: int, device: torch.device,
                  identity: IdentityReport | None, windows: torch.Tensor | None, text: str, skipped: str | None,
                  source_loss: float | None) -> ConvertResult:
    """The steps of :func:`run_convert` that write: into the empty temporary folder ``out``."""
    sparse, selection, overrides = _choose_layers(cfg, spec, out)
    mixers = mixer_schedule(spec.num_layers, sparse)
    config = sala_config(spec, mixers, tie_word_embeddings=False if cfg.untie_embeddings else None,
                         max_position_embeddings=max_pos)
    growth = parameter_growth(spec, config)
    logger.info("%s", format_growth(growth))
    opts = InitOptions(z_proj_init=cfg.z_proj_init, o_gate_init=cfg.o_gate_init, seed=cfg.seed)
    logger.info("softmax layers %s (NoPE, o_gate %s); Lightning layers %s (z_proj %s, o_norm ones, q/k norms %s)",
                sparse, opts.o_gate_init, "from aligned students" if overrides else "inherited", opts.z_proj_init,
                "from source" if spec.qk_norm else "ones")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    if overrides and dtype is None:  # students are fp32; store them like the source's attention weights
        src_dtype = getattr(torch, spec.torch_dtype) if spec.torch_dtype in ("float32", "bfloat16", "float16") else None
        overrides = {k: v.to(src_dtype) if src_dtype else v for k, v in overrides.items()}
    files = write_sala_checkpoint(spec, config, out, opts, overrides=overrides, dtype=dtype,
                                  max_shard_bytes=parse_size(cfg.max_shard_size), check_weights=cfg.check_weights,
                                  force=True)  # out is our own temporary folder (it may hold selection/)
    finite, heldout = None, None
    if cfg.verify:
        finite, hybrid_loss = _run_hybrid(out, spec.vocab_size, device, windows)
        if finite is False:
            raise ConversionError(f"the converted checkpoint {out} loads but produces non-finite logits")
        if windows is not None:
            heldout = HeldoutReport(text=text, windows=windows.shape[0], window_len=windows.shape[1],
                                    source_loss=source_loss, hybrid_loss=hybrid_loss)
            logger.info("%s", heldout.summary())
    seconds = time.perf_counter() - t0
    report = {
        "source": str(cfg.source), "source_checkpoint": str(spec.path), "gguf": spec.gguf,
        "family": spec.family, "sparse_layers": sparse, "mixer_types": mixers,
        "max_position_embeddings": max_pos, "source_max_position_embeddings": spec.max_position_embeddings,
        "parameters": growth,
        "init": asdict(opts), "lightning_weights": "aligned students" if overrides else "inherited",
        "notes": list(spec.notes), "identity_check": identity.to_dict() if identity else None,
        "identity_check_means": "the weight mapping is right (all-softmax conversion == source); not hybrid quality",
        "heldout": heldout.to_dict() if heldout else None, "heldout_skipped": skipped,
        "hybrid_loads_and_runs": finite, "selection": selection.to_dict() if selection else None,
        "seconds": seconds,
        "config": {k: v for k, v in asdict(cfg).items() if k != "selection"},
    }
    write_json(out / CONVERSION_JSON, report)
    return ConvertResult(out=out, sparse_layers=sparse, mixer_types=mixers, files=files, growth=growth,
                         max_position_embeddings=max_pos, identity=identity, heldout=heldout, heldout_skipped=skipped,
                         selection=selection, hybrid_logits_finite=finite, gguf=spec.gguf, seconds=seconds)
