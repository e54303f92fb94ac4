"""``sala`` CLI: flags reach the commands, outputs and exit codes, errors without tracebacks."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from sala import cli


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_subcommand():
    text = cli.build_parser().format_help()
    for name in ("info", "plan", "generate", "chat", "serve", "bench"):
        assert name in text
    assert set(cli.COMMANDS) >= {"info", "plan", "generate", "chat", "serve", "bench"} and "e2e" in cli.BENCH_COMMANDS


def test_info(capsys):
    code, out, _ = run(capsys, "info", "--model", "minicpm-sala-9b")
    assert code == 0 and "torch" in out and "9,477,203,968 parameters" in out and "SLLLLLLLLSLLLLLLSSLLLLSLLLLLLSSS" in out


def test_plan(capsys):
    code, out, _ = run(capsys, "plan", "--model", "minicpm-sala-9b", "--context", "1M", "--batch", "1", "--gpu-mem", "80")
    assert code == 0 and "17.65 GiB" in out and "8.00 GiB" in out and "fits" in out and "largest context" in out
    code, out, _ = run(capsys, "plan", "--model", "minicpm-sala-9b", "--context", "1M", "--batch", "16", "--gpu-mem", "80")
    assert code == 1 and "DOES NOT FIT" in out
    code, _, err = run(capsys, "plan", "--model", "nonexistent-model")
    assert code == 2 and "neither a checkpoint directory nor a preset" in err
    code, _, err = run(capsys, "plan", "--model", "tiny", "--context", "lots")
    assert code == 2 and "cannot read a token count" in err


def test_generate_demo(capsys):
    code, out, err = run(capsys, "generate", "--demo", "--max-tokens", "8", "--prompt", "Hello")
    assert code == 0 and out.endswith("\n")
    assert "TTFT" in err and "tok/s" in err and "8 tokens" in err


def test_generate_from_directory_and_file(capsys, tmp_path):
    from sala.engine.demo import make_demo_checkpoint

    d = make_demo_checkpoint(tmp_path / "ckpt", preset="tiny")
    (tmp_path / "prompt.txt").write_text("The capital of France is")
    args = ["generate", "--model", str(d), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-tokens", "6", "--chunk", "4", "--quiet"]
    code, streamed, err = run(capsys, *args)
    assert code == 0 and err == ""
    code, whole, _ = run(capsys, *args, "--no-stream")
    assert whole == streamed  # greedy, same text either way


def test_generate_errors(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", "tiny")
    assert code == 2 and "--prompt TEXT or --prompt-file FILE is required" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi")
    assert code == 2 and "--model DIR|PRESET is required" in err
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "has no config.json" in err
    (tmp_path / "config.json").write_text('{"model_type": "minicpm_sala"}')
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "has no tokenizer" in err
    code, _, err = run(capsys, "generate", "--demo", "--prompt", "hi", "--context", "16", "--max-tokens", "100")
    assert code == 2 and "exceeds the context capacity of 16" in err


def test_chat_multi_turn(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nHow are you?\n/exit\n"))
    code, out, err = run(capsys, "chat", "--demo", "--max-tokens", "5", "--think", "hide", "--system", "Be brief.")
    assert code == 0 and err.count("TTFT") == 2 and out.count("\n") >= 2


def test_bench_e2e_cli(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "e2e", "--shape", "tiny", "--contexts", "64", "--decode-steps", "1", "--decode-batch", "2",
                       "--systems", "sala,dense", "--device", "cpu", "--out", str(tmp_path))
    assert code == 0 and "| sala | 64 | ok |" in out and (tmp_path / "e2e.png").exists()


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-c", "import sys; from sala.cli import main; sys.exit(main(['--help']))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout


def test_decode_attention_flag(capsys, monkeypatch):
    """--decode-attention reaches the engine (fused/eager/auto; "pieces", eager's old name, and --fused-decode stay
    aliases), bad values exit 2."""
    from sala.engine.types import EngineConfig, fused_flag

    parser = cli.build_parser()
    for argv, want in ((["--decode-attention", "eager"], "eager"), (["--decode-attention", "pieces"], "pieces"),
                       (["--fused-decode"], "fused"), ([], "auto")):
        assert parser.parse_args(["generate", "--demo", "--prompt", "x", *argv]).decode_attention == want
    assert [fused_flag(m) for m in ("auto", "fused", "eager", "pieces")] == [None, True, False, False]
    with pytest.raises(ValueError, match="decode attention must be one of"):
        fused_flag("graph")
    with pytest.raises(ValueError, match="fused_attention must be True, False or None"):
        EngineConfig(fused_attention="yes")
    from sala.engine.runner import ModelRunner

    runners, init = [], ModelRunner.__init__
    monkeypatch.setattr(ModelRunner, "__init__", lambda self, *a, **kw: runners.append(self) or init(self, *a, **kw))
    for mode, fused in (("fused", True), ("eager", False)):
        code, out, err = run(capsys, "generate", "--demo", "--prompt", "Hi", "--max-tokens", "4", "--decode-attention", mode, "--quiet")
        assert code == 0 and out.strip()
        assert len(runners) == 1 and runners.pop().fused is fused  # the engine's runner decodes as asked
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["generate", "--demo", "--prompt", "x", "--decode-attention", "graph"])
    assert e.value.code == 2
