"""Token shards: the pretokenized corpus, written in parallel and read back through memory maps.

A token dataset is a folder, one pair of files per text shard, in the text dataset's split folders:

    meta.json                   format, dtype, vocab_size, bos_id, tokenizer_sha256, and per shard:
                                file, index, split, tokens, docs, text_bytes, source, source_sha256
    train/shard_00000.bin       flat little-endian token ids (uint16 or uint32, see `token_dtype`);
                                every document is <|bos|> followed by its tokens, documents back to back
    train/shard_00000.idx.npy   int64 (docs,): the offset of each document's <|bos|> in the .bin, so a
                                loader can pack whole documents into rows without scanning for BOS
    val/shard_00007.bin, val/shard_00007.idx.npy, ...

Writing streams: a shard is read one row-group batch (`batch_docs` documents) at a time, encoded and
appended to its .bin, so memory stays flat in the corpus size. Shards are spread over processes (one
shard per process at a time); when there are fewer shards than workers, each process also encodes a
batch on several threads (tiktoken releases the GIL).

Per shard (a scheduler runs one job per shard, see workflow/dag.py): `pretokenize_part` encodes one
shard into a part folder, the same two files the full run writes for it plus part.json (its meta.json
entry and when it ran); `gather_parts` then links every shard's files into the dataset and writes the
same meta.json. Both paths encode with `_encode_job` and describe with `_build_meta`, so the dataset is
byte-identical whichever way it was made (tests/test_pretokenize.py checks it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from daychat.progress import progress
from daychat.data.parts import PART, corrupt, find_shard, read_part
from daychat.data.textshards import (
    MANIFEST,
    ShardInfo,
    iter_text_batches,
    read_manifest,
    shard_paths,
)
from daychat.errors import UserError
from daychat.io import link_or_copy, sha256_file, write_json
from daychat.tokenizer import TIKTOKEN_FILE, Tokenizer

FORMAT = "daychat.tokens/1"
META = "meta.json"
# A part's part.json (daychat.data.parts) holds the shard's meta.json entry, dtype, tokenizer hash and timing.
PART_FORMAT = "daychat.tokens.part/1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536: half the disk and loader bandwidth), else uint32."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise UserError(f"params.yaml: pretokenize.dtype uint16 cannot hold a vocab of {vocab_size} ids (max 65536); "
                        "use auto or uint32")
    return DTYPES[dtype]


@dataclass
class TokenShardInfo:
    file: str  # the .bin, relative to the token dataset folder
    index: str  # the .idx.npy
    split: str
    tokens: int = 0  # BOS included
    docs: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the text encoded
    source: str = ""  # text shard file name in the text dataset
    source_sha256: str = ""


# ----------------------------------------------------------------------------------------------------
# Writing


def encode_shard(tok: Tokenizer, text_path: Path, bin_path: Path, idx_path: Path, dtype: np.dtype, batch_docs: int,
                 threads: int = 1, on_batch: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Encode one text shard into `bin_path` (+ `idx_path`); return (tokens, docs, text_bytes).

    `on_batch(chars)` is called after each batch with the characters it held (for progress).
    """
    bos = np.array([tok.bos_id], dtype=np.uint32)
    token_bytes = tok.token_bytes()
    starts = []  # per batch: int64 (batch docs,) offsets of each document's BOS
    tokens = text_bytes = 0
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    with open(bin_path, "wb") as f, ThreadPoolExecutor(threads) as pool:
        for texts in iter_text_batches(text_path, batch_docs):
            if not texts:
                continue
            docs = list(pool.map(tok.encode_array, texts)) if threads > 1 else [tok.encode_array(t) for t in texts]
            lengths = np.array([len(ids) + 1 for ids in docs], dtype=np.int64)  # +1: the BOS
            starts.append(tokens + np.cumsum(lengths) - lengths)
            flat = np.concatenate([part for ids in docs for part in (bos, ids)]).astype(dtype)
            flat.tofile(f)
            tokens += len(flat)
            text_bytes += int(token_bytes[flat].sum())  # BOS counts 0 bytes
            if on_batch:
                on_batch(sum(map(len, texts)))
    offsets = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    np.save(idx_path, offsets)
    return tokens, len(offsets), text_bytes


@dataclass(frozen=True)
class _Job:
    tokenizer: Path
    text: Path
    out: Path
    info: TokenShardInfo
    dtype: str
    batch_docs: int
    threads: int


def _encode_job(job: _Job, on_batch: Callable[[int], None]) -> TokenShardInfo:
    tok = Tokenizer.load(job.tokenizer)  # ~0.1 s per shard, which takes seconds to minutes
    info = job.info
    tokens, docs, text_bytes = encode_shard(tok, job.text, job.out / info.file, job.out / info.index,
                                            np.dtype(job.dtype), job.batch_docs, job.threads, on_batch)
    return replace(info, tokens=tokens, docs=docs, text_bytes=text_bytes)


# Set in each worker process by `_init_worker`: the queue that carries progress (characters encoded)
# back to the parent. A multiprocessing queue can only reach a child when the child starts.
_progress_queue = None


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _encode_job_in_worker(job: _Job) -> TokenShardInfo:
    return _encode_job(job, _progress_queue.put)


def plan_workers(workers: int, shards: int) -> tuple[int, int]:
    """(processes, threads per process) for `workers` cores (0 = all) and `shards` shards.

    Processes over shards first: each one also reads and converts its shard's text in parallel, which
    threads in one process cannot (bench/data.py on 2 cores, gutenberg: 2 processes 33 MB/s, 1 process
    with 2 threads 19 MB/s). Threads take the cores that shards cannot fill.
    """
    workers = workers or os.cpu_count() or 1
    processes = max(1, min(workers, shards))
    return processes, max(1, workers // processes)


def _plan_job(data: Path, tokenizer: Path, shard: ShardInfo, out: Path, np_dtype: np.dtype, batch_docs: int,
              threads: int) -> _Job:
    """How one text shard becomes its token files under `out` (the same names in a full run and a part)."""
    stem = f"{shard.split}/{Path(shard.file).stem}"
    info = TokenShardInfo(file=f"{stem}.bin", index=f"{stem}.idx.npy", split=shard.split,
                          source=shard.file, source_sha256=shard.sha256)
    return _Job(tokenizer, data / shard.file, out, info, np_dtype.name, batch_docs, threads)


def _build_meta(tok: Tokenizer, tokenizer: Path, np_dtype: np.dtype, infos: list[TokenShardInfo]) -> dict:
    return {
        "format": FORMAT,
        "dtype": np_dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "tokenizer_sha256": sha256_file(tokenizer / TIKTOKEN_FILE),
        "shards": [asdict(info) for info in infos],
    }


def pretokenize(data: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike,
                dtype: str = "auto", workers: int = 0, batch_docs: int = 512) -> dict:
    """Encode every shard of the text dataset `data` into token shards under `out`; return meta.json's dict.

    `out` is written into directly: the caller makes it atomic (the stage builds it under a temporary
    name with `daychat.io.atomic_dir`).
    """
    data, tokenizer, out = Path(data), Path(tokenizer), Path(out)
    tok = Tokenizer.load(tokenizer)
    np_dtype = token_dtype(tok.vocab_size, dtype)
    manifest = read_manifest(data)
    shard_paths(data)  # every listed shard must exist: fail before starting workers
    processes, threads = plan_workers(workers, len(manifest))
    jobs = [_plan_job(data, tokenizer, shard, out, np_dtype, batch_docs, threads) for shard in manifest]
    total_chars = sum(s.chars for s in manifest) or None
    with progress(total=total_chars, desc="pretokenize", unit="char", unit_scale=True) as bar:
        if processes == 1:
            infos = [_encode_job(job, bar.update) for job in jobs]
        else:
            infos = _run_in_pool(jobs, processes, bar.update)
    meta = _build_meta(tok, tokenizer, np_dtype, infos)
    write_json(out / META, meta)
    return meta


def pretokenize_part(data: str | os.PathLike, tokenizer: str | os.PathLike, shard: str, out: str | os.PathLike,
                     dtype: str = "auto", workers: int = 0, batch_docs: int = 512) -> dict:
    """Encode the one shard named `shard` of `data` into the part folder `out`; return part.json's dict.

    `out` gets the shard's .bin and .idx.npy under the names a full run gives them, and part.json. As in
    `pretokenize`, the caller makes `out` atomic, so a part folder that exists is a finished part.
    """
    data, tokenizer, out = Path(data), Path(tokenizer), Path(out)
    started = time.time()  # wall clock, comparable across the machines that run the parts
    tok = Tokenizer.load(tokenizer)
    np_dtype = token_dtype(tok.vocab_size, dtype)
    info = find_shard(read_manifest(data), shard, data / MANIFEST)
    _, threads = plan_workers(workers, 1)  # one shard: the cores go to threads
    job = _plan_job(data, tokenizer, info, out, np_dtype, batch_docs, threads)
    with progress(total=info.chars or None, desc=f"pretokenize {shard}", unit="char", unit_scale=True) as bar:
        info = _encode_job(job, bar.update)
    part = {"format": PART_FORMAT, "dtype": np_dtype.name, "tokenizer_sha256": sha256_file(tokenizer / TIKTOKEN_FILE),
            "shard": asdict(info), "started": started, "finished": time.time()}
    write_json(out / PART, part)
    return part


def gather_parts(data: str | os.PathLike, tokenizer: str | os.PathLike, parts: str | os.PathLike,
                 out: str | os.PathLike, dtype: str = "auto") -> tuple[dict, list[dict]]:
    """Assemble the token dataset `out` from the finished parts `parts/<shard>/` of every shard of `data`;
    return (meta.json's dict, the parts' part.json dicts).

    A part is checked against what the dataset needs now (the shard's sha256 in the manifest, the
    tokenizer's hash, the dtype), so a part left from other inputs is never taken. Files are hard-linked
    (no copy, and the part stays as it was) or copied where a link is impossible (another filesystem).
    """
    data, tokenizer, parts, out = Path(data), Path(tokenizer), Path(parts), Path(out)
    tok = Tokenizer.load(tokenizer)
    np_dtype = token_dtype(tok.vocab_size, dtype)
    tokenizer_sha256 = sha256_file(tokenizer / TIKTOKEN_FILE)
    found, infos = [], []
    for shard in read_manifest(data):
        part = read_part(parts, shard.name, "pretokenize", of=data)
        path = parts / shard.name / PART
        try:
            info = TokenShardInfo(**part["shard"])
        except (KeyError, TypeError) as e:
            raise corrupt(path, e) from None
        if (part.get("format"), info.source_sha256, part.get("tokenizer_sha256"), part.get("dtype")) != \
                (PART_FORMAT, shard.sha256, tokenizer_sha256, np_dtype.name):
            raise UserError(f"{path} was made from other inputs (shard, tokenizer or dtype changed); "
                            f"delete {path.parent} and rerun its shard job")
        for name in (info.file, info.index):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path.parent / name, out / name)
        found.append(part)
        infos.append(info)
    meta = _build_meta(tok, tokenizer, np_dtype, infos)
    write_json(out / META, meta)
    return meta, found


def _run_in_pool(jobs: list[_Job], processes: int, on_batch: Callable[[int], None]) -> list[TokenShardInfo]:
    # spawn, not fork: the parent holds pyarrow and tiktoken thread pools, which fork can leave locked.
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        futures = [pool.submit(_encode_job_in_worker, job) for job in jobs]
        while not all(f.done() for f in futures):
            _drain(progress_queue, on_batch, timeout=0.2)
            if any(_failed(f) for f in futures):
                # Stop at the first bad shard: shards not started are cancelled, running ones finish
                # (still drained, so no worker blocks on a full queue at exit).
                for f in futures:
                    f.cancel()
        _drain(progress_queue, on_batch, timeout=0)
    for f in futures:
        if _failed(f):
            raise f.exception()
    return [f.result() for f in futures]


def _failed(f: Future) -> bool:
    return f.done() and not f.cancelled() and f.exception() is not None


def _drain(progress_queue, on_batch: Callable[[int], None], timeout: float) -> None:
    try:
        on_batch(progress_queue.get(timeout=timeout) if timeout else progress_queue.get_nowait())
        while True:
            on_batch(progress_queue.get_nowait())
    except queue.Empty:
        pass


# ----------------------------------------------------------------------------------------------------
# Reading


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise UserError(f"{path} not found: {folder} is not a finished token dataset (run the pretokenize stage)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["shards"] = [TokenShardInfo(**s) for s in meta["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}); rerun the pretokenize stage") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; rerun the pretokenize stage")
    return meta


class TokenShards:
    """One split of a token dataset, memory-mapped: nothing is read until it is indexed.

    `shards[i]` is a read-only (tokens,) array of shard i and `doc_starts[i]` its int64 (docs,) BOS
    offsets. Opening checks every file against meta.json, so a truncated or swapped file is a UserError
    naming it rather than garbage fed to training.
    """

    def __init__(self, folder: str | os.PathLike, split: str = "train"):
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size: int = meta["vocab_size"]
        self.bos_id: int = meta["bos_id"]
        self.tokenizer_sha256: str = meta["tokenizer_sha256"]
        self.infos = [s for s in meta["shards"] if s.split == split]
        if not self.infos:
            raise UserError(f"{self.folder / META} lists no {split} shard")
        self.shards = [self._open_tokens(info) for info in self.infos]
        self.doc_starts = [self._open_index(info) for info in self.infos]

    def _open_tokens(self, info: TokenShardInfo) -> np.ndarray:
        path = self.folder / info.file
        if not path.is_file():
            raise UserError(f"{path} is listed in {self.folder / META} but missing; rerun the pretokenize stage")
        size = path.stat().st_size
        if size != info.tokens * self.dtype.itemsize:
            raise UserError(f"{path} holds {size / self.dtype.itemsize:g} tokens, meta.json says {info.tokens} "
                            "(truncated or replaced); rerun the pretokenize stage")
        if info.tokens == 0:  # an empty file cannot be memory-mapped
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def _open_index(self, info: TokenShardInfo) -> np.ndarray:
        path = self.folder / info.index
        try:
            starts = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or unreadable ({e}); rerun the pretokenize stage") from None
        if starts.shape != (info.docs,) or starts.dtype != np.int64:
            raise UserError(f"{path} has {starts.shape} {starts.dtype} offsets, meta.json says ({info.docs},) int64; "
                            "rerun the pretokenize stage")
        return starts

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def tokens(self) -> int:
        return sum(info.tokens for info in self.infos)

    @property
    def docs(self) -> int:
        return sum(info.docs for info in self.infos)

    def documents(self) -> Iterator[np.ndarray]:
        """Every document in order, as a view (BOS, tokens...) into its shard."""
        for shard, starts in zip(self.shards, self.doc_starts):
            ends = np.append(starts[1:], len(shard))
            for start, end in zip(starts.tolist(), ends.tolist()):
                yield shard[start:end]


class EncodedTexts:
    """A text encoded in memory with the layout TokenShards has (one shard: BOS before every document),
    so PackedLoader and the val-batch helpers read it like a split of a token dataset."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, folder: Path, sha256: str):
        self.shards, self.doc_starts = [tokens], [doc_starts]
        self.folder, self.sha256 = folder, sha256

    @property
    def tokens(self) -> int:
        return len(self.shards[0])


def encode_texts(path: str | os.PathLike, tok: Tokenizer, key: str) -> EncodedTexts:
    """Every document of a local text source (a parquet file with a `text` column, jsonl / jsonl.gz with a
    `text` key, txt: one document per file; a file, a folder or a glob, read as download.source: local
    reads it) encoded with `tok`. `key` names the params key in messages. Its sha256 covers the files read.
    Meant for a held-out evaluation text (pretrain.eval_text): a few MB, held in memory. Line endings are
    normalised to "\n": a file's convention is not its content, and a model that never saw "\r" (web text
    has none) would otherwise pay ~30 nats on every line of a CRLF file (Project Gutenberg's: 7-9 bits per
    byte instead of ~2.5, and a seed spread larger than any data effect)."""
    import hashlib

    from daychat.data.sources import Stats, local_files, parquet_documents, text_documents

    try:
        files, root = local_files(str(path))
    except UserError as e:
        raise UserError(str(e).replace("download.path", key)) from None
    digest = hashlib.sha256()
    ids: list[np.ndarray] = []
    for f in files:
        digest.update(f.name.encode() + sha256_file(f).encode())
        docs = (parquet_documents(f, text_field="text", source="eval", id_prefix=f.name) if f.suffix == ".parquet"
                else text_documents([f], root, text_field="text", source="eval", stats=Stats()))
        ids += [tok.encode_array(d.text.replace("\r\n", "\n").replace("\r", "\n")) for d in docs if d.text]
    if not ids:
        raise UserError(f"{key}: {path} holds no text")
    lengths = np.array([len(a) + 1 for a in ids], dtype=np.int64)
    bos = np.array([tok.bos_id], dtype=np.uint32)
    flat = np.concatenate([part for a in ids for part in (bos, a.astype(np.uint32))])
    return EncodedTexts(flat, np.cumsum(lengths) - lengths, Path(path), digest.hexdigest())
