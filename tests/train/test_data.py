"""Training data: shards round-trip, exact packing boundaries, SFT masks, resume, rank sharding, cache, errors."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sala.train.data import MixedLoader, PackedLoader, ShardIndex, eval_windows, tokenize_to_shards

ASSETS = Path(__file__).resolve().parents[2] / "src" / "sala" / "assets"
CHAT = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello friend"},
                     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS)


def _sources(tmp: Path) -> list[Path]:
    txt = tmp / "a.txt"
    txt.write_text("first document about lists.\n\f\nsecond document, a bit longer than the first one.\n")
    jl = tmp / "b.jsonl"
    jl.write_text(json.dumps({"text": "third document"}) + "\n\n" + json.dumps(CHAT) + "\n")
    return [txt, jl]


def _fake_index(tmp: Path, docs: list[list[int]], mask: list[list[int]] | None = None) -> ShardIndex:
    """A hand-made one-shard cache whose token ids are their own positions (easy to check)."""
    flat = np.concatenate([np.asarray(d, np.uint16) for d in docs])
    flat.tofile(tmp / "tokens-00000.bin")
    np.save(tmp / "docs-00000.npy", np.cumsum([0] + [len(d) for d in docs[:-1]]).astype(np.int64))
    if mask is not None:
        np.concatenate([np.asarray(m, np.uint8) for m in mask]).tofile(tmp / "mask-00000.bin")
    meta = {"format": 1, "tokenizer": "fake", "vocab_size": 1000, "dtype": "uint16", "sft": mask is not None,
            "fingerprint": "x", "shard_tokens": [len(flat)], "shard_docs": [len(docs)]}
    (tmp / "index.json").write_text(json.dumps(meta))
    return ShardIndex.load(tmp)


def test_shards_round_trip(tmp_path, tok):
    index = tokenize_to_shards(_sources(tmp_path), tok, tmp_path / "cache", shard_tokens=16)
    texts = ["first document about lists.", "second document, a bit longer than the first one.", "third document"]
    expect = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    expect.append(tok(tok.apply_chat_template(CHAT["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
    got = [index.tokens(s)[a:b].tolist() for s, a, b in index.documents()]
    assert got == [list(e) for e in expect]
    assert index.num_shards > 1 and index.dtype == "uint16" and index.vocab_size == len(tok) == 500
    assert index.num_tokens == sum(map(len, expect)) and index.num_docs == 4
    assert all(n <= 16 or d == 1 for n, d in zip(index.shard_tokens, index.shard_docs))  # docs never span shards
    meta = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert meta["tokenizer"] and meta["num_tokens"] == index.num_tokens


def test_sft_mask_covers_assistant_content_and_im_end(tmp_path, tok):
    jl = tmp_path / "chat.jsonl"
    jl.write_text(json.dumps(CHAT) + "\n" + json.dumps({"text": "plain text"}) + "\n")
    index = tokenize_to_shards([jl], tok, tmp_path / "c", sft=True)
    (_, a, b), (_, c, d) = index.documents()
    ids, mask = index.tokens(0)[a:b].tolist(), index.mask(0)[a:b].tolist()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Hello friend<|im_end|>See you<|im_end|>"
    assert trained.count(im_end) == 2 and sum(mask) == len(trained)
    # every untrained token: user turns, headers, the newline after im_end
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert untrained == ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\nBye"
                         "<|im_end|>\n<|im_start|>assistant\n\n")
    assert index.mask(0)[c:d].tolist() == [1] * (d - c)  # plain text documents are trained in full


def test_packing_boundaries_exact(tmp_path):
    # docs of lengths 3, 6, 2 (token id == global position); seq_len 4, 2 rows -> 8 tokens per batch
    index = _fake_index(tmp_path, [[0, 1, 2], [3, 4, 5, 6, 7, 8], [9, 10]])
    b1, b2 = islice(iter(PackedLoader(index, seq_len=4, micro_batch=2, shuffle=False)), 2)
    assert b1.input_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert b1.cu_seqlens.tolist() == [0, 3, 4, 8] and b1.cu_seqlens.dtype == torch.int32
    assert b1.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert b1.labels.tolist() == [[-100, 1, 2, -100, -100, 5, 6, 7]]
    assert b1.num_tokens == 5
    # batch 2: the rest of doc 1 (8), doc 2 (9, 10), then epoch 1 starts over: doc 0 crosses the row boundary
    assert b2.input_ids.tolist() == [[8, 9, 10, 0, 1, 2, 3, 4]]
    assert b2.cu_seqlens.tolist() == [0, 1, 3, 4, 6, 8]
    assert b2.position_ids.tolist() == [[0, 0, 1, 0, 0, 1, 0, 1]]
    assert b2.labels.tolist() == [[-100, -100, 10, -100, -100, 2, -100, 4]]
    assert b2.input_ids.dtype == b2.labels.dtype == b2.position_ids.dtype == torch.int64


def test_sft_labels_masked(tmp_path):
    index = _fake_index(tmp_path, [[0, 1, 2, 3], [4, 5, 6, 7]], mask=[[0, 0, 1, 1], [1, 0, 1, 1]])
    (b,) = islice(iter(PackedLoader(index, seq_len=8, micro_batch=1, shuffle=False)), 1)
    assert b.labels.tolist() == [[-100, -100, 2, 3, -100, -100, 6, 7]] and b.num_tokens == 4


def test_shuffle_deterministic_per_epoch(tmp_path):
    index = _fake_index(tmp_path, [[i] * 2 for i in range(20)])
    take = lambda seed: [b.input_ids.tolist() for b in islice(iter(PackedLoader(index, seq_len=40, micro_batch=1,
                                                                                  seed=seed)), 3)]
    assert take(0) == take(0) and take(0) != take(1)
    e0, e1 = take(0)[:2]
    assert sorted(e0[0]) == sorted(e1[0]) and e0 != e1  # each batch is one epoch; orders differ per epoch


def test_resume_exact(tmp_path, tok):
    index = tokenize_to_shards(_sources(tmp_path), tok, tmp_path / "cache")
    for world, rank in ((1, 0), (3, 1)):
        ref = PackedLoader(index, seq_len=7, micro_batch=2, rank=rank, world_size=world, seed=3)
        it = iter(ref)
        for _ in range(9):  # past the end of epoch 0 (~80 tokens)
            next(it)
        state = ref.state_dict()
        expect = [next(it) for _ in range(6)]
        fresh = PackedLoader(index, seq_len=7, micro_batch=2, rank=rank, world_size=world, seed=3)
        fresh.load_state_dict(state)
        assert fresh.epoch == state["epoch"] >= 1
        got = list(islice(iter(fresh), 6))
        for g, e in zip(got, expect, strict=True):
            for f in ("input_ids", "labels", "cu_seqlens", "position_ids"):
                assert torch.equal(getattr(g, f), getattr(e, f)), f
    with pytest.raises(ValueError, match="seed=3"):
        PackedLoader(index, seq_len=7, micro_batch=2, seed=4).load_state_dict(state)


def test_mixed_loader_schedule_and_resume(tmp_path, tok):
    """A quarter of the micro-batches from the second loader, evenly spread; a fresh mixed loader resumed from a
    state continues both sources exactly where the first one was."""
    text = tokenize_to_shards(_sources(tmp_path), tok, tmp_path / "text")
    chats = tmp_path / "c.jsonl"
    chats.write_text("\n".join(json.dumps(CHAT) for _ in range(3)) + "\n")
    sft = tokenize_to_shards([chats], tok, tmp_path / "sft", sft=True)

    def mixed():
        return MixedLoader(PackedLoader(text, seq_len=7, micro_batch=2, seed=3),
                           PackedLoader(sft, seq_len=7, micro_batch=2, seed=4), 0.25)

    ref = mixed()
    assert [ref.takes_second(k) for k in range(8)] == [False, False, False, True] * 2
    it = iter(ref)
    for _ in range(5):
        next(it)
    state = ref.state_dict()
    expect = [next(it) for _ in range(7)]
    fresh = mixed()
    fresh.load_state_dict(state)
    got = list(islice(iter(fresh), 7))
    for g, e in zip(got, expect, strict=True):
        for f in ("input_ids", "labels", "cu_seqlens", "position_ids"):
            assert torch.equal(getattr(g, f), getattr(e, f)), f
    # the chat batches are the ones with masked (user) tokens: micro-batches 7 and 11 of 5..11
    assert [bool((b.labels == -100).sum() > len(b.cu_seqlens) - 1) for b in got] == [False, False, True, False,
                                                                                      False, False, True]
    with pytest.raises(ValueError, match="single-source"):
        mixed().load_state_dict(PackedLoader(text, seq_len=7, micro_batch=2, seed=3).state_dict())
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        MixedLoader(ref.first, ref.second, 1.0)


def test_ranks_disjoint_and_complete(tmp_path, tok):
    index = tokenize_to_shards(_sources(tmp_path), tok, tmp_path / "cache")
    single = [b.input_ids for b in islice(iter(PackedLoader(index, seq_len=5, micro_batch=3, seed=1)), 12)]
    r0 = [b.input_ids for b in islice(iter(PackedLoader(index, seq_len=5, micro_batch=3, seed=1, world_size=3)), 4)]
    r1 = [b.input_ids for b in islice(iter(PackedLoader(index, seq_len=5, micro_batch=3, seed=1, rank=1,
                                                        world_size=3)), 4)]
    r2 = [b.input_ids for b in islice(iter(PackedLoader(index, seq_len=5, micro_batch=3, seed=1, rank=2,
                                                        world_size=3)), 4)]
    merged = [x for trio in zip(r0, r1, r2) for x in trio]
    assert all(torch.equal(a, b) for a, b in zip(merged, single, strict=True))


def test_eval_windows(tmp_path):
    index = _fake_index(tmp_path, [list(range(0, 7)), list(range(7, 23))])
    w = eval_windows(index, 5, 3)
    assert w.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]] and w.dtype == torch.int64
    assert eval_windows(np.arange(12), 5, 10).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(torch.arange(3), 5, 1)


def test_source_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="missing.txt"):
        tokenize_to_shards([tmp_path / "missing.txt"], tok, tmp_path / "c")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data.csv.*unknown extension"):
        tokenize_to_shards([tmp_path / "data.csv"], tok, tmp_path / "c")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt holds no documents"):
        tokenize_to_shards([tmp_path / "empty.txt"], tok, tmp_path / "c")
    (tmp_path / "bad.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        tokenize_to_shards([tmp_path / "bad.jsonl"], tok, tmp_path / "c")


def test_parquet_source(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha beta", "gamma"]}), tmp_path / "d.parquet")
    index = tokenize_to_shards([tmp_path / "d.parquet"], tok, tmp_path / "c", append_eos=False)
    got = [index.tokens(s)[a:b].tolist() for s, a, b in index.documents()]
    assert got == [tok("alpha beta", add_special_tokens=False)["input_ids"],
                   tok("gamma", add_special_tokens=False)["input_ids"]]


def test_cache_reuse_and_rebuild(tmp_path, tok, monkeypatch):
    srcs = _sources(tmp_path)
    first = tokenize_to_shards(srcs, tok, tmp_path / "cache")
    import sala.train.data as data

    calls = []
    real = data._read_source
    monkeypatch.setattr(data, "_read_source", lambda p: calls.append(p) or real(p))
    again = tokenize_to_shards(srcs, tok, tmp_path / "cache")
    assert calls == [] and again.fingerprint == first.fingerprint  # reused
    (tmp_path / "cache" / "index.json").write_text('{"format": 1, "tokeni')  # half-written index
    rebuilt = tokenize_to_shards(srcs, tok, tmp_path / "cache")
    assert len(calls) == 2 and rebuilt.num_tokens == first.num_tokens
    (tmp_path / "cache" / "tokens-00000.bin").write_bytes(b"\0")  # truncated shard
    tokenize_to_shards(srcs, tok, tmp_path / "cache")
    assert len(calls) == 4
    srcs[0].write_text("changed text\n")  # new content -> new fingerprint
    changed = tokenize_to_shards(srcs, tok, tmp_path / "cache")
    assert len(calls) == 6 and changed.fingerprint != first.fingerprint
