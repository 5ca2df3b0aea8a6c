"""Where the pretraining text comes from: the library behind the `download` stage.

Four sources (params `download.source`), one output: a text-shard folder (daychat.data.textshards) of
parquet shards `id, text, source` whose LAST shard is the validation split.

    hf        a public dataset by preset name (HF_PRESETS); the validation shard is the dataset's own
              last shard, as nanochat does, so it stays the same whatever `shards` is
    url       a mirror of the same layout over http(s):// or file://; validation = shard `shards-1`
    local     a directory or glob of parquet (one output shard per file) or jsonl / jsonl.gz / txt
              (a stream of documents, re-sharded into `shard_chars` characters per shard)
    embedded  text that ships with Python and the installed packages (docstrings, the language
              reference, package descriptions): the offline demo, deterministic for a given Python and
              set of installed packages

Remote shards go through a persistent cache folder (not a DVC output). A download writes
`<name>.part`; a later attempt, or a later run, resumes it with an HTTP Range request; only a file that
opens and reads to the end as parquet (and matches the server's sha256 when the server gives one) is
renamed to `<name>`. So an interrupted run resumes where it stopped, a run with more shards fetches only
the new ones, and a corrupt shard is fetched again or reported by name, never passed on.

The same work also runs one output shard at a time (plan, one job per shard, gather: the last section),
with the same functions, so that a workflow engine can spread a download over jobs or machines.
"""

from __future__ import annotations

import ast
import codecs
import glob
import gzip
import hashlib
import http.client
import importlib.metadata
import json
import os
import random
import re
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from email.message import Message
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from daychat.progress import progress
from daychat.data.parts import PART, corrupt, find_shard, read_part
from daychat.data.textshards import ROW_GROUP_DOCS, SCHEMA, ShardInfo, ShardWriter, verify_parquet
from daychat.errors import UserError
from daychat.io import link_or_copy, sha256_file, write_json
from daychat.sections import DownloadParams, ParamsError


@dataclass(frozen=True)
class HfPreset:
    base_url: str
    last_index: int  # the dataset's last shard, its validation shard by default
    licence: str


HF_PRESETS: dict[str, HfPreset] = {
    # FineWeb-Edu 100B tokens, pre-shuffled by Karpathy for nanochat into 1823 shards of ~250M characters.
    "fineweb-edu": HfPreset(
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822,
        "ODC-By 1.0 (FineWeb-Edu; Common Crawl's terms of use also apply)"),
    # ClimbMix 400B tokens, same layout. NVIDIA releases ClimbMix under CC BY-NC 4.0 "for research and
    # development only": a model trained on it is not for commercial use.
    "climbmix": HfPreset(
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542,
        "NVIDIA ClimbMix, CC BY-NC 4.0: non-commercial use only"),
}

SHARD_NAME = "shard_{:05d}.parquet"  # output shards, numbered in manifest order (validation last)
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
EMBEDDED_SEED = 0
MIN_EMBEDDED_DOC_CHARS = 200  # shorter docstrings / descriptions are boilerplate ("Return self.")
SINGLE_SHARD_VAL_FRACTION = 0.1  # when all the text fits in one shard, this share of it becomes validation
RETRY_STATUS = {408, 425, 429}  # client errors that are about timing, not about the request: retried
MAX_BACKOFF_S = 60.0
CHUNK = 1 << 20
USER_AGENT = "daychat-download/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (from JSON escapes) cannot be written as UTF-8


class Doc(NamedTuple):
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class RemoteShard:
    index: int  # position in the remote dataset
    url: str
    split: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass
class Stats:
    """What happened on the way, beyond the shards themselves (summed into the metrics)."""

    download_bytes: int = 0  # fetched this run (a resumed shard counts only its new bytes)
    cached_shards: int = 0  # remote shards already complete in the cache
    retries: int = 0  # repeated attempts: dropped connections, 5xx, shards that failed verification
    replaced_chars: int = 0  # undecodable bytes (and lone surrogates) replaced by U+FFFD
    bad_utf8_docs: int = 0  # documents that had any
    skipped_docs: int = 0  # empty documents; embedded texts under MIN_EMBEDDED_DOC_CHARS


@dataclass
class Download:
    """The result of `download()`: shards written, manifest header, counters, notes for the log."""

    shards: list[ShardInfo]
    about: dict  # goes into the manifest beside the shard list: source, dataset, licence, ...
    stats: Stats
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float | int]:
        val = [s for s in self.shards if s.split == "val"]
        return {
            "shards": len(self.shards),
            "train_shards": len(self.shards) - len(val),
            "val_shards": len(val),
            "docs": sum(s.rows for s in self.shards),
            "val_docs": sum(s.rows for s in val),
            "chars": sum(s.chars for s in self.shards),
            "val_chars": sum(s.chars for s in val),
            "bytes": sum(s.bytes for s in self.shards),
            "download_bytes": self.stats.download_bytes,
            "cached_shards": self.stats.cached_shards,
            "retries": self.stats.retries,
            "replaced_chars": self.stats.replaced_chars,
            "bad_utf8_docs": self.stats.bad_utf8_docs,
            "skipped_docs": self.stats.skipped_docs,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.stats.download_bytes / 1e6 / self.seconds, 3) if self.seconds else 0.0,
        }

    def summary(self) -> str:
        m = self.metrics()
        line = (f"{m['shards']} shards ({m['train_shards']} train + {m['val_shards']} val), {m['docs']:,} docs, "
                f"{m['chars'] / 1e6:,.1f}M chars, {m['bytes'] / 1e6:,.1f} MB")
        if self.about["source"] in ("hf", "url"):
            line += (f"; fetched {m['download_bytes'] / 1e6:,.1f} MB at {m['mb_per_s']:.1f} MB/s, "
                     f"{m['cached_shards']} shards from the cache, {m['retries']} retries")
        if m["replaced_chars"]:
            line += f"; {m['replaced_chars']:,} undecodable chars replaced in {m['bad_utf8_docs']:,} docs"
        return line


def download(p: DownloadParams, out: str | os.PathLike, cache: str | os.PathLike, *,
             backoff_s: float = 1.0) -> Download:
    """Write the shards of source `p.source` into folder `out` (the stage's temporary one); the caller
    writes the manifest from the result and renames the folder into place."""
    t0 = time.perf_counter()
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    if p.source in ("hf", "url"):
        result = _download_remote(p, out, cache, backoff_s)
    elif p.source == "local":
        result = _download_local(p, out)
    else:
        result = _download_embedded(p, out)
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------------------------------
# hf / url: remote shards through the cache


def remote_plan(p: DownloadParams) -> tuple[list[RemoteShard], dict]:
    """The shards to fetch (shards-1 train, then the validation shard) and the manifest header."""
    if p.source == "hf":
        preset = HF_PRESETS[p.dataset]
        base, last = preset.base_url, preset.last_index
        about = {"source": "hf", "dataset": p.dataset, "base_url": base, "licence": preset.licence}
        if p.shards - 1 > last:
            raise ParamsError("download.shards", f"must be <= {last + 1} for {p.dataset} (it has {last + 1} shards), got {p.shards}")
        val = last if p.val_shard == -1 else p.val_shard
        if not p.shards - 1 <= val <= last:
            raise ParamsError("download.val_shard", f"must be in {p.shards - 1}..{last} for {p.dataset} "
                                                   f"(past the train shards) or -1, got {p.val_shard}")
    else:
        base = p.url.rstrip("/")
        about = {"source": "url", "dataset": _url_name(base), "base_url": base}
        val = p.shards - 1 if p.val_shard == -1 else p.val_shard
    indices = [*range(p.shards - 1), val]
    splits = ["train"] * (p.shards - 1) + ["val"]
    try:
        plan = [RemoteShard(i, f"{base}/{p.pattern.format(index=i)}", split) for i, split in zip(indices, splits)]
    except (KeyError, IndexError, ValueError) as e:
        raise ParamsError("download.pattern", f"cannot be filled with an index ({e}): {p.pattern!r}") from None
    return plan, about


def cache_folder(cache: str | os.PathLike, base_url: str) -> Path:
    """The cache subfolder of one remote dataset: readable, and distinct for two mirrors of the same layout."""
    parsed = urllib.parse.urlsplit(base_url)
    slug = re.sub(r"[^\w.-]+", "_", f"{parsed.netloc}{parsed.path}").strip("_")[-80:]
    return Path(cache) / f"{slug}-{hashlib.sha1(base_url.encode()).hexdigest()[:8]}"


def _download_remote(p: DownloadParams, out: Path, cache: Path, backoff_s: float) -> Download:
    plan, about = remote_plan(p)
    folder = cache_folder(cache, about["base_url"])
    folder.mkdir(parents=True, exist_ok=True)
    stats = Stats()
    shards: list[ShardInfo | None] = [None] * len(plan)
    stop = threading.Event()  # set on the first failure so that the other downloads end early

    with ThreadPoolExecutor(p.workers) as pool, progress(total=len(plan), desc="download", unit="shard") as bar:
        futures = {pool.submit(remote_shard, p, s, folder, out / SHARD_NAME.format(i), about["dataset"],
                               backoff_s, stop): i for i, s in enumerate(plan)}
        try:
            for future in as_completed(futures):
                info, fetched = future.result()
                shards[futures[future]] = info
                stats.download_bytes += fetched.downloaded
                stats.cached_shards += fetched.cached
                stats.retries += fetched.retries
                bar.set_postfix_str(f"{stats.download_bytes / 1e6:,.0f} MB fetched", refresh=False)
                bar.update(1)
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    return Download(shards, about, stats, notes=_remote_notes(about))


def remote_shard(p: DownloadParams, shard: RemoteShard, folder: Path, dest: Path, source: str,
                 backoff_s: float = 1.0, stop: threading.Event | None = None) -> tuple[ShardInfo, Fetched]:
    """One remote shard: fetched into the cache `folder` (or found there), then put at `dest` as a text
    shard. The plain run does this on a thread per shard, a per-shard job once."""
    fetched = fetch_shard(shard, folder, text_field=p.text_field, retries=p.retries,
                          timeout_s=p.timeout_s, backoff_s=backoff_s, stop=stop)
    info = normalise_shard(fetched.path, dest, shard.split, text_field=p.text_field, source=source, origin=shard.url)
    return info, fetched


def _remote_notes(about: dict) -> list[str]:
    return [f"{about['dataset']}: licence {about['licence']}"] if "licence" in about else []


@dataclass(frozen=True)
class Fetched:
    path: Path  # the verified shard in the cache
    downloaded: int  # bytes fetched this run
    cached: bool  # it was complete in the cache already
    retries: int


class _Transient(Exception):
    """A failure worth another attempt: a dropped connection, a timeout, a 5xx answer."""


class _Corrupt(_Transient):
    """The bytes arrived but are not the shard: the partial file is deleted before the next attempt."""


class _Cancelled(Exception):
    """Another shard failed: this one stops where it is."""


def fetch_shard(shard: RemoteShard, folder: Path, *, text_field: str, retries: int, timeout_s: float,
                backoff_s: float = 1.0, stop: threading.Event | None = None) -> Fetched:
    """Make `folder/<name>` a verified copy of the shard: reuse it if complete, else download (resuming a
    `.part`), with up to `retries` further attempts after exponential backoff. UserError if it never verifies.
    Setting `stop` (another shard failed) ends it early, keeping the `.part` for the next run."""
    stop = stop or threading.Event()
    path = folder / shard.name
    if path.is_file():
        try:
            _verify(path, text_field, shard.url, expected_sha256=None)
            return Fetched(path, 0, cached=True, retries=0)
        except _Corrupt:  # damaged since it was verified (disk, a hand edit): fetch it again
            path.unlink()
    part = path.with_name(path.name + ".part")
    downloaded = 0

    def count(n: int) -> None:
        nonlocal downloaded
        downloaded += n

    error: _Transient | None = None
    for attempt in range(retries + 1):
        if attempt and stop.wait(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)):
            raise _Cancelled()
        try:
            expected = _fetch_once(shard.url, part, timeout_s, count, stop)
            _verify(part, text_field, shard.url, expected)
            os.replace(part, path)
            return Fetched(path, downloaded, cached=False, retries=attempt)
        except _Corrupt as e:
            part.unlink(missing_ok=True)
            error = e
        except _Transient as e:
            error = e
    raise UserError(f"shard {shard.name} failed {retries + 1} attempts ({error}): {shard.url}")


def _fetch_once(url: str, part: Path, timeout_s: float, count: Callable[[int], None],
                stop: threading.Event) -> str | None:
    """One attempt: append to `part` from where it ends; return the server's sha256 of the file, if it gives one."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    redirects = _RedirectHeaders()
    try:
        with urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers),
                                                         timeout=timeout_s) as response:
            if offset and response.status != 206:  # the server ignored Range (file:// does too): start over
                offset = 0
            size = _expected_size(response.headers, offset)
            with open(part, "ab" if offset else "wb") as f:
                while chunk := response.read(CHUNK):
                    if stop.is_set():
                        raise _Cancelled()
                    f.write(chunk)
                    count(len(chunk))
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # the .part is not a prefix of what the server has now
            part.unlink(missing_ok=True)
            raise _Transient("HTTP 416 for a resumed download, restarting it") from None
        if e.code >= 500 or e.code in RETRY_STATUS:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise UserError(f"HTTP {e.code} {e.reason}: {url}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError):
            raise UserError(f"not found: {url}") from None
        raise _Transient(f"{e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, a body cut short
        raise _Transient(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    have = part.stat().st_size
    if size is not None and have < size:
        raise _Transient(f"connection closed at {have:,} of {size:,} bytes")
    if size is not None and have > size:
        raise _Corrupt(f"{have:,} bytes where the server announced {size:,}")
    return _server_sha256([*redirects.headers, response.headers])


class _RedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of each redirect: Hugging Face states a file's sha256 on its 302, not on the CDN's answer."""

    def __init__(self) -> None:
        self.headers: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _expected_size(headers: Message, offset: int) -> int | None:
    content_range = headers.get("Content-Range", "")  # "bytes 100-199/200" on a 206
    if offset and "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _server_sha256(headers: list[Message]) -> str | None:
    """The file's sha256 where a server states it: Hugging Face's LFS `X-Linked-ETag`, or an `ETag` that is
    64 hex digits. Any other ETag (an md5, an inode-mtime tag) says nothing checkable and is ignored."""
    for key in ("X-Linked-ETag", "ETag"):
        for h in headers:
            value = (h.get(key) or "").removeprefix("W/").strip('"').lower()
            if _SHA256.fullmatch(value):
                return value
    return None


def _verify(path: Path, text_field: str, url: str, expected_sha256: str | None) -> None:
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        raise _Corrupt("not a parquet file (truncated?)") from None
    if text_field not in names:  # a complete file, just not the column asked for: fetching again won't help
        raise UserError(f"{url} has no {text_field!r} column (columns: {', '.join(names)}); "
                        f"set download.text_field")
    try:
        verify_parquet(path, text_field)
    except UserError:
        raise _Corrupt("the parquet file does not read to the end") from None
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise _Corrupt(f"sha256 differs from the server's {expected_sha256[:12]}...")


def _url_name(base_url: str) -> str:
    parsed = urllib.parse.urlsplit(base_url)
    return parsed.path.rstrip("/").rsplit("/", 1)[-1] or parsed.netloc or "mirror"


# ----------------------------------------------------------------------------------------------------
# Parquet shards: normalise to id/text/source, link when already in that layout


def normalise_shard(src: Path, dest: Path, split: str, *, text_field: str, source: str,
                    origin: str) -> ShardInfo:
    """Put parquet file `src` at `dest` as a text shard: hardlinked (or copied) when it already has exactly
    the columns id, text, source; otherwise rewritten with ids `<file stem>/<row>` and `source` where missing."""
    try:
        schema = pq.read_schema(src)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{src} is not a readable parquet file ({e})") from None
    if text_field not in schema.names:
        raise UserError(f"{src} has no {text_field!r} column (columns: {', '.join(schema.names)}); "
                        f"set download.text_field")
    if text_field == "text" and schema.remove_metadata().equals(SCHEMA, check_metadata=False):
        rows, chars = verify_parquet(src)
        link_or_copy(src, dest)
        return ShardInfo(file=dest.name, split=split, rows=rows, chars=chars, bytes=dest.stat().st_size,
                         sha256=sha256_file(dest), origin=origin)
    with ShardWriter(dest, split, origin) as writer:
        for doc in parquet_documents(src, text_field=text_field, source=source, id_prefix=src.name.split(".")[0]):
            writer.write(*doc)
    return writer.info


def parquet_documents(path: Path, *, text_field: str, source: str, id_prefix: str) -> Iterator[Doc]:
    """The documents of a parquet file, keeping its own `id` and `source` columns where it has them."""
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise UserError(f"{path} has no {text_field!r} column (columns: {', '.join(names)}); "
                            f"set download.text_field")
        has_id, has_source = "id" in names and text_field != "id", "source" in names and text_field != "source"
        columns = [text_field] + ["id"] * has_id + ["source"] * has_source
        row = 0
        for batch in pf.iter_batches(batch_size=ROW_GROUP_DOCS, columns=columns):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column("id").to_pylist() if has_id else [None] * len(texts)
            sources = batch.column("source").to_pylist() if has_source else [None] * len(texts)
            for i, (text, doc_id, src) in enumerate(zip(texts, ids, sources)):
                doc_id = f"{id_prefix}/{row + i}" if doc_id is None else str(doc_id)
                yield Doc(doc_id, text or "", src or source)
            row += len(texts)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({e})") from None


# ----------------------------------------------------------------------------------------------------
# local: a directory or glob of parquet / jsonl / jsonl.gz / txt


def local_files(path: str) -> tuple[list[Path], Path]:
    """The input files in sorted order, and the folder their document ids are relative to."""
    if glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"download.path: no files match {path} (in {Path.cwd()})")
        for f in files:
            if not f.name.endswith(LOCAL_SUFFIXES):
                raise UserError(f"{f} matches download.path but is not one of {', '.join(LOCAL_SUFFIXES)}")
        root = Path(os.path.expanduser(path))
        while glob.has_magic(str(root)):
            root = root.parent
        return files, root
    root = Path(path).expanduser()
    if root.is_file():
        if not root.name.endswith(LOCAL_SUFFIXES):
            raise UserError(f"download.path: {root} is not one of {', '.join(LOCAL_SUFFIXES)}")
        return [root], root.parent
    if not root.is_dir():
        raise UserError(f"download.path: {root.resolve()} does not exist")
    files = sorted(f for f in root.iterdir() if f.is_file() and f.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise UserError(f"download.path: {root} has no {', '.join(LOCAL_SUFFIXES)} files")
    return files, root


def local_inputs(p: DownloadParams) -> tuple[list[Path], Path, dict, bool]:
    """The input files, the folder their ids are relative to, the manifest header, and whether the files
    map one to one onto output shards (two or more parquet files) rather than being a document stream."""
    files, root = local_files(p.path)
    about = {"source": "local", "dataset": root.resolve().name or "local", "path": p.path}
    parquet = [f for f in files if f.suffix == ".parquet"]
    if parquet and len(parquet) < len(files):
        raise UserError(f"download.path: {p.path} mixes parquet with jsonl/txt files; point it at one kind")
    return files, root, about, len(parquet) >= 2


def local_shard(p: DownloadParams, src: Path, dest: Path, split: str, source: str) -> ShardInfo:
    """One input parquet file as one output shard (the one-to-one layout)."""
    info = normalise_shard(src, dest, split, text_field=p.text_field, source=source, origin=str(src.resolve()))
    if not info.rows:
        raise UserError(f"{src} has no rows")
    return info


def _download_local(p: DownloadParams, out: Path) -> Download:
    files, root, about, one_to_one = local_inputs(p)
    if one_to_one:  # one output shard per file, the last one validation
        shards = [local_shard(p, f, out / SHARD_NAME.format(i), "val" if i == len(files) - 1 else "train",
                              about["dataset"]) for i, f in enumerate(progress(files, desc="shards", unit="file"))]
        return Download(shards, about, Stats())
    stats = Stats()
    docs, origin = stream_documents(p, stats)
    shards = reshard(docs, out, shard_chars=p.shard_chars, max_chars=p.max_chars, origin=origin)
    return Download(shards, about, stats)


def stream_documents(p: DownloadParams, stats: Stats) -> tuple[Iterator[Doc], str]:
    """The document stream of a re-sharded source (embedded; local jsonl / txt / a single parquet file),
    empty documents left out, and the origin its shards record. Deterministic: the per-shard jobs each
    read it again and must see the documents the plan saw."""
    if p.source == "embedded":
        docs = _non_empty(embedded_documents(p.include, stats), stats)
        return _count_chars(docs, p.max_chars), f"embedded:{'+'.join(p.include)}"
    files, root, about, _ = local_inputs(p)
    if files[0].suffix == ".parquet":  # a single file: re-shard it like a stream, so that there is a validation shard
        docs = parquet_documents(files[0], text_field=p.text_field, source=about["dataset"],
                                 id_prefix=files[0].name.split(".")[0])
    else:
        docs = text_documents(files, root, text_field=p.text_field, source=about["dataset"], stats=stats)
    return _non_empty(docs, stats), f"local:{p.path}"


def text_documents(files: list[Path], root: Path, *, text_field: str, source: str, stats: Stats) -> Iterator[Doc]:
    """Documents of jsonl / jsonl.gz files (one per line, the `text_field` key) and txt files (one per
    file). Undecodable bytes become U+FFFD and are counted in `stats`, never a crash."""
    for f in progress(files, desc="files", unit="file"):
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".txt":
            text, replaced = _decode(f.read_bytes())
            _count_replaced(stats, replaced)
            yield Doc(rel, text, source)
            continue
        opener = gzip.open if f.name.endswith(".gz") else open
        try:
            with opener(f, "rb") as lines:
                for lineno, raw in enumerate(lines, 1):
                    if raw.strip():
                        text, replaced = _jsonl_text(raw, text_field, f"{f}:{lineno}")
                        _count_replaced(stats, replaced)
                        yield Doc(f"{rel}:{lineno}", text, source)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{f} cannot be read ({e})") from None


def _jsonl_text(raw: bytes, text_field: str, where: str) -> tuple[str, int]:
    line, replaced = _decode(raw)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where}: no {text_field!r} key (set download.text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: {text_field!r} is a {type(text).__name__}, not a string")
    text, surrogates = _SURROGATE.subn("\ufffd", text)
    return text, replaced + surrogates


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of characters that had to be replaced."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        # U+FFFD that were in the input as valid UTF-8 are not replacements
        return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _count_replaced(stats: Stats, replaced: int) -> None:
    if replaced:
        stats.replaced_chars += replaced
        stats.bad_utf8_docs += 1


def _non_empty(docs: Iterable[Doc], stats: Stats) -> Iterator[Doc]:
    for doc in docs:
        if doc.text.strip():
            yield doc
        else:
            stats.skipped_docs += 1


# ----------------------------------------------------------------------------------------------------
# Re-sharding a stream of documents


def reshard(docs: Iterable[Doc], out: Path, *, shard_chars: int, max_chars: int, origin: str) -> list[ShardInfo]:
    """Write documents in order into shards of about `shard_chars` characters (a shard closes after the
    document that fills it), stopping at `max_chars` (0 = no cap; the document that crosses it is cut).
    The last shard is the validation split; if everything fits in one, its tail becomes a second shard."""
    shards: list[ShardInfo] = []
    writer: ShardWriter | None = None
    try:
        for index, doc in cut_stream(docs, shard_chars=shard_chars, max_chars=max_chars):
            if writer is not None and index > len(shards):
                shards.append(writer.close())
                writer = None
            if writer is None:
                writer = ShardWriter(out / SHARD_NAME.format(index), "train", origin)
            writer.write(*doc)
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if not shards:
        raise UserError(f"{origin}: no text found (every document is empty)")
    if len(shards) == 1:
        shards = _split_off_val(out / shards[0].file, origin)
    shards[-1].split = "val"
    return shards


def cut_stream(docs: Iterable[Doc], *, shard_chars: int, max_chars: int) -> Iterator[tuple[int, Doc]]:
    """(shard index, document) in stream order: a shard closes after the document that brings it to
    `shard_chars` characters; the stream stops at `max_chars` (0 = no cap), the document crossing it cut.
    The one rule both the plain run (`reshard`) and the per-shard plan (`plan_shards`) cut by."""
    index = chars = total = 0
    for doc in docs:
        if max_chars and total + len(doc.text) > max_chars:
            doc = doc._replace(text=doc.text[:max_chars - total])
        yield index, doc
        total += len(doc.text)
        chars += len(doc.text)
        if chars >= shard_chars:
            index, chars = index + 1, 0
        if max_chars and total >= max_chars:
            break


def val_cut(lengths: list[int], origin: str) -> int:
    """Where a lone shard of documents with these character counts splits into train | val: the
    documents holding the last ~10% of its characters become validation (at least one on each side)."""
    if len(lengths) < 2:
        raise UserError(f"{origin}: only one document; a train and a validation shard need at least two")
    threshold, running = (1 - SINGLE_SHARD_VAL_FRACTION) * sum(lengths), 0
    for cut, n in enumerate(lengths):
        running += n
        if running >= threshold:
            break
    return min(max(cut, 1), len(lengths) - 1)


def _split_off_val(path: Path, origin: str) -> list[ShardInfo]:
    """Rewrite a lone shard as two at `val_cut`."""
    table = pq.read_table(path)
    cut = val_cut(pc.utf8_length(table["text"]).to_pylist(), origin)
    path.unlink()
    shards = []
    for i, part in enumerate((table.slice(0, cut), table.slice(cut))):
        with ShardWriter(path.with_name(SHARD_NAME.format(i)), "train", origin) as writer:
            for doc_id, text, source in zip(*(part[c].to_pylist() for c in ("id", "text", "source"))):
                writer.write(doc_id, text, source)
        shards.append(writer.info)
    return shards


# ----------------------------------------------------------------------------------------------------
# embedded: text that ships with Python and the installed packages


def _download_embedded(p: DownloadParams, out: Path) -> Download:
    stats = Stats()
    docs, origin = stream_documents(p, stats)
    shards = reshard(docs, out, shard_chars=p.shard_chars, max_chars=p.max_chars, origin=origin)
    return Download(shards, embedded_about(p), stats, notes=_embedded_notes(p, sum(s.chars for s in shards)))


def embedded_about(p: DownloadParams) -> dict:
    return {"source": "embedded", "dataset": "+".join(p.include), "python": sys.version.split()[0]}


def _embedded_notes(p: DownloadParams, chars: int) -> list[str]:
    if p.max_chars and chars < p.max_chars:
        return [f"the embedded text ran out at {chars:,} of max_chars {p.max_chars:,} characters "
                f"(include: {', '.join(p.include)})"]
    return []


def embedded_documents(include: Iterable[str], stats: Stats) -> Iterator[Doc]:
    """Documents of the `include`d parts, dropping those under MIN_EMBEDDED_DOC_CHARS, in a seeded
    shuffled order: the validation shard (the last) then draws from every part instead of being all
    package READMEs. The whole embedded text is a few MB, so holding it to shuffle is cheap."""
    parts = {"stdlib": stdlib_documents, "packages": package_documents}
    docs = []
    for name in include:
        for doc in parts[name]():
            if len(doc.text) >= MIN_EMBEDDED_DOC_CHARS:
                docs.append(doc)
            else:
                stats.skipped_docs += 1
    random.Random(EMBEDDED_SEED).shuffle(docs)
    yield from docs


def stdlib_documents() -> Iterator[Doc]:
    """The language reference topics behind `help()` (pydoc_data), one per topic, then the docstrings of
    every standard-library module, one document per file in sorted path order, parsed with `ast` (never
    imported: importing runs code, and some modules are platform-specific)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Doc(f"python-reference/{key}", topics[key], "python-reference")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix())
    for f in files:
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        text = "\n\n".join(_docstrings(f))
        if text:
            yield Doc(f"python-stdlib/{rel.as_posix()}", text, "python-stdlib")


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file, in source order; none if it does not parse
    (the stdlib ships deliberately broken files as test data)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old test files
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, RecursionError):
        return []
    docs, stack = [], [tree]
    while stack:  # depth-first in source order, through statements only (definitions are statements)
        node = stack.pop()
        if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node)):
            docs.append(doc)
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler, ast.match_case))]
        stack.extend(reversed(children))
    return docs


def package_documents() -> Iterator[Doc]:
    """The long descriptions (mostly READMEs) of the distributions installed in this environment's
    site-packages, sorted by name, one per distribution. The current directory is left out of the search
    so that the result does not depend on where the stage runs."""
    paths = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = (dist.metadata or {}).get("Name")
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist)  # PEP 503 names; first on the path wins
    for name in sorted(found):
        description = found[name].metadata.get("Description") or ""
        if description.strip():
            yield Doc(f"python-packages/{name}", description, "python-packages")


def _count_chars(docs: Iterable[Doc], max_chars: int) -> Iterator[Doc]:
    """Pass documents through under a progress bar in characters, up to the `max_chars` cap (0 = none)."""
    with progress(total=max_chars or None, desc="text", unit="char", unit_scale=True) as bar:
        for doc in docs:
            bar.update(min(len(doc.text), max_chars - bar.n) if max_chars else len(doc.text))
            yield doc


# ----------------------------------------------------------------------------------------------------
# Per-shard jobs (`snakemake --config per_shard=true`, see workflow/dag.py): list, one job per shard, gather
#
# `plan_shards` lists the output shards and what each is made from, written to PARTS/shards.json: for
# hf/url it follows from the params alone (no network), for local parquet files from the file listing,
# for a document stream (embedded, local jsonl/txt/one parquet file) from one read of the stream that
# finds the shard boundaries without writing. `download_part` makes one shard into PARTS/<name>/ with
# the very functions the plain run uses (`remote_shard` through the same cache, `local_shard`, or
# `cut_stream` read up to the shard's last document), and `gather_parts` assembles the dataset from the
# parts: the same shard bytes, manifest and (timings aside) metrics as `download()`.

PLAN = "shards.json"
PLAN_FORMAT = "daychat.download.shards/1"


@dataclass
class PlannedShard:
    name: str  # `--shard NAME`: the output file name without its suffix
    file: str
    split: str
    origin: str
    url: str = ""  # hf/url: the remote file
    index: int = 0  # hf/url: its position in the remote dataset
    path: str = ""  # local parquet: the input file
    docs: tuple[int, int] | None = None  # stream sources: [first, stop) positions in the document stream
    rows: int = 0  # stream sources: known from the plan, checked by the shard job
    chars: int = 0


def plan_shards(p: DownloadParams) -> dict:
    """What `--list` writes to shards.json: the params it was planned from, the manifest header, the
    counters of reading a stream (stats, notes) and the shards, in manifest order (validation last)."""
    stats, notes = Stats(), []
    files, _, about, one_to_one = local_inputs(p) if p.source == "local" else ([], None, {}, False)
    if p.source in ("hf", "url"):
        remote, about = remote_plan(p)
        shards = [PlannedShard(Path(SHARD_NAME.format(i)).stem, SHARD_NAME.format(i), s.split, s.url, url=s.url, index=s.index)
                  for i, s in enumerate(remote)]
        notes = _remote_notes(about)
    elif one_to_one:
        shards = [PlannedShard(Path(SHARD_NAME.format(i)).stem, SHARD_NAME.format(i),
                               "val" if i == len(files) - 1 else "train", str(f.resolve()), path=str(f.resolve()))
                  for i, f in enumerate(files)]
    else:
        about = embedded_about(p) if p.source == "embedded" else about
        docs, origin = stream_documents(p, stats)
        lengths: list[list[int]] = []  # characters of each document, per shard
        for index, doc in cut_stream(docs, shard_chars=p.shard_chars, max_chars=p.max_chars):
            if index == len(lengths):
                lengths.append([])
            lengths[index].append(len(doc.text))
        if not lengths:
            raise UserError(f"{origin}: no text found (every document is empty)")
        if len(lengths) == 1:  # as reshard does: the tail of a lone shard becomes validation
            cut = val_cut(lengths[0], origin)
            lengths = [lengths[0][:cut], lengths[0][cut:]]
        shards, start = [], 0
        for i, group in enumerate(lengths):
            shards.append(PlannedShard(Path(SHARD_NAME.format(i)).stem, SHARD_NAME.format(i),
                                       "val" if i == len(lengths) - 1 else "train", origin,
                                       docs=(start, start + len(group)), rows=len(group), chars=sum(group)))
            start += len(group)
        if p.source == "embedded":
            notes = _embedded_notes(p, sum(map(sum, lengths)))
    return {"format": PLAN_FORMAT, "params": _params_json(p), "about": about, "stats": asdict(stats),
            "notes": notes, "shards": [asdict(s) for s in shards]}


def read_plan(p: DownloadParams, parts: str | os.PathLike) -> tuple[dict, list[PlannedShard]]:
    """shards.json of `parts`, checked to be a plan for the current params."""
    path = Path(parts) / PLAN
    again = f"run `download.py --list --parts {parts}`"
    if not path.is_file():
        raise UserError(f"{path} not found: the shards of this download are not listed yet ({again})")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        shards = [PlannedShard(**s) for s in plan["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}); {again}") from None
    if plan.get("format") != PLAN_FORMAT:
        raise UserError(f"{path} has format {plan.get('format')!r}, expected {PLAN_FORMAT!r}; {again}")
    if plan.get("params") != _params_json(p):
        raise UserError(f"{path} was listed for other download params than params.yaml's; {again}")
    return plan, shards


def download_part(p: DownloadParams, parts: str | os.PathLike, name: str, out: str | os.PathLike,
                  cache: str | os.PathLike, *, backoff_s: float = 1.0) -> dict:
    """Make the planned shard `name` in folder `out` (the part's temporary folder): its text shard and
    part.json (its manifest entry, what fetching it cost, when it ran). Return part.json's dict."""
    started = time.time()  # wall clock, comparable across the machines that run the parts
    plan, shards = read_plan(p, parts)
    shard, out = find_shard(shards, name, Path(parts) / PLAN), Path(out)
    cost = {"download_bytes": 0, "cached": False, "retries": 0}
    if shard.url:
        folder = cache_folder(cache, plan["about"]["base_url"])
        folder.mkdir(parents=True, exist_ok=True)
        info, fetched = remote_shard(p, RemoteShard(shard.index, shard.url, shard.split), folder, out / shard.file,
                                     plan["about"]["dataset"], backoff_s)
        cost = {"download_bytes": fetched.downloaded, "cached": fetched.cached, "retries": fetched.retries}
    elif shard.path:
        info = local_shard(p, Path(shard.path), out / shard.file, shard.split, plan["about"]["dataset"])
    else:
        info = _stream_part(p, shard, out)
    part = {"plan": _digest(plan), "shard": asdict(info), **cost, "started": started, "finished": time.time()}
    write_json(out / PART, part)
    return part


def _stream_part(p: DownloadParams, shard: PlannedShard, out: Path) -> ShardInfo:
    """Write the documents [first, stop) of the stream, cut as the plain run cuts them."""
    first, stop = shard.docs
    docs, _ = stream_documents(p, Stats())
    with ShardWriter(out / shard.file, shard.split, shard.origin) as writer:
        for position, (_, doc) in enumerate(cut_stream(docs, shard_chars=p.shard_chars, max_chars=p.max_chars)):
            if position >= stop:
                break
            if position >= first:
                writer.write(*doc)
        if (writer.info.rows, writer.info.chars) != (shard.rows, shard.chars):
            raise UserError(f"{shard.origin}: shard {shard.name} has {writer.info.rows} docs / {writer.info.chars} "
                            f"chars where the plan has {shard.rows} / {shard.chars}: the source changed since "
                            "--list (other files or installed packages); list and run the shards again")
    return writer.info


def gather_parts(p: DownloadParams, parts: str | os.PathLike, out: str | os.PathLike) -> Download:
    """Link every planned shard's part into `out` (the stage's temporary folder) and return what
    `download()` returns for the same params; the caller writes the manifest and metrics.
    `seconds` is the span from the first part's start to the last part's end."""
    plan, shards = read_plan(p, parts)
    parts, out = Path(parts), Path(out)
    infos, runs = [], []
    stats = Stats(**plan["stats"])
    for shard in shards:
        part = read_part(parts, shard.name, "download")
        path = parts / shard.name / PART
        try:
            info = ShardInfo(**part["shard"])
        except (KeyError, TypeError) as e:
            raise corrupt(path, e) from None
        made = path.parent / info.file
        if part["plan"] != _digest(plan) or info.file != shard.file or not made.is_file() \
                or made.stat().st_size != info.bytes:
            raise UserError(f"{path.parent} was made for another plan or is incomplete; "
                            f"delete it and rerun its shard job")
        link_or_copy(made, out / info.file)
        infos.append(info)
        runs.append((part["started"], part["finished"]))
        stats.download_bytes += part["download_bytes"]
        stats.cached_shards += part["cached"]
        stats.retries += part["retries"]
    seconds = max(f for _, f in runs) - min(s for s, _ in runs)
    return Download(infos, plan["about"], stats, seconds=seconds, notes=plan["notes"])


def _params_json(p: DownloadParams) -> dict:
    return json.loads(json.dumps(asdict(p)))


def _digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
