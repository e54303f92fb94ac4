"""HALO layer selection (spec training.md §2, HALO stage 1 §4.1): which attention layers stay softmax.

1. The teacher is the source converted with every layer softmax + RoPE, no gate, dense (it computes the source's
   function exactly; see :mod:`sala.convert.verify`), so every supported family runs through SALA's own code.
2. **Students**: one Lightning layer per attention layer, initialised by weight inheritance
   (:func:`sala.convert.inherit.lightning_attention_tensors`) and trained, all at once, by MSE against that
   layer's attention output on the teacher's own (detached) input. AdamW(0.9, 0.95), no weight decay, linear
   warmup then cosine lr -> min_lr, as HALO's stage 1.
3. **Single swaps** M(i): the teacher with only layer i's attention replaced by its student. Layers before i are
   unchanged, so each probe batch runs the teacher once and M(i) only from layer i on.
4. **Score** ``s_i = min(cap, (max_j R_j - R_i) / (max_j C_j - C_i + eps))`` (HALO's ``layer_analysis.py``:
   eps 1e-10, cap 50) with R = recall metric and C = -LM loss on held-out text.
5. **Choose**: first and last layers forced (SALA §2.2), then the highest scores until ``floor(fraction * L)``
   layers in total are softmax (SALA: 8 of 32).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sala.convert.adapters import ConversionError, SourceSpec, check_source_tensors, read_source, sala_config
from sala.convert.inherit import InitOptions, lightning_attention_tensors
from sala.convert.probes import ProbeData, build_probe_data, load_tokenizer, read_texts
from sala.convert.report import SELECTION_JSON, SELECTION_PNG, STUDENTS_FILE, selection_flops, write_selection_report
from sala.convert.verify import build_identity_model
from sala.model.configuration_sala import SALAConfig, mixer_schedule
from sala.model.modeling_sala import LightningAttention, SALAForCausalLM
from sala.ops import scaled_residual
from sala.utils.progress import progress

logger = logging.getLogger(__name__)

RECALL_METRICS = ("logprob", "accuracy")


@dataclass(kw_only=True)
class SelectConfig:
    """``sala select-layers``: HALO layer selection on a dense source checkpoint."""

    source: str
    """Dense HF checkpoint directory (config.json + safetensors) or GGUF, as for ``sala convert --from``."""
    out: str | None = None
    """Directory for ``layer_selection.json`` / ``.png`` (and ``aligned_students.safetensors``); None writes nothing."""
    text_files: tuple[str, ...] = ()
    """UTF-8 text files for calibration (head) and the LM probe (held-out tail); empty = the built-in text."""
    tokenizer: str | None = None
    """Tokenizer directory for the probes; default: the source directory."""
    sparse_fraction: float = 0.25
    """Fraction of all layers kept softmax, forced layers included: floor(fraction * L) (SALA: 8 of 32)."""
    num_sparse: int | None = None
    """Exact number of softmax layers (overrides ``sparse_fraction``)."""
    force_first_last: bool = True
    """Always keep layers 0 and L-1 softmax (SALA §2.2, "for training stability")."""
    steps: int = 200
    """Student training steps (HALO stage 1 used 20K steps of 32 x 512 tokens; raise for 1B+ sources)."""
    batch_size: int = 8
    """Calibration windows per step."""
    seq_len: int = 512
    """Calibration window length (HALO: 512)."""
    lr: float = 1e-3
    """Peak learning rate (HALO stage 1: 1e-3)."""
    min_lr: float = 1e-5
    """Final cosine learning rate (HALO: 1e-5)."""
    warmup_steps: int = 20
    """Linear warmup steps (HALO: 50 of 20K)."""
    probe_len: int = 512
    """Tokens per recall sample and per LM-probe window."""
    recall_samples: int = 32
    """Recall probe samples (half key-value lists, half needles in text)."""
    recall_queries: int = 4
    """Queried keys per recall sample."""
    lm_windows: int = 16
    """At most this many held-out windows for the LM probe."""
    eval_fraction: float = 0.2
    """Tail fraction of the text held out for the LM probe (at least one window)."""
    probe_batch_size: int = 4
    """Sequences per probe forward."""
    recall_metric: str = "logprob"
    """``logprob`` (mean log-probability of the right value; smooth, works for small models) or ``accuracy``."""
    eps: float = 1e-10
    """Score denominator epsilon (HALO code: 1e-10; paper 1e-6)."""
    score_cap: float = 50.0
    """Scores are capped here (HALO code: 50)."""
    z_proj_init: str = "random"
    """Student output-gate init, as ``InitOptions.z_proj_init``."""
    seed: int = 0
    """Seeds student init, window sampling and probe construction."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    compute_dtype: str = "auto"
    """Teacher dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``. Students train in fp32."""
    save_students: bool = False
    """Also write the aligned students (official names) to ``out/aligned_students.safetensors``."""
    force: bool = False
    """Write the report into an ``out`` holding files sala did not write there (kept; refused otherwise)."""
    quiet: bool = False
    """No progress bars."""

    def __post_init__(self) -> None:
        if not 0 < self.sparse_fraction <= 1:
            raise ValueError(f"sparse_fraction must be in (0, 1], got {self.sparse_fraction}")
        if self.recall_metric not in RECALL_METRICS:
            raise ValueError(f"recall_metric must be one of {RECALL_METRICS}, got {self.recall_metric!r}")
        for name in ("steps", "batch_size", "seq_len", "probe_len", "recall_samples", "recall_queries", "lm_windows",
                     "probe_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if self.save_students and self.out is None:
            raise ValueError("save_students needs an out directory")


@dataclass(kw_only=True)
class LayerResult:
    layer: int
    mse_before: float  # student MSE on held-out windows, at inheritance
    mse_after: float  # ... after alignment
    train_mse: float  # mean training MSE over the last 10% of steps
    rel_mse: float  # mse_after / mean(teacher output^2)
    recall: float  # recall metric of M(i)
    recall_accuracy: float
    lm_loss: float  # general probe loss of M(i)
    recall_drop: float  # max_j R_j - R_i
    general_drop: float  # max_j C_j - C_i = lm_loss_i - min_j lm_loss_j
    score: float
    sparse: bool = False
    forced: bool = False


@dataclass(kw_only=True)
class SelectionResult:
    source: str
    family: str
    num_layers: int
    sparse_layers: list[int]
    forced_layers: list[int]
    mixer_types: list[str]
    teacher: dict
    layers: list[LayerResult]
    timing: dict
    config: dict
    students: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # official names, fp32, CPU

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("students")
        return d

    def summary(self) -> str:
        """Human-readable table for the CLI."""
        lines = [f"{self.source} ({self.family}, {self.num_layers} layers): softmax layers {self.sparse_layers} "
                 f"(forced {self.forced_layers})",
                 f"teacher: LM loss {self.teacher['lm_loss']:.4f}, recall {self.teacher['recall']:.4f}",
                 " layer   score  recall_drop  general_drop  rel_mse  chosen"]
        for r in self.layers:
            mark = "forced" if r.forced else ("yes" if r.sparse else "")
            lines.append(f"{r.layer:6d} {r.score:7.3f} {r.recall_drop:12.4g} {r.general_drop:13.4g} {r.rel_mse:8.3g}  {mark}")
        t = self.timing
        lines.append(f"time: {t['total_s']:.1f}s ({t['train_s_per_layer']:.2f}s/layer alignment, "
                     f"{t['probe_s_per_layer']:.2f}s/layer probes) on {t['device']}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# students
# ---------------------------------------------------------------------------------------------------------------
class _Student(nn.Module):
    """A Lightning layer with fp32 weights behind the mixer interface ``(x, layout, rope, cache) -> y``.

    With a half-precision teacher on CUDA its matmuls run under autocast in the teacher's dtype (fp32 weights stay
    the master copy; the recurrence is fp32 inside the op either way)."""

    def __init__(self, attn: LightningAttention) -> None:
        super().__init__()
        self.attn = attn

    def fp32_forward(self, x, layout, rope) -> torch.Tensor:
        amp = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast("cuda", dtype=x.dtype, enabled=amp):
            return self.attn(x.float(), layout, rope, None).float()

    def forward(self, x, layout, rope, cache=None):
        return self.fp32_forward(x, layout, rope).to(x.dtype)


def make_students(teacher: SALAForCausalLM, spec: SourceSpec, opts: InitOptions, device) -> list[_Student]:
    """One inherited Lightning layer per teacher attention layer (fp32, trainable)."""
    cfg: SALAConfig = sala_config(spec, ["lightning-attn"] * spec.num_layers)
    students = []
    for i, layer in enumerate(teacher.model.layers):
        src = {k: v.detach().cpu() for k, v in layer.self_attn.state_dict().items()}
        with torch.device("meta"):
            attn = LightningAttention(cfg, i)
        # copies: for an fp32 teacher on the CPU, .cpu() and .float() return the teacher's own tensors, and training
        # the students would then train the teacher (its single-swap probes measured a degraded model)
        tensors = {k: v.to(torch.float32, copy=True) for k, v in lightning_attention_tensors(src, spec, i, opts).items()}
        attn.load_state_dict(tensors, strict=True, assign=True)
        students.append(_Student(attn).to(device).train().requires_grad_(True))
    return students


@contextlib.contextmanager
def _capture(teacher: SALAForCausalLM):
    """Record each attention layer's input and output, and the shared (layout, rope), during a teacher forward."""
    store: dict = {"x": {}, "y": {}}

    def layer0_pre(_module, args):  # a decoder layer's args: (h, pending, layout, rope, cache)
        store["layout"], store["rope"] = args[2], args[3]

    def attn_hook(i):
        def hook(_module, args, output):
            store["x"][i], store["y"][i] = args[0], output
        return hook

    handles = [teacher.model.layers[0].register_forward_pre_hook(layer0_pre)]
    handles += [layer.self_attn.register_forward_hook(attn_hook(i)) for i, layer in enumerate(teacher.model.layers)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _lr_at(step: int, cfg: SelectConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress_ = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress_))


def _sample_windows(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    length = min(length, tokens.numel())
    starts = torch.randint(0, tokens.numel() - length + 1, (batch,), generator=gen)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def student_mse(teacher, students, windows: torch.Tensor, device, batch_size: int) -> list[tuple[float, float]]:
    """Per layer (MSE(student, teacher attention output), mean(teacher output^2)) on fixed windows."""
    sums = [[0.0, 0.0] for _ in students]
    for a in range(0, windows.shape[0], batch_size):
        ids = windows[a:a + batch_size].to(device)
        with _capture(teacher) as st:
            teacher.model(input_ids=ids, use_cache=False)
        for i, s in enumerate(students):
            y = st["y"][i].float()
            sums[i][0] += F.mse_loss(s.fp32_forward(st["x"][i], st["layout"], st["rope"]), y).item() * ids.shape[0]
            sums[i][1] += y.pow(2).mean().item() * ids.shape[0]
    return [(m / windows.shape[0], p / windows.shape[0]) for m, p in sums]


def align_students(teacher, students, calib: torch.Tensor, cfg: SelectConfig, device) -> list[float]:
    """HALO stage 1: every student learns its layer's attention output by MSE, all in one pass per batch.
    Returns the mean MSE of the last 10% of steps per layer."""
    # one AdamW per student (the same math as one over all, Adam is per parameter): each layer steps right after its
    # backward, so only one layer's gradients are ever alive
    opts = [torch.optim.AdamW(s.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0) for s in students]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    tail = max(1, cfg.steps // 10)
    recent = [0.0] * len(students)
    bar = progress(range(cfg.steps), desc=f"aligning {len(students)} Lightning students", total=cfg.steps,
                   disable=True if cfg.quiet else None)
    for step in bar:
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
        ids = _sample_windows(calib, cfg.batch_size, cfg.seq_len, gen).to(device)
        with torch.no_grad(), _capture(teacher) as st:
            teacher.model(input_ids=ids, use_cache=False)
        losses = []
        for i, s in enumerate(students):  # per layer: only one layer's graph and gradients alive at a time
            x = st["x"][i].detach()  # the teacher's own input (spec §4.1): no gradient into the teacher
            loss = F.mse_loss(s.fp32_forward(x, st["layout"], st["rope"]), st["y"][i].detach().float())
            loss.backward()
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step >= cfg.steps - tail:
                recent[i] += loss.item() / tail
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(mse=f"{sum(losses) / len(losses):.3g}", lr=f"{_lr_at(step, cfg):.1e}")
    for s in students:
        s.eval().requires_grad_(False)
    return recent


# ---------------------------------------------------------------------------------------------------------------
# single-swap probes
# ---------------------------------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self) -> None:
        self.lm_sum = self.lm_n = self.rec_sum = self.rec_hit = self.rec_n = 0.0

    def lm(self, model: SALAForCausalLM, h: torch.Tensor, ids: torch.Tensor) -> None:
        logits = model.logits(model.model.norm(h))[:, :-1]
        self.lm_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        self.lm_n += ids[:, 1:].numel()

    def recall(self, model: SALAForCausalLM, h: torch.Tensor, mask: torch.Tensor, answers: torch.Tensor) -> None:
        logits = model.logits(model.model.norm(h[mask]))  # only the answer positions reach lm_head
        logp = logits.log_softmax(-1)
        target = answers[mask]
        self.rec_sum += logp.gather(-1, target[:, None]).sum().item()
        self.rec_hit += (logits.argmax(-1) == target).sum().item()
        self.rec_n += target.numel()

    def summary(self, metric: str) -> dict:
        logprob = self.rec_sum / max(self.rec_n, 1)
        acc = self.rec_hit / max(self.rec_n, 1)
        return {"lm_loss": self.lm_sum / max(self.lm_n, 1), "recall_logprob": logprob, "recall_accuracy": acc,
                "recall": logprob if metric == "logprob" else acc}


def _run_from(model: SALAForCausalLM, h, start: int, layout, rope, swap: nn.Module) -> torch.Tensor:
    """Layers start..L-1 on hidden state h (input of layer ``start``), with layer ``start``'s mixer = ``swap``."""
    layer = model.model.layers[start]
    original = layer.self_attn
    layer.self_attn = swap
    try:
        pending = None  # each layer returns its MLP output with the residual add left to the next (see the model)
        for j in range(start, len(model.model.layers)):
            h, pending = model.model.layers[j](h, pending, layout, rope, None)
    finally:
        layer.self_attn = original
    return scaled_residual(h, pending, model.model.layers[-1].residual_scale)


@torch.no_grad()
def probe_single_swaps(teacher, students, data: ProbeData, cfg: SelectConfig, device) -> tuple[dict, list[dict]]:
    """Metrics of the teacher and of every single-swap model M(i) on the LM and recall probes."""
    L = len(students)
    base, per_layer = _Metrics(), [_Metrics() for _ in range(L)]
    batches = []
    for a in range(0, data.lm_windows.shape[0], cfg.probe_batch_size):
        batches.append(("lm", data.lm_windows[a:a + cfg.probe_batch_size]))
    r = data.recall
    for a in range(0, r.ids.shape[0], cfg.probe_batch_size):
        sl = slice(a, a + cfg.probe_batch_size)
        batches.append(("recall", (r.ids[sl], r.answer_mask[sl], r.answers[sl])))
    bar = progress(batches, desc=f"probing {L} single-swap models", total=len(batches),
                   disable=True if cfg.quiet else None)
    for kind, batch in bar:
        ids = (batch if kind == "lm" else batch[0]).to(device)
        with _capture(teacher) as st:
            out = teacher.model(input_ids=ids, use_cache=False, output_hidden_states=True)
        layout, rope, hs = st["layout"], st["rope"], out.hidden_states  # hs[i] = input of layer i
        for i in range(-1, L):  # -1: the teacher itself (hs[-1] is the last layer's output, before the final norm)
            h = hs[-1] if i < 0 else _run_from(teacher, hs[i], i, layout, rope, students[i])
            m = base if i < 0 else per_layer[i]
            if kind == "lm":
                m.lm(teacher, h, ids)
            else:
                m.recall(teacher, h, batch[1].to(device), batch[2].to(device))
    return base.summary(cfg.recall_metric), [m.summary(cfg.recall_metric) for m in per_layer]


# ---------------------------------------------------------------------------------------------------------------
# scores and choice
# ---------------------------------------------------------------------------------------------------------------
def halo_scores(recall: list[float], general: list[float], eps: float = 1e-10, cap: float = 50.0) -> list[float]:
    """``min(cap, (max R - R_i) / (max C - C_i + eps))`` for metrics where higher is better (HALO layer_analysis)."""
    r_best, c_best = max(recall), max(general)
    return [min(cap, (r_best - r) / (c_best - c + eps)) for r, c in zip(recall, general)]


def choose_sparse_layers(scores: list[float], *, fraction: float = 0.25, num_sparse: int | None = None,
                         force_first_last: bool = True,
                         recall_drops: list[float] | None = None) -> tuple[list[int], list[int]]:
    """(sparse layers, forced layers): forced first/last, then highest scores up to the total. Ties (several layers
    at the score cap, common when linearising a layer barely moves the LM loss) go to the larger ``recall_drops``
    entry, the numerator the cap discarded, then to the lower index."""
    L = len(scores)
    drops = recall_drops if recall_drops is not None else [0.0] * L
    forced = sorted({0, L - 1}) if force_first_last else []
    total = num_sparse if num_sparse is not None else max(len(forced), math.floor(fraction * L))
    if not len(forced) <= total <= L:
        raise ValueError(f"cannot keep {total} softmax layers out of {L} with forced layers {forced}")
    ranked = sorted((i for i in range(L) if i not in forced), key=lambda i: (-scores[i], -drops[i], i))
    return sorted(forced + ranked[: total - len(forced)]), forced


def _score_layers(cfg: SelectConfig, before, after, train_mse, swaps) -> tuple[list[LayerResult], list[int], list[int]]:
    """HALO scores from the single-swap metrics, the choice, and one :class:`LayerResult` per layer."""
    recall = [m["recall"] for m in swaps]
    general = [-m["lm_loss"] for m in swaps]  # higher is better, like recall
    scores = halo_scores(recall, general, cfg.eps, cfg.score_cap)
    sparse, forced = choose_sparse_layers(scores, fraction=cfg.sparse_fraction, num_sparse=cfg.num_sparse,
                                          force_first_last=cfg.force_first_last,
                                          recall_drops=[max(recall) - r for r in recall])
    layers = [
        LayerResult(layer=i, mse_before=before[i][0], mse_after=after[i][0], train_mse=train_mse[i],
                    rel_mse=after[i][0] / max(after[i][1], 1e-30), recall=swaps[i]["recall"],
                    recall_accuracy=swaps[i]["recall_accuracy"], lm_loss=swaps[i]["lm_loss"],
                    recall_drop=max(recall) - recall[i], general_drop=max(general) - general[i], score=scores[i],
                    sparse=i in sparse, forced=i in forced)
        for i in range(len(swaps))
    ]
    return layers, sparse, forced


def _timing(spec: SourceSpec, cfg: SelectConfig, data: ProbeData, t0, t_build, t_train, t_probe, device: str,
            dtype: torch.dtype) -> dict:
    """Wall times, token counts, the FLOP model (:func:`report.selection_flops`) and the achieved FLOP rate."""
    L = spec.num_layers
    timing = {"build_s": t_build - t0, "train_s": t_train - t_build, "probe_s": t_probe - t_train,
              "total_s": t_probe - t0, "train_s_per_layer": (t_train - t_build) / L,
              "probe_s_per_layer": (t_probe - t_train) / L, "device": device,
              "dtype": str(dtype).removeprefix("torch."),
              "train_tokens": cfg.steps * cfg.batch_size * min(cfg.seq_len, data.calib.numel()),
              "probe_tokens": int(data.lm_windows.numel() + data.recall.ids.numel())}
    flops = selection_flops(hidden=spec.hidden_size, heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                            head_dim=spec.head_dim, layers=L, intermediate=spec.intermediate_size,
                            vocab=spec.vocab_size, train_tokens=timing["train_tokens"], probe_tokens=timing["probe_tokens"])
    timing["flops"] = flops
    timing["achieved_flops_per_s"] = flops["total_flops"] / max(t_probe - t_build, 1e-9)
    return timing


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def run_select_layers(cfg: SelectConfig) -> SelectionResult:
    """Run HALO selection end to end; write the report when ``cfg.out`` is set. Deterministic for a seed on CPU."""
    t0 = time.perf_counter()
    if cfg.out is not None:  # before minutes of alignment: a folder holding files sala did not write needs --force
        from sala.utils.fs import check_out_dir

        check_out_dir(cfg.out, cfg.force, reuse_own=True, own_names=(SELECTION_JSON, SELECTION_PNG, STUDENTS_FILE))
    torch.manual_seed(cfg.seed)
    spec = read_source(cfg.source)
    check_source_tensors(spec)
    if spec.num_layers < 2:
        raise ConversionError(f"layer selection needs at least 2 layers, source has {spec.num_layers}")
    device = _resolve_device(cfg.device)
    dtype = _resolve_dtype(cfg.compute_dtype, device)
    logger.info("layer selection on %s (%s, %d layers) on %s in %s", spec.path, spec.family, spec.num_layers, device, dtype)
    tokenizer = load_tokenizer(cfg.tokenizer or spec.path)
    data = build_probe_data(tokenizer, spec.vocab_size, read_texts(cfg.text_files), probe_len=cfg.probe_len,
                            eval_fraction=cfg.eval_fraction, lm_max_windows=cfg.lm_windows,
                            recall_samples=cfg.recall_samples, recall_queries=cfg.recall_queries, seed=cfg.seed)
    if data.calib.numel() < cfg.steps * cfg.batch_size * cfg.seq_len // 10:
        logger.warning("calibration text has %d tokens for %d training tokens: students will see it many times; "
                       "pass more text_files for a real source", data.calib.numel(), cfg.steps * cfg.batch_size * cfg.seq_len)
    teacher = build_identity_model(spec, device=device, dtype=dtype)
    students = make_students(teacher, spec, InitOptions(z_proj_init=cfg.z_proj_init, seed=cfg.seed), device)
    t_build = time.perf_counter()

    held = data.lm_windows[:, : min(cfg.seq_len, data.lm_windows.shape[1])]
    before = student_mse(teacher, students, held, device, cfg.probe_batch_size)
    train_mse = align_students(teacher, students, data.calib, cfg, device)
    after = student_mse(teacher, students, held, device, cfg.probe_batch_size)
    t_train = time.perf_counter()

    base, swaps = probe_single_swaps(teacher, students, data, cfg, device)
    t_probe = time.perf_counter()

    layers, sparse, forced = _score_layers(cfg, before, after, train_mse, swaps)
    timing = _timing(spec, cfg, data, t0, t_build, t_train, t_probe, str(device), dtype)
    L = spec.num_layers
    students_sd = {f"model.layers.{i}.self_attn.{k}": v.detach().float().cpu().contiguous()
                   for i, s in enumerate(students) for k, v in s.attn.state_dict().items()}
    result = SelectionResult(
        source=str(spec.path), family=spec.family, num_layers=L, sparse_layers=sparse, forced_layers=forced,
        mixer_types=mixer_schedule(L, sparse), teacher=base, layers=layers, timing=timing,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}, students=students_sd,
    )
    logger.info("selected softmax layers %s (forced %s) in %.1fs", sparse, forced, timing["total_s"])
    if cfg.out is not None:
        write_selection_report(result, cfg.out, save_students=cfg.save_students)
    return result
