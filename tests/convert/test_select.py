"""HALO layer selection: probes, student alignment, scores, forced layers, report format, determinism, chaining."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sala  # noqa: F401
from sala.convert import ConversionError, ConvertConfig, SelectConfig, read_source, run_convert, run_select_layers
from sala.convert.probes import build_recall_set, load_tokenizer
from sala.convert.select import choose_sparse_layers, halo_scores, make_students, student_mse
from sala.convert.inherit import InitOptions
from sala.convert.verify import build_identity_model

FAST = dict(steps=12, batch_size=2, seq_len=64, probe_len=96, recall_samples=4, recall_queries=2, lm_windows=2,
            probe_batch_size=4, warmup_steps=2, quiet=True)


@pytest.fixture(scope="module")
def selection(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("selection")
    return run_select_layers(SelectConfig(source=str(sources["qwen3"]), out=str(out), save_students=True, **FAST)), out


def test_halo_scores_formula():
    # recall and general are higher-is-better; layer 1 loses most recall for little general loss
    s = halo_scores([0.9, 0.5, 0.8], [-1.0, -1.1, -2.0], eps=1e-10, cap=50.0)
    assert s[0] == 0.0 and s[1] == pytest.approx(0.4 / 0.1) and s[2] == pytest.approx(0.1 / 1.0)
    assert halo_scores([1.0, 0.0], [-1.0, -1.0])[1] == 50.0  # no general drop: capped


def test_choose_sparse_layers():
    scores = [0.0, 5.0, 1.0, 9.0, 2.0, 7.0, 0.5, 0.1]
    assert choose_sparse_layers(scores, fraction=0.5) == ([0, 3, 5, 7], [0, 7])  # 4 = forced 2 + top 2
    assert choose_sparse_layers(scores, num_sparse=3, force_first_last=False) == ([1, 3, 5], [])
    assert choose_sparse_layers([1.0] * 4, fraction=0.25)[0] == [0, 3]  # floor(1) < forced: forced only
    with pytest.raises(ValueError, match=r"cannot keep 9 softmax layers out of 8"):
        choose_sparse_layers(scores, num_sparse=9)
    # several layers at the score cap: the larger recall drop wins, then the lower index
    capped = [0.0, 50.0, 50.0, 50.0, 3.0, 0.0]
    assert choose_sparse_layers(capped, num_sparse=4, recall_drops=[0, 0.2, 0.9, 0.5, 1.0, 0])[0] == [0, 2, 3, 5]
    assert choose_sparse_layers(capped, num_sparse=4)[0] == [0, 1, 2, 5]


def test_recall_probe_answers_are_in_context(sources):
    tok = load_tokenizer(sources["qwen3"])
    filler = torch.arange(5, 300).repeat(3)
    r = build_recall_set(tok, 320, filler, samples=4, length=96, queries=3, gen=torch.Generator().manual_seed(0))
    assert r.ids.shape == (4, 96) and r.answer_mask.sum(1).tolist() == [3, 3, 3, 3]
    for n in range(4):
        for t in r.answer_mask[n].nonzero().flatten().tolist():
            key, answer = r.ids[n, t - 1].item(), r.answers[n, t].item()  # ": " is one token here
            ctx = r.ids[n, : t - 1].tolist()
            pos = [i for i, k in enumerate(ctx[:-2]) if k == key and ctx[i + 1] == r.ids[n, t].item()]
            assert pos and ctx[pos[0] + 2] == answer and r.ids[n, t + 1] == answer  # teacher-forced answer follows


def test_students_reduce_mse(sources):
    spec = read_source(sources["llama"])
    teacher = build_identity_model(spec)
    students = make_students(teacher, spec, InitOptions(), "cpu")
    from sala.convert.select import align_students
    windows = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(9))
    before = student_mse(teacher, students, windows, "cpu", 2)
    calib = torch.randint(0, 320, (2000,), generator=torch.Generator().manual_seed(3))
    align_students(teacher, students, calib, SelectConfig(source="x", **{**FAST, "steps": 25, "lr": 3e-3}), "cpu")
    after = student_mse(teacher, students, windows, "cpu", 2)
    assert all(a[0] < 0.5 * b[0] for a, b in zip(after, before)), (before, after)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_training_students_leaves_the_teacher_alone(sources):
    """An fp32 teacher on the CPU: the students own copies of the inherited weights, so aligning them does not move
    the teacher (its single-swap probes once measured a teacher trained along with them: LM loss 11.7, not 2.8)."""
    spec = read_source(sources["llama"])
    teacher = build_identity_model(spec)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    students = make_students(teacher, spec, InitOptions(), "cpu")
    teacher_ptrs = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    assert not any(p.untyped_storage().data_ptr() in teacher_ptrs for s in students for p in s.parameters())
    from sala.convert.select import align_students
    calib = torch.randint(0, 320, (2000,), generator=torch.Generator().manual_seed(3))
    align_students(teacher, students, calib, SelectConfig(source="x", **{**FAST, "steps": 5, "lr": 3e-3}), "cpu")
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_selection_report_format(selection):
    result, out = selection
    report = json.loads((out / "layer_selection.json").read_text())
    assert report["sparse_layers"] == result.sparse_layers and report["forced_layers"] == [0, 3]
    assert report["sparse_layers"] == [0, 3]  # floor(0.25 * 4) = 1 < 2 forced
    assert report["mixer_types"] == ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]
    assert len(report["layers"]) == 4
    keys = {"layer", "mse_before", "mse_after", "train_mse", "rel_mse", "recall", "recall_accuracy", "lm_loss", "recall_drop",
            "general_drop", "score", "sparse", "forced"}
    assert all(set(layer) == keys for layer in report["layers"])
    assert all(layer["mse_after"] < layer["mse_before"] for layer in report["layers"])
    assert all(0 <= layer["score"] <= 50 for layer in report["layers"])
    assert set(report["teacher"]) >= {"lm_loss", "recall", "recall_accuracy"}
    assert report["timing"]["train_s_per_layer"] > 0 and report["config"]["steps"] == FAST["steps"]
    assert (out / "layer_selection.png").stat().st_size > 1000
    students = load_file(str(out / "aligned_students.safetensors"))
    assert students["model.layers.1.self_attn.k_proj.weight"].shape == (96, 64)  # Lightning: MHA (4 heads x 24)


def test_selection_is_deterministic(sources, selection):
    again = run_select_layers(SelectConfig(source=str(sources["qwen3"]), **FAST))
    first = selection[0]
    assert [layer.score for layer in again.layers] == [layer.score for layer in first.layers]
    assert [layer.mse_after for layer in again.layers] == [layer.mse_after for layer in first.layers]
    assert all(torch.equal(again.students[k], first.students[k]) for k in first.students)


def test_more_layers_forced_and_ranked(sources, monkeypatch):
    """A middle layer is chosen by its score. The random sources' recall is noise (single-swap drops ~1e-3 nats),
    so M(2) is made to lose one nat of answer log-prob (its LM loss untouched) and eps = 0.1 keeps noise-level
    general drops from blowing scores up to the cap: layer 2 must win on score, against the tie-break to layer 1."""
    import sala.convert.select as select

    probe = select.probe_single_swaps

    def worse_recall_at_2(*args, **kwargs):
        base, swaps = probe(*args, **kwargs)
        swaps[2] = {**swaps[2], "recall": swaps[2]["recall"] - 1.0}
        return base, swaps

    monkeypatch.setattr(select, "probe_single_swaps", worse_recall_at_2)
    res = run_select_layers(SelectConfig(source=str(sources["minicpm"]), num_sparse=3, eps=0.1, **FAST))
    assert res.forced_layers == [0, 3] and res.sparse_layers == [0, 2, 3]
    one, two = res.layers[1], res.layers[2]
    assert two.sparse and not two.forced and not one.sparse and two.recall_drop > 0.99
    assert two.score == pytest.approx(two.recall_drop / (two.general_drop + 0.1)) and two.score > 10 * one.score


def test_convert_select_auto_uses_aligned_students(sources, tmp_path):
    res = run_convert(ConvertConfig(source=str(sources["qwen2"]), out=str(tmp_path), select="auto",
                                    selection=SelectConfig(source=str(sources["qwen2"]), out=str(tmp_path / "sel"), **FAST)))
    assert res.sparse_layers == [0, 3] and (tmp_path / "sel" / "layer_selection.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    k = model.model.layers[1].self_attn.k_proj.weight
    assert torch.allclose(k, res.selection.students["model.layers.1.self_attn.k_proj.weight"])
    assert json.loads((tmp_path / "conversion.json").read_text())["lightning_weights"] == "aligned students"


def test_convert_with_students_file(sources, selection, tmp_path):
    _, sel_out = selection
    run_convert(ConvertConfig(source=str(sources["qwen3"]), out=str(tmp_path), sparse_layers=(0, 3),
                              students=str(sel_out / "aligned_students.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    students = load_file(str(sel_out / "aligned_students.safetensors"))
    assert torch.equal(model.model.layers[2].self_attn.z_proj.weight, students["model.layers.2.self_attn.z_proj.weight"])


def test_selection_errors(sources, tmp_path):
    with pytest.raises(ConversionError, match=r"text file .*nope.txt does not exist"):
        run_select_layers(SelectConfig(source=str(sources["qwen2"]), text_files=(str(tmp_path / "nope.txt"),), **FAST))
    with pytest.raises(ConversionError, match=r"could not load a tokenizer from .*pass tokenizer=DIR"):
        run_select_layers(SelectConfig(source=str(sources["qwen2"]), tokenizer=str(tmp_path), **FAST))
    with pytest.raises(ValueError, match=r"recall_metric must be one of"):
        SelectConfig(source="x", recall_metric="f1")
