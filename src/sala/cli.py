"""``sala`` command line: flags -> a config dataclass -> one call per subcommand. No logic lives here.

Subcommands are registered in ``COMMANDS`` (name -> help, flag builder, runner); ``sala bench`` has its own
table ``BENCH_COMMANDS``. Add a subcommand by writing its two small functions and one table entry.

Each flag builder ends with ``_from_config(p, SomeConfig)``: the config dataclass is the only place defaults are
written (a flag's ``default=`` that disagrees is an error), a flag without ``help=`` shows the field's docstring, and a
field without a flag is an error when the parser is built (:mod:`sala.utils.fields`).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from typing import Callable

from sala.utils.fields import config_from_args as _fill  # flags -> config dataclass
from sala.utils.fields import flags_from_config as _from_config  # config dataclass -> flags' defaults and help


# ---- flag value types: nonsense is refused while parsing, with one line naming the flag and what it expects -----
def _int_from(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def _float_above(lo: float, inclusive: bool = False, hi: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value >= lo if inclusive else value > lo) and (hi is None or value <= hi)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text.strip()


_POSITIVE = _int_from(1)
_NON_NEGATIVE = _int_from(0)
_PORT = _int_from(1, 65535)
_GIB = _float_above(0.0)


# ---- shared flag groups -----------------------------------------------------------------------------------------
def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint directory or preset (minicpm-sala-9b, tiny, tiny-sparse, small: random weights)")
    g.add_argument("--demo", action="store_true", help="build a tiny random checkpoint with the bundled tokenizer and use it "
                                                       "(--model then names the preset, default tiny)")
    g.add_argument("--device", type=_device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
    g.add_argument("--seed", type=int, help="seed of random (preset/demo) weights")
    g.add_argument("--threads", type=_POSITIVE, help="CPU threads for torch (default: the usable CPUs minus one, 1-8, or "
                                                "SALA_NUM_THREADS; 1 with --demo)")
    g.add_argument("--check-weights", action="store_true", help="refuse a checkpoint with NaN/inf weights at load "
                                                                "(reads every weight once)")
    _quantize_flags(g)


def _fp8_group_size(text: str) -> int:
    from sala.ops.fp8 import GROUP_SIZES

    value = _NON_NEGATIVE(text)
    if value and value not in GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"must be 0 (row-wise) or a power of two from 32 to 1024; got {value}")
    return value


def _quantize_flags(g) -> None:
    g.add_argument("--quantize", choices=("fp8",))  # help and defaults: the fields of ModelOptions
    g.add_argument("--fp8-group-size", type=_fp8_group_size)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--context", help="tokens per sequence, e.g. 32K or 1M (default: what the prompt needs)")
    g.add_argument("--batch", type=_POSITIVE, help="sequence slots decoding together")
    g.add_argument("--chunk", type=_POSITIVE, help="prefill chunk in tokens")
    g.add_argument("--gpu-mem", type=_GIB, help="memory budget in GiB (default: the GPU's memory)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    _decode_attention_flag(g)


def _decode_attention_flag(g) -> None:
    g.add_argument("--decode-attention", choices=["auto", "fused", "eager", "pieces"],
                   help="sparse-layer decode attention: fused (one batched kernel; the whole step one CUDA graph per "
                        "batch bucket) or eager (row by row, no CUDA graph; 'pieces' is its old name); auto = fused "
                        "on CUDA, eager on CPU")
    g.add_argument("--fused-decode", dest="decode_attention", action="store_const", const="fused",
                   help=argparse.SUPPRESS)  # the earlier spelling of --decode-attention fused


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=_POSITIVE)  # defaults and help: the fields of SamplingOptions
    g.add_argument("--temperature", type=_float_above(0.0, inclusive=True))
    g.add_argument("--top-p", type=_float_above(0.0, hi=1.0))
    g.add_argument("--top-k", type=_NON_NEGATIVE)
    g.add_argument("--repetition-penalty", type=_float_above(0.0))
    g.add_argument("--stop", action="append")
    g.add_argument("--sample-seed", type=int)
    g.add_argument("--ignore-eos", action="store_true")


# ---- subcommands: flags + runner --------------------------------------------------------------------------------
def _commands():
    import sala.engine.commands

    return sala.engine.commands


def _demo_flags(p):
    from sala.convert import parse_layers

    p.add_argument("--model", help="your own dense model (HF directory, .gguf, or a directory holding one): converted and "
                                   "compared, untrained unless --delta (default: SmolLM2-135M-Instruct + the bundled delta)")
    p.add_argument("--delta", help="LoRA delta directory from sala train (<run>/delta), or 'none' for the untrained "
                                   "conversion (default: the bundled one, when present)")
    p.add_argument("--conversion", help="conversion.json the delta's base was made with (default: beside the delta)")
    p.add_argument("--sparse-layers", type=parse_layers, help="with --model: softmax layers (default: a quarter, "
                                                              "first and last included)")
    p.add_argument("--quick", action="store_true", help="tiny lengths, few samples (CI): under a minute once cached")
    p.add_argument("--device", type=_device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
    p.add_argument("--threads", type=_POSITIVE, help="CPU threads for torch (default: the usable CPUs minus one, 1-8, or "
                                                "SALA_NUM_THREADS)")
    p.add_argument("--lengths", help="NIAH context lengths, inside and past an 8K window by default")
    p.add_argument("--depths", help="NIAH needle depths in percent")
    p.add_argument("--samples", type=_POSITIVE, help="needles per NIAH cell")
    p.add_argument("--chat-prompts", type=_int_from(1, 3), help="built-in chat prompts to answer, 1-3")
    p.add_argument("--max-new-tokens", type=_POSITIVE, help="tokens per chat answer")
    p.add_argument("--time-contexts", help="speed/memory sweep contexts")
    p.add_argument("--prefill-max", help="longest context prefilled from real text; longer ones time decode on random "
                                         "caches")
    p.add_argument("--decode-steps", type=_POSITIVE, help="timed decode steps per context")
    p.add_argument("--time-budget", type=_float_above(0.0), help="seconds the sweep may spend prefilling; later "
                                                                 "contexts time decode on random caches")
    p.add_argument("--ppl-context", help="window of the held-out perplexity")
    p.add_argument("--ppl-windows", type=_POSITIVE, help="held-out windows per model")
    p.add_argument("--text", help="text for haystack, perplexity and prefill (default: the held-out corpus)")
    p.add_argument("--chunk", type=_POSITIVE)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="report folder: report.md, demo.json and the PNGs")
    p.add_argument("--force", action="store_true", help="write into an --out holding other files (they are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress display; the summary table is still printed")
    from sala.demo.config import FULL, QUICK, DemoConfig

    _from_config(p, DemoConfig)
    for a in p._actions:  # fields left None take the full demo's value, or --quick's: say both, from the one table
        if a.dest in FULL:
            a.help += f" (default {FULL[a.dest]:g}" if isinstance(FULL[a.dest], float) else f" (default {FULL[a.dest]}"
            a.help += f"; --quick {QUICK[a.dest]:g})" if isinstance(QUICK[a.dest], float) else f"; --quick {QUICK[a.dest]})"


def _demo(args):
    from sala.demo import run_demo
    from sala.demo.config import DemoConfig

    run_demo(_fill(DemoConfig, args))
    return 0


def _info_flags(p):
    p.add_argument("--model")
    _from_config(p, _commands().InfoConfig)


def _info(args):
    from sala.engine.commands import InfoConfig, run_info

    return run_info(_fill(InfoConfig, args))


def _plan_flags(p):
    p.add_argument("--model", required=True, help="checkpoint directory or preset")
    p.add_argument("--context")
    p.add_argument("--batch", type=_POSITIVE)
    p.add_argument("--chunk", type=_POSITIVE)
    p.add_argument("--gpu-mem", type=_GIB)
    p.add_argument("--dtype")
    _from_config(p, _commands().PlanConfig)


def _plan(args):
    from sala.engine.commands import PlanConfig, run_plan

    return run_plan(_fill(PlanConfig, args))


def _generate_flags(p):
    _model_flags(p)
    _engine_flags(p)
    _sampling_flags(p)
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _from_config(p, _commands().GenerateConfig)


def _generate(args):
    from sala.engine.commands import GenerateConfig, run_generate

    return run_generate(_fill(GenerateConfig, args))


def _chat_flags(p):
    _model_flags(p)
    _engine_flags(p)
    _sampling_flags(p)
    p.add_argument("--system")
    p.add_argument("--think", choices=("show", "strip", "hide"),
                   help="<think> blocks: show (print, keep in history), strip (print, drop from history), hide")
    _from_config(p, _commands().ChatConfig)


def _chat(args):
    from sala.engine.commands import ChatConfig, run_chat

    return run_chat(_fill(ChatConfig, args))


def _serve_flags(p):
    _model_flags(p)
    _engine_flags(p)
    p.add_argument("--host")
    p.add_argument("--port", type=_PORT)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in the process list: prefer "
                                     "--api-key-file or SALA_API_KEY); docs pages are off when a key is set")
    p.add_argument("--api-key-file", help="read the API key from this file's first line")
    p.add_argument("--shutdown-timeout", type=_float_above(0.0, inclusive=True),
                   help="seconds in-flight requests get to finish after SIGTERM / Ctrl-C")
    p.add_argument("--served-model-name")
    p.add_argument("--max-request-bytes", type=_POSITIVE)
    p.add_argument("--log-level")
    p.add_argument("--warmup-tokens", type=_NON_NEGATIVE)
    _from_config(p, _commands().ServeConfig)


def _serve(args):
    from sala.engine.commands import ServeConfig, run_serve

    return run_serve(_fill(ServeConfig, args))


def _warmup_flags(p):
    _model_flags(p)
    _engine_flags(p)
    p.add_argument("--prompt-tokens")  # help and defaults: the fields of WarmupConfig
    p.add_argument("--decode-tokens", type=_POSITIVE)
    _from_config(p, _commands().WarmupConfig)


def _warmup(args):
    c = _commands()
    return c.run_warmup(_fill(c.WarmupConfig, args))


def _bench_e2e_flags(p):
    p.add_argument("--shape", choices=("released", "smollm2", "small", "tiny"),
                   help="model shapes: released (SALA-9B vs Qwen3-8B), smollm2 (SmolLM2-135M's hybrid vs SmolLM2 "
                        "itself, the CPU comparison), or small/tiny for smoke runs")
    p.add_argument("--contexts", help="comma-separated prompt lengths (default 32K,64K,128K,256K,512K,1M on a GPU, "
                                      "1K,4K,8K,16K,32K on a CPU)")
    p.add_argument("--layers", type=_POSITIVE, help="override the number of layers")
    p.add_argument("--decode-steps", type=_POSITIVE, help="timed decode steps (default 32 on a GPU, 8 on a CPU)")
    p.add_argument("--decode-batch", type=_POSITIVE, help="the larger decode batch (default 8 on a GPU, 1 on a CPU)")
    p.add_argument("--chunk", type=_POSITIVE)
    p.add_argument("--systems", help="comma-separated subset of sala, sala-fp8, dense, hf")
    p.add_argument("--quantize", choices=("fp8",))
    p.add_argument("--fp8-group-size", type=_fp8_group_size)
    p.add_argument("--device", type=_device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
    p.add_argument("--gpu-mem", type=_GIB)
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    _decode_attention_flag(p)
    p.add_argument("--threads", type=_POSITIVE, help="CPU threads for torch (default: usable CPUs minus one, 1-8)")
    p.add_argument("--decode-only", action="store_true",
                   help="skip the prefill (random caches of the context's length) and time decode only; no TTFT")
    p.add_argument("--seed", type=int, help="seed of the random weights and prompts")
    p.add_argument("--out", help="directory for e2e.json / e2e.md / e2e.png")
    from sala.engine.bench import E2EConfig

    _from_config(p, E2EConfig)


def _bench_e2e(args):
    from sala.engine.bench import E2EConfig, run_e2e

    run_e2e(_fill(E2EConfig, args))
    return 0


def _select_option_flags(p: argparse.ArgumentParser) -> None:
    """Flags of HALO layer selection, shared by ``select-layers`` and ``convert --select auto``."""
    g = p.add_argument_group("layer selection (HALO)")
    g.add_argument("--text", dest="text_files", action="append", help="text file for the LM probe and for convert --verify's held-out "
                   "perplexity (repeatable; its tail is held out; default: built-in text, or for --verify the "
                   "project's held-out corpus when built)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the source's)")
    g.add_argument("--sparse-fraction", type=float)  # defaults and help: the fields of SelectConfig
    g.add_argument("--num-sparse", type=int)
    g.add_argument("--no-force-first-last", dest="force_first_last", action="store_false",
                   help="do not force the first and last layers to stay softmax")
    g.add_argument("--steps", type=_POSITIVE)
    g.add_argument("--batch-size", type=_POSITIVE)
    g.add_argument("--seq-len", type=_POSITIVE)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--probe-len", type=int)
    g.add_argument("--recall-samples", type=int)
    g.add_argument("--recall-queries", type=int)
    g.add_argument("--lm-windows", type=int)
    g.add_argument("--eval-fraction", type=float)
    g.add_argument("--probe-batch-size", type=int)
    g.add_argument("--recall-metric", choices=("logprob", "accuracy"))
    g.add_argument("--eps", type=float)
    g.add_argument("--score-cap", type=float)
    g.add_argument("--compute-dtype")
    g.add_argument("--save-students", action="store_true", help="also write aligned_students.safetensors")


def _select_layers_flags(p):
    p.add_argument("--from", dest="source", required=True,
                   help="dense HF checkpoint directory, a .gguf file, or a directory holding one .gguf")
    p.add_argument("--out", help="directory for layer_selection.json / .png")
    p.add_argument("--force", action="store_true", help="write into an --out holding other files (they are kept)")
    _select_option_flags(p)
    p.add_argument("--z-proj-init", choices=("random", "zeros"))
    p.add_argument("--seed", type=int)
    p.add_argument("--device", type=_device)
    p.add_argument("--quiet", action="store_true")
    from sala.convert import SelectConfig

    _from_config(p, SelectConfig)


def _select_layers(args):
    from sala.convert import SelectConfig, run_select_layers

    print(run_select_layers(_fill(SelectConfig, args)).summary())
    return 0


def _convert_flags(p):
    from sala.convert import parse_layers

    p.add_argument("--from", dest="source", required=True,
                   help="dense HF checkpoint directory (Llama, Mistral, Qwen2, Qwen3, MiniCPM), a .gguf file (llama, "
                        "mistral, qwen2, qwen3; dequantised once into a cache: SALA_CACHE_DIR, default ~/.cache/sala), "
                        "or a directory holding one .gguf")
    p.add_argument("--out", required=True, help="output directory (official SALA format)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sparse-layers", type=parse_layers, help="layers kept as softmax, e.g. 0,9,16,17,22,29,30,31")
    which.add_argument("--select", choices=("auto",), help="auto: run HALO layer selection first")
    p.add_argument("--students", help="aligned_students.safetensors from select-layers --save-students")
    p.add_argument("--no-aligned-students", dest="use_aligned_students", action="store_false",
                   help="with --select auto, plain inheritance instead of the aligned students")
    p.add_argument("--verify", action="store_true",
                   help="identity check against the source (the weight mapping), then load and run the result and "
                        "compare its held-out perplexity with the source's (text: --text, default built-in)")
    p.add_argument("--verify-tolerance", type=_float_above(0.0))
    p.add_argument("--z-proj-init", choices=("random", "zeros"))
    p.add_argument("--o-gate-init", choices=("compensated", "random"))
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: the source's)")
    p.add_argument("--untie-embeddings", action="store_true")
    p.add_argument("--max-shard-size")
    p.add_argument("--context", help="max_position_embeddings of the hybrid, e.g. 32K, 1M or 131072 (default: the source's)")
    p.add_argument("--device", type=_device)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (files sala wrote there are "
                                                        "replaced, others kept; refused otherwise)")
    p.add_argument("--check-weights", action=argparse.BooleanOptionalAction,
                   help="refuse to write NaN/inf tensors (default on)")
    _select_option_flags(p)
    from sala.convert import ConvertConfig, SelectConfig

    _from_config(p, ConvertConfig)
    _from_config(p, SelectConfig)  # --select auto


def _convert(args):
    from sala.convert import ConvertConfig, SelectConfig, run_convert

    selection = None
    if args.select == "auto":
        selection = _fill(SelectConfig, args)
        selection.out = None  # the report goes into the output folder (its temporary sibling while written)
    cfg = _fill(ConvertConfig, args)
    cfg.selection = selection
    print(run_convert(cfg).summary())
    return 0


def _quantize_cmd_flags(p):
    p.add_argument("--model", required=True)  # help and defaults: the fields of QuantizeConfig
    p.add_argument("--out", required=True)
    p.add_argument("--group-size", type=_fp8_group_size)
    p.add_argument("--calibrate")
    p.add_argument("--calibration-tokens", type=_POSITIVE)
    p.add_argument("--calibration-length", type=_POSITIVE)
    p.add_argument("--skip", action="append")
    p.add_argument("--device", type=_device)
    p.add_argument("--force", action="store_true")
    p.add_argument("--check-weights", action=argparse.BooleanOptionalAction)
    from sala.engine.quantize import QuantizeConfig

    _from_config(p, QuantizeConfig)


def _quantize_cmd(args):
    from sala.engine.quantize import QuantizeConfig, run_quantize

    print(run_quantize(_fill(QuantizeConfig, args)).summary())
    return 0


def _eval_flags(p):
    from sala.eval.cli import add_eval_subcommands  # flags and runners of ppl | niah | ruler live in the eval room

    add_eval_subcommands(p)


def _train_flags(p):
    from sala.train.cli import add_train_flags  # flags mirror TrainConfig; they live in the train room

    add_train_flags(p)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

BENCH_COMMANDS: dict[str, Command] = {
    "demo": ("a real dense model beside its SALA hybrid: chat, needle in a haystack, perplexity, speed and memory "
             "vs context; writes a report folder (CPU: a few minutes)", _demo_flags, _demo),
    "e2e": ("end-to-end TTFT / decode / memory vs context: sala vs dense baseline vs transformers", _bench_e2e_flags, _bench_e2e),
}


def _bench_flags(p):
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, (help_, flags, run) in BENCH_COMMANDS.items():
        q = sub.add_parser(name, help=help_, description=help_)
        flags(q)
        q.set_defaults(func=run)


COMMANDS: dict[str, Command] = {
    "demo": ("a real dense model beside its SALA hybrid: chat, needle in a haystack, perplexity, speed and memory "
             "vs context; writes a report folder (CPU: a few minutes)", _demo_flags, _demo),
    "info": ("versions, device, op backend; --model: config summary", _info_flags, _info),
    "plan": ("memory plan (weights / KV / state / activations) and whether it fits", _plan_flags, _plan),
    "generate": ("generate from a prompt, streaming, with TTFT and tokens/s", _generate_flags, _generate),
    "chat": ("multi-turn chat with the tokenizer's chat template", _chat_flags, _chat),
    "serve": ("OpenAI-compatible HTTP server (completions, chat, SSE streaming)", _serve_flags, _serve),
    "warmup": ("compile the kernels a model needs and fill the tuning cache; prints the first request's TTFT (cold) "
               "next to a warm one", _warmup_flags, _warmup),
    "convert": ("dense Transformer checkpoint -> SALA hybrid (weight inheritance, HyPE, optional HALO selection)", _convert_flags, _convert),
    "select-layers": ("HALO layer selection: which layers stay softmax", _select_layers_flags, _select_layers),
    "quantize": ("SALA checkpoint -> FP8 checkpoint (e4m3 weights, fp32 scales; round to nearest or GPTQ with "
                 "--calibrate)", _quantize_cmd_flags, _quantize_cmd),
    "bench": ("benchmarks", _bench_flags, None),
    "train": ("train a converted hybrid with a staged recipe (align -> distil -> long context / SFT); torchrun for "
              "several GPUs", _train_flags, None),
    "eval": ("long-context quality: perplexity, needle in a haystack, RULER; models side by side", _eval_flags, None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sala", description="MiniCPM-SALA long-context models: inference, serving, tools.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info logs, -vv debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, flags, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        flags(p)
        if run is not None:
            p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input (flags, files, requests, plans): message, not traceback
        if args.verbose >= 2:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an EngineError (e.g. non-finite logits) or a bug: one line, the traceback with -vv
        from sala.engine.types import EngineError

        if args.verbose >= 2:
            raise
        if isinstance(e, EngineError):
            print(f"error: {e}", file=sys.stderr)
        else:
            logging.getLogger("sala").debug("unexpected error", exc_info=True)
            print(f"error: {type(e).__name__}: {e} (unexpected; run with -vv for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
