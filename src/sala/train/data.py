"""Training data: tokenise sources into memory-mapped shards, then pack them into varlen micro-batches.

Pipeline: ``tokenize_to_shards`` (text/jsonl/parquet -> ``tokens-*.bin`` + ``docs-*.npy`` [+ ``mask-*.bin``] +
``index.json``) -> ``ShardIndex`` -> ``PackedLoader`` (infinite, deterministic, resumable, rank-sharded stream of
``PackedBatch``). This module knows nothing about the model: it only needs a tokenizer object.

Packing: each epoch shuffles the document order (``seed + epoch``) and concatenates the documents into one token
stream; a micro-batch is the next ``micro_batch * seq_len`` tokens, cut into rows of ``seq_len``. A document
that crosses a row boundary continues in the next row (and, at the end of an epoch, the next epoch's first
documents fill the row). Every document piece is its own attention segment: ``cu_seqlens`` holds all document
and row boundaries, ``position_ids`` restart at each, and the first token of each piece gets label -100 (the
model shifts labels HF-style, so nothing is predicted across a boundary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from sala.utils.corpus import DOC_SEPARATOR, split_documents
from sala.utils.progress import progress

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IGNORE_INDEX = -100
_EXTENSIONS = (".txt", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------------------------------------------
# reading sources


def _read_source(path: Path) -> list[str | list[dict[str, str]]]:
    """Documents of one source: strings (plain text) or lists of chat messages."""
    if not path.is_file():
        raise ValueError(f"data source {path} does not exist")
    ext = path.suffix.lower()
    docs: list[str | list[dict[str, str]]] = []
    if ext == ".txt":
        text = path.read_text(encoding="utf-8")
        if any(line == DOC_SEPARATOR for line in text.split("\n")):  # corpus format: '\f' lines between docs
            docs.extend(split_documents(text))
        elif text.strip():  # one document per file
            docs.append(text)
    elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    if rec["text"].strip():
                        docs.append(rec["text"])
                elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    msgs = rec["messages"]
                    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                        raise ValueError(f"{path}:{lineno}: every message needs 'role' and 'content'")
                    if msgs:
                        docs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
                else:
                    raise ValueError(f"{path}:{lineno}: expected {{\"text\": ...}} or {{\"messages\": [...]}}")
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError(f"reading {path} needs pyarrow; install it with `pip install pyarrow`") from e
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path} has no 'text' column (columns: {table.column_names})")
        docs.extend(t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip())
    else:
        raise ValueError(f"data source {path}: unknown extension {ext!r}; expected one of {_EXTENSIONS}")
    if not docs:
        raise ValueError(f"data source {path} holds no documents")
    return docs


# ----------------------------------------------------------------------------------------------------------------
# tokenising


def _chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat and its loss mask: 1 on assistant content and its end-of-turn token.

    Assistant spans are found by rendering incrementally: the render of ``messages[:i]`` with the generation
    prompt ends where assistant message ``i`` starts, so the ``<|im_start|>assistant\\n`` header is not
    trained; the content is located after it, and the first token after the content (``<|im_end|>`` in
    ChatML) is trained too. The template's own eos setting is not trusted: SmolLM2's GGUF names
    ``<|im_start|>`` as eos.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []  # character spans [content start, content end) of assistant turns
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise ValueError("the chat template does not render prefixes of a conversation as prefixes; "
                             "assistant spans cannot be located")
        start = upto.find(msg["content"], len(head)) if msg["content"] else len(head)
        if start < 0:
            raise ValueError(f"assistant message {i}'s content does not appear verbatim in the rendered chat")
        spans.append((start, start + len(msg["content"])))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [0] * len(ids)
    t = 0
    for s, e in spans:
        while t < len(ids) and offsets[t][1] <= s:  # tokens that end before the content
            t += 1
        while t < len(ids) and offsets[t][0] < e:  # content tokens (a token straddling the start counts)
            mask[t] = 1
            t += 1
        if t < len(ids):  # the end-of-turn token right after the content
            mask[t] = 1
            t += 1
    return ids, mask


def _fingerprint(sources: Sequence[Path], tokenizer: Any, **options: Any) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **options}, sort_keys=True).encode())
    for src in sources:
        h.update(str(src.resolve()).encode() + b"\0")
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(f"{tokenizer.eos_token_id}|{len(tokenizer)}".encode())
    return h.hexdigest()


@dataclass
class ShardIndex:
    """A tokenised dataset on disk: ``tokens-NNNNN.bin`` shards, document starts, optional SFT loss masks."""

    root: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    sft: bool
    fingerprint: str
    shard_tokens: list[int]  # tokens per shard
    shard_docs: list[int]  # documents per shard
    _mmaps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.shard_tokens)

    @property
    def num_docs(self) -> int:
        return sum(self.shard_docs)

    @property
    def num_shards(self) -> int:
        return len(self.shard_tokens)

    def tokens(self, shard: int) -> np.ndarray:
        """Memory-mapped token ids of one shard: [shard_tokens[shard]]."""
        return self._map("tokens", shard, self.dtype)

    def mask(self, shard: int) -> np.ndarray:
        """Memory-mapped uint8 SFT loss mask of one shard (sft datasets only)."""
        if not self.sft:
            raise ValueError(f"{self.root} was tokenised without sft=True; it has no loss masks")
        return self._map("mask", shard, "uint8")

    def doc_starts(self, shard: int) -> np.ndarray:
        """int64 start offsets of the documents of one shard: [shard_docs[shard]]."""
        return np.load(self.root / f"docs-{shard:05d}.npy")

    def documents(self) -> np.ndarray:
        """All documents as rows (shard, start, end): int64 [num_docs, 3], in stored order."""
        rows = []
        for s in range(self.num_shards):
            starts = self.doc_starts(s)
            ends = np.append(starts[1:], self.shard_tokens[s])
            rows.append(np.stack([np.full_like(starts, s), starts, ends], axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)

    def _map(self, kind: str, shard: int, dtype: str) -> np.ndarray:
        key = (kind, shard)
        if key not in self._mmaps:
            n = self.shard_tokens[shard]
            path = self.root / f"{kind}-{shard:05d}.bin"
            self._mmaps[key] = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        return self._mmaps[key]

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ShardIndex":
        """Open a finished cache; ValueError when ``index.json`` is missing, unreadable or its shards are not."""
        root = Path(root)
        try:
            meta = json.loads((root / "index.json").read_text())
            index = cls(root=root, tokenizer=meta["tokenizer"], vocab_size=meta["vocab_size"], dtype=meta["dtype"],
                        sft=meta["sft"], fingerprint=meta["fingerprint"], shard_tokens=meta["shard_tokens"],
                        shard_docs=meta["shard_docs"])
            if meta["format"] != FORMAT_VERSION:
                raise ValueError(f"format {meta['format']} != {FORMAT_VERSION}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"no valid token cache in {root}: {e}") from e
        item = np.dtype(index.dtype).itemsize
        for s, (n, d) in enumerate(zip(index.shard_tokens, index.shard_docs)):
            files = {f"tokens-{s:05d}.bin": n * item, **({f"mask-{s:05d}.bin": n} if index.sft else {})}
            for name, size in files.items():
                if not (root / name).is_file() or (root / name).stat().st_size != size:
                    raise ValueError(f"token cache {root}: {name} is missing or not {size} bytes")
            try:
                if len(index.doc_starts(s)) != d:
                    raise ValueError(f"token cache {root}: docs-{s:05d}.npy does not hold {d} documents")
            except OSError as e:
                raise ValueError(f"token cache {root}: docs-{s:05d}.npy unreadable ({e})") from e
        return index


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ShardWriter:
    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, sft: bool):
        self.out, self.dtype, self.limit, self.sft = out, dtype, shard_tokens, sft
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.starts: list[int] = []
        self.size = 0
        self.shard_tokens: list[int] = []
        self.shard_docs: list[int] = []

    def add(self, ids: Sequence[int], mask: Sequence[int] | None) -> None:
        if not len(ids):
            return
        if self.size and self.size + len(ids) > self.limit:  # documents never span shards
            self.flush()
        self.starts.append(self.size)
        self.tokens.append(np.asarray(ids, dtype=self.dtype))
        if self.sft:
            self.masks.append(np.asarray(mask if mask is not None else np.ones(len(ids)), dtype=np.uint8))
        self.size += len(ids)

    def flush(self) -> None:
        if not self.starts:
            return
        s = len(self.shard_tokens)
        _atomic(self.out / f"tokens-{s:05d}.bin", lambda p: np.concatenate(self.tokens).tofile(p))
        if self.sft:
            _atomic(self.out / f"mask-{s:05d}.bin", lambda p: np.concatenate(self.masks).tofile(p))
        with open(self.out / f"docs-{s:05d}.npy.tmp", "wb") as f:
            np.save(f, np.asarray(self.starts, dtype=np.int64))
        os.replace(self.out / f"docs-{s:05d}.npy.tmp", self.out / f"docs-{s:05d}.npy")
        self.shard_tokens.append(self.size)
        self.shard_docs.append(len(self.starts))
        self.tokens, self.masks, self.starts, self.size = [], [], [], 0


def tokenize_to_shards(sources: Sequence[str | os.PathLike], tokenizer: Any, out_dir: str | os.PathLike, *,
                       shard_tokens: int = 2**24, append_eos: bool = True, sft: bool = False) -> ShardIndex:
    """Tokenise ``sources`` (.txt / .jsonl / .parquet) into memory-mapped shards under ``out_dir``.

    Text documents are encoded without special tokens, plus ``eos`` when ``append_eos``; chats
    (``{"messages": [...]}``) are rendered with ``tokenizer.apply_chat_template`` (they end with their own
    end-of-turn token). With ``sft=True`` a ``mask-NNNNN.bin`` (uint8) marks the trained tokens: assistant
    content and its end-of-turn token in chats, every token of plain-text documents. Tokens are uint16 when the
    vocabulary has < 65536 entries, else uint32. ``index.json`` is written last and atomically; a cache whose
    index matches the fingerprint of sources + tokenizer + options is reused, anything else is rebuilt.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not sources:
        raise ValueError("no data sources given")
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"data source {p} does not exist")
        if p.suffix.lower() not in _EXTENSIONS:
            raise ValueError(f"data source {p}: unknown extension {p.suffix!r}; expected one of {_EXTENSIONS}")
    out = Path(out_dir)
    fingerprint = _fingerprint(paths, tokenizer, shard_tokens=shard_tokens, append_eos=append_eos, sft=sft)
    try:
        cached = ShardIndex.load(out)
        if cached.fingerprint == fingerprint:
            logger.info("token cache %s matches its sources and tokenizer: reused (%d tokens)", out, cached.num_tokens)
            return cached
        logger.info("token cache %s is stale (sources, tokenizer or options changed): rebuilding", out)
    except ValueError as e:
        logger.info("building token cache %s (%s)", out, e)

    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # a cache without index.json is incomplete by definition
    for old in [*out.glob("tokens-*.bin"), *out.glob("mask-*.bin"), *out.glob("docs-*.npy")]:
        old.unlink()
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos=True needs tokenizer.eos_token_id; the tokenizer has no eos token")
    writer = _ShardWriter(out, dtype, shard_tokens, sft)
    docs = [d for p in paths for d in _read_source(p)]
    batch: list[str] = []

    def flush_text() -> None:
        if not batch:
            return
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            ids = list(ids) + ([eos] if append_eos else [])
            writer.add(ids, None)
        batch.clear()

    for doc in progress(docs, desc="tokenize"):
        if isinstance(doc, str):
            batch.append(doc)
            if len(batch) >= 256:  # batched calls let fast tokenizers use their threads
                flush_text()
            continue
        flush_text()
        ids, mask = _chat_tokens(tokenizer, doc)
        writer.add(ids, mask)
    flush_text()
    writer.flush()
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    meta = {"format": FORMAT_VERSION, "tokenizer": str(name), "vocab_size": vocab, "dtype": dtype.name, "sft": sft,
            "fingerprint": fingerprint, "num_tokens": sum(writer.shard_tokens), "num_docs": sum(writer.shard_docs),
            "shard_tokens": writer.shard_tokens, "shard_docs": writer.shard_docs,
            "sources": [str(p) for p in paths], "append_eos": append_eos}
    _atomic(out / "index.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1) + "\n"))
    logger.info("tokenised %d documents, %d tokens into %d shard(s) in %s", meta["num_docs"], meta["num_tokens"],
                len(writer.shard_tokens), out)
    return ShardIndex.load(out)


# ----------------------------------------------------------------------------------------------------------------
# packing


@dataclass
class PackedBatch:
    """One micro-batch in the flattened varlen layout (N = micro_batch * seq_len, D = document pieces).

    input_ids, labels, position_ids: [1, N] int64; cu_seqlens: [D + 1] int32 (0 ... N, includes every row
    boundary); num_tokens: tokens with a label (!= -100).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    num_tokens: int


class PackedLoader:
    """Infinite, deterministic, resumable stream of ``PackedBatch`` (see the module docstring for packing).

    Rank ``r`` of ``world_size`` takes global micro-batches ``r, r + w, r + 2w, ...`` (disjoint across ranks).
    ``state_dict()`` after any batch + ``load_state_dict()`` on a fresh loader resumes the exact stream.
    """

    def __init__(self, index: ShardIndex, *, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if seq_len < 1 or micro_batch < 1:
            raise ValueError(f"seq_len and micro_batch must be >= 1, got {seq_len} and {micro_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.index, self.seq_len, self.micro_batch = index, seq_len, micro_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.docs = index.documents()  # [num_docs, 3] (shard, start, end)
        if len(self.docs) == 0:
            raise ValueError(f"token cache {index.root} holds no documents")
        self._epoch, self._doc, self._offset, self._step = 0, 0, 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    @property
    def epoch(self) -> int:
        """Epoch of the next token to be read."""
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "doc": self._doc, "offset": self._offset, "step": self._step,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "rank"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has "
                                 f"{key}={getattr(self, key)}")
        self._epoch, self._doc, self._offset, self._step = (int(state[k]) for k in ("epoch", "doc", "offset", "step"))

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.docs)
            self._order = (np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def _pieces(self, n: int) -> list[tuple[int, int, int]]:
        """Advance the cursor by ``n`` tokens; returns the (shard, start, end) pieces read, in order."""
        pieces = []
        while n > 0:
            shard, start, end = self.docs[self._order_for(self._epoch)[self._doc]]
            take = min(n, int(end - start) - self._offset)
            pieces.append((int(shard), int(start) + self._offset, int(start) + self._offset + take))
            self._offset += take
            n -= take
            if start + self._offset == end:  # document done: next one (next epoch after the last)
                self._doc, self._offset = self._doc + 1, 0
                if self._doc == len(self.docs):
                    self._epoch, self._doc = self._epoch + 1, 0
        return pieces

    def _batch(self, pieces: list[tuple[int, int, int]]) -> PackedBatch:
        n = self.micro_batch * self.seq_len
        ids = np.concatenate([self.index.tokens(s)[a:b] for s, a, b in pieces]).astype(np.int64)
        # boundaries: every piece start (document pieces) and every row start
        piece_starts = np.cumsum([0] + [b - a for _, a, b in pieces[:-1]])
        bounds = np.union1d(piece_starts, np.arange(0, n, self.seq_len))
        cu = np.append(bounds, n)
        seg_len = np.diff(cu)
        pos = np.arange(n) - np.repeat(bounds, seg_len)
        labels = ids.copy()
        labels[bounds] = IGNORE_INDEX  # nothing is predicted across a boundary
        if self.index.sft:
            mask = np.concatenate([self.index.mask(s)[a:b] for s, a, b in pieces])
            labels[mask == 0] = IGNORE_INDEX
        return PackedBatch(
            input_ids=torch.from_numpy(ids)[None],  # [1, N]
            labels=torch.from_numpy(labels)[None],  # [1, N]
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),  # [D + 1]
            position_ids=torch.from_numpy(pos.astype(np.int64))[None],  # [1, N]
            num_tokens=int((labels != IGNORE_INDEX).sum()),
        )

    def __iter__(self) -> Iterator[PackedBatch]:
        n = self.micro_batch * self.seq_len
        while True:
            mine = self._step % self.world_size == self.rank
            pieces = self._pieces(n)  # other ranks' batches only move the cursor
            self._step += 1
            if mine:
                yield self._batch(pieces)


class MixedLoader:
    """Interleaves the micro-batches of two :class:`PackedLoader` s: micro-batch ``k`` (counted per rank) comes from
    ``second`` when ``floor((k + 1) * fraction) > floor(k * fraction)``, else from ``first`` -- a fixed schedule that
    spreads ``second``'s share evenly. ``state_dict()`` holds ``k`` and both loaders' cursors, so a resumed run
    continues the same sequence (every rank follows the same schedule, so the loaders stay in step across ranks).
    """

    def __init__(self, first: PackedLoader, second: PackedLoader, fraction: float):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction of micro-batches from the second loader must be in (0, 1), got {fraction}")
        self.first, self.second, self.fraction = first, second, fraction
        self._k = 0

    def takes_second(self, k: int) -> bool:
        return math.floor((k + 1) * self.fraction) > math.floor(k * self.fraction)

    def state_dict(self) -> dict:
        return {"k": self._k, "first": self.first.state_dict(), "second": self.second.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not {"k", "first", "second"} <= set(state):
            raise ValueError("loader state was saved by a single-source stage, not a mixed one")
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])
        self._k = int(state["k"])

    def __iter__(self) -> Iterator[PackedBatch]:
        its = (iter(self.first), iter(self.second))
        while True:
            src = its[1] if self.takes_second(self._k) else its[0]
            self._k += 1
            yield next(src)


def eval_windows(index_or_tokens: ShardIndex | np.ndarray | torch.Tensor | Sequence[int], seq_len: int,
                 max_windows: int) -> torch.Tensor:
    """Non-overlapping windows from the start of a token stream: int64 [n, seq_len], n <= max_windows.

    A ``ShardIndex`` is read in stored document order (shard 0 first); deterministic, no shuffling.
    """
    if seq_len < 1 or max_windows < 1:
        raise ValueError(f"seq_len and max_windows must be >= 1, got {seq_len} and {max_windows}")
    need = seq_len * max_windows
    if isinstance(index_or_tokens, ShardIndex):
        parts, have = [], 0
        for s in range(index_or_tokens.num_shards):
            if have >= need:
                break
            part = np.asarray(index_or_tokens.tokens(s)[: need - have], dtype=np.int64)
            parts.append(part)
            have += len(part)
        tokens = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    else:
        tokens = torch.as_tensor(np.asarray(index_or_tokens), dtype=torch.long).reshape(-1)[:need]
    n = min(max_windows, tokens.numel() // seq_len)
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of seq_len={seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).clone()  # [n, seq_len]
