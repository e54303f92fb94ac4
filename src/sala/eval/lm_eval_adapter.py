"""lm-evaluation-harness model class ``sala``: any model ``sala eval`` loads (SALA checkpoint or preset, dense HF
directory, GGUF file) behind the harness's three request types. Importing this module registers it (it needs
the ``eval`` extra: ``pip install 'sala[eval]'``). The harness has no plugin entry point for models, so run it
through this module, which registers the class and hands the command line to the harness::

    python -m sala.eval.lm_eval_adapter --model sala --model_args pretrained=DIR,dtype=bfloat16 \\
        --tasks hellaswag --include_path my_tasks/

or from Python: ``import sala.eval.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="sala", ...)``.

Model args: ``pretrained`` (required), ``device``, ``dtype``, ``max_length`` (default: the model's
max_position_embeddings), ``chunk`` (prefill chunk, default 2048), ``seed`` (preset weights),
``max_positions`` (raise a SALA model's RoPE limit). Requests run one at a time; long ones go through the
model's cache ``chunk`` tokens at a time, so a 1M-token context needs no full-length logits.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sala.eval.models import eos_ids, greedy_generate, load_eval_model, model_device, prefill_chunks
from sala.eval.models import max_positions as position_limit
from sala.eval.progress import Progress

logger = logging.getLogger(__name__)


@register_model("sala")
class SalaLM(TemplateLM):
    """lm-eval ``--model sala --model_args pretrained=DIR|FILE.gguf|PRESET``."""

    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
                 chunk: int = 2048, seed: int = 0, max_positions: int | None = None, batch_size: Any = 1, **kwargs) -> None:
        super().__init__()
        if kwargs:
            logger.warning("sala: ignoring model args %s", sorted(kwargs))
        self.model, self.tokenizer, self.label = load_eval_model(
            pretrained, device, dtype, seed=int(seed), max_positions=int(max_positions) if max_positions else None)
        limit = position_limit(self.model)
        self._max_length = int(max_length) if max_length else (limit or 2048)
        if limit is not None and self._max_length > limit:
            raise ValueError(f"max_length {self._max_length} exceeds {self.label}'s max_position_embeddings {limit}")
        self.chunk = int(chunk)
        self._device = model_device(self.model)
        self.stop_ids = eos_ids(self.model, self.tokenizer)

    # ---- tokenizer --------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else min(self.stop_ids))

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.label).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ---- scoring ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log P(continuation | context) and whether greedy decoding would produce it; the inputs are cut on the
        left to ``max_length`` tokens."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        inp = torch.tensor([whole[:-1]], dtype=torch.long, device=self._device)  # [1, T]
        n, T = len(continuation), len(whole) - 1
        first = T - n  # the logits at positions first .. T-1 predict the continuation
        picked = []
        for start, logits in prefill_chunks(self.model, inp, self.chunk):  # [1, t, V]
            lo = max(first, start)
            if lo < start + logits.shape[1]:
                picked.append(logits[0, lo - start :])
        logp = F.log_softmax(torch.cat(picked), dim=-1)  # [n, V]
        target = torch.tensor(continuation, device=self._device)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        with Progress(len(requests), "loglikelihood", unit="req", quiet=disable_tqdm) as bar:
            for key, context, continuation in requests:
                out.append(self._score(list(context), list(continuation)))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, out[-1])
                bar.update()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        with Progress(len(requests), "loglikelihood_rolling", unit="req", quiet=disable_tqdm) as bar:
            for req in requests:
                (text,) = req.args
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))
                total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
                bar.update()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        with Progress(len(requests), "generate_until", unit="req", quiet=disable_tqdm) as bar:
            for req in requests:
                context, gen_kwargs = req.args
                kw = dict(gen_kwargs or {})
                until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.pop("max_gen_toks", 256))
                if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                    logger.warning("sala: sampling arguments ignored, decoding greedily")
                ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
                hit = lambda toks: any(u and u in self.tok_decode(toks) for u in until)
                text = self.tok_decode(greedy_generate(self.model, ids, max_new, chunk=self.chunk,
                                                       stop_ids=self.stop_ids, should_stop=hit))
                for u in until:
                    if u:
                        text = text.split(u)[0]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
                bar.update()
        return out


def main(argv: list[str] | None = None) -> None:
    """``python -m sala.eval.lm_eval_adapter ARGS``: the harness's CLI with ``--model sala`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
