"""Recipes: shipped files parse, --set overrides, and every bad field is a RecipeError naming it (pure parsing)."""

from __future__ import annotations

import argparse
import copy
import re
import tomllib

import pytest

from sala.train.recipe import (
    RECIPE_DIR,
    RecipeError,
    find_recipe,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
)


@pytest.fixture(scope="module")
def raw() -> dict:
    """The parsed tiny-cpu TOML (copy before changing it)."""
    return tomllib.loads(find_recipe("tiny-cpu").read_text())


def _bad(raw: dict, edit) -> RecipeError:
    doc = copy.deepcopy(raw)
    edit(doc)
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(doc)
    return e.value


# ---- shipped recipes ------------------------------------------------------------------------------------------
SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def test_shipped_recipes_present():
    assert {"tiny-cpu", "smollm2"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_parses(name):
    r = load_recipe(name)
    assert r.name == name and r.stages and r.source == str(RECIPE_DIR / f"{name}.toml")
    for s in r.stages:
        assert s.num_steps(1) >= 1  # every budget holds at least one step on one rank


def test_tiny_cpu_contents():
    r = load_recipe("tiny-cpu")
    assert [(s.name, s.loss) for s in r.stages] == [("align", "align"), ("distill", "kl"), ("long", "ce")]
    assert [s.num_steps(1) for s in r.stages] == [12, 10, 8]
    assert [s.num_steps(2) for s in r.stages] == [6, 5, 4]


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(RecipeError, match=r"neither a file nor a shipped recipe.*tiny-cpu"):
        find_recipe("no-such-recipe")


# ---- overrides ------------------------------------------------------------------------------------------------
def test_overrides_convert_toml_values():
    r = load_recipe("tiny-cpu", parse_overrides([
        "stages.distill.lr=3e-4", 'data.train=["a.txt", "b.txt"]', "model.student=/x/y", "stages.long.tokens=1_024",
        "adapters.enabled=true", "seed=7", "out=somewhere"]))
    assert r.stages[1].lr == 3e-4 and r.data.train == ["a.txt", "b.txt"] and r.model.student == "/x/y"
    assert r.stages[2].tokens == 1024 and r.adapters.enabled is True and r.seed == 7 and r.out == "somewhere"
    assert load_recipe("tiny-cpu", {"out": None}).out is None  # None (no --out) leaves the field alone


def test_set_help_examples_parse():
    """Every KEY=VALUE example in the --set help applies to the shipped smollm2 recipe."""
    from sala.train.cli import add_train_flags

    p = argparse.ArgumentParser()
    add_train_flags(p)
    (action,) = [a for a in p._actions if a.dest == "set"]
    examples = re.findall(r"([\w.]+=\S+?)(?=,|\s|$)", action.help)
    assert len(examples) >= 3, action.help
    load_recipe("smollm2", parse_overrides(examples))


@pytest.mark.parametrize("item", ["model.student", "=value", "  =x", ""])
def test_bad_set_syntax(item):
    with pytest.raises(RecipeError, match=r"--set wants KEY=VALUE"):
        parse_overrides([item])


def test_set_unknown_stage():
    with pytest.raises(RecipeError, match=r"stages\.kl\.tokens: no stage named 'kl' \(stages: \['align', 'distill', 'long'\]\)"):
        load_recipe("tiny-cpu", {"stages.kl.tokens": "100"})


def test_set_into_a_non_table():
    with pytest.raises(RecipeError, match=r"model\.student\.x: student is not a table"):
        load_recipe("tiny-cpu", {"model.student.x": "1"})


# ---- unknown / missing keys and wrong types --------------------------------------------------------------------
@pytest.mark.parametrize("key, named", [
    ("bogus", "bogus"), ("model.bogus", "model.bogus"), ("data.bogus", "data.bogus"),
    ("adapters.bogus", "adapters.bogus"), ("stages.distill.bogus", "stages[distill].bogus")])
def test_unknown_key_names_field(key, named):
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-cpu", {key: "1"})
    msg = str(e.value)
    assert re.search(rf"unknown key\(s\) {re.escape(named)};", msg), msg
    assert "accepts" in msg and " .bogus" not in msg and not msg.startswith("unknown key(s) .")


def test_missing_keys(raw):
    assert "missing required key(s) name" in str(_bad(raw, lambda d: d.pop("name")))
    assert "model.student" in str(_bad(raw, lambda d: d["model"].pop("student")))
    assert "stages[long].seq_len" in str(_bad(raw, lambda d: d["stages"][2].pop("seq_len")))
    for table in ("model", "data", "stages"):
        assert f"missing required key(s) {table}" in str(_bad(raw, lambda d: d.pop(table)))
    assert "at least one [[stages]]" in str(_bad(raw, lambda d: d.update(stages=[])))
    assert "stages must be an array of tables" in str(_bad(raw, lambda d: d.update(stages={"a": 1})))


@pytest.mark.parametrize("key, value, match", [
    ("stages.align.tokens", '"lots"', r"stages\[align\]\.tokens must be an integer, got str 'lots'"),
    ("stages.align.tokens", "1e6", r"stages\[align\]\.tokens must be an integer, got float"),
    ("stages.distill.lr", '"fast"', r"stages\[distill\]\.lr must be a number, got str"),
    ("stages.distill.lr", "true", r"stages\[distill\]\.lr must be a number, got bool"),
    ("stages.long.sparse_attention", "1", r"stages\[long\]\.sparse_attention must be a bool, got int"),
    ("stages.long.trainable", '"all"', r"stages\[long\]\.trainable must be a list, got str"),
    ("stages.long.betas", '[0.9, "x"]', r"stages\[long\]\.betas\[1\] must be a number"),
    ("seed", "true", r"^seed must be an integer, got bool"),
    ("model.teacher", "5", r"model\.teacher has the wrong type: got int 5"),
    ("model.gradient_checkpointing", '"yes"', r"model\.gradient_checkpointing must be a bool"),
    ("data.train", '"a.txt"', r"data\.train must be a list, got str"),
    ("data.eval_windows", "2.5", r"data\.eval_windows must be an integer"),
    ("adapters.rank_overrides", "3", r"adapters\.rank_overrides must be a table"),
    ("adapters", '"on"', r"adapters must be a table, got str"),
])
def test_wrong_type_names_field(key, value, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("tiny-cpu", parse_overrides([f"{key}={value}"]))


# ---- impossible values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, match", [
    ("stages.align.seq_len", "1", r"stages\[align\]\.seq_len must be >= 2"),
    ("stages.align.seq_len", "0", r"stages\[align\]\.seq_len must be >= 1"),
    ("stages.align.micro_batch", "0", r"stages\[align\]\.micro_batch must be >= 1, got 0"),
    ("stages.align.grad_accum", "0", r"stages\[align\]\.grad_accum must be >= 1"),
    ("stages.align.tokens", "0", r"stages\[align\]\.tokens must be >= 1"),
    ("stages.align.log_every", "0", r"stages\[align\]\.log_every must be >= 1"),
    ("stages.distill.kl_chunk", "0", r"stages\[distill\]\.kl_chunk must be >= 1"),
    ("stages.distill.lr", "0", r"stages\[distill\]\.lr must be a positive number, got 0"),
    ("stages.distill.lr", "-1e-3", r"stages\[distill\]\.lr must be a positive number"),
    ("stages.distill.lr", "nan", r"stages\[distill\]\.lr must be a positive number"),
    ("stages.distill.min_lr", "3e-3", r"stages\[distill\]\.min_lr must be in \[0, lr=0\.002\], got 0\.003"),
    ("stages.distill.min_lr", "-1e-5", r"stages\[distill\]\.min_lr must be in"),
    ("stages.distill.warmup_steps", "-1", r"stages\[distill\]\.warmup_steps"),
    ("stages.distill.save_every", "-1", r"stages\[distill\]\.warmup_steps and save_every must be >= 0"),
    ("stages.distill.decay_fraction", "0", r"stages\[distill\]\.decay_fraction must be in \(0, 1\]"),
    ("stages.distill.decay_fraction", "1.5", r"stages\[distill\]\.decay_fraction"),
    ("stages.distill.betas", "[0.9]", r"stages\[distill\]\.betas must be two numbers"),
    ("stages.distill.betas", "[0.9, 1.0]", r"stages\[distill\]\.betas must be two numbers in \[0, 1\)"),
    ("stages.distill.temperature", "0", r"stages\[distill\].*temperature > 0"),
    ("stages.distill.grad_clip", "-1", r"stages\[distill\].*grad_clip must be >= 0"),
    ("stages.distill.trainable", "[]", r"stages\[distill\]\.trainable is empty"),
    ("stages.long.loss", '"mse"', r"stages\[long\]\.loss must be one of .*'align', 'kl', 'ce', 'sft'.*got 'mse'"),
    ("stages.long.schedule", '"linear"', r"stages\[long\]\.schedule must be one of .*got 'linear'"),
    ("stages.long.trainable", '["all", "heads"]', r"stages\[long\]\.trainable: unknown group 'heads'"),
    ("model.dtype", '"int8"', r"model\.dtype must be bfloat16, float16 or float32, got 'int8'"),
    ("data.train", "[]", r"data\.train is empty"),
    ("data.eval_seq_len", "1", r"data\.eval_seq_len >= 2"),
    ("data.eval_windows", "0", r"data\.eval_windows must be >= 1"),
    ("adapters.rank", "0", r"adapters\.rank must be >= 1, got 0"),
    ("adapters.alpha", "0", r"adapters\.alpha must be > 0"),
    ("adapters.targets", "[]", r"adapters\.targets is empty"),
    ("adapters.rank_overrides", "{ w_proj = 4 }", r"adapters\.rank_overrides\.w_proj: 'w_proj' is not one of"),
    ("adapters.rank_overrides", "{ q_proj = 0 }", r"adapters\.rank_overrides\.q_proj must be an integer >= 1"),
    ("keep_checkpoints", "0", r"keep_checkpoints must be >= 1, got 0"),
])
def test_impossible_value_names_field(key, value, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("tiny-cpu", parse_overrides([f"{key}={value}"]))


def test_budget_below_one_step_names_tokens_and_step():
    r = load_recipe("tiny-cpu", {"stages.distill.tokens": "255"})  # one step: 64 x 2 x 2 x 1 = 256 tokens
    with pytest.raises(RecipeError, match=r"stages\[distill\]\.tokens = 255 is less than one optimizer step: seq_len 64 "
                                          r"x micro_batch 2 x grad_accum 2 x 1 rank\(s\) = 256 tokens"):
        r.stages[1].num_steps(1)
    r = load_recipe("tiny-cpu", {"stages.distill.tokens": "256"})
    assert r.stages[1].num_steps(1) == 1
    with pytest.raises(RecipeError, match=r"x 2 rank\(s\) = 512 tokens"):
        r.stages[1].num_steps(2)


# ---- cross-field rules -----------------------------------------------------------------------------------------
def test_duplicate_stage_names():
    with pytest.raises(RecipeError, match=r"stage names must be unique, got \['align', 'align', 'long'\]"):
        load_recipe("tiny-cpu", {"stages.distill.name": "align"})


def test_distillation_needs_teacher(raw):
    e = _bad(raw, lambda d: d["model"].pop("teacher"))
    assert "stages ['align', 'distill'] distil from a teacher but model.teacher is not set" in str(e)
    ok = copy.deepcopy(raw)  # without align/kl stages no teacher is needed
    del ok["model"]["teacher"]
    ok["stages"] = ok["stages"][2:]
    assert recipe_from_dict(ok).model.teacher is None


def test_sft_needs_chat_data():
    with pytest.raises(RecipeError, match=r"stages \['long'\] read chat data .* but data\.sft lists no chat \.jsonl"):
        load_recipe("tiny-cpu", {"stages.long.loss": '"sft"'})
    with pytest.raises(RecipeError, match=r"stages \['distill'\] read chat data"):
        load_recipe("tiny-cpu", {"stages.distill.data": '"sft"'})
    r = load_recipe("tiny-cpu", {"stages.long.loss": '"sft"', "data.sft": '["chat.jsonl"]'})
    assert r.stages[2].loss == "sft"


def test_adapters_group_needs_adapters_enabled():
    with pytest.raises(RecipeError, match=r"stages \['long'\] train 'adapters' but \[adapters\] enabled = false"):
        load_recipe("tiny-cpu", {"stages.long.trainable": '["adapters"]'})
    r = load_recipe("tiny-cpu", {"stages.long.trainable": '["adapters"]', "adapters.enabled": "true"})
    assert r.adapters.enabled and r.stages[2].trainable == ["adapters"]


def test_invalid_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(RecipeError, match=r"bad\.toml is not valid TOML"):
        load_recipe(str(bad))


def test_stage_data_source():
    r = load_recipe("tiny-cpu", {"stages.distill.data": '"sft"', "data.sft": '["chat.jsonl"]'})
    assert [s.source for s in r.stages] == ["train", "sft", "train"]
    r = load_recipe("tiny-cpu", {"stages.long.loss": '"sft"', "data.sft": '["chat.jsonl"]'})
    assert r.stages[2].source == "sft"
    with pytest.raises(RecipeError, match=r"stages\[distill\]\.data must be 'train', 'sft' or 'mix', got 'chat'"):
        load_recipe("tiny-cpu", {"stages.distill.data": '"chat"'})
    r = load_recipe("tiny-cpu", {"stages.distill.data": '"mix"', "stages.distill.sft_fraction": "0.25",
                                 "data.sft": '["chat.jsonl"]'})
    assert r.stages[1].source == "mix" and r.stages[1].sft_fraction == 0.25
    with pytest.raises(RecipeError, match=r"stages \['distill'\] read chat data"):
        load_recipe("tiny-cpu", {"stages.distill.data": '"mix"'})
    with pytest.raises(RecipeError, match=r"stages\[align\]\.data: 'mix' is for the kl and ce losses, not 'align'"):
        load_recipe("tiny-cpu", {"stages.align.data": '"mix"', "data.sft": '["c.jsonl"]'})
    with pytest.raises(RecipeError, match=r"stages\[long\]\.data: the sft loss .* needs data = 'sft'"):
        load_recipe("tiny-cpu", {"stages.long.loss": '"sft"', "stages.long.data": '"mix"', "data.sft": '["c.jsonl"]'})
    for bad in ("0", "1", "1.5"):
        with pytest.raises(RecipeError, match=r"stages\[distill\]\.sft_fraction must be in \(0, 1\)"):
            load_recipe("tiny-cpu", {"stages.distill.sft_fraction": bad})
    with pytest.raises(RecipeError, match=r"stages\[long\]\.data: the sft loss .* needs data = 'sft'"):
        load_recipe("tiny-cpu", {"stages.long.loss": '"sft"', "stages.long.data": '"train"', "data.sft": '["c.jsonl"]'})
