"""The trainer on the tiny-cpu recipe: a 2-process gloo run, resume == uninterrupted, guards of the output folder,
a kill during a checkpoint save, the teacher on packed rows, the adapters' delta, LR schedules."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sala.train import checkpoint as ckpt
from sala.train.recipe import RecipeError, StageConfig, load_recipe
from sala.train.trainer import TrainConfig, Trainer, TrainResult, lr_at, run_train
from sala.utils.testing import assert_close
from tests.train.conftest import convert, records

REPO = Path(__file__).resolve().parents[2]

# small budgets for one process: align 6 steps of 128 tokens, distill 4 of 256, long 3 of 128
SMALL = dict(stages__align__tokens=768, stages__distill__tokens=1024, stages__long__tokens=384)


def train(tiny, out: Path, **kw) -> TrainResult:
    """run_train of tiny-cpu in this process; ``kw``: TrainConfig fields, the rest are --set overrides."""
    fields = {k: kw.pop(k) for k in ("resume", "force", "max_steps") if k in kw}
    return run_train(TrainConfig(recipe="tiny-cpu", out=str(out), quiet=True, overrides=tiny.overrides(**kw), **fields))


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _latest(out: Path) -> str:
    return (out / "checkpoints" / ckpt.LATEST).read_text().strip()


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """An uninterrupted run of the SMALL budgets (checkpoint after every align step, as the kill test needs)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(tiny, out, stages__align__save_every=1, **SMALL)
    assert result.finished
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. two processes, gloo
# ---------------------------------------------------------------------------------------------------------------
def test_two_process_gloo_run(tiny, tmp_path):
    """torchrun --nproc-per-node 2 finishes, writes its outputs, exports a loadable model, and every stage's loss
    falls. Budgets are twice tiny-cpu's, so each stage keeps its one-process step count (12, 10, 8) on 2 ranks."""
    out = tmp_path / "run"
    sets = tiny.overrides(stages__align__tokens=3072, stages__distill__tokens=5120, stages__long__tokens=2048)
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--nproc-per-node", "2", "-m", "sala.train", "tiny-cpu",
           "--out", str(out), "--quiet"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    for name in ("metrics.jsonl", "evals.json", "results.json", "run.json", "loss_curves.png", "final/config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run.json").read_text())["world_size"] == 2

    recs = records(out)
    by_stage: dict[str, list[float]] = {}
    for (stage, step), r in sorted(recs.items(), key=lambda kv: kv[1]["time"]):
        by_stage.setdefault(stage, []).append(r["loss"])
        assert r["steps"] == {"align": 12, "distill": 10, "long": 8}[stage]
    assert {s: len(v) for s, v in by_stage.items()} == {"align": 12, "distill": 10, "long": 8}
    first, last = ({s: sum(v[:3]) / 3 for s, v in by_stage.items()}, {s: sum(v[-3:]) / 3 for s, v in by_stage.items()})
    assert last["align"] < 0.5 * first["align"], by_stage["align"]  # ~5x in practice
    assert last["distill"] < 0.8 * first["distill"], by_stage["distill"]  # ~0.6x
    assert last["long"] < first["long"] - 0.1, by_stage["long"]  # nats; ~0.3 in practice

    evals = json.loads((out / "evals.json").read_text())
    assert list(evals) == ["converted", "align", "distill", "long"]
    assert all(math.isfinite(e["student_ppl"]) for e in evals.values())
    assert evals["long"]["student_ppl"] < evals["converted"]["student_ppl"]

    from transformers import AutoModelForCausalLM

    import sala  # noqa: F401  (registers the SALA Auto classes)

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "SALAForCausalLM"
    logits = model(torch.randint(0, 320, (1, 40)), use_cache=False).logits
    assert logits.shape == (1, 40, 320) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------------
# 2. resume
# ---------------------------------------------------------------------------------------------------------------
def test_resume_matches_uninterrupted(tiny, reference, tmp_path):
    """Stopped mid-stage, resumed across a stage boundary, stopped exactly at a stage end, then finished: the same
    losses, learning rates, token counts, evaluations and exported weights as the uninterrupted run."""
    out = tmp_path / "run"
    sets = dict(stages__align__save_every=1, **SMALL)
    assert not train(tiny, out, max_steps=4, **sets).finished  # align 1-4 of 6
    assert _latest(out) == "step-00-0000004"
    assert not train(tiny, out, resume=True, max_steps=4, **sets).finished  # align 5-6, distill 1-2 of 4
    assert _latest(out) == "step-01-0000002"
    assert not train(tiny, out, resume=True, max_steps=2, **sets).finished  # distill 3-4: stops at the stage end
    assert _latest(out) == "step-01-0000004"
    assert {r["stage"] for r in _lines(out)} == {"align", "distill"}
    assert train(tiny, out, resume=True, **sets).finished  # long 1-3, export

    ref, got = records(reference), records(out)
    assert len(_lines(out)) == len(got) == len(ref) == 6 + 4 + 3  # nothing logged twice, nothing missing
    assert got.keys() == ref.keys()
    for key, r in ref.items():
        g = got[key]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-7), key
        assert (g["lr"], g["tokens"], g["steps"]) == (r["lr"], r["tokens"], r["steps"]), key

    ref_evals, got_evals = (json.loads((p / "evals.json").read_text()) for p in (reference, out))
    assert got_evals.keys() == ref_evals.keys() == {"converted", "align", "distill", "long"}
    for stage in ref_evals:
        assert got_evals[stage]["student_ppl"] == pytest.approx(ref_evals[stage]["student_ppl"], rel=1e-5), stage

    ref_w, got_w = (load_file(p / "final" / "model.safetensors") for p in (reference, out))
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert_close(got_w[name], ref_w[name], 1e-4, name)  # bitwise equal in practice (same thread count)


def test_logged_lr_follows_schedule(reference):
    """The lr of step s (1-based in the log) is lr_at(stage, s - 1, total)."""
    recipe = load_recipe("tiny-cpu", {k.replace("__", "."): str(v) for k, v in SMALL.items()})
    stages = {s.name: s for s in recipe.stages}
    for (stage, step), r in records(reference).items():
        assert r["lr"] == pytest.approx(lr_at(stages[stage], step - 1, r["steps"]), rel=1e-12), (stage, step)


def test_out_folder_guards(tiny, other_student, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"--resume: .* has no complete checkpoint to resume from"):
        train(tiny, out, resume=True, **SMALL)

    assert not train(tiny, out, max_steps=1, **SMALL).finished
    with pytest.raises(RecipeError, match=r"already holds a run; pass --resume to continue it or --force"):
        train(tiny, out, **SMALL)

    saved = ckpt.read_meta(out / "checkpoints" / _latest(out))["fingerprint"]
    from sala.model import SALAForCausalLM
    from sala.train.lora import model_fingerprint

    theirs = model_fingerprint(SALAForCausalLM.from_pretrained(other_student, dtype=torch.float32))
    assert saved != theirs
    with pytest.raises(ckpt.CheckpointMismatchError, match=rf"fingerprint {saved}.*has {theirs}.*--force"):
        train(tiny, out, resume=True, model__student=str(other_student), **SMALL)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"belongs to recipe 'tiny-cpu', not 'renamed'"):
        train(tiny, out, resume=True, name="renamed", **SMALL)
    with pytest.raises(ValueError, match="at most one of resume"):
        TrainConfig(recipe="tiny-cpu", resume=True, force=True)

    (out / "notes.txt").write_text("the user's own file")
    (out / "profile-align.txt").write_text("an old run's profile")
    assert not train(tiny, out, force=True, max_steps=2, **SMALL).finished
    assert (out / "notes.txt").read_text() == "the user's own file"  # --force deletes only what a run wrote
    assert not (out / "profile-align.txt").exists()  # the old run's outputs are gone
    assert [(r["stage"], r["step"]) for r in _lines(out)] == [("align", 1), ("align", 2)]
    assert _latest(out) == "step-00-0000002"


def test_missing_inputs_name_the_field(tiny, tmp_path):
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    with pytest.raises(RecipeError, match=r"model\.student: .*not_a_checkpoint is not a SALA checkpoint folder "
                                          r"\(no config\.json\).*sala convert"):
        train(tiny, tmp_path / "a", model__student=str(empty), **SMALL)
    with pytest.raises(RecipeError, match=r"model\.teacher: .*no_teacher does not exist"):
        train(tiny, tmp_path / "b", model__teacher=str(tmp_path / "no_teacher"), **SMALL)
    with pytest.raises(RecipeError, match=r"data\.train: .*missing\.txt does not exist"):
        train(tiny, tmp_path / "c", data__train=json.dumps([str(tiny.train), str(tmp_path / "missing.txt")]), **SMALL)
    with pytest.raises(RecipeError, match=r"data\.heldout: .*gone\.txt does not exist"):
        train(tiny, tmp_path / "d", data__heldout=str(tmp_path / "gone.txt"), **SMALL)


def test_budget_below_one_step_fails_before_training(tiny, tmp_path):
    """A later stage's too-small budget is reported before the first stage trains, not after it."""
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"stages\[long\]\.tokens = 64 is less than one optimizer step"):
        train(tiny, out, **{**SMALL, "stages__long__tokens": 64})
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. a kill during a save
# ---------------------------------------------------------------------------------------------------------------
def test_kill_during_save_keeps_last_good_checkpoint(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = ckpt.dcp.save, []

    class Killed(Exception):
        pass

    def dying_save(state, checkpoint_id, **kw):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the second save dies after writing part of its files
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
            raise Killed("killed while saving")
        return real_save(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(ckpt.dcp, "save", dying_save)
    with pytest.raises(Killed):
        train(tiny, out, stages__align__save_every=1, **SMALL)
    monkeypatch.setattr(ckpt.dcp, "save", real_save)

    root = out / "checkpoints"
    assert _latest(out) == "step-00-0000001"  # the pointer still names the first, complete checkpoint
    assert (root / "step-00-0000002.tmp").is_dir() and not (root / "step-00-0000002").exists()
    assert ckpt.latest_checkpoint(root) == root / "step-00-0000001"
    assert ckpt.read_meta(root / "step-00-0000001")["step"] == 1
    stray = root / "step-00-0000099.tmp"  # another half-written folder (e.g. from a run with other save points)
    stray.mkdir()
    (stray / "garbage").write_text("x")

    assert train(tiny, out, resume=True, stages__align__save_every=1, **SMALL).finished
    ref, got = records(reference), records(out)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key]["loss"] == pytest.approx(ref[key]["loss"], rel=1e-5, abs=1e-7), key
    assert not list(root.glob("*.tmp")), "half-written checkpoints are removed once a newer one is complete"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-01-0000004", "step-02-0000003"]


# ---------------------------------------------------------------------------------------------------------------
# 4. the teacher sees the student's documents
# ---------------------------------------------------------------------------------------------------------------
def test_teacher_on_packed_rows_sees_separate_documents(tiny, tmp_path):
    """For a packed micro-batch (2 rows, a document boundary inside a row), the trainer's teacher outputs (final
    hidden states, each layer's attention input and output) equal the teacher run on each document piece alone:
    transformers builds a block-diagonal causal mask from the restarting position_ids."""
    from transformers import AutoTokenizer

    from sala.train.data import PackedLoader, tokenize_to_shards
    from sala.train.teacher import load_teacher, logit_scale, teacher_forward

    teacher = load_teacher(str(tiny.teacher), torch.float32, torch.device("cpu"))
    index = tokenize_to_shards([tiny.train], AutoTokenizer.from_pretrained(tiny.student), tmp_path / "tokens")
    stage = load_recipe("tiny-cpu").stages[0]  # align: 2 rows of 64
    loader = iter(PackedLoader(index, seq_len=stage.seq_len, micro_batch=stage.micro_batch, seed=1))
    for b in loader:  # the first micro-batch with a document boundary inside a row
        if len(b.cu_seqlens) > stage.micro_batch + 1:
            break
    cu, pos = b.cu_seqlens.tolist(), b.position_ids[0]
    assert [i for i in range(pos.numel()) if pos[i] == 0] == cu[:-1]  # the student's segments == the restarts
    stub = types.SimpleNamespace(teacher=teacher, dtype=torch.float32, device=torch.device("cpu"),
                                 teacher_weight=teacher.lm_head.weight, teacher_scale=logit_scale(teacher))
    stub._autocast = lambda: Trainer._autocast(stub)
    batch = {"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids, "cu_seqlens": b.cu_seqlens}
    packed = Trainer._teacher_outputs(stub, stage, batch)
    n_layers = len(teacher.model.layers)
    assert packed["hidden"].shape == (stage.micro_batch * stage.seq_len, 64)

    for a, e in zip(cu[:-1], cu[1:]):
        alone = teacher_forward(teacher, b.input_ids[:, a:e], torch.arange(e - a)[None], attention_io=True)
        assert_close(packed["hidden"][a:e], alone["hidden"][0], 1e-5, f"hidden[{a}:{e}]")
        for i in range(n_layers):
            for k in ("x", "y"):
                got = packed[k][i].reshape(-1, 64)[a:e]
                assert_close(got, alone[k][i][0], 1e-5, f"{k}[{i}][{a}:{e}]")

    # the check has teeth: without restarting positions (one causal sequence per row) the documents mix
    rows = b.input_ids.view(stage.micro_batch, -1)
    plain = teacher_forward(teacher, rows, torch.arange(stage.seq_len).expand_as(rows), attention_io=False)
    diff = (plain["hidden"].reshape(-1, 64) - packed["hidden"]).abs().amax(-1)
    inner = [a for a in cu[1:-1] if a % stage.seq_len]  # boundaries inside a row
    assert inner and all(diff[a:a + 4].min() > 1e-2 for a in inner)


# ---------------------------------------------------------------------------------------------------------------
# 6. adapters
# ---------------------------------------------------------------------------------------------------------------
def test_adapters_delta_reproduces_final(tiny, tmp_path):
    """With adapters the run writes out/delta; the delta loaded onto a fresh conversion and merged gives the
    exported final/ model's logits."""
    from sala.model import SALAForCausalLM
    from sala.train.lora import load_delta, merge_lora

    out = tmp_path / "run"
    assert train(tiny, out, adapters__enabled="true", stages__align__tokens=256, stages__distill__tokens=512,
                 stages__long__tokens=256).finished
    meta = json.loads((out / "delta" / "delta.json").read_text())
    assert list((out / "delta").glob("*.safetensors"))
    assert meta["rank"] == 4 and meta["alpha"] == 8.0
    assert meta["base_fingerprint"] == json.loads((out / "run.json").read_text())["fingerprint"]

    fresh = SALAForCausalLM.from_pretrained(convert(tiny.teacher, tmp_path / "fresh"), dtype=torch.float32).eval()
    final = SALAForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = fresh(ids, use_cache=False).logits
        load_delta(out / "delta", fresh)
        merge_lora(fresh)
        after, want = fresh(ids, use_cache=False).logits, final(ids, use_cache=False).logits
    assert (want - before).abs().max() > 1e-3  # training changed the model, so the comparison means something
    assert_close(after, want, 1e-5, "fresh conversion + delta vs final")


# ---------------------------------------------------------------------------------------------------------------
# 7. LR schedules
# ---------------------------------------------------------------------------------------------------------------
def _stage(schedule: str, warmup: int, **kw) -> StageConfig:
    return StageConfig(name="s", loss="ce", trainable=["all"], seq_len=2, tokens=2, lr=1.0, min_lr=0.1,
                       schedule=schedule, warmup_steps=warmup, **kw)


@pytest.mark.parametrize("schedule, warmup, extra, expected", [
    # warmup is linear to lr: (step + 1) / warmup
    ("constant", 2, {}, {0: 0.5, 1: 1.0, 2: 1.0, 9: 1.0}),
    ("constant", 0, {}, {0: 1.0, 9: 1.0}),
    # cosine over the 8 steps after warmup: min + (lr - min) (1 + cos(pi (s - 2) / 8)) / 2
    ("cosine", 2, {}, {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 6: 0.55,
                       9: 0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8))}),
    ("cosine", 0, {}, {0: 1.0, 5: 0.55}),
    # wsd, decay_fraction 0.3 of 10 steps: stable to step 6, then min + (lr - min) linearly over steps 7, 8, 9
    ("wsd", 2, {"decay_fraction": 0.3}, {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 7: 0.7, 8: 0.4, 9: 0.1}),
    ("wsd", 0, {"decay_fraction": 0.5}, {0: 1.0, 4: 1.0, 5: 0.82, 7: 0.46, 9: 0.1}),
])
def test_lr_schedules(schedule, warmup, extra, expected):
    stage = _stage(schedule, warmup, **extra)
    got = {s: lr_at(stage, s, 10) for s in expected}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_export_refuses_non_finite_weights(tiny, tmp_path, monkeypatch):
    """Issue 17: ``--check-weights`` (on by default) refuses to export a model holding NaN/inf; final/ is not
    written. Off, the export goes through."""
    from sala.model.checkpoint_io import CheckpointError

    real = ckpt.full_model_state

    def poisoned(wrapper):
        state = real(wrapper)
        name = next(k for k in state if k.endswith("mlp.up_proj.weight"))
        state[name] = state[name].clone()
        state[name][0, 0] = float("inf")
        return state

    monkeypatch.setattr(ckpt, "full_model_state", poisoned)
    budget = dict(stages__align__tokens=128, stages__distill__tokens=256, stages__long__tokens=128)
    with pytest.raises(CheckpointError, match=r"the trained model of .* has 1 tensor\(s\) with NaN/inf values: .*up_proj"):
        train(tiny, tmp_path / "run", **budget)
    assert not (tmp_path / "run" / "final").exists()
    result = run_train(TrainConfig(recipe="tiny-cpu", out=str(tmp_path / "run2"), quiet=True, check_weights=False,
                                   overrides=tiny.overrides(**budget)))
    assert result.finished and (tmp_path / "run2" / "final" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# 8. starting from a trained delta; KL on chat-rendered data
# ---------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
ONE_STEP_EACH = dict(stages__align__tokens=128, stages__distill__tokens=256, stages__long__tokens=128)


@pytest.fixture(scope="module")
def first_delta(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first") / "run"
    assert train(tiny, out, adapters__enabled="true", stages__align__tokens=256, stages__distill__tokens=512,
                 stages__long__tokens=256).finished
    return out


def _chat_setup(tiny, tmp_path: Path, monkeypatch) -> tuple[Path, Path, list[str]]:
    """(the tiny student with a chat template, a chats file of 6 train paragraphs, the list that records which
    token index each stage's loaders read)."""
    student = tmp_path / "student"  # same weights, a tokenizer that renders chats
    shutil.copytree(tiny.student, student)
    (student / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    paras = [p for p in tiny.train.read_text().split("\n\f\n") if p.strip()]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": p}]}) + "\n"
                            for i, p in enumerate(paras[:6])))
    import sala.train.trainer as trainer_mod

    read: list[str] = []
    real_loader = trainer_mod.PackedLoader
    monkeypatch.setattr(trainer_mod, "PackedLoader", lambda index, **kw: read.append(index.root.name) or
                        real_loader(index, **kw))
    return student, chat, read


def test_mix_stage_reads_text_and_chats(tiny, tmp_path, monkeypatch):
    """data = "mix": one stage's micro-batches come from both the plain text and the chats (half each here)."""
    student, chat, read = _chat_setup(tiny, tmp_path, monkeypatch)
    import sala.train.trainer as trainer_mod

    picks = []  # which loader each micro-batch of the mixed stage came from
    real_mixed = trainer_mod.MixedLoader

    class Recording(real_mixed):
        def takes_second(self, k):
            picks.append(super().takes_second(k))
            return picks[-1]

    monkeypatch.setattr(trainer_mod, "MixedLoader", Recording)
    out = tmp_path / "mixed"
    sets = tiny.overrides(model__student=str(student), data__sft=json.dumps([str(chat)]),
                          stages__distill__data='"mix"', stages__distill__sft_fraction="0.5", **ONE_STEP_EACH)
    assert run_train(TrainConfig(recipe="tiny-cpu", out=str(out), quiet=True, overrides=sets)).finished
    assert read == ["train", "train", "sft", "train"]  # align; distill's two loaders; long
    assert picks and picks == [k % 2 == 1 for k in range(len(picks))]
    assert all(math.isfinite(r["loss"]) for r in _lines(out))


def test_init_delta_starts_where_the_delta_ended_and_kl_reads_chats(tiny, first_delta, tmp_path, monkeypatch):
    """model.init_delta: the second run's starting held-out ppl is the first run's final one (the delta is loaded,
    not fresh adapters); a kl stage with data = "sft" trains on the rendered chats, and its delta is again relative
    to the student (same base fingerprint)."""
    student, chat, read = _chat_setup(tiny, tmp_path, monkeypatch)
    out = tmp_path / "second"
    sets = tiny.overrides(adapters__enabled="true", model__student=str(student),
                          model__init_delta=str(first_delta / "delta"), data__sft=json.dumps([str(chat)]),
                          stages__distill__data='"sft"', **ONE_STEP_EACH)
    assert run_train(TrainConfig(recipe="tiny-cpu", out=str(out), quiet=True, overrides=sets)).finished
    evals = json.loads((out / "evals.json").read_text())
    assert "converted" not in evals
    assert evals["init_delta"]["student_ppl"] == pytest.approx(
        json.loads((first_delta / "evals.json").read_text())["long"]["student_ppl"], rel=1e-6)
    index = json.loads((out / "tokens" / "sft" / "index.json").read_text())
    assert index["sft"] and index["num_docs"] == 6
    assert [r["stage"] for r in _lines(out)] == ["align", "distill", "long"]
    assert read == ["train", "sft", "train"]
    base = json.loads((first_delta / "delta" / "delta.json").read_text())["base_fingerprint"]
    assert json.loads((out / "delta" / "delta.json").read_text())["base_fingerprint"] == base


def test_init_delta_mismatches_name_the_field(tiny, first_delta, other_student, tmp_path):
    def run(**kw):
        sets = tiny.overrides(**{"adapters__enabled": "true", "model__init_delta": str(first_delta / "delta"),
                                 **ONE_STEP_EACH, **kw})
        return run_train(TrainConfig(recipe="tiny-cpu", out=str(tmp_path / "x"), quiet=True, force=True, overrides=sets))

    with pytest.raises(RecipeError, match=r"model\.init_delta: .* adapters\.rank = 4, the recipe says 8"):
        run(adapters__rank=8)
    with pytest.raises(RecipeError, match=r"model\.init_delta: .*fingerprint"):
        run(model__student=str(other_student))
    with pytest.raises(RecipeError, match=r"model\.init_delta: .* holds no delta\.json"):
        run(model__init_delta=str(tmp_path))
    with pytest.raises(RecipeError, match=r"model\.init_delta .* \[adapters\] enabled = false"):
        run(adapters__enabled="false")
