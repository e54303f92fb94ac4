"""``sala train RECIPE``: the staged conversion recipe (align -> distill -> long context / SFT) on FSDP2.

One loop serves every stage: per optimizer step, ``grad_accum`` packed micro-batches -> stage loss -> backward ->
clip -> AdamW -> LR schedule. Checkpoints (DCP) hold model, optimizer, schedule position, data position and RNG,
so a resumed run continues the same loss curve. At the end the student is exported in the official single-folder
format (adapters merged) and, with adapters, the trained delta is written as compact safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sala.model.modeling_sala import SALAForCausalLM, SALAModel, rope_cos_sin
from sala.train import checkpoint as ckpt
from sala.train import parallel
from sala.train.data import MixedLoader, PackedLoader, eval_windows, tokenize_to_shards
from sala.train.losses import alignment_mse, fused_linear_cross_entropy, fused_linear_kl
from sala.train.recipe import Recipe, RecipeError, StageConfig, load_recipe, resolve_path
from sala.train.report import MetricsLog, plot_losses
from sala.train.teacher import load_teacher, logit_scale, teacher_forward
from sala.utils.fs import atomic_dir

logger = logging.getLogger(__name__)

H200_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet); MFU is quoted against it on CUDA
NEW_PARAM_NAMES = ("z_proj", "o_gate", "q_norm", "k_norm", "o_norm")


@dataclass(kw_only=True)
class TrainConfig:
    """``sala train``: run a recipe."""

    recipe: str
    """Recipe TOML file or shipped recipe name (smollm2, sala-release, tiny-cpu)."""
    out: str | None = None
    """Output directory (default: the recipe's ``out``)."""
    resume: bool = False
    """Continue the run in ``out`` from its latest checkpoint."""
    force: bool = False
    """Delete an existing run in ``out`` and start over."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda."""
    max_steps: int | None = None
    """Stop (after a checkpoint) once this process has taken this many optimizer steps; the run resumes later."""
    max_minutes: float | None = None
    """Stop (after a checkpoint) at the first step end past this many minutes of wall time (a job's time limit)."""
    quiet: bool = False
    """No progress bar."""
    profile_steps: int = 0
    """Profile this many optimizer steps (after 2 warm-up steps) of each stage with torch.profiler; the table of
    kernel and operator times goes to ``out/profile-<stage>.txt`` (rank 0)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Recipe fields to replace, by dotted key (``model.student``, ``stages.kl.tokens``)."""
    check_weights: bool = True
    """Refuse to export (final/, delta/) a model with a NaN/inf weight (training diverged)."""

    def __post_init__(self) -> None:
        if self.resume and self.force:
            raise ValueError("pass at most one of resume (continue the run in out) and force (start it over)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class TrainResult:
    out: Path
    finished: bool
    evals: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# parameter groups
# ---------------------------------------------------------------------------------------------------------------
def _group_of(name: str, model: SALAForCausalLM) -> set[str]:
    """The recipe groups a student parameter belongs to."""
    groups = {"all"}
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        groups.add("adapters")
    if name.startswith("model.layers."):
        layer = model.model.layers[int(parts[2])]
        if parts[3] == "self_attn":
            groups |= {"attention", "sparse" if layer.is_sparse else "lightning"}
            if parts[4] in NEW_PARAM_NAMES:
                groups.add("new")
        elif parts[3] == "mlp":
            groups.add("mlp")
        if "norm" in parts[-2] or parts[-2].endswith("layernorm"):
            groups.add("norms")
    elif name.startswith("model.embed_tokens"):
        groups.add("embeddings")
    elif name.startswith("lm_head"):
        groups.add("lm_head")
    elif name.startswith("model.norm"):
        groups.add("norms")
    return groups


def select_trainable(model: SALAForCausalLM, groups: list[str], adapters: bool) -> list[str]:
    """Set requires_grad for a stage; returns the trained names. With adapters, the base weight of an adapted
    Linear never trains: a group trains its adapter matrices and its other (small, new) parameters."""
    adapted = {n[: -len(".lora_A")] for n, _ in model.named_parameters() if n.endswith(".lora_A")}
    chosen = []
    for name, p in model.named_parameters():
        mine = _group_of(name, model)  # an adapter matrix is in "adapters" and in its layer's groups
        if "adapters" in mine:
            want = adapters and bool(mine & set(groups))
        else:
            base_of_adapter = name.endswith(".weight") and name[: -len(".weight")] in adapted
            want = bool(mine & set(groups)) and not base_of_adapter
        p.requires_grad_(want)
        if want:
            chosen.append(name)
    if not chosen:
        raise RecipeError(f"trainable groups {groups} select no parameter of this model")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# the student's side of every loss, run inside the FSDP root's forward so lm_head and the embedding are unsharded
# ---------------------------------------------------------------------------------------------------------------
class StudentWithLoss(nn.Module):
    def __init__(self, student: SALAForCausalLM) -> None:
        super().__init__()
        self.student = student

    def forward(self, kind: str, batch: dict, teacher: dict | None = None, chunk: int = 4096,
                temperature: float = 1.0) -> tuple[torch.Tensor, int]:
        """-> (loss, tokens it averages over). ``batch``: input_ids/labels/position_ids [1, N], cu_seqlens [D+1]."""
        model = self.student
        scale = 1.0 / model.config.logit_divisor
        if kind == "align":
            return self._align(batch, teacher), batch["input_ids"].numel()
        h = model.model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"], use_cache=False).last_hidden_state
        h = h[0]  # [N, d]
        if kind == "kl":
            return fused_linear_kl(h, model.lm_head.weight, teacher["hidden"], teacher["weight"],
                                   student_scale=scale, teacher_scale=teacher["scale"], chunk_size=chunk,
                                   temperature=temperature), h.shape[0]
        labels = batch["labels"][0, 1:]  # logits[t] predicts labels[t + 1]
        loss = fused_linear_cross_entropy(h[:-1], model.lm_head.weight, labels, scale=scale, chunk_size=chunk)
        return loss, int((labels != -100).sum())

    def _align(self, batch: dict, teacher: dict) -> torch.Tensor:
        """HALO stage 1: each Lightning mixer on the teacher's own (detached) input vs the teacher's attention output."""
        model = self.student
        N = batch["input_ids"].shape[1]
        layout = SALAModel._packed_layout(batch["cu_seqlens"], 1, N, batch["input_ids"].device)
        lightning = [i for i, layer in enumerate(model.model.layers) if not layer.is_sparse]
        if not lightning:
            raise RecipeError("an align stage needs Lightning layers, and this student has none")
        dtype = teacher["x"][lightning[0]].dtype  # every layer's input has the teacher's compute dtype
        rope = rope_cos_sin(layout.positions, model.config.head_dim, model.config.rope_theta, dtype)  # once per batch
        losses = []
        for i in lightning:
            x = teacher["x"][i].reshape(1, N, -1).detach()
            y = model.model.layers[i].self_attn(x, layout, rope, None)
            losses.append(alignment_mse(y, teacher["y"][i].reshape(1, N, -1).detach()))
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------------------------
# schedule, FLOPs
# ---------------------------------------------------------------------------------------------------------------
def lr_at(stage: StageConfig, step: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return stage.lr
    if stage.schedule == "cosine":
        span = max(1, total - stage.warmup_steps)
        t = min(1.0, (step - stage.warmup_steps) / span)
        return stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1 + math.cos(math.pi * t))
    decay = max(1, round(stage.decay_fraction * total))  # wsd: stable, then linear decay over the last steps
    start = total - decay
    if step < start:
        return stage.lr
    return stage.lr + (stage.min_lr - stage.lr) * min(1.0, (step - start + 1) / decay)


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flops_per_token(stage: StageConfig, student: SALAForCausalLM, teacher: nn.Module | None) -> float:
    """Model FLOPs per trained token: 6 x student matmul weights (fwd + bwd; LoRA counted as full training, the
    usual MFU convention) + 2 x teacher matmul weights (fwd) + causal softmax attention of the student's softmax
    layers (6 * T * H * D per layer, i.e. 2 T H D forward halved by causality, x3 with the backward)."""
    cfg = student.config
    if stage.loss == "align":
        mixers = sum(_linear_params(l.self_attn) for l in student.model.layers if not l.is_sparse)
        student_f = 6 * mixers
    else:
        softmax_layers = sum(1 for l in student.model.layers if l.is_sparse)
        attn = 6 * stage.seq_len * cfg.num_attention_heads * cfg.head_dim * softmax_layers
        student_f = 6 * _linear_params(student) + attn
        if cfg.tie_word_embeddings:
            student_f += 6 * student.lm_head.weight.numel()  # the tied lm_head is not a separate Linear weight
    teacher_f = 2 * (_linear_params(teacher) + teacher.get_output_embeddings().weight.numel()
                     * (teacher.config.tie_word_embeddings is True)) if teacher is not None else 0
    return float(student_f + teacher_f)


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
RUN_OUTPUTS = ("run.json", "metrics.jsonl", "evals.json", "results.json", "loss_curves.png", "checkpoints", "final",
               "delta", "tokens")
"""What a training run writes into its folder (plus ``profile-<stage>.txt``): all that ``--force`` deletes."""


def remove_run_outputs(out: Path) -> list[Path]:
    """Delete a previous run's own outputs from ``out`` (``--force``), never other files a user keeps there."""
    victims = [out / name for name in RUN_OUTPUTS if (out / name).exists()] + sorted(out.glob("profile-*.txt"))
    for path in victims:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return victims


class Trainer:
    def __init__(self, cfg: TrainConfig, recipe: Recipe, info: parallel.DistInfo) -> None:
        self.cfg, self.recipe, self.info = cfg, recipe, info
        self.out = Path(cfg.out or recipe.out or "runs/" + recipe.name)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = info.device
        self.dtype = getattr(torch, recipe.model.dtype) if self.device.type == "cuda" else torch.float32
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=info.is_main)
        self.show_bar = info.is_main and not cfg.quiet and sys.stderr.isatty()
        self.started = time.time()
        self.teacher_eval: dict = {}  # the teacher's held-out ppl, measured once per process

    # ---- set-up --------------------------------------------------------------------------------------------------
    def prepare_out(self) -> Path | None:
        """Guard the output folder; returns the checkpoint to resume from (None: a fresh run)."""
        run_file = self.out / "run.json"
        latest = None
        if self.cfg.resume:
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            if latest is None:
                raise RecipeError(f"--resume: {self.out} has no complete checkpoint to resume from")
        elif run_file.exists() or (self.ckpt_dir / ckpt.LATEST).exists():
            if not self.cfg.force:
                raise RecipeError(f"{self.out} already holds a run; pass --resume to continue it or --force to delete "
                                  "it and start over")
            if self.info.is_main:
                remove_run_outputs(self.out)
        dist.barrier()
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        return latest

    def load_models(self) -> None:
        r = self.recipe
        student_dir = resolve_path(r.model.student)
        if not (student_dir / "config.json").exists():
            raise RecipeError(f"model.student: {student_dir} is not a SALA checkpoint folder (no config.json); "
                              "make one with `sala convert --from DENSE --out DIR`")
        student = SALAForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        from sala.train.lora import apply_lora, model_fingerprint

        self.fingerprint = model_fingerprint(student)
        if r.model.init_delta:
            self._load_init_delta(student, r)
        elif r.adapters.enabled:
            torch.manual_seed(r.seed)
            apply_lora(student, rank=r.adapters.rank, alpha=r.adapters.alpha, targets=tuple(r.adapters.targets),
                       rank_overrides=r.adapters.rank_overrides or None)
        if r.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        student.train()
        self.student = student
        self.student_dir = student_dir
        self.wrapper = StudentWithLoss(student).to(self.device)
        # Several ranks: FSDP2 (bf16 compute, fp32 reduction). One rank: a plain module under autocast, since
        # FSDP2 on one rank only adds copies and per-parameter DTensor dispatch (hundreds of adapter tensors).
        self.sharded = self.info.world_size > 1
        policy = parallel.mixed_precision(self.dtype, self.device)
        if self.sharded:
            parallel.shard_student(self.wrapper, student.model.layers, policy)
        self.teacher = None
        if r.model.teacher and any(s.loss in ("align", "kl") for s in r.stages):
            # the frozen teacher is stored in the compute dtype (bf16 on CUDA): half the memory and no casts
            teacher = load_teacher(r.model.teacher, torch.float32 if self.sharded else self.dtype, self.device)
            self.teacher_weight = teacher.get_output_embeddings().weight.detach().to(self.dtype).clone()
            self.teacher_scale = logit_scale(teacher)
            if self.sharded:
                parallel.shard_teacher(teacher, policy)
            self.teacher = teacher
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(student_dir)

    def _load_init_delta(self, student: SALAForCausalLM, r: Recipe) -> None:
        """``model.init_delta``: the trained delta's adapters and tensors, with the recipe's adapter settings."""
        from sala.train.lora import load_delta

        path = resolve_path(r.model.init_delta)
        if not (path / "delta.json").is_file():
            raise RecipeError(f"model.init_delta: {path} holds no delta.json (sala train writes one into <run>/delta)")
        meta = json.loads((path / "delta.json").read_text())
        recorded = {"rank": meta.get("rank"), "alpha": meta.get("alpha"), "targets": list(meta.get("targets") or []),
                    "rank_overrides": dict(meta.get("rank_overrides") or {})}
        want = {"rank": r.adapters.rank, "alpha": r.adapters.alpha, "targets": list(r.adapters.targets),
                "rank_overrides": dict(r.adapters.rank_overrides)}
        for key, value in want.items():
            if (have := recorded[key]) != value:
                raise RecipeError(f"model.init_delta: {path} was trained with adapters.{key} = {have!r}, the recipe "
                                  f"says {value!r}; use the settings it was trained with")
        try:
            load_delta(path, student)
        except ValueError as e:
            raise RecipeError(f"model.init_delta: {e}") from e

    def data_files(self) -> tuple[list[Path], list[Path], Path | None]:
        """(train, sft, heldout) paths, each checked to exist (before any model is loaded: a typo fails at once)."""
        r = self.recipe
        train = [resolve_path(p) for p in r.data.train]
        sft = [resolve_path(p) for p in r.data.sft]
        heldout = resolve_path(r.data.heldout) if r.data.heldout else None
        for key, paths in (("data.train", train), ("data.sft", sft), ("data.heldout", [heldout] if heldout else [])):
            for p in paths:
                if not p.exists():
                    raise RecipeError(f"{key}: data file {p} does not exist")
        return train, sft, heldout

    def prepare_data(self) -> None:
        r = self.recipe
        cache = Path(r.data.cache_dir) if r.data.cache_dir else self.out / "tokens"
        train, sft, heldout = self.data_files()
        self.indexes = {}
        for key, files, is_sft in (("train", train, False), ("sft", sft, True), ("heldout", [heldout] if heldout else [], False)):
            if not files:
                continue
            if self.info.is_main:  # rank 0 tokenises; the others reuse its cache
                tokenize_to_shards(files, self.tokenizer, cache / key, sft=is_sft)
            dist.barrier()
            self.indexes[key] = tokenize_to_shards(files, self.tokenizer, cache / key, sft=is_sft)

    # ---- one stage -----------------------------------------------------------------------------------------------
    def _batch(self, b) -> dict:
        return {"input_ids": b.input_ids.to(self.device), "labels": b.labels.to(self.device),
                "position_ids": b.position_ids.to(self.device), "cu_seqlens": b.cu_seqlens.to(self.device)}

    def _autocast(self):
        """Mixed precision on CUDA (the recipe's dtype); a no-op on CPU, which computes in fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda")

    def _teacher_outputs(self, stage: StageConfig, batch: dict) -> dict | None:
        if stage.loss not in ("align", "kl"):
            return None
        rows = stage.micro_batch
        ids = batch["input_ids"].view(rows, -1)
        pos = batch["position_ids"].view(rows, -1)
        with self._autocast():
            out = teacher_forward(self.teacher, ids, pos, attention_io=stage.loss == "align")
        return {"hidden": out["hidden"].reshape(-1, out["hidden"].shape[-1]), "x": out["x"], "y": out["y"],
                "weight": self.teacher_weight, "scale": self.teacher_scale}

    def _optimizer(self, stage: StageConfig) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for p in self.wrapper.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=tuple(stage.betas),
                                 fused=fused)

    def _set_sparse(self, on: bool) -> None:
        for layer in self.student.model.layers:
            if layer.is_sparse:
                attn = layer.self_attn
                attn.dense_len = self.student.config.sparse_config["dense_len"] if on else None

    def run_stage(self, idx: int, stage: StageConfig, resume: dict | None) -> tuple[bool, dict]:
        """Train stage ``idx``; returns (finished, summary). ``resume``: loaded checkpoint inside this stage."""
        world = self.info.world_size
        total = stage.num_steps(world)
        trained = select_trainable(self.student, stage.trainable, self.recipe.adapters.enabled)
        self._set_sparse(stage.sparse_attention)
        optimizer = self._optimizer(stage)

        def packed(source: str, seed: int) -> PackedLoader:
            return PackedLoader(self.indexes[source], seq_len=stage.seq_len, micro_batch=stage.micro_batch,
                                rank=self.info.rank, world_size=world, seed=seed)

        seed = self.recipe.seed + 1000 * idx
        if stage.source == "mix":
            loader = MixedLoader(packed("train", seed), packed("sft", seed + 500), stage.sft_fraction)
        else:
            loader = packed(stage.source, seed)
        step, tokens_done = 0, 0
        if resume is not None:
            state = ckpt.load_checkpoint(resume["path"], self.wrapper, optimizer)
            step, tokens_done = state["meta"]["step"], state["meta"]["tokens"]
            loader.load_state_dict(state["rank"]["loader"])
            ckpt.set_rng_state(state["rank"]["rng"])
        n_trained = sum(p.numel() for n, p in self.student.named_parameters() if n in set(trained))
        fpt = flops_per_token(stage, self.student, self.teacher)  # DTensor numel is the global size: sharding-proof
        logger.info("stage %s (%d/%d): loss %s, %d optimizer steps of %d tokens, %.2fM trainable parameters, "
                    "sparse attention %s", stage.name, idx + 1, len(self.recipe.stages), stage.loss, total,
                    stage.tokens_per_step(world), n_trained / 1e6, "on" if stage.sparse_attention else "off")
        it = iter(loader)
        bar = None
        if self.show_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=step, desc=f"{stage.name}", unit="step", dynamic_ncols=True)
        last_print, t_window, tok_window, steps_taken = time.time(), time.perf_counter(), 0, 0
        losses = []
        profiler = None
        while step < total:
            profiler = self._profile(stage, steps_taken, profiler)
            lr = lr_at(stage, step, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=self.device)
            for _ in range(stage.grad_accum):
                batch = self._batch(next(it))
                teacher = self._teacher_outputs(stage, batch)
                with self._autocast():
                    loss, _ = self.wrapper(stage.loss, batch, teacher, chunk=stage.kl_chunk,
                                           temperature=stage.temperature)
                (loss / stage.grad_accum).backward()
                step_loss += loss.detach() / stage.grad_accum
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in self.wrapper.parameters() if p.requires_grad],
                                                   stage.grad_clip if stage.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_taken += 1
            tokens_done += stage.tokens_per_step(world)
            tok_window += stage.tokens_per_step(world)
            loss_value = parallel.all_reduce_mean(step_loss.item(), self.device)  # .item() syncs: one per step
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"stage {stage.name} step {step}: loss is {loss_value}; lower the lr")
            losses.append(loss_value)
            if step % stage.log_every == 0 or step == total:
                elapsed = time.perf_counter() - t_window
                tps = tok_window / max(elapsed, 1e-9)
                mfu = tps * fpt / (H200_BF16_PEAK * world) if self.device.type == "cuda" else None
                self.metrics.write({"stage": stage.name, "step": step, "steps": total, "tokens": tokens_done,
                                    "loss": loss_value, "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": tps,
                                    "mfu": mfu, "time": time.time(),
                                    "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30
                                    if self.device.type == "cuda" else None})
                t_window, tok_window = time.perf_counter(), 0
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                elif self.info.is_main and not self.cfg.quiet and time.time() - last_print > 10:
                    last_print = time.time()
                    print(f"[{stage.name}] step {step}/{total} loss {loss_value:.4f} lr {lr:.2e} "
                          f"{tps:,.0f} tok/s" + (f" MFU {mfu:.1%}" if mfu else ""), file=sys.stderr, flush=True)
            interrupted = self._out_of_time(steps_taken)
            if step == total or interrupted or (stage.save_every and step % stage.save_every == 0):
                self._save(idx, stage, step, tokens_done, optimizer, loader)
            if interrupted and step < total:
                if bar is not None:
                    bar.close()
                self.steps_this_process += steps_taken
                return False, {}
        if bar is not None:
            bar.close()
        if profiler is not None:
            self._profile(stage, -1, profiler)
        self.steps_this_process += steps_taken
        return True, {"stage": stage.name, "steps": total, "tokens": tokens_done, "final_loss": losses[-1] if losses else None,
                      "trainable_params": n_trained, "flops_per_token": fpt}

    def _profile(self, stage: StageConfig, steps_taken: int, profiler):
        """Start torch.profiler after 2 warm-up steps; stop and write the table ``profile_steps`` later (or at -1)."""
        n = self.cfg.profile_steps
        if not n or not self.info.is_main:
            return None
        if profiler is None and steps_taken == 2:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            profiler = profile(activities=acts, record_shapes=False)
            profiler.__enter__()
            self._profile_start = time.perf_counter()
        elif profiler is not None and (steps_taken == 2 + n or steps_taken == -1):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._profile_start
            profiler.__exit__(None, None, None)
            averages = profiler.key_averages()
            tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
            if self.device.type == "cuda":  # kernels first; the host table shows launch and sync overhead
                tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=45))
            path = self.out / f"profile-{stage.name}.txt"
            path.write_text(f"{stage.name}: {n} steps in {wall:.3f} s wall ({wall / n:.3f} s/step)\n"
                            + "\n".join(tables) + "\n")
            logger.info("profile of %d %s steps -> %s", n, stage.name, path)
            return None
        return profiler

    def _out_of_time(self, steps_taken: int) -> bool:
        """max_steps / max_minutes reached (rank 0 decides for all ranks, so they stop at the same step)."""
        stop = self.cfg.max_steps is not None and self.steps_this_process + steps_taken >= self.cfg.max_steps
        if self.cfg.max_minutes is not None:
            stop |= (time.time() - self.started) / 60 >= self.cfg.max_minutes
        flag = torch.tensor([int(stop)], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def _save(self, idx, stage, step, tokens, optimizer, loader) -> None:
        meta = {"stage_index": idx, "stage": stage.name, "step": step, "steps": stage.num_steps(self.info.world_size),
                "tokens": tokens, "fingerprint": self.fingerprint, "recipe": self.recipe.name}
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state()}
        ckpt.save_checkpoint(self.ckpt_dir, f"step-{idx:02d}-{step:07d}", self.wrapper, optimizer, meta, rank_state,
                             self.recipe.keep_checkpoints)

    # ---- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def heldout_ppl(self) -> dict:
        """Perplexity of the student (and, first time, the teacher) on held-out windows at ``eval_seq_len``."""
        if "heldout" not in self.indexes:
            return {}
        d = self.recipe.data
        windows = eval_windows(self.indexes["heldout"], d.eval_seq_len, d.eval_windows)  # [n, T]
        mine = windows[self.info.rank::self.info.world_size]
        self.wrapper.eval()
        nll = n = 0.0
        for row in mine:
            ids = row[None].to(self.device)
            batch = {"input_ids": ids, "labels": ids, "cu_seqlens": torch.tensor([0, ids.shape[1]], device=self.device)}
            with self._autocast():
                loss, count = self.wrapper("ce", batch)
            nll += loss.item() * count
            n += count
        self.wrapper.train()
        if self.sharded:
            self.wrapper.reshard()  # a no-grad forward leaves the FSDP root unsharded; optimizers and DCP need shards
        nll, n = parallel.all_reduce_sum([nll, n], self.device)
        result = {"student_ppl": math.exp(nll / n), "tokens": int(n), "seq_len": d.eval_seq_len}
        if self.teacher is not None and not self.teacher_eval:
            tnll = tn = 0.0
            for row in mine:
                ids = row[None].to(self.device)
                with self._autocast():
                    out = self.teacher(input_ids=ids, labels=ids, use_cache=False)
                tnll += out.loss.item() * (ids.shape[1] - 1)
                tn += ids.shape[1] - 1
            tnll, tn = parallel.all_reduce_sum([tnll, tn], self.device)
            self.teacher_eval = {"teacher_ppl": math.exp(tnll / tn)}
        result.update(self.teacher_eval)
        return result

    # ---- export --------------------------------------------------------------------------------------------------
    def _ever_trained(self, model: SALAForCausalLM) -> list[str]:
        """Parameters (other than adapter matrices) that some stage of the recipe trains: the delta's full tensors."""
        names: set[str] = set()
        for stage in self.recipe.stages:
            names |= set(select_trainable(model, stage.trainable, self.recipe.adapters.enabled))
        return sorted(n for n in names if not n.endswith((".lora_A", ".lora_B")))

    def export(self) -> dict:
        """Official single-folder checkpoint (adapters merged) in ``out/final``; with adapters, the trained delta
        (adapter matrices + fully trained small tensors) in ``out/delta``. Rank 0 writes; written atomically."""
        full = ckpt.full_model_state(self.wrapper)
        paths: dict = {}
        if self.info.is_main:
            from sala.train.lora import apply_lora, merge_lora, save_delta

            r = self.recipe
            model = SALAForCausalLM.from_pretrained(self.student_dir, dtype=torch.float32)
            if r.adapters.enabled:
                apply_lora(model, rank=r.adapters.rank, alpha=r.adapters.alpha, targets=tuple(r.adapters.targets),
                           rank_overrides=r.adapters.rank_overrides or None)
            model.load_state_dict({k.removeprefix("student."): v for k, v in full.items()}, strict=True)
            if self.cfg.check_weights:  # a diverged run must not leave a checkpoint that loads and emits garbage
                from sala.model.checkpoint_io import check_finite_weights

                check_finite_weights(model.named_parameters(), f"the trained model of {self.out}")
            if r.adapters.enabled:
                extra = self._ever_trained(model)
                files = save_delta(self.out / "delta", model, extra_names=extra, base_fingerprint=self.fingerprint,
                                   dtype=getattr(torch, r.model.dtype), overwrite=True)  # final/'s precision
                paths["delta"] = [str(f) for f in files]
                merge_lora(model)
            final = self.out / "final"
            with atomic_dir(final, force=True) as tmp:  # sala's files in final/ replaced, any other file kept
                model.to(getattr(torch, r.model.dtype)).save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            paths["final"] = str(final)
        dist.barrier()
        return paths

    # ---- whole run -----------------------------------------------------------------------------------------------
    def _write_json(self, name: str, data: dict) -> None:
        if self.info.is_main:
            tmp = self.out / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
            tmp.replace(self.out / name)

    def run(self) -> TrainResult:
        for stage in self.recipe.stages:  # a budget below one step fails now, not after the stages before it
            stage.num_steps(self.info.world_size)
        self.data_files()  # a missing file fails before anything is deleted or loaded
        latest = self.prepare_out()
        self.load_models()
        start, resume = 0, None
        evals: dict = {}
        if latest is not None:
            meta = ckpt.read_meta(latest)
            if meta.get("fingerprint") != self.fingerprint:
                raise ckpt.CheckpointMismatchError(
                    f"checkpoint {latest} was trained from another student model (fingerprint {meta.get('fingerprint')}"
                    f", this recipe's model.student {self.student_dir} has {self.fingerprint}); resume with the recipe "
                    "that made it, or start over with --force")
            if meta.get("recipe") != self.recipe.name:
                raise ckpt.CheckpointMismatchError(f"checkpoint {latest} belongs to recipe {meta.get('recipe')!r}, "
                                                   f"not {self.recipe.name!r}")
            if meta["step"] >= meta["steps"]:  # the stage it ended was complete: start the next one
                ckpt.load_checkpoint(latest, self.wrapper, None)
                start = meta["stage_index"] + 1
            else:
                start, resume = meta["stage_index"], {"path": latest}
            evals_file = self.out / "evals.json"
            evals = json.loads(evals_file.read_text()) if evals_file.exists() else {}
            logger.info("resuming %s from %s (stage %s, step %d)", self.out, latest.name, meta["stage"], meta["step"])
        else:
            self._write_json("run.json", {"recipe": asdict(self.recipe), "config": asdict(self.cfg),
                                          "fingerprint": self.fingerprint, "world_size": self.info.world_size,
                                          "device": str(self.device)})
        self.prepare_data()
        self.steps_this_process = 0
        if latest is None and "heldout" in self.indexes:  # the starting point: the conversion or the init delta
            evals["init_delta" if self.recipe.model.init_delta else "converted"] = self.heldout_ppl()
            self._write_json("evals.json", evals)
        summaries = []
        for idx in range(start, len(self.recipe.stages)):
            stage = self.recipe.stages[idx]
            finished, summary = self.run_stage(idx, stage, resume if idx == start else None)
            if not finished:
                logger.info("stopped after %d steps (max_steps / max_minutes); resume with --resume", self.steps_this_process)
                return TrainResult(out=self.out, finished=False, evals=evals)
            summaries.append(summary)
            if "heldout" in self.indexes:
                evals[stage.name] = self.heldout_ppl()
                self._write_json("evals.json", evals)
                logger.info("after %s: held-out ppl %.3f (teacher %s)", stage.name, evals[stage.name]["student_ppl"],
                            evals[stage.name].get("teacher_ppl"))
            if idx + 1 < len(self.recipe.stages) and self._out_of_time(0):  # ran out at this stage's last step
                logger.info("stopped after %d steps (max_steps / max_minutes); resume with --resume", self.steps_this_process)
                return TrainResult(out=self.out, finished=False, evals=evals)
        paths = self.export()
        if self.info.is_main:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss_curves.png")
        self._write_json("results.json", {"evals": evals, "stages": summaries, "exported": paths})
        return TrainResult(out=self.out, finished=True, evals=evals, stages=summaries)


def run_train(cfg: TrainConfig) -> TrainResult:
    """Run ``cfg.recipe`` (one process, or each rank of a ``torchrun`` launch)."""
    info = parallel.init_distributed(cfg.device)
    if info.device.type == "cuda":  # fp32 matmuls (the fused loss's logits) on tensor cores, as TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        recipe = load_recipe(cfg.recipe, {**cfg.overrides, "out": cfg.out})
        result = Trainer(cfg, recipe, info).run()
    except BaseException:
        parallel.shutdown(info, ok=False)
        raise
    parallel.shutdown(info)
    return result
