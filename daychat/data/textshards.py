"""Text shards: the parquet layout every data stage reads and writes.

A text dataset is a folder:

    manifest.json           {"format": ..., "shards": [{"file", "split", "rows", "chars", "bytes", "sha256", "origin"}]}
    shard_00000.parquet     columns id: string, text: string, source: string; zstd; row groups of 1024 docs
    ...

`split` is "train" or "val"; by convention the validation split is the last shard. Readers go through
the manifest, so a stray file in the folder is never read, and a shard listed but missing or corrupt is
reported by name. Readers stream row group by row group: memory stays flat in the corpus size.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from daychat.errors import UserError
from daychat.io import sha256_file, write_json

MANIFEST = "manifest.json"
FORMAT = "daychat.textshards/1"
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
ROW_GROUP_DOCS = 1024
SPLITS = ("train", "val")


@dataclass
class ShardInfo:
    file: str  # name inside the dataset folder
    split: str  # "train" | "val"
    rows: int = 0
    chars: int = 0
    bytes: int = 0  # size of the parquet file on disk
    sha256: str = ""
    origin: str = ""  # where it came from: a URL, a local path, "embedded:stdlib", ...

    @property
    def name(self) -> str:
        """The shard's name in per-shard jobs (`--shard NAME`): its file name without the suffix. The
        Snakefile reads the same names through workflow/dag.shard_names."""
        return Path(self.file).stem


def read_manifest(folder: str | os.PathLike) -> list[ShardInfo]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: {folder} is not a finished text dataset (rerun the stage that writes it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shards = [ShardInfo(**s) for s in data["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}); rerun the stage that writes it") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
    return shards


def verify_shards(folder: str | os.PathLike, shard: str | None = None) -> None:
    """Check each shard of `folder` (or the one named `shard`) against the sha256 its manifest recorded:
    a file damaged or replaced after the stage that wrote it stops the reader with a line naming it,
    not with whatever the parquet decoder makes of it (a zstd error naming no file, or silently wrong
    text). Hashing runs at disk speed, a small cost beside reading and processing the same bytes."""
    folder = Path(folder)
    for info in read_manifest(folder):
        if shard is not None and info.name != shard or not info.sha256:
            continue
        path = folder / info.file
        if not path.is_file():
            raise UserError(f"{path} is listed in {folder / MANIFEST} but missing; rerun the stage that writes {folder}")
        if sha256_file(path) != info.sha256:
            raise UserError(f"{path} does not match the sha256 in {folder / MANIFEST}: it was damaged or replaced after "
                            f"it was written; restore it (dvc checkout {folder}) or rerun the stage that writes it")


def write_manifest(folder: str | os.PathLike, shards: Iterable[ShardInfo], **extra) -> None:
    shards = list(shards)
    for split in SPLITS:
        if not any(s.split == split for s in shards):
            raise UserError(f"{folder}: no {split} shard; a dataset needs at least one train and one val shard")
    write_json(Path(folder) / MANIFEST, {"format": FORMAT, **extra, "shards": [asdict(s) for s in shards]})


def shard_paths(folder: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Paths of the shards of one split (or all), in manifest order; each must exist."""
    folder = Path(folder)
    paths = []
    for s in read_manifest(folder):
        if split is None or s.split == split:
            path = folder / s.file
            if not path.is_file():
                raise UserError(f"{path} is listed in {folder / MANIFEST} but missing; rerun the stage that writes it")
            paths.append(path)
    return paths


def iter_text_batches(path: str | os.PathLike, batch_docs: int = ROW_GROUP_DOCS,
                      column: str = "text") -> Iterator[list[str]]:
    """Documents of one shard, `batch_docs` at a time. A corrupt file or a missing column is a UserError."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise UserError(f"{path} has no {column!r} column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=batch_docs, columns=[column]):
            yield [t if t is not None else "" for t in batch.column(0).to_pylist()]
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet shard ({e}); delete it and rerun the stage that wrote it") from None


def iter_texts(paths: Iterable[str | os.PathLike], batch_docs: int = ROW_GROUP_DOCS) -> Iterator[str]:
    for path in paths:
        for batch in iter_text_batches(path, batch_docs):
            yield from batch


def verify_parquet(path: str | os.PathLike, column: str = "text") -> tuple[int, int]:
    """Read a parquet file through to the end; return (rows, chars of `column`). Raise UserError if corrupt."""
    rows = chars = 0
    for batch in iter_text_batches(path, column=column):
        rows += len(batch)
        chars += sum(map(len, batch))
    return rows, chars


class ShardWriter:
    """Write one text shard atomically: rows are buffered per row group, the file appears on close."""

    def __init__(self, path: str | os.PathLike, split: str, origin: str = ""):
        self.path = Path(path)
        self.info = ShardInfo(file=self.path.name, split=split, origin=origin)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd")
        self._rows: list[tuple[str, str, str]] = []

    def write(self, doc_id: str, text: str, source: str) -> None:
        self._rows.append((doc_id, text, source))
        self.info.rows += 1
        self.info.chars += len(text)
        if len(self._rows) >= ROW_GROUP_DOCS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            ids, texts, sources = zip(*self._rows)
            table = pa.table([pa.array(ids, pa.string()), pa.array(texts, pa.string()),
                              pa.array(sources, pa.string())], schema=SCHEMA)
            self._writer.write_table(table, row_group_size=ROW_GROUP_DOCS)
            self._rows.clear()

    def close(self) -> ShardInfo:
        self._flush()
        self._writer.close()
        self.info.bytes = self._tmp.stat().st_size
        self.info.sha256 = sha256_file(self._tmp)
        os.replace(self._tmp, self.path)
        return self.info

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
