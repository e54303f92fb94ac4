"""The lm-evaluation-harness model class ``sala`` on tasks defined here (a YAML directory over a local jsonl):
loglikelihood (multiple choice), loglikelihood_rolling and generate_until, on tiny random models. Skipped when
lm-eval (the ``eval`` extra) is not installed."""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed", exc_type=ImportError)

from lm_eval.api.instance import Instance  # noqa: E402

from sala.eval.lm_eval_adapter import SalaLM  # noqa: E402  (importing registers "sala")

DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin"], "answer": 0,
     "text": "Hello! How are you today? I am fine, thank you."},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " moon", " sky"], "answer": 0,
     "text": "The engine fills a cache once, then writes one token at a time."},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_tasks")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (d / "mc.yaml").write_text(head + "task: sala_test_mc\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                               "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (d / "rolling.yaml").write_text(head + "task: sala_test_rolling\noutput_type: loglikelihood_rolling\n"
                                    "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (d / "gen.yaml").write_text(head + "task: sala_test_gen\noutput_type: generate_until\ndoc_to_text: '{{question}}'\n"
                                "doc_to_target: '{{choices[answer]}}'\ngeneration_kwargs:\n  until: ['\\n']\n"
                                "  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return d


@pytest.mark.parametrize("model", ["tiny", "llama"])
def test_simple_evaluate_on_local_tasks(model, task_dir, llama_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    pretrained = "tiny" if model == "tiny" else str(llama_dir)
    out = simple_evaluate(model="sala", model_args={"pretrained": pretrained}, device="cpu",
                          tasks=["sala_test_mc", "sala_test_rolling", "sala_test_gen"],
                          task_manager=TaskManager(include_path=str(task_dir)), log_samples=False)
    res = out["results"]
    assert 0.0 <= res["sala_test_mc"]["acc,none"] <= 1.0
    assert math.isfinite(res["sala_test_rolling"]["word_perplexity,none"]) and res["sala_test_rolling"]["word_perplexity,none"] > 1
    assert res["sala_test_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def lm(llama_dir):
    return SalaLM(pretrained=str(llama_dir), device="cpu", dtype="float32", chunk=5)


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, one full forward without a cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_matches_direct_forward(lm):
    ctx, cont = "The capital of France is", " Paris"
    [(logp, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)], disable_tqdm=True)
    c_ids = lm.tok_encode(ctx)
    whole = lm.tok_encode(ctx + cont)
    n = len(whole) - len(c_ids)
    assert n >= 1 and isinstance(greedy, bool)
    assert logp == pytest.approx(float(_direct_logprobs(lm.model, whole)[-n:].sum()), rel=1e-5)


def test_loglikelihood_rolling_matches_direct_forward(lm):
    text = "Memory, speed and quality: measure each."
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + lm.tok_encode(text)  # one window: every token scored after the prefix token
    assert len(ids) <= lm.max_length
    assert total == pytest.approx(float(_direct_logprobs(lm.model, ids).sum()), rel=1e-5)


def test_generate_until_stops_at_until(lm):
    reqs = [Instance("generate_until", {}, ("Hello! How are", {"until": ["e"], "max_gen_toks": 12}), 0),
            Instance("generate_until", {}, ("Hello! How are", {"until": ["\n\n\n"], "max_gen_toks": 3}), 1)]
    cut, free = lm.generate_until(reqs, disable_tqdm=True)
    assert "e" not in cut
    assert len(lm.tok_encode(free)) <= 3 + 1
    assert free.startswith(cut) or cut.startswith(free)  # both greedy from the same prompt
