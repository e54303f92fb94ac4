"""``sala quantize`` (a checkpoint -> an fp8 checkpoint, round to nearest or GPTQ), ``--quantize fp8`` at load for
generate/chat/serve, the bench's ``sala-fp8`` system, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from sala import cli
from sala.engine.demo import make_demo_checkpoint
from sala.model import SALAForCausalLM
from sala.model.quantize import FP8Linear


@pytest.fixture
def checkpoint(tmp_path):
    return make_demo_checkpoint(tmp_path / "bf", preset="tiny-sparse", seed=1)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _text(tmp_path, words=3000):
    path = tmp_path / "calibration.txt"
    g = torch.Generator().manual_seed(0)
    vocab = ["the", "model", "reads", "long", "context", "and", "answers", "a", "question", "about", "it", "."]
    path.write_text(" ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=g).tolist()))
    return path


@pytest.mark.parametrize("calibrate", [False, True], ids=["rtn", "gptq"])
def test_quantize_writes_a_checkpoint_every_loader_reads(capsys, tmp_path, checkpoint, calibrate):
    out = tmp_path / "fp8"
    extra = ["--calibrate", _text(tmp_path), "--calibration-tokens", 512, "--calibration-length", 128] if calibrate else []
    code, stdout, err = run(capsys, "quantize", "--model", checkpoint, "--out", out, "--group-size", 32, *extra)
    assert code == 0, err
    assert f"fp8 checkpoint written to {out}" in stdout and ("GPTQ on 4 calibration windows" if calibrate
                                                             else "round to nearest") in stdout
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "sala_fp8", "group_size": 32, "modules_to_not_convert": ["lm_head"],
                   "calibrated": calibrate}
    assert (out / "tokenizer.json").exists() and not (checkpoint / "quantization_config").exists()
    model = SALAForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.down_proj) is FP8Linear
    assert model.model.layers[0].mlp.down_proj.weight_scale.shape[1] == -(-model.config.intermediate_size // 32)
    code, text, err = run(capsys, "generate", "--model", out, "--prompt", "The capital of France is", "--max-tokens", 4,
                          "--quiet", "--no-stream")
    assert code == 0 and text.strip(), err


def test_quantize_refusals(capsys, tmp_path, checkpoint):
    out = tmp_path / "fp8"
    assert run(capsys, "quantize", "--model", checkpoint, "--out", out)[0] == 0
    code, _, err = run(capsys, "quantize", "--model", checkpoint, "--out", out)
    assert code != 0 and "is not empty" in err and "--force" in err
    code, _, err = run(capsys, "quantize", "--model", out, "--out", tmp_path / "again")
    assert code != 0 and "is quantised already (sala_fp8, group_size 128, round to nearest)" in err
    code, _, err = run(capsys, "quantize", "--model", checkpoint, "--out", checkpoint)
    assert code != 0 and "must differ from --model" in err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run(capsys, "quantize", "--model", checkpoint, "--out", tmp_path / "x", "--calibrate", short)
    assert code != 0 and "fewer than one window of 2048" in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_:
        run(capsys, "quantize", "--model", checkpoint, "--out", tmp_path / "x", "--group-size", 48)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--group-size: must be 0 (row-wise) or a power of two from 32 to 1024; got 48" in err
    code, _, err = run(capsys, "quantize", "--model", checkpoint, "--out", tmp_path / "x", "--calibrate", short,
                       "--calibration-tokens", 100, "--calibration-length", 128)
    assert code != 0 and "less than one window" in err


def test_quantize_flag_at_load(caplog, checkpoint):
    from sala.engine.commands import GenerateConfig, _load

    plain, _ = _load(GenerateConfig(model=str(checkpoint), threads=1), str(checkpoint))
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    model, _ = _load(GenerateConfig(model=str(checkpoint), threads=1, quantize="fp8", fp8_group_size=0), str(checkpoint))
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is FP8Linear and q.group_size is None and q.weight_scale.shape == (q.out_features,)
    model, _ = _load(GenerateConfig(model=str(checkpoint), threads=1, quantize="fp8"), str(checkpoint))
    assert model.model.layers[0].self_attn.q_proj.group_size == 128


def test_check_weights_sees_nan_fp8_codes(checkpoint, tmp_path, capsys):
    """float8_e4m3fn has NaN codes (0x7F) and no isfinite kernel: the check reads them as floats."""
    out = tmp_path / "fp8"
    assert run(capsys, "quantize", "--model", checkpoint, "--out", out)[0] == 0
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(str(path))
    w = tensors["model.layers.1.mlp.up_proj.weight"]
    w.view(torch.uint8)[0, 0] = 0x7F
    save_file(tensors, str(path), metadata={"format": "pt"})
    code, _, err = run(capsys, "generate", "--model", out, "--prompt", "hi", "--max-tokens", 2, "--check-weights")
    assert code != 0 and "model.layers.1.mlp.up_proj.weight (1 of" in err


def test_bench_fp8_system(tmp_path):
    from sala.engine.bench import E2EConfig, build_system

    cfg = E2EConfig(shape="tiny", contexts="256", systems="sala,dense", quantize="fp8", device="cpu",
                    out=str(tmp_path / "e2e"))
    assert cfg.system_list == ["sala-fp8", "dense"]
    dev = torch.device("cpu")
    bf, info_bf = build_system("sala", cfg, dev, torch.bfloat16)
    fp8, info_fp8 = build_system("sala-fp8", cfg, dev, torch.bfloat16)
    assert type(fp8.model.layers[0].mlp.up_proj) is FP8Linear and type(bf.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert 0.4 < info_fp8["weight_read_bytes"] / info_bf["weight_read_bytes"] < 0.75  # fp8 codes + scales + bf16 head
    with pytest.raises(ValueError, match="--quantize takes fp8"):
        E2EConfig(quantize="int4")
    with pytest.raises(ValueError, match="already lists sala-fp8"):
        E2EConfig(quantize="fp8", systems="sala,sala-fp8")


def test_warmup_command_reports_cold_and_warm(capsys, checkpoint):
    code, out, err = run(capsys, "warmup", "--model", checkpoint, "--prompt-tokens", 96, "--decode-tokens", 4,
                         "--threads", 1)
    assert code == 0, err
    assert "prompt 96 tokens: first request TTFT" in out and "warm" in out and "x warm" in out
    code, _, err = run(capsys, "warmup", "--model", checkpoint, "--prompt-tokens", 96, "--context", 64)
    assert code != 0 and "--context 64 is shorter than --prompt-tokens 96" in err


def test_serve_warmup_default():
    from sala.engine.commands import serve_warmup_tokens

    assert serve_warmup_tokens(None, 8192, 32768, cuda=True) == 8192
    assert serve_warmup_tokens(None, 8192, 32768, cuda=False) == 0
    assert serve_warmup_tokens(0, 8192, 32768, cuda=True) == 0
    assert serve_warmup_tokens(None, 8192, 4096, cuda=True) == 4096 - 9  # room for the decoded tokens
    assert serve_warmup_tokens(100, 8192, 4096, cuda=False) == 100
