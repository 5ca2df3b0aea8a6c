"""Exact and MinHash near-duplicate removal over a text dataset, in four steps that scale by shard.

    signatures  per shard, in parallel processes: for each document an exact key (a hash of its normalised
                text) and a MinHash signature of its shingles (word or character n-grams), cut into LSH
                band keys; only the band keys and a few numbers per document come back
    buckets     per band, over the whole corpus: documents with equal band keys are candidate pairs
    clusters    candidate pairs are verified by the exact Jaccard similarity of their shingle sets (the
                text of the documents in candidate pairs only is read again), then joined with the exact
                duplicates by union-find
    filter      one document per cluster is kept; every shard is read again and its kept documents are
                written to a shard of the same name and split; the removed ones go to an audit table

Memory grows with the number of documents, not with their text: 8 bytes per band per document (20 bands:
160 bytes) plus a few counters, while text is streamed one batch at a time. Verification holds the
shingle hashes (8 bytes per word) of the documents in candidate pairs, at most VERIFY_BUDGET_SHINGLES at
a time; past that it works in rounds.

Hashing is vectorised with numpy, never a Python loop per shingle: the text of a batch is one byte array,
words are runs of word bytes, a word's hash mixes its bytes 8 at a time (read through a 1-byte-stride
uint64 view of the buffer), n-gram hashes combine n word hashes by rotate-xor, and the MinHash is one
(num_perm, shingles) multiply-add-min per block of shingles. ~1 ns per (permutation, shingle) on one core:
bench/dedup.py measures the whole stage.

Per shard (a scheduler runs one job per shard, see workflow/dag.py): step 1 needs no global state, so
`sign_part` signs one shard into a part folder (signatures.npz + part.json) and `dedup(..., parts=DIR)`
loads every shard's part instead of signing, then runs steps 2-4 as the plain run does. Both sign with
`sign_shard` and concatenate with `Signatures.concat` in manifest order, so the outputs are byte-identical
whichever way they were made (tests/test_dedup.py checks it).

Splits: documents are compared across the whole corpus but never move between splits. A cluster keeps its
first validation document when it has one (so no validation document goes because of a training one, and
no training document duplicates one that stays), else its first document in manifest order. Duplicates
within the validation split go like any others.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from daychat.progress import progress
from daychat.data.parts import PART, corrupt, find_shard, read_part
from daychat.data.textshards import (MANIFEST, ShardInfo, ShardWriter, iter_text_batches, read_manifest,
                                     shard_paths, write_manifest)
from daychat.errors import UserError
from daychat.io import write_json

REMOVED = "removed.parquet"  # the audit table, next to the kept shards
REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("split", pa.string()),
    ("reason", pa.string()),  # exact: same normalised text as the kept document; near: similar shingles
    ("jaccard", pa.float64()),  # best verified Jaccard with one of its cluster; 1.0: exact; null: unverified
    ("cluster", pa.int64()),  # position (manifest order, from 0) of the cluster's first document
    ("kept_id", pa.string()), ("kept_file", pa.string()), ("kept_row", pa.int64()),
])
READ_DOCS = 128  # documents read at a time (pyarrow may read a whole row group): ~50 MB of books
BATCH_BYTES = 2 << 20  # text hashed per numpy pass: bounds the per-byte temporaries (~20 bytes per byte)
MINHASH_BLOCK = 8192  # shingles per (num_perm, block) multiply-add-min: 100 x 8192 x 8 B = 6.5 MB
VERIFY_BUDGET_SHINGLES = 32_000_000  # shingle hashes held at once while verifying (256 MB)
# A part (daychat.data.parts): part.json says which shard, made with which params, its counts and when it ran
PART_ARRAYS = "signatures.npz"  # in a part folder: the shard's Signatures arrays
PART_FORMAT = "daychat.dedup.part/1"
SIGNATURE_PARAMS = ("shingle", "ngram", "num_perm", "bands", "rows", "boilerplate", "seed")  # what step 1 reads
U64 = np.uint64


# ----------------------------------------------------------------------------------------------------
# Text -> normalised text, exact key, the part that is shingled

# Project Gutenberg wraps every book in a header and a ~3,000-word licence that are the same in every
# book: shingled, they make short distinct books look alike (datatrove removes 7 such books from
# ../shared/data/corpus/gutenberg). Only the body between the markers is shingled; the exact key and the
# text written out are the whole document. Variants seen in that corpus, lowercased:
#   *** start of this project gutenberg ebook ... ***   /  ***start of the project gutenberg ebook ...
#   *end*the small print! for public domain etexts*ver.04.29.93*end*   (end of the 1990s header)
#   *** end of this project gutenberg ebook ... ***  /  end of the project gutenberg ebook of ...
#   end of this etext of the complete works ...      /  end of the project gutenburg etext ...
GUTENBERG_START = re.compile(rb"^[ \t]*(?:\*\*\*[ \t]*start of (?:the|this) project gutenberg"
                             rb"|\*end\*the small print!).*$", re.M)
GUTENBERG_END = re.compile(rb"^[ \t]*(?:\*\*\*[ \t]*end of (?:the|this) project gutenberg"
                           rb"|(?:the )?end of (?:the |this )?(?:project guten|etext))", re.M)
WHITESPACE = b" \t\n\r\x0b\x0c"


def normalise(text: str) -> bytes:
    """UTF-8 of the text after NFKC (full-width forms, ligatures, non-breaking spaces become their plain
    forms) and lowercasing. Everything downstream works on these bytes."""
    return (text if text.isascii() else unicodedata.normalize("NFKC", text)).lower().encode("utf-8")


def exact_key(normalised: bytes) -> int:
    """64-bit key of a normalised text with its whitespace ignored: equal for texts that differ only in
    case, Unicode form, spacing or line breaks."""
    return xxhash.xxh3_64_intdigest(normalised.translate(None, WHITESPACE))


def shingled_part(normalised: bytes, boilerplate: str) -> bytes:
    """The part of a normalised text that is shingled: the body between Project Gutenberg's markers
    (`boilerplate: gutenberg`, where it finds them), else all of it."""
    if boilerplate == "gutenberg" and b"gutenberg" in normalised:  # a fast scan spares the regexes on web text
        start = GUTENBERG_START.search(normalised)
        begin = start.end() if start else 0
        end = GUTENBERG_END.search(normalised, begin)
        body = normalised[begin:end.start() if end else len(normalised)]
        if body.strip():
            return body
    return normalised


# ----------------------------------------------------------------------------------------------------
# Bytes -> word and shingle hashes (vectorised)

# Word bytes: ASCII letters and digits, and every non-ASCII byte (letters of other scripts) except the
# UTF-8 encodings of U+0080-U+00BF (Latin-1 punctuation: nbsp, guillemets, ...) and U+2000-U+207F
# (general punctuation: curly quotes, dashes, ellipsis), which separate words like ASCII punctuation.
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[*range(ord("0"), ord("9") + 1), *range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1)]] = True
_WORD_BYTE[0x80:] = True
# MASKS[k]: the low k bytes of a little-endian uint64 (k = 0..8).
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=U64)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: every input bit affects every output bit."""
    x ^= x >> U64(33)
    x *= U64(0xFF51AFD7ED558CCD)
    x ^= x >> U64(33)
    x *= U64(0xC4CEB9FE1A85EC53)
    x ^= x >> U64(33)
    return x


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << U64(k)) | (x >> U64(64 - k)) if k % 64 else x.copy()


def _byte_view(buf: bytes) -> np.ndarray:
    """(len(buf),) uint64 whose element k is the 8 bytes buf[k:k+8], little-endian (a 1-byte-stride view
    of a zero-padded copy): any byte range can then be read 8 bytes per element, without a loop."""
    padded = buf + bytes(8)
    return np.ndarray((len(buf),), dtype="<u8", buffer=padded, strides=(1,))


def _hash_ranges(buf: bytes, starts: np.ndarray, lengths: np.ndarray, long: int = 32) -> np.ndarray:
    """64-bit hashes of the byte ranges [start, start+length) of `buf`: (n,) uint64. Vectorised for
    ranges of up to `long` bytes (the length seeds the hash, then each 8-byte block is mixed in); the
    rare longer words (a URL, a base64 blob) are hashed one by one with xxh3."""
    view = _byte_view(buf)
    h = _fmix64(lengths.astype(U64) * U64(0x9E3779B97F4A7C15))
    sel = np.arange(len(lengths))
    for offset in range(0, min(int(lengths.max(initial=0)), long), 8):
        sel = sel[lengths[sel] > offset]
        block = view[starts[sel] + offset] & _MASKS[np.minimum(lengths[sel] - offset, 8)]
        h[sel] = _fmix64(h[sel] ^ block)
    for i in np.flatnonzero(lengths > long).tolist():
        h[i] = xxhash.xxh3_64_intdigest(buf[starts[i]:starts[i] + lengths[i]])
    return h


def _word_mask(data: np.ndarray) -> np.ndarray:
    """(n,) bool: which bytes of a UTF-8 buffer (`data`: (n,) uint8) belong to words."""
    word = _WORD_BYTE[data]
    if data.size and data.max() >= 0x80:  # Unicode punctuation separates words (see _WORD_BYTE)
        lead = np.flatnonzero(((data[:-1] == 0xC2) & (data[1:] < 0xC0))
                              | ((data[:-1] == 0xE2) & ((data[1:] == 0x80) | (data[1:] == 0x81))))
        word[lead] = word[lead + 1] = False
        third = lead[data[lead] == 0xE2] + 2
        word[third[third < data.size]] = False
    return word


def _ngrams(h: np.ndarray, doc: np.ndarray, docs: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Word shingles: every n consecutive words of a document, or all of its words when it has fewer.
    `h`: (W,) uint64 word hashes, `doc`: (W,) int64 document of each word (sorted). Returns (shingle
    hashes (S,) uint64 grouped by document, offsets (docs+1,) int64)."""
    words = np.bincount(doc, minlength=docs)
    first = np.cumsum(words) - words  # first word of each document
    g = h.copy()  # after step k, g[i] combines words i..i+k (rotate-xor, so order matters)
    short, short_grams = [], []  # documents of fewer than n words keep the k-gram of all their k words
    for k in range(1, n):
        short.append(first[words == k])
        short_grams.append(g[short[-1]])
        g[: max(len(h) - k, 0)] ^= _rotl(h[k:], k)
    for docs_first, grams in zip(short, short_grams):
        g[docs_first] = grams
    full = max(len(h) - n + 1, 0)
    valid = np.zeros(len(h), dtype=bool)
    valid[:full] = doc[n - 1: n - 1 + full] == doc[:full]
    valid[first[(words > 0) & (words < n)]] = True
    return _fmix64(g[valid]), _offsets(doc[valid], docs)


def _chars(data: np.ndarray, word: np.ndarray, starts: np.ndarray, ends: np.ndarray, word_doc: np.ndarray,
           docs: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Character shingles: every n consecutive bytes of a document's words joined by single spaces, or
    all of it when shorter. Returns (hashes (S,) uint64 grouped by document, offsets (docs+1,) int64)."""
    keep = word.copy()  # word bytes, and the byte after each word followed by one of the same document
    keep[ends[:-1][word_doc[1:] == word_doc[:-1]]] = True
    compact = np.where(word, data, np.uint8(ord(" ")))[keep]
    length = np.bincount(word_doc, weights=ends - starts, minlength=docs).astype(np.int64)
    length += np.maximum(np.bincount(word_doc, minlength=docs) - 1, 0)  # the spaces
    start = np.cumsum(length) - length
    pos = np.arange(len(compact))
    doc = np.repeat(np.arange(docs), length)
    size = np.minimum(n, start[doc] + length[doc] - pos)
    valid = (size == n) | (pos == start[doc])
    hashes = _hash_ranges(compact.tobytes(), pos[valid], size[valid], long=n)
    return hashes, _offsets(doc[valid], docs)


def _offsets(doc: np.ndarray, docs: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(doc, minlength=docs))]).astype(np.int64)


def shingle_hashes(parts: list[bytes], shingle: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingles of normalised texts: word n-grams, or character n-grams (see `_chars`). Returns (hashes
    (S,) uint64, offsets (len(parts)+1,) int64): text d's shingles are hashes[offsets[d]:offsets[d+1]],
    repeats kept (a MinHash does not care; a Jaccard takes np.unique)."""
    sizes = np.array([len(part) + 1 for part in parts], dtype=np.int64)  # +1: the "\n" between texts
    doc_start = np.cumsum(sizes) - sizes
    buf = b"\n".join(parts)
    data = np.frombuffer(buf, dtype=np.uint8)
    word = _word_mask(data)
    edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    word_doc = np.searchsorted(doc_start, starts, side="right") - 1
    if shingle == "char":
        return _chars(data, word, starts, ends, word_doc, len(parts), n)
    return _ngrams(_hash_ranges(buf, starts, ends - starts), word_doc, len(parts), n)


# ----------------------------------------------------------------------------------------------------
# MinHash signatures and LSH band keys


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): num_perm random 64-bit multipliers (odd) and increments, the same for a given seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 64, size=num_perm, dtype=U64, endpoint=False) | U64(1)
    b = rng.integers(0, 1 << 64, size=num_perm, dtype=U64, endpoint=False)
    return a, b


def minhash(hashes: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signatures: (docs, num_perm) uint32; a document without shingles gets all 0xFFFFFFFF.

    Permutation i maps a shingle's 32-bit hash x to (a_i * x + b_i) mod 2^64 and keeps the top 32 bits:
    Dietzfelbinger's multiply-add-shift, a strongly universal family that needs no modulo (uint64
    arithmetic wraps). The minimum of the 64-bit values has the minimum top 32 bits, so the shift is
    applied once to the minimum. Computed as one (num_perm, block) array per block of shingles, reduced
    per document with np.minimum.reduceat."""
    docs, num_perm = len(offsets) - 1, len(a)
    mins = np.full((num_perm, docs), np.iinfo(U64).max, dtype=U64)
    x = hashes >> U64(32)  # (S,) 32-bit shingle hashes
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    first, last = offsets[nonempty], offsets[nonempty + 1]
    block = np.empty((num_perm, MINHASH_BLOCK), dtype=U64)
    for lo in range(0, len(x), MINHASH_BLOCK):
        hi = min(lo + MINHASH_BLOCK, len(x))
        k0, k1 = np.searchsorted(last, lo, side="right"), np.searchsorted(first, hi, side="left")
        v = block[:, : hi - lo]
        np.multiply(a[:, None], x[None, lo:hi], out=v)
        v += b[:, None]
        part = np.minimum.reduceat(v, np.maximum(first[k0:k1], lo) - lo, axis=1)  # (num_perm, docs in block)
        cols = nonempty[k0:k1]
        mins[:, cols] = np.minimum(mins[:, cols], part)
    return (mins >> U64(32)).astype(np.uint32).T


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(docs, bands) uint64: one hash per band of `rows` consecutive signature values. Two documents
    share a band key when they agree on all `rows` values (64-bit keys: collisions ~1e-7 at 4M docs)."""
    keys = np.zeros((len(signatures), bands), dtype=U64)
    for j in range(bands):
        for value in signatures[:, j * rows:(j + 1) * rows].T.astype(U64):
            keys[:, j] = _fmix64(keys[:, j] ^ value)
    return keys


# The LSH S-curve. A signature of num_perm = bands x rows MinHash values is cut into `bands` bands of
# `rows` values. Two documents of Jaccard similarity s agree on one value with probability s, on a whole
# band with s^r, and become a candidate pair when any of the b bands agrees:
#
#     P(candidate | s) = 1 - (1 - s^r)^b
#
# an S-curve that rises steepest near s = (1/b)^(1/r). The defaults, b=20, r=5 (100 values): 0.55, and
#
#     s             0.3    0.5    0.6    0.65   0.7    0.75   0.8
#     P(candidate)  0.05   0.47   0.80   0.92   0.975  0.996  0.9996
#
# Candidates below the threshold (0.7) are false positives, which verification removes at the cost of
# reading their text again; pairs above it that never share a band are false negatives, which nothing
# recovers: so the curve sits below the threshold. (FineWeb's 14 bands of 8 rows rise at 0.72, with
# P = 0.56 at 0.7 and 0.92 at 0.8, and keep every candidate unverified.) The estimates in the metrics are
# datasketch's (as in MinHashLSH._optimal_param): the area under the curve below the threshold, and the
# area over it above the threshold; 0.20 and 0.0007 for the defaults.


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def lsh_error_rates(threshold: float, bands: int, rows: int) -> tuple[float, float]:
    """(false positive, false negative) estimates: integral of P over [0, t] and of 1-P over [t, 1]."""
    below, above = np.linspace(0.0, threshold, 2001), np.linspace(threshold, 1.0, 2001)
    fp = np.trapezoid(candidate_probability(below, bands, rows), below)
    fn = np.trapezoid(1.0 - candidate_probability(above, bands, rows), above)
    return float(fp), float(fn)


# ----------------------------------------------------------------------------------------------------
# Step 1: signatures, per shard


@dataclass
class Signatures:
    """What the signature step keeps of a run of documents: a few numbers each, no text."""

    exact: np.ndarray  # (docs,) uint64 exact keys
    bands: np.ndarray  # (docs, bands) uint64 LSH band keys
    shingles: np.ndarray  # (docs,) int64 shingles (repeats counted); 0: nothing to compare (no words)
    chars: int = 0  # characters of the documents as read
    text_bytes: int = 0  # their UTF-8 bytes, normalised (NFKC and lowercasing rarely change a size)

    @staticmethod
    def concat(parts: list["Signatures"], bands: int) -> "Signatures":
        if not parts:
            return Signatures(np.zeros(0, U64), np.zeros((0, bands), U64), np.zeros(0, np.int64))
        return Signatures(np.concatenate([s.exact for s in parts]), np.concatenate([s.bands for s in parts]),
                          np.concatenate([s.shingles for s in parts]), sum(s.chars for s in parts),
                          sum(s.text_bytes for s in parts))


def sign_texts(texts: list[str], p, perms: tuple[np.ndarray, np.ndarray]) -> Signatures:
    """Exact keys and band keys of a list of documents (`p`: DedupParams)."""
    normalised = [normalise(t) for t in texts]
    exact = np.array([exact_key(t) for t in normalised], dtype=U64)
    hashes, offsets = shingle_hashes([shingled_part(t, p.boilerplate) for t in normalised], p.shingle, p.ngram)
    bands = band_keys(minhash(hashes, offsets, *perms), p.bands, p.rows)
    return Signatures(exact, bands, np.diff(offsets), sum(map(len, texts)), sum(map(len, normalised)))


def sign_shard(path: Path, p) -> Signatures:
    """Signatures of every document of one text shard, in order, streaming its text batch by batch."""
    perms = permutations(p.num_perm, p.seed)
    parts = []
    for texts in iter_text_batches(path, READ_DOCS):
        for lo, hi in _spans_by_size(texts, BATCH_BYTES):
            parts.append(sign_texts(texts[lo:hi], p, perms))
    return Signatures.concat(parts, p.bands)


def _spans_by_size(texts: list[str], limit: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs of consecutive texts of at most `limit` characters (a longer text is one run)."""
    lo, size = 0, 0
    for i, text in enumerate(texts):
        if i > lo and size + len(text) > limit:
            yield lo, i
            lo, size = i, 0
        size += len(text)
    if lo < len(texts):
        yield lo, len(texts)


def sign_corpus(paths: list[Path], chars: list[int], p) -> tuple[Signatures, list[int]]:
    """Signatures of every shard, one after the other in manifest order, and each shard's document count.
    Shards are spread over p.workers processes (one shard each at a time); `chars`: each shard's size,
    for progress."""
    processes = max(1, min(p.workers or os.cpu_count() or 1, len(paths)))
    results: list[Signatures | None] = [None] * len(paths)
    with progress(total=sum(chars) or None, desc="signatures", unit="char", unit_scale=True) as bar:
        if processes == 1:
            for i, path in enumerate(paths):
                results[i] = sign_shard(path, p)
                bar.update(chars[i])
        else:
            # spawn, not fork: the parent holds pyarrow's thread pools, which fork can leave locked.
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(sign_shard, path, p): i for i, path in enumerate(paths)}
                for future in as_completed(futures):
                    if future.exception() is not None:
                        for other in futures:
                            other.cancel()
                        raise future.exception()
                    results[futures[future]] = future.result()
                    bar.update(chars[futures[future]])
    return Signatures.concat(results, p.bands), [len(r.exact) for r in results]


def sign_part(data: str | os.PathLike, shard: str, out: str | os.PathLike, p) -> dict:
    """Step 1 for the one shard named `shard` of `data`, into the part folder `out` (signatures.npz and
    part.json; the caller makes `out` atomic, so a part folder that exists is a finished part). Returns
    part.json's dict."""
    data, out = Path(data), Path(out)
    started = time.time()  # wall clock, comparable across the machines that run the parts
    info = find_shard(read_manifest(data), shard, data / MANIFEST)
    path = data / info.file
    if not path.is_file():
        raise UserError(f"{path} is listed in {data / 'manifest.json'} but missing; rerun the stage that writes it")
    with progress(total=info.chars or None, desc=f"signatures {shard}", unit="char", unit_scale=True) as bar:
        sigs = sign_shard(path, p)
        bar.update(info.chars)
    np.savez(out / PART_ARRAYS, exact=sigs.exact, bands=sigs.bands, shingles=sigs.shingles)
    part = {"format": PART_FORMAT, "file": info.file, "source_sha256": info.sha256, "params": _signature_params(p),
            "docs": len(sigs.exact), "chars": sigs.chars, "text_bytes": sigs.text_bytes,
            "started": started, "finished": time.time()}
    write_json(out / PART, part)
    return part


def load_parts(data: str | os.PathLike, parts: str | os.PathLike, p) -> tuple[Signatures, list[int], list[dict]]:
    """Step 1 from the finished parts `parts/<shard>/` of every shard of `data`, as `sign_corpus` returns
    it, and the parts' part.json dicts. A part is checked against what the run needs now (the shard's
    sha256 in the manifest, the signature params), so a part left from other inputs is never taken."""
    data, parts = Path(data), Path(parts)
    results, found = [], []
    for shard in read_manifest(data):
        part = read_part(parts, shard.name, "dedup", of=data)
        path = parts / shard.name / PART
        try:
            with np.load(path.parent / PART_ARRAYS) as arrays:
                sigs = Signatures(arrays["exact"], arrays["bands"], arrays["shingles"], part["chars"], part["text_bytes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise corrupt(path.parent / PART_ARRAYS, e) from None
        if (part.get("format"), part.get("file"), part.get("source_sha256"), part.get("params")) != \
                (PART_FORMAT, shard.file, shard.sha256, _signature_params(p)) or \
                sigs.bands.shape != (part.get("docs"), p.bands):
            raise UserError(f"{path} was made from other inputs (shard or dedup.{'/'.join(SIGNATURE_PARAMS)} "
                            f"changed); delete {path.parent} and rerun its shard job")
        results.append(sigs)
        found.append(part)
    return Signatures.concat(results, p.bands), [len(r.exact) for r in results], found


def _signature_params(p) -> dict:
    return {key: getattr(p, key) for key in SIGNATURE_PARAMS}


# ----------------------------------------------------------------------------------------------------
# Step 2: buckets -> candidate pairs


def candidate_pairs(bands: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """(pairs, 2) int64 unique document pairs (i < j) that share a band key, among the `eligible`
    document indices (sorted). In each band, documents are sorted by key (stably, so by index within a
    bucket) and each is paired with the next in its bucket: a bucket of m documents gives m-1 pairs,
    linear even in a huge bucket, and one odd document breaks only its two links."""
    n = len(bands)
    codes = []
    for j in range(bands.shape[1]):
        order = np.argsort(bands[eligible, j], kind="stable")
        keys, docs = bands[eligible[order], j], eligible[order]
        same = keys[1:] == keys[:-1]
        codes.append(docs[:-1][same] * n + docs[1:][same])
    codes = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    return np.stack([codes // n, codes % n], axis=1)


# ----------------------------------------------------------------------------------------------------
# Step 3: verification and clusters


@dataclass
class Layout:
    """Where each document of the corpus lives: global index (manifest order) <-> (shard, row)."""

    paths: list[Path]
    files: list[str]
    splits: list[str]
    first: np.ndarray  # (shards+1,) int64: shard s holds documents first[s]:first[s+1]

    def shard_of(self, docs: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, docs, side="right") - 1

    def is_val(self) -> np.ndarray:
        return np.repeat(np.array([s == "val" for s in self.splits]), np.diff(self.first))


def verify(pairs: np.ndarray, shingles: np.ndarray, layout: Layout, p) -> np.ndarray:
    """(pairs,) float64 exact Jaccard similarity of each candidate pair's shingle sets. The documents
    involved are read again and shingled; pairs are taken in rounds whose documents hold at most
    VERIFY_BUDGET_SHINGLES shingles, so memory is bounded however many pairs there are."""
    jaccard = np.zeros(len(pairs))
    rounds = list(_verify_rounds(pairs, shingles))
    with progress(total=len(pairs), desc="verify", unit="pair") as bar:
        for lo, hi in rounds:
            sets = _shingle_sets(np.unique(pairs[lo:hi]), layout, p)
            for k in range(lo, hi):
                a, b = sets[pairs[k, 0]], sets[pairs[k, 1]]
                common = np.intersect1d(a, b, assume_unique=True).size
                jaccard[k] = common / (a.size + b.size - common)
            bar.update(hi - lo)
    return jaccard


def _verify_rounds(pairs: np.ndarray, shingles: np.ndarray) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs of pairs whose documents hold at most VERIFY_BUDGET_SHINGLES shingles together (or
    one pair, if its two documents alone hold more)."""
    lo, loaded, size = 0, set(), 0
    for k, (i, j) in enumerate(pairs.tolist()):
        extra = sum(int(shingles[d]) for d in {i, j} - loaded)
        if k > lo and size + extra > VERIFY_BUDGET_SHINGLES:
            yield lo, k
            lo, loaded, size = k, set(), sum(int(shingles[d]) for d in {i, j})
        else:
            size += extra
        loaded |= {i, j}
    if lo < len(pairs):
        yield lo, len(pairs)


def _shingle_sets(docs: np.ndarray, layout: Layout, p) -> dict[int, np.ndarray]:
    """{document: its sorted unique shingle hashes} for the given (sorted) global document indices."""
    sets = {}
    shard = layout.shard_of(docs)
    for s in np.unique(shard):
        wanted = docs[shard == s] - layout.first[s]  # rows in shard s
        row = 0
        for texts in iter_text_batches(layout.paths[s], READ_DOCS):
            rows = wanted[(wanted >= row) & (wanted < row + len(texts))]
            needed = [texts[r - row] for r in rows]
            for lo, hi in _spans_by_size(needed, BATCH_BYTES):
                parts = [shingled_part(normalise(text), p.boilerplate) for text in needed[lo:hi]]
                hashes, offsets = shingle_hashes(parts, p.shingle, p.ngram)
                for k, r in enumerate(rows[lo:hi]):
                    sets[int(layout.first[s] + r)] = np.unique(hashes[offsets[k]:offsets[k + 1]])
            row += len(texts)
    return sets


def exact_groups(exact: np.ndarray) -> np.ndarray:
    """(docs,) int64: the first document (manifest order) with each document's exact key."""
    _, first, inverse = np.unique(exact, return_index=True, return_inverse=True)  # first: a stable sort
    return first[inverse]


def cluster_roots(rep: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(docs,) int64: the first document of each document's cluster, its exact group (`rep`, from
    `exact_groups`) joined with the near-duplicate `edges` ((k, 2) between groups' first documents) by
    union-find."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    for i, j in edges.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:  # the smaller index is the root, so a root is its cluster's first document
            parent[max(ri, rj)] = min(ri, rj)
    root_of = np.arange(len(rep))
    for x in parent:
        root_of[x] = find(x)
    return root_of[rep]


def kept_documents(root: np.ndarray, is_val: np.ndarray) -> np.ndarray:
    """(docs,) int64: the document kept in each document's place: its cluster's first validation
    document if it has one, else its cluster's first document."""
    n = len(root)
    docs = np.arange(n)
    first_val = np.full(n, n)
    np.minimum.at(first_val, root[is_val], docs[is_val])
    kept_for_root = np.where(first_val < n, first_val, docs)
    return kept_for_root[root]


@dataclass
class Clusters:
    """The outcome of steps 2 and 3, per document (global index, manifest order)."""

    root: np.ndarray  # (docs,) int64: the first document of its cluster (the cluster's id)
    kept: np.ndarray  # (docs,) int64: the document kept in its place (itself when it is kept)
    exact: np.ndarray  # (docs,) bool: same exact key as the document kept in its place
    jaccard: np.ndarray  # (docs,) float64: best verified Jaccard with one of its cluster; 1.0 if exact; NaN
    verified_pairs: int  # candidate pairs at or above the threshold (all of them when verify is off)

    def removed(self) -> np.ndarray:
        return np.flatnonzero(self.kept != np.arange(len(self.kept)))


def cluster(pairs: np.ndarray, sigs: Signatures, rep: np.ndarray, layout: Layout, p) -> Clusters:
    """Verify the candidate pairs (p.verify), join them with the exact duplicates, choose what is kept."""
    if p.verify:
        jaccard = verify(pairs, sigs.shingles, layout, p)
        edges, jaccard = pairs[jaccard >= p.threshold], jaccard[jaccard >= p.threshold]
    else:
        edges, jaccard = pairs, np.full(len(pairs), np.nan)
    root = cluster_roots(rep, edges)
    kept = kept_documents(root, layout.is_val())
    best = np.full(len(rep), np.nan)  # per exact group's first document: its best edge
    np.fmax.at(best, edges[:, 0], jaccard)
    np.fmax.at(best, edges[:, 1], jaccard)
    exact = sigs.exact == sigs.exact[kept]
    return Clusters(root, kept, exact, np.where(exact, 1.0, best[rep]), len(edges))


# ----------------------------------------------------------------------------------------------------
# Step 4: filter


def write_kept(layout: Layout, keep: np.ndarray, out: Path, origin: str, want_ids: np.ndarray,
               chars: list[int]) -> tuple[list[ShardInfo], dict[int, str]]:
    """Write each shard's kept documents (`keep`: (docs,) bool) to a shard of the same name and split in
    `out`. Returns the shards' infos and the ids of the documents listed in `want_ids` (for the audit)."""
    infos, ids = [], {}
    wanted = set(want_ids.tolist())
    with progress(total=sum(chars) or None, desc="write", unit="char", unit_scale=True) as bar:
        for s, path in enumerate(layout.paths):
            doc = int(layout.first[s])
            with ShardWriter(out / layout.files[s], layout.splits[s], origin=f"{origin}/{layout.files[s]}") as writer:
                for id_batch, texts, sources in zip(iter_text_batches(path, READ_DOCS, "id"),
                                                    iter_text_batches(path, READ_DOCS),
                                                    iter_text_batches(path, READ_DOCS, "source")):
                    for doc_id, text, source in zip(id_batch, texts, sources):
                        if keep[doc]:
                            writer.write(doc_id, text, source)
                        if doc in wanted:
                            ids[doc] = doc_id
                        doc += 1
                    bar.update(sum(map(len, texts)))
            infos.append(writer.info)
    return infos, ids


def removed_table(layout: Layout, clusters: Clusters, ids: dict[int, str]) -> pa.Table:
    """The audit table: one row per removed document, in manifest order."""
    removed = clusters.removed()
    kept = clusters.kept[removed]
    shard, kept_shard = layout.shard_of(removed), layout.shard_of(kept)
    return pa.table({
        "id": [ids[d] for d in removed.tolist()],
        "file": [layout.files[s] for s in shard.tolist()],
        "row": removed - layout.first[shard],
        "split": [layout.splits[s] for s in shard.tolist()],
        "reason": np.where(clusters.exact[removed], "exact", "near").tolist(),
        "jaccard": pa.array(clusters.jaccard[removed], pa.float64(), from_pandas=True),  # NaN -> null
        "cluster": clusters.root[removed],
        "kept_id": [ids[d] for d in kept.tolist()],
        "kept_file": [layout.files[s] for s in kept_shard.tolist()],
        "kept_row": kept - layout.first[kept_shard],
    }, schema=REMOVED_SCHEMA)


# ----------------------------------------------------------------------------------------------------
# The whole stage


@dataclass
class DedupResult:
    """Counts and timings of one run; `metrics(p)` is the stage's flat metrics JSON. Steps timed:
    signatures, buckets, clusters (verification included) and write."""

    docs_in: int = 0
    docs_out: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    removed_val: int = 0  # validation documents removed (duplicates within the validation split)
    candidate_pairs: int = 0
    verified_pairs: int = 0  # candidate pairs at or above the threshold (all of them when verify is off)
    unshingled_docs: int = 0  # documents with no word: only their exact duplicates can be found
    chars_in: int = 0
    chars_out: int = 0
    text_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per step

    def metrics(self, p) -> dict:
        fp, fn = lsh_error_rates(p.threshold, p.bands, p.rows)
        seconds = sum(self.seconds.values())
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "removed_fraction": (self.docs_in - self.docs_out) / self.docs_in,
            "removed_val": self.removed_val,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "docs_per_s": self.docs_in / seconds,
            "mb_per_s": self.text_bytes / 1e6 / seconds,
            "signature_mb_per_s": self.text_bytes / 1e6 / self.seconds["signatures"],
            "seconds": seconds,
            **{f"{step}_seconds": s for step, s in self.seconds.items()},
            "threshold": p.threshold,
            "shingle": p.shingle,
            "ngram": p.ngram,
            "num_perm": p.num_perm,
            "bands": p.bands,
            "rows": p.rows,
            "verify": p.verify,
            "est_false_positive_rate": fp,
            "est_false_negative_rate": fn,
            "p_candidate_at_threshold": float(candidate_probability(p.threshold, p.bands, p.rows)),
            "candidate_pairs": self.candidate_pairs,
            "verified_pairs": self.verified_pairs,
            "unshingled_docs": self.unshingled_docs,
        }

    def summary(self) -> str:
        return (f"{self.docs_in:,} documents -> {self.docs_out:,}: removed {self.exact_duplicates:,} exact and "
                f"{self.near_duplicates:,} near duplicates ({self.candidate_pairs:,} candidate pairs, "
                f"{self.verified_pairs:,} at or above the threshold)")


def dedup(data: str | os.PathLike, out: str | os.PathLike, p, parts: str | os.PathLike | None = None) -> DedupResult:
    """Deduplicate the text dataset `data` into `out` (written into directly: the caller makes it atomic,
    see daychat.io.atomic_dir): kept shards, manifest.json and REMOVED. `p`: DedupParams. With `parts`,
    step 1 comes from the per-shard parts in that folder (see `sign_part`) and its time is the span from
    the first part's start to the last part's end, plus loading them."""
    data, out = Path(data), Path(out)
    manifest = read_manifest(data)
    paths = shard_paths(data)  # every listed shard must exist: fail before starting workers
    chars = [s.chars for s in manifest]
    result, clock = DedupResult(), time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        result.seconds[step] = time.perf_counter() - clock
        clock = time.perf_counter()

    if parts is None:
        sigs, rows = sign_corpus(paths, chars, p)
    else:
        sigs, rows, found = load_parts(data, parts, p)
        clock -= max(part["finished"] for part in found) - min(part["started"] for part in found)
    if len(sigs.exact) == 0:
        raise UserError(f"{data} holds no documents ({len(manifest)} shards, all empty); "
                        "check the stage that wrote it")
    layout = Layout(paths, [s.file for s in manifest], [s.split for s in manifest],
                    np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))
    lap("signatures")

    docs = np.arange(len(sigs.exact))
    rep = exact_groups(sigs.exact)
    pairs = candidate_pairs(sigs.bands, docs[(rep == docs) & (sigs.shingles > 0)])  # one per exact group
    lap("buckets")

    clusters = cluster(pairs, sigs, rep, layout, p)
    removed = clusters.removed()
    lap("clusters")

    keep = clusters.kept == docs
    infos, ids = write_kept(layout, keep, out, str(data), np.union1d(removed, clusters.kept[removed]), chars)
    write_manifest(out, infos, removed=REMOVED)
    pq.write_table(removed_table(layout, clusters, ids), out / REMOVED, compression="zstd")
    lap("write")

    exact = clusters.exact[removed]
    result.docs_in, result.docs_out = len(docs), int(keep.sum())
    result.exact_duplicates, result.near_duplicates = int(exact.sum()), int((~exact).sum())
    result.removed_val = int(layout.is_val()[removed].sum())
    result.candidate_pairs, result.verified_pairs = len(pairs), clusters.verified_pairs
    result.unshingled_docs = int((sigs.shingles == 0).sum())
    result.chars_in, result.chars_out, result.text_bytes = sigs.chars, sum(i.chars for i in infos), sigs.text_bytes
    return result
