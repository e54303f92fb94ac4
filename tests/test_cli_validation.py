"""Issue 17 item 9: nonsense flag values are refused with one line naming the flag and what it expects (exit 2),
never a traceback or a silent exit 0; unexpected failures are one line too (exit 1, traceback with -vv)."""

from __future__ import annotations

import pytest

from sala import cli


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "tiny", "--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["generate", "--model", "tiny", "--threads", "-2"], "argument --threads: expected a whole number >= 1, got -2"),
    (["serve", "--model", "tiny", "--port", "70000"], "argument --port: expected a whole number in [1, 65535], got 70000"),
    (["plan", "--model", "tiny", "--gpu-mem", "inf"], "argument --gpu-mem: expected a finite number > 0, got inf"),
    (["plan", "--model", "tiny", "--gpu-mem", "-5"], "argument --gpu-mem: expected a finite number > 0, got -5"),
    (["serve", "--model", "tiny", "--max-request-bytes", "-1"], "argument --max-request-bytes: expected a whole number >= 1"),
    (["bench", "e2e", "--decode-steps", "0"], "argument --decode-steps: expected a whole number >= 1, got 0"),
    (["generate", "--model", "tiny", "--max-tokens", "-3"], "argument --max-tokens: expected a whole number >= 1, got -3"),
    (["generate", "--model", "tiny", "--temperature", "nan"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "--model", "tiny", "--top-p", "1.5"], "argument --top-p: expected a finite number > 0 and <= 1"),
    (["generate", "--model", "tiny", "--batch", "x"], "argument --batch: expected a whole number, got 'x'"),
    (["demo", "--chat-prompts", "4"], "argument --chat-prompts: expected a whole number in [1, 3], got 4"),
])
def test_nonsense_flags_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"sala {argv[0]}")


def test_bad_device_string_from_the_api_is_a_value_error():
    from sala.engine.loader import resolve_device

    with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        resolve_device("tpu")


def test_unexpected_error_is_one_line(capsys, monkeypatch):
    import sala.engine.commands as commands

    def broken(cfg, out=None):
        raise KeyError("boom")

    monkeypatch.setattr(commands, "run_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: KeyError: 'boom' (unexpected; run with -vv for the traceback)"
    with pytest.raises(KeyError):
        cli.main(["-vv", "info"])


def test_nan_weights_make_generate_fail_not_print_nothing(capsys, tmp_path):
    """Before: a checkpoint with NaN weights loaded and ``generate`` exited 0 with empty output."""
    from safetensors.torch import load_file, save_file

    from sala.engine.demo import make_demo_checkpoint

    d = make_demo_checkpoint(tmp_path / "nan", preset="tiny", seed=0)
    [f] = list(d.glob("*.safetensors"))
    t = load_file(str(f))
    t["model.norm.weight"][:] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    rc = cli.main(["generate", "--model", str(d), "--device", "cpu", "--prompt", "hello", "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite logits" in err and "Traceback" not in err
    rc = cli.main(["generate", "--model", str(d), "--device", "cpu", "--prompt", "hello", "--check-weights"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.norm.weight (64 of 64 values)" in err


def test_folder_without_config_is_not_the_9b_defaults(capsys, tmp_path):
    """Issue 17 item 6. Before: ``plan``/``info`` on a folder without config.json reported 9.48B parameters, exit 0."""
    for cmd in (["plan", "--model", str(tmp_path)], ["info", "--model", str(tmp_path)]):
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path} has no config.json, so it is not a checkpoint directory" in err
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    assert cli.main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # issue 14 item 6: says what the folder is and what to run
    assert "this is a llama checkpoint (model_type 'llama')" in err and "run sala convert --from DIR" in err


def test_demo_refuses_a_folder_with_other_files_before_any_work(capsys, tmp_path):
    """Issue 17: the demo wrote into --out whatever it held; now a folder with files sala did not write needs
    --force, checked before minutes of work."""
    (tmp_path / "notes.txt").write_text("mine\n")
    assert cli.main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "not empty (1 entries: notes.txt)" in err and "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
