"""``sala eval ppl|niah|ruler`` end to end on tiny random models (JSON + Markdown + PNG written), models side
by side, model kinds, and each bad input's error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sala.cli import main
from sala.eval.models import check_lengths, load_eval_model, model_kind


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ppl_side_by_side(tmp_path, haystack_file, llama_dir, capsys):
    out = tmp_path / "ppl"
    rc, stdout, stderr = run(["eval", "ppl", "--model", "tiny", "--compare", str(llama_dir), "--text", str(haystack_file),
                              "--context", "64,128", "--max-windows", "3", "--batch", "2", "--chunk", "48",
                              "--out", str(out)], capsys)
    assert rc == 0, stderr
    report = json.loads((out / "ppl.json").read_text())
    assert [(r["model"], r["context"]) for r in report["results"]] == [("tiny", 64), ("tiny", 128), ("llama0", 64), ("llama0", 128)]
    assert all(r["windows"] == 3 and r["ppl"] > 1 for r in report["results"])
    assert report["results"][0]["tokens_scored"] == 3 * 63
    assert (out / "ppl.png").stat().st_size > 1000 and "| tiny | 128 |" in (out / "ppl.md").read_text()
    assert "| llama0 | 64 |" in stdout
    assert "ppl tiny: 6/6 win (100%)" in stderr  # plain progress lines when stderr is not a terminal


def test_niah_grid(tmp_path, haystack_file, capsys):
    out = tmp_path / "niah"
    rc, stdout, stderr = run(["eval", "niah", "--model", "tiny", "--haystack", str(haystack_file), "--lengths", "256,384",
                              "--depths", "0,100", "--samples", "2", "--max-new-tokens", "3", "--out", str(out)], capsys)
    assert rc == 0, stderr
    report = json.loads((out / "niah.json").read_text())
    grid = report["grids"]["tiny"]
    assert grid["lengths"] == [256, 384] and grid["depths"] == [0, 100]
    assert len(grid["accuracy"]) == 2 and all(len(row) == 2 for row in grid["accuracy"])
    assert len(report["records"]) == 8
    assert all(r["length"] - 3 - 10 <= r["prompt_tokens"] <= r["length"] - 3 for r in report["records"])  # a word
    assert report["models"]["tiny"]["prompt_format"] == "chat template"
    assert (out / "niah.png").stat().st_size > 1000
    assert "depth \\ length" in stdout
    for length, rate in zip(grid["lengths"], grid["samples_per_s"]):  # throughput = samples / their timed seconds
        secs = [r["seconds"] for r in report["records"] if r["length"] == length]
        assert len(secs) == 4 and all(t > 0 for t in secs)
        assert rate == pytest.approx(len(secs) / sum(secs), rel=2e-2)
    assert "| samples/s |" in (out / "niah.md").read_text()


def test_niah_without_chat_template_states_fallback(tmp_path, haystack_file, llama_plain_dir, capsys):
    out = tmp_path / "niah_plain"
    rc, stdout, stderr = run(["eval", "niah", "--model", str(llama_plain_dir), "--haystack", str(haystack_file),
                              "--lengths", "256", "--depths", "50", "--max-new-tokens", "2", "--out", str(out)], capsys)
    assert rc == 0, stderr
    assert "prompts use the plain (no chat template)" in stdout
    report = json.loads((out / "niah.json").read_text())
    assert report["models"]["llama_plain0"]["prompt_format"] == "plain (no chat template)"


def test_ruler_end_to_end(tmp_path, haystack_file, llama_dir, capsys):
    out = tmp_path / "ruler"
    rc, stdout, stderr = run(["eval", "ruler", "--model", "tiny", "--model", str(llama_dir), "--lengths", "1536",
                              "--tasks", "niah_single_2,vt,cwe,fwe", "--samples", "1", "--max-new-tokens", "2",
                              "--haystack", str(haystack_file), "--seed", "7", "--out", str(out)], capsys)
    assert rc == 0, stderr
    report = json.loads((out / "ruler.json").read_text())
    assert {(r["model"], r["task"]) for r in report["results"]} == {
        (m, t) for m in ("tiny", "llama0") for t in ("niah_single_2", "vt", "cwe", "fwe")}
    assert all(0 <= r["score"] <= 100 for r in report["results"])
    assert (out / "ruler.png").stat().st_size > 1000
    assert "| average |" in stdout and "length 1536" in stdout


def test_ruler_without_haystack_skips_essay_tasks(tmp_path, capsys):
    out = tmp_path / "ruler2"
    rc, _, stderr = run(["eval", "ruler", "--model", "tiny", "--lengths", "1536", "--tasks", "niah_single_2,fwe",
                         "--samples", "1", "--max-new-tokens", "1", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, stderr
    report = json.loads((out / "ruler.json").read_text())
    assert report["skipped"] == {"niah_single_2": "needs --haystack (essay)"} and report["tasks"] == ["fwe"]
    rc, _, stderr = run(["eval", "ruler", "--model", "tiny", "--tasks", "niah_single_2", "--out", str(out)], capsys)
    assert rc == 2 and "needs an essay haystack: pass --haystack FILE" in stderr


@pytest.mark.parametrize("argv,message", [
    (["niah", "--lengths", "8X"], "--lengths: cannot read a token count from '8X'"),
    (["niah", "--lengths", "1K,,2K"], "--lengths must be a comma-separated list"),
    (["niah", "--depths", "0,120"], r"--depths must be percents in [0, 100]"),
    (["ruler", "--tasks", "qa_1"], "--tasks: unknown task 'qa_1'"),
    (["ppl", "--context", "2K", "--stride", "4096"], "--stride 4096 is larger than the context 2048"),
])
def test_malformed_flags(argv, message, haystack_file, capsys):
    base = ["--text", str(haystack_file)] if argv[0] == "ppl" else []
    base += ["--haystack", str(haystack_file)] if argv[0] == "niah" else []
    rc, _, stderr = run(["eval", argv[0], "--model", "tiny", *base, *argv[1:]], capsys)
    assert rc == 2 and message in stderr


def test_length_past_max_positions(haystack_file, llama_plain_dir, capsys):
    rc, _, stderr = run(["eval", "niah", "--model", str(llama_plain_dir), "--haystack", str(haystack_file),
                         "--lengths", "256,1K"], capsys)
    assert rc == 2 and "length 1,024 exceeds llama_plain0's max_position_embeddings 512" in stderr
    rc, _, stderr = run(["eval", "ppl", "--model", "tiny", "--text", str(haystack_file), "--context", "8K"], capsys)
    assert rc == 2 and "exceeds tiny's max_position_embeddings 4,096; pass --max-positions" in stderr


def test_dense_model_past_its_window(tmp_path, haystack_file, llama_plain_dir, capsys):
    """--max-positions lets a plain-RoPE dense model run past its window (the teacher side of a past-the-window
    comparison); a RoPE scaled from max_position_embeddings is refused, since a new limit would change the model."""
    out = tmp_path / "past"
    rc, _, stderr = run(["eval", "niah", "--model", str(llama_plain_dir), "--haystack", str(haystack_file),
                         "--lengths", "1K", "--depths", "50", "--max-new-tokens", "2", "--max-positions", "2048",
                         "--out", str(out)], capsys)
    assert rc == 0, stderr
    assert json.loads((out / "niah.json").read_text())["records"][0]["prompt_tokens"] > 512
    scaled = tmp_path / "scaled"
    shutil.copytree(llama_plain_dir, scaled)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(cfg))
    rc, _, stderr = run(["eval", "niah", "--model", str(scaled), "--haystack", str(haystack_file), "--lengths", "1K",
                         "--max-positions", "2048"], capsys)
    assert rc == 2 and "its RoPE ('linear') is scaled from max_position_embeddings 512" in stderr


def test_length_past_memory_plan(haystack_file, capsys, monkeypatch):
    model, _, label = load_eval_model("tiny", "cpu", "float32")
    check_lengths(model.config, label, [4096], sala=True, device=torch.device("cpu"), dtype=torch.float32, budget_gib=8.0)
    import sala.eval.models as models

    def no_load(*a, **k):
        raise AssertionError("the memory plan must refuse before the model is loaded")

    monkeypatch.setattr(models, "load_eval_model", no_load)
    rc, _, stderr = run(["eval", "ppl", "--model", "tiny", "--text", str(haystack_file), "--context", "4K",
                         "--gpu-mem", "0.5"], capsys)
    assert rc == 2 and "length 4,096 x batch 4 does not fit tiny in" in stderr and "lower the length" in stderr


def test_needle_longer_than_context_from_cli(haystack_file, capsys):
    rc, _, stderr = run(["eval", "niah", "--model", "tiny", "--haystack", str(haystack_file), "--lengths", "100"], capsys)
    assert rc == 2 and "niah length 100" in stderr and "does not fit this length" in stderr


def test_empty_haystack_and_text_from_cli(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    rc, _, stderr = run(["eval", "niah", "--model", "tiny", "--haystack", str(empty), "--lengths", "1K"], capsys)
    assert rc == 2 and "is empty" in stderr
    rc, _, stderr = run(["eval", "ppl", "--model", "tiny", "--text", str(empty)], capsys)
    assert rc == 2 and "is empty" in stderr


def test_model_kinds(tmp_path, llama_dir, demo_sala_dir):
    assert model_kind("tiny") == "sala"
    assert model_kind(str(demo_sala_dir)) == "sala"
    assert model_kind(str(llama_dir)) == "hf"
    g = tmp_path / "g"
    g.mkdir()
    (g / "m.gguf").write_bytes(b"GGUF")
    assert model_kind(str(g / "m.gguf")) == "gguf" and model_kind(str(g)) == "gguf"
    (g / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        model_kind(str(g))
    with pytest.raises(ValueError, match="neither a directory, a .gguf file nor a preset"):
        model_kind("no-such-model")
    model, tok, label = load_eval_model(str(demo_sala_dir), "cpu", "float32")
    assert type(model).__name__ == "SALAForCausalLM" and label == demo_sala_dir.name and len(tok) == 500
    model, _, _ = load_eval_model("tiny", "cpu", "float32", max_positions=8192)
    assert model.config.max_position_embeddings == 8192
    dense, _, _ = load_eval_model(str(llama_dir), "cpu", "float32", max_positions=8192)  # plain RoPE: extrapolated
    assert dense.config.max_position_embeddings == 8192
    assert isinstance(next(model.parameters()), torch.Tensor)


@pytest.fixture(scope="module")
def demo_sala_dir(tmp_path_factory):
    from sala.engine.demo import make_demo_checkpoint

    return make_demo_checkpoint(tmp_path_factory.mktemp("sala_demo"), preset="tiny", seed=0)



def test_same_named_models_get_distinct_labels(tmp_path, haystack_file, capsys, monkeypatch):
    from tests.eval.conftest import make_llama_dir

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    a.mkdir(parents=True), b.mkdir(parents=True)
    make_llama_dir(a, seed=1), make_llama_dir(b, seed=2)
    (tmp_path / "tiny").mkdir()  # a directory named like a preset is a path, not the preset
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="has neither a config.json nor a .gguf file"):
        model_kind("tiny")
    out = tmp_path / "out"
    rc, stdout, stderr = run(["eval", "ppl", "--model", str(a), "--model", str(b), "--text", str(haystack_file),
                              "--context", "64", "--max-windows", "1", "--out", str(out)], capsys)
    assert rc == 0, stderr
    rows = json.loads((out / "ppl.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["model", "model#2"] and rows[0]["ppl"] != rows[1]["ppl"]
